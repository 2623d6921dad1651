//! rqemu's NBD client against QEMU's: `rqemu-io` and `rqemu-img` on exports of the real
//! `qemu-nbd` (unix sockets in a scratch directory) must print what `qemu-io` and
//! `qemu-img` print (reads, writes, discards, `info`, `map` with `base:allocation` and
//! with `x-dirty-bitmap`, `convert` from NBD, open errors), and a hostile server's
//! malformed replies must end in clean errors.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rqemu::{bin, need_tool, Scratch};

mod img_common;
use img_common::{exact_qemu, io, qemu_img, run_in};

/// Whether the tests can run; prints the one-line reason when not.
fn ready() -> bool {
    need_tool("qemu-nbd", "the NBD client is checked against it") && exact_qemu()
}

/// A qemu-nbd serving `img` on `dir/name.sock` until dropped.
struct Server {
    child: Child,
    sock: PathBuf,
}

impl Server {
    fn start(dir: &Path, name: &str, args: &[&str], img: &str) -> Server {
        let sock = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&sock);
        let sock_s = sock.to_string_lossy().into_owned();
        let child = Command::new("qemu-nbd")
            .args(["--persistent", "-k", &sock_s])
            .args(args)
            .arg(img)
            .current_dir(dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-nbd");
        let t = Instant::now();
        while !sock.exists() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        Server { child, sock }
    }

    fn path(&self) -> String {
        self.sock.to_string_lossy().into_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Exit status, stdout and stderr with rqemu's names read as QEMU's and timings masked.
fn outcome(dir: &Path, prog: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let o = run_in(dir, prog, args);
    let text = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .replace("rqemu-img", "qemu-img")
            .replace("rqemu-io", "qemu-io")
            .lines()
            .map(|l| match l.find(" ops; ") {
                Some(i) => format!("{} ops; T", &l[..i]),
                None => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    (o.status.code(), text(&o.stdout), text(&o.stderr))
}

/// Asserts that the QEMU tool and rqemu's answer `args` in `dir` identically.
fn same(dir: &Path, tool: &str, args: &[&str]) {
    let q = outcome(dir, tool, args);
    let r = outcome(dir, &bin(&format!("r{tool}")).to_string_lossy(), args);
    assert_eq!(r, q, "{tool} {}", args.join(" "));
}

fn io_args<'a>(cmds: &[&'a str], tail: &[&'a str]) -> Vec<&'a str> {
    let mut v = Vec::new();
    for c in cmds {
        v.extend(["-c", *c]);
    }
    v.extend(tail);
    v
}

#[test]
fn io_matches_qemu_io() {
    if !ready() {
        return;
    }
    let s = Scratch::new("nbd-io");
    let d = s.path();
    qemu_img(d, "create -q -f qcow2 a.qcow2 16M");
    io(
        d,
        "qemu-io",
        "a.qcow2",
        &["write -P 0x11 0 1M", "write -z 4M 1M"],
    );
    let srv = Server::start(d, "a", &["-f", "qcow2", "-x", "exp"], "a.qcow2");
    let url = format!("nbd+unix:///exp?socket={}", srv.path());
    let cmds = [
        "read -P 0x11 128k 64k",
        "write -P 0x22 8k 64k",
        "read -P 0x22 8k 64k",
        "read -P 0 4M 1M",
        "write -z 1M 64k",
        "write -z -u 2M 64k",
        "read -P 0 1M 64k",
        "discard 8k 64k",
        "write -f -P 0x33 3M 4k",
        "read -P 0x33 3M 4k",
        "aio_write -P 0x44 6M 64k",
        "aio_flush",
        "readv -P 0x44 6M 32k 32k",
        "read -P 0 15M 2M",
        "flush",
        "map",
    ];
    same(d, "qemu-io", &io_args(&cmds, &["-f", "raw", &url]));
    // Probed format, the legacy filename, and a json: filename.
    same(d, "qemu-io", &io_args(&["read -P 0x11 64k 4k"], &[&url]));
    let legacy = format!("nbd:unix:{}:exportname=exp", srv.path());
    same(
        d,
        "qemu-io",
        &io_args(&["read -P 0x22 8k 4k"], &["-r", &legacy]),
    );
    let json = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"nbd","server":{{"type":"unix","path":"{}"}},"export":"exp"}}}}"#,
        srv.path()
    );
    same(
        d,
        "qemu-io",
        &io_args(&["write -P 5 0 512", "read -P 5 0 512"], &[&json]),
    );
}

