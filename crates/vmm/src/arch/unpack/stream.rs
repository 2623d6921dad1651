//! The decompressed payload as a forward-only stream: the decompressor chosen by the
//! payload's magic bytes (or a cached copy of its output, whose pages are mapped into
//! guest memory rather than copied), the position counted, every byte optionally
//! recorded into a cache entry for the next boot.

use std::fs::File;
use std::io::{BufRead, Read};
use std::os::unix::fs::FileExt;

use rqemu_block::backend::is_zero;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::cache::Entry;
use super::map;

/// Bytes copied to guest memory (or skipped) at a time.
const CHUNK: usize = 1 << 20;
/// Most memory the xz decoder may take (its dictionary: 32 MiB for the kernel's own
/// settings); a payload asking for more is not unpacked here.
const XZ_MEMLIMIT: u64 = 256 << 20;
/// Granularity of the all-zero check.
pub(super) const PAGE: usize = 4096;

/// A forward-only reader of the decompressed payload.
pub(super) struct Stream {
    inner: Source,
    /// Bytes read so far.
    pub pos: u64,
    /// The size the payload states for itself.
    pub total: u64,
    /// Where the bytes read are also written, for the next boot.
    record: Option<Entry>,
}

/// Where the bytes come from.
enum Source {
    /// A decompressor's output.
    Decoder(Box<dyn Read>),
    /// A cache entry: read at the stream's position (never through the file's own
    /// position, which mapping moves), skipped without reading, its pages mapped into
    /// guest memory.
    Cached(File),
}

/// The decompressor for a payload, known by its magic bytes.
pub(super) fn decoder<R: BufRead + 'static>(magic: &[u8], input: R) -> Option<Box<dyn Read>> {
    if magic.starts_with(b"\xfd7zXZ\x00") {
        let stream = xz2::stream::Stream::new_stream_decoder(XZ_MEMLIMIT, 0).ok()?;
        Some(Box::new(xz2::read::XzDecoder::new_stream(input, stream)))
    } else if magic.starts_with(b"\x1f\x8b") {
        Some(Box::new(flate2::read::GzDecoder::new(input)))
    } else if magic.starts_with(b"\x28\xb5\x2f\xfd") {
        Some(Box::new(
            zstd::stream::read::Decoder::with_buffer(input)
                .ok()?
                .single_frame(),
        ))
    } else {
        None
    }
}

impl Stream {
    /// A decompressor's output of `total` bytes, recorded into `record` if given.
    pub fn new(inner: Box<dyn Read>, total: u64, record: Option<Entry>) -> Stream {
        Stream {
            inner: Source::Decoder(inner),
            pos: 0,
            total,
            record,
        }
    }

    /// A cache entry of `total` bytes.
    pub fn cached(file: File, total: u64) -> Stream {
        Stream {
            inner: Source::Cached(file),
            pos: 0,
            total,
            record: None,
        }
    }

    /// Whether the stream is a cache entry (its pages are mapped, not written).
    pub fn is_cached(&self) -> bool {
        matches!(self.inner, Source::Cached(_))
    }

    /// Whether a cache entry is being written from this stream.
    #[cfg(test)]
    pub fn is_recorded(&self) -> bool {
        self.record.is_some()
    }

    /// Reads exactly `buf.len()` bytes (recording them).
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Option<()> {
        match &mut self.inner {
            Source::Decoder(r) => r.read_exact(buf).ok()?,
            Source::Cached(f) => f.read_exact_at(buf, self.pos).ok()?,
        }
        if let Some(entry) = &mut self.record {
            if entry.write(self.pos, buf).is_err() {
                // The cache is a nicety: a full disk only loses it.
                self.record = None;
            }
        }
        self.pos += buf.len() as u64;
        (self.pos <= self.total).then_some(())
    }

    /// Reads and drops bytes up to `offset`.
    pub fn skip_to(&mut self, offset: u64) -> Option<()> {
        let mut left = offset.checked_sub(self.pos)?;
        if offset > self.total {
            return None;
        }
        if let Source::Cached(_) = self.inner {
            self.pos = offset;
            return Some(());
        }
        let mut scratch = vec![0u8; CHUNK.min(left as usize)];
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            self.read_exact(&mut scratch[..n])?;
            left -= n as u64;
        }
        Some(())
    }

    /// Copies `len` bytes of the stream to guest memory at `addr` (fresh memory, no vCPU
    /// running). Pages that are all zeroes are skipped: a page the guest never writes
    /// then never costs the host one. A cache entry's pages are mapped instead
    /// ([`map`]).
    pub fn copy_to(&mut self, mem: &GuestMemoryMmap, addr: u64, len: u64) -> Option<()> {
        if let Source::Cached(f) = &self.inner {
            if self.pos.checked_add(len)? <= self.total
                && map::map_into(f, self.pos, mem, addr, len).is_some()
            {
                self.pos += len;
                return Some(());
            }
        }
        let mut buf = vec![0u8; CHUNK.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            self.read_exact(&mut buf[..n])?;
            let mut at = 0;
            for page in buf[..n].chunks(PAGE) {
                if !is_zero(page) {
                    mem.write_slice(page, GuestAddress(addr + done + at)).ok()?;
                }
                at += page.len() as u64;
            }
            done += n as u64;
        }
        Some(())
    }

    /// The rest of the stream, up to the size it states (what a decoder makes of the
    /// bytes after its stream is not asked for), at most `limit` bytes.
    pub fn read_rest(&mut self, limit: u64) -> Option<Vec<u8>> {
        let n = self.total - self.pos;
        if n > limit {
            return None;
        }
        // Grown as it comes: a truncated stream must not cost the size it claims.
        let mut rest = Vec::new();
        while (rest.len() as u64) < n {
            let at = rest.len();
            let k = (n - at as u64).min(CHUNK as u64) as usize;
            rest.resize(at + k, 0);
            self.read_exact(&mut rest[at..])?;
        }
        Some(rest)
    }

    /// The whole stream has been read and used: its record becomes a cache entry.
    pub fn finish(self) {
        if let Some(entry) = self.record {
            if self.pos == self.total {
                entry.commit(self.total);
            }
        }
    }
}
