//! `rqemu-img measure` against `qemu-img measure`: sizes for qcow2 and raw targets from
//! `--size` or from input images (with data, snapshots, backing files, persistent
//! bitmaps, preallocation), every creation option that changes the figures, JSON and
//! human output, and the error cases.

use std::path::Path;

use rqemu::{bin, Scratch};

mod img_common;
use img_common::{exact_qemu, io, qemu_img, rqemu_img, same, setup};

#[test]
fn measure_matches_qemu_img() {
    if !exact_qemu() {
        return;
    }
    let s = Scratch::new("measure");
    let d = s.path();
    qemu_img(d, "create -q -f qcow2 data.qcow2 1G");
    let writes = ["write 512 512", "write 64k 64k", "write -z 1M 1M"];
    io(d, "qemu-io", "data.qcow2", &writes);
    qemu_img(d, "snapshot -c snapshot1 data.qcow2");
    io(d, "qemu-io", "data.qcow2", &["write 128M 63k"]);
    qemu_img(d, "create -q -f qcow2 -b data.qcow2 -F qcow2 over.qcow2");
    io(d, "qemu-io", "over.qcow2", &["write -P 3 512M 1M"]);
    qemu_img(d, "create -q -f qcow2 -o compat=0.10 v2.qcow2 64M");
    qemu_img(
        d,
        "create -q -f qcow2 -o preallocation=metadata meta.qcow2 8M",
    );
    qemu_img(d, "create -q -f qcow2 -o cluster_size=2M bm.qcow2 2T");
    qemu_img(d, "bitmap --add -g 512 bm.qcow2 b1");
    qemu_img(d, "bitmap --add -g 2M bm.qcow2 bitmap-two");
    setup(d, "truncate", &["-s", "1G", "data.raw"]);
    let raw_writes = ["-f", "raw", "-c", "write 512 512", "-c", "write 100M 1M"];
    setup(d, "qemu-io", &[&raw_writes[..], &["data.raw"]].concat());
    std::fs::write(d.join("small.raw"), b"abc").unwrap();
    for size in ["0", "1", "2G", "64G", "1T", "2P", "7E"] {
        for target in ["qcow2", "raw"] {
            same(d, &["measure", "-O", target, "--size", size]);
            same(
                d,
                &["measure", "--output=json", "-O", target, "--size", size],
            );
        }
    }
    for opts in [
        "cluster_size=512",
        "cluster_size=4k,refcount_bits=1",
        "cluster_size=2M,refcount_bits=64",
        "extended_l2=on",
        "extended_l2=on,cluster_size=2M",
        "compat=0.10",
        "compat=1.1,lazy_refcounts=on",
        "preallocation=metadata",
        "preallocation=falloc",
        "preallocation=full",
        "backing_file=x,backing_fmt=qcow2",
        "encrypt.format=aes",
        "size=100G",
    ] {
        same(d, &["measure", "-O", "qcow2", "-o", opts, "--size", "20G"]);
        for input in ["data.qcow2", "data.raw", "over.qcow2", "meta.qcow2"] {
            same(d, &["measure", "-O", "qcow2", "-o", opts, input]);
        }
    }
    for input in [
        "data.qcow2",
        "over.qcow2",
        "v2.qcow2",
        "bm.qcow2",
        "data.raw",
        "small.raw",
    ] {
        same(d, &["measure", "-O", "qcow2", input]);
        same(d, &["measure", "--output=json", "-O", "qcow2", input]);
        same(d, &["measure", "-O", "raw", input]);
    }
    for args in [
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=64k",
            "-f",
            "qcow2",
            "bm.qcow2",
        ][..],
        &["measure", "-O", "qcow2", "-o", "compat=0.10", "bm.qcow2"],
        &["measure", "-O", "qcow2", "-f", "raw", "bm.qcow2"],
        &["measure", "-O", "qcow2", "-l", "snapshot1", "data.qcow2"],
        &["measure", "-O", "qcow2", "-l", "1", "data.qcow2"],
        &[
            "measure",
            "-O",
            "qcow2",
            "-l",
            "snapshot.name=snapshot1",
            "data.qcow2",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-l",
            "snapshot.id=1,snapshot.name=snapshot1",
            "data.qcow2",
        ],
        &["measure", "-O", "qcow2", "-l", "nosuch", "data.qcow2"],
        &["measure", "-O", "qcow2", "-l", "snapshot1", "data.raw"],
        &[
            "measure",
            "-U",
            "--target-format=qcow2",
            "--image-opts",
            "driver=qcow2,file.filename=data.qcow2",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=1k",
            "-o",
            "cluster_size=2k",
            "--size",
            "1G",
        ],
    ] {
        same(d, args);
    }
}

