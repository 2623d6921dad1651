//! `aio=io_uring` (and `aio=native`): one process-wide io_uring with a reaper thread.
//!
//! Any thread submits under a short lock; the reaper waits for completions and wakes the
//! futures. Each submission carries its [`Slot`] as user data.
//!
//! A submitter also takes whatever completions are ready right after its submission:
//! requests the kernel finishes during the submission itself (O_DIRECT reads from fast
//! devices, page-cache hits) then complete on the submitting thread, without waiting for
//! the reaper to wake and hand them over (one thread switch less per request, as QEMU's
//! event loop does it).

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, OnceLock};

use io_uring::{opcode, types, IoUring};

use super::engine::{Engine, IoFuture, Op, Slot};

const RING_ENTRIES: u32 = 256;

/// The shared ring.
pub(crate) struct Uring {
    ring: IoUring,
    submit_lock: Mutex<()>,
    /// Serialises consumers of the completion queue (the reaper and submitters).
    reap_lock: Mutex<()>,
}

impl Uring {
    /// The process-wide ring, created on first use; the error is the OS's reason.
    pub(crate) fn global() -> Result<&'static Arc<Uring>, i32> {
        static RING: OnceLock<Result<Arc<Uring>, i32>> = OnceLock::new();
        RING.get_or_init(|| {
            let ring =
                IoUring::new(RING_ENTRIES).map_err(|e| e.raw_os_error().unwrap_or(libc::ENOSYS))?;
            let uring = Arc::new(Uring {
                ring,
                submit_lock: Mutex::new(()),
                reap_lock: Mutex::new(()),
            });
            let reaper = uring.clone();
            std::thread::Builder::new()
                .name("rqemu-io-uring".into())
                .spawn(move || reaper.reap())
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EAGAIN))?;
            Ok(uring)
        })
        .as_ref()
        .map_err(|e| *e)
    }

    fn reap(&self) {
        loop {
            match self.ring.submitter().submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(_) => std::thread::yield_now(),
            }
            self.drain();
        }
    }

    /// Completes every request whose completion is in the queue.
    fn drain(&self) {
        let _guard = self.reap_lock.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: reap_lock makes this the only view of the completion queue.
        let cq = unsafe { self.ring.completion_shared() };
        for cqe in cq {
            // SAFETY: user_data was produced by Arc::into_raw in submit and each
            // completion is consumed exactly once (under reap_lock).
            let slot = unsafe { Arc::from_raw(cqe.user_data() as *const Slot) };
            slot.complete(cqe.result() as isize);
        }
    }
}

impl Engine for Arc<Uring> {
    fn submit<'a>(&self, fd: RawFd, op: Op) -> IoFuture<'a> {
        let slot = Slot::new();
        let fd = types::Fd(fd);
        let entry = match op {
            Op::Readv { iov, cnt, offset } => opcode::Readv::new(fd, iov, cnt as u32)
                .offset(offset)
                .build(),
            Op::Writev { iov, cnt, offset } => opcode::Writev::new(fd, iov, cnt as u32)
                .offset(offset)
                .build(),
            Op::Fdatasync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Fallocate { mode, offset, len } => opcode::Fallocate::new(fd, len)
                .offset(offset)
                .mode(mode)
                .build(),
        };
        let entry = entry.user_data(Arc::into_raw(slot.clone()) as u64);
        let guard = self.submit_lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            // SAFETY: submissions are serialised by submit_lock; the entry's buffer stays
            // valid until the IoFuture completes (see engine.rs).
            let pushed = unsafe { self.ring.submission_shared().push(&entry) };
            if pushed.is_ok() {
                break;
            }
            // The queue is full: hand what is queued to the kernel and try again.
            let _ = self.ring.submitter().submit();
            std::thread::yield_now();
        }
        let _ = self.ring.submitter().submit();
        drop(guard);
        self.drain();
        IoFuture::new(slot)
    }
}
