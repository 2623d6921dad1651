//! `rqemu-img convert` against `qemu-img convert`: both tools convert the same inputs
//! (raw and qcow2, backing chains, snapshots, compression with zlib and zstd, `-B`, `-n`,
//! `-S`, several sources) and the targets must be byte-identical where qemu-img's layout
//! is deterministic, read the same everywhere, and check clean; errors and progress
//! output must match.

use std::path::Path;

use rqemu::Scratch;

mod img_common;
use img_common::{exact_qemu, io, qemu_img, rqemu, run_in, same, setup};

/// Sources: a sparse raw file with data, zero runs and a short tail run; a 3-deep qcow2
/// chain with zero and compressed clusters and a snapshot; a raw file of odd length.
fn sources(d: &Path) {
    setup(d, "truncate", &["-s", "8M", "src.raw"]);
    let w = [
        "write -P 0xab 0 300k",
        "write -P 0 1M 64k",
        "write -P 7 2M 4k",
        "write -P 9 3M 513",
        "write -P 5 5M 1M",
    ];
    let mut args = vec!["-f", "raw"];
    for c in &w {
        args.extend(["-c", c]);
    }
    args.push("src.raw");
    setup(d, "qemu-io", &args);
    qemu_img(d, "create -q -f qcow2 base.qcow2 8M");
    io(
        d,
        "qemu-io",
        "base.qcow2",
        &["write -P 1 0 2M", "write -P 2 4M 1M"],
    );
    qemu_img(d, "create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2");
    io(
        d,
        "qemu-io",
        "mid.qcow2",
        &[
            "write -P 3 256k 256k",
            "write -z 4M 128k",
            "write -c -P 6 6M 64k",
        ],
    );
    qemu_img(d, "create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2");
    io(
        d,
        "qemu-io",
        "top.qcow2",
        &["write -P 4 1M 100k", "discard 0 64k"],
    );
    qemu_img(d, "snapshot -c snap1 top.qcow2");
    io(d, "qemu-io", "top.qcow2", &["write -P 8 0 128k"]);
    std::fs::write(d.join("odd.raw"), b"abcdefg").unwrap();
}

/// Converts with both tools into `q.out` and `r.out`; asserts the same exit status and
/// messages, identical content, a clean check, and (when `identical`) the same bytes.
fn convert_both(d: &Path, args: &[&str], identical: bool) {
    let _ = std::fs::remove_file(d.join("q.out"));
    let _ = std::fs::remove_file(d.join("r.out"));
    let mut qa: Vec<&str> = vec!["convert"];
    qa.extend(args);
    let mut ra = qa.clone();
    qa.push("q.out");
    ra.push("r.out");
    let q = img_common::outcome(&run_in(d, "qemu-img", &qa));
    let r = img_common::outcome(&rqemu(d, "rqemu-img", &ra));
    assert_eq!(r, q, "convert {}", args.join(" "));
    if q.0 != Some(0) {
        return;
    }
    let o = run_in(d, "qemu-img", &["compare", "-q", "q.out", "r.out"]);
    assert!(
        o.status.success(),
        "convert {}: contents differ",
        args.join(" ")
    );
    let info = run_in(d, "qemu-img", &["info", "--output=json", "r.out"]);
    if String::from_utf8_lossy(&info.stdout).contains("\"format\": \"qcow2\"") {
        let c = run_in(d, "qemu-img", &["check", "r.out"]);
        assert!(
            c.status.success(),
            "convert {}: check {c:?}",
            args.join(" ")
        );
    }
    if identical {
        let a = std::fs::read(d.join("q.out")).unwrap();
        let b = std::fs::read(d.join("r.out")).unwrap();
        assert!(
            a == b,
            "convert {}: targets differ in bytes",
            args.join(" ")
        );
    }
}

