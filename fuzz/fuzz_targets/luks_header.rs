//! Fuzzes the LUKS1 header parser and opening a raw LUKS volume from arbitrary bytes
//! (with a password, so key slots are unlocked and the payload read). Any input must
//! give an error or a result: never a panic, a hang or a runaway allocation. Headers
//! asking for more than a few thousand PBKDF2 iterations are only parsed, not unlocked,
//! to keep each run short (the iteration cap itself is tested in tests/).
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use rqemu_block::crypto::luks::parse_header;
use rqemu_block::crypto::secret;
use rqemu_block::format::luks::LuksNode;
use rqemu_block::node::{BlockDriver, NodeRef, WriteFlags};
use rqemu_block::protocol::mem::MemNode;

fuzz_target!(|data: &[u8]| {
    let Ok((h, _)) = parse_header(data) else {
        return;
    };
    let cheap = h.mk_digest_iter <= 2000
        && h.slots.iter().all(|s| !s.active || s.iterations <= 2000);
    if !cheap {
        return;
    }
    secret::define("fz", b"fuzz".to_vec());
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let file: NodeRef = Arc::new(MemNode::new(data.to_vec(), false));
        let Ok(n) = LuksNode::open(file, Some("fz"), false, false).await else {
            return;
        };
        let mut buf = vec![0u8; 4096];
        let len = 4096.min(n.size()) as usize;
        let _ = n.read(0, &mut buf[..len]).await;
        let _ = n.write(1, &buf[..len.saturating_sub(1)], WriteFlags::NONE).await;
        let _ = n.format_info().await;
    });
});
