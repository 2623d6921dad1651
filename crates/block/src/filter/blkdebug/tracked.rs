//! Requests in flight on a blkdebug node, and the waiting QEMU's block layer does for
//! requests that must not overlap: a read-modify-write request (one padded to the
//! node's alignment) is *serialising* over its padded range; it waits for every
//! overlapping request, and every request waits for overlapping serialising ones.

use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Debug, Clone, Copy)]
struct Req {
    id: u64,
    start: u64,
    end: u64,
    serialising: bool,
    /// Waiting for another request (nobody waits for a waiting request, which keeps
    /// two requests from waiting for each other).
    waiting: bool,
}

/// The requests in flight.
#[derive(Default)]
pub struct Tracker {
    reqs: Mutex<Vec<Req>>,
    next: Mutex<u64>,
    changed: Notify,
}

/// A request registered with a [`Tracker`]; it leaves the list when dropped.
pub struct Tracked<'a> {
    tracker: &'a Tracker,
    id: u64,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Req>> {
        self.reqs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a request over `[start, end)`.
    pub fn begin(&self, start: u64, end: u64) -> Tracked<'_> {
        let id = {
            let mut n = self.next.lock().unwrap_or_else(|e| e.into_inner());
            *n += 1;
            *n
        };
        self.lock().push(Req {
            id,
            start,
            end,
            serialising: false,
            waiting: false,
        });
        Tracked { tracker: self, id }
    }

    /// Whether request `id` must wait, noting the answer in it.
    fn conflict(&self, id: u64) -> bool {
        let mut reqs = self.lock();
        let Some(me) = reqs.iter().find(|r| r.id == id).copied() else {
            return false;
        };
        let wait = reqs.iter().any(|r| {
            r.id != me.id
                && (r.serialising || me.serialising)
                && !r.waiting
                && r.start < me.end
                && me.start < r.end
        });
        if let Some(r) = reqs.iter_mut().find(|r| r.id == id) {
            r.waiting = wait;
        }
        wait
    }
}

impl Tracked<'_> {
    /// Makes the request serialising over `[start, end)` (its range widened to the
    /// alignment) and waits for the requests it overlaps.
    pub async fn serialise(&self, start: u64, end: u64) {
        {
            let mut reqs = self.tracker.lock();
            if let Some(r) = reqs.iter_mut().find(|r| r.id == self.id) {
                r.start = r.start.min(start);
                r.end = r.end.max(end);
                r.serialising = true;
            }
        }
        self.wait().await;
    }

    /// Waits until no earlier overlapping request it must wait for is in flight.
    pub async fn wait(&self) {
        loop {
            let notified = self.tracker.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.tracker.conflict(self.id) {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        self.tracker.lock().retain(|r| r.id != self.id);
        self.tracker.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serialising_requests_wait_for_overlaps() {
        let t = Tracker::default();
        let a = t.begin(0, 512);
        let b = t.begin(1024, 2048);
        // Plain requests do not wait for each other.
        a.wait().await;
        let c = t.begin(0, 512);
        c.wait().await;
        drop(c);
        let d = t.begin(256, 512);
        let fut = d.serialise(0, 4096);
        tokio::pin!(fut);
        assert!(futures::poll!(fut.as_mut()).is_pending());
        drop(a);
        assert!(futures::poll!(fut.as_mut()).is_pending());
        drop(b);
        fut.await;
    }
}
