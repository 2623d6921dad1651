//! Crash consistency: a writer doing allocating writes is killed with SIGKILL at random
//! moments. Afterwards `qemu-img check` must find no corruption (leaked clusters are
//! allowed, as QEMU allows them; images with lazy refcounts are first repaired by opening
//! them, as QEMU does), and every write acknowledged by a completed flush must read back
//! intact through qemu-io.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rqemu::{require_qemu, run, run_ok, Scratch};

const CLUSTER: u64 = 65536;
/// Each write gets its own region, so a flushed write is never overwritten later.
const STRIDE: u64 = 3 * CLUSTER + 4096;
const WRITE_LEN: u64 = 2 * CLUSTER + 1000;

fn pattern(seq: u64) -> u8 {
    (seq % 250 + 1) as u8
}

/// The writer, run in a child process: writes region after region and reports each
/// completed flush on stdout. Not a test of its own: ignored, and started (with
/// `--ignored`) by [`killed_writer_leaves_consistent_image`].
#[test]
#[ignore = "the crash writer: a child process of killed_writer_leaves_consistent_image"]
fn crash_writer_child() {
    let img = std::env::var("RQEMU_CRASH_IMAGE")
        .expect("RQEMU_CRASH_IMAGE names the image (this is the crash test's child)");
    let flush_every: u64 = std::env::var("RQEMU_CRASH_FLUSH_EVERY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let o = rqemu_block::OpenOptions {
            filename: img,
            format: Some("qcow2".into()),
            ..Default::default()
        };
        let b = rqemu_block::BlockBackend::open(&o).await.unwrap();
        let size = b.size();
        let mut seq = 0u64;
        loop {
            let off = seq * STRIDE + (seq % 7) * 512;
            if off + WRITE_LEN > size {
                break;
            }
            let buf = vec![pattern(seq); WRITE_LEN as usize];
            b.write(off, &buf, false).await.unwrap();
            seq += 1;
            if seq.is_multiple_of(flush_every) {
                b.flush().await.unwrap();
                println!("flushed {seq}");
            }
        }
        println!("done");
        b.close().await.unwrap();
    });
}

fn check_after_crash(img: &str, flushed: u64, lazy: bool, what: &str) {
    if lazy {
        // Lazy refcounts leave the dirty bit set and refcounts behind; opening the image
        // read-write repairs it (as QEMU does).
        run_ok("qemu-io", &["-c", "flush", img]);
    }
    let o = run("qemu-img", &["check", img]);
    let code = o.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 3,
        "{what}: qemu-img check found corruption (exit {code}):\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let mut args: Vec<String> = vec!["-r".into(), "-U".into()];
    for seq in 0..flushed {
        let off = seq * STRIDE + (seq % 7) * 512;
        args.push("-c".into());
        args.push(format!("read -q -P {} {off} {WRITE_LEN}", pattern(seq)));
    }
    args.push(img.into());
    let out = run_ok("qemu-io", &args);
    assert!(
        !out.contains("failed"),
        "{what}: flushed data lost after a crash: {out}"
    );
}

#[test]
fn killed_writer_leaves_consistent_image() {
    require_qemu!();
    let s = Scratch::new("crash");
    let exe = std::env::current_exe().unwrap();
    let mut rounds = 0;
    for (opts, flush_every) in [
        ("", 3u64),
        ("lazy_refcounts=on", 2),
        ("cluster_size=4k", 5),
        ("extended_l2=on", 3),
        ("refcount_bits=1,cluster_size=4096", 4),
    ] {
        for delay_ms in [15u64, 40, 90, 160] {
            rounds += 1;
            let img = s.file("crash.qcow2");
            let _ = std::fs::remove_file(&img);
            let base = s.file("base.qcow2");
            let _ = std::fs::remove_file(&base);
            let mut args = vec![
                "create".to_string(),
                "-q".into(),
                "-f".into(),
                "qcow2".into(),
            ];
            let mut o = opts.to_string();
            if rounds % 2 == 0 {
                run_ok("qemu-img", &["create", "-q", "-f", "qcow2", &base, "256M"]);
                if !o.is_empty() {
                    o.push(',');
                }
                o.push_str("backing_file=base.qcow2,backing_fmt=qcow2");
            }
            if !o.is_empty() {
                args.push("-o".into());
                args.push(o);
            }
            args.push(img.clone());
            args.push("256M".into());
            run_ok("qemu-img", &args);
            let mut child = Command::new(&exe)
                .args([
                    "crash_writer_child",
                    "--ignored",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("RQEMU_CRASH_IMAGE", &img)
                .env("RQEMU_CRASH_FLUSH_EVERY", flush_every.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let stdout = child.stdout.take().unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            let reader = std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(n) = line.strip_prefix("flushed ") {
                        if let Ok(n) = n.parse::<u64>() {
                            let _ = tx.send(n);
                        }
                    }
                }
            });
            let start = Instant::now();
            let mut flushed = 0;
            // Wait for the first flush so the kill lands during real work.
            while let Ok(n) = rx.recv_timeout(Duration::from_secs(30)) {
                flushed = n;
                if start.elapsed() >= Duration::from_millis(delay_ms) {
                    break;
                }
            }
            // SAFETY: kill() on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let _ = child.wait();
            let _ = reader.join();
            while let Ok(n) = rx.try_recv() {
                flushed = n;
            }
            check_after_crash(
                &img,
                flushed,
                opts.contains("lazy"),
                &format!(
                    "opts '{opts}', backing {}, kill after {delay_ms} ms, {flushed} writes flushed",
                    rounds % 2 == 0
                ),
            );
        }
    }
}
