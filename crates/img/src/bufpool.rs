//! The data buffers of the commands that stream an image (convert, commit, rebase, dd,
//! bench): one bounded pool per run, so that a copy holds at most a fixed amount of data
//! whatever the speeds of its source and target, and reuses its buffers instead of
//! allocating (and faulting in) fresh memory for every request.
//!
//! A request asks for a buffer with [`BufPool::get`] and holds it as a [`PoolBuf`];
//! dropping the `PoolBuf` (after the write, or on an error, or when the request is
//! abandoned) gives the buffer back. `get` waits while the buffers handed out would
//! exceed the pool's budget; waiters are served in the order they asked, so a copy loop
//! that asks in request order always lets its oldest request through.
//!
//! Buffers are [`AlignedBuf`]s (aligned for O_DIRECT). A buffer of a few MiB is above
//! glibc's mmap threshold, so allocating one per request costs an mmap, a munmap and a
//! page fault per 4 KiB page touched: the pool allocates each buffer once per run.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rqemu_block::buffer::{AlignedBuf, IO_ALIGN};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Unit in which the budget is counted.
const UNIT: usize = IO_ALIGN;

/// A bounded pool of aligned data buffers (cheap to clone: clones share the pool).
#[derive(Clone)]
pub struct BufPool(Arc<Inner>);

/// What the clones of a pool share.
struct Inner {
    /// Units of buffer capacity that may be handed out at once.
    budget: usize,
    /// Capacity of a new buffer; larger requests get a buffer of their own size.
    buf_size: usize,
    /// Units not handed out.
    units: Arc<Semaphore>,
    /// Buffers given back, ready for reuse.
    free: Mutex<Vec<AlignedBuf>>,
    /// Buffers allocated in the pool's lifetime.
    allocations: AtomicUsize,
    /// Bytes of buffer capacity held (handed out or free).
    held: AtomicUsize,
}

/// A buffer handed out by a [`BufPool`]; it goes back to the pool when dropped.
/// Its contents are unspecified (what the buffer held last, or zeroes).
pub struct PoolBuf {
    /// Always `Some` until dropped.
    buf: Option<AlignedBuf>,
    len: usize,
    pool: Arc<Inner>,
    /// The budget this buffer counts against, given back after the buffer itself.
    _permit: OwnedSemaphorePermit,
}

impl BufPool {
    /// A pool that hands out at most `budget` bytes of buffers at once, in buffers of
    /// `buf_size` bytes (a larger request gets its own size, and a request larger than
    /// the whole budget waits until every other buffer is back).
    pub fn new(budget: usize, buf_size: usize) -> BufPool {
        let buf_size = round_up(buf_size.max(1));
        let budget = (budget.max(buf_size) / UNIT).min(Semaphore::MAX_PERMITS);
        BufPool(Arc::new(Inner {
            budget,
            buf_size,
            units: Arc::new(Semaphore::new(budget)),
            free: Mutex::new(Vec::new()),
            allocations: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
        }))
    }

    /// A buffer of `len` bytes, once the pool's budget allows it.
    pub async fn get(&self, len: usize) -> PoolBuf {
        let inner = &self.0;
        let cap = round_up(len.max(inner.buf_size));
        let units = (cap / UNIT).min(inner.budget);
        // u32: the budget is at most 16 TiB in 4 KiB units.
        let units = u32::try_from(units).unwrap_or(u32::MAX);
        let permit = match inner.units.clone().acquire_many_owned(units).await {
            Ok(p) => p,
            // The semaphore lives as long as the pool and is never closed.
            Err(_) => unreachable!("the pool's semaphore is never closed"),
        };
        let buf = inner.take(cap);
        PoolBuf {
            buf: Some(buf),
            len,
            pool: inner.clone(),
            _permit: permit,
        }
    }

    /// How many buffers the pool has allocated so far.
    pub fn allocations(&self) -> usize {
        self.0.allocations.load(Ordering::Relaxed)
    }

    /// Bytes of buffers the pool holds (handed out or free).
    pub fn held_bytes(&self) -> usize {
        self.0.held.load(Ordering::Relaxed)
    }

    /// Bytes of budget not handed out.
    pub fn available_bytes(&self) -> usize {
        self.0.units.available_permits() * UNIT
    }
}

