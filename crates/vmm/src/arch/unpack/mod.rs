//! A bzImage unpacked by the VMM instead of by its own decompressor.
//!
//! A bzImage carries the kernel as a compressed ELF (`vmlinux.bin`) followed by its
//! relocation table. Booted the usual way, the guest holds the compressed image, copies
//! it to the end of its decompression buffer, decompresses, moves the segments into
//! place and relocates them: for a distribution kernel some 35 MiB more guest memory
//! touched than the kernel itself needs, and the decompression runs in the guest.
//!
//! Here the payload (xz, gzip or zstd) is streamed once, straight into place: each
//! loadable segment is written at its physical address plus a 2 MiB-aligned offset, and
//! the relocation table that follows the ELF is applied in guest memory for a virtual
//! offset. Both offsets are chosen at random unless the command line says `nokaslr`, as
//! the kernel's decompressor chooses them, and `KASLR_FLAG` tells the kernel so. The
//! kernel is then entered at its own 64-bit entry point with the zero page.
//!
//! - `stream`: the decompressed payload as a forward-only stream.
//! - [`cache`]: decompressed payloads kept for the next boot of the same kernel file.
//! - `map`: a cached payload's pages mapped into guest memory instead of copied.
//!
//! What this does not recognise (an older boot protocol, another compressor, an ELF laid
//! out otherwise, a malformed relocation table) is left to [`super::boot`], which loads
//! the whole bzImage and lets it decompress itself.
//!
//! Written here rather than taken from linux-loader: its ELF loader reads from a seekable
//! file and hides the segment table, and relocation needs both the table and a single
//! forward pass over a decompressing stream.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::setup_header;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

pub mod cache;
mod map;
mod stream;

use cache::Cache;
use stream::{Stream, PAGE};

/// Offset of the setup header in a bzImage.
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// "HdrS".
const HDR_MAGIC: u32 = 0x5372_6448;
/// First boot protocol with `payload_offset`/`payload_length`.
const PROTOCOL_WITH_PAYLOAD: u16 = 0x0208;
/// Alignment the kernel's early start-up requires of its physical offset.
const PMD_SIZE: u64 = 2 << 20;
/// Virtual span the x86-64 kernel image may be placed in with KASLR (KERNEL_IMAGE_SIZE).
const KERNEL_IMAGE_SIZE: u64 = 1 << 30;
/// Largest decompressed kernel taken (the payload states its own size).
const MAX_UNPACKED: u64 = 1 << 30;
/// Largest relocation table taken.
const MAX_RELOCS: u64 = 16 << 20;

const PT_LOAD: u32 = 1;
const EM_X86_64: u16 = 62;

/// A bzImage whose payload is being streamed: its setup header and ELF layout.
pub struct Unpacking {
    /// The setup header, for the zero page.
    pub header: setup_header,
    stream: Stream,
    /// Loadable segments in file order.
    segments: Vec<Segment>,
    /// Lowest physical address of a segment (the kernel's LOAD_PHYSICAL_ADDR).
    load_phys: u64,
    /// Virtual minus physical address of the kernel's text (`__START_KERNEL_map`).
    kernel_map: u64,
    /// Bytes from `load_phys` to the end of the last segment in memory.
    footprint: u64,
    /// Where the ELF's own bytes end in the stream (the relocation table follows).
    elf_end: u64,
    entry: u64,
}

#[derive(Clone, Copy)]
struct Segment {
    offset: u64,
    paddr: u64,
    filesz: u64,
}

/// Where the unpacked kernel went.
pub struct Placed {
    /// Physical address of the 64-bit entry point.
    pub entry: u64,
    /// End of the kernel's memory (its bss included).
    pub end: u64,
    /// Whether the kernel was placed at random, relocation table and all (the zero
    /// page's `KASLR_FLAG`).
    pub kaslr: bool,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

impl Unpacking {
    /// Takes the open kernel file `file` as a bzImage this module can unpack; `None` if
    /// it is not one. The user's kernel cache ([`cache`]) is used when there is one.
    /// (The file's position is left anywhere.)
    pub fn open(file: &File) -> Option<Unpacking> {
        Self::open_cached(file, Cache::from_env().as_ref())
    }

    /// As [`Unpacking::open`], with the kernel cache `cache`.
    pub fn open_cached(file: &File, cache: Option<&Cache>) -> Option<Unpacking> {
        let key = cache::key(&file.metadata().ok()?);
        Self::from_parts(file.try_clone().ok()?, cache.map(|c| (c, key.as_str())))
    }

