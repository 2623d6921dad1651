//! Scatter-gather buffers of vectored requests ([`crate::BlockDriver::readv`] and
//! [`crate::BlockDriver::writev`]): one request over a list of buffers, the first byte of
//! each buffer following the last byte of the one before it on the disk.
//!
//! # Raw buffer descriptors
//!
//! The buffers of a vectored request are raw descriptors, a pointer and a length:
//! [`IoBufMut`] for memory a read fills, [`IoBuf`] for memory a write takes its data
//! from. They are `Copy` and never turn into Rust slices, because the memory they
//! describe need not follow Rust's aliasing rules: a virtual machine's memory, which the
//! guest (or another request over the same pages) may change at any moment. Their
//! contract:
//!
//! - the memory stays allocated and mapped for the descriptor's lifetime `'a` and for
//!   as long as any request carrying the descriptor runs;
//! - others may read or change it concurrently; what a racing writer gets is
//!   unspecified data, never undefined behaviour of this process;
//! - the block layer only ever accesses it by copying through raw pointers
//!   ([`IoBuf::copy_to`], [`IoBufMut::copy_from`], [`IoBufMut::fill`]) or by handing it
//!   to the kernel as an iovec (`preadv`, `pwritev`, io_uring);
//! - a driver that needs to look at or transform the bytes (encryption, compression,
//!   zero detection, alignment bounces) copies them into a private buffer first and
//!   works there.
//!
//! Descriptors over Rust memory come from [`IoBuf::new`] and [`IoBufMut::new`], which
//! borrow the slice for `'a`; descriptors over other memory from the `unsafe`
//! constructors, whose callers promise the contract above.
//!
//! Helpers here measure vectors, take sub-ranges of them (describing the same memory,
//! for a format that maps parts of a request to different places), and copy between a
//! vector and one contiguous private buffer (for drivers that serve vectors through a
//! bounce).

use std::marker::PhantomData;

/// Largest bounce buffer a vectored request served through a bounce allocates: longer
/// requests go through it in pieces, so a request's size never becomes an allocation's.
pub const BOUNCE_BYTES: usize = 1 << 20;

/// A readable raw buffer: where a write takes its data from (see the module
/// documentation for the contract).
#[derive(Debug, Clone, Copy)]
pub struct IoBuf<'a> {
    ptr: *const u8,
    len: usize,
    _mem: PhantomData<&'a [u8]>,
}

/// A writable raw buffer: what a read fills (see the module documentation for the
/// contract).
#[derive(Debug, Clone, Copy)]
pub struct IoBufMut<'a> {
    ptr: *mut u8,
    len: usize,
    _mem: PhantomData<&'a mut [u8]>,
}

// SAFETY: a descriptor is an address and a length; the memory behind it is only reached
// by copies through raw pointers or by the kernel, which the contract allows from any
// thread and concurrently with other users of the memory.
unsafe impl Send for IoBuf<'_> {}
// SAFETY: as for Send: shared descriptors only copy out of the memory.
unsafe impl Sync for IoBuf<'_> {}
// SAFETY: as for IoBuf; writers racing on the same memory leave unspecified bytes there,
// which the contract allows.
unsafe impl Send for IoBufMut<'_> {}
// SAFETY: as for Send.
unsafe impl Sync for IoBufMut<'_> {}

impl<'a> IoBuf<'a> {
    /// Describes `buf`, borrowed for the descriptor's life.
    pub fn new(buf: &'a [u8]) -> IoBuf<'a> {
        IoBuf {
            ptr: buf.as_ptr(),
            len: buf.len(),
            _mem: PhantomData,
        }
    }

    /// Describes `len` bytes at `ptr`.
    ///
    /// # Safety
    ///
    /// For `'a`, and for as long as any request carrying the descriptor (or a copy or
    /// sub-range of it) runs, the `len` bytes at `ptr` must stay allocated and readable,
    /// and no Rust `&mut` reference may cover them. Concurrent changes by others (a
    /// guest, the kernel, other requests) are allowed.
    pub unsafe fn from_raw(ptr: *const u8, len: usize) -> IoBuf<'a> {
        IoBuf {
            ptr,
            len,
            _mem: PhantomData,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first byte's address (for the kernel, or for alignment checks).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }

    /// The bytes `[start, start + len)` of the buffer.
    ///
    /// # Panics
    ///
    /// If the range is not inside the buffer.
    pub fn range(self, start: usize, len: usize) -> IoBuf<'a> {
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.len),
            "IoBuf range out of bounds"
        );
        IoBuf {
            // The range is inside the buffer: the pointer stays inside its allocation.
            ptr: self.ptr.wrapping_add(start),
            len,
            _mem: PhantomData,
        }
    }

    /// Copies `dst.len()` bytes from offset `at` of the buffer into `dst`.
    ///
    /// # Panics
    ///
    /// If the range is not inside the buffer.
    pub fn copy_to(self, at: usize, dst: &mut [u8]) {
        let src = self.range(at, dst.len());
        // SAFETY: the range is inside the buffer, which the contract keeps readable; `dst`
        // is private Rust memory, which no descriptor may cover while it is borrowed
        // mutably, so the two do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.ptr, dst.as_mut_ptr(), dst.len()) };
    }
}

