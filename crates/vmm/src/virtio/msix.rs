//! MSI-X: the vector table and pending-bit array in a BAR, the function's enable and mask
//! bits, and delivery of vectors with `KVM_SIGNAL_MSI`. A masked vector sets its pending
//! bit and is delivered when unmasked.

use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;

use super::Interrupt;
use crate::devices::bus::lock;

/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;

/// Where vectors are delivered.
pub trait MsiSink: Send + Sync {
    /// Delivers one message.
    fn signal(&self, addr: u64, data: u32);
}

impl MsiSink for VmFd {
    fn signal(&self, addr: u64, data: u32) {
        let msi = kvm_msi {
            address_lo: addr as u32,
            address_hi: (addr >> 32) as u32,
            data,
            ..Default::default()
        };
        // A failed delivery (the VM being torn down) is not the guest's concern.
        let _ = self.signal_msi(msi);
    }
}

struct State {
    table: Vec<[u32; 4]>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
}

/// The MSI-X state of one function.
pub struct Msix {
    sink: Arc<dyn MsiSink>,
    state: Mutex<State>,
}

impl Msix {
    /// `vectors` entries, all masked, MSI-X disabled.
    pub fn new(vectors: u16, sink: Arc<dyn MsiSink>) -> Self {
        Msix {
            sink,
            state: Mutex::new(State {
                table: vec![[0, 0, 0, 1]; usize::from(vectors)],
                pending: vec![false; usize::from(vectors)],
                enabled: false,
                function_masked: false,
            }),
        }
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        lock(&self.state).table.len()
    }

    /// Whether there are no vectors.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn deliver(&self, s: &State, v: usize) {
        let e = s.table[v];
        self.sink
            .signal(u64::from(e[0]) | (u64::from(e[1]) << 32), e[2]);
    }

    fn flush_pending(&self, s: &mut State) {
        if !s.enabled || s.function_masked {
            return;
        }
        for v in 0..s.table.len() {
            if s.pending[v] && s.table[v][3] & 1 == 0 {
                s.pending[v] = false;
                self.deliver(s, v);
            }
        }
    }

    /// The message-control bits changed (enable, function mask).
    pub fn set_control(&self, enabled: bool, function_masked: bool) {
        let mut s = lock(&self.state);
        s.enabled = enabled;
        s.function_masked = function_masked;
        self.flush_pending(&mut s);
    }

    /// A read inside the table.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        let s = lock(&self.state);
        for (i, b) in data.iter_mut().enumerate() {
            let o = offset + i as u64;
            let (idx, word, byte) = ((o / 16) as usize, ((o % 16) / 4) as usize, (o % 4) as usize);
            *b = s
                .table
                .get(idx)
                .map(|e| e[word].to_le_bytes()[byte])
                .unwrap_or(0);
        }
    }

    /// A write inside the table.
    pub fn table_write(&self, offset: u64, data: &[u8]) {
        let mut s = lock(&self.state);
        for (i, b) in data.iter().enumerate() {
            let o = offset + i as u64;
            let (idx, word, byte) = ((o / 16) as usize, ((o % 16) / 4) as usize, (o % 4) as usize);
            if let Some(e) = s.table.get_mut(idx) {
                let mut w = e[word].to_le_bytes();
                w[byte] = *b;
                e[word] = u32::from_le_bytes(w);
            }
        }
        self.flush_pending(&mut s);
    }

    /// A read inside the pending-bit array.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        let s = lock(&self.state);
        for (i, b) in data.iter_mut().enumerate() {
            let first = ((offset + i as u64) * 8) as usize;
            *b = (0..8).fold(0u8, |acc, bit| {
                acc | (u8::from(s.pending.get(first + bit).copied().unwrap_or(false)) << bit)
            });
        }
    }
}

impl Interrupt for Msix {
    fn notify(&self, vector: u16) {
        let mut s = lock(&self.state);
        let v = usize::from(vector);
        if v >= s.table.len() || !s.enabled {
            return;
        }
        if s.function_masked || s.table[v][3] & 1 != 0 {
            s.pending[v] = true;
            return;
        }
        self.deliver(&s, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Count(AtomicU32);
    impl MsiSink for Count {
        fn signal(&self, _addr: u64, data: u32) {
            self.0.fetch_add(data, Ordering::SeqCst);
        }
    }

    #[test]
    fn masked_vectors_pend() {
        let sink = Arc::new(Count(AtomicU32::new(0)));
        let m = Msix::new(2, sink.clone());
        m.set_control(true, false);
        m.notify(1);
        assert_eq!(sink.0.load(Ordering::SeqCst), 0);
        let mut pba = [0u8];
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 2);
        m.table_write(16, &0xfee0_0000u32.to_le_bytes());
        m.table_write(24, &5u32.to_le_bytes());
        m.table_write(28, &0u32.to_le_bytes());
        assert_eq!(sink.0.load(Ordering::SeqCst), 5);
        m.notify(1);
        assert_eq!(sink.0.load(Ordering::SeqCst), 10);
        m.notify(7);
        assert_eq!(sink.0.load(Ordering::SeqCst), 10);
    }
}
