//! Asynchronous submission of file system calls, shared by the two engines
//! ([`super::threads`] and [`super::uring`]).
//!
//! An operation is submitted when it is created and completes an [`IoFuture`]. A read or
//! write operation holds raw pointers: to an iovec array and, through it, to the
//! request's buffers. Nothing in the types ties those to the future, so submitting is
//! `unsafe` ([`Engine::submit`]): the caller promises that the array and the buffers stay
//! valid until the future has completed or been dropped. Dropping an `IoFuture` whose
//! operation is still in flight does not cancel it: the drop blocks until the worker or
//! the kernel has finished with the buffers, so ending a request early (a dropped
//! request future) never leaves the kernel writing into memory that has been handed
//! back. What would break the promise is leaking a pending future (`mem::forget`, or a
//! leaked future that owns it) while its buffers are reused; nothing in rqemu does, and
//! the type is private to the file protocol.

use std::future::Future;
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

// SAFETY: the pointers in an Op are only dereferenced by the engine while the operation
// is in flight, which the submitter keeps the memory valid for (Engine::submit's
// contract), from whichever thread runs it.
unsafe impl Send for Op {}

impl Op {
    /// Runs the call on the current thread; returns the result or `-errno`.
    ///
    /// # Safety
    ///
    /// For `Readv`/`Writev`, the iovec array and every buffer it describes must be valid
    /// for the call (for a read: writable, and reachable through no Rust reference), as
    /// [`Engine::submit`] requires.
    pub(crate) unsafe fn run_blocking(&self, fd: RawFd) -> isize {
        // SAFETY: for Readv/Writev the iovec array and every buffer it points at are
        // valid until the operation completes (this function's contract); the other
        // calls take no pointers.
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
/// Dropped before completion, it waits for the operation to finish (see the module
/// documentation).
pub(crate) struct IoFuture {
    slot: Arc<Slot>,
    finished: bool,
}

impl IoFuture {
    pub(crate) fn new(slot: Arc<Slot>) -> Self {
        IoFuture {
            slot,
            finished: false,
        }
    }
}

impl Future for IoFuture {
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

impl Drop for IoFuture {
    /// Blocks until an operation still in flight has finished with its buffers.
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
    ///
    /// # Safety
    ///
    /// For `Op::Readv`/`Op::Writev`: the iovec array and every buffer it describes must
    /// stay allocated until the returned future has completed or been dropped (its drop
    /// waits for the operation), and must not be accessed through Rust references
    /// meanwhile (for a write's buffers, shared reads are fine); buffers are only
    /// changed by others as the raw buffer contract of [`crate::iov`] allows. The
    /// future must not be leaked while the operation is in flight. `Fdatasync` and
    /// `Fallocate` carry no pointers and have no requirement.
    unsafe fn submit(&self, fd: RawFd, op: Op) -> IoFuture;
}