#[test]
fn convert_matches_qemu_img() {
    if !exact_qemu() {
        return;
    }
    let s = Scratch::new("convert");
    let d = s.path();
    sources(d);
    for (args, identical) in [
        (&["-O", "qcow2", "src.raw"][..], true),
        (&["-O", "raw", "src.raw"], true),
        (&["-O", "qcow2", "top.qcow2"], true),
        (&["-O", "raw", "top.qcow2"], true),
        (&["-O", "qcow2", "-c", "src.raw"], true),
        (&["-O", "qcow2", "-c", "top.qcow2"], true),
        (
            &[
                "-O",
                "qcow2",
                "-c",
                "-o",
                "compression_type=zstd",
                "src.raw",
            ],
            true,
        ),
        (&["-O", "qcow2", "-c", "-S", "0", "top.qcow2"], true),
        (&["-O", "qcow2", "-S", "0", "src.raw"], true),
        (&["-O", "raw", "-S", "0", "top.qcow2"], true),
        (&["-O", "qcow2", "-S", "64k", "src.raw"], true),
        (&["-O", "qcow2", "-o", "cluster_size=4k", "src.raw"], true),
        (&["-O", "qcow2", "-o", "compat=0.10", "top.qcow2"], true),
        (&["-O", "qcow2", "-o", "extended_l2=on", "top.qcow2"], true),
        (
            &["-O", "qcow2", "-o", "preallocation=metadata", "top.qcow2"],
            true,
        ),
        (
            &["-O", "qcow2", "-B", "mid.qcow2", "-F", "qcow2", "top.qcow2"],
            true,
        ),
        (
            &[
                "-O",
                "qcow2",
                "-B",
                "base.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
            true,
        ),
        (
            &[
                "-O",
                "qcow2",
                "-c",
                "-B",
                "mid.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
            true,
        ),
        (&["-O", "qcow2", "-l", "snap1", "top.qcow2"], true),
        (
            &["-O", "raw", "-l", "snapshot.name=snap1", "top.qcow2"],
            true,
        ),
        (&["-O", "qcow2", "src.raw", "top.qcow2", "odd.raw"], true),
        (&["odd.raw"], true),
        (&["-m", "1", "-O", "qcow2", "top.qcow2"], true),
        (&["-W", "-O", "qcow2", "top.qcow2"], false),
        (&["-W", "-c", "-O", "qcow2", "src.raw"], false),
        (&["-p", "-O", "qcow2", "src.raw"], true),
        (&["-C", "-O", "raw", "src.raw"], true),
        (&["-C", "-O", "qcow2", "src.raw"], true),
        (&["-C", "-O", "qcow2", "top.qcow2"], true),
        (&["-C", "odd.raw"], true),
        (&["-r", "1G", "-O", "qcow2", "top.qcow2"], true),
        (&["--salvage", "-O", "qcow2", "top.qcow2"], true),
        (&["-f", "qcow2", "-O", "raw", "top.qcow2"], true),
        (&["-p", "-S", "0", "-O", "raw", "top.qcow2"], true),
        (
            &[
                "-q",
                "-T",
                "none",
                "-t",
                "writeback",
                "-O",
                "qcow2",
                "src.raw",
            ],
            true,
        ),
    ] {
        convert_both(d, args, identical);
    }
    // Into an existing target (-n), which then keeps its format and size.
    qemu_img(d, "create -q -f qcow2 q.exist 8M");
    for (prog, out) in [("qemu-img", "q.exist"), ("rqemu-img", "r.exist")] {
        let args = ["convert", "-n", "-O", "qcow2", "top.qcow2", out];
        if prog == "rqemu-img" {
            qemu_img(d, "create -q -f qcow2 r.exist 8M");
            assert!(rqemu(d, prog, &args).status.success());
        } else {
            setup(d, prog, &args);
        }
    }
    setup(d, "qemu-img", &["compare", "q.exist", "r.exist"]);
    setup(d, "qemu-img", &["compare", "top.qcow2", "r.exist"]);
}

#[test]
fn convert_errors_match_qemu_img() {
    if !exact_qemu() {
        return;
    }
    let s = Scratch::new("convert-err");
    let d = s.path();
    qemu_img(d, "create -q -f raw s.raw 1M");
    qemu_img(d, "create -q -f qcow2 s.qcow2 1M");
    for args in [
        &["convert"][..],
        &["convert", "s.raw"],
        &["convert", "-x", "s.raw", "t"],
        &["convert", "-m", "17", "s.raw", "t"],
        &["convert", "-m", "x", "s.raw", "t"],
        &["convert", "-S", "100", "s.raw", "t"],
        &["convert", "-c", "-C", "s.raw", "t"],
        &["convert", "-C", "-S", "4k", "s.raw", "t"],
        &["convert", "--salvage", "-C", "s.raw", "t"],
        &["convert", "-B", "b", "s.raw", "t"],
        &["convert", "-O", "qcow2", "-B", "b", "s.raw", "t"],
        &["convert", "-r", "abc", "s.raw", "t"],
        &["convert", "-o", "foo=1", "s.raw", "t"],
        &["convert", "-n", "-o", "cluster_size=4k", "s.raw", "t"],
        &["convert", "--target-is-zero", "s.raw", "t"],
        &["convert", "--target-image-opts", "s.raw", "t"],
        &["convert", "--skip-broken-bitmaps", "s.raw", "t"],
        &["convert", "--bitmaps", "s.raw", "t"],
        &["convert", "-O", "raw", "-c", "s.raw", "t"],
        &[
            "convert",
            "-O",
            "qcow2",
            "-c",
            "-o",
            "preallocation=full",
            "s.raw",
            "t",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=3k",
            "s.raw",
            "t",
        ],
        &["convert", "-O", "foo", "s.raw", "t"],
        &["convert", "-t", "foo", "s.raw", "t"],
        &["convert", "-T", "foo", "s.raw", "t"],
        &["convert", "-l", "nosuch", "s.raw", "t"],
        &["convert", "-O", "qcow2", "-l", "nosuch", "s.qcow2", "t"],
        &["convert", "-n", "s.raw", "missing"],
        &["convert", "missing", "t"],
        &[
            "convert", "-f", "raw", "-O", "qcow2", "-o", "size=1X", "s.raw", "t",
        ],
        &["convert", "-f", "qcow2", "s.raw", "t"],
        &[
            "convert", "-O", "qcow2", "-B", "missing", "-F", "qcow2", "s.qcow2", "t",
        ],
        &[
            "convert", "-O", "qcow2", "-B", "s.qcow2", "-F", "qcow2", "s.qcow2", "s.raw", "t",
        ],
        &["convert", "-O", "qcow2", "-o", "help", "s.raw", "t"],
    ] {
        let _ = std::fs::remove_file(d.join("t"));
        same(d, args);
    }
    // A target smaller than the source.
    qemu_img(d, "create -q -f raw small.raw 64k");
    same(d, &["convert", "-n", "s.raw", "small.raw"]);
}

#[test]
fn convert_keeps_content_and_sparseness() {
    // Data checks that run with any qemu-img: content identical, images clean, holes kept.
    let s = Scratch::new("convert-data");
    let d = s.path();
    sources(d);
    for (args, out) in [
        (&["-O", "qcow2", "top.qcow2"][..], "a.qcow2"),
        (&["-O", "raw", "a.qcow2"], "a.raw"),
        (&["-O", "qcow2", "-c", "a.raw"], "c.qcow2"),
        (
            &[
                "-O",
                "qcow2",
                "-c",
                "-o",
                "compression_type=zstd",
                "c.qcow2",
            ],
            "z.qcow2",
        ),
        (&["-O", "raw", "z.qcow2"], "z.raw"),
    ] {
        let mut a = vec!["convert"];
        a.extend(args);
        a.push(out);
        let o = rqemu(d, "rqemu-img", &a);
        assert!(o.status.success(), "{a:?}: {o:?}");
        setup(d, "qemu-img", &["compare", "top.qcow2", out]);
        if out.ends_with("qcow2") {
            setup(d, "qemu-img", &["check", out]);
        }
    }
    // An 8 MiB image with 2.3 MiB of data stays sparse as raw.
    let meta = std::fs::metadata(d.join("z.raw")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 4 << 20, "raw output is not sparse");
}
