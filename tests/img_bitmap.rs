//! `rqemu-img bitmap`, dirty tracking by `rqemu-io` and `rqemu-img convert --bitmaps`
//! against QEMU's tools: each scenario runs with QEMU's tools in one directory and with
//! rqemu's in another (same file names), then messages and exit codes must match, the
//! images must be byte-identical where QEMU's layout is deterministic, `qemu-img info`
//! must list the same bitmaps, `qemu-img check` must find nothing, and the bitmap
//! contents read through the real qemu-nbd (`x-dirty-bitmap`) must be the same.

use std::path::Path;
use std::process::{Command, Stdio};

use rqemu::{need_tool, Scratch};

mod img_common;
use img_common::{exact_qemu, outcome, rqemu, run_in};

/// QEMU's tools or rqemu's.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tools {
    Qemu,
    Rqemu,
}

impl Tools {
    fn run(self, d: &Path, tool: &str, args: &[&str]) -> (Option<i32>, String, String) {
        let o = match self {
            Tools::Qemu => run_in(d, tool, args),
            Tools::Rqemu => rqemu(d, &format!("r{tool}"), args),
        };
        let (c, out, err) = outcome(&o);
        let norm = |s: String| {
            let s = s.replace("rqemu-io", "qemu-io");
            // Anonymous node names carry a random number.
            let mut out = String::new();
            let mut rest = s.as_str();
            while let Some(i) = rest.find("#block") {
                out.push_str(&rest[..i + 6]);
                rest = rest[i + 6..].trim_start_matches(|c: char| c.is_ascii_digit());
                out.push('N');
            }
            out.push_str(rest);
            out
        };
        (c, norm(out), norm(err))
    }

    fn img(self, d: &Path, line: &str) -> (Option<i32>, String, String) {
        self.run(d, "qemu-img", &line.split_whitespace().collect::<Vec<_>>())
    }

    fn io(self, d: &Path, img: &str, cmds: &[&str]) -> (Option<i32>, String, String) {
        let mut args = vec![];
        for c in cmds {
            args.extend(["-c", c]);
        }
        args.push(img);
        self.run(d, "qemu-io", &args)
    }
}

/// Two scratch directories, one per tool set.
struct Pair {
    q: Scratch,
    r: Scratch,
}

impl Pair {
    fn new(tag: &str) -> Pair {
        Pair {
            q: Scratch::new(&format!("{tag}-q")),
            r: Scratch::new(&format!("{tag}-r")),
        }
    }

    /// Runs `qemu-img LINE` with both tool sets; the outcomes must match.
    fn img(&self, line: &str) -> (Option<i32>, String, String) {
        let q = Tools::Qemu.img(self.q.path(), line);
        let r = Tools::Rqemu.img(self.r.path(), line);
        assert_eq!(r, q, "qemu-img {line}");
        q
    }

    /// Runs qemu-io commands with both tool sets; exit codes must match.
    fn io(&self, img: &str, cmds: &[&str]) {
        let q = Tools::Qemu.io(self.q.path(), img, cmds);
        let r = Tools::Rqemu.io(self.r.path(), img, cmds);
        assert_eq!(r.0, q.0, "qemu-io {cmds:?} {img}: {r:?} vs {q:?}");
    }

    /// `qemu-img LINE` (QEMU's) on both images: the outputs must match.
    fn inspect(&self, line: &str) -> String {
        let args: Vec<&str> = line.split_whitespace().collect();
        let q = outcome(&run_in(self.q.path(), "qemu-img", &args));
        let r = outcome(&run_in(self.r.path(), "qemu-img", &args));
        assert_eq!(r, q, "qemu-img {line} on the images of each tool set");
        q.1
    }

    /// The images are valid, list the same bitmaps and hold the same bitmap contents.
    fn compare_image(&self, img: &str, bitmaps: &[&str]) {
        let check = run_in(self.r.path(), "qemu-img", &["check", img]);
        assert!(check.status.success(), "check {img}: {check:?}");
        self.inspect(&format!("info {img}"));
        for b in bitmaps {
            if let (Some(q), Some(r)) = (
                nbd_bitmap(self.q.path(), img, b),
                nbd_bitmap(self.r.path(), img, b),
            ) {
                assert_eq!(r, q, "contents of bitmap {b} of {img}");
            }
        }
    }

    /// The two images are byte-identical.
    fn identical(&self, img: &str) {
        let q = std::fs::read(self.q.path().join(img)).expect("QEMU's image");
        let r = std::fs::read(self.r.path().join(img)).expect("rqemu's image");
        assert!(q == r, "{img} differs from QEMU's");
    }
}