#[test]
fn img_matches_qemu_img() {
    if !ready() {
        return;
    }
    let s = Scratch::new("nbd-img");
    let d = s.path();
    qemu_img(d, "create -q -f qcow2 a.qcow2 8M");
    qemu_img(d, "bitmap --add a.qcow2 b0");
    io(
        d,
        "qemu-io",
        "a.qcow2",
        &["write -P 1 1M 1M", "write -z 3M 1M", "write -P 2 6M 100k"],
    );
    let srv = Server::start(
        d,
        "a",
        &["-r", "-f", "qcow2", "-B", "b0", "-x", "ex"],
        "a.qcow2",
    );
    let p = srv.path();
    let url = format!("nbd+unix:///ex?socket={p}");
    let opts = format!("driver=nbd,server.type=unix,server.path={p},export=ex");
    let bitmap = format!("{opts},x-dirty-bitmap=qemu:dirty-bitmap:b0");
    let legacy = format!("driver=nbd,path={p},export=ex");
    let raw_opts = format!(
        "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={p},file.export=ex"
    );
    for args in [
        vec!["info", url.as_str()],
        vec!["info", "-f", "raw", url.as_str()],
        vec!["info", "--image-opts", raw_opts.as_str()],
        vec!["map", "--image-opts", legacy.as_str()],
        vec!["map", url.as_str()],
        vec!["map", "--output=json", url.as_str()],
        vec!["map", "--output=json", "--image-opts", opts.as_str()],
        vec!["map", "--output=json", "--image-opts", bitmap.as_str()],
        vec!["map", "--image-opts", bitmap.as_str()],
        vec![
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            url.as_str(),
            "a.qcow2",
        ],
    ] {
        same(d, "qemu-img", &args);
    }
    // convert from NBD: byte-identical targets.
    for (tool, out) in [("qemu-img", "q.raw"), ("rqemu-img", "r.raw")] {
        let prog = if tool == "qemu-img" {
            tool.to_string()
        } else {
            bin(tool).to_string_lossy().into_owned()
        };
        let o = run_in(
            d,
            &prog,
            &["convert", "-f", "raw", "-O", "qcow2", &url, out],
        );
        assert!(o.status.success(), "{tool} convert: {o:?}");
    }
    assert!(
        std::fs::read(d.join("q.raw")).unwrap() == std::fs::read(d.join("r.raw")).unwrap(),
        "convert targets differ"
    );
}

#[test]
fn open_errors_match_qemu() {
    if !ready() {
        return;
    }
    let s = Scratch::new("nbd-err");
    let d = s.path();
    qemu_img(d, "create -q -f raw a.raw 1M");
    let srv = Server::start(d, "a", &["-r", "-f", "raw", "-x", "exp"], "a.raw");
    let p = srv.path();
    let none = d.join("none.sock").to_string_lossy().into_owned();
    let cases = [
        format!("nbd+unix:///exp?socket={none}"),
        format!("nbd+unix:///nope?socket={p}"),
        format!("nbd:unix:{p}"),
        "nbd://".to_string(),
        "nbd:localhost".to_string(),
        "nbd://127.0.0.1:1/x".to_string(),
        "nbd:127.0.0.1:1:exportname=x".to_string(),
        format!("nbd+unix:///exp?socket={p}&x=y"),
        "nbd://localhost/e?socket=x".to_string(),
        format!("nbd+unix://host/exp?socket={p}"),
        format!("nbd:unix:{p}:exportname="),
        "nbd+unix:///exp".to_string(),
    ];
    for c in &cases {
        same(d, "qemu-img", &["info", c]);
    }
    for o in [
        "driver=nbd".to_string(),
        format!("driver=nbd,host=127.0.0.1,path={p}"),
        format!("driver=nbd,path={p},port=1"),
        format!("driver=nbd,path={p},export=exp,bogus=1"),
        format!("driver=nbd,path={p},export=exp,tls-creds=x"),
        format!("driver=nbd,server.type=unix,path={p}"),
        "driver=nbd,server.type=unix".to_string(),
        "driver=nbd,server.type=inet,server.host=localhost".to_string(),
        "driver=nbd,server.type=foo,server.path=x".to_string(),
        format!("driver=nbd,server.type=unix,server.path={p},server.bogus=1"),
        format!("driver=nbd,path={p},export=exp,x-dirty-bitmap=qemu:dirty-bitmap:no"),
    ] {
        same(d, "qemu-img", &["info", "--image-opts", &o]);
    }
    // A read-only export opened for writing.
    same(
        d,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read 0 512",
            &format!("nbd+unix:///exp?socket={p}"),
        ],
    );
}

