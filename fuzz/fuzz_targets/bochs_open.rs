//! Fuzzes opening and reading a Bochs image from arbitrary bytes: any input must give
//! an error or a readable node, never a panic, a hang or a huge allocation.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use rqemu_block::format::bochs::BochsNode;
use rqemu_block::node::{BlockDriver, NodeRef};
use rqemu_block::protocol::mem::MemNode;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let file: NodeRef = Arc::new(MemNode::new(data.to_vec(), true));
        let Ok(node) = BochsNode::open(file, true).await else {
            return;
        };
        let mut buf = vec![0u8; 64 << 10];
        let size = node.size();
        for offset in [0, size / 2 / 512 * 512, size.saturating_sub(buf.len() as u64) / 512 * 512] {
            let n = (size - offset).min(buf.len() as u64) as usize;
            let _ = node.read(offset, &mut buf[..n]).await;
        }
    });
});