/// The dirty ranges of bitmap `name` of `img`, as QEMU's qemu-nbd exports them (`None`
/// when qemu-nbd is not installed).
fn nbd_bitmap(d: &Path, img: &str, name: &str) -> Option<String> {
    if !need_tool("qemu-nbd", "bitmap contents are read through its exports") {
        return None;
    }
    let sock = d.join(format!("nbd-{name}.sock"));
    let _ = std::fs::remove_file(&sock);
    let sock_s = sock.to_string_lossy().into_owned();
    let mut server = Command::new("qemu-nbd")
        .args(["-r", "-f", "qcow2", "-B", name, "-k", &sock_s, img])
        .current_dir(d)
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-nbd");
    for _ in 0..500 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let spec = format!(
        "driver=nbd,server.type=unix,server.path={sock_s},x-dirty-bitmap=qemu:dirty-bitmap:{name}"
    );
    let map = run_in(
        d,
        "qemu-img",
        &["map", "--output=json", "--image-opts", &spec],
    );
    // The server ends with its one client; wait for it to release the image.
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        map.status.success(),
        "map of bitmap {name} of {img}: {map:?}"
    );
    let out = String::from_utf8_lossy(&map.stdout).into_owned();
    Some(out)
}

#[test]
fn option_errors_match_qemu() {
    if !exact_qemu() {
        return;
    }
    let p = Pair::new("bm-opts");
    p.img("create -q -f qcow2 a.qcow2 10M");
    p.img("create -q -f qcow2 -o compat=0.10 v2.qcow2 1M");
    p.img("create -q -f raw r.raw 1M");
    for line in [
        "bitmap",
        "bitmap a.qcow2",
        "bitmap a.qcow2 b0",
        "bitmap --add a.qcow2",
        "bitmap --add a.qcow2 b0 extra",
        "bitmap --remove -g 64k a.qcow2 b0",
        "bitmap --remove -b x -g 64k a.qcow2 b0",
        "bitmap --remove -F x -b y a.qcow2 b0",
        "bitmap --remove -F x a.qcow2",
        "bitmap --merge",
        "bitmap -g",
        "bitmap -x",
        "bitmap --bogus",
        "bitmap --source=x --add a.qcow2 b",
        "bitmap -q --add a.qcow2 b",
        "bitmap --add -g abc a.qcow2 b1",
        "bitmap --add -g -5 a.qcow2 b1",
        "bitmap --add -g 1000 a.qcow2 b1",
        "bitmap --add -g 256 a.qcow2 b1",
        "bitmap --add -g 4G a.qcow2 b1",
        "bitmap --add --image-opts -f qcow2 a.qcow2 b1",
        "bitmap --add --object foo a.qcow2 b1",
        "bitmap --add nonexist.qcow2 b1",
        "bitmap --add -f raw a.qcow2 b1",
        "bitmap --add -f raw r.raw b1",
        "bitmap --clear -f raw r.raw b1",
        "bitmap --add v2.qcow2 b1",
        "bitmap --remove a.qcow2 nosuch",
        "bitmap --clear a.qcow2 nosuch",
        "bitmap --enable a.qcow2 nosuch",
        "bitmap --disable a.qcow2 nosuch",
        "bitmap --merge x a.qcow2 nosuch",
        "bitmap --disable --add a.qcow2 q",
    ] {
        p.img(line);
    }
    p.identical("a.qcow2");
}

#[test]
fn operations_match_qemu() {
    if !exact_qemu() {
        return;
    }
    let p = Pair::new("bm-ops");
    p.img("create -q -f qcow2 a.qcow2 10M");
    p.img("create -q -f qcow2 s.qcow2 10M");
    p.img("create -q -f qcow2 big.qcow2 20M");
    for line in [
        "bitmap --add a.qcow2 b0",
        "bitmap --add a.qcow2 b0",
        "bitmap --add --add a.qcow2 b1",
        "bitmap --add --remove --add --disable a.qcow2 b2",
        "bitmap --add -g 6G a.qcow2 b6",
        "bitmap --add -g 4294967808 a.qcow2 b7",
        "bitmap --add -g 0 a.qcow2 b8",
        "bitmap --add -g 0x1000 --granularity=2M a.qcow2 b9",
        "bitmap --add s.qcow2 sb",
        "bitmap --add big.qcow2 big",
    ] {
        p.img(line);
    }
    p.io(
        "a.qcow2",
        &["write 0 64k", "write -z 1M 512k", "discard 3M 64k"],
    );
    p.io("s.qcow2", &["write 5M 1M"]);
    for line in [
        "bitmap --merge sb -b s.qcow2 -F raw a.qcow2 b0",
        "bitmap --merge sb -b s.qcow2 -F qcow2 a.qcow2 b2",
        "bitmap --merge sb -b nonexist.qcow2 a.qcow2 b2",
        "bitmap --merge big -b big.qcow2 a.qcow2 b2",
        "bitmap --merge b0 --merge b9 a.qcow2 b7",
        "bitmap --clear --disable a.qcow2 b1",
        "bitmap --enable a.qcow2 b2",
        "bitmap --remove a.qcow2 b8",
    ] {
        p.img(line);
    }
    p.io("a.qcow2", &["write 8M 100k"]);
    p.identical("a.qcow2");
    p.compare_image("a.qcow2", &["b0", "b1", "b2", "b6", "b7", "b9"]);
    p.img("bitmap --remove a.qcow2 b0");
    p.img("bitmap --remove a.qcow2 b1");
    p.img("bitmap --remove --remove a.qcow2 b2");
    for b in ["b6", "b7", "b9"] {
        p.img(&format!("bitmap --remove a.qcow2 {b}"));
    }
    p.identical("a.qcow2");
    p.inspect("check a.qcow2");
}