/// A server that greets, negotiates like a real one, and then answers the first request
/// with `reply`.
fn hostile_server(sock: &Path, reply: Vec<Vec<u8>>) -> std::thread::JoinHandle<()> {
    let l = UnixListener::bind(sock).expect("bind");
    std::thread::spawn(move || {
        let Ok((mut c, _)) = l.accept() else { return };
        let mut w = Vec::new();
        w.extend(b"NBDMAGICIHAVEOPT");
        w.extend(3u16.to_be_bytes());
        let _ = c.write_all(&w);
        let mut b4 = [0u8; 4];
        let _ = c.read_exact(&mut b4);
        loop {
            let mut h = [0u8; 16];
            if c.read_exact(&mut h).is_err() {
                return;
            }
            let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            let _ = c.read_exact(&mut data);
            let rep = |ty: u32, payload: &[u8]| {
                let mut v = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
                v.extend(opt.to_be_bytes());
                v.extend(ty.to_be_bytes());
                v.extend((payload.len() as u32).to_be_bytes());
                v.extend(payload);
                v
            };
            match opt {
                8 => {
                    let _ = c.write_all(&rep(1, &[]));
                }
                10 => {
                    let mut m = 1u32.to_be_bytes().to_vec();
                    m.extend(b"base:allocation");
                    let _ = c.write_all(&rep(4, &m));
                    let _ = c.write_all(&rep(1, &[]));
                }
                7 => {
                    let mut i = 0u16.to_be_bytes().to_vec();
                    i.extend((1u64 << 20).to_be_bytes());
                    i.extend((1u16 | 4 | 8).to_be_bytes());
                    let _ = c.write_all(&rep(3, &i));
                    let _ = c.write_all(&rep(1, &[]));
                    break;
                }
                _ => {
                    let _ = c.write_all(&rep((1 << 31) + 1, &[]));
                }
            }
        }
        let mut req = [0u8; 28];
        if c.read_exact(&mut req).is_err() {
            return;
        }
        for mut r in reply {
            // The request's cookie goes where a chunk has zeroes for it.
            if r.len() >= 16 && r[8..16] == [0; 8] {
                r[8..16].copy_from_slice(&req[8..16]);
            }
            let _ = c.write_all(&r);
        }
        let _ = c.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = c.read_to_end(&mut sink);
    })
}

fn chunk(flags: u16, ty: u16, payload: &[u8], declared: Option<u32>) -> Vec<u8> {
    let mut v = 0x668e_33efu32.to_be_bytes().to_vec();
    v.extend(flags.to_be_bytes());
    v.extend(ty.to_be_bytes());
    v.extend(0u64.to_be_bytes());
    v.extend(declared.unwrap_or(payload.len() as u32).to_be_bytes());
    v.extend(payload);
    v
}

#[test]
fn hostile_replies_are_clean_errors() {
    let s = Scratch::new("nbd-hostile");
    let d = s.path();
    let mut data_outside = 1u64.to_be_bytes().to_vec();
    data_outside.extend([0u8; 512]);
    let mut hole_long = 0u64.to_be_bytes().to_vec();
    hole_long.extend(u32::MAX.to_be_bytes());
    let mut data = 0u64.to_be_bytes().to_vec();
    data.extend([0u8; 512]);
    let error = chunk(0, (1 << 15) + 1, &[0, 0, 0, 5, 0, 0], None);
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("data outside", vec![chunk(1, 1, &data_outside, None)]),
        ("huge length", vec![chunk(1, 1, &[0; 8], Some(u32::MAX))]),
        ("long hole", vec![chunk(1, 2, &hole_long, None)]),
        ("bad magic", vec![vec![0xff; 32]]),
        ("unknown type", vec![chunk(1, 77, &[], None)]),
        (
            "error no message",
            vec![chunk(1, (1 << 15) + 1, &[0, 0, 0, 5, 0xff, 0xff], None)],
        ),
        ("truncated", vec![chunk(1, 1, &[0; 8], Some(520))]),
        (
            "data twice",
            vec![chunk(0, 1, &data, None), chunk(1, 1, &data, None)],
        ),
        ("endless errors", vec![error; 100]),
    ];
    for (what, reply) in cases {
        let sock = d.join(format!("{}.sock", what.replace(' ', "-")));
        let h = hostile_server(&sock, reply);
        let url = format!("nbd+unix://?socket={}", sock.to_string_lossy());
        let mut child = Command::new(bin("rqemu-io"))
            .args(["-f", "raw", "-c", "read 0 512", &url])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("rqemu-io");
        let t = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait") {
                break st;
            }
            if t.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("{what}: rqemu-io hangs");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut out = String::new();
        let _ = child.stdout.take().map(|mut o| o.read_to_string(&mut out));
        assert!(status.code().is_some(), "{what}: killed by a signal");
        assert!(
            out.contains("read failed: Input/output error"),
            "{what}: {out}"
        );
        let _ = h.join();
    }
}

