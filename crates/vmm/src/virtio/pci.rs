//! The virtio-pci transport, modern interface (virtio 1.x): vendor capabilities pointing
//! at the common, ISR, device and notification structures in BAR 0, and an MSI-X
//! capability whose table and pending bits also live in BAR 0.
//!
//! ```text
//! BAR 0 (32 KiB): 0x0000 common config   0x1000 ISR          0x2000 device config
//!                 0x3000 notifications (4 bytes per queue)    0x4000 MSI-X table
//!                 0x6000 MSI-X PBA
//! ```
//!
//! Queue notifications are KVM ioeventfds registered when the driver sets DRIVER_OK (and
//! again if the BAR moves), so a guest's kick reaches the device's I/O thread without an
//! exit to the VMM.

use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::msix::{MsiSink, Msix, ENTRY_SIZE};
use super::{status, ActiveQueue, Interrupt, VirtioDevice, VIRTIO_MSI_NO_VECTOR};
use crate::pci::{PciConfig, PciDevice};

/// BAR 0's size.
pub const BAR_SIZE: u32 = 0x8000;
const COMMON: u64 = 0x0000;
const ISR: u64 = 0x1000;
const DEVICE: u64 = 0x2000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x6000;
const MSIX_CAP: usize = 0x84;

#[derive(Clone, Copy, Default)]
struct QueueRegs {
    size: u16,
    vector: u16,
    enable: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// A virtio device on the PCI bus.
pub struct VirtioPci {
    config: PciConfig,
    device: Box<dyn VirtioDevice>,
    msix: Arc<Msix>,
    vm: Option<Arc<VmFd>>,
    mem: Arc<GuestMemoryMmap>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    config_vector: u16,
    queue_select: u16,
    queues: Vec<QueueRegs>,
    /// Kick eventfds and the address they are registered at.
    kicks: Vec<EventFd>,
    registered_at: Option<u64>,
    active: bool,
}

fn vendor_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let len: u8 = if extra.is_some() { 20 } else { 16 };
    let mut b = vec![len, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(x) = extra {
        b.extend_from_slice(&x.to_le_bytes());
    }
    b
}

impl VirtioPci {
    /// Wraps `device` with BAR 0 at `bar_addr`; `vm` registers ioeventfds and delivers
    /// MSI-X messages (absent in tests, which pass their own `sink`).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        bar_addr: u32,
        mem: Arc<GuestMemoryMmap>,
        vm: Option<Arc<VmFd>>,
        sink: Arc<dyn MsiSink>,
    ) -> std::io::Result<Self> {
        let id = device.device_type();
        let class = match id {
            2 => 0x01_00_00, // mass storage, SCSI: what QEMU reports for virtio-blk
            _ => 0xff_00_00,
        };
        let mut config = PciConfig::new(0x1af4, 0x1040 + id, class, 1, (0x1af4, 0x1100));
        config.add_mem_bar(0, BAR_SIZE, bar_addr);
        let nq = device.num_queues();
        let vectors = (nq + 1) as u16;
        config.add_capability(0x09, &vendor_cap(1, COMMON, 0x38, None), &[], 0x40);
        config.add_capability(0x09, &vendor_cap(3, ISR, 1, None), &[], 0x50);
        config.add_capability(0x09, &vendor_cap(4, DEVICE, 0x1000, None), &[], 0x60);
        config.add_capability(
            0x09,
            &vendor_cap(2, NOTIFY, 0x1000, Some(NOTIFY_MULTIPLIER)),
            &[],
            0x70,
        );
        let mut msix_body = Vec::new();
        msix_body.extend_from_slice(&(vectors - 1).to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_TABLE as u32).to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_PBA as u32).to_le_bytes());
        // Only the enable and function-mask bits of message control are writable.
        config.add_capability(0x11, &msix_body, &[0, 0, 0, 0xc0], MSIX_CAP as u8);
        let kicks = (0..nq)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(VirtioPci {
            config,
            msix: Arc::new(Msix::new(vectors, sink)),
            device,
            vm,
            mem,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            config_vector: VIRTIO_MSI_NO_VECTOR,
            queue_select: 0,
            queues: vec![QueueRegs::default(); nq],
            kicks,
            registered_at: None,
            active: false,
        })
    }

    fn bar_base(&self) -> Option<u64> {
        self.config.bar_addr(0).map(|(a, _)| a)
    }

    fn unregister_kicks(&mut self) {
        if let (Some(vm), Some(base)) = (&self.vm, self.registered_at.take()) {
            for (i, k) in self.kicks.iter().enumerate() {
                let addr =
                    IoEventAddress::Mmio(base + NOTIFY + i as u64 * u64::from(NOTIFY_MULTIPLIER));
                let _ = vm.unregister_ioevent(k, &addr, NoDatamatch);
            }
        }
    }

    fn register_kicks(&mut self) {
        self.unregister_kicks();
        let (Some(vm), Some(base)) = (&self.vm, self.bar_base()) else {
            return;
        };
        let mut ok = true;
        for (i, k) in self.kicks.iter().enumerate() {
            let addr =
                IoEventAddress::Mmio(base + NOTIFY + i as u64 * u64::from(NOTIFY_MULTIPLIER));
            ok &= vm.register_ioevent(k, &addr, NoDatamatch).is_ok();
        }
        if ok {
            self.registered_at = Some(base);
        }
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        self.unregister_kicks();
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.config_vector = VIRTIO_MSI_NO_VECTOR;
        for q in &mut self.queues {
            *q = QueueRegs::default();
        }
        for k in &self.kicks {
            let _ = k.read();
        }
    }

    fn activate(&mut self) {
        let max = self.device.queue_max_size();
        let event_idx = self.driver_features & super::VIRTIO_RING_F_EVENT_IDX != 0;
        let mut active = Vec::new();
        for (i, r) in self.queues.iter().enumerate() {
            if !r.enable {
                continue;
            }
            let mut q = match Queue::new(max) {
                Ok(q) => q,
                Err(_) => {
                    self.status |= status::DEVICE_NEEDS_RESET;
                    return;
                }
            };
            q.set_size(r.size);
            q.set_desc_table_address(Some(r.desc as u32), Some((r.desc >> 32) as u32));
            q.set_avail_ring_address(Some(r.driver as u32), Some((r.driver >> 32) as u32));
            q.set_used_ring_address(Some(r.device as u32), Some((r.device >> 32) as u32));
            q.set_event_idx(event_idx);
            q.set_ready(true);
            if !q.is_valid(&*self.mem) {
                self.status |= status::DEVICE_NEEDS_RESET;
                return;
            }
            let kick = match self.kicks[i].try_clone() {
                Ok(k) => k,
                Err(_) => {
                    self.status |= status::DEVICE_NEEDS_RESET;
                    return;
                }
            };
            active.push((
                i,
                ActiveQueue {
                    queue: q,
                    kick,
                    vector: r.vector,
                },
            ));
        }
        self.register_kicks();
        let irq: Arc<dyn Interrupt> = self.msix.clone();
        let queues = active.into_iter().map(|(_, q)| q).collect();
        match self
            .device
            .activate(self.mem.clone(), queues, self.driver_features, irq)
        {
            Ok(()) => self.active = true,
            Err(_) => self.status |= status::DEVICE_NEEDS_RESET,
        }
    }

    fn common_read(&self, offset: u64) -> u64 {
        let q = self.queues.get(usize::from(self.queue_select));
        match offset {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => self.device.features() & 0xffff_ffff,
                1 => self.device.features() >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.config_vector),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status),
            0x15 => u64::from(self.config_generation),
            0x16 => u64::from(self.queue_select),
            0x18 => q
                .map(|q| {
                    if q.size == 0 {
                        self.device.queue_max_size()
                    } else {
                        q.size
                    }
                })
                .unwrap_or(0)
                .into(),
            0x1a => q.map(|q| q.vector).unwrap_or(VIRTIO_MSI_NO_VECTOR).into(),
            0x1c => q.map(|q| u64::from(q.enable)).unwrap_or(0),
            0x1e => u64::from(self.queue_select),
            0x20 => q.map(|q| q.desc).unwrap_or(0),
            0x24 => q.map(|q| q.desc >> 32).unwrap_or(0),
            0x28 => q.map(|q| q.driver).unwrap_or(0),
            0x2c => q.map(|q| q.driver >> 32).unwrap_or(0),
            0x30 => q.map(|q| q.device).unwrap_or(0),
            0x34 => q.map(|q| q.device >> 32).unwrap_or(0),
            _ => 0,
        }
    }

    fn set_half(v: &mut u64, high: bool, x: u64) {
        if high {
            *v = (*v & 0xffff_ffff) | (x << 32);
        } else {
            *v = (*v & !0xffff_ffff) | (x & 0xffff_ffff);
        }
    }

    fn common_write(&mut self, offset: u64, v: u64, len: usize) {
        let running = self.status & status::DRIVER_OK != 0;
        let sel = usize::from(self.queue_select);
        match offset {
            0x00 => self.device_feature_select = v as u32,
            0x08 => self.driver_feature_select = v as u32,
            0x0c => {
                if self.status & status::FEATURES_OK == 0 {
                    let offered = self.device.features();
                    match self.driver_feature_select {
                        0 => Self::set_half(&mut self.driver_features, false, v & offered),
                        1 => Self::set_half(&mut self.driver_features, true, v & (offered >> 32)),
                        _ => {}
                    }
                }
            }
            0x10 => self.config_vector = v as u16,
            0x14 => {
                let new = v as u8;
                if new == 0 {
                    self.reset();
                    return;
                }
                let mut new = new;
                if new & status::FEATURES_OK != 0
                    && self.driver_features & super::VIRTIO_F_VERSION_1 == 0
                {
                    new &= !status::FEATURES_OK;
                }
                let was_ok = self.status & status::DRIVER_OK != 0;
                self.status = new | (self.status & status::DEVICE_NEEDS_RESET);
                if !was_ok && new & status::DRIVER_OK != 0 && new & status::FEATURES_OK != 0 {
                    self.activate();
                }
            }
            0x16 => self.queue_select = v as u16,
            _ if running => {}
            _ => {
                let Some(q) = self.queues.get_mut(sel) else {
                    return;
                };
                match offset {
                    0x18 => {
                        let s = v as u16;
                        if s.is_power_of_two() && s <= self.device.queue_max_size() {
                            q.size = s;
                        }
                    }
                    0x1a => {
                        let vec = v as u16;
                        q.vector = if usize::from(vec) < self.msix.len() {
                            vec
                        } else {
                            VIRTIO_MSI_NO_VECTOR
                        };
                    }
                    0x1c => q.enable = v & 1 == 1,
                    0x20 => Self::set_half(&mut q.desc, false, v),
                    0x24 => Self::set_half(&mut q.desc, true, v),
                    0x28 => Self::set_half(&mut q.driver, false, v),
                    0x2c => Self::set_half(&mut q.driver, true, v),
                    0x30 => Self::set_half(&mut q.device, false, v),
                    0x34 => Self::set_half(&mut q.device, true, v),
                    _ => {}
                }
                if len == 8 && matches!(offset, 0x20 | 0x28 | 0x30) {
                    let hi = v >> 32;
                    match offset {
                        0x20 => Self::set_half(&mut q.desc, true, hi),
                        0x28 => Self::set_half(&mut q.driver, true, hi),
                        _ => Self::set_half(&mut q.device, true, hi),
                    }
                }
            }
        }
    }

    fn sync_msix_control(&self) {
        let mut b = [0u8; 2];
        self.config.read(MSIX_CAP + 2, &mut b);
        let ctl = u16::from_le_bytes(b);
        self.msix.set_control(ctl & 0x8000 != 0, ctl & 0x4000 != 0);
    }
}

