//! `rqemu-img compare` against `qemu-img compare`: identical and different images of
//! both formats, backing chains, images of different sizes, strict mode, progress and
//! quiet output, exit statuses, and the error cases.

use std::path::Path;

use rqemu::{bin, Scratch};

mod img_common;
use img_common::{chain, exact_qemu, qemu_img, rqemu_img, same, setup};

/// Writes with qemu-io (or rqemu-io) to an image of format `fmt`.
fn io(dir: &Path, prog: &str, img: &str, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(img);
    setup(dir, prog, &args);
}

#[test]
fn compare_matches_qemu_img() {
    if !exact_qemu() {
        return;
    }
    let s = Scratch::new("compare");
    let d = s.path();
    chain(d);
    // The same contents as a raw file, with holes, and with one byte changed.
    setup(d, "truncate", &["-s", "2M", "flat.raw"]);
    let flat = [
        "write -P 1 0 32k",
        "write -P 3 32k 64k",
        "write -P 2 300k 10k",
        "write -P 4 1M 64k",
    ];
    io(d, "qemu-io", "flat.raw", "raw", &flat);
    std::fs::copy(d.join("flat.raw"), d.join("changed.raw")).unwrap();
    io(d, "qemu-io", "changed.raw", "raw", &["write -P 9 700k 1"]);
    // Longer images: zeroes past the end, or data there.
    std::fs::copy(d.join("flat.raw"), d.join("long.raw")).unwrap();
    setup(d, "truncate", &["-s", "3M", "long.raw"]);
    std::fs::copy(d.join("long.raw"), d.join("longdata.raw")).unwrap();
    io(
        d,
        "qemu-io",
        "longdata.raw",
        "raw",
        &["write -P 5 2600k 1k"],
    );
    qemu_img(d, "create -q -f qcow2 empty.qcow2 2M");
    qemu_img(d, "create -q -f qcow2 bigempty.qcow2 4M");
    std::fs::write(d.join("small.raw"), b"abc").unwrap();
    qemu_img(d, "create -q -f qcow2 -b small.raw -F raw onsmall.qcow2 1M");
    for args in [
        &["compare", "top.qcow2", "flat.raw"][..],
        &["compare", "flat.raw", "top.qcow2"],
        &["compare", "-s", "top.qcow2", "flat.raw"],
        &["compare", "-s", "top.qcow2", "top.qcow2"],
        &["compare", "-s", "flat.raw", "flat.raw"],
        &["compare", "flat.raw", "changed.raw"],
        &["compare", "-s", "flat.raw", "changed.raw"],
        &["compare", "-q", "flat.raw", "changed.raw"],
        &["compare", "-p", "top.qcow2", "flat.raw"],
        &["compare", "-p", "flat.raw", "changed.raw"],
        &["compare", "flat.raw", "long.raw"],
        &["compare", "long.raw", "flat.raw"],
        &["compare", "-s", "flat.raw", "long.raw"],
        &["compare", "flat.raw", "longdata.raw"],
        &["compare", "-p", "top.qcow2", "longdata.raw"],
        &["compare", "empty.qcow2", "bigempty.qcow2"],
        &["compare", "empty.qcow2", "top.qcow2"],
        &["compare", "-s", "empty.qcow2", "base.qcow2"],
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "top.qcow2",
            "flat.raw",
        ],
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            "base.qcow2",
            "base.qcow2",
        ],
        &["compare", "-T", "none", "-U", "top.qcow2", "flat.raw"],
        &["compare", "-s", "small.raw", "small.raw"],
        &["compare", "-s", "onsmall.qcow2", "empty.qcow2"],
        &["compare", "onsmall.qcow2", "small.raw"],
        &[
            "compare",
            "--image-opts",
            "driver=qcow2,file.filename=top.qcow2",
            "driver=raw,file.filename=flat.raw",
        ],
        &[
            "compare",
            "--object",
            "secret,id=s0,data=x",
            "top.qcow2",
            "flat.raw",
        ],
    ] {
        same(d, args);
    }
}