impl Inner {
    fn free_list(&self) -> MutexGuard<'_, Vec<AlignedBuf>> {
        // A panic while the list was locked leaves a valid list.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer of at least `cap` bytes: the smallest free one that fits, the one given
    /// back last among equals (it is the likeliest to be in the CPU's cache still), or a
    /// new one (dropping free buffers first while the pool would hold more than its
    /// budget).
    fn take(&self, cap: usize) -> AlignedBuf {
        let mut free = self.free_list();
        let fit = free
            .iter()
            .enumerate()
            .rev()
            .filter(|(_, b)| b.len() >= cap)
            .min_by_key(|(_, b)| b.len())
            .map(|(i, _)| i);
        if let Some(i) = fit {
            return free.remove(i);
        }
        let limit = (self.budget * UNIT).max(cap);
        while self.held.load(Ordering::Relaxed) + cap > limit {
            let Some(b) = free.pop() else { break };
            self.held.fetch_sub(b.len(), Ordering::Relaxed);
        }
        self.held.fetch_add(cap, Ordering::Relaxed);
        drop(free);
        self.allocations.fetch_add(1, Ordering::Relaxed);
        AlignedBuf::io(cap)
    }

    /// Keeps a buffer given back for reuse, unless the pool holds more than its budget
    /// (after a request larger than the budget).
    fn give_back(&self, buf: AlignedBuf) {
        let mut free = self.free_list();
        if self.held.load(Ordering::Relaxed) > self.budget * UNIT {
            self.held.fetch_sub(buf.len(), Ordering::Relaxed);
            drop(free);
            drop(buf);
        } else {
            free.push(buf);
        }
    }
}

impl PoolBuf {
    /// Changes the length within the buffer's capacity (`len` is capped to it).
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.buf.as_ref().map_or(0, |b| b.len()));
    }
}

impl std::ops::Deref for PoolBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.buf {
            Some(b) => &b[..self.len],
            None => &[],
        }
    }
}

impl std::ops::DerefMut for PoolBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.buf {
            Some(b) => &mut b[..self.len],
            None => &mut [],
        }
    }
}

impl AsRef<[u8]> for PoolBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        // The buffer goes back before the permit (a field, dropped after this), so the
        // request the permit lets through finds it.
        if let Some(b) = self.buf.take() {
            self.pool.give_back(b);
        }
    }
}

impl std::fmt::Debug for PoolBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PoolBuf({} bytes)", self.len)
    }
}

