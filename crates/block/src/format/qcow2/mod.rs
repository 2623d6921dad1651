//! The qcow2 format driver.
//!
//! One file per concern: [`types`] (on-disk vocabulary), [`header`], [`meta`] (metadata
//! state and write-back order), [`cache`], [`refcount`] (refcounts and cluster
//! allocation), [`cluster`] (guest-to-host mapping), [`alloc`] (allocation for writes),
//! [`io`] (the read and write paths), [`zero`] (write-zeroes and discard), [`open`],
//! [`create`], [`snapshot`], [`check`], [`info`], [`compress`], and persistent dirty
//! bitmaps: [`bitmaps`] (on disk), [`dirty_bitmap`] (in memory), [`bitmaps_store`]
//! (loading, tracking, storing).
//!
//! Concurrency: metadata lives behind one async mutex ([`meta::Meta`]), held only while
//! looking up or changing mappings; guest data moves without it, so many requests are in
//! flight at once. Allocating writes register their clusters as in flight; a write that
//! overlaps one waits for it to be linked ([`Qcow2::alloc_done`]).

pub mod alloc;
pub mod amend;
pub mod bitmaps;
pub mod bitmaps_store;
pub mod cache;
pub mod check;
pub mod cluster;
pub mod compress;
pub mod create;
pub mod crypt;
pub mod dirty_bitmap;
pub mod empty;
pub mod header;
pub mod info;
pub mod io;
pub mod measure;
pub mod meta;
pub mod open;
pub mod overlap;
pub mod refcount;
pub mod resize;
pub mod runtime_opts;
pub mod snapshot;
pub mod snapshot_ops;
pub mod types;
pub mod zero;

use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, RwLock};

use async_trait::async_trait;
use tokio::sync::{Mutex, Notify};

use crate::error::{Error, Result};
use crate::info::{CheckReport, FormatInfo, RepairMode, SnapshotInfo};
use crate::node::{
    BlockDriver, BlockStatus, ChildRole, DebugEvent, HostMapping, IoBuf, IoBufMut, NodeRef,
    Prealloc, WriteFlags,
};

use meta::Meta;
pub use open::Qcow2Options;
use types::*;

/// An open qcow2 image.
pub struct Qcow2 {
    meta: Mutex<Meta>,
    /// Woken whenever an in-flight allocation is linked or aborted.
    alloc_done: Notify,
    file: NodeRef,
    data_file: Option<NodeRef>,
    backing: RwLock<Option<NodeRef>>,
    geo: Geometry,
    size: AtomicU64,
    read_only: bool,
    compression: CompressionType,
    dead: AtomicBool,
    data_file_raw: bool,
    version: u32,
    /// Opened by `check` (the snapshot table is read by the check).
    opened_for_check: bool,
    /// The last decompressed cluster (its compressed descriptor and data).
    decompressed: StdMutex<Option<(u64, Arc<Vec<u8>>)>>,
    /// Whether the image looks preallocated with `preallocation=metadata` (data clusters
    /// mapped to holes of the file): 0 not yet known, 1 no, 2 yes.
    metadata_prealloc: std::sync::atomic::AtomicU8,
    /// Persistent dirty bitmaps, newest first ([`bitmaps_store`]).
    bitmaps: StdMutex<Vec<bitmaps_store::LiveBitmap>>,
    /// Some bitmap is enabled: writes must set bits.
    bitmaps_tracking: AtomicBool,
    /// Encryption of guest data ([`crypt`]), when the header asks for it.
    encryption: Option<crypt::Encryption>,
    /// The `json:` name of a node opened with a key secret.
    json_name: Option<String>,
}

impl Qcow2 {
    /// Opens the qcow2 image stored in `file`.
    pub async fn open(file: NodeRef, opts: Qcow2Options) -> Result<Arc<Qcow2>> {
        let mut meta = open::load(&file, &opts).await?;
        let encryption = crypt::open(&file, &meta, opts.key_secret.as_deref(), opts.no_io).await?;
        let has_data_file = meta.has_data_file();
        if has_data_file && opts.data_file.is_none() && !opts.no_io {
            return Err(Error::invalid("'data-file' is required for this image"));
        }
        let q = Arc::new(Qcow2 {
            geo: meta.geo,
            size: AtomicU64::new(meta.h.size),
            read_only: opts.read_only,
            compression: CompressionType::from_byte(meta.h.compression_type)
                .unwrap_or(CompressionType::Zlib),
            dead: AtomicBool::new(false),
            data_file_raw: meta.h.autoclear_features & autoclear::DATA_FILE_RAW != 0,
            version: meta.h.version,
            file: file.clone(),
            data_file: opts.data_file.clone(),
            backing: RwLock::new(None),
            alloc_done: Notify::new(),
            decompressed: StdMutex::new(None),
            opened_for_check: opts.check,
            metadata_prealloc: std::sync::atomic::AtomicU8::new(0),
            bitmaps: StdMutex::new(Vec::new()),
            bitmaps_tracking: AtomicBool::new(false),
            encryption,
            json_name: opts
                .key_secret
                .as_deref()
                .and_then(|k| crypt::json_filename("qcow2", &file, "encrypt.key-secret", k)),
            meta: Mutex::new({
                meta.no_flush = opts.no_flush;
                meta
            }),
        });
        q.load_bitmaps(&opts).await?;
        if !opts.read_only && !opts.no_io {
            q.prepare_for_writing(&opts).await?;
        }
        Ok(q)
    }