/// A strict server on `sock` (one client): no structured replies, no meta contexts,
/// a 512-byte minimum block size, and EINVAL for any request not aligned to it.
/// Returns the number of unaligned requests it saw.
fn strict_server(sock: &Path) -> std::thread::JoinHandle<u32> {
    let l = UnixListener::bind(sock).expect("bind");
    std::thread::spawn(move || {
        let Ok((mut c, _)) = l.accept() else { return 0 };
        let mut disk = vec![0u8; 1 << 20];
        let mut unaligned = 0;
        let mut w = b"NBDMAGICIHAVEOPT".to_vec();
        w.extend(3u16.to_be_bytes());
        c.write_all(&w).unwrap();
        let mut b4 = [0u8; 4];
        c.read_exact(&mut b4).unwrap();
        loop {
            let mut h = [0u8; 16];
            c.read_exact(&mut h).unwrap();
            let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            c.read_exact(&mut data).unwrap();
            let rep = |ty: u32, payload: &[u8]| {
                let mut v = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
                v.extend(opt.to_be_bytes());
                v.extend(ty.to_be_bytes());
                v.extend((payload.len() as u32).to_be_bytes());
                v.extend(payload);
                v
            };
            if opt == 7 {
                let mut i = 0u16.to_be_bytes().to_vec();
                i.extend((1u64 << 20).to_be_bytes());
                i.extend((1u16 | 4 | 32 | 64).to_be_bytes());
                c.write_all(&rep(3, &i)).unwrap();
                let mut b = 3u16.to_be_bytes().to_vec();
                for v in [512u32, 4096, 1 << 20] {
                    b.extend(v.to_be_bytes());
                }
                c.write_all(&rep(3, &b)).unwrap();
                c.write_all(&rep(1, &[])).unwrap();
                break;
            }
            c.write_all(&rep((1 << 31) + 1, &[])).unwrap();
        }
        loop {
            let mut req = [0u8; 28];
            if c.read_exact(&mut req).is_err() {
                return unaligned;
            }
            let ty = u16::from_be_bytes([req[6], req[7]]);
            let off = u64::from_be_bytes(req[16..24].try_into().unwrap()) as usize;
            let len = u32::from_be_bytes(req[24..28].try_into().unwrap()) as usize;
            let mut payload = vec![0u8; if ty == 1 { len } else { 0 }];
            c.read_exact(&mut payload).unwrap();
            if ty == 2 {
                return unaligned;
            }
            let bad = ty != 3
                && (!off.is_multiple_of(512) || !len.is_multiple_of(512) || off + len > disk.len());
            unaligned += u32::from(bad);
            let mut r = 0x6744_6698u32.to_be_bytes().to_vec();
            r.extend(if bad { 22u32 } else { 0 }.to_be_bytes());
            r.extend(&req[8..16]);
            if !bad {
                match ty {
                    0 => r.extend(&disk[off..off + len]),
                    1 => disk[off..off + len].copy_from_slice(&payload),
                    4 | 6 => disk[off..off + len].fill(0),
                    _ => {}
                }
            }
            c.write_all(&r).unwrap();
        }
    })
}

#[test]
fn unaligned_requests_on_a_strict_server() {
    let s = Scratch::new("nbd-strict");
    let sock = s.path().join("strict.sock");
    let h = strict_server(&sock);
    let url = format!("nbd+unix://?socket={}", sock.to_string_lossy());
    let cmds = [
        "write -P 7 0 4k",
        "write -P 9 1 3",
        "read -P 7 0 1",
        "read -P 9 1 3",
        "read -P 7 4 508",
        "write -z 100 1000",
        "read -P 0 100 1000",
        "read -P 7 1100 100",
        "discard 10 2000",
        "read -P 7 3000 1096",
        "map",
    ];
    let o = Command::new(bin("rqemu-io"))
        .args(io_args(&cmds, &["-f", "raw", &url]))
        .output()
        .expect("rqemu-io");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(!out.contains("failed"), "{out}");
    assert_eq!(
        h.join().expect("server"),
        0,
        "unaligned requests reached the server"
    );
}

