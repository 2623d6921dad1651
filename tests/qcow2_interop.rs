//! Cross-checks of rqemu's qcow2 support against QEMU's own tools: images rqemu creates
//! and writes must satisfy qemu-img and read back the same through qemu-io; images QEMU
//! creates and writes must read the same through rqemu; `info` and `check` must print
//! what qemu-img prints.

use rqemu::{
    assert_qemu_check_clean, bin, need_qemu_10, normalize, qemu_raw_content, require_qemu, run,
    run_ok, Scratch,
};

fn rqemu_img() -> String {
    bin("rqemu-img").to_string_lossy().into_owned()
}

fn rqemu_io() -> String {
    bin("rqemu-io").to_string_lossy().into_owned()
}

/// Reads the whole guest-visible content of an image through rqemu's block layer.
fn rqemu_content(img: &str) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let o = rqemu_block::OpenOptions {
            filename: img.to_string(),
            read_only: true,
            force_share: true,
            quiet_probe: true,
            ..Default::default()
        };
        let b = rqemu_block::BlockBackend::open(&o)
            .await
            .expect("open image");
        let mut buf = vec![0u8; b.size() as usize];
        b.read(0, &mut buf).await.expect("read image");
        b.close().await.unwrap();
        buf
    })
}

/// A top-level or format-specific field of `qemu-img info --output=json`, as text.
fn json_field(json: &str, key: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let f = v
        .get(key)
        .or_else(|| v.get("format-specific")?.get("data")?.get(key))?;
    Some(match f {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

#[test]
fn created_images_pass_qemu_check_and_show_what_was_asked() {
    require_qemu!();
    let s = Scratch::new("create");
    let base = s.file("base.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", &base, "100M"]);
    let matrix: &[(&str, &str)] = &[
        ("", "1G"),
        ("cluster_size=512", "10M"),
        ("cluster_size=4k", "100M"),
        ("cluster_size=2M", "1G"),
        ("compat=0.10", "64M"),
        ("compat=1.1,refcount_bits=1", "64M"),
        ("refcount_bits=2,cluster_size=4k", "64M"),
        ("refcount_bits=8", "64M"),
        ("refcount_bits=32", "64M"),
        ("refcount_bits=64", "64M"),
        ("lazy_refcounts=on", "64M"),
        ("extended_l2=on", "64M"),
        ("extended_l2=on,cluster_size=16k", "64M"),
        ("compression_type=zstd", "64M"),
        ("preallocation=metadata", "100M"),
        ("preallocation=falloc", "20M"),
        ("preallocation=full", "20M"),
        ("preallocation=metadata,cluster_size=4k", "20M"),
        ("", "1000k"),
        ("", "66049"),
        ("backing_file=base.qcow2,backing_fmt=qcow2", "100M"),
    ];
    for (opts, size) in matrix {
        let ours = s.file("ours.qcow2");
        let theirs = s.file("theirs.qcow2");
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        let mut a1 = args.clone();
        a1.extend([ours.as_str(), size]);
        run_ok(rqemu_img(), &a1);
        assert_qemu_check_clean(&ours);
        let info = run_ok("qemu-img", &["info", "--output=json", &ours]);
        let want_size = rqemu_opts::parse_size(size, 1).unwrap().div_ceil(512) * 512;
        assert_eq!(
            json_field(&info, "virtual-size"),
            Some(want_size.to_string()),
            "{opts}"
        );
        for kv in opts.split(',').filter(|x| !x.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap();
            let (field, want) = match k {
                "cluster_size" => (
                    "cluster-size",
                    rqemu_opts::parse_size(v, 1).unwrap().to_string(),
                ),
                "compat" => ("compat", v.to_string()),
                "refcount_bits" => ("refcount-bits", v.to_string()),
                "lazy_refcounts" => ("lazy-refcounts", (v == "on").to_string()),
                "extended_l2" => ("extended-l2", (v == "on").to_string()),
                "compression_type" => ("compression-type", v.to_string()),
                "backing_file" => ("backing-filename", v.to_string()),
                "backing_fmt" => ("backing-filename-format", v.to_string()),
                _ => continue,
            };
            assert_eq!(json_field(&info, field), Some(want), "{opts}: {field}");
        }
        if need_qemu_10() {
            let mut a2 = args.clone();
            a2.extend([theirs.as_str(), size]);
            run_ok("qemu-img", &a2);
            let (x, y) = (
                std::fs::read(&ours).unwrap(),
                std::fs::read(&theirs).unwrap(),
            );
            assert!(x == y, "{opts} {size}: image differs from qemu-img's");
        }
    }
}

/// qemu-io commands that build an image with every kind of cluster.
const QEMU_WRITES: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x12 100k 3000",
    "write -P 0x13 1020k 100k",
    "write -P 0x14 2M 1M",
    "write -z 2560k 128k",
    "write -zu 2304k 64k",
    "discard 2176k 64k",
    "write -P 0x17 8388096 512",
];

fn qemu_io(img: &str, cmds: &[&str]) {
    let mut args: Vec<String> = Vec::new();
    for c in cmds {
        args.push("-c".into());
        args.push(c.to_string());
    }
    args.push(img.to_string());
    run_ok("qemu-io", &args);
}

#[test]
fn reads_what_qemu_wrote() {
    require_qemu!();
    let s = Scratch::new("readq");
    for opts in [
        "",
        "compat=0.10",
        "cluster_size=4k",
        "extended_l2=on",
        "compression_type=zstd",
        "refcount_bits=1,cluster_size=512",
        "cluster_size=2M",
    ] {
        let img = s.file("q.qcow2");
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([img.as_str(), "8M"]);
        run_ok("qemu-img", &args);
        qemu_io(&img, QEMU_WRITES);
        let cs = if opts.contains("2M") { "2M" } else { "64k" };
        qemu_io(&img, &[&format!("write -c -P 0x15 4M {cs}")]);
        let want = qemu_raw_content(&img, &s);
        assert!(rqemu_content(&img) == want, "content differs for {opts}");
        // rqemu-io sees the same patterns.
        let out = run_ok(
            rqemu_io(),
            &[
                "-r",
                "-c",
                "read -P 0x11 0 64k",
                "-c",
                "read -P 0x14 2M 128k",
                "-c",
                "read -P 0x15 4M 64k",
                "-c",
                "read -P 0 2560k 128k",
                &img,
            ],
        );
        assert!(!out.contains("verification failed"), "{opts}: {out}");
    }
}

#[test]
fn reads_snapshots_and_backing_chains_made_by_qemu() {
    require_qemu!();
    let s = Scratch::new("chain");
    let b0 = s.file("b0.qcow2");
    let b1 = s.file("b1.qcow2");
    let b2 = s.file("b2.qcow2");
    let top = s.file("top.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", &b0, "4M"]);
    qemu_io(&b0, &["write -P 1 0 4M"]);
    run_ok(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "b0.qcow2", "-F", "qcow2", &b1,
        ],
    );
    qemu_io(&b1, &["write -P 2 1M 1M", "write -z 3M 64k"]);
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-b",
            &b1,
            "-F",
            "qcow2",
            &b2,
        ],
    );
    qemu_io(&b2, &["write -P 3 1000 5000", "write -P 4 1572864 4k"]);
    run_ok(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "b2.qcow2", "-F", "qcow2", &top,
        ],
    );
    qemu_io(&top, &["write -P 5 3670016 64k"]);
    run_ok("qemu-img", &["snapshot", "-c", "snap1", &top]);
    qemu_io(&top, &["write -P 6 0 128k", "write -P 7 3670016 4k"]);
    let want = qemu_raw_content(&top, &s);
    assert!(rqemu_content(&top) == want, "chain content differs");
    // Writing through rqemu into an image with snapshots copies shared clusters.
    let out = run_ok(
        rqemu_io(),
        &[
            "-c",
            "write -P 8 3670016 8k",
            "-c",
            "write -P 9 1M 4k",
            &top,
        ],
    );
    assert!(out.contains("wrote 8192/8192"), "{out}");
    assert_qemu_check_clean(&top);
    let v = run_ok(
        "qemu-io",
        &[
            "-r",
            "-c",
            "read -P 8 3670016 8k",
            "-c",
            "read -P 9 1M 4k",
            "-c",
            "read -P 6 0 128k",
            &top,
        ],
    );
    assert!(!v.contains("failed"), "{v}");
}

