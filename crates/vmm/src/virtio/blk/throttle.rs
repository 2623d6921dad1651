//! I/O limits (`throttling.bps-*`, `throttling.iops-*` and the legacy `bps`/`iops` names):
//! each limit is a schedule that hands out time slots; a request waits for the latest slot
//! among the limits that apply to it.

use std::time::{Duration, Instant};

use crate::config::Throttle;

#[derive(Default)]
struct Slots {
    next: [Option<Instant>; 6],
}

/// Limits of one disk.
pub struct Throttler {
    limits: Throttle,
    slots: std::sync::Mutex<Slots>,
}

impl Throttler {
    /// A throttler enforcing `limits`.
    pub fn new(limits: Throttle) -> Self {
        Throttler {
            limits,
            slots: std::sync::Mutex::new(Slots::default()),
        }
    }

    /// When a request of `bytes` (a write if `write`) may start.
    pub fn admit(&self, write: bool, bytes: u64) -> Instant {
        let l = &self.limits;
        let (bps_dir, iops_dir) = if write {
            (l.bps_write, l.iops_write)
        } else {
            (l.bps_read, l.iops_read)
        };
        let costs = [
            (0, l.bps_total, bytes),
            (if write { 2 } else { 1 }, bps_dir, bytes),
            (3, l.iops_total, 1),
            (if write { 5 } else { 4 }, iops_dir, 1),
        ];
        let now = Instant::now();
        let mut s = crate::devices::bus::lock(&self.slots);
        let mut start = now;
        for (idx, limit, units) in costs {
            if limit == 0 {
                continue;
            }
            let slot = s.next[idx].map_or(now, |n| n.max(now));
            let cost = Duration::from_secs_f64(units as f64 / limit as f64);
            s.next[idx] = Some(slot + cost);
            start = start.max(slot);
        }
        start
    }

    /// Waits for a slot.
    pub async fn wait(&self, write: bool, bytes: u64) {
        let at = self.admit(write, bytes);
        if at > Instant::now() {
            tokio::time::sleep_until(at.into()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iops_limit_spaces_requests() {
        let t = Throttler::new(Throttle {
            iops_total: 10,
            ..Throttle::default()
        });
        let first = t.admit(false, 4096);
        let mut last = first;
        for _ in 0..10 {
            last = t.admit(true, 4096);
        }
        let gap = last.duration_since(first);
        assert!(
            gap >= Duration::from_millis(990) && gap <= Duration::from_millis(1010),
            "{gap:?}"
        );
    }

    #[test]
    fn bps_limit_by_direction() {
        let t = Throttler::new(Throttle {
            bps_write: 1 << 20,
            ..Throttle::default()
        });
        let a = t.admit(false, 1 << 20);
        let b = t.admit(false, 1 << 20);
        assert!(b.duration_since(a) < Duration::from_millis(5));
        let w1 = t.admit(true, 1 << 20);
        let w2 = t.admit(true, 1 << 20);
        assert!(w2.duration_since(w1) >= Duration::from_millis(999));
    }
}
