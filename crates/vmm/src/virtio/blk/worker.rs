//! Serving one virtio-blk queue on an I/O thread.
//!
//! The task waits for the queue's kick eventfd, pops every available chain (with
//! notifications suppressed while it drains), and runs the requests concurrently, each
//! as one vectored block-layer request over its guest buffers. Each
//! completion writes the status byte and a used-ring entry; the guest is interrupted once
//! per batch of completions, when the ring's event index asks for it.
//!
//! A malformed chain never stops the queue: the request completes with an error status,
//! or with nothing written when the chain has no room for a status byte. The chain
//! iterator bounds chain length (loops end after the queue size) and refuses descriptor
//! tables outside guest memory.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use rqemu_block::iov::{IoBuf, IoBufMut};
use tokio::io::unix::AsyncFd;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::request::{self, Desc, Kind, Refusal, Request, Segment, S_IOERR, S_OK};
use super::Disk;
use crate::virtio::{ActiveQueue, Interrupt};

/// Most descriptors taken from one chain (the chain iterator also stops at the queue size).
const MAX_CHAIN: usize = 1024;

/// A raw block-layer buffer descriptor made over guest memory ([`IoBuf`] for a write's
/// data, [`IoBufMut`] for a read's).
trait GuestBuf<'a>: Copy {
    /// Describes `len` bytes of guest memory at host address `ptr`.
    ///
    /// # Safety
    ///
    /// The range must lie inside guest memory that stays mapped for `'a`, as
    /// [`IoBufMut::from_raw`] requires.
    unsafe fn from_guest(ptr: *mut u8, len: usize) -> Self;
}

impl<'a> GuestBuf<'a> for IoBuf<'a> {
    unsafe fn from_guest(ptr: *mut u8, len: usize) -> Self {
        // SAFETY: the caller keeps from_raw's contract.
        unsafe { IoBuf::from_raw(ptr, len) }
    }
}

impl<'a> GuestBuf<'a> for IoBufMut<'a> {
    unsafe fn from_guest(ptr: *mut u8, len: usize) -> Self {
        // SAFETY: the caller keeps from_raw's contract.
        unsafe { IoBufMut::from_raw(ptr, len) }
    }
}

/// The request's guest buffers as raw block-layer descriptors, with segments that
/// continue each other in guest memory (inside one region) merged: one descriptor for a
/// buffer that is contiguous in the guest. The runs of one request go to the backend as
/// one vectored request, straight into or out of guest memory. No Rust reference to
/// guest memory is made: the guest may change it at any time, and the block layer only
/// copies through the descriptors or hands them to the kernel (the contract of
/// `rqemu_block::iov`).
fn guest_runs<'a, B: GuestBuf<'a>>(mem: &'a GuestMemoryMmap, segs: &[Segment]) -> Option<Vec<B>> {
    let mut runs: Vec<B> = Vec::with_capacity(segs.len());
    // Guest address and length of the last run.
    let mut last: Option<(u64, usize)> = None;
    for seg in segs {
        if seg.len == 0 {
            continue;
        }
        let len = seg.len as usize;
        if let Some((start, n)) = last {
            // One range of one region (get_slice never spans regions): one descriptor.
            let merged = (start.checked_add(n as u64) == Some(seg.addr.0))
                .then(|| mem.get_slice(GuestAddress(start), n + len).ok())
                .flatten();
            if let (Some(vs), Some(run)) = (merged, runs.last_mut()) {
                // SAFETY: `get_slice` checked that the merged range lies inside one mapped
                // region of `mem`, which stays mapped while `mem` is borrowed for 'a; the
                // VMM makes no Rust reference into guest memory.
                *run = unsafe { B::from_guest(vs.ptr_guard_mut().as_ptr(), n + len) };
                last = Some((start, n + len));
                continue;
            }
        }
        let vs = mem.get_slice(seg.addr, len).ok()?;
        // SAFETY: `get_slice` checked that the whole range lies inside one mapped region
        // of `mem`, which stays mapped while `mem` is borrowed for 'a; the VMM makes no
        // Rust reference into guest memory (vm-memory's accessors are volatile copies).
        runs.push(unsafe { B::from_guest(vs.ptr_guard_mut().as_ptr(), len) });
        last = Some((seg.addr.0, len));
    }
    Some(runs)
}

