//! virtio-blk over an rqemu block backend.
//!
//! - [`request`]: parsing and validating requests from descriptor chains.
//! - [`worker`]: one task per queue on the device's I/O thread: pops chains, runs requests
//!   concurrently against the backend, with data moving directly between the image and
//!   guest memory, and completes them in the used ring.
//! - [`throttle`]: `throttling.*` limits.
//! - [`fuzz`]: the fuzz target's body.
//!
//! The guest-visible write cache (WCE) starts as the cache mode implies and can be
//! switched by the guest; with it off, every write is made durable before completing.

pub mod fuzz;
pub mod request;
pub mod throttle;
pub mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rqemu_block::BlockBackend;
use tokio::task::JoinHandle;
use vm_memory::GuestMemoryMmap;

use super::{ActiveQueue, Interrupt, VirtioDevice};
use super::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use crate::config::Throttle;
use request::{ID_LEN, SECTOR};

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_TOPOLOGY: u64 = 1 << 10;
const F_CONFIG_WCE: u64 = 1 << 11;
const F_MQ: u64 = 1 << 12;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

/// Largest discard or write-zeroes request, in sectors.
const MAX_DISCARD_SECTORS: u32 = (i32::MAX as u32) >> 9;

/// What the queues of one disk share.
pub struct Disk {
    /// The image.
    pub backend: BlockBackend,
    /// GET_ID's answer: the serial, NUL-padded to 20 bytes.
    pub id: [u8; ID_LEN as usize],
    /// Size in bytes, rounded down to whole sectors.
    pub capacity: u64,
    /// The guest-visible write cache is on.
    pub wce: AtomicBool,
    /// I/O limits.
    pub throttle: Option<throttle::Throttler>,
    /// `werror=ignore`/`rerror=ignore`: errors complete with success.
    pub ignore_errors: bool,
}

impl Disk {
    /// A disk for `backend`.
    pub fn new(
        backend: BlockBackend,
        serial: Option<&str>,
        throttle: Throttle,
        write_cache: Option<bool>,
        ignore_errors: bool,
    ) -> Disk {
        let mut id = [0u8; ID_LEN as usize];
        if let Some(s) = serial {
            let n = s.len().min(id.len());
            id[..n].copy_from_slice(&s.as_bytes()[..n]);
        }
        let capacity = backend.size() / SECTOR * SECTOR;
        let wce = write_cache.unwrap_or_else(|| backend.write_cache_enabled());
        Disk {
            backend,
            id,
            capacity,
            wce: AtomicBool::new(wce),
            throttle: throttle
                .is_enabled()
                .then(|| throttle::Throttler::new(throttle)),
            ignore_errors,
        }
    }
}

/// The virtio-blk device.
pub struct Blk {
    disk: Arc<Disk>,
    queues: usize,
    queue_size: u16,
    runtime: tokio::runtime::Handle,
    tasks: Vec<JoinHandle<()>>,
}

impl Blk {
    /// A device with `queues` queues of up to `queue_size` entries, served on `runtime`.
    pub fn new(
        disk: Arc<Disk>,
        queues: usize,
        queue_size: u16,
        runtime: tokio::runtime::Handle,
    ) -> Blk {
        Blk {
            disk,
            queues: queues.max(1),
            queue_size,
            runtime,
            tasks: Vec::new(),
        }
    }

    fn config_bytes(&self) -> [u8; 0x3c] {
        let mut c = [0u8; 0x3c];
        let sectors = self.disk.capacity / SECTOR;
        c[0..8].copy_from_slice(&sectors.to_le_bytes());
        c[0x0c..0x10].copy_from_slice(&u32::from(self.queue_size - 2).to_le_bytes()); // seg_max
        c[0x14..0x18].copy_from_slice(&512u32.to_le_bytes()); // blk_size
        c[0x18] = 0; // physical_block_exp
        c[0x1a..0x1c].copy_from_slice(&1u16.to_le_bytes()); // min_io_size (blocks)
        c[0x20] = u8::from(self.disk.wce.load(Ordering::Relaxed));
        c[0x22..0x24].copy_from_slice(&(self.queues as u16).to_le_bytes());
        c[0x24..0x28].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[0x28..0x2c].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c[0x2c..0x30].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[0x30..0x34].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[0x34..0x38].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c[0x38] = 1; // write_zeroes_may_unmap
        c
    }
}

impl VirtioDevice for Blk {
    fn device_type(&self) -> u16 {
        2
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | F_SEG_MAX
            | F_BLK_SIZE
            | F_FLUSH
            | F_TOPOLOGY
            | F_CONFIG_WCE
            | F_MQ
            | F_WRITE_ZEROES;
        if self.disk.backend.is_read_only() {
            f |= F_RO;
        } else {
            f |= F_DISCARD;
        }
        f
    }

    fn num_queues(&self) -> usize {
        self.queues
    }

    fn queue_max_size(&self) -> u16 {
        self.queue_size
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = c.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == 0x20 {
            if let Some(&v) = data.first() {
                self.disk.wce.store(v != 0, Ordering::Relaxed);
            }
        }
    }

    fn activate(
        &mut self,
        mem: Arc<GuestMemoryMmap>,
        queues: Vec<ActiveQueue>,
        _features: u64,
        irq: Arc<dyn Interrupt>,
    ) -> Result<(), String> {
        self.reset();
        for q in queues {
            let task = worker::serve(q, mem.clone(), self.disk.clone(), irq.clone());
            self.tasks.push(self.runtime.spawn(task));
        }
        Ok(())
    }

    fn reset(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
            // Wait until the task is gone: in-flight requests must not touch guest memory
            // (or the used ring) after the reset.
            let _ = self.runtime.block_on(t);
        }
    }
}

impl Drop for Blk {
    fn drop(&mut self) {
        self.reset();
    }
}
