//! `aio=io_uring` (and `aio=native`): one process-wide io_uring with a reaper thread.
//!
//! Any thread submits under a short lock; the reaper waits for completions and wakes the
//! futures. Each submission carries its [`Slot`] as user data.
//!
//! A submitter also takes whatever completions are ready right after its submission:
//! requests the kernel finishes during the submission itself (O_DIRECT reads from fast
//! devices, page-cache hits) then complete on the submitting thread, without waiting for
//! the reaper to wake and hand them over (one thread switch less per request, as QEMU's
//! event loop does it). The reaper waits in the kernel only while some request is still
//! in flight there; when every request completed during its submission it stays parked,
//! so completions taken by their submitters do not wake it as well.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;

use io_uring::{opcode, types, IoUring};

use super::engine::{Engine, IoFuture, Op, Slot};

const RING_ENTRIES: u32 = 256;

/// The shared ring.
pub(crate) struct Uring {
    ring: IoUring,
    submit_lock: Mutex<()>,
    /// Serialises consumers of the completion queue (the reaper and submitters).
    reap_lock: Mutex<()>,
    /// Requests submitted whose completion has not been taken yet.
    in_flight: AtomicUsize,
    /// The reaper thread, unparked when a request is left in flight.
    reaper: OnceLock<Thread>,
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
                in_flight: AtomicUsize::new(0),
                reaper: OnceLock::new(),
            });
            let reaper = uring.clone();
            let handle = std::thread::Builder::new()
                .name("rqemu-io-uring".into())
                .spawn(move || reaper.reap())
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EAGAIN))?;
            let _ = uring.reaper.set(handle.thread().clone());
            Ok(uring)
        })
        .as_ref()
        .map_err(|e| *e)
    }

    fn reap(&self) {
        loop {
            // Nothing left in the kernel: sleep until a submitter leaves a request there
            // (an unpark that came first makes this return at once).
            if self.in_flight.load(Ordering::Acquire) == 0 {
                std::thread::park();
                continue;
            }
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
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Engine for Arc<Uring> {
    unsafe fn submit(&self, fd: RawFd, op: Op) -> IoFuture {
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
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = self.submit_lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            // SAFETY: submissions are serialised by submit_lock; the entry's iovec array
            // and buffers stay valid until the IoFuture completes or its drop has waited
            // for the completion (this function's contract, see engine.rs).
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
        if self.in_flight.load(Ordering::Acquire) > 0 {
            if let Some(reaper) = self.reaper.get() {
                reaper.unpark();
            }
        }
        IoFuture::new(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::super::vectored::iovec;
    use super::*;

    /// A read from an empty pipe cannot complete during its submission: only the reaper,
    /// parked while nothing was in flight, can complete it once data arrives.
    #[test]
    fn reaper_completes_what_submission_left_in_flight() {
        let Ok(ring) = Uring::global() else {
            crate::testing::skip("no io_uring here");
            return;
        };
        // Inline completions first, with time for the reaper to see them and park with
        // nothing in flight (one waiting in the kernel is woken by the next completion).
        let file = std::fs::File::open("/proc/self/exe").expect("own executable");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let mut byte = [0u8; 1];
        for _ in 0..3 {
            let iov = iovec(byte.as_mut_ptr(), 1);
            let op = Op::Readv {
                iov: &iov,
                cnt: 1,
                offset: 0,
            };
            // SAFETY: `iov` and `byte` live until the future, awaited here, completes.
            let fut = unsafe { ring.submit(fd, op) };
            assert_eq!(futures::executor::block_on(fut), 1);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }

        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // Leaked, so that a reaper which never completes the read fails the test by the
        // timeout below instead of leaving the kernel a buffer on a dead stack frame.
        let buf: &'static mut [u8; 4] = Box::leak(Box::new([0u8; 4]));
        let iov: &'static libc::iovec = Box::leak(Box::new(iovec(buf.as_mut_ptr(), buf.len())));
        let op = Op::Readv {
            iov,
            cnt: 1,
            offset: u64::MAX, // -1: the pipe's current position
        };
        // SAFETY: the iovec and its buffer are leaked, so valid for ever; the test only
        // looks at the buffer after the read has completed.
        let pending: IoFuture = unsafe { ring.submit(fds[0], op) };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(futures::executor::block_on(pending)));
        std::thread::sleep(std::time::Duration::from_millis(50));
        // SAFETY: fds[1] is the pipe's open write end; the data is 4 bytes long.
        let written = unsafe { libc::write(fds[1], b"pipe".as_ptr().cast(), 4) };
        assert_eq!(written, 4);
        let got = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(got, Ok(4), "the read left in flight never completed");
        assert_eq!(buf, b"pipe");
        // SAFETY: both descriptors are open and owned by this test.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }
}