/// The scenario of QEMU's qemu-img-bitmaps test: bitmaps over a backing chain, merged
/// across files, copied by convert, then left inconsistent by an aborted writer.
#[test]
fn chain_convert_and_inconsistent_bitmaps_match_qemu() {
    if !exact_qemu() {
        return;
    }
    let p = Pair::new("bm-chain");
    p.img("create -q -f qcow2 t.base 10M");
    p.img("bitmap --add -f qcow2 t.base b0");
    p.io("t.base", &["w 3M 1M"]);
    p.img("create -q -f qcow2 -b t.base -F qcow2 t.orig 10M");
    p.io("t.orig", &["w 0 1M"]);
    p.img("bitmap --add -g 512k -f qcow2 t.orig b1");
    p.img("bitmap --add --disable -f qcow2 t.orig b2");
    p.io("t.orig", &["w 3M 1M"]);
    p.img("bitmap --clear -f qcow2 t.orig b1");
    p.io("t.orig", &["w 1M 1M"]);
    p.img("bitmap --disable -f qcow2 t.orig b1");
    p.img("bitmap --enable -f qcow2 t.orig b2");
    p.io("t.orig", &["w 2M 1M"]);
    p.identical("t.orig");
    p.img("convert --bitmaps -O raw t.orig t.raw");
    p.img("convert --bitmaps -O qcow2 t.raw t.bad");
    p.img("convert --bitmaps -O qcow2 -o compat=0.10 t.orig t.v2");
    p.img("convert --bitmaps -O qcow2 t.orig t");
    p.identical("t");
    p.img("bitmap --add --disable -f qcow2 t b0");
    p.img("bitmap --add --merge b0 -b t.base -F qcow2 -f qcow2 t tmp");
    p.img("bitmap --merge tmp -f qcow2 t b0");
    p.img("bitmap --remove --image-opts driver=qcow2,file.driver=file,file.filename=t tmp");
    p.img("rebase -u -F qcow2 -b t.base t");
    p.img("bitmap --add --merge b2 -b t -F qcow2 -f qcow2 t.base b3");
    p.identical("t");
    p.identical("t.base");
    p.compare_image("t", &["b0", "b1", "b2"]);
    p.compare_image("t.base", &["b0", "b3"]);

    // An aborted writer leaves its bitmaps marked in use.
    p.io("t", &["abort"]);
    p.identical("t");
    p.inspect("info t");
    p.inspect("check t");
    for line in [
        "bitmap --clear t b2",
        "bitmap --enable t b2",
        "bitmap --disable t b2",
        "bitmap --merge b0 t b2",
        "bitmap --add t b4",
        "bitmap --merge b0 t b4",
        "bitmap --remove t b1",
        "convert --bitmaps -O qcow2 t t.copy",
        "convert --bitmaps --skip-broken-bitmaps -O qcow2 t t.copy",
    ] {
        p.img(line);
    }
    p.compare_image("t.copy", &["b4"]);
    p.identical("t");
    p.img("bitmap --remove t b0");
    p.img("bitmap --remove --add t b2");
    p.img("convert --bitmaps -O qcow2 t t.copy2");
    p.identical("t.copy2");
    p.compare_image("t.copy2", &["b4", "b2"]);
}

