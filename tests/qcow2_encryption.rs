//! Cross-checks of encrypted images against QEMU's tools: qcow2 with LUKS and legacy AES
//! encryption, and raw LUKS volumes. Images rqemu creates and writes must open in
//! qemu-io with the same secret, read the same and pass `qemu-img check`; images QEMU
//! creates and writes must read the same through rqemu-io; `info` and the errors for
//! wrong or missing secrets must be QEMU's, byte for byte. Hostile LUKS headers must be
//! refused with one line, quickly.

use std::time::{Duration, Instant};

use rqemu::{bin, need_qemu_10, normalize, require_qemu, run, run_ok, Scratch};

fn rqemu_img() -> String {
    bin("rqemu-img").to_string_lossy().into_owned()
}

fn rqemu_io() -> String {
    bin("rqemu-io").to_string_lossy().into_owned()
}

const SECRET: &str = "secret,id=sec0,data=astrochicken";
const WRONG: &str = "secret,id=sec0,data=platypus";

/// `--image-opts` for `img` of `driver`, keyed with secret `sec0`.
fn spec(driver: &str, img: &str) -> String {
    let key = if driver == "qcow2" {
        "encrypt.key-secret"
    } else {
        "key-secret"
    };
    format!("driver={driver},file.filename={img},{key}=sec0")
}

/// Runs qemu-io (or rqemu-io) with `secret` and commands on `spec`; returns the
/// normalized stdout and stderr.
fn io(prog: &str, secret: &str, spec: &str, cmds: &[&str]) -> (bool, String, String) {
    let mut args = vec!["--object", secret];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push("--image-opts");
    args.push(spec);
    let o = run(prog, &args);
    (
        o.status.success(),
        normalize(&String::from_utf8_lossy(&o.stdout)),
        normalize(&String::from_utf8_lossy(&o.stderr)),
    )
}

/// Asserts every command ran and no pattern check failed.
fn io_ok(prog: &str, spec: &str, cmds: &[&str]) {
    let (ok, out, err) = io(prog, SECRET, spec, cmds);
    assert!(
        ok && err.is_empty() && !out.contains("failed"),
        "{prog} {cmds:?} on {spec}:\n{out}\n{err}"
    );
}

/// `create -q -f FMT --object SECRET -o OPTS IMG SIZE` with `prog`, which must succeed.
fn create_encrypted(prog: &str, fmt: &str, opts: &str, img: &str, size: &str) {
    run_ok(
        prog,
        &[
            "create", "-q", "-f", fmt, "--object", SECRET, "-o", opts, img, size,
        ],
    );
}

const WRITES: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 65024 1024",
    "write -P 0x33 100000 3",
    "write -P 0x44 1M 300k",
];

const READS: &[&str] = &[
    "read -P 0x11 0 65024",
    "read -P 0x22 65024 1024",
    "read -P 0 66048 33952",
    "read -P 0x33 100000 3",
    "read -P 0 100003 30000",
    "read -P 0x44 1M 300k",
    "read -P 0 2M 1M",
];

/// The encryption option sets both tools are checked with.
const QCOW2_VARIANTS: &[&str] = &[
    "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
    "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.hash-alg=sha1",
    "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=xts,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha512,cluster_size=4k",
    "encryption=on,encrypt.key-secret=sec0",
    "encrypt.format=aes,encrypt.key-secret=sec0,cluster_size=512",
];

#[test]
fn rqemu_images_read_back_in_qemu() {
    require_qemu!();
    let s = Scratch::new("enc-r2q");
    for (i, opts) in QCOW2_VARIANTS.iter().enumerate() {
        let img = s.file(&format!("r{i}.qcow2"));
        create_encrypted(&rqemu_img(), "qcow2", opts, &img, "8M");
        let sp = spec("qcow2", &img);
        io_ok(&rqemu_io(), &sp, WRITES);
        io_ok("qemu-io", &sp, READS);
        run_ok(
            "qemu-img",
            &["check", "-q", "--object", SECRET, "--image-opts", &sp],
        );
    }
}

#[test]
fn qemu_images_read_back_in_rqemu() {
    require_qemu!();
    let s = Scratch::new("enc-q2r");
    for (i, opts) in QCOW2_VARIANTS.iter().enumerate() {
        let img = s.file(&format!("q{i}.qcow2"));
        create_encrypted("qemu-img", "qcow2", opts, &img, "8M");
        let sp = spec("qcow2", &img);
        io_ok("qemu-io", &sp, WRITES);
        io_ok(&rqemu_io(), &sp, READS);
        // And rqemu's writes into QEMU's image, read by QEMU.
        io_ok(&rqemu_io(), &sp, &["write -P 0x55 4M 70000"]);
        io_ok("qemu-io", &sp, &["read -P 0x55 4M 70000"]);
        run_ok(
            rqemu_img(),
            &["check", "-q", "--object", SECRET, "--image-opts", &sp],
        );
    }
}