    async fn prepare_for_writing(&self, opts: &Qcow2Options) -> Result<()> {
        let mut m = self.meta.lock().await;
        let dirty = m.h.incompatible_features & incompat::DIRTY != 0;
        if dirty && !opts.check {
            drop(m);
            let report = check::check(
                self,
                RepairMode {
                    leaks: true,
                    errors: true,
                },
            )
            .await?;
            if report.check_errors > 0 || report.corruptions > 0 {
                return Err(Error::corrupt("Could not repair dirty image"));
            }
            m = self.meta.lock().await;
            m.mark_clean().await?;
        }
        // Unknown auto-clear bits are cleared before the first write.
        if m.h.autoclear_features & !autoclear::KNOWN != 0 {
            m.h.autoclear_features &= autoclear::KNOWN;
            m.write_header().await?;
        }
        Ok(())
    }

    /// Attaches (or detaches) the backing node.
    pub async fn set_backing(&self, node: Option<NodeRef>) {
        let has = node.is_some();
        if let Ok(mut b) = self.backing.write() {
            *b = node;
        }
        self.meta.lock().await.has_backing = has;
    }

    fn backing_node(&self) -> Option<NodeRef> {
        self.backing.read().ok().and_then(|b| b.clone())
    }

    /// The backing file name and format recorded in the header.
    pub async fn backing_spec(&self) -> (Option<String>, Option<String>) {
        let m = self.meta.lock().await;
        (m.h.backing_file.clone(), m.h.backing_format.clone())
    }

    /// The external data file name recorded in the header, if any.
    pub async fn data_file_name(&self) -> Option<String> {
        let m = self.meta.lock().await;
        if m.has_data_file() {
            m.h.data_file.clone()
        } else {
            None
        }
    }

    /// The node that holds guest data (the external data file, or the image file).
    fn data(&self) -> &NodeRef {
        self.data_file.as_ref().unwrap_or(&self.file)
    }

    /// Where saved VM state starts: the first guest offset no L1 entry of the disk maps.
    pub fn vm_state_offset(&self) -> u64 {
        self.geo.l1_entries_for(self.size()) * self.geo.l2_coverage()
    }

    /// The image geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// The unit of allocation of guest data (a cluster, or a subcluster with extended L2
    /// entries).
    pub fn subcluster_size(&self) -> u64 {
        self.geo.subcluster_size()
    }

    /// Whether the image has persistent bitmaps.
    pub async fn has_bitmaps(&self) -> bool {
        !self.persistent_bitmaps().is_empty()
    }

    /// The image's compression type.
    pub fn compression_type(&self) -> CompressionType {
        self.compression
    }

    fn check_alive(&self) -> Result<()> {
        if self.dead.load(Ordering::Acquire) {
            return Err(Error::errno(libc::ENOMEDIUM));
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        self.check_alive()?;
        if self.read_only {
            return Err(Error::errno(libc::EACCES));
        }
        Ok(())
    }

    /// QEMU's heuristic for `preallocation=metadata` images: noticeably more clusters
    /// have a refcount than the file has space allocated for. Block status then asks the
    /// file whether data clusters are holes (they read as zeroes). Checked once; an
    /// error while counting means no, as in QEMU.
    async fn detect_metadata_prealloc(&self, m: &mut Meta) -> bool {
        match self.metadata_prealloc.load(Ordering::Acquire) {
            1 => return false,
            2 => return true,
            _ => {}
        }
        let cs = self.geo.cluster_size();
        let file_len = self.file.size().div_ceil(512) * 512;
        let real = self.file.allocated_size().await.unwrap_or(0) / cs;
        let threshold = (real * 10 / 9).max(real + 2);
        let mut count = 0;
        for i in 0..file_len.div_ceil(cs) {
            if count >= threshold {
                break;
            }
            match m.get_refcount(i).await {
                Ok(0) => {}
                Ok(_) => count += 1,
                Err(_) => {
                    count = 0;
                    break;
                }
            }
        }
        let found = count >= threshold;
        self.metadata_prealloc
            .store(if found { 2 } else { 1 }, Ordering::Release);
        found
    }

    /// Runs `f` on the locked metadata, marking the node dead if `f` reported a fatal
    /// corruption.
    async fn with_meta<T>(&self, m: &mut Meta, r: Result<T>) -> Result<T> {
        if m.dead {
            self.dead.store(true, Ordering::Release);
        }
        r
    }
}

#[async_trait]
impl BlockDriver for Qcow2 {
    fn driver_name(&self) -> &'static str {
        "qcow2"
    }