    /// As [`Unpacking::open`], from any seekable source of the image's bytes (no cache).
    pub fn from_source<R: Read + Seek + 'static>(file: R) -> Option<Unpacking> {
        Self::from_parts(file, None)
    }

    fn from_parts<R: Read + Seek + 'static>(
        mut file: R,
        cache: Option<(&Cache, &str)>,
    ) -> Option<Unpacking> {
        let file_len = file.seek(SeekFrom::End(0)).ok()?;
        file.rewind().ok()?;
        let mut head = [0u8; 0x270];
        file.read_exact(&mut head).ok()?;
        let mut header = setup_header::default();
        let size = std::mem::size_of::<setup_header>();
        header
            .as_mut_slice()
            .copy_from_slice(head.get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + size)?);
        let (magic, version) = (header.header, header.version);
        if magic != HDR_MAGIC || version < PROTOCOL_WITH_PAYLOAD || header.loadflags & 1 == 0 {
            return None;
        }
        let setup_sects = match header.setup_sects {
            0 => 4,
            n => u64::from(n),
        };
        let payload = (setup_sects + 1) * 512 + u64::from(header.payload_offset);
        let payload_len = u64::from(header.payload_length);
        if payload_len < 8 || payload.checked_add(payload_len)? > file_len {
            return None;
        }
        // The payload ends with its decompressed size (32-bit, little-endian).
        let mut size = [0u8; 4];
        file.seek(SeekFrom::Start(payload + payload_len - 4)).ok()?;
        file.read_exact(&mut size).ok()?;
        let total = u64::from(u32::from_le_bytes(size));
        if total > MAX_UNPACKED {
            return None;
        }
        let mut magic = [0u8; 6];
        file.seek(SeekFrom::Start(payload)).ok()?;
        file.read_exact(&mut magic).ok()?;
        file.seek(SeekFrom::Start(payload)).ok()?;
        if let Some(hit) = cache.and_then(|(c, key)| c.lookup(key, total)) {
            let cached = Stream::cached(hit, total);
            if let Some(u) = Self::read_elf(header, cached) {
                return Some(u);
            }
        }
        let input = BufReader::with_capacity(1 << 16, file.take(payload_len));
        let record = cache.and_then(|(c, key)| c.entry(key));
        let stream = Stream::new(stream::decoder(&magic, input)?, total, record);
        Self::read_elf(header, stream)
    }

    /// Reads the ELF and program headers at the start of the stream.
    fn read_elf(header: setup_header, mut stream: Stream) -> Option<Unpacking> {
        let mut eh = [0u8; 64];
        stream.read_exact(&mut eh)?;
        if &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 || u16_at(&eh, 0x12) != EM_X86_64 {
            return None;
        }
        let entry = u64_at(&eh, 0x18);
        let phoff = u64_at(&eh, 0x20);
        let shoff = u64_at(&eh, 0x28);
        let (phentsize, phnum) = (u16_at(&eh, 0x36), u16_at(&eh, 0x38));
        let (shentsize, shnum) = (u16_at(&eh, 0x3a), u16_at(&eh, 0x3c));
        if phentsize != 56 || phnum == 0 || phnum > 64 {
            return None;
        }
        stream.skip_to(phoff)?;
        let mut ph = vec![0u8; 56 * usize::from(phnum)];
        stream.read_exact(&mut ph)?;
        let mut segments = Vec::new();
        let mut kernel_map = None;
        let (mut load_phys, mut mem_end) = (u64::MAX, 0u64);
        let mut elf_end = stream.pos;
        for p in ph.chunks_exact(56) {
            if u32_at(p, 0) != PT_LOAD {
                continue;
            }
            let (offset, vaddr, paddr) = (u64_at(p, 8), u64_at(p, 16), u64_at(p, 24));
            let (filesz, memsz) = (u64_at(p, 32), u64_at(p, 40));
            if filesz > memsz || offset.checked_add(filesz)? > stream.total {
                return None;
            }
            if paddr < load_phys {
                load_phys = paddr;
                kernel_map = vaddr.checked_sub(paddr);
            }
            mem_end = mem_end.max(paddr.checked_add(memsz)?);
            elf_end = elf_end.max(offset + filesz);
            if filesz > 0 {
                segments.push(Segment {
                    offset,
                    paddr,
                    filesz,
                });
            }
        }
        segments.sort_by_key(|s| s.offset);
        // One forward pass: segments must not overlap in the file.
        let mut at = stream.pos;
        for s in &segments {
            if s.offset < at {
                return None;
            }
            at = s.offset + s.filesz;
        }
        let sh_end = shoff.checked_add(u64::from(shentsize) * u64::from(shnum))?;
        elf_end = elf_end.max(sh_end);
        if segments.is_empty()
            || !load_phys.is_multiple_of(PMD_SIZE)
            || elf_end > stream.total
            || mem_end - load_phys > KERNEL_IMAGE_SIZE
        {
            return None;
        }
        Some(Unpacking {
            header,
            stream,
            segments,
            load_phys,
            kernel_map: kernel_map?,
            footprint: mem_end - load_phys,
            elf_end,
            entry,
        })
    }

    /// The kernel's default physical address (where it goes without KASLR).
    pub fn default_phys(&self) -> u64 {
        self.load_phys
    }

    /// Memory the kernel needs from its physical start: its segments, or the setup
    /// header's `init_size` when that is larger.
    pub fn size(&self) -> u64 {
        self.footprint.max(u64::from(self.header.init_size))
    }

    /// Streams the kernel into `mem` (fresh guest memory: pages of zeroes are not
    /// written) at a physical address in `[default_phys, limit)`, relocated; random
    /// offsets unless `kaslr` is false (or the kernel cannot move). `None` if the stream
    /// turns out malformed or the kernel does not fit.
    pub fn load(mut self, mem: &GuestMemoryMmap, limit: u64, kaslr: bool) -> Option<Placed> {
        let kaslr = kaslr && self.header.relocatable_kernel != 0;
        let size = self.size();
        let align = u64::from(self.header.kernel_alignment).max(PMD_SIZE);
        if !align.is_power_of_two() || self.load_phys.checked_add(size)? > limit {
            return None;
        }
        let phys = if kaslr {
            let slots = (limit - self.load_phys - size) / align + 1;
            self.load_phys + random() % slots * align
        } else {
            self.load_phys
        };
        // The virtual offset moves the kernel within its 1 GiB window (as the
        // decompressor's find_random_virt_addr): delta is what relocation adds.
        let delta = if kaslr && KERNEL_IMAGE_SIZE > self.load_phys + size {
            let slots = (KERNEL_IMAGE_SIZE - self.load_phys - size) / PMD_SIZE + 1;
            random() % slots * PMD_SIZE
        } else {
            0
        };
        let shift = phys - self.load_phys;
        for s in self.segments.clone() {
            self.stream.skip_to(s.offset)?;
            self.stream.copy_to(mem, s.paddr + shift, s.filesz)?;
        }
        self.stream.skip_to(self.elf_end)?;
        let relocs = self.stream.read_rest(MAX_RELOCS)?;
        if delta != 0 && !relocs.is_empty() {
            self.relocate(mem, phys, &relocs, delta)?;
        }
        self.stream.finish();
        let entry = if self.entry >= self.kernel_map {
            self.entry - self.kernel_map
        } else {
            self.entry
        };
        Some(Placed {
            entry: entry.checked_sub(self.load_phys)? + phys,
            end: phys + self.footprint,
            kaslr: kaslr && !relocs.is_empty(),
        })
    }

    /// Applies the relocation table (read backwards from its end: 32-bit entries, a
    /// zero, inverse 32-bit entries, a zero, 64-bit entries, a zero; each the kernel
    /// virtual address of a place to adjust, sign-extended from 32 bits) for a virtual
    /// shift of `delta`, to the kernel at `phys`, as the kernel's decompressor walks it.
    /// `None` for an entry outside the kernel or a table without its three ends (the
    /// caller then leaves the bzImage to decompress itself).
    fn relocate(&self, mem: &GuestMemoryMmap, phys: u64, table: &[u8], delta: u64) -> Option<()> {
        if !table.len().is_multiple_of(4) {
            return None;
        }
        // The kernel's pages are mapped from the kernel cache rather than written.
        let mapped = self.stream.is_cached();
        let base = self.kernel_map.wrapping_add(self.load_phys);
        let mut touched = u64::MAX;
        let mut words = table
            .chunks_exact(4)
            .rev()
            .map(|w| i32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        for kind in 0..3 {
            let width = if kind == 2 { 8 } else { 4 };
            loop {
                let w = words.next()?;
                if w == 0 {
                    break;
                }
                let off = (i64::from(w) as u64).wrapping_sub(base);
                if off.checked_add(width)? > self.footprint {
                    return None;
                }
                let at = GuestAddress(phys + off);
                if mapped {
                    // Written before read: see map::prefault_write.
                    for byte in [at.0, at.0 + width - 1] {
                        let page = byte / PAGE as u64;
                        if page != touched {
                            touched = page;
                            map::prefault_write(mem, byte);
                        }
                    }
                }
                match kind {
                    0 => {
                        let v: u32 = mem.read_obj(at).ok()?;
                        mem.write_obj(v.wrapping_add(delta as u32), at).ok()?;
                    }
                    1 => {
                        let v: u32 = mem.read_obj(at).ok()?;
                        mem.write_obj(v.wrapping_sub(delta as u32), at).ok()?;
                    }
                    _ => {
                        let v: u64 = mem.read_obj(at).ok()?;
                        mem.write_obj(v.wrapping_add(delta), at).ok()?;
                    }
                }
            }
        }
        Some(())
    }
}