#[test]
fn raw_luks_both_ways() {
    require_qemu!();
    let s = Scratch::new("enc-luks");
    let opts = "key-secret=sec0,iter-time=10";
    for (maker, reader) in [
        (rqemu_img(), "qemu-io".to_string()),
        ("qemu-img".into(), rqemu_io()),
    ] {
        let img = s.file("v.luks");
        let _ = std::fs::remove_file(&img);
        create_encrypted(&maker, "luks", opts, &img, "4M");
        let writer = if reader == "qemu-io" {
            rqemu_io()
        } else {
            "qemu-io".into()
        };
        let sp = spec("luks", &img);
        io_ok(
            &writer,
            &sp,
            &["write -P 0x66 1000 70000", "write -P 0x77 3M 4096"],
        );
        io_ok(
            &reader,
            &sp,
            &["read -P 0x66 1000 70000", "read -P 0x77 3M 4096"],
        );
    }
}

#[test]
fn info_matches_qemu() {
    require_qemu!();
    if !need_qemu_10() {
        return;
    }
    let s = Scratch::new("enc-info");
    for (i, opts) in QCOW2_VARIANTS.iter().enumerate() {
        let img = s.file(&format!("i{i}.qcow2"));
        create_encrypted(&rqemu_img(), "qcow2", opts, &img, "8M");
        for output in ["human", "json"] {
            let q = run_ok("qemu-img", &["info", "--output", output, &img]);
            let r = run_ok(rqemu_img(), &["info", "--output", output, &img]);
            assert_eq!(normalize(&r), normalize(&q), "info {output} of {opts}");
        }
        let sp = spec("qcow2", &img);
        let q = run_ok("qemu-img", &["info", "--image-opts", &sp]);
        let r = run_ok(rqemu_img(), &["info", "--image-opts", &sp]);
        assert_eq!(r, q, "info --image-opts of {opts}");
    }
    let img = s.file("i.luks");
    create_encrypted(
        "qemu-img",
        "luks",
        "key-secret=sec0,iter-time=10,cipher-mode=cbc,ivgen-alg=essiv",
        &img,
        "1M",
    );
    for output in ["human", "json"] {
        let q = run_ok("qemu-img", &["info", "--output", output, &img]);
        let r = run_ok(rqemu_img(), &["info", "--output", output, &img]);
        assert_eq!(r, q, "luks info {output}");
    }
}

#[test]
fn secret_errors_match_qemu() {
    require_qemu!();
    let s = Scratch::new("enc-err");
    let img = s.file("e.qcow2");
    create_encrypted("qemu-img", "qcow2", QCOW2_VARIANTS[0], &img, "1M");
    let sp = spec("qcow2", &img);
    // Wrong password, unknown secret, missing key-secret, wrong format option.
    let cases: Vec<(&str, String)> = vec![
        (WRONG, sp.clone()),
        (SECRET, sp.replace("sec0", "sec9")),
        (SECRET, format!("driver=qcow2,file.filename={img}")),
        (SECRET, format!("{sp},encrypt.format=aes")),
    ];
    for (secret, spec) in &cases {
        let q = io("qemu-io", secret, spec, &["read 0 512"]);
        let r = io(&rqemu_io(), secret, spec, &["read 0 512"]);
        assert_eq!(r, q, "qemu-io on {spec} with {secret}");
    }
    let q = run("qemu-img", &["check", &img]);
    let r = run(rqemu_img(), &["check", &img]);
    assert_eq!(
        normalize(&String::from_utf8_lossy(&r.stderr)),
        normalize(&String::from_utf8_lossy(&q.stderr))
    );
    assert_eq!(r.status.code(), q.status.code());
}

#[test]
fn amended_keyslots_work_in_qemu() {
    require_qemu!();
    let s = Scratch::new("enc-amend");
    let img = s.file("a.qcow2");
    create_encrypted(&rqemu_img(), "qcow2", QCOW2_VARIANTS[0], &img, "1M");
    let sp = spec("qcow2", &img);
    io_ok(&rqemu_io(), &sp, &["write -P 0x5 0 4k"]);
    let new = "secret,id=sec1,data=furby";
    run_ok(
        rqemu_img(),
        &[
            "amend",
            "--object",
            SECRET,
            "--object",
            new,
            "--image-opts",
            &sp,
            "-o",
            "encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10,encrypt.keyslot=5",
        ],
    );
    let sp1 = sp.replace("key-secret=sec0", "key-secret=sec1");
    let (ok, out, err) = io("qemu-io", new, &sp1, &["read -P 0x5 0 4k"]);
    assert!(ok && !out.contains("failed"), "{out}{err}");
    // Erasing the old slot through QEMU leaves only the new one, which rqemu opens.
    run_ok(
        "qemu-img",
        &[
            "amend",
            "--object",
            SECRET,
            "--object",
            new,
            "--image-opts",
            &sp1,
            "-o",
            "encrypt.state=inactive,encrypt.keyslot=0",
        ],
    );
    let (ok, out, err) = io(&rqemu_io(), new, &sp1, &["read -P 0x5 0 4k"]);
    assert!(ok && !out.contains("failed"), "{out}{err}");
    let (_, _, err) = io(&rqemu_io(), SECRET, &sp, &["read 0 4k"]);
    assert_eq!(
        err,
        "qemu-io: can't open: Invalid password, cannot unlock any keyslot"
    );
}