    fn filename(&self) -> String {
        match &self.json_name {
            Some(j) => j.clone(),
            None => self.file.filename(),
        }
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn children(&self) -> Vec<(ChildRole, NodeRef)> {
        let mut v = vec![(ChildRole::File, self.file.clone())];
        if let Some(b) = self.backing_node() {
            v.push((ChildRole::Backing, b));
        }
        if let Some(d) = &self.data_file {
            v.push((ChildRole::DataFile, d.clone()));
        }
        v
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn encrypted(&self) -> bool {
        self.is_encrypted()
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_alive()?;
        self.read_guest(offset, buf).await
    }

    async fn readv(&self, offset: u64, bufs: &[IoBufMut<'_>]) -> Result<()> {
        self.check_alive()?;
        self.readv_guest(offset, bufs).await
    }

    async fn writev(&self, offset: u64, bufs: &[IoBuf<'_>], flags: WriteFlags) -> Result<()> {
        if self.is_encrypted() || self.data_file_raw {
            // Encryption works on a private copy, and a raw data file takes the data
            // twice: both go through a bounce buffer.
            return crate::node::writev_bounced(self, offset, bufs, flags).await;
        }
        self.check_writable()?;
        let r = self.writev_guest(offset, bufs).await;
        self.track_write(offset, crate::iov::len(bufs) as u64);
        r?;
        if flags.fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.check_writable()?;
        let r = self.write_guest(offset, buf).await;
        self.track_write(offset, buf.len() as u64);
        r?;
        if flags.fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        self.check_writable()?;
        let r = self.write_zeroes_guest(offset, len, flags).await;
        self.track_write(offset, len);
        r?;
        if flags.fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_compressed(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check_writable()?;
        let r = self.write_compressed_guest(offset, buf).await;
        self.track_write(offset, buf.len() as u64);
        r
    }

    async fn make_empty(&self) -> Result<()> {
        Qcow2::make_empty(self).await
    }

    fn compressor(&self) -> Option<compress::Compressor> {
        (self.data_file.is_none() && !self.is_encrypted()).then(|| Qcow2::compressor(self))
    }

    async fn write_precompressed(
        &self,
        offset: u64,
        buf: &[u8],
        compressed: Option<Vec<u8>>,
    ) -> Result<()> {
        self.check_writable()?;
        let r = self
            .write_precompressed_cluster(offset, buf, compressed)
            .await;
        self.track_write(offset, buf.len() as u64);
        r
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let r = self.discard_guest(offset, len).await;
        self.track_write(offset, len);
        r
    }

    async fn load_vmstate(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        self.check_alive()?;
        self.read_guest(self.vm_state_offset() + pos, buf).await
    }

    async fn save_vmstate(&self, pos: u64, buf: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.write_guest(self.vm_state_offset() + pos, buf).await
    }

    async fn flush(&self) -> Result<()> {
        if self.read_only || self.dead.load(Ordering::Acquire) {
            return Ok(());
        }
        {
            let mut m = self.meta.lock().await;
            self.file.debug_event(DebugEvent::FlushToOs).await;
            let r = m.flush_caches().await;
            self.with_meta(&mut m, r).await?;
            m.data_unflushed = false;
        }
        if let Some(d) = &self.data_file {
            d.flush().await?;
        }
        self.file.debug_event(DebugEvent::FlushToDisk).await;
        self.file.flush().await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.check_alive()?;
        let (mapping, prealloc) = {
            let mut m = self.meta.lock().await;
            let r = m.get_host_offset(offset, len).await;
            let mapping = self.with_meta(&mut m, r).await?;
            let prealloc = mapping.ty.has_host()
                && !mapping.ty.is_zero()
                && !mapping.ty.is_unallocated()
                && self.detect_metadata_prealloc(&mut m).await;
            (mapping, prealloc)
        };
        let mut st = BlockStatus {
            len: mapping.len.min(len),
            ..Default::default()
        };
        // Encrypted data is not what the file holds: no mapping to it.
        if mapping.ty.has_host() && !self.is_encrypted() {
            st.host = Some(HostMapping {
                node: Some(self.data().clone()),
                offset: mapping.host,
            });
        }
        if mapping.ty.is_zero() {
            st.zero = true;
        } else if !mapping.ty.is_unallocated() {
            st.data = true;
        }
        st.allocated = st.zero || st.data;
        if mapping.ty == ScType::Compressed {
            st.compressed = true;
        }
        if prealloc && st.data && st.host.is_some() {
            st.recurse = true;
        }
        Ok(st)
    }

    async fn truncate(&self, size: u64, _exact: bool, prealloc: Prealloc) -> Result<()> {
        self.check_writable()?;
        self.resize(size, prealloc).await?;
        self.resize_bitmaps(size);
        Ok(())
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.geo.cluster_size())
    }

    fn has_zero_init(&self) -> bool {
        // Preallocated images have every L2 table allocated, others none: the first L1
        // entry tells which. Preallocated data clusters read as whatever the data file
        // holds.
        let preallocated = self
            .meta
            .try_lock()
            .map(|m| m.l1.first().is_some_and(|&e| e != 0))
            .unwrap_or(true);
        if !preallocated {
            return true;
        }
        if self.is_encrypted() {
            return false;
        }
        match &self.data_file {
            Some(d) => d.has_zero_init(),
            None => self.file.has_zero_init(),
        }
    }

    fn supports_backing(&self) -> bool {
        true
    }

    async fn close(&self) -> Result<()> {
        if self.read_only || self.dead.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut m = self.meta.lock().await;
        // Bitmaps first, as QEMU stores them when it inactivates the node; losing them
        // is reported but does not keep the rest of the metadata from being written.
        let bitmaps_lost = match self.store_bitmaps(&mut m).await {
            Err(e) => {
                crate::error::report(&e.to_string());
                true
            }
            Ok(()) => false,
        };
        // As QEMU inactivates a node: each cache is written and the file flushed, and
        // what fails is reported; the image stays dirty then (the errors go no further,
        // as QEMU's close cannot fail).
        let no_flush = m.no_flush;
        let mut ok = true;
        for what in ["L2 table", "refcount block"] {
            let r = if what == "L2 table" {
                m.flush_l2().await
            } else {
                m.flush_refblocks().await
            };
            let r = match r {
                Ok(()) if !no_flush => self.file.flush().await,
                r => r,
            };
            if let Err(e) = r {
                crate::error::report(&format!(
                    "Failed to flush the {what} cache: {}",
                    crate::error::strerror(e.errno_value())
                ));
                ok = false;
            }
        }
        if ok {
            m.mark_clean().await?;
        }
        if bitmaps_lost {
            // QEMU's close reports the failed inactivation to the tool.
            return Err(Error::other(
                "Error while closing the image: Invalid argument",
                libc::EINVAL,
            ));
        }
        Ok(())
    }

    fn check_reopen(&self, options: &rqemu_opts::KeyVal) -> Result<()> {
        let mut kv = options.clone();
        let rt = runtime_opts::RuntimeOptions::take_from(&mut kv)?;
        rt.resolve(&self.geo, self.size())?;
        if rt.lazy_refcounts == Some(true) && self.version < 3 {
            return Err(Error::invalid(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level",
            ));
        }
        Ok(())
    }

    fn is_runtime_option(&self, key: &str) -> bool {
        runtime_opts::is_runtime_key(key)
    }

    async fn allocated_size(&self) -> Option<u64> {
        self.file.allocated_size().await
    }

    async fn format_info(&self) -> Result<FormatInfo> {
        info::format_info(self).await
    }

    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let m = self.meta.lock().await;
        Ok(m.snapshots
            .iter()
            .map(|s| SnapshotInfo {
                id: s.id.clone(),
                name: s.name.clone(),
                vm_state_size: s.vm_state_size,
                date_sec: s.date_sec,
                date_nsec: s.date_nsec,
                vm_clock_nsec: s.vm_clock_nsec,
                icount: s.icount,
            })
            .collect())
    }

    async fn check(&self, repair: RepairMode) -> Result<CheckReport> {
        check::check(self, repair).await
    }
}
