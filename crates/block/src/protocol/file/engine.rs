//! Asynchronous submission of file system calls, shared by the two engines
//! ([`super::threads`] and [`super::uring`]).
//!
//! An operation is submitted when it is created and completes an [`IoFuture`]. The
//! operation holds raw pointers into the caller's buffer; the rule that keeps this sound is
//! that an `IoFuture` never lets go of an operation still in flight: dropping it before
//! completion blocks until the worker or the kernel has finished with the buffer. The
//! future borrows the buffer for its whole life (`IoFuture<'a>`), so the buffer outlives
//! every access. (Leaking a pending future with `mem::forget` would break this; nothing
//! in rqemu does, and the type is private to the file protocol.)

use std::future::Future;
use std::marker::PhantomData;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};

/// One system call to run against a file descriptor.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Op {
    /// `preadv(fd, iov, cnt, offset)`.
    Readv {
        iov: *const libc::iovec,
        cnt: usize,
        offset: u64,
    },
    /// `pwritev(fd, iov, cnt, offset)`.
    Writev {
        iov: *const libc::iovec,
        cnt: usize,
        offset: u64,
    },
    /// `fdatasync(fd)`.
    Fdatasync,
    /// `fallocate(fd, mode, offset, len)`.
    Fallocate { mode: i32, offset: u64, len: u64 },
}

// SAFETY: the pointers in an Op are only dereferenced by the engine while the IoFuture that
// borrows the buffer is alive (see the module documentation).
unsafe impl Send for Op {}

impl Op {
    /// Runs the call on the current thread; returns the result or `-errno`.
    pub(crate) fn run_blocking(&self, fd: RawFd) -> isize {
        // SAFETY: for Readv/Writev the iovec array and every buffer it points at are
        // borrowed by the IoFuture for this operation, alive until the operation
        // completes; the other calls take no pointers.
        let ret = unsafe {
            match *self {
                Op::Readv { iov, cnt, offset } => {
                    libc::preadv(fd, iov, cnt as libc::c_int, offset as libc::off_t)
                }
                Op::Writev { iov, cnt, offset } => {
                    libc::pwritev(fd, iov, cnt as libc::c_int, offset as libc::off_t)
                }
                Op::Fdatasync => libc::fdatasync(fd) as isize,
                Op::Fallocate { mode, offset, len } => {
                    libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) as isize
                }
            }
        };
        errno_result(ret)
    }
}

/// A system call's result, or `-errno` after a failure.
pub(crate) fn errno_result(r: isize) -> isize {
    if r < 0 {
        -(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO) as isize)
    } else {
        r
    }
}

enum SlotState {
    Pending(Option<Waker>),
    Done(isize),
}

/// Where an engine reports the result of one operation.
pub(crate) struct Slot {
    state: Mutex<SlotState>,
    done: Condvar,
}

impl Slot {
    pub(crate) fn new() -> Arc<Slot> {
        Arc::new(Slot {
            state: Mutex::new(SlotState::Pending(None)),
            done: Condvar::new(),
        })
    }

    /// Records the result and wakes the waiting future (called once per operation).
    pub(crate) fn complete(&self, result: isize) {
        let waker = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            match std::mem::replace(&mut *state, SlotState::Done(result)) {
                SlotState::Pending(w) => w,
                SlotState::Done(_) => None,
            }
        };
        self.done.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The future of one submitted operation; resolves to the call's result or `-errno`.
pub(crate) struct IoFuture<'a> {
    slot: Arc<Slot>,
    finished: bool,
    _buffer: PhantomData<&'a mut [u8]>,
}

impl<'a> IoFuture<'a> {
    pub(crate) fn new(slot: Arc<Slot>) -> Self {
        IoFuture {
            slot,
            finished: false,
            _buffer: PhantomData,
        }
    }
}

impl Future for IoFuture<'_> {
    type Output = isize;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<isize> {
        let mut state = self.slot.state.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *state {
            SlotState::Done(r) => {
                let r = *r;
                drop(state);
                self.finished = true;
                Poll::Ready(r)
            }
            SlotState::Pending(w) => {
                *w = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for IoFuture<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut state = self.slot.state.lock().unwrap_or_else(|p| p.into_inner());
        while let SlotState::Pending(_) = *state {
            state = self
                .slot
                .done
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// An engine runs operations asynchronously.
pub(crate) trait Engine: Send + Sync {
    /// Starts `op` on `fd`; the returned future resolves when it has finished.
    fn submit<'a>(&self, fd: RawFd, op: Op) -> IoFuture<'a>;
}
