//! Pages of a cached kernel mapped into guest memory instead of copied.
//!
//! A cache entry ([`super::cache`]) holds the kernel exactly as it lies in guest memory,
//! page for page. Mapping its pages copy-on-write (`MAP_PRIVATE`) over fresh guest memory
//! gives the guest the same bytes, but a page the guest never touches (debug and unwind
//! tables, drivers that never run) is never made resident, and a page it only reads is
//! the host's page-cache page, shared with every other VM of that kernel. Pages the
//! relocation or the guest writes become private copies, as a copied page would be.
//!
//! Only the entry's data is mapped: its holes (pages of zeroes) stay fresh anonymous
//! memory. Where the file offset and the guest address are not congruent modulo the page
//! size, or the mapping fails, the caller copies instead.
//!
//! Entries are never changed in place (a new one is written under a temporary name and
//! renamed; old ones are only unlinked), so what is mapped stays what was checked. (What
//! a mapping cannot do is report a read error of the cache's file system late: a page
//! that cannot be read when first touched faults its reader. The cache is meant for a
//! local directory.)

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use rqemu_block::protocol::file::seek;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::stream::PAGE;

/// Makes `len` bytes of guest memory at `addr` read as `file` does from `offset`: pages
/// mapped, partial pages at the ends copied. `None` if the range is not in one region of
/// `mem` or not page-congruent with the file, or a read fails: the caller then copies the
/// range (what was mapped already holds what the copy writes). The memory must be fresh
/// (never written) and no vCPU may run yet.
pub(super) fn map_into(
    file: &File,
    offset: u64,
    mem: &GuestMemoryMmap,
    addr: u64,
    len: u64,
) -> Option<()> {
    let page = PAGE as u64;
    if len == 0 || offset % page != addr % page {
        return None;
    }
    let slice = mem
        .get_slice(GuestAddress(addr), usize::try_from(len).ok()?)
        .ok()?;
    let host = slice.ptr_guard_mut().as_ptr() as usize;
    let head = ((page - addr % page) % page).min(len);
    let tail = (len - head) % page;
    copy(file, offset, mem, addr, head)?;
    copy(file, offset + len - tail, mem, addr + len - tail, tail)?;
    let (start, end) = (offset + head, offset + len - tail);
    let mut at = start;
    while at < end {
        let Some((data, hole)) = next_data(file, at, end) else {
            break;
        };
        let n = hole - data;
        let to = host + (data - offset) as usize;
        // SAFETY: [to, to + n) lies inside the guest memory region that `get_slice` found
        // for [addr, addr + len) (data and hole are clamped to that range, page-aligned as
        // start and end are), a mapping owned by `mem` that outlives this call. Replacing
        // its pages with a private mapping of the file changes only their contents, as a
        // copy would: no Rust reference into guest memory exists (vm-memory goes through
        // raw volatile accesses), and no vCPU runs yet.
        let p = unsafe {
            libc::mmap(
                to as *mut libc::c_void,
                n as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                data as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            copy(file, data, mem, addr + (data - offset), n)?;
        }
        at = hole;
    }
    Some(())
}

/// The next run of data in `[at, end)` as page-aligned `(start, end)`, from
/// `SEEK_DATA`/`SEEK_HOLE`; the whole rest where the file system cannot tell.
fn next_data(file: &File, at: u64, end: u64) -> Option<(u64, u64)> {
    let fd = file.as_raw_fd();
    let page = PAGE as u64;
    let data = match seek(fd, at, libc::SEEK_DATA) {
        Ok(d) => (d / page * page).max(at),
        Err(libc::ENXIO) => return None,
        Err(_) => return Some((at, end)),
    };
    if data >= end {
        return None;
    }
    let hole = seek(fd, data, libc::SEEK_HOLE).map_or(end, |h| h.div_ceil(page) * page);
    Some((data, hole.clamp(data + page, end)))
}

/// Copies `len` bytes of `file` at `offset` to guest memory at `addr`.
fn copy(file: &File, offset: u64, mem: &GuestMemoryMmap, addr: u64, len: u64) -> Option<()> {
    let mut buf = vec![0u8; PAGE];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(PAGE as u64) as usize;
        file.read_exact_at(&mut buf[..n], offset + done).ok()?;
        mem.write_slice(&buf[..n], GuestAddress(addr + done)).ok()?;
        done += n as u64;
    }
    Some(())
}

/// Makes the page of guest memory at `addr` present and writable, as a write to it would
/// (a private copy of a mapped page), without reading it first: a read fault on a file
/// mapping also maps the pages around it ("fault-around"), which would make resident
/// pages the guest may never touch. Best effort (older kernels lack the advice).
pub(super) fn prefault_write(mem: &GuestMemoryMmap, addr: u64) {
    let page = addr / PAGE as u64 * PAGE as u64;
    if let Ok(slice) = mem.get_slice(GuestAddress(page), PAGE) {
        let p = slice.ptr_guard_mut().as_ptr();
        // SAFETY: madvise on one page of guest memory that `get_slice` found mapped; the
        // advice only faults the page in (as a write would), it changes no contents.
        unsafe { libc::madvise(p.cast(), PAGE, libc::MADV_POPULATE_WRITE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sparse file mapped at an unaligned, congruent address reads back as the file,
    /// its holes as zeroes; writes to guest memory stay private; an incongruent range
    /// is refused untouched.
    #[test]
    fn maps_what_the_file_holds() {
        let path = std::env::temp_dir().join(format!("rqemu-map-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        let pattern = |i: usize| (i * 7 + 3) as u8;
        let mut content = vec![0u8; 12 * PAGE];
        for page in [0, 1, 2, 5, 6, 10] {
            let range = page * PAGE..(page + 1) * PAGE;
            for (i, b) in content[range.clone()].iter_mut().enumerate() {
                *b = pattern(range.start + i);
            }
            file.write_all_at(
                &content[page * PAGE..(page + 1) * PAGE],
                (page * PAGE) as u64,
            )
            .unwrap();
        }
        file.set_len(content.len() as u64).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (offset, len) = (PAGE as u64 + 100, 10 * PAGE as u64);
        let addr = 0x10_0000 - 0x8_0000 + offset;
        map_into(&file, offset, &mem, addr, len).unwrap();
        let mut back = vec![0u8; len as usize];
        mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
        assert!(back == content[offset as usize..(offset + len) as usize]);
        let mut around = [1u8; 100];
        mem.read_slice(&mut around, GuestAddress(addr - 100))
            .unwrap();
        assert_eq!(around, [0u8; 100]);
        mem.write_slice(&[0xee; 64], GuestAddress(addr + PAGE as u64))
            .unwrap();
        let mut still = [0u8; 64];
        file.read_exact_at(&mut still, offset + PAGE as u64)
            .unwrap();
        assert!(still
            .iter()
            .enumerate()
            .all(|(i, b)| *b == content[offset as usize + PAGE + i]));
        assert!(map_into(&file, 1, &mem, 0, PAGE as u64).is_none());
        let mut first = [1u8; 16];
        mem.read_slice(&mut first, GuestAddress(0)).unwrap();
        assert_eq!(first, [0u8; 16]);
    }
}
