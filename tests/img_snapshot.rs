//! `rqemu-img snapshot` against qemu-img: `-c`, `-l`, `-a` and `-d` run with each tool
//! on its own copy of the same image. Messages, exit codes and listings (dates aside)
//! must match, a listing of the same image must match exactly, and the images must read
//! the same and check clean after every step.

use std::path::{Path, PathBuf};

use rqemu::Scratch;

mod img_common;
use img_common::{exact_qemu, io, outcome, qemu_img, rqemu, run_in, same};

/// The listing with each `YYYY-MM-DD HH:MM:SS` date masked (the tools create their
/// snapshots at different moments).
fn mask_dates(text: &str) -> String {
    let shape = b"dddd-dd-dd dd:dd:dd";
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        let fits = b.len() - i >= shape.len()
            && shape.iter().zip(&b[i..]).all(|(s, c)| match s {
                b'd' => c.is_ascii_digit(),
                s => s == c,
            });
        if fits {
            out.push_str("<date>");
            i += shape.len();
        } else {
            let ch = text[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// Runs `args` with qemu-img in `q` and rqemu-img in `r` (each on its own image);
/// compares exit status, stdout (dates masked) and stderr.
fn both(q: &Path, r: &Path, args: &[&str]) {
    let a = outcome(&run_in(q, "qemu-img", args));
    let b = outcome(&rqemu(r, "rqemu-img", args));
    let masked = |(c, o, e): (Option<i32>, String, String)| (c, mask_dates(&o), e);
    assert_eq!(masked(b), masked(a), "snapshot: {}", args.join(" "));
    let (qi, ri) = (q.join("a.qcow2"), r.join("a.qcow2"));
    let (qi, ri) = (qi.to_string_lossy(), ri.to_string_lossy());
    let c = run_in(q, "qemu-img", &["compare", "-q", &qi, &ri]);
    assert!(
        c.status.success(),
        "{}: images read differently",
        args.join(" ")
    );
    let c = run_in(r, "qemu-img", &["check", &ri]);
    assert!(c.status.success(), "{}: check: {c:?}", args.join(" "));
}

/// A directory holding a fresh copy of the test image.
fn copy_of(d: &Path, name: &str) -> PathBuf {
    let dir = d.join(name);
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(d.join("a.qcow2"), dir.join("a.qcow2")).unwrap();
    dir
}

#[test]
fn snapshot_matches_qemu_img() {
    if !exact_qemu() {
        return;
    }
    let s = Scratch::new("snapshot");
    let d = s.path();
    qemu_img(d, "create -q -f qcow2 a.qcow2 4M");
    io(d, "qemu-io", "a.qcow2", &["write -P 1 0 1M"]);
    let (q, r) = (copy_of(d, "q"), copy_of(d, "r"));
    both(&q, &r, &["snapshot", "-l", "a.qcow2"]);
    both(&q, &r, &["snapshot", "-c", "s1", "a.qcow2"]);
    for dir in [&q, &r] {
        io(dir, "qemu-io", "a.qcow2", &["write -P 2 512k 1M"]);
    }
    both(&q, &r, &["snapshot", "-c", "s2", "a.qcow2"]);
    both(&q, &r, &["snapshot", "-l", "a.qcow2"]);
    both(&q, &r, &["snapshot", "-l", "-U", "a.qcow2"]);
    both(&q, &r, &["snapshot", "-c", "s1", "a.qcow2"]);
    both(&q, &r, &["snapshot", "-a", "s1", "a.qcow2"]);
    let back = io(
        &r,
        "qemu-io",
        "a.qcow2",
        &["read -P 1 0 1M", "read -P 0 1M 3M"],
    );
    assert!(!back.contains("Pattern verification failed"), "{back}");
    both(&q, &r, &["snapshot", "-d", "s2", "a.qcow2"]);
    both(&q, &r, &["snapshot", "-l", "a.qcow2"]);
    for args in [
        &["snapshot", "-a", "nosuch", "a.qcow2"][..],
        &["snapshot", "-d", "nosuch", "a.qcow2"],
        &["snapshot", "a.qcow2"],
        &["snapshot", "-l"],
        &["snapshot", "-c", "x", "-d", "y", "a.qcow2"],
        &["snapshot", "-l", "nosuch.qcow2"],
    ] {
        both(&q, &r, args);
    }
    // Each tool lists the other's snapshots exactly as it lists its own.
    for dir in [&q, &r] {
        same(dir, &["snapshot", "-l", "a.qcow2"]);
    }
    qemu_img(d, "create -q -f raw b.raw 1M");
    same(d, &["snapshot", "-c", "s1", "b.raw"]);
    same(d, &["snapshot", "-l", "b.raw"]);
}