/// The body of the `bzimage_unpack` fuzz target: arbitrary bytes as a kernel image,
/// unpacked into a small guest memory with and without KASLR. Nothing may panic, loop
/// forever or allocate what the input merely claims.
pub fn fuzz_one(data: &[u8]) {
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]) else {
        return;
    };
    for kaslr in [false, true] {
        if let Some(u) = Unpacking::from_source(std::io::Cursor::new(data.to_vec())) {
            let _ = u.size();
            let _ = u.load(&mem, 32 << 20, kaslr);
        }
    }
}

/// A random number for the kernel's placement (0 if the system has none to give).
fn random() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::Path;

    use super::*;

    const TEXT_V: u64 = 0xffff_ffff_8100_0000;
    const TEXT_P: u64 = 0x100_0000;

    /// A bzImage around a gzip'd ELF with one segment and a relocation table.
    fn bzimage(dir: &Path, bad_reloc: bool) -> std::path::PathBuf {
        bzimage_with(dir, bad_reloc, 0x100, 0x100)
    }

    /// As [`bzimage`], the segment's `filesz` bytes at `at` in the ELF.
    fn bzimage_with(dir: &Path, bad_reloc: bool, at: usize, filesz: u64) -> std::path::PathBuf {
        let mut elf = vec![0u8; at + filesz as usize];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[0x12..0x14].copy_from_slice(&EM_X86_64.to_le_bytes());
        elf[0x18..0x20].copy_from_slice(&TEXT_P.to_le_bytes());
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let ph = &mut elf[64..120];
        ph[..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        ph[8..16].copy_from_slice(&(at as u64).to_le_bytes());
        ph[16..24].copy_from_slice(&TEXT_V.to_le_bytes());
        ph[24..32].copy_from_slice(&TEXT_P.to_le_bytes());
        ph[32..40].copy_from_slice(&filesz.to_le_bytes());
        ph[40..48].copy_from_slice(&0x3000u64.to_le_bytes());
        // Segment data: a 64-bit pointer at +0x10, a 32-bit one at +0x20, an inverse
        // 32-bit one at +0x30.
        elf[at + 0x10..at + 0x18].copy_from_slice(&(TEXT_V + 0x80).to_le_bytes());
        elf[at + 0x20..at + 0x24].copy_from_slice(&((TEXT_V + 0x90) as u32).to_le_bytes());
        elf[at + 0x30..at + 0x34].copy_from_slice(&0x1000u32.to_le_bytes());
        let rel = |off: u64| ((TEXT_V + off) as i64 as i32).to_le_bytes();
        let first = if bad_reloc { 0x10_0000 } else { 0x10 };
        for w in [[0; 4], rel(first), [0; 4], rel(0x30), [0; 4], rel(0x20)] {
            elf.extend_from_slice(&w);
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&elf).unwrap();
        let mut payload = gz.finish().unwrap();
        payload.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        let mut image = vec![0u8; 1024];
        image[SETUP_HEADER_OFFSET] = 1;
        image[0x202..0x206].copy_from_slice(&HDR_MAGIC.to_le_bytes());
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        image[0x211] = 1;
        image[0x230..0x234].copy_from_slice(&(2u32 << 20).to_le_bytes());
        image[0x234] = 1;
        image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image[0x260..0x264].copy_from_slice(&0x4000u32.to_le_bytes());
        image.extend_from_slice(&payload);
        let path = dir.join("bzImage");
        std::fs::write(&path, image).unwrap();
        path
    }

    /// A directory of the test's own, removed at the end.
    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("rqemu-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl std::ops::Deref for Scratch {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn open(path: &Path) -> File {
        File::open(path).unwrap()
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    #[test]
    fn unpacks_in_place_without_kaslr() {
        let dir = Scratch::new("unpack");
        let mem = memory();
        let u = Unpacking::open_cached(&open(&bzimage(&dir, false)), None)
            .expect("a bzImage it can unpack");
        assert_eq!((u.default_phys(), u.size()), (TEXT_P, 0x4000));
        let p = u.load(&mem, 64 << 20, false).unwrap();
        assert_eq!((p.entry, p.end, p.kaslr), (TEXT_P, TEXT_P + 0x3000, false));
        let v: u64 = mem.read_obj(GuestAddress(TEXT_P + 0x10)).unwrap();
        assert_eq!(v, TEXT_V + 0x80);
    }

    #[test]
    fn kaslr_moves_and_relocates() {
        let dir = Scratch::new("kaslr");
        let path = bzimage(&dir, false);
        let mem = memory();
        // Every placement lands 2 MiB-aligned inside the limit, with every kind of
        // relocation adjusted by the same virtual shift.
        for _ in 0..8 {
            let u = Unpacking::open_cached(&open(&path), None).unwrap();
            let p = u.load(&mem, 64 << 20, true).unwrap();
            assert!(p.kaslr);
            assert_relocated(&mem, p.entry);
        }
    }

    /// The test kernel placed at `phys`: 2 MiB-aligned inside 64 MiB, every kind of
    /// relocation adjusted by the same virtual shift.
    fn assert_relocated(mem: &GuestMemoryMmap, phys: u64) {
        assert!(phys >= TEXT_P && phys + 0x4000 <= 64 << 20 && phys.is_multiple_of(2 << 20));
        let v64: u64 = mem.read_obj(GuestAddress(phys + 0x10)).unwrap();
        let v32: u32 = mem.read_obj(GuestAddress(phys + 0x20)).unwrap();
        let inv: u32 = mem.read_obj(GuestAddress(phys + 0x30)).unwrap();
        let delta = v64 - (TEXT_V + 0x80);
        assert_eq!(delta % (2 << 20), 0);
        assert_eq!(v32, ((TEXT_V + 0x90) as u32).wrapping_add(delta as u32));
        assert_eq!(inv, 0x1000u32.wrapping_sub(delta as u32));
    }

    /// A kernel whose segment is page-aligned in the cache entry is mapped from it and
    /// relocated in the mapping; the entry itself is not changed.
    #[test]
    fn kaslr_relocates_a_mapped_kernel() {
        let dir = Scratch::new("mapped");
        let path = bzimage_with(&dir, false, 0x1000, 0x1100);
        let cache = Cache::at(&dir.join("kernels"));
        let u = Unpacking::open_cached(&open(&path), Some(&cache)).unwrap();
        u.load(&memory(), 64 << 20, false).unwrap();
        let entry = std::fs::read_dir(dir.join("kernels"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(".kernel"))
            .unwrap();
        let before = std::fs::read(&entry).unwrap();
        for _ in 0..4 {
            let u = Unpacking::open_cached(&open(&path), Some(&cache)).unwrap();
            assert!(u.stream.is_cached());
            let mem = memory();
            let p = u.load(&mem, 64 << 20, true).unwrap();
            assert!(p.kaslr);
            assert_relocated(&mem, p.entry);
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
            assert!(maps.contains(&*entry.to_string_lossy()));
        }
        assert!(std::fs::read(&entry).unwrap() == before);
    }

    #[test]
    fn anything_else_is_left_alone() {
        let dir = Scratch::new("other");
        let path = bzimage(&dir, false);
        let mut image = std::fs::read(&path).unwrap();
        // An unknown compressor.
        image[1024] ^= 0xff;
        std::fs::write(&path, &image).unwrap();
        assert!(Unpacking::open_cached(&open(&path), None).is_none());
        image[1024] ^= 0xff;
        std::fs::write(&path, &image).unwrap();
        assert!(Unpacking::open_cached(&open(&path), None).is_some());
        // A relocation outside the kernel: the stream is refused once it is read.
        let bad = bzimage(&dir, true);
        let u = Unpacking::open_cached(&open(&bad), None).unwrap();
        assert!(u.load(&memory(), 64 << 20, true).is_none());
        std::fs::write(&path, b"not a kernel").unwrap();
        assert!(Unpacking::open_cached(&open(&path), None).is_none());
    }

    /// The first boot records the decompressed stream, the next reads it back: the same
    /// kernel in guest memory, and no entry for a stream that was not used up.
    #[test]
    fn the_cache_gives_back_what_was_unpacked() {
        let dir = Scratch::new("cache");
        let path = bzimage(&dir, false);
        let cache = Cache::at(&dir.join("kernels"));
        let entries = || {
            std::fs::read_dir(dir.join("kernels"))
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        let cold = memory();
        let u = Unpacking::open_cached(&open(&path), Some(&cache)).unwrap();
        assert!(u.stream.is_recorded());
        u.load(&cold, 64 << 20, false).unwrap();
        let names = entries();
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(names[0].to_string_lossy().ends_with(".kernel"));
        // The entry is the decompressed stream; the decompressor is not needed again.
        let warm = memory();
        let u = Unpacking::open_cached(&open(&path), Some(&cache)).unwrap();
        assert!(!u.stream.is_recorded());
        u.load(&warm, 64 << 20, false).unwrap();
        let (mut a, mut b) = (vec![0u8; 0x4000], vec![0u8; 0x4000]);
        cold.read_slice(&mut a, GuestAddress(TEXT_P)).unwrap();
        warm.read_slice(&mut b, GuestAddress(TEXT_P)).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            u64::from_le_bytes(a[0x10..0x18].try_into().unwrap()),
            TEXT_V + 0x80
        );
        // A stream refused half-way leaves nothing behind. One random placement in 511
        // needs no relocation, so the bad table is never read: another try gets another
        // placement.
        let bad = bzimage(&dir, true);
        let refused = (0..4).any(|_| {
            let _ = std::fs::remove_dir_all(dir.join("kernels"));
            let u = Unpacking::open_cached(&open(&bad), Some(&cache)).unwrap();
            u.load(&memory(), 64 << 20, true).is_none()
        });
        assert!(refused);
        assert!(entries().is_empty());
    }

    /// The fuzz target's body on cut and corrupted images (and the fuzzer's own corpus
    /// starts from such an image).
    #[test]
    fn broken_images_are_refused() {
        let dir = Scratch::new("broken");
        let image = std::fs::read(bzimage(&dir, false)).unwrap();
        for cut in (0..image.len()).step_by(61) {
            fuzz_one(&image[..cut]);
        }
        for at in (0x1f1..image.len()).step_by(7) {
            let mut bad = image.clone();
            bad[at] ^= 0x5a;
            fuzz_one(&bad);
        }
    }

    /// The host's own kernel, when there is one: unpacked, placed and relocated.
    #[test]
    fn unpacks_the_host_kernel() {
        let Some(k) = std::fs::read_dir("/boot").ok().and_then(|d| {
            d.flatten().map(|e| e.path()).find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
        }) else {
            rqemu_block::testing::skip("no kernel in /boot (linux-image-amd64)");
            return;
        };
        let file = File::open(&k).expect("the host kernel opens");
        let u = Unpacking::open_cached(&file, None).expect("the host kernel is a bzImage");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 512 << 20)]).unwrap();
        let size = u.size();
        let p = u.load(&mem, 512 << 20, true).expect("the kernel unpacks");
        assert!(p.kaslr);
        assert!(p.end - (p.entry & !((2 << 20) - 1)) <= size);
        // Unpacked once into the cache, then mapped from it: the same memory.
        let dir = Scratch::new("host-kernel");
        let cache = Cache::at(&dir.join("kernels"));
        let load = |cold: bool| {
            let u = Unpacking::open_cached(&file, Some(&cache)).unwrap();
            assert_eq!(u.stream.is_recorded(), cold);
            let start = u.default_phys();
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 256 << 20)]).unwrap();
            let p = u.load(&mem, 256 << 20, false).expect("the kernel unpacks");
            let mut bytes = vec![0u8; (p.end - start) as usize];
            mem.read_slice(&mut bytes, GuestAddress(start)).unwrap();
            // The warm load maps the entry's pages rather than copying them.
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
            assert_eq!(maps.contains(&*dir.to_string_lossy()), !cold);
            (bytes, p.entry)
        };
        let (cold, warm) = (load(true), load(false));
        assert!(cold.0 == warm.0 && cold.1 == warm.1);
    }
}