/// Commands rqemu-io runs in the write test; the same run through qemu-io on a twin image
/// gives the reference.
const RQEMU_WRITES: &[&str] = &[
    "write -P 0x21 1 3",
    "write -P 0x22 65535 2",
    "write -P 0x23 100000 200000",
    "write -P 0x24 1M 64k",
    "write -c -P 0x25 2M 128k",
    "write -z 3M 192k",
    "write -zu 3200k 64k",
    "write -P 0x26 4M 1M",
    "discard 4M 128k",
    "write -P 0x27 6291455 1",
    "writev -P 0x28 7M 4k 8k 512",
];

#[test]
fn qemu_reads_what_rqemu_wrote() {
    require_qemu!();
    let s = Scratch::new("writeq");
    for opts in [
        "",
        "compat=0.10",
        "cluster_size=4k",
        "extended_l2=on",
        "lazy_refcounts=on",
        "refcount_bits=1,cluster_size=512",
        "compression_type=zstd",
    ] {
        for backing in [false, true] {
            let base = s.file("base.qcow2");
            let ours = s.file("ours.qcow2");
            let theirs = s.file("theirs.qcow2");
            let mk = |img: &str| {
                let mut args = vec![
                    "create".to_string(),
                    "-q".into(),
                    "-f".into(),
                    "qcow2".into(),
                ];
                let mut o = opts.to_string();
                if backing {
                    if !o.is_empty() {
                        o.push(',');
                    }
                    o.push_str("backing_file=base.qcow2,backing_fmt=qcow2");
                }
                if !o.is_empty() {
                    args.push("-o".into());
                    args.push(o);
                }
                args.push(img.to_string());
                args.push("8M".into());
                run_ok("qemu-img", &args);
            };
            if backing {
                run_ok("qemu-img", &["create", "-q", "-f", "qcow2", &base, "8M"]);
                qemu_io(&base, &["write -P 0x99 0 8M"]);
            }
            mk(&ours);
            mk(&theirs);
            let mut args: Vec<String> = Vec::new();
            for c in RQEMU_WRITES {
                args.push("-c".into());
                args.push(c.to_string());
            }
            let mut a = args.clone();
            a.push(ours.clone());
            let out = run_ok(rqemu_io(), &a);
            assert!(!out.contains("failed"), "{opts}: {out}");
            qemu_io(&theirs, RQEMU_WRITES);
            assert_qemu_check_clean(&ours);
            let o = run("qemu-img", &["compare", &ours, &theirs]);
            assert!(
                o.status.success(),
                "{opts} backing={backing}: {}",
                String::from_utf8_lossy(&o.stdout)
            );
            let v = run_ok(
                "qemu-io",
                &[
                    "-r",
                    "-c",
                    "read -P 0x23 100000 200000",
                    "-c",
                    "read -P 0x25 2M 128k",
                    "-c",
                    "read -P 0 3M 192k",
                    &ours,
                ],
            );
            assert!(!v.contains("failed"), "{v}");
        }
    }
}

