//! `rqemu-img map` against `qemu-img map`: the human table and the JSON list for raw and
//! qcow2 images of every kind of allocation (backing chains, zero and compressed
//! clusters, subclusters, external data files, preallocation, unaligned raw files),
//! with offsets and lengths, and the error cases.

use std::path::Path;

use rqemu::{bin, Scratch};

mod img_common;
use img_common::{chain, exact_qemu, io, qemu_img, rqemu, run_in, same, setup};

/// Images with every kind of mapping, built with QEMU's tools.
fn build_images(dir: &Path) {
    chain(dir);
    io(dir, "qemu-io", "top.qcow2", &["write -z -u 1536k 64k"]);
    setup(dir, "truncate", &["-s", "10M", "sparse.raw"]);
    let raw_writes = ["write -P 1 1M 64k", "write -P 2 5M 1k"];
    io(dir, "qemu-io", "sparse.raw", &raw_writes);
    std::fs::write(dir.join("small.raw"), b"abc").unwrap();
    qemu_img(
        dir,
        "create -q -f qcow2 -b small.raw -F raw onsmall.qcow2 1M",
    );
    qemu_img(
        dir,
        "create -q -f qcow2 -o preallocation=metadata meta.qcow2 4M",
    );
    qemu_img(dir, "create -q -f qcow2 -o extended_l2=on sub.qcow2 4M");
    let sub_writes = ["write -P 5 4k 4k", "write -z 64k 8k", "write -P 6 130k 1k"];
    io(dir, "qemu-io", "sub.qcow2", &sub_writes);
    qemu_img(dir, "create -q -f qcow2 -o data_file=ext.raw ext.qcow2 4M");
    io(dir, "qemu-io", "ext.qcow2", &["write -P 7 0 64k"]);
    qemu_img(
        dir,
        "create -q -f qcow2 -o data_file=extraw.raw,data_file_raw=on extraw.qcow2 4M",
    );
    io(
        dir,
        "qemu-io",
        "extraw.qcow2",
        &["write -P 7 0 64k", "write -z 1M 64k"],
    );
}

#[test]
fn map_matches_qemu_img() {
    if !exact_qemu() {
        return;
    }
    let s = Scratch::new("map");
    let d = s.path();
    build_images(d);
    let images = [
        "base.qcow2",
        "top.qcow2",
        "sparse.raw",
        "small.raw",
        "onsmall.qcow2",
        "meta.qcow2",
        "sub.qcow2",
        "ext.qcow2",
        "extraw.qcow2",
    ];
    for img in images {
        same(d, &["map", img]);
        same(d, &["map", "--output=json", img]);
        same(
            d,
            &[
                "map", "-U", "--output", "json", "-s", "100k", "-l", "1000k", img,
            ],
        );
    }
    same(d, &["map", "-f", "raw", "--output=json", "top.qcow2"]);
    same(
        d,
        &["map", "--start-offset=3M", "--output=json", "top.qcow2"],
    );
    same(d, &["map", "--max-length=0", "top.qcow2", "--output=json"]);
    same(d, &["map", "-s", "1536k", "--max-length", "1", "top.qcow2"]);
    same(
        d,
        &[
            "map",
            "--image-opts",
            "--output=json",
            "driver=qcow2,file.filename=top.qcow2",
        ],
    );
    same(
        d,
        &["map", "--image-opts", "driver=file,filename=sparse.raw"],
    );
    same(
        d,
        &[
            "map",
            "--output=json",
            "json:{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"top.qcow2\"}}",
        ],
    );
    same(d, &["map", "--object", "secret,id=s0,data=x", "base.qcow2"]);
}

#[test]
fn map_errors_match_qemu_img() {
    if !exact_qemu() {
        return;
    }
    let s = Scratch::new("map-err");
    let d = s.path();
    setup(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"],
    );
    for args in [
        &["map"][..],
        &["map", "a.qcow2", "b.qcow2"],
        &["map", "missing.qcow2"],
        &["map", "--output=json", "missing.qcow2"],
        &["map", "-f", "foo", "a.qcow2"],
        &["map", "--output=xml", "a.qcow2"],
        &["map", "-s", "x", "a.qcow2"],
        &["map", "-s", "-1", "a.qcow2"],
        &["map", "-l", "99999999999999999999", "a.qcow2"],
        &["map", "-z", "a.qcow2"],
        &["map", "a.qcow2", "-s"],
        &["map", "--image-opts", "-f", "qcow2", "a.qcow2"],
        &["map", "--image-opts", "a.qcow2"],
        &["map", "--object", "foo", "a.qcow2"],
        &["map", "--object", "secret,id=s0", "a.qcow2"],
        &["map", "--object", "id=s0", "a.qcow2"],
    ] {
        same(d, args);
    }
    // A compressed cluster has no offset to show in the table.
    setup(d, "qemu-io", &["-c", "write -c 0 64k", "a.qcow2"]);
    same(d, &["map", "a.qcow2"]);
}

/// Parses `rqemu-img map --output=json` into (start, length, data, zero, offset).
fn json_map(dir: &Path, img: &str) -> Vec<(u64, u64, bool, bool, Option<u64>)> {
    let o = rqemu(dir, "rqemu-img", &["map", "--output=json", img]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("map JSON");
    v.as_array()
        .expect("a list")
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
                e.get("offset").and_then(|o| o.as_u64()),
            )
        })
        .collect()
}

#[test]
fn map_covers_the_image_and_finds_the_data() {
    let s = Scratch::new("map-data");
    let d = s.path();
    let img = bin("rqemu-img").to_string_lossy().into_owned();
    let io = bin("rqemu-io").to_string_lossy().into_owned();
    setup(d, &img, &["create", "-q", "-f", "qcow2", "t.qcow2", "8M"]);
    setup(
        d,
        &io,
        &[
            "-c",
            "write -P 1 1M 128k",
            "-c",
            "write -z 4M 64k",
            "t.qcow2",
        ],
    );
    let m = json_map(d, "t.qcow2");
    let mut pos = 0;
    for &(start, len, ..) in &m {
        assert_eq!(start, pos, "extents are contiguous: {m:?}");
        pos += len;
    }
    assert_eq!(pos, 8 << 20);
    let data: Vec<_> = m.iter().filter(|e| e.2).collect();
    assert_eq!(data.len(), 1, "{m:?}");
    assert_eq!((data[0].0, data[0].1), (1 << 20, 128 << 10));
    assert!(data[0].4.is_some());
    assert!(m.iter().any(|e| e.0 == 4 << 20 && e.3 && !e.2));
    // The human table lists the data extent with its place in the file.
    let o = run_in(d, &img, &["map", "t.qcow2"]);
    let text = String::from_utf8_lossy(&o.stdout);
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("Offset          Length          Mapped to       File")
    );
    let row = lines.next().expect("one data row");
    assert!(
        row.starts_with("0x100000        0x20000         0x"),
        "{row}"
    );
    assert!(row.ends_with("t.qcow2"), "{row}");
    assert_eq!(lines.next(), None);
    let help = run_in(d, &img, &["map", "--help"]);
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--start-offset"));
}
