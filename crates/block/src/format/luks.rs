//! The `luks` format: a raw LUKS1 volume (header, key material, then the encrypted
//! payload), as QEMU's `luks` driver reads and writes it.
//!
//! The guest sees the payload; sector IVs are guest sector numbers. Requests that do
//! not cover whole 512-byte sectors are widened (reads) or read-modify-written (writes,
//! exclusive against other writes).

use std::any::Any;

use async_trait::async_trait;
use tokio::sync::{Mutex, RwLock};

use crate::buffer::AlignedBuf;
use crate::create::CreateOptions;
use crate::crypto::area::HeaderArea;
use crate::crypto::luks::{Luks, LuksAmendOptions, LuksCreateOptions};
use crate::crypto::{SectorCrypto, SECTOR_SIZE};
use crate::error::{Error, Result};
use crate::info::FormatInfo;
use crate::node::{BlockDriver, BlockStatus, ChildRole, NodeRef, Prealloc, WriteFlags};

/// An open LUKS volume.
pub struct LuksNode {
    file: NodeRef,
    area: HeaderArea,
    luks: Mutex<Luks>,
    crypto: Option<SectorCrypto>,
    payload: u64,
    read_only: bool,
    rmw: RwLock<()>,
    json_name: Option<String>,
}

impl LuksNode {
    /// Opens the volume in `file`; `key_secret` unlocks it (without it, as for `info`,
    /// only the header is read and data requests fail).
    pub async fn open(
        file: NodeRef,
        key_secret: Option<&str>,
        no_io: bool,
        read_only: bool,
    ) -> Result<LuksNode> {
        let secret =
            if no_io {
                None
            } else {
                Some(key_secret.ok_or_else(|| {
                    Error::invalid("Parameter 'key-secret' is required for cipher")
                })?)
            };
        let area = HeaderArea {
            node: file.clone(),
            base: 0,
            len: u64::MAX,
        };
        let luks = Luks::open(&area, secret).await?;
        let crypto = luks.sector_crypto()?;
        let payload = luks.header_len();
        if payload > file.size() {
            return Err(Error::other(
                "Could not refresh total sector count: Input/output error",
                libc::EIO,
            ));
        }
        Ok(LuksNode {
            area,
            luks: Mutex::new(luks),
            crypto,
            payload,
            read_only,
            rmw: RwLock::new(()),
            json_name: key_secret.and_then(|k| {
                crate::format::qcow2::crypt::json_filename("luks", &file, "key-secret", k)
            }),
            file,
        })
    }

    fn crypto(&self) -> Result<&SectorCrypto> {
        self.crypto.as_ref().ok_or_else(|| Error::errno(libc::EIO))
    }

    /// Reads whole sectors at `offset` and decrypts them.
    async fn read_sectors(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let c = self.crypto()?;
        self.file.read(self.payload + offset, buf).await?;
        c.decrypt(offset / SECTOR_SIZE, buf);
        Ok(())
    }

    /// Encrypts and writes whole sectors at `offset`.
    async fn write_sectors(&self, offset: u64, buf: &[u8]) -> Result<()> {
        const CHUNK: usize = 1 << 20;
        let c = self.crypto()?;
        let mut tmp = AlignedBuf::io(buf.len().min(CHUNK));
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(CHUNK);
            let piece = &mut tmp[..n];
            piece.copy_from_slice(&buf[done..done + n]);
            let at = offset + done as u64;
            c.encrypt(at / SECTOR_SIZE, piece);
            self.file
                .write(self.payload + at, piece, WriteFlags::NONE)
                .await?;
            done += n;
        }
        Ok(())
    }

    /// Changes key slots (`qemu-img amend -o state=...`).
    pub async fn amend(&self, o: &LuksAmendOptions, force: bool) -> Result<()> {
        let mut l = self.luks.lock().await;
        l.amend(&self.area, o, force).await?;
        Ok(())
    }
}

fn widen(offset: u64, len: u64) -> (u64, u64) {
    let start = offset / SECTOR_SIZE * SECTOR_SIZE;
    let end = (offset + len).div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
    (start, end)
}