#[test]
fn measure_errors_match_qemu_img() {
    if !exact_qemu() {
        return;
    }
    let s = Scratch::new("measure-err");
    let d = s.path();
    setup(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"],
    );
    for args in [
        &["measure"][..],
        &["measure", "--size", "2G", "a.qcow2"],
        &["measure", "a.qcow2", "b.qcow2"],
        &["measure", "--image-opts"],
        &["measure", "-f", "qcow2"],
        &["measure", "-l", "snap1"],
        &["measure", "-o", ","],
        &["measure", "-l", "snapshot.foo=bar"],
        &["measure", "--output", "foo"],
        &["measure", "--size", "-1"],
        &["measure", "--size", "1x"],
        &["measure", "-s", "1G"],
        &["measure", "-O", "foo", "a.qcow2"],
        &["measure", "-O", "vmdk", "--size", "1G"],
        &["measure", "-O", "bochs", "--size", "1G"],
        &["measure", "missing.qcow2"],
        &["measure", "-O", "qcow2", "-o", "foo=1", "--size", "1"],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=3",
            "--size",
            "1",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=abc",
            "--size",
            "1",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=4k",
            "--size",
            "1",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "preallocation=xx",
            "--size",
            "1",
        ],
        &["measure", "-O", "qcow2", "-o", "compat=3", "--size", "1"],
        &["measure", "-O", "qcow2", "-o", "compat=v3", "--size", "1"],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "refcount_bits=3",
            "--size",
            "1",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,refcount_bits=8",
            "--size",
            "1",
        ],
        &["measure", "-O", "qcow2", "--size", "1E"],
        &["measure", "-O", "qcow2", "-o", "size=1E", "a.qcow2"],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks",
            "--size",
            "1G",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s1",
            "--size",
            "1G",
        ],
    ] {
        same(d, args);
    }
}

/// `rqemu-img measure --output=json` as (required, fully allocated, bitmaps).
fn measured(dir: &Path, args: &[&str]) -> (u64, u64, Option<u64>) {
    let mut a = vec!["measure", "--output=json"];
    a.extend(args);
    let (code, out, err) = rqemu_img(dir, &a);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("measure JSON");
    (
        v["required"].as_u64().unwrap(),
        v["fully-allocated"].as_u64().unwrap(),
        v.get("bitmaps").and_then(|b| b.as_u64()),
    )
}

#[test]
fn measure_counts_metadata_and_data() {
    let s = Scratch::new("measure-data");
    let d = s.path();
    let img = bin("rqemu-img").to_string_lossy().into_owned();
    let rio = bin("rqemu-io").to_string_lossy().into_owned();
    // An empty 1 GiB qcow2 image: header, refcount table and block, L1 table; 16 L2
    // tables more when fully allocated.
    assert_eq!(
        measured(d, &["-O", "qcow2", "--size", "1G"]),
        (393_216, 1_074_135_040, None)
    );
    assert_eq!(
        measured(d, &["--size", "1000"]),
        (1024, 1024, None),
        "raw sizes are whole sectors"
    );
    setup(d, &img, &["create", "-q", "-f", "qcow2", "t.qcow2", "1G"]);
    let empty = measured(d, &["-O", "qcow2", "t.qcow2"]);
    assert_eq!(empty, (393_216, 1_074_135_040, Some(0)));
    // Data in two clusters (one write crossing a cluster boundary) and a zero cluster.
    setup(
        d,
        &rio,
        &[
            "-c",
            "write -P 1 60k 8k",
            "-c",
            "write -z 1M 64k",
            "t.qcow2",
        ],
    );
    let (req, full, _) = measured(d, &["-O", "qcow2", "t.qcow2"]);
    assert_eq!((req, full), (393_216 + 2 * 65_536, 1_074_135_040));
    let (req, ..) = measured(d, &["-O", "qcow2", "-o", "cluster_size=4k", "t.qcow2"]);
    let (base, ..) = measured(d, &["-O", "qcow2", "-o", "cluster_size=4k", "--size", "1G"]);
    // The input allocates whole 64 KiB clusters: 32 of the 4 KiB ones.
    assert_eq!(req, base + 2 * 65_536);
    assert_eq!(
        measured(d, &["-O", "raw", "t.qcow2"]),
        (1 << 30, 1 << 30, None)
    );
    // LUKS puts its header (eight key slots of 4000 stripes of the key) first; the
    // figures are qemu-img's (which takes seconds to compute them).
    let luks = |opts: &str| {
        let o = format!("encrypt.format=luks,encrypt.key-secret=s0{opts}");
        let obj = "secret,id=s0,data=x";
        measured(
            d,
            &["-O", "qcow2", "--object", obj, "-o", &o, "--size", "1G"],
        )
    };
    assert_eq!(luks(""), (2_490_368, 1_076_232_192, None));
    assert_eq!(
        luks(",encrypt.cipher-alg=aes-128"),
        (1_507_328, 1_075_249_152, None)
    );
    assert_eq!(
        luks(",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=ecb"),
        (983_040, 1_074_724_864, None)
    );
}
