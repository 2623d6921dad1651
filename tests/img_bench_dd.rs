//! `rqemu-img bench` and `rqemu-img dd` against qemu-img: dd's messages and the images it
//! creates (byte for byte), bench's report (timing aside), the data bench writes, and
//! the error cases of both.

use std::path::Path;

use rqemu::Scratch;

mod img_common;
use img_common::{chain, exact_qemu, outcome, qemu_img, rqemu, run_in, same, setup};

/// Builds the inputs with QEMU's tools.
fn inputs(d: &Path) {
    chain(d);
    std::fs::write(d.join("small.raw"), b"abc").unwrap();
}

#[test]
fn dd_matches_qemu_img() {
    if !exact_qemu() {
        return;
    }
    let s = Scratch::new("dd");
    let d = s.path();
    inputs(d);
    for args in [
        &["if=top.qcow2"][..],
        &["if=top.qcow2", "-O", "qcow2"],
        &[
            "if=top.qcow2",
            "-O",
            "qcow2",
            "bs=1k",
            "count=500",
            "skip=3",
        ],
        &["if=top.qcow2", "bs=1000", "count=777", "skip=3"],
        &["if=top.qcow2", "bs=1000", "skip=3", "-O", "qcow2"],
        &["if=top.qcow2", "bs=64k", "count=0x10"],
        &["if=top.qcow2", "bs=1.5k", "count=7"],
        &["if=top.qcow2", "skip=100000"],
        &["if=top.qcow2", "skip=4096"],
        &["if=top.qcow2", "bs=1k", "count=0"],
        &["if=small.raw"],
        &["if=small.raw", "-O", "qcow2"],
        &["-U", "-f", "raw", "if=base.qcow2", "-O", "qcow2"],
        &["--image-opts", "if=driver=qcow2,file.filename=top.qcow2"],
        &["--output-format=qcow2", "--format=qcow2", "if=top.qcow2"],
    ] {
        for (tool, out) in [("qemu-img", "q.out"), ("rqemu-img", "r.out")] {
            let _ = std::fs::remove_file(d.join(out));
            let of = format!("of={out}");
            let mut a = vec!["dd"];
            a.extend(args);
            a.push(&of);
            let o = if tool == "qemu-img" {
                run_in(d, tool, &a)
            } else {
                rqemu(d, tool, &a)
            };
            let (code, stdout, stderr) = outcome(&o);
            let key = (code, stdout, stderr.replace("r.out", "q.out"));
            if tool == "qemu-img" {
                std::fs::write(d.join("q.log"), format!("{key:?}")).unwrap();
            } else {
                let want = std::fs::read_to_string(d.join("q.log")).unwrap();
                assert_eq!(format!("{key:?}"), want, "dd {args:?}");
            }
        }
        let (q, r) = (
            std::fs::read(d.join("q.out")),
            std::fs::read(d.join("r.out")),
        );
        assert!(q.ok() == r.ok(), "dd {args:?}: output images differ");
    }
}

#[test]
fn dd_errors_match_qemu_img() {
    if !exact_qemu() {
        return;
    }
    let s = Scratch::new("dd-err");
    let d = s.path();
    inputs(d);
    for args in [
        &["dd"][..],
        &["dd", "if=top.qcow2"],
        &["dd", "of=x.out"],
        &["dd", "if=top.qcow2", "of=x.out", "foo"],
        &["dd", "if=top.qcow2", "of=x.out", "foo=1"],
        &["dd", "if=top.qcow2", "of=x.out", "bs=0"],
        &["dd", "if=top.qcow2", "of=x.out", "bs=3G"],
        &["dd", "if=top.qcow2", "of=x.out", "bs=x"],
        &["dd", "if=top.qcow2", "of=x.out", "count=1k"],
        &["dd", "if=top.qcow2", "of=x.out", "count=-1"],
        &["dd", "if=top.qcow2", "of=x.out", "skip=x"],
        &["dd", "if=missing", "of=x.out"],
        &["dd", "-f", "foo", "if=top.qcow2", "of=x.out"],
        &["dd", "if=top.qcow2", "of=x.out", "-O", "foo"],
        &["dd", "if=top.qcow2", "of=x.out", "-O", "bochs"],
        &["dd", "if=top.qcow2", "of=/nonexistent/x.out"],
        &["dd", "-z", "if=top.qcow2", "of=x.out"],
        &[
            "dd",
            "-f",
            "qcow2",
            "--image-opts",
            "if=top.qcow2",
            "of=x.out",
        ],
        &["dd", "--object", "foo", "if=top.qcow2", "of=x.out"],
    ] {
        same(d, args);
    }
}

