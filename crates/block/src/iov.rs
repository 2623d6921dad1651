//! Scatter-gather buffers of vectored requests ([`crate::BlockDriver::readv`] and
//! [`crate::BlockDriver::writev`]): one request over a list of buffers, the first byte of
//! each buffer following the last byte of the one before it on the disk.
//!
//! Helpers here measure vectors, take sub-ranges of them (borrowing the same memory, for
//! a format that maps parts of a request to different places), and copy between a
//! vector and one contiguous buffer (for drivers that serve vectors through a bounce).

/// Largest bounce buffer a vectored request served through a bounce allocates: longer
/// requests go through it in pieces, so a request's size never becomes an allocation's.
pub const BOUNCE_BYTES: usize = 1 << 20;

/// Total bytes of a read vector.
pub fn len_mut(bufs: &[&mut [u8]]) -> usize {
    bufs.iter().map(|b| b.len()).sum()
}

/// Total bytes of a write vector.
pub fn len(bufs: &[&[u8]]) -> usize {
    bufs.iter().map(|b| b.len()).sum()
}

/// The bytes `[start, start + len)` of a read vector, as a vector borrowing them.
/// Ranges past the end are cut short.
pub fn sub_mut<'a>(bufs: &'a mut [&mut [u8]], start: usize, len: usize) -> Vec<&'a mut [u8]> {
    let mut out = Vec::new();
    let mut skip = start;
    let mut left = len;
    for b in bufs.iter_mut() {
        if left == 0 {
            break;
        }
        let b: &'a mut [u8] = b;
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let piece = &mut b[skip..];
        skip = 0;
        let n = piece.len().min(left);
        out.push(&mut piece[..n]);
        left -= n;
    }
    out
}

/// The bytes `[start, start + len)` of a write vector, as a vector borrowing them.
pub fn sub<'a>(bufs: &[&'a [u8]], start: usize, len: usize) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut skip = start;
    let mut left = len;
    for &b in bufs {
        if left == 0 {
            break;
        }
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let piece = &b[skip..];
        skip = 0;
        let n = piece.len().min(left);
        out.push(&piece[..n]);
        left -= n;
    }
    out
}

/// Splits a read vector at byte `at` into two vectors borrowing its halves.
pub fn split_mut<'a>(
    bufs: &'a mut [&mut [u8]],
    mut at: usize,
) -> (Vec<&'a mut [u8]>, Vec<&'a mut [u8]>) {
    let mut left = Vec::new();
    let mut right = Vec::new();
    for b in bufs.iter_mut() {
        let b: &'a mut [u8] = b;
        if at >= b.len() {
            at -= b.len();
            left.push(b);
        } else if at > 0 {
            let (l, r) = b.split_at_mut(at);
            at = 0;
            left.push(l);
            right.push(r);
        } else {
            right.push(b);
        }
    }
    (left, right)
}

/// Copies `src` to the front of the vector (as much as fits).
pub fn scatter(bufs: &mut [&mut [u8]], mut src: &[u8]) {
    for b in bufs.iter_mut() {
        if src.is_empty() {
            break;
        }
        let n = b.len().min(src.len());
        b[..n].copy_from_slice(&src[..n]);
        src = &src[n..];
    }
}

/// Copies the vector's bytes to the front of `dst` (as much as fits).
pub fn gather(bufs: &[&[u8]], mut dst: &mut [u8]) {
    for b in bufs {
        if dst.is_empty() {
            break;
        }
        let n = b.len().min(dst.len());
        let (head, rest) = dst.split_at_mut(n);
        head.copy_from_slice(&b[..n]);
        dst = rest;
    }
}

/// Fills the whole vector with `byte`.
pub fn fill(bufs: &mut [&mut [u8]], byte: u8) {
    for b in bufs.iter_mut() {
        b.fill(byte);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_ranges_and_copies() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 5];
        let mut c = [0u8; 2];
        let mut v: Vec<&mut [u8]> = vec![&mut a, &mut b, &mut c];
        assert_eq!(len_mut(&v), 10);
        scatter(&mut v, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        {
            let mut s = sub_mut(&mut v, 2, 5);
            assert_eq!(s.len(), 2);
            assert_eq!(&*s[0], &[3]);
            assert_eq!(&*s[1], &[4, 5, 6, 7]);
            fill(&mut s, 0);
        }
        let r: Vec<&[u8]> = v.iter().map(|b| &**b).collect();
        let mut out = [0u8; 10];
        gather(&r, &mut out);
        assert_eq!(out, [1, 2, 0, 0, 0, 0, 0, 8, 9, 10]);
        let s = sub(&r, 7, 10);
        assert_eq!(len(&s), 3);
        assert_eq!(s[0], &[8]);
        assert_eq!(s[1], &[9, 10]);
        assert!(sub(&r, 10, 4).is_empty());
        let (l, r) = split_mut(&mut v, 4);
        assert_eq!((len_mut(&l), len_mut(&r)), (4, 6));
        assert_eq!((l.len(), r.len()), (2, 2));
    }
}