impl<'a> IoBufMut<'a> {
    /// Describes `buf`, borrowed exclusively for the descriptor's life.
    pub fn new(buf: &'a mut [u8]) -> IoBufMut<'a> {
        IoBufMut {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _mem: PhantomData,
        }
    }

    /// Describes `len` bytes at `ptr`.
    ///
    /// # Safety
    ///
    /// For `'a`, and for as long as any request carrying the descriptor (or a copy or
    /// sub-range of it) runs, the `len` bytes at `ptr` must stay allocated and writable,
    /// and no Rust reference may cover them. Concurrent reads and changes by others (a
    /// guest, the kernel, other requests) are allowed.
    pub unsafe fn from_raw(ptr: *mut u8, len: usize) -> IoBufMut<'a> {
        IoBufMut {
            ptr,
            len,
            _mem: PhantomData,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first byte's address (for the kernel, or for alignment checks).
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The same memory as a readable descriptor.
    pub fn readable(self) -> IoBuf<'a> {
        IoBuf {
            ptr: self.ptr,
            len: self.len,
            _mem: PhantomData,
        }
    }

    /// The bytes `[start, start + len)` of the buffer.
    ///
    /// # Panics
    ///
    /// If the range is not inside the buffer.
    pub fn range(self, start: usize, len: usize) -> IoBufMut<'a> {
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.len),
            "IoBufMut range out of bounds"
        );
        IoBufMut {
            ptr: self.ptr.wrapping_add(start),
            len,
            _mem: PhantomData,
        }
    }

    /// Copies `src` into the buffer at offset `at`.
    ///
    /// # Panics
    ///
    /// If the range is not inside the buffer.
    pub fn copy_from(self, at: usize, src: &[u8]) {
        let dst = self.range(at, src.len());
        // SAFETY: the range is inside the buffer, which the contract keeps writable and
        // free of Rust references; `src` is Rust memory, so the two do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.ptr, src.len()) };
    }

    /// Sets every byte of the buffer to `byte`.
    pub fn fill(self, byte: u8) {
        // SAFETY: the whole buffer is writable and free of Rust references by contract.
        unsafe { std::ptr::write_bytes(self.ptr, byte, self.len) };
    }
}

/// One buffer of a vector, readable or writable: what measuring and cutting vectors
/// needs.
pub trait IoPiece: Copy {
    /// Length in bytes.
    fn piece_len(&self) -> usize;
    /// The first byte's address.
    fn addr(&self) -> usize;
    /// The bytes `[start, start + len)`, inside the buffer.
    fn piece(self, start: usize, len: usize) -> Self;
}

impl IoPiece for IoBuf<'_> {
    fn piece_len(&self) -> usize {
        self.len
    }
    fn addr(&self) -> usize {
        self.ptr as usize
    }
    fn piece(self, start: usize, len: usize) -> Self {
        self.range(start, len)
    }
}

impl IoPiece for IoBufMut<'_> {
    fn piece_len(&self) -> usize {
        self.len
    }
    fn addr(&self) -> usize {
        self.ptr as usize
    }
    fn piece(self, start: usize, len: usize) -> Self {
        self.range(start, len)
    }
}

/// Total bytes of a vector.
pub fn len<B: IoPiece>(bufs: &[B]) -> usize {
    bufs.iter().map(|b| b.piece_len()).sum()
}

/// The bytes `[start, start + len)` of a vector, as a vector describing them. Ranges
/// past the end are cut short.
pub fn sub<B: IoPiece>(bufs: &[B], start: usize, len: usize) -> Vec<B> {
    let mut out = Vec::new();
    let mut skip = start;
    let mut left = len;
    for &b in bufs {
        if left == 0 {
            break;
        }
        let blen = b.piece_len();
        if skip >= blen {
            skip -= blen;
            continue;
        }
        let n = (blen - skip).min(left);
        out.push(b.piece(skip, n));
        skip = 0;
        left -= n;
    }
    out
}