#[test]
fn compare_errors_match_qemu_img() {
    if !exact_qemu() {
        return;
    }
    let s = Scratch::new("compare-err");
    let d = s.path();
    setup(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"],
    );
    for args in [
        &["compare"][..],
        &["compare", "a.qcow2"],
        &["compare", "a.qcow2", "a.qcow2", "a.qcow2"],
        &["compare", "a.qcow2", "missing"],
        &["compare", "-p", "missing", "a.qcow2"],
        &["compare", "-f", "foo", "a.qcow2", "a.qcow2"],
        &["compare", "-T", "bogus", "a.qcow2", "a.qcow2"],
        &["compare", "-z", "a.qcow2", "a.qcow2"],
        &["compare", "a.qcow2", "a.qcow2", "-F"],
        &[
            "compare",
            "--image-opts",
            "-f",
            "qcow2",
            "a.qcow2",
            "a.qcow2",
        ],
        &["compare", "--object", "foo", "a.qcow2", "a.qcow2"],
    ] {
        same(d, args);
    }
}

#[test]
fn compare_tells_identical_from_different() {
    let s = Scratch::new("compare-data");
    let d = s.path();
    let img = bin("rqemu-img").to_string_lossy().into_owned();
    let rio = bin("rqemu-io").to_string_lossy().into_owned();
    for name in ["a.qcow2", "b.qcow2"] {
        setup(d, &img, &["create", "-q", "-f", "qcow2", name, "4M"]);
        io(d, &rio, name, "qcow2", &["write -P 7 1M 100k"]);
    }
    setup(d, &img, &["create", "-q", "-f", "raw", "c.raw", "4M"]);
    io(d, &rio, "c.raw", "raw", &["write -P 7 1M 100k"]);
    let ok = |code: i32, out: &str| (Some(code), out.to_string(), String::new());
    assert_eq!(
        rqemu_img(d, &["compare", "a.qcow2", "b.qcow2"]),
        ok(0, "Images are identical.\n")
    );
    assert_eq!(
        rqemu_img(d, &["compare", "a.qcow2", "c.raw"]),
        ok(0, "Images are identical.\n")
    );
    // Same contents, different allocation: only strict mode objects.
    assert_eq!(
        rqemu_img(d, &["compare", "-s", "a.qcow2", "c.raw"]).0,
        Some(1)
    );
    io(d, &rio, "b.qcow2", "qcow2", &["write -P 8 1100k 1"]);
    assert_eq!(
        rqemu_img(d, &["compare", "a.qcow2", "b.qcow2"]),
        ok(1, "Content mismatch at offset 1126400!\n")
    );
    assert_eq!(
        rqemu_img(d, &["compare", "-q", "a.qcow2", "b.qcow2"]),
        ok(1, "")
    );
    // A longer image compares equal while its extra part reads as zeroes.
    setup(
        d,
        &img,
        &["create", "-q", "-f", "qcow2", "long.qcow2", "8M"],
    );
    io(d, &rio, "long.qcow2", "qcow2", &["write -P 7 1M 100k"]);
    assert_eq!(
        rqemu_img(d, &["compare", "a.qcow2", "long.qcow2"]),
        ok(0, "Warning: Image size mismatch!\nImages are identical.\n")
    );
    assert_eq!(
        rqemu_img(d, &["compare", "-s", "a.qcow2", "long.qcow2"]),
        ok(1, "Strict mode: Image size mismatch!\n")
    );
    io(d, &rio, "long.qcow2", "qcow2", &["write -P 1 6M 512"]);
    assert_eq!(
        rqemu_img(d, &["compare", "long.qcow2", "a.qcow2"]),
        ok(
            1,
            "Warning: Image size mismatch!\nContent mismatch at offset 6291456!\n"
        )
    );
    let (code, out, err) = rqemu_img(d, &["compare", "a.qcow2", "missing.qcow2"]);
    assert_eq!((code, out.as_str()), (Some(2), ""));
    assert!(err.contains("Could not open 'missing.qcow2'"), "{err}");
}