/// Writes by qemu-io and rqemu-io of every kind leave the same bits, on images with
/// several cluster sizes and granularities.
#[test]
fn dirty_tracking_matches_qemu_io() {
    if !exact_qemu() {
        return;
    }
    for (cluster, size, compressed) in [
        ("64k", "100M", "write -c 4M 64k"),
        ("4k", "3M", "write -c 2816k 4k"),
        ("2M", "1G", "write -c 4M 2M"),
    ] {
        let p = Pair::new("bm-track");
        p.img(&format!(
            "create -q -f qcow2 -o cluster_size={cluster} x.qcow2 {size}"
        ));
        p.img("bitmap --add -g 512 x.qcow2 fine");
        p.img("bitmap --add x.qcow2 dflt");
        p.img("bitmap --add -g 1M x.qcow2 coarse");
        p.img("bitmap --add --disable x.qcow2 off");
        p.io(
            "x.qcow2",
            &[
                "write 1000 1",
                "write -P 3 70k 200k",
                "write -z 1M 300k",
                "write -z -u 2M 128k",
                "discard 2560k 64k",
                compressed,
            ],
        );
        p.io("x.qcow2", &["write 1536k 1"]);
        p.identical("x.qcow2");
        p.compare_image("x.qcow2", &["fine", "dflt", "coarse", "off"]);
    }
}

#[test]
fn help_and_dispatch() {
    let d = Scratch::new("bm-help");
    let o = rqemu(d.path(), "rqemu-img", &["bitmap", "--help"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("bitmap"));
}

/// The bitmap directory offset and the first bitmap's table offset of a qcow2 image.
fn bitmap_offsets(img: &[u8]) -> (usize, usize) {
    let be32 = |at: usize| u32::from_be_bytes(img[at..at + 4].try_into().unwrap()) as usize;
    let be64 = |at: usize| u64::from_be_bytes(img[at..at + 8].try_into().unwrap()) as usize;
    let mut pos = be32(100);
    loop {
        let (kind, len) = (be32(pos), be32(pos + 4));
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            let dir = be64(pos + 8 + 16);
            return (dir, be64(dir));
        }
        pos += 8 + len.div_ceil(8) * 8;
    }
}

/// Damaged bitmap directories and tables are refused with QEMU's messages by every
/// command that opens the image.
#[test]
fn damaged_bitmaps_are_refused_like_qemu() {
    if !exact_qemu() {
        return;
    }
    let d = Scratch::new("bm-hostile");
    let p = d.path();
    img_common::qemu_img(p, "create -q -f qcow2 h.qcow2 10M");
    img_common::qemu_img(p, "bitmap --add h.qcow2 b");
    img_common::io(p, "qemu-io", "h.qcow2", &["write 0 64k"]);
    let good = std::fs::read(p.join("h.qcow2")).unwrap();
    let (dir, table) = bitmap_offsets(&good);
    let cases: [(&str, usize, &[u8]); 5] = [
        ("reserved flag", dir + 15, &[4]),
        ("table entry reserved bits", table + 7, &[3]),
        ("table size", dir + 11, &[5]),
        ("zero granularity", dir + 17, &[0]),
        ("bitmap count", 0x78 + 8, &[0, 0, 0, 2]),
    ];
    for (what, at, bytes) in cases {
        let mut img = good.clone();
        img[at..at + bytes.len()].copy_from_slice(bytes);
        std::fs::write(p.join("x.qcow2"), &img).unwrap();
        for args in [
            &["info", "x.qcow2"][..],
            &["check", "x.qcow2"],
            &["bitmap", "--clear", "x.qcow2", "b"],
        ] {
            let q = outcome(&run_in(p, "qemu-img", args));
            std::fs::write(p.join("x.qcow2"), &img).unwrap();
            let r = img_common::rqemu_img(p, args);
            std::fs::write(p.join("x.qcow2"), &img).unwrap();
            assert_eq!(r, q, "{what}: {args:?}");
        }
    }
}

/// Images with bitmaps: snapshots cannot be applied, resizing keeps the bitmaps, and
/// `check -r` leaves them intact.
#[test]
fn other_commands_with_bitmaps_match_qemu() {
    if !exact_qemu() {
        return;
    }
    let p = Pair::new("bm-other");
    p.img("create -q -f qcow2 a.qcow2 10M");
    p.img("bitmap --add a.qcow2 b");
    p.io("a.qcow2", &["write 9M 1M"]);
    p.img("check -r all a.qcow2");
    p.identical("a.qcow2");
    p.img("resize a.qcow2 20M");
    p.io("a.qcow2", &["write 15M 64k"]);
    p.compare_image("a.qcow2", &["b"]);
    p.img("snapshot -c s1 a.qcow2");
    p.img("snapshot -a s1 a.qcow2");
    p.img("snapshot -a nosuch a.qcow2");
}
