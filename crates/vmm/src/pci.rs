//! PCI: the host bridge, configuration space through ports 0xcf8/0xcfc (type 1), and
//! dispatch of MMIO exits to the memory BARs of the devices on bus 0.
//!
//! [`PciConfig`] is a device's 256-byte configuration space with QEMU's rules: writable
//! bits per byte, BAR sizing (writing all ones reads back the size mask) and a
//! capability list.

use std::sync::{Arc, Mutex};

use crate::devices::bus::{lock, PioDevice};

/// A function's configuration space.
pub struct PciConfig {
    data: [u8; 256],
    wmask: [u8; 256],
    /// Sizes of the memory BARs (0 = unused), 32-bit BARs only.
    bar_size: [u32; 6],
    last_cap: u8,
}

/// Configuration-space offsets.
pub mod reg {
    /// Command register.
    pub const COMMAND: usize = 0x04;
    /// Status register.
    pub const STATUS: usize = 0x06;
    /// First BAR.
    pub const BAR0: usize = 0x10;
    /// Capabilities pointer.
    pub const CAP_PTR: usize = 0x34;
    /// Interrupt line.
    pub const INTERRUPT_LINE: usize = 0x3c;
}

/// Memory-space enable in the command register.
pub const COMMAND_MEMORY: u16 = 0x2;

impl PciConfig {
    /// A type-0 header with the given identity.
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8, subsys: (u16, u16)) -> Self {
        let mut c = PciConfig {
            data: [0; 256],
            wmask: [0; 256],
            bar_size: [0; 6],
            last_cap: 0,
        };
        c.data[0..2].copy_from_slice(&vendor.to_le_bytes());
        c.data[2..4].copy_from_slice(&device.to_le_bytes());
        c.data[8] = revision;
        c.data[9..12].copy_from_slice(&class.to_le_bytes()[0..3]);
        c.data[0x2c..0x2e].copy_from_slice(&subsys.0.to_le_bytes());
        c.data[0x2e..0x30].copy_from_slice(&subsys.1.to_le_bytes());
        // Command: I/O, memory, bus master, INTx disable are writable.
        c.wmask[reg::COMMAND] = 0x07;
        c.wmask[reg::COMMAND + 1] = 0x04;
        c.wmask[reg::INTERRUPT_LINE] = 0xff;
        c
    }

    /// Declares memory BAR `index` (32-bit, non-prefetchable) of `size` bytes at `addr`.
    pub fn add_mem_bar(&mut self, index: usize, size: u32, addr: u32) {
        debug_assert!(size.is_power_of_two() && size >= 16);
        self.bar_size[index] = size;
        let off = reg::BAR0 + 4 * index;
        self.data[off..off + 4].copy_from_slice(&addr.to_le_bytes());
        self.wmask[off..off + 4].copy_from_slice(&(!(size - 1)).to_le_bytes());
    }

    /// Adds a capability with `body` (everything after the id and next bytes); returns its
    /// offset. `writable` gives write masks for the whole capability.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8], at: u8) -> u8 {
        let off = at as usize;
        self.data[off] = id;
        self.data[off + 1] = 0;
        self.data[off + 2..off + 2 + body.len()].copy_from_slice(body);
        for (i, m) in writable.iter().enumerate() {
            self.wmask[off + i] = *m;
        }
        if self.last_cap == 0 {
            self.data[reg::CAP_PTR] = at;
            self.data[reg::STATUS] |= 0x10;
        } else {
            self.data[self.last_cap as usize + 1] = at;
        }
        self.last_cap = at;
        at
    }

    /// The address BAR `index` decodes (when memory decoding is on).
    pub fn bar_addr(&self, index: usize) -> Option<(u64, u64)> {
        let size = self.bar_size[index];
        if size == 0 || self.command() & COMMAND_MEMORY == 0 {
            return None;
        }
        let off = reg::BAR0 + 4 * index;
        let v = u32::from_le_bytes([
            self.data[off],
            self.data[off + 1],
            self.data[off + 2],
            self.data[off + 3],
        ]);
        Some((u64::from(v & !0xf), u64::from(size)))
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        u16::from_le_bytes([self.data[reg::COMMAND], self.data[reg::COMMAND + 1]])
    }

    /// Reads `data.len()` bytes at `offset`.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.data.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    /// Writes through the write masks.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let o = offset + i;
            if o >= 256 {
                break;
            }
            let m = self.wmask[o];
            self.data[o] = (self.data[o] & !m) | (b & m);
        }
    }

    /// Raw bytes (for capability handlers).
    pub fn bytes_mut(&mut self) -> &mut [u8; 256] {
        &mut self.data
    }
}