#[test]
fn bench_matches_qemu_img() {
    if !exact_qemu() {
        return;
    }
    let s = Scratch::new("bench");
    let d = s.path();
    inputs(d);
    setup(d, "truncate", &["-s", "1M", "r.raw"]);
    for args in [
        &["bench", "-c", "100", "top.qcow2"][..],
        &["bench", "-q", "-c", "2", "top.qcow2"],
        &[
            "bench",
            "-c",
            "10",
            "-d",
            "2",
            "-s",
            "1k",
            "-S",
            "0",
            "top.qcow2",
        ],
        &[
            "bench",
            "-c",
            "3",
            "-d",
            "1",
            "-o",
            "1000000",
            "-s",
            "48576",
            "top.qcow2",
        ],
        &["bench", "--pattern", "0x10", "-c", "1", "top.qcow2"],
        &["bench", "-c", "1", "-i", "io_uring", "-U", "top.qcow2"],
        &["bench", "--native", "-c", "1", "-t", "none", "top.qcow2"],
        &[
            "bench",
            "--image-opts",
            "-c",
            "1",
            "driver=qcow2,file.filename=top.qcow2",
        ],
        &[
            "bench", "-w", "-c", "146", "-d", "1", "-s", "3k", "-S", "7k", "-f", "raw", "r.raw",
        ],
        &[
            "bench", "-w", "-c", "147", "-d", "1", "-s", "3k", "-S", "7k", "-f", "raw", "r.raw",
        ],
        &[
            "bench",
            "-w",
            "-c",
            "64",
            "-d",
            "8",
            "--flush-interval",
            "8",
            "-f",
            "raw",
            "r.raw",
        ],
        &[
            "bench",
            "-w",
            "-c",
            "64",
            "-d",
            "8",
            "--flush-interval=16",
            "--no-drain",
            "-f",
            "raw",
            "r.raw",
        ],
        &["bench", "-s", "4M", "-c", "1", "top.qcow2"],
        &["bench", "-o", "4M", "-c", "1", "top.qcow2"],
        &["bench"],
        &["bench", "top.qcow2", "base.qcow2"],
        &["bench", "-c", "1k", "top.qcow2"],
        &["bench", "-c", "0", "top.qcow2"],
        &["bench", "-d", "0", "top.qcow2"],
        &["bench", "-s", "0", "top.qcow2"],
        &["bench", "-S", "-1", "top.qcow2"],
        &["bench", "--pattern", "256", "-w", "top.qcow2"],
        &["bench", "--flush-interval", "1", "top.qcow2"],
        &["bench", "-w", "--flush-interval", "1", "top.qcow2"],
        &["bench", "-t", "foo", "top.qcow2"],
        &["bench", "-i", "foo", "top.qcow2"],
        &["bench", "-n", "-c", "1", "top.qcow2"],
        &["bench", "-w", "-U", "-c", "1", "top.qcow2"],
        &["bench", "-c", "1", "missing.qcow2"],
        &["bench", "--quiet", "top.qcow2"],
    ] {
        same(d, args);
    }
    // Writes leave the same image behind.
    for img in ["q.qcow2", "r.qcow2"] {
        qemu_img(d, &format!("create -q -f qcow2 {img} 1M"));
    }
    let w = [
        "bench",
        "-w",
        "-c",
        "140",
        "-d",
        "4",
        "-s",
        "3k",
        "-S",
        "7k",
        "--pattern",
        "0xab",
    ];
    setup(d, "qemu-img", &[&w[..], &["q.qcow2"]].concat());
    let o = rqemu(d, "rqemu-img", &[&w[..], &["r.qcow2"]].concat());
    assert!(o.status.success(), "{o:?}");
    setup(d, "qemu-img", &["compare", "q.qcow2", "r.qcow2"]);
}

#[test]
fn dd_copies_and_bench_writes() {
    let s = Scratch::new("dd-data");
    let d = s.path();
    let io = |args: &[&str]| {
        let o = rqemu(d, "rqemu-io", args);
        assert!(o.status.success(), "{o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let img = |args: &[&str]| {
        let o = rqemu(d, "rqemu-img", args);
        assert!(o.status.success(), "{o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    img(&["create", "-q", "-f", "qcow2", "in.qcow2", "1M"]);
    io(&[
        "-c",
        "write -P 0x5a 4k 8k",
        "-c",
        "write -P 0x33 900k 4k",
        "in.qcow2",
    ]);
    // skip=1 block of 4k: the output starts with the data written at 4k.
    img(&[
        "dd",
        "if=in.qcow2",
        "of=out.raw",
        "bs=4k",
        "skip=1",
        "count=200",
    ]);
    let out = std::fs::read(d.join("out.raw")).unwrap();
    assert_eq!(out.len(), 199 * 4096);
    assert!(out[..8192].iter().all(|&b| b == 0x5a));
    assert!(out[8192..].iter().all(|&b| b == 0));
    img(&[
        "dd",
        "-O",
        "qcow2",
        "if=in.qcow2",
        "of=out.qcow2",
        "bs=1000",
    ]);
    io(&[
        "-c",
        "read -P 0x33 900k 4k",
        "-c",
        "read -P 0x5a 4k 8k",
        "-c",
        "read -P 0 0 4k",
        "out.qcow2",
    ]);
    img(&["create", "-q", "-f", "qcow2", "b.qcow2", "1M"]);
    let report = img(&[
        "bench",
        "-w",
        "-c",
        "32",
        "-d",
        "8",
        "-s",
        "8k",
        "--pattern",
        "0x77",
        "b.qcow2",
    ]);
    let mut lines = report.lines();
    assert_eq!(
        lines.next(),
        Some("Sending 32 write requests, 8192 bytes each, 8 in parallel (starting at offset 0, step size 8192)")
    );
    assert!(lines
        .next()
        .is_some_and(|l| l.starts_with("Run completed in ") && l.ends_with(" seconds.")));
    io(&[
        "-c",
        "read -P 0x77 0 256k",
        "-c",
        "read -P 0 256k 768k",
        "b.qcow2",
    ]);
}