#[async_trait]
impl BlockDriver for LuksNode {
    fn driver_name(&self) -> &'static str {
        "luks"
    }

    fn filename(&self) -> String {
        match &self.json_name {
            Some(j) => j.clone(),
            None => self.file.filename(),
        }
    }

    fn size(&self) -> u64 {
        self.file.size().saturating_sub(self.payload)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn children(&self) -> Vec<(ChildRole, NodeRef)> {
        vec![(ChildRole::File, self.file.clone())]
    }

    fn encrypted(&self) -> bool {
        true
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let (start, end) = widen(offset, buf.len() as u64);
        if start == offset && end == offset + buf.len() as u64 {
            return self.read_sectors(offset, buf).await;
        }
        let mut tmp = AlignedBuf::io((end - start) as usize);
        self.read_sectors(start, &mut tmp).await?;
        let h = (offset - start) as usize;
        buf.copy_from_slice(&tmp[h..h + buf.len()]);
        Ok(())
    }

    async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        if self.read_only {
            return Err(Error::errno(libc::EACCES));
        }
        let (start, end) = widen(offset, buf.len() as u64);
        if start == offset && end == offset + buf.len() as u64 {
            let _g = self.rmw.read().await;
            self.write_sectors(offset, buf).await?;
        } else {
            let _g = self.rmw.write().await;
            let mut tmp = AlignedBuf::io((end - start) as usize);
            self.read_sectors(start, &mut tmp).await?;
            let h = (offset - start) as usize;
            tmp[h..h + buf.len()].copy_from_slice(buf);
            self.write_sectors(start, &tmp).await?;
        }
        if flags.fua {
            self.file.flush().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        if flags.no_fallback {
            return Err(Error::errno(libc::ENOTSUP));
        }
        // Zeroes are data like any other once encrypted.
        const CHUNK: u64 = 1 << 20;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            let zero = vec![0u8; n as usize];
            self.write(offset + done, &zero, flags).await?;
            done += n;
        }
        Ok(())
    }

    async fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        self.file.flush().await
    }

    async fn block_status(&self, _offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus {
            len,
            data: true,
            allocated: true,
            ..Default::default()
        })
    }

    async fn truncate(&self, size: u64, exact: bool, prealloc: Prealloc) -> Result<()> {
        self.file
            .truncate(self.payload + size, exact, prealloc)
            .await
    }

    async fn allocated_size(&self) -> Option<u64> {
        self.file.allocated_size().await
    }

    async fn format_info(&self) -> Result<FormatInfo> {
        let mut d = self.luks.lock().await.info();
        d.remove("format");
        Ok(FormatInfo {
            type_name: Some("luks"),
            data: d,
        })
    }
}

/// Creates a LUKS volume of `size` payload bytes.
pub async fn create(filename: &str, o: &CreateOptions) -> Result<()> {
    let (size, prealloc) = crate::create::size_and_prealloc(o)?;
    if o.get_bool("detached-header") == Some(true) {
        return Err(Error::unsupported(
            "Detached LUKS headers are not supported by this build of rqemu",
        ));
    }
    let opts = LuksCreateOptions::from_options("", |k| o.get(k).map(str::to_string))?;
    let file = crate::format::qcow2::create::create_file(filename)?;
    let node: NodeRef = file.clone();
    let r = async {
        crate::crypto::secret::lookup_utf8(&opts.key_secret)?;
        node.truncate(0, false, Prealloc::Off).await?;
        let len = crate::crypto::luks::header_len(opts.params.key_bytes());
        node.truncate(len + size, false, prealloc).await?;
        let area = HeaderArea {
            node: node.clone(),
            base: 0,
            len,
        };
        Luks::create(&area, &opts).await?;
        node.flush().await
    }
    .await;
    let _ = node.close().await;
    if r.is_err() {
        // As QEMU does, a volume that could not be set up is not left behind.
        let _ = std::fs::remove_file(filename);
    }
    r
}

#[cfg(test)]
mod tests {
    use crate::test_util::{block_on, check_raw_path, create, open, TempPath};

    /// Raw buffers on a LUKS volume go through the bounded bounce: decrypted and
    /// encrypted in private buffers only.
    #[test]
    fn raw_buffers_on_a_luks_volume() {
        crate::crypto::secret::define("rawpath-luks-sec", b"rawpath".to_vec());
        block_on(async {
            let p = TempPath::new("rawpath.luks");
            create(
                &p.0,
                "luks",
                &[
                    ("size", "1M"),
                    ("key-secret", "rawpath-luks-sec"),
                    ("iter-time", "10"),
                ],
            )
            .await;
            let b = open(&p.0, "key-secret=rawpath-luks-sec").await;
            check_raw_path(&b).await;
            b.close().await.expect("close");
        });
    }
}
