//! The guest data paths: reads (from data clusters, compressed clusters, the backing
//! node, or zeroes), allocating writes with copy-on-write, compressed writes, and resize.

use std::sync::Arc;

use crate::buffer::AlignedBuf;
use crate::error::{Error, Result};
use crate::iov::{self, IoBuf, IoBufMut};
use crate::node::{BlockDriver, DebugEvent};
use crate::node::{Prealloc, WriteFlags};

use super::alloc::HostRange;
use super::cluster::L2Meta;
use super::meta::DiscardType;
use super::types::*;
use super::{compress, Qcow2};

impl Qcow2 {
    /// Reads guest data; also used for copy-on-write (it sees the old mappings until
    /// an allocation is linked).
    pub(super) async fn read_guest(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let want = (buf.len() - done) as u64;
            let mapping = {
                let mut m = self.meta.lock().await;
                let r = m.get_host_offset(pos, want).await;
                self.with_meta(&mut m, r).await?
            };
            let n = mapping.len.min(want) as usize;
            let chunk = &mut buf[done..done + n];
            match mapping.ty {
                ScType::UnallocatedPlain | ScType::UnallocatedAlloc => {
                    self.read_backing(pos, chunk).await?;
                }
                ScType::ZeroPlain | ScType::ZeroAlloc => chunk.fill(0),
                ScType::Normal => {
                    self.file.debug_event(DebugEvent::ReadAio).await;
                    self.read_data(pos, mapping.host, chunk).await?
                }
                ScType::Compressed => {
                    let data = self.decompress_cluster(mapping.entry).await?;
                    let from = self.geo.offset_in_cluster(pos) as usize;
                    chunk.copy_from_slice(&data[from..from + n]);
                }
                ScType::Invalid => return Err(Error::errno(libc::EIO)),
            }
            done += n;
        }
        Ok(())
    }

    /// Vectored guest read into raw buffers: ranges stored in data clusters go to the
    /// data file as sub-vectors of `bufs` (one vectored request per contiguous host
    /// range), unallocated ranges to the backing node the same way; zero ranges are
    /// filled, compressed clusters copied out of their decompressed form, and encrypted
    /// data decrypted in a private buffer and then copied out.
    pub(super) async fn readv_guest(&self, offset: u64, bufs: &[IoBufMut<'_>]) -> Result<()> {
        let total = iov::len(bufs);
        let mut done = 0usize;
        while done < total {
            let pos = offset + done as u64;
            let want = (total - done) as u64;
            let mapping = {
                let mut m = self.meta.lock().await;
                let r = m.get_host_offset(pos, want).await;
                self.with_meta(&mut m, r).await?
            };
            let n = mapping.len.min(want) as usize;
            let sub = iov::sub(bufs, done, n);
            match mapping.ty {
                ScType::Normal if !self.is_encrypted() => {
                    self.file.debug_event(DebugEvent::ReadAio).await;
                    self.data().readv(mapping.host, &sub).await?
                }
                ScType::UnallocatedPlain | ScType::UnallocatedAlloc => {
                    self.readv_backing(pos, &sub).await?
                }
                ScType::ZeroPlain | ScType::ZeroAlloc => iov::fill(&sub, 0),
                ScType::Compressed => {
                    let data = self.decompress_cluster(mapping.entry).await?;
                    let from = self.geo.offset_in_cluster(pos) as usize;
                    iov::scatter(&sub, &data[from..from + n]);
                }
                ScType::Invalid => return Err(Error::errno(libc::EIO)),
                // Encrypted data: decrypted in a private buffer, then copied out.
                ScType::Normal => crate::node::readv_bounced(self, pos, &sub).await?,
            }
            done += n;
        }
        Ok(())
    }

    /// Reads unallocated ranges from the backing node (zeroes past its end, or without
    /// one) straight into the request's buffers.
    async fn readv_backing(&self, pos: u64, bufs: &[IoBufMut<'_>]) -> Result<()> {
        let Some(b) = self.backing_node() else {
            iov::fill(bufs, 0);
            return Ok(());
        };
        self.file.debug_event(DebugEvent::ReadBackingAio).await;
        let n = iov::len(bufs);
        let avail = b.size().saturating_sub(pos).min(n as u64) as usize;
        if avail > 0 {
            b.readv(pos, &iov::sub(bufs, 0, avail)).await?;
        }
        if avail < n {
            iov::fill(&iov::sub(bufs, avail, n - avail), 0);
        }
        Ok(())
    }

    async fn read_backing(&self, pos: u64, chunk: &mut [u8]) -> Result<()> {
        let Some(b) = self.backing_node() else {
            chunk.fill(0);
            return Ok(());
        };
        self.file.debug_event(DebugEvent::ReadBackingAio).await;
        let bsize = b.size();
        let avail = bsize.saturating_sub(pos).min(chunk.len() as u64) as usize;
        if avail > 0 {
            b.read(pos, &mut chunk[..avail]).await?;
        }
        chunk[avail..].fill(0);
        Ok(())
    }

    /// Decompresses the cluster an L2 entry describes (keeping the last one cached).
    async fn decompress_cluster(&self, entry: L2Entry) -> Result<Arc<Vec<u8>>> {
        if let Ok(cache) = self.decompressed.lock() {
            if let Some((desc, data)) = cache.as_ref() {
                if *desc == entry.raw {
                    return Ok(data.clone());
                }
            }
        }
        let host = entry.raw & self.geo.compressed_offset_mask();
        let sectors = ((entry.raw >> self.geo.csize_shift()) & self.geo.csize_mask()) + 1;
        let csize = sectors * 512 - (host & 511);
        let mut input = vec![0u8; csize as usize];
        self.file.debug_event(DebugEvent::ReadCompressed).await;
        self.file.read(host, &mut input).await?;
        let mut out = vec![0u8; self.geo.cluster_size() as usize];
        if !compress::decompress(self.compression, &input, &mut out) {
            return Err(Error::errno(libc::EIO));
        }
        let out = Arc::new(out);
        if let Ok(mut cache) = self.decompressed.lock() {
            *cache = Some((entry.raw, out.clone()));
        }
        Ok(out)
    }

    /// Writes guest data, allocating clusters as needed (encrypting it, for encrypted
    /// images).
    pub(super) async fn write_guest(&self, offset: u64, buf: &[u8]) -> Result<()> {
        match &self.encryption {
            Some(e) => self.write_encrypted(e, offset, buf).await,
            None => self.write_guest_aligned(offset, buf).await,
        }
    }

    /// Writes guest data (whole sectors, when encrypted).
    pub(super) async fn write_guest_aligned(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let mut done = 0usize;
        if self.data_file_raw {
            if let Some(d) = &self.data_file {
                // Keep the raw data file consistent on its own.
                d.write(offset, buf, WriteFlags::NONE).await?;
            }
        }
        while done < buf.len() {
            let pos = offset + done as u64;
            let want = (buf.len() - done) as u64;
            let (host, bytes, metas) = self.reserve(pos, want).await?;
            let data = &buf[done..done + bytes as usize];
            let res = if self.data_file_raw {
                // The data is in place already; only the copy-on-write remains.
                self.write_cow(pos, &metas).await
            } else {
                self.write_with_cow(pos, data, host, &metas).await
            };
            self.finish(&metas, res).await?;
            done += bytes as usize;
        }
        Ok(())
    }

    /// Vectored guest write from raw buffers to an unencrypted image whose data does not
    /// go to a raw external data file: each allocated or newly allocated host range
    /// takes its sub-vector of `bufs` in one vectored write, with the copy-on-write
    /// regions around it as private buffers in the same write where QEMU merges them.
    pub(super) async fn writev_guest(&self, offset: u64, bufs: &[IoBuf<'_>]) -> Result<()> {
        let total = iov::len(bufs);
        let mut done = 0usize;
        while done < total {
            let pos = offset + done as u64;
            let want = (total - done) as u64;
            let (host, bytes, metas) = self.reserve(pos, want).await?;
            let data = iov::sub(bufs, done, bytes as usize);
            let res = self.writev_with_cow(pos, &data, host, &metas).await;
            self.finish(&metas, res).await?;
            done += bytes as usize;
        }
        Ok(())
    }

    /// [`Self::write_with_cow`] for raw buffers of an unencrypted image.
    async fn writev_with_cow(
        &self,
        pos: u64,
        data: &[IoBuf<'_>],
        host: u64,
        metas: &[L2Meta],
    ) -> Result<()> {
        let len = iov::len(data) as u64;
        if let [m] = metas {
            let data_start = m.offset + m.cow_start.offset + m.cow_start.bytes;
            let data_end = m.offset + m.cow_end.offset;
            if data_start == pos && data_end == pos + len {
                if m.cow_start.bytes == 0 && m.cow_end.bytes == 0 {
                    self.file.debug_event(DebugEvent::WriteAio).await;
                    return self.data().writev(host, data, WriteFlags::NONE).await;
                }
                let head = m.cow_start.bytes as usize;
                let mut cow = AlignedBuf::io(head + m.cow_end.bytes as usize);
                let (h, t) = cow.split_at_mut(head);
                self.read_guest(m.offset + m.cow_start.offset, h).await?;
                self.read_guest(m.offset + m.cow_end.offset, t).await?;
                let mut v = Vec::with_capacity(data.len() + 2);
                if !h.is_empty() {
                    v.push(IoBuf::new(h));
                }
                v.extend_from_slice(data);
                if !t.is_empty() {
                    v.push(IoBuf::new(t));
                }
                self.file.debug_event(DebugEvent::WriteAio).await;
                return self
                    .data()
                    .writev(m.alloc_offset + m.cow_start.offset, &v, WriteFlags::NONE)
                    .await;
            }
        }
        self.file.debug_event(DebugEvent::WriteAio).await;
        self.data().writev(host, data, WriteFlags::NONE).await?;
        self.write_cow(pos, metas).await
    }

    /// Finds the host range for a write, waiting for overlapping allocations.
    pub(super) async fn reserve(&self, pos: u64, want: u64) -> Result<(u64, u64, Vec<L2Meta>)> {
        loop {
            let notified = self.alloc_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut m = self.meta.lock().await;
            let r = m.alloc_host_offset(pos, want).await;
            match self.with_meta(&mut m, r).await? {
                HostRange::Ready { host, bytes, metas } => {
                    let r = m.overlap_check_data(host, bytes, &metas).await;
                    if let Err(e) = r {
                        for meta in &metas {
                            m.alloc_abort(meta).await;
                        }
                        self.with_meta(&mut m, Err::<(), _>(Error::errno(libc::EIO)))
                            .await
                            .ok();
                        drop(m);
                        self.alloc_done.notify_waiters();
                        return Err(e);
                    }
                    return Ok((host, bytes, metas));
                }
                HostRange::Wait => {
                    drop(m);
                    notified.await;
                }
            }
        }
    }

    /// Links (or on failure, frees) the allocations of a write.
    async fn finish(&self, metas: &[L2Meta], res: Result<()>) -> Result<()> {
        let mut m = self.meta.lock().await;
        let out = match res {
            Ok(()) => {
                let mut r = Ok(());
                for meta in metas {
                    if !meta.keep_old {
                        m.data_unflushed = true;
                    }
                    if let Err(e) = m.link_l2(meta).await {
                        r = Err(e);
                        break;
                    }
                }
                r
            }
            Err(e) => {
                for meta in metas {
                    m.alloc_abort(meta).await;
                }
                Err(e)
            }
        };
        let out = self.with_meta(&mut m, out).await;
        drop(m);
        self.alloc_done.notify_waiters();
        out
    }

    /// Writes `data` at `host`, together with the copy-on-write regions of `metas`
    /// (in one write when there is one allocation around the data, as QEMU merges them).
    async fn write_with_cow(
        &self,
        pos: u64,
        data: &[u8],
        host: u64,
        metas: &[L2Meta],
    ) -> Result<()> {
        if let [m] = metas {
            let data_start = m.offset + m.cow_start.offset + m.cow_start.bytes;
            let data_end = m.offset + m.cow_end.offset;
            if data_start == pos && data_end == pos + data.len() as u64 {
                if m.cow_start.bytes == 0 && m.cow_end.bytes == 0 {
                    self.file.debug_event(DebugEvent::WriteAio).await;
                    return self.write_data(pos, host, data).await;
                }
                let total = (m.cow_start.bytes + data.len() as u64 + m.cow_end.bytes) as usize;
                let mut merged = AlignedBuf::io(total);
                let head = m.cow_start.bytes as usize;
                self.read_guest(m.offset + m.cow_start.offset, &mut merged[..head])
                    .await?;
                merged[head..head + data.len()].copy_from_slice(data);
                let tail_from = head + data.len();
                self.read_guest(m.offset + m.cow_end.offset, &mut merged[tail_from..])
                    .await?;
                self.file.debug_event(DebugEvent::WriteAio).await;
                return self
                    .write_data(
                        m.offset + m.cow_start.offset,
                        m.alloc_offset + m.cow_start.offset,
                        &merged,
                    )
                    .await;
            }
        }
        self.file.debug_event(DebugEvent::WriteAio).await;
        self.write_data(pos, host, data).await?;
        self.write_cow(pos, metas).await
    }

    /// Copies the copy-on-write regions of `metas` from the old content.
    pub(super) async fn write_cow(&self, _pos: u64, metas: &[L2Meta]) -> Result<()> {
        for m in metas {
            for region in [m.cow_start, m.cow_end] {
                if region.bytes == 0 {
                    continue;
                }
                let mut buf = AlignedBuf::io(region.bytes as usize);
                self.read_guest(m.offset + region.offset, &mut buf).await?;
                self.write_data(
                    m.offset + region.offset,
                    m.alloc_offset + region.offset,
                    &buf,
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Writes whole clusters compressed (the last may be the image's partial one); each
    /// cluster that does not compress is written normally.
    pub(super) async fn write_compressed_guest(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let cs = self.geo.cluster_size();
        if buf.is_empty() {
            // The end of a stream of compressed writes: pad the file to whole sectors so
            // that sector-based readers see all of the last compressed cluster.
            let len = self.file.size();
            return self
                .file
                .truncate(len.div_ceil(512) * 512, false, Prealloc::Off)
                .await;
        }
        if self.data_file.is_some() {
            return Err(Error::unsupported(
                "Compression is not supported with external data files",
            ));
        }
        if self.is_encrypted() {
            return Err(Error::unsupported(
                "Compression and encryption not supported at the same time",
            ));
        }
        if self.geo.offset_in_cluster(offset) != 0 {
            return Err(Error::errno(libc::EINVAL));
        }
        if !(buf.len() as u64).is_multiple_of(cs) && offset + buf.len() as u64 != self.size() {
            return Err(Error::errno(libc::EINVAL));
        }
        for (i, chunk) in buf.chunks(cs as usize).enumerate() {
            self.write_compressed_cluster(offset + i as u64 * cs, chunk)
                .await?;
        }
        Ok(())
    }

    async fn write_compressed_cluster(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let out = self.compressor().compress_cluster(buf);
        self.write_precompressed_cluster(offset, buf, out).await
    }

    /// What compresses this image's clusters.
    pub(super) fn compressor(&self) -> compress::Compressor {
        compress::Compressor::new(self.compression, self.geo.cluster_size() as usize)
    }

    /// Stores one cluster at `offset` whose compressed form is `compressed` (from
    /// [`Self::compressor`]); `None` stores `buf` uncompressed.
    pub(super) async fn write_precompressed_cluster(
        &self,
        offset: u64,
        buf: &[u8],
        compressed: Option<Vec<u8>>,
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        if self.data_file.is_some() {
            return Err(Error::unsupported(
                "Compression is not supported with external data files",
            ));
        }
        if self.geo.offset_in_cluster(offset) != 0
            || (buf.len() as u64 != cs && offset + buf.len() as u64 != self.size())
        {
            return Err(Error::errno(libc::EINVAL));
        }
        let Some(out) = compressed else {
            return self.write_guest(offset, buf).await;
        };
        // Reserve the cluster against concurrent writers, allocate bytes, write, link.
        let (l2, index, host, meta) = loop {
            let notified = self.alloc_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut m = self.meta.lock().await;
            let busy = m.inflight.iter().any(|x| {
                let (s, e) = x.guest_range(cs);
                offset < e && offset + cs > s
            });
            if busy {
                drop(m);
                notified.await;
                continue;
            }
            let r = async {
                let l2 = m.cluster_table(offset).await?;
                let index = m.geo.l2_index(offset);
                let e = m.l2_entry(l2, index);
                if e.host_offset() != 0 || e.is_compressed() {
                    return Err(Error::errno(libc::EIO));
                }
                let host = m.alloc_bytes(out.len() as u64).await?;
                Ok((l2, index, host))
            }
            .await;
            let (l2, index, host) = self.with_meta(&mut m, r).await?;
            m.next_alloc_id += 1;
            let meta = L2Meta {
                offset,
                alloc_offset: host,
                nb_clusters: 1,
                keep_old: true,
                cow_start: Default::default(),
                cow_end: super::cluster::CowRegion {
                    offset: 0,
                    bytes: cs,
                },
                prealloc: false,
                id: m.next_alloc_id,
            };
            m.inflight.push(meta.clone());
            break (l2, index, host, meta);
        };
        let res = self.file.write(host, &out, WriteFlags::NONE).await;
        let mut m = self.meta.lock().await;
        m.inflight.retain(|x| x.id != meta.id);
        let r = match res {
            Ok(()) => {
                let nb_csectors = (host + out.len() as u64 - 1) / 512 - host / 512;
                let entry = L2Entry {
                    raw: OFLAG_COMPRESSED | (nb_csectors << self.geo.csize_shift()) | host,
                    bitmap: 0,
                };
                m.data_unflushed = true;
                let r = m.l2_depends_on_refcounts().await;
                if r.is_ok() {
                    let l2 = m.cluster_table(offset).await.unwrap_or(l2);
                    m.set_l2_entry(l2, index, entry);
                }
                r
            }
            Err(e) => {
                m.free_clusters(host, out.len() as u64, DiscardType::Never)
                    .await;
                Err(e)
            }
        };
        let r = self.with_meta(&mut m, r).await;
        drop(m);
        self.alloc_done.notify_waiters();
        r
    }
}

#[cfg(test)]
mod tests {
    use crate::test_util::{block_on, check_raw_path, create, open, TempPath};

    /// Raw buffers over an overlay: allocated clusters, clusters allocated by the
    /// writes (with copy-on-write from the backing file around them), unallocated
    /// ranges read from a backing file shorter than the overlay, zero clusters and a
    /// compressed cluster.
    #[test]
    fn raw_buffers_split_by_cluster_mapping() {
        block_on(async {
            let base = TempPath::new("rawpath-base.qcow2");
            let top = TempPath::new("rawpath-top.qcow2");
            create(&base.0, "qcow2", &[("size", "512K")]).await;
            let b = open(&base.0, "").await;
            b.write(1000, &vec![0x5a; 300_000], false)
                .await
                .expect("write base");
            b.close().await.expect("close base");
            create(
                &top.0,
                "qcow2",
                &[
                    ("size", "1M"),
                    ("backing_file", &base.0),
                    ("backing_fmt", "qcow2"),
                ],
            )
            .await;
            let t = open(&top.0, "").await;
            t.write(200_000, &vec![0x17; 70_000], false)
                .await
                .expect("write top");
            t.write_zeroes(655_360, 65_536, false)
                .await
                .expect("zero cluster");
            let pattern: Vec<u8> = (0..65_536).map(|i| (i / 100) as u8).collect();
            t.write_compressed(327_680, &pattern)
                .await
                .expect("compressed cluster");
            check_raw_path(&t).await;
            t.close().await.expect("close top");
        });
    }
}
