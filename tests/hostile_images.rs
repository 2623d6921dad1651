//! Hostile images: truncated headers, absurd table sizes, offsets past the end, loops,
//! overlapping metadata. Every tool must fail (or cope) with a clear message naming the
//! file and a non-zero exit: never a panic, a hang or a huge allocation. Where QEMU has a
//! message for the case, rqemu's is the same.

use std::io::{Seek, SeekFrom, Write};
use std::process::Command;
use std::time::Duration;

use rqemu::{bin, need_qemu_10, normalize, require_qemu, run_ok, Scratch};

fn poke(file: &str, offset: u64, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
}

/// Runs a tool with a 2 GiB address-space limit and a time limit; returns
/// (exit code, stdout, stderr).
fn run_limited(prog: &str, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new("timeout");
    cmd.arg("60")
        .arg("sh")
        .arg("-c")
        .arg("ulimit -v 2097152; exec \"$@\"")
        .arg("sh")
        .arg(prog)
        .args(args);
    let o = cmd.output().unwrap();
    let code = o.status.code().unwrap_or(-1);
    (
        code,
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

struct Case {
    name: &'static str,
    pokes: Vec<(u64, Vec<u8>)>,
    truncate: Option<u64>,
    /// Whether opening must fail (some damage only shows on I/O or in `check`).
    open_fails: bool,
}

fn be32(v: u32) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn be64(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn cases() -> Vec<Case> {
    let c = |name, pokes: Vec<(u64, Vec<u8>)>, open_fails| Case {
        name,
        pokes,
        truncate: None,
        open_fails,
    };
    vec![
        Case {
            truncate: Some(50),
            ..c("truncated header", vec![], true)
        },
        Case {
            truncate: Some(100),
            ..c("header cut inside v3 fields", vec![], true)
        },
        Case {
            truncate: Some(0),
            ..c("empty file as qcow2", vec![], true)
        },
        c("bad version", vec![(4, be32(7))], true),
        c("huge cluster bits", vec![(20, be32(40))], true),
        c("huge header length", vec![(100, be32(0xffff_fff8))], true),
        c("absurd l1_size", vec![(36, be32(0xffff_ffff))], true),
        c("l1 table too small", vec![(36, be32(0))], true),
        c(
            "misaligned l1 table",
            vec![(40, be64(0x1234_5678_90ab_cdef))],
            true,
        ),
        c(
            "l1 table past end of file",
            vec![(40, be64(0x7fff_ffff_0000_0000))],
            false,
        ),
        c(
            "absurd refcount_table_clusters",
            vec![(56, be32(0xffff_ffff))],
            true,
        ),
        c(
            "misaligned refcount table",
            vec![(48, be64(0x1234_5678_90ab_cdef))],
            true,
        ),
        c(
            "refcount table past end",
            vec![(48, be64(0xffff_ffff_ffff_0000)), (56, be32(0x7f))],
            true,
        ),
        c("absurd snapshot count", vec![(60, be32(0xffff_ffff))], true),
        c(
            "snapshot table past end",
            vec![(60, be32(2)), (64, be64(0x100_0000_0000))],
            false,
        ),
        c(
            "backing name too long",
            vec![(8, be64(0x1000)), (16, be32(0xffff_ffff))],
            true,
        ),
        c(
            "invalid backing offset",
            vec![(8, be64(0xffff_ffff_ffff_ffff))],
            true,
        ),
        c(
            "unknown incompatible feature",
            vec![(72, be64(1 << 40))],
            true,
        ),
        c("refcount order too large", vec![(96, be32(7))], true),
        c(
            "unknown compression type",
            vec![(72, be64(1 << 3)), (104, vec![9])],
            true,
        ),
        c(
            "l2 table offset unaligned",
            vec![(0x30000, be64(0x8000_0000_0004_2a00))],
            false,
        ),
        c(
            "l2 table beyond the file",
            vec![(0x30000, be64(0x8000_0fff_ffff_0000))],
            false,
        ),
        c(
            "l1 points at the header",
            vec![(0x30000, be64(0x8000_0000_0000_0000))],
            false,
        ),
        c(
            "refblock overlapping the l1 table",
            vec![(0x10000, be64(0x30000))],
            false,
        ),
    ]
}

#[test]
fn hostile_images_fail_cleanly() {
    require_qemu!();
    let s = Scratch::new("hostile");
    let img_tool = bin("rqemu-img").to_string_lossy().into_owned();
    let io_tool = bin("rqemu-io").to_string_lossy().into_owned();
    for case in cases() {
        let img = s.file("bad.qcow2");
        let _ = std::fs::remove_file(&img);
        run_ok("qemu-img", &["create", "-q", "-f", "qcow2", &img, "64M"]);
        // One written cluster gives an L2 table at 0x40000 and data at 0x50000.
        run_ok("qemu-io", &["-c", "write -P 7 0 64k", &img]);
        for (off, bytes) in &case.pokes {
            poke(&img, *off, bytes);
        }
        if let Some(len) = case.truncate {
            let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
            f.set_len(len).unwrap();
        }
        for args in [
            vec!["info", "-f", "qcow2", img.as_str()],
            vec!["check", "-f", "qcow2", img.as_str()],
        ] {
            let (code, out, err) = run_limited(&img_tool, &args);
            assert!(
                code != 101 && code != 124 && code != -1,
                "{}: {args:?} crashed or hung ({code}): {err}",
                case.name
            );
            assert!(
                !err.contains("panicked"),
                "{}: {args:?} panicked: {err}",
                case.name
            );
            if case.open_fails {
                assert_ne!(code, 0, "{}: {args:?} accepted the image: {out}", case.name);
                if args[0] == "info" {
                    let first = err.lines().next().unwrap_or("");
                    assert!(
                        first.contains("bad.qcow2"),
                        "{}: message does not name the file: {err}",
                        case.name
                    );
                }
                if need_qemu_10() {
                    let q = Command::new("qemu-img").args(&args).output().unwrap();
                    let qerr = String::from_utf8_lossy(&q.stderr);
                    assert_eq!(normalize(&err), normalize(&qerr), "{}: {args:?}", case.name);
                    assert_eq!(
                        Some(code),
                        q.status.code(),
                        "{}: exit status of {args:?}",
                        case.name
                    );
                }
            }
        }
        let (code, _out, err) = run_limited(
            &io_tool,
            &[
                "-f",
                "qcow2",
                "-c",
                "read 0 128k",
                "-c",
                "write -P 1 0 4k",
                &img,
            ],
        );
        assert!(
            code != 101 && code != 124 && code != -1,
            "{}: rqemu-io crashed or hung ({code}): {err}",
            case.name
        );
        assert!(
            !err.contains("panicked"),
            "{}: rqemu-io panicked: {err}",
            case.name
        );
        if case.open_fails {
            assert_ne!(code, 0, "{}: rqemu-io accepted the image", case.name);
        }
    }
}

#[test]
fn backing_loops_are_refused() {
    require_qemu!();
    let s = Scratch::new("loop");
    let a = s.file("a.qcow2");
    let b = s.file("b.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", &a, "1M"]);
    run_ok(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", &b,
        ],
    );
    run_ok(
        "qemu-img",
        &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", &a],
    );
    let io_tool = bin("rqemu-io").to_string_lossy().into_owned();
    let img_tool = bin("rqemu-img").to_string_lossy().into_owned();
    for args in [
        vec!["-c", "read 0 1", b.as_str()],
        vec!["-r", "-c", "read 0 1", b.as_str()],
        vec!["-r", "-U", "-c", "read 0 1", b.as_str()],
    ] {
        let (code, _, err) = run_limited(&io_tool, &args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(
            err.starts_with("rqemu-io: can't open device"),
            "{args:?}: {err}"
        );
    }
    let (code, _, err) = run_limited(&img_tool, &["info", "--backing-chain", "-U", &b]);
    assert_eq!(code, 1);
    assert!(err.contains("creates an infinite loop"), "{err}");
    let _ = Duration::from_secs(0);
}
