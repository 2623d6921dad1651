//! Fuzzes opening a qcow2 image from arbitrary bytes, then reading, querying allocation,
//! checking, and writing it (persistent bitmaps loaded, added, merged and stored). Any
//! input must give an error or a result: never a panic, a hang or a runaway allocation.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use rqemu_block::format::qcow2::{Qcow2, Qcow2Options};
use rqemu_block::info::RepairMode;
use rqemu_block::node::{BlockDriver, NodeRef, WriteFlags};
use rqemu_block::protocol::mem::MemNode;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        for writable in [false, true] {
            let file: NodeRef = Arc::new(MemNode::new(data.to_vec(), !writable));
            let opts = Qcow2Options {
                read_only: !writable,
                no_flush: true,
                ..Default::default()
            };
            let Ok(q) = Qcow2::open(file, opts).await else {
                continue;
            };
            let size = q.size();
            let mut buf = vec![0u8; 65536];
            for off in [0, size / 3, size.saturating_sub(4096)] {
                let len = 65536.min(size.saturating_sub(off)) as usize;
                let _ = q.read(off, &mut buf[..len]).await;
                let _ = q.block_status(off, 1 << 20).await;
            }
            if writable {
                let _ = q.write(0, &buf[..4096], WriteFlags::NONE).await;
                let _ = q.write(size / 2 & !511, &buf[..512], WriteFlags::NONE).await;
                let _ = q.write_zeroes(0, 65536.min(size), WriteFlags::NONE).await;
                let _ = q.discard(0, size).await;
                // Persistent bitmaps: the loaded ones are stored back at close.
                let _ = q.bitmap_add("fz", Some(512), false).await;
                let _ = q.write(0, &buf[..512], WriteFlags::NONE).await;
                for b in q.persistent_bitmaps() {
                    if let Ok(bits) = q.bitmap_contents(&b.name) {
                        let _ = q.bitmap_merge("fz", &bits);
                    }
                }
                let _ = q.flush().await;
            }
            let _ = q.check(RepairMode::default()).await;
            if writable {
                let _ = q
                    .check(RepairMode {
                        leaks: true,
                        errors: true,
                    })
                    .await;
            }
            let _ = q.close().await;
        }
    });
});
