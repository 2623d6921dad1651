//! Vectored reads and writes of the block layer (`BlockBackend::readv`/`writev`, what
//! virtio-blk uses) against plain reads, on raw and qcow2 images (with a backing file,
//! zero and unallocated clusters), buffered and O_DIRECT, both AIO engines, with buffers
//! that meet O_DIRECT's alignment and buffers that do not.

use rqemu::{require_qemu, run_ok};
use rqemu_block::buffer::AlignedBuf;
use rqemu_block::iov::{IoBuf, IoBufMut};
use rqemu_block::{AioMode, BlockBackend, CacheMode, OpenOptions};

fn open(rt: &tokio::runtime::Runtime, img: &str, cache: &str, aio: AioMode) -> BlockBackend {
    rt.block_on(BlockBackend::open(&OpenOptions {
        filename: img.to_string(),
        cache: CacheMode::parse(cache).unwrap(),
        aio,
        quiet_probe: true,
        ..Default::default()
    }))
    .expect("open image")
}

/// Pieces of `buf` (one aligned allocation) of the given lengths, in order.
fn pieces<'a>(buf: &'a mut [u8], lens: &[usize]) -> Vec<IoBufMut<'a>> {
    let mut out = Vec::new();
    let mut rest = buf;
    for &n in lens {
        let (a, b) = rest.split_at_mut(n);
        out.push(IoBufMut::new(a));
        rest = b;
    }
    out
}

fn check(img: &str, len: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let layouts: &[&[usize]] = &[
        &[4096, 4096, 8192, 65536], // page-aligned pieces: straight into the buffers
        &[512, 3584, 4096, 512, 512], // sector pieces: bounced under O_DIRECT
        &[1000, 3096, 8192],        // not even sector-sized
    ];
    for cache in ["none", "writeback"] {
        for aio in [AioMode::Threads, AioMode::IoUring] {
            let b = open(&rt, img, cache, aio);
            let mut whole = vec![0u8; len];
            rt.block_on(b.read(0, &mut whole)).unwrap();
            for lens in layouts {
                let total: usize = lens.iter().sum();
                for at in [0u64, 61440, 1 << 20, (len - total) as u64] {
                    let mut buf = AlignedBuf::io(total + 4096);
                    // Offset by a page so the first piece is aligned but not the start
                    // of the allocation.
                    let v = pieces(&mut buf[4096..], lens);
                    rt.block_on(b.readv(at, &v)).unwrap();
                    let at = at as usize;
                    assert!(
                        buf[4096..] == whole[at..at + total],
                        "{img} cache={cache} {aio:?} {lens:?} at {at}"
                    );
                }
            }
            // A vectored write, read back plainly.
            let mut src = AlignedBuf::io(65536 + 4096);
            for (i, x) in src.iter_mut().enumerate() {
                *x = (i * 7 + 3) as u8;
            }
            let parts: Vec<IoBuf> = src[..4096 + 512 + 61440]
                .chunks(4096)
                .map(IoBuf::new)
                .collect();
            let n: usize = parts.iter().map(|p| p.len()).sum();
            rt.block_on(b.writev(2 << 20, &parts, true)).unwrap();
            let mut back = vec![0u8; n];
            rt.block_on(b.read(2 << 20, &mut back)).unwrap();
            assert!(back[..] == src[..n], "{img} cache={cache} {aio:?} writev");
            rt.block_on(b.close()).unwrap();
        }
    }
}

#[test]
fn vectored_requests_read_and_write_what_plain_ones_do() {
    require_qemu!();
    // On the target directory's file system rather than tmpfs: O_DIRECT there enforces
    // alignment, so the bounce paths are exercised.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("vectored-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let file = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let raw = file("d.raw");
    run_ok("qemu-img", &["create", "-q", "-f", "raw", &raw, "4M"]);
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 3M",
            "-c",
            "write -P 0x22 4000 9000",
            &raw,
        ],
    );
    check(&raw, 4 << 20);

    let base = file("base.qcow2");
    let top = file("top.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", &base, "4M"]);
    run_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x33 0 4M", &base],
    );
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            &base,
            "-F",
            "qcow2",
            &top,
        ],
    );
    run_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x44 8192 16384",
            "-c",
            "write -z 65536 8192",
            "-c",
            "write -P 0x55 1M 4096",
            "-c",
            "write -P 0x66 1056768 8192",
            &top,
        ],
    );
    check(&top, 4 << 20);
}