#[test]
fn creation_on_an_existing_export() {
    if !ready() {
        return;
    }
    let s = Scratch::new("nbd-create");
    let d = s.path();
    qemu_img(d, "create -q -f raw a.raw 1M");
    io(d, "qemu-io", "a.raw", &["write -P 0x55 0 1M"]);
    let srv = Server::start(d, "a", &["-f", "raw", "-x", "e"], "a.raw");
    let url = format!("nbd+unix:///e?socket={}", srv.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let node = rt
        .block_on(rqemu_block::protocol::nbd::create_existing(&url, 64 << 10))
        .expect("create on an existing export");
    rt.block_on(node.close()).expect("close");
    match rt.block_on(rqemu_block::protocol::nbd::create_existing(&url, 2 << 20)) {
        Ok(_) => panic!("exports cannot grow"),
        Err(e) => assert_eq!(e.to_string(), "Cannot grow NBD nodes"),
    }
    drop(srv);
    // The first sector is zeroed, the rest is left alone.
    let data = std::fs::read(d.join("a.raw")).expect("image");
    assert!(data[..512].iter().all(|&b| b == 0));
    assert!(data[512..].iter().all(|&b| b == 0x55));
}

#[test]
fn create_and_convert_onto_an_export() {
    if !ready() {
        return;
    }
    let s = Scratch::new("nbd-convert");
    let d = s.path();
    qemu_img(d, "create -q -f raw t.raw 2M");
    qemu_img(d, "create -q -f qcow2 src.qcow2 64M");
    io(d, "qemu-io", "src.qcow2", &["write -P 0x3c 1M 64k"]);
    let srv = Server::start(d, "t", &["-f", "raw", "-x", "e"], "t.raw");
    let url = format!("nbd+unix:///e?socket={}", srv.path());
    // Messages and exit codes: a size the export cannot grow to, preallocation, success.
    same(d, "qemu-img", &["create", "-f", "raw", &url, "4M"]);
    same(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=full",
            &url,
            "1M",
        ],
    );
    same(d, "qemu-img", &["create", "-f", "qcow2", &url, "1G"]);
    // A compressed qcow2 written into the export reads back as the source.
    let c = run_in(
        d,
        &bin("rqemu-img").to_string_lossy(),
        &[
            "convert",
            "-c",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            "src.qcow2",
            &url,
        ],
    );
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    for args in [
        vec!["check", url.as_str()],
        vec!["compare", "src.qcow2", url.as_str()],
    ] {
        let o = run_in(d, "qemu-img", &args);
        assert!(
            o.status.success(),
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
    }
}

#[test]
fn tcp_exports() {
    if !ready() {
        return;
    }
    let s = Scratch::new("nbd-tcp");
    let d = s.path();
    qemu_img(d, "create -q -f qcow2 a.qcow2 4M");
    io(d, "qemu-io", "a.qcow2", &["write -P 0x21 1M 1M"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
        .to_string();
    let mut child = Command::new("qemu-nbd")
        .args(["--persistent", "-b", "127.0.0.1", "-p", &port])
        .args(["-f", "qcow2", "-x", "t", "a.qcow2"])
        .current_dir(d)
        .stdout(Stdio::null())
        // The readiness probe below connects without negotiating, which it reports.
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-nbd");
    let t = Instant::now();
    while std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err()
        && t.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("nbd://127.0.0.1:{port}/t");
    let legacy = format!("nbd:127.0.0.1:{port}:exportname=t");
    let opts = format!("driver=nbd,host=127.0.0.1,port={port},export=t");
    for args in [
        vec!["info", url.as_str()],
        vec!["map", "--output=json", legacy.as_str()],
        vec!["map", "--image-opts", opts.as_str()],
    ] {
        same(d, "qemu-img", &args);
    }
    same(
        d,
        "qemu-io",
        &io_args(
            &["read -P 0x21 1M 1M", "write -P 3 0 4k"],
            &["-f", "raw", &url],
        ),
    );
    let _ = child.kill();
    let _ = child.wait();
}
