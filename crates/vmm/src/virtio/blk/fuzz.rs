//! The body of the `virtio_blk_request` fuzz target, kept here so that the tests run it
//! too: arbitrary bytes become guest memory, a descriptor chain for the request parser,
//! and a virtqueue whose rings and descriptors live in that memory; every request found
//! is parsed and run against an in-memory disk. Nothing may panic or loop forever.

use std::sync::Arc;

use rqemu_block::node::NodeRef;
use rqemu_block::protocol::mem::MemNode;
use rqemu_block::{BlockBackend, CacheMode, DetectZeroes, DiscardMode};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::request::{self, Desc};
use super::worker::{execute, pop_all};
use super::Disk;
use crate::config::Throttle;

/// Guest memory size of one run.
pub const MEM_SIZE: usize = 0x10000;
/// Disk size of one run.
pub const DISK_SIZE: usize = 1 << 20;

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([
        b.get(at).copied().unwrap_or(0),
        b.get(at + 1).copied().unwrap_or(0),
    ])
}

/// Runs one input.
pub fn run_one(data: &[u8]) {
    let Some((ctl, rest)) = data.split_first_chunk::<8>() else {
        return;
    };
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let n = rest.len().min(MEM_SIZE);
    if mem.write_slice(&rest[..n], GuestAddress(0)).is_err() {
        return;
    }
    let mem = Arc::new(mem);
    let file: NodeRef = Arc::new(MemNode::new(vec![0; DISK_SIZE], ctl[7] & 1 == 1));
    let backend = BlockBackend::new(
        file,
        ctl[7] & 1 == 1,
        CacheMode::default(),
        DiscardMode::Unmap,
        DetectZeroes::Off,
    );
    let disk = Arc::new(Disk::new(
        backend,
        Some("FUZZ"),
        Throttle::default(),
        None,
        false,
    ));
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };

    // The parser alone, on a chain read from the input's first bytes.
    let count = usize::from(ctl[0] % 8);
    let descs: Vec<Desc> = rest
        .chunks(13)
        .take(count)
        .map(|c| {
            let mut a = [0u8; 8];
            let k = c.len().min(8);
            a[..k].copy_from_slice(&c[..k]);
            let mut l = [0u8; 4];
            for (i, b) in c.iter().skip(8).take(4).enumerate() {
                l[i] = *b;
            }
            Desc {
                // Mostly inside guest memory, sometimes anywhere.
                addr: if ctl[1] & 0x80 != 0 {
                    u64::from_le_bytes(a)
                } else {
                    u64::from_le_bytes(a) % (MEM_SIZE as u64 + 64)
                },
                len: if ctl[1] & 0x40 != 0 {
                    u32::from_le_bytes(l)
                } else {
                    u32::from_le_bytes(l) % 4096
                },
                write: c.get(12).is_some_and(|b| b & 1 == 1),
            }
        })
        .collect();
    if let Ok(req) = request::parse(&descs, &mem, disk.capacity) {
        rt.block_on(super::worker::run(&disk, &req, &mem));
    }

    // The queue path: rings at input-chosen places in guest memory.
    let Ok(mut q) = Queue::new(256) else { return };
    q.set_size(1 << (ctl[2] % 9));
    let desc = u64::from(le_u16(ctl, 3)) & !0xf;
    let avail = u64::from(le_u16(ctl, 5)) & !1;
    let used = ((desc + 0x1000) % MEM_SIZE as u64) & !3;
    q.set_desc_table_address(Some(desc as u32), Some(0));
    q.set_avail_ring_address(Some(avail as u32), Some(0));
    q.set_used_ring_address(Some(used as u32), Some(0));
    q.set_event_idx(ctl[1] & 1 == 1);
    q.set_ready(true);
    if !q.is_valid(&*mem) {
        return;
    }
    for _ in 0..4 {
        let chains = pop_all(&mut q, &mem);
        if chains.is_empty() {
            break;
        }
        for (head, descs) in chains {
            let (head, len) = rt.block_on(execute(head, descs, mem.clone(), disk.clone()));
            let _ = q.add_used(&*mem, head, len);
        }
        let _ = q.needs_notification(&*mem);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_inputs() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..300 {
            let len = (next() % 0x2000) as usize + 8;
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Every few rounds, plant a plausible request at the start of memory.
            if round % 3 == 0 && data.len() > 64 {
                data[0] = 3;
                data[8..16].copy_from_slice(&0x100u64.to_le_bytes());
                data[16..20].copy_from_slice(&16u32.to_le_bytes());
            }
            run_one(&data);
        }
    }
}
