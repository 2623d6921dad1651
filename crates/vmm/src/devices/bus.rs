//! Port-I/O dispatch and machine control.
//!
//! Devices register fixed port ranges; a vCPU exit is sent to the device owning the port,
//! with the offset inside its range. Unclaimed reads return all ones, as on real hardware.
//! [`Control`] carries a device's request to end or reset the machine to the main thread.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// A device on the port bus.
pub trait PioDevice: Send {
    /// Reads `data.len()` bytes at `offset` inside the device's range.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Writes `data` at `offset` inside the device's range.
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// A shared device.
pub type SharedPio = Arc<Mutex<dyn PioDevice>>;

/// The port bus: ranges sorted by base port.
#[derive(Default)]
pub struct PioBus {
    ranges: Vec<(u16, u16, SharedPio)>,
}

impl PioBus {
    /// Adds a device at `base..base+len`.
    pub fn insert(&mut self, base: u16, len: u16, dev: SharedPio) {
        self.ranges.push((base, len, dev));
        self.ranges.sort_by_key(|r| r.0);
    }

    fn find(&self, port: u16) -> Option<(u16, &SharedPio)> {
        let i = self.ranges.partition_point(|r| r.0 <= port);
        let (base, len, dev) = self.ranges.get(i.checked_sub(1)?)?;
        (u32::from(port) < u32::from(*base) + u32::from(*len)).then_some((port - base, dev))
    }

    /// Dispatches a read; unclaimed ports read as all ones.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some((off, dev)) => lock(dev).read(off, data),
            None => data.fill(0xff),
        }
    }

    /// Dispatches a write; unclaimed ports ignore it.
    pub fn write(&self, port: u16, data: &[u8]) {
        if let Some((off, dev)) = self.find(port) {
            lock(dev).write(off, data);
        }
    }
}

/// Locks a mutex, recovering the data if a holder panicked.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why the machine stops running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest reset the machine (keyboard controller, 0xcf9, triple fault).
    Reset,
    /// The user asked to quit (Ctrl-a x, a signal).
    Quit(String),
    /// An unrecoverable vCPU error.
    Error(String),
}

/// Shared between the main thread, vCPUs and devices: the first stop request wins.
#[derive(Default)]
pub struct Control {
    reason: Mutex<Option<StopReason>>,
    cond: Condvar,
    stopping: std::sync::atomic::AtomicBool,
}

impl Control {
    /// A new control block.
    pub fn new() -> Arc<Control> {
        Arc::new(Control::default())
    }

    /// Asks the machine to stop; later requests are ignored.
    pub fn request(&self, reason: StopReason) {
        let mut r = lock(&self.reason);
        if r.is_none() {
            *r = Some(reason);
            self.stopping
                .store(true, std::sync::atomic::Ordering::SeqCst);
            self.cond.notify_all();
        }
    }

    /// Whether a stop was requested.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits up to `timeout` for a stop request.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<StopReason> {
        let r = lock(&self.reason);
        let (r, _) = self
            .cond
            .wait_timeout_while(r, timeout, |r| r.is_none())
            .unwrap_or_else(|e| e.into_inner());
        r.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl PioDevice for Echo {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u16, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatch_by_range() {
        let mut bus = PioBus::default();
        bus.insert(0x70, 2, Arc::new(Mutex::new(Echo(1))));
        bus.insert(0x3f8, 8, Arc::new(Mutex::new(Echo(10))));
        let mut b = [0u8];
        bus.read(0x71, &mut b);
        assert_eq!(b[0], 2);
        bus.read(0x72, &mut b);
        assert_eq!(b[0], 0xff);
        bus.read(0x3ff, &mut b);
        assert_eq!(b[0], 17);
        bus.read(0, &mut b);
        assert_eq!(b[0], 0xff);
    }
}