/// A function on bus 0.
pub trait PciDevice: Send {
    /// Configuration-space read.
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    /// Configuration-space write.
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// The memory ranges the device decodes now: (BAR index, address, size).
    fn bars(&self) -> Vec<(usize, u64, u64)>;
    /// A read inside BAR `bar` at `offset`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// A write inside BAR `bar` at `offset`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// The host bridge (slot 0).
pub struct HostBridge(PciConfig);

impl HostBridge {
    /// i440FX (`pc`) or Q35 (`q35`) identity.
    pub fn new(q35: bool) -> Self {
        let device = if q35 { 0x29c0 } else { 0x1237 };
        HostBridge(PciConfig::new(
            0x8086,
            device,
            0x06_00_00,
            0,
            (0x1af4, 0x1100),
        ))
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.0.read(offset, data)
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.0.write(offset, data)
    }
    fn bars(&self) -> Vec<(usize, u64, u64)> {
        Vec::new()
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff)
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// A shared PCI function.
pub type SharedPci = Arc<Mutex<dyn PciDevice>>;

/// Bus 0: up to 32 slots, function 0 only.
pub struct PciRoot {
    slots: [Option<SharedPci>; 32],
    address: u32,
}

impl PciRoot {
    /// A bus with the host bridge in slot 0.
    pub fn new(q35: bool) -> Self {
        let mut slots: [Option<SharedPci>; 32] = Default::default();
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::new(q35))));
        PciRoot { slots, address: 0 }
    }

    /// Puts `dev` in `slot`; false if taken.
    pub fn insert(&mut self, slot: u8, dev: SharedPci) -> bool {
        let s = &mut self.slots[slot as usize & 31];
        if s.is_some() {
            return false;
        }
        *s = Some(dev);
        true
    }

    /// The lowest free slot.
    pub fn free_slot(&self) -> Option<u8> {
        (1..32u8).find(|s| self.slots[*s as usize].is_none())
    }

    fn selected(&self) -> Option<(&SharedPci, usize)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (self.address >> 16) & 0xff;
        let slot = (self.address >> 11) & 0x1f;
        let func = (self.address >> 8) & 0x7;
        if bus != 0 || func != 0 {
            return None;
        }
        let dev = self.slots[slot as usize].as_ref()?;
        Some((dev, (self.address & 0xfc) as usize))
    }

    /// Dispatches an MMIO read; false if no BAR claims the address.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        for dev in self.slots.iter().flatten() {
            let mut d = lock(dev);
            if let Some((bar, base, _)) = d
                .bars()
                .into_iter()
                .find(|(_, base, size)| addr >= *base && addr - base < *size)
            {
                d.bar_read(bar, addr - base, data);
                return true;
            }
        }
        false
    }

    /// Dispatches an MMIO write; false if no BAR claims the address.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        for dev in self.slots.iter().flatten() {
            let mut d = lock(dev);
            if let Some((bar, base, _)) = d
                .bars()
                .into_iter()
                .find(|(_, base, size)| addr >= *base && addr - base < *size)
            {
                d.bar_write(bar, addr - base, data);
                return true;
            }
        }
        false
    }
}

/// The configuration data window (ports 0xcfc..0xcff), registered apart from the address
/// register at 0xcf8 because port 0xcf9 is the reset control register when accessed as
/// a byte.
pub struct PciData(pub Arc<Mutex<PciRoot>>);

impl PioDevice for PciData {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        lock(&self.0).read(offset + 4, data)
    }
    fn write(&mut self, offset: u16, data: &[u8]) {
        lock(&self.0).write(offset + 4, data)
    }
}

/// Port 0xcf8 (offset 0, the address register) and, through [`PciData`], 0xcfc..0xcff.
impl PioDevice for PciRoot {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        if offset < 4 {
            let bytes = self.address.to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = bytes.get(offset as usize + i).copied().unwrap_or(0xff);
            }
            return;
        }
        match self.selected() {
            Some((dev, reg)) => {
                let off = reg + (offset as usize - 4);
                lock(dev).config_read(off, data)
            }
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                self.address = u32::from_le_bytes(b);
            }
            return;
        }
        if let Some((dev, reg)) = self.selected() {
            let off = reg + (offset as usize - 4);
            lock(dev).config_write(off, data)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_sizing() {
        let mut c = PciConfig::new(0x1af4, 0x1042, 0x01_00_00, 1, (0x1af4, 0x1100));
        c.add_mem_bar(0, 0x8000, 0xc000_0000);
        c.write(reg::BAR0, &[0xff; 4]);
        let mut b = [0u8; 4];
        c.read(reg::BAR0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xffff_8000);
        c.write(reg::BAR0, &0xc001_0000u32.to_le_bytes());
        assert_eq!(c.bar_addr(0), None);
        c.write(reg::COMMAND, &[0x06, 0]);
        assert_eq!(c.bar_addr(0), Some((0xc001_0000, 0x8000)));
    }

    #[test]
    fn config_mechanism_one() {
        let mut root = PciRoot::new(true);
        root.write(0, &0x8000_0000u32.to_le_bytes());
        let mut id = [0u8; 4];
        root.read(4, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x29c0_8086);
        root.write(0, &0x8000_0800u32.to_le_bytes());
        root.read(4, &mut id);
        assert_eq!(id, [0xff; 4]);
    }
}
