//! A hostile guest against virtio-blk: the device model is driven in-process, as a guest
//! driver would through BAR 0, with malformed descriptor chains (addresses outside guest
//! memory, giant lengths, loops, bad head indices, runaway available indices, broken
//! indirect tables, read-only status bytes). Every request must complete with an error
//! status or be dropped, the device must stay usable (or ask for a reset and recover
//! after one), and nothing may panic or hang.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rqemu_block::{AioMode, BlockBackend, CacheMode, OpenOptions};
use rqemu_vmm::config::Throttle;
use rqemu_vmm::iothread::IoThread;
use rqemu_vmm::pci::PciDevice;
use rqemu_vmm::virtio::blk::{Blk, Disk};
use rqemu_vmm::virtio::msix::MsiSink;
use rqemu_vmm::virtio::pci::VirtioPci;
use rqemu_vmm::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 1 << 20;
const QSIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

struct Count(AtomicU32);
impl MsiSink for Count {
    fn signal(&self, _addr: u64, _data: u32) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

struct Guest {
    mem: Arc<GuestMemoryMmap>,
    dev: VirtioPci,
    irqs: Arc<Count>,
    avail_idx: u16,
    used_seen: u16,
    _io: IoThread,
    _dir: std::path::PathBuf,
}

fn w8(dev: &mut VirtioPci, off: u64, v: u8) {
    dev.bar_write(0, off, &[v]);
}
fn w16(dev: &mut VirtioPci, off: u64, v: u16) {
    dev.bar_write(0, off, &v.to_le_bytes());
}
fn w32(dev: &mut VirtioPci, off: u64, v: u32) {
    dev.bar_write(0, off, &v.to_le_bytes());
}
fn r8(dev: &mut VirtioPci, off: u64) -> u8 {
    let mut b = [0u8];
    dev.bar_read(0, off, &mut b);
    b[0]
}

impl Guest {
    fn new(name: &str) -> Guest {
        Guest::with_cache(name, None)
    }

