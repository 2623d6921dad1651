//! Virtio: the PCI transport ([`pci`], modern interface with MSI-X) and the devices behind
//! it ([`blk`]). A device sees only its queues, guest memory and an [`Interrupt`]; the
//! transport owns registers, feature negotiation and notification plumbing.

pub mod blk;
pub mod msix;
pub mod pci;

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Device status bits.
pub mod status {
    /// The driver has found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The driver knows how to drive it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Features are negotiated.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up.
    pub const FAILED: u8 = 0x80;
}

/// How a device signals the guest: one vector per queue (MSI-X).
pub trait Interrupt: Send + Sync {
    /// Raises `vector` (ignored when it is `VIRTIO_MSI_NO_VECTOR`).
    fn notify(&self, vector: u16);
}

/// No vector assigned.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// One activated queue handed to a device.
pub struct ActiveQueue {
    /// The queue's registers as the driver set them.
    pub queue: Queue,
    /// Written by the guest's notifications (ioeventfd), non-blocking.
    pub kick: EventFd,
    /// MSI-X vector for used-buffer notifications.
    pub vector: u16,
}

/// A virtio device behind the PCI transport.
pub trait VirtioDevice: Send {
    /// Virtio device id (2 for a block device).
    fn device_type(&self) -> u16;
    /// Feature bits offered.
    fn features(&self) -> u64;
    /// Number of queues.
    fn num_queues(&self) -> usize;
    /// Largest queue size.
    fn queue_max_size(&self) -> u16;
    /// Reads the device-specific configuration.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts serving `queues` with the negotiated `features`.
    fn activate(
        &mut self,
        mem: Arc<GuestMemoryMmap>,
        queues: Vec<ActiveQueue>,
        features: u64,
        irq: Arc<dyn Interrupt>,
    ) -> Result<(), String>;
    /// Stops serving queues (in-flight requests finish first).
    fn reset(&mut self);
}