/// Runs a parsed request; returns the status byte.
pub async fn run(disk: &Disk, req: &Request, mem: &GuestMemoryMmap) -> u8 {
    if let Some(t) = &disk.throttle {
        let write = matches!(req.kind, Kind::Write { .. });
        t.wait(write, req.data_len).await;
    }
    let result: Result<(), ()> = async {
        match req.kind {
            Kind::Read { offset } => {
                let runs: Vec<IoBufMut> = guest_runs(mem, &req.data).ok_or(())?;
                disk.backend.readv(offset, &runs).await.map_err(|_| ())?;
            }
            Kind::Write { offset } => {
                let fua = !disk.wce.load(Ordering::Relaxed);
                let runs: Vec<IoBuf> = guest_runs(mem, &req.data).ok_or(())?;
                disk.backend
                    .writev(offset, &runs, fua)
                    .await
                    .map_err(|_| ())?;
            }
            Kind::Flush => disk.backend.flush().await.map_err(|_| ())?,
            Kind::GetId => {
                let mut left = &disk.id[..];
                for seg in &req.data {
                    let n = left.len().min(seg.len as usize);
                    mem.write_slice(&left[..n], seg.addr).map_err(|_| ())?;
                    left = &left[n..];
                }
            }
            Kind::Discard { offset, len } => {
                if disk.backend.is_read_only() {
                    return Err(());
                }
                disk.backend.discard(offset, len).await.map_err(|_| ())?
            }
            Kind::WriteZeroes { offset, len, unmap } => disk
                .backend
                .write_zeroes(offset, len, unmap)
                .await
                .map_err(|_| ())?,
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => S_OK,
        Err(()) if disk.ignore_errors => S_OK,
        Err(()) => S_IOERR,
    }
}

/// Parses and runs one chain; returns (head, bytes written to guest buffers).
pub async fn execute(
    head: u16,
    descs: Vec<Desc>,
    mem: Arc<GuestMemoryMmap>,
    disk: Arc<Disk>,
) -> (u16, u32) {
    let req = match request::parse(&descs, &mem, disk.capacity) {
        Ok(r) => r,
        Err(Refusal::NoStatus) => return (head, 0),
        Err(Refusal::Status { status, code }) => {
            let _ = mem.write_obj(code, status);
            return (head, 1);
        }
    };
    let code = run(&disk, &req, &mem).await;
    let _ = mem.write_obj(code, req.status);
    let written = match req.kind {
        Kind::Read { .. } | Kind::GetId if code == S_OK => {
            req.data_len.min(u64::from(u32::MAX - 1)) as u32 + 1
        }
        _ => 1,
    };
    (head, written)
}

/// Takes every available chain off the queue.
///
/// A ring whose available index runs more than a queue's length ahead yields nothing
/// while still looking non-empty; such a ring is left alone until the guest fixes it
/// (or resets the device) rather than spun on.
pub fn pop_all(queue: &mut Queue, mem: &GuestMemoryMmap) -> Vec<(u16, Vec<Desc>)> {
    let mut out = Vec::new();
    loop {
        let _ = queue.disable_notification(mem);
        let before = out.len();
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs = chain
                .take(MAX_CHAIN)
                .map(|d| Desc {
                    addr: d.addr().0,
                    len: d.len(),
                    write: d.is_write_only(),
                })
                .collect();
            out.push((head, descs));
        }
        match queue.enable_notification(mem) {
            Ok(true) if out.len() > before => continue,
            _ => break,
        }
    }
    out
}

/// Serves `q` until the task is dropped.
pub async fn serve(
    q: ActiveQueue,
    mem: Arc<GuestMemoryMmap>,
    disk: Arc<Disk>,
    irq: Arc<dyn Interrupt>,
) {
    let ActiveQueue {
        mut queue,
        kick,
        vector,
    } = q;
    // SAFETY: the EventFd owns its descriptor and keeps it open, unchanged, until it is
    // dropped, which happens only when the AsyncFd owning it is dropped.
    let Ok(kick) =
        (unsafe { AsyncFd::register_with_interest(kick, tokio::io::Interest::READABLE) })
    else {
        return;
    };
    let mut inflight = FuturesUnordered::new();
    loop {
        for (head, descs) in pop_all(&mut queue, &mem) {
            inflight.push(execute(head, descs, mem.clone(), disk.clone()));
        }
        tokio::select! {
            ready = kick.readable() => {
                let Ok(mut guard) = ready else { return };
                let _ = guard.get_inner().read();
                guard.clear_ready();
            }
            Some((head, len)) = inflight.next(), if !inflight.is_empty() => {
                let _ = queue.add_used(&*mem, head, len);
                while let Some(Some((head, len))) = inflight.next().now_or_never() {
                    let _ = queue.add_used(&*mem, head, len);
                }
                if queue.needs_notification(&*mem).unwrap_or(true) {
                    irq.notify(vector);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Segments that continue each other in guest memory become one descriptor, others
    /// stay apart; data copied through the descriptors lands where the guest put its
    /// buffers; a segment outside memory refuses the request.
    #[test]
    fn guest_runs_merge_contiguous_segments() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let seg = |addr, len| Segment {
            addr: GuestAddress(addr),
            len,
        };
        let segs = [
            seg(0x1000, 0x200),
            seg(0x1200, 0x600),
            seg(0x3000, 0x100),
            seg(0x3100, 0),
        ];
        let runs: Vec<IoBufMut> = guest_runs(&mem, &segs).unwrap();
        assert_eq!(
            runs.iter().map(|r| r.len()).collect::<Vec<_>>(),
            [0x800, 0x100]
        );
        let data: Vec<u8> = (0..0x900).map(|i| (i % 253) as u8).collect();
        rqemu_block::iov::scatter(&runs, &data);
        let mut back = vec![0u8; 0x800];
        mem.read_slice(&mut back, GuestAddress(0x1000)).unwrap();
        assert!(back[..] == data[..0x800]);
        let mut back = vec![0u8; 0x100];
        mem.read_slice(&mut back, GuestAddress(0x3000)).unwrap();
        assert!(back[..] == data[0x800..]);
        let bad = [seg(0x1000, 0x200), seg(0xff00, 0x200)];
        assert!(guest_runs::<IoBuf>(&mem, &bad).is_none());
    }
}