/// Splits a vector at byte `at` into two vectors describing its halves.
pub fn split<B: IoPiece>(bufs: &[B], mut at: usize) -> (Vec<B>, Vec<B>) {
    let mut left = Vec::new();
    let mut right = Vec::new();
    for &b in bufs {
        let blen = b.piece_len();
        if at >= blen {
            at -= blen;
            left.push(b);
        } else if at > 0 {
            left.push(b.piece(0, at));
            right.push(b.piece(at, blen - at));
            at = 0;
        } else {
            right.push(b);
        }
    }
    (left, right)
}

/// Copies `src` to the front of the vector (as much as fits).
pub fn scatter(bufs: &[IoBufMut<'_>], mut src: &[u8]) {
    for b in bufs {
        if src.is_empty() {
            break;
        }
        let n = b.len().min(src.len());
        b.copy_from(0, &src[..n]);
        src = &src[n..];
    }
}

/// Copies the vector's bytes to the front of `dst` (as much as fits).
pub fn gather(bufs: &[IoBuf<'_>], mut dst: &mut [u8]) {
    for b in bufs {
        if dst.is_empty() {
            break;
        }
        let n = b.len().min(dst.len());
        let (head, rest) = dst.split_at_mut(n);
        b.copy_to(0, head);
        dst = rest;
    }
}

/// Fills the whole vector with `byte`.
pub fn fill(bufs: &[IoBufMut<'_>], byte: u8) {
    for b in bufs {
        b.fill(byte);
    }
}

/// Whether every byte of the vector is zero, judged on private copies (a few KiB at a
/// time, stopping at the first non-zero piece).
pub fn is_zero(bufs: &[IoBuf<'_>]) -> bool {
    let mut tmp = [0u8; 4096];
    for b in bufs {
        let mut at = 0;
        while at < b.len() {
            let n = (b.len() - at).min(tmp.len());
            b.copy_to(at, &mut tmp[..n]);
            if !crate::backend::is_zero(&tmp[..n]) {
                return false;
            }
            at += n;
        }
    }
    true
}

/// Readable descriptors of the same memory as `bufs`.
pub fn readable<'a>(bufs: &[IoBufMut<'a>]) -> Vec<IoBuf<'a>> {
    bufs.iter().map(|b| b.readable()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_ranges_and_copies() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 5];
        let mut c = [0u8; 2];
        let v = [
            IoBufMut::new(&mut a),
            IoBufMut::new(&mut b),
            IoBufMut::new(&mut c),
        ];
        assert_eq!(len(&v), 10);
        scatter(&v, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        {
            let s = sub(&v, 2, 5);
            assert_eq!(s.len(), 2);
            assert_eq!((s[0].len(), s[1].len()), (1, 4));
            fill(&s, 0);
        }
        let r = readable(&v);
        let mut out = [0u8; 10];
        gather(&r, &mut out);
        assert_eq!(out, [1, 2, 0, 0, 0, 0, 0, 8, 9, 10]);
        let s = sub(&r, 7, 10);
        assert_eq!(len(&s), 3);
        let mut got = [0u8; 3];
        gather(&s, &mut got);
        assert_eq!(got, [8, 9, 10]);
        assert!(sub(&r, 10, 4).is_empty());
        let (l, r) = split(&v, 4);
        assert_eq!((len(&l), len(&r)), (4, 6));
        assert_eq!((l.len(), r.len()), (2, 2));
        assert!(!is_zero(&readable(&v)));
        fill(&v, 0);
        assert!(is_zero(&readable(&v)));
        assert_eq!((a, b, c), ([0; 3], [0; 5], [0; 2]));
    }

    /// Descriptors over memory no Rust slice covers: an anonymous mapping.
    #[test]
    fn raw_memory_round_trip() {
        let m = crate::test_util::Mapping::new(8192);
        let buf = m.buf(0, 8192);
        let v = [buf.range(0, 100), buf.range(4096, 4096)];
        scatter(&v, &[7u8; 4196]);
        let mut out = vec![0u8; 4196];
        gather(&readable(&v), &mut out);
        assert!(out.iter().all(|&x| x == 7));
        assert_eq!(m.copy(100, 8), [0; 8]);
    }
}