/// `n` rounded up to whole units.
fn round_up(n: usize) -> usize {
    n.div_ceil(UNIT) * UNIT
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    const MIB: usize = 1 << 20;

    fn get(pool: &BufPool, len: usize) -> PoolBuf {
        pool.get(len)
            .now_or_never()
            .expect("the budget allows this buffer")
    }

    #[test]
    fn buffers_are_reused() {
        let pool = BufPool::new(8 * MIB, 2 * MIB);
        let mut a = get(&pool, 2 * MIB);
        a[0] = 7;
        let at = a.as_ptr();
        drop(a);
        let b = get(&pool, MIB);
        assert_eq!(b.len(), MIB);
        assert_eq!(b.as_ptr(), at, "the buffer given back is handed out again");
        // Among buffers of one size, the one given back last comes out first.
        let c = get(&pool, MIB);
        let (bp, cp) = (b.as_ptr(), c.as_ptr());
        drop(b);
        drop(c);
        assert_eq!(get(&pool, MIB).as_ptr(), cp);
        assert_eq!(get(&pool, MIB).as_ptr(), cp);
        let b = get(&pool, MIB);
        let c = get(&pool, MIB);
        assert_eq!((b.as_ptr(), c.as_ptr()), (cp, bp));
        drop((c, b));
        for _ in 0..100 {
            let x = get(&pool, 2 * MIB);
            let y = get(&pool, 512);
            drop((x, y));
        }
        assert_eq!(pool.allocations(), 2);
        assert_eq!(pool.held_bytes(), 4 * MIB);
        assert_eq!(pool.available_bytes(), 8 * MIB);
    }

    #[test]
    fn buffers_are_aligned() {
        let pool = BufPool::new(MIB, 4096);
        let b = get(&pool, 1000);
        assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
        assert_eq!(b.len(), 1000);
    }

    #[test]
    fn outstanding_buffers_are_bounded() {
        let pool = BufPool::new(4 * MIB, 2 * MIB);
        let a = get(&pool, 2 * MIB);
        let b = get(&pool, 100);
        // The budget is spent: the next request waits...
        let mut waiting = Box::pin(pool.get(MIB));
        assert!((&mut waiting).now_or_never().is_none());
        assert_eq!(pool.available_bytes(), 0);
        // ...until a buffer comes back, and then gets that buffer.
        let at = b.as_ptr();
        drop(b);
        let c = (&mut waiting).now_or_never().expect("a buffer came back");
        assert_eq!(c.as_ptr(), at);
        assert_eq!(pool.allocations(), 2);
        drop((a, c));
        assert_eq!(pool.available_bytes(), 4 * MIB);
    }

    #[test]
    fn waiters_are_served_in_order() {
        let pool = BufPool::new(2 * MIB, MIB);
        let a = get(&pool, MIB);
        let b = get(&pool, MIB);
        let mut big = Box::pin(pool.get(2 * MIB));
        let mut small = Box::pin(pool.get(MIB));
        assert!((&mut big).now_or_never().is_none());
        drop(a);
        // The earlier (larger) request is not overtaken by the later one.
        assert!((&mut small).now_or_never().is_none());
        drop(b);
        let big = (&mut big).now_or_never().expect("both buffers are back");
        assert!((&mut small).now_or_never().is_none());
        drop(big);
        assert!(small.now_or_never().is_some());
    }

    #[test]
    fn a_request_larger_than_the_budget_waits_for_all_others() {
        let pool = BufPool::new(4 * MIB, MIB);
        let a = get(&pool, MIB);
        let mut huge = Box::pin(pool.get(16 * MIB));
        assert!((&mut huge).now_or_never().is_none());
        drop(a);
        let h = huge.now_or_never().expect("nothing else is out");
        assert_eq!(h.len(), 16 * MIB);
        assert_eq!(pool.held_bytes(), 16 * MIB);
        drop(h);
        // The oversized buffer is not kept.
        assert_eq!(pool.held_bytes(), 0);
        assert_eq!(pool.available_bytes(), 4 * MIB);
    }

    #[test]
    fn held_memory_stays_within_the_budget() {
        let pool = BufPool::new(4 * MIB, 4096);
        let small: Vec<_> = (0..4).map(|_| get(&pool, MIB)).collect();
        drop(small);
        assert_eq!(pool.held_bytes(), 4 * MIB);
        // No free buffer fits: free ones are dropped to make room for the new one.
        let big = get(&pool, 3 * MIB);
        assert!(pool.held_bytes() <= 4 * MIB);
        drop(big);
        assert!(pool.held_bytes() <= 4 * MIB);
    }

    #[test]
    fn buffers_come_back_on_errors_and_abandoned_requests() {
        let pool = BufPool::new(2 * MIB, MIB);
        let failing = |pool: BufPool| async move {
            let mut buf = pool.get(MIB).await;
            buf[0] = 1;
            Err::<PoolBuf, &str>("read failed")
        };
        for _ in 0..10 {
            assert!(futures::executor::block_on(failing(pool.clone())).is_err());
        }
        assert_eq!(pool.available_bytes(), 2 * MIB);
        // A request dropped while it waits gives back nothing it did not get.
        let a = get(&pool, 2 * MIB);
        let waiting = Box::pin(pool.get(MIB));
        drop(waiting);
        drop(a);
        assert_eq!(pool.available_bytes(), 2 * MIB);
        // A request dropped after it got its buffer gives it back.
        let task = async {
            let _buf = pool.get(MIB).await;
            futures::future::pending::<()>().await;
        };
        let mut task = Box::pin(task);
        assert!((&mut task).now_or_never().is_none());
        assert_eq!(pool.available_bytes(), MIB);
        drop(task);
        assert_eq!(pool.available_bytes(), 2 * MIB);
        // One buffer for the failing requests, one for the whole budget (the first one
        // dropped to make room for it).
        assert_eq!(pool.allocations(), 2);
        assert!(pool.held_bytes() <= 2 * MIB);
    }

    #[test]
    fn buffers_move_between_threads() {
        let pool = BufPool::new(8 * MIB, MIB);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .expect("runtime");
        rt.block_on(async {
            let tasks: Vec<_> = (0..32)
                .map(|i| {
                    let pool = pool.clone();
                    tokio::spawn(async move {
                        let mut b = pool.get(MIB).await;
                        b.fill(i);
                        tokio::task::yield_now().await;
                        assert!(b.iter().all(|&x| x == i));
                    })
                })
                .collect();
            for t in tasks {
                t.await.expect("task");
            }
        });
        assert!(pool.allocations() <= 8);
        assert_eq!(pool.available_bytes(), 8 * MIB);
    }
}