#[test]
fn info_and_check_print_what_qemu_img_prints() {
    require_qemu!();
    if !need_qemu_10() {
        return;
    }
    let s = Scratch::new("info");
    let base = s.file("base.qcow2");
    let img = s.file("img.qcow2");
    let v2 = s.file("v2.qcow2");
    let raw = s.file("disk.raw");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", &base, "64M"]);
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=32k",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            &img,
        ],
    );
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            &v2,
            "3M",
        ],
    );
    run_ok("qemu-img", &["create", "-q", "-f", "raw", &raw, "1000"]);
    qemu_io(&img, &["write -P 1 0 1M", "write -c 4M 32k"]);
    run_ok("qemu-img", &["snapshot", "-c", "s1", &v2]);
    for image in [&base, &img, &v2, &raw] {
        for args in [
            vec!["info"],
            vec!["info", "--output=json"],
            vec!["info", "--backing-chain"],
            vec!["info", "--output=json", "--backing-chain"],
            vec!["check"],
            vec!["check", "--output=json"],
        ] {
            let mut a = args.clone();
            a.push(image.as_str());
            let q = run("qemu-img", &a);
            let r = run(rqemu_img(), &a);
            let mut qo = normalize(&String::from_utf8_lossy(&q.stdout));
            let mut ro = normalize(&String::from_utf8_lossy(&r.stdout));
            if image == &v2 && args[0] == "info" {
                // Snapshot dates are printed in local time; the table layout is compared.
                qo = qo
                    .lines()
                    .filter(|l| !l.starts_with("1 "))
                    .collect::<Vec<_>>()
                    .join("\n");
                ro = ro
                    .lines()
                    .filter(|l| !l.starts_with("1 "))
                    .collect::<Vec<_>>()
                    .join("\n");
                qo = qo.replace(|c: char| c.is_ascii_digit(), "0");
                ro = ro.replace(|c: char| c.is_ascii_digit(), "0");
            }
            assert_eq!(ro, qo, "rqemu-img {a:?}");
            assert_eq!(
                normalize(&String::from_utf8_lossy(&r.stderr)),
                normalize(&String::from_utf8_lossy(&q.stderr)),
                "stderr of {a:?}"
            );
            assert_eq!(r.status.code(), q.status.code(), "exit status of {a:?}");
        }
    }
}