/// Writes `value` big-endian at `at` of the LUKS header at `base` in `img`.
fn poke(img: &str, base: u64, at: u64, value: u32) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(&value.to_be_bytes(), base + at).unwrap();
}

#[test]
fn hostile_luks_headers_are_refused_quickly() {
    let s = Scratch::new("enc-hostile");
    let pristine = s.file("p.luks");
    create_encrypted(
        &rqemu_img(),
        "luks",
        "key-secret=sec0,iter-time=10",
        &pristine,
        "1M",
    );
    // (offset in the header, value): digest iterations, key size, slot 0's iterations,
    // stripes, key material offset, state, payload offset.
    let cases: &[(u64, u32)] = &[
        (164, u32::MAX),
        (164, 0),
        (108, 0),
        (108, 1 << 30),
        (208 + 4, u32::MAX),
        (208 + 44, u32::MAX),
        (208 + 40, u32::MAX),
        (208 + 40, 1),
        (208, 0x1234),
        (104, 1),
        (104, u32::MAX),
    ];
    for &(at, value) in cases {
        let img = s.file("h.luks");
        std::fs::copy(&pristine, &img).unwrap();
        poke(&img, 0, at, value);
        let t = Instant::now();
        let (ok, _, err) = io(&rqemu_io(), SECRET, &spec("luks", &img), &["read 0 512"]);
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "({at}, {value}) took {:?}",
            t.elapsed()
        );
        assert!(!ok, "({at}, {value}) opened");
        assert_eq!(err.lines().count(), 1, "({at}, {value}): {err}");
        let o = run(rqemu_img(), &["info", &img]);
        assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
    }
}

#[test]
fn hostile_crypto_header_extensions_fail_as_in_qemu() {
    require_qemu!();
    let s = Scratch::new("enc-ext");
    let pristine = s.file("p.qcow2");
    create_encrypted(&rqemu_img(), "qcow2", QCOW2_VARIANTS[0], &pristine, "1M");
    // The extension follows the 112-byte header: offset at 0x78, length at 0x80.
    let cases: &[(u64, u64)] = &[
        (0x80, 10),
        (0x80, u64::MAX),
        (0x78, 0xdead_be00),
        (0x78, 0x1_0001),
        (0x78, 0xffff_ffff_fff0_0000),
        (0x78, 0),
    ];
    for &(at, value) in cases {
        let img = s.file("h.qcow2");
        std::fs::copy(&pristine, &img).unwrap();
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
            f.write_all_at(&value.to_be_bytes(), at).unwrap();
        }
        let sp = spec("qcow2", &img);
        let q = io("qemu-io", SECRET, &sp, &["read -P 0 0 512"]);
        let r = io(&rqemu_io(), SECRET, &sp, &["read -P 0 0 512"]);
        assert_eq!(r, q, "extension field {at:#x} = {value:#x}");
    }
}

#[test]
fn create_option_errors_match_qemu() {
    require_qemu!();
    let s = Scratch::new("enc-create");
    let cases = [
        "encrypt.format=foo",
        "encrypt.format=luks",
        "encryption=on",
        "encrypt.format=luks,encrypt.key-secret=sec9",
        "encryption=on,encrypt.format=luks,encrypt.key-secret=sec0",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=foo",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha1",
        "encrypt.format=aes,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-128",
        "encrypt.format=aes,encrypt.key-secret=sec0,encrypt.iter-time=10",
    ];
    for o in cases {
        let img = s.file("c.qcow2");
        let q = run(
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "--object", SECRET, "-o", o, &img, "1M",
            ],
        );
        let r = run(
            rqemu_img(),
            &[
                "create", "-q", "-f", "qcow2", "--object", SECRET, "-o", o, &img, "1M",
            ],
        );
        assert_eq!(
            normalize(&String::from_utf8_lossy(&r.stderr)),
            normalize(&String::from_utf8_lossy(&q.stderr)),
            "{o}"
        );
        assert_eq!(r.status.code(), q.status.code(), "{o}");
    }
}