    /// A guest whose disk is opened with `cache` and `aio` (default options for `None`).
    fn with_cache(name: &str, cache: Option<(&str, AioMode)>) -> Guest {
        let dir = std::env::temp_dir().join(format!("rqemu-hostile-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.raw");
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i / 512) as u8).collect();
        std::fs::write(&img, data).unwrap();
        let io = IoThread::spawn(name).unwrap();
        let mut opts = OpenOptions {
            filename: img.to_string_lossy().into_owned(),
            format: Some("raw".into()),
            ..OpenOptions::default()
        };
        if let Some((cache, aio)) = cache {
            opts.cache = CacheMode::parse(cache).unwrap();
            opts.aio = aio;
        }
        let backend = io.handle().block_on(BlockBackend::open(&opts)).unwrap();
        let disk = Arc::new(Disk::new(
            backend,
            Some("HOSTILE"),
            Throttle::default(),
            None,
            false,
        ));
        let blk = Blk::new(disk, 1, QSIZE, io.handle().clone());
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap());
        let irqs = Arc::new(Count(AtomicU32::new(0)));
        let dev =
            VirtioPci::new(Box::new(blk), 0xc000_0000, mem.clone(), None, irqs.clone()).unwrap();
        let mut g = Guest {
            mem,
            dev,
            irqs,
            avail_idx: 0,
            used_seen: 0,
            _io: io,
            _dir: dir,
        };
        // MSI-X on, vector 0 unmasked.
        g.dev.config_write(0x86, &0x8000u16.to_le_bytes());
        g.dev.bar_write(0, 0x4000, &0xfee0_0000u32.to_le_bytes());
        g.dev.bar_write(0, 0x400c, &0u32.to_le_bytes());
        g.init(DESC);
        g
    }

    fn init(&mut self, desc: u64) {
        let d = &mut self.dev;
        w8(d, 0x14, 0);
        w8(d, 0x14, 1 | 2);
        w32(d, 0x08, 1);
        w32(d, 0x0c, 1); // VIRTIO_F_VERSION_1
        w32(d, 0x08, 0);
        w32(d, 0x0c, 0);
        w8(d, 0x14, 1 | 2 | 8);
        w16(d, 0x16, 0);
        w16(d, 0x18, QSIZE);
        w16(d, 0x1a, 0);
        w32(d, 0x20, desc as u32);
        w32(d, 0x24, (desc >> 32) as u32);
        w32(d, 0x28, AVAIL as u32);
        w32(d, 0x2c, 0);
        w32(d, 0x30, USED as u32);
        w32(d, 0x34, 0);
        w16(d, 0x1c, 1);
        for i in 0..0x100u64 {
            self.mem.write_obj(0u8, GuestAddress(AVAIL + i)).unwrap();
            self.mem.write_obj(0u8, GuestAddress(USED + i)).unwrap();
        }
        self.avail_idx = 0;
        self.used_seen = 0;
        w8(d, 0x14, 1 | 2 | 8 | 4);
    }

    fn status(&mut self) -> u8 {
        r8(&mut self.dev, 0x14)
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.desc_at(DESC, i, addr, len, flags, next)
    }

    fn desc_at(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = table + 16 * u64::from(i);
        self.mem.write_obj(addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    fn header(&self, at: u64, t: u32, sector: u64) {
        self.mem.write_obj(t, GuestAddress(at)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    /// Makes `head` available (with the avail index moved by `bump`) and kicks.
    fn submit_raw(&mut self, head: u16, bump: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(bump);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        self.dev.bar_write(0, 0x3000, &0u16.to_le_bytes());
    }

    /// Waits for the next used entry: (head, len), or None after a timeout.
    fn wait_used(&mut self, timeout: Duration) -> Option<(u32, u32)> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
            if idx != self.used_seen {
                let e = USED + 4 + 8 * u64::from(self.used_seen % QSIZE);
                self.used_seen = self.used_seen.wrapping_add(1);
                let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
                return Some((id, len));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    /// A well-formed read of `sectors` at `sector` into 0x10000; returns the status.
    fn good_read(&mut self, sector: u64) -> u8 {
        self.header(0x8000, 0, sector);
        self.mem.write_obj(0xffu8, GuestAddress(0x9000)).unwrap();
        self.desc(0, 0x8000, 16, F_NEXT, 1);
        self.desc(1, 0x10000, 1024, F_NEXT | F_WRITE, 2);
        self.desc(2, 0x9000, 1, F_WRITE, 0);
        self.submit_raw(0, 1);
        let (id, len) = self
            .wait_used(Duration::from_secs(10))
            .expect("read completes");
        let status: u8 = self.mem.read_obj(GuestAddress(0x9000)).unwrap();
        assert_eq!((id, len), (0, if status == 0 { 1025 } else { 1 }));
        status
    }

    /// A 3-descriptor request whose data descriptor is (addr, len); returns the status.
    fn read_with_data(&mut self, addr: u64, len: u32) -> u8 {
        self.header(0x8000, 0, 0);
        self.mem.write_obj(0xffu8, GuestAddress(0x9000)).unwrap();
        self.desc(0, 0x8000, 16, F_NEXT, 1);
        self.desc(1, addr, len, F_NEXT | F_WRITE, 2);
        self.desc(2, 0x9000, 1, F_WRITE, 0);
        self.submit_raw(0, 1);
        self.wait_used(Duration::from_secs(10))
            .expect("request completes");
        self.mem.read_obj(GuestAddress(0x9000)).unwrap()
    }
}

#[test]
fn well_formed_read_works() {
    let mut g = Guest::new("ok");
    assert_eq!(g.good_read(4), 0);
    let got: u8 = g.mem.read_obj(GuestAddress(0x10000)).unwrap();
    assert_eq!(got, 4);
    let got: u8 = g.mem.read_obj(GuestAddress(0x10200)).unwrap();
    assert_eq!(got, 5);
    assert!(
        g.irqs.0.load(Ordering::SeqCst) >= 1,
        "no interrupt delivered"
    );
    // GET_ID returns the serial.
    g.header(0x8000, 8, 0);
    g.desc(0, 0x8000, 16, F_NEXT, 1);
    g.desc(1, 0x11000, 20, F_NEXT | F_WRITE, 2);
    g.desc(2, 0x9000, 1, F_WRITE, 0);
    g.submit_raw(0, 1);
    g.wait_used(Duration::from_secs(10)).unwrap();
    let mut id = [0u8; 20];
    g.mem.read_slice(&mut id, GuestAddress(0x11000)).unwrap();
    assert_eq!(&id[..8], b"HOSTILE\0");
}

#[test]
fn scattered_buffers_round_trip() {
    let mut g = Guest::new("scatter");
    // Write sectors 10..13 from three scattered buffers (the middle one spans two
    // adjacent descriptors), then read them back into another scattered set.
    for (i, at) in [0x20000u64, 0x30000, 0x30200, 0x40000].iter().enumerate() {
        g.mem
            .write_slice(&[0xa0 + i as u8; 512], GuestAddress(*at))
            .unwrap();
    }
    g.header(0x8000, 1, 10);
    g.desc(0, 0x8000, 16, F_NEXT, 1);
    g.desc(1, 0x20000, 512, F_NEXT, 2);
    g.desc(2, 0x30000, 512, F_NEXT, 3);
    g.desc(3, 0x30200, 512, F_NEXT, 4);
    g.desc(4, 0x40000, 512, F_NEXT, 5);
    g.desc(5, 0x9000, 1, F_WRITE, 0);
    g.submit_raw(0, 1);
    assert_eq!(g.wait_used(Duration::from_secs(10)), Some((0, 1)));
    assert_eq!(g.mem.read_obj::<u8>(GuestAddress(0x9000)).unwrap(), 0);
    g.header(0x8000, 0, 10);
    g.desc(1, 0x50000, 1024, F_NEXT | F_WRITE, 2);
    g.desc(2, 0x60000, 1024, F_NEXT | F_WRITE, 3);
    g.desc(3, 0x9000, 1, F_WRITE, 0);
    g.submit_raw(0, 1);
    assert_eq!(g.wait_used(Duration::from_secs(10)), Some((0, 2049)));
    assert_eq!(g.mem.read_obj::<u8>(GuestAddress(0x9000)).unwrap(), 0);
    for (i, at) in [0x50000u64, 0x50200, 0x60000, 0x60200].iter().enumerate() {
        let mut b = [0u8; 512];
        g.mem.read_slice(&mut b, GuestAddress(*at)).unwrap();
        assert!(b.iter().all(|x| *x == 0xa0 + i as u8), "sector {i}");
    }
}

/// The vectored path under O_DIRECT with both engines: page-aligned scattered buffers
/// go to the kernel as they are, sector-sized ones through the bounce buffer, and
/// descriptors that overlap each other (a racing guest's own business) still complete.
#[test]
fn scattered_buffers_round_trip_direct() {
    for (name, aio) in [
        ("direct-t", AioMode::Threads),
        ("direct-u", AioMode::IoUring),
    ] {
        let mut g = Guest::with_cache(name, Some(("none", aio)));
        // Write sectors 16..32 (8 KiB) from two scattered pages.
        g.mem
            .write_slice(&[0x5a; 4096], GuestAddress(0x20000))
            .unwrap();
        g.mem
            .write_slice(&[0xa5; 4096], GuestAddress(0x40000))
            .unwrap();
        g.header(0x8000, 1, 16);
        g.desc(0, 0x8000, 16, F_NEXT, 1);
        g.desc(1, 0x20000, 4096, F_NEXT, 2);
        g.desc(2, 0x40000, 4096, F_NEXT, 3);
        g.desc(3, 0x9000, 1, F_WRITE, 0);
        g.submit_raw(0, 1);
        assert_eq!(g.wait_used(Duration::from_secs(10)), Some((0, 1)), "{name}");
        assert_eq!(g.mem.read_obj::<u8>(GuestAddress(0x9000)).unwrap(), 0);
        // Read them back into pages in reverse order, then into sector pieces.
        for pieces in [
            &[(0x60000u64, 4096u32), (0x50000, 4096)][..],
            &[(0x70200, 512), (0x71000, 3584), (0x72000, 4096)][..],
        ] {
            g.header(0x8000, 0, 16);
            g.desc(0, 0x8000, 16, F_NEXT, 1);
            for (i, (at, len)) in pieces.iter().enumerate() {
                g.desc(1 + i as u16, *at, *len, F_NEXT | F_WRITE, 2 + i as u16);
            }
            g.desc(1 + pieces.len() as u16, 0x9000, 1, F_WRITE, 0);
            g.submit_raw(0, 1);
            assert_eq!(
                g.wait_used(Duration::from_secs(10)),
                Some((0, 8193)),
                "{name}"
            );
            assert_eq!(g.mem.read_obj::<u8>(GuestAddress(0x9000)).unwrap(), 0);
            let mut got = Vec::new();
            for (at, len) in pieces {
                let mut b = vec![0u8; *len as usize];
                g.mem.read_slice(&mut b, GuestAddress(*at)).unwrap();
                got.extend(b);
            }
            assert!(got[..4096].iter().all(|x| *x == 0x5a), "{name} {pieces:x?}");
            assert!(got[4096..].iter().all(|x| *x == 0xa5), "{name} {pieces:x?}");
        }
        // Two descriptors over the same page: completes (the data is the guest's problem).
        g.header(0x8000, 0, 16);
        g.desc(0, 0x8000, 16, F_NEXT, 1);
        g.desc(1, 0x60000, 4096, F_NEXT | F_WRITE, 2);
        g.desc(2, 0x60000, 4096, F_NEXT | F_WRITE, 3);
        g.desc(3, 0x9000, 1, F_WRITE, 0);
        g.submit_raw(0, 1);
        assert_eq!(
            g.wait_used(Duration::from_secs(10)),
            Some((0, 8193)),
            "{name}"
        );
        assert_eq!(g.good_read(1), 0);
    }
}

#[test]
fn bad_buffers_get_error_status() {
    let mut g = Guest::new("buffers");
    // Outside guest memory, straddling its end, giant, not whole sectors.
    assert_eq!(g.read_with_data(0x4000_0000, 512), 1);
    assert_eq!(g.read_with_data(MEM as u64 - 256, 512), 1);
    assert_eq!(g.read_with_data(0x10000, 0xffff_fe00), 1);
    assert_eq!(g.read_with_data(0x10000, 100), 1);
    // Beyond the disk's end, and a sector number that overflows.
    assert_eq!(g.good_read(2047), 1);
    assert_eq!(g.good_read(u64::MAX / 256), 1);
    // Unknown request type.
    g.header(0x8000, 0x77, 0);
    g.desc(0, 0x8000, 16, F_NEXT, 1);
    g.desc(1, 0x9000, 1, F_WRITE, 0);
    g.submit_raw(0, 1);
    g.wait_used(Duration::from_secs(10)).unwrap();
    assert_eq!(g.mem.read_obj::<u8>(GuestAddress(0x9000)).unwrap(), 2);
    // Status byte in a read-only descriptor: completed, nothing written.
    g.header(0x8000, 0, 0);
    g.desc(0, 0x8000, 16, F_NEXT, 1);
    g.desc(1, 0x9000, 1, 0, 0);
    g.submit_raw(0, 1);
    assert_eq!(g.wait_used(Duration::from_secs(10)), Some((0, 0)));
    // Still healthy.
    assert_eq!(g.good_read(1), 0);
}

#[test]
fn broken_chains_do_not_hang() {
    let mut g = Guest::new("chains");
    // A loop: 0 -> 1 -> 0 -> ...
    g.header(0x8000, 0, 0);
    g.desc(0, 0x8000, 16, F_NEXT, 1);
    g.desc(1, 0x10000, 512, F_NEXT | F_WRITE, 0);
    g.submit_raw(0, 1);
    assert!(
        g.wait_used(Duration::from_secs(10)).is_some(),
        "looping chain not completed"
    );
    // Next index out of the table.
    g.desc(0, 0x8000, 16, F_NEXT, 200);
    g.submit_raw(0, 1);
    assert!(g.wait_used(Duration::from_secs(10)).is_some());
    // Indirect table outside memory, with a bad length, and nested indirection.
    g.desc(0, 0x4000_0000, 48, F_INDIRECT, 0);
    g.submit_raw(0, 1);
    assert!(g.wait_used(Duration::from_secs(10)).is_some());
    g.desc(0, 0x5000, 47, F_INDIRECT, 0);
    g.submit_raw(0, 1);
    assert!(g.wait_used(Duration::from_secs(10)).is_some());
    g.desc_at(0x5000, 0, 0x5000, 16, F_INDIRECT, 0);
    g.desc(0, 0x5000, 16, F_INDIRECT, 0);
    g.submit_raw(0, 1);
    assert!(g.wait_used(Duration::from_secs(10)).is_some());
    // A well-formed indirect request.
    g.header(0x8000, 0, 3);
    g.desc_at(0x5000, 0, 0x8000, 16, F_NEXT, 1);
    g.desc_at(0x5000, 1, 0x10000, 512, F_NEXT | F_WRITE, 2);
    g.desc_at(0x5000, 2, 0x9000, 1, F_WRITE, 0);
    g.desc(0, 0x5000, 48, F_INDIRECT, 0);
    g.submit_raw(0, 1);
    assert_eq!(g.wait_used(Duration::from_secs(10)), Some((0, 513)));
    assert_eq!(g.mem.read_obj::<u8>(GuestAddress(0x10000)).unwrap(), 3);
    // A head index beyond the queue: dropped, and the queue goes on.
    g.submit_raw(99, 1);
    assert_eq!(g.wait_used(Duration::from_millis(300)), None);
    assert_eq!(g.good_read(2), 0);
}

#[test]
fn runaway_indices_and_bad_rings_recover_after_reset() {
    let mut g = Guest::new("indices");
    // The available index jumps far ahead of the ring: nothing is taken from it.
    g.submit_raw(0, 1000);
    assert_eq!(g.wait_used(Duration::from_millis(300)), None);
    // A reset and a fresh start make the device usable again.
    g.init(DESC);
    assert_eq!(g.good_read(1), 0);
    // Rings outside guest memory: the device asks for a reset instead of running.
    g.init(0x4000_0000);
    assert_ne!(g.status() & 0x40, 0, "DEVICE_NEEDS_RESET not set");
    g.init(DESC);
    assert_eq!(g.status() & 0x40, 0);
    assert_eq!(g.good_read(1), 0);
}