fn le(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

impl PciDevice for VirtioPci {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data)
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        if offset < MSIX_CAP + 4 && offset + data.len() > MSIX_CAP + 2 {
            self.sync_msix_control();
        }
        // The BAR moved or decoding changed: move the notification ioeventfds with it.
        if self.active && self.registered_at != self.bar_base() {
            self.register_kicks();
        }
    }

    fn bars(&self) -> Vec<(usize, u64, u64)> {
        self.config
            .bar_addr(0)
            .map(|(a, s)| vec![(0, a, s)])
            .unwrap_or_default()
    }

    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < ISR => {
                let v = self.common_read(o);
                let bytes = v.to_le_bytes();
                let n = data.len().min(8);
                data[..n].copy_from_slice(&bytes[..n]);
            }
            o if o < DEVICE => {
                // ISR: reading clears; with MSI-X only, nothing is ever set.
                data.fill(0);
            }
            o if o < NOTIFY => self.device.read_config(o - DEVICE, data),
            o if o < MSIX_TABLE => data.fill(0),
            o if o < MSIX_PBA => self.msix.table_read(o - MSIX_TABLE, data),
            o => self.msix.pba_read(o - MSIX_PBA, data),
        }
    }

    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        match offset {
            o if o < ISR => self.common_write(o, le(data), data.len()),
            o if o < DEVICE => {}
            o if o < NOTIFY => self.device.write_config(o - DEVICE, data),
            o if o < MSIX_TABLE => {
                // A notification that did not go through an ioeventfd.
                let q = ((o - NOTIFY) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(k) = self.kicks.get(q) {
                    let _ = k.write(1);
                }
            }
            o if o < MSIX_PBA && o - MSIX_TABLE < self.msix.len() as u64 * ENTRY_SIZE => {
                self.msix.table_write(o - MSIX_TABLE, data)
            }
            _ => {}
        }
    }
}

impl Drop for VirtioPci {
    fn drop(&mut self) {
        self.reset();
    }
}
