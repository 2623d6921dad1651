//! qemu-img's `-r` rate limit: writes are held back so that they average at most the
//! given number of bytes per second.

use std::time::{Duration, Instant};

/// Keeps writes at or under `-r` bytes per second.
pub struct RateLimiter {
    rate: u64,
    start: Instant,
    bytes: u64,
}

impl RateLimiter {
    /// A limiter for `rate` bytes per second (0: no limit).
    pub fn new(rate: u64) -> Self {
        RateLimiter {
            rate,
            start: Instant::now(),
            bytes: 0,
        }
    }

    /// Waits until `bytes` more may be written.
    pub async fn wait(&mut self, bytes: u64) {
        Self::sleep_until(self.due(bytes)).await;
    }

    /// Counts `bytes` more as written and says when they may be (None: at once).
    pub fn due(&mut self, bytes: u64) -> Option<Instant> {
        if self.rate == 0 {
            return None;
        }
        let due = self.start + Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
        self.bytes += bytes;
        Some(due)
    }

    /// Sleeps until `due` (None: not at all).
    pub async fn sleep_until(due: Option<Instant>) {
        if let Some(due) = due {
            tokio::time::sleep_until(due.into()).await;
        }
    }
}
