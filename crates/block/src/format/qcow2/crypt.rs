//! Encrypted qcow2 images: opening the encryption (legacy `aes`, crypt_method 1, or
//! LUKS with its header in clusters the CRYPTO header extension points at,
//! crypt_method 2), the data paths' decryption and encryption of guest data, creation
//! of the LUKS header, its `info`, and `amend` of its key slots.
//!
//! Data is encrypted in 512-byte sectors; the IV is the guest sector number for `aes`
//! and the host sector number (offset in the image file) for LUKS. Requests that do not
//! cover whole sectors are widened (reads) or read-modify-written (writes, serialised
//! against other writes by [`Encryption::rmw`]).

use rqemu_opts::KeyVal;
use serde_json::{json, Map, Value};
use tokio::sync::{Mutex, RwLock};

use crate::buffer::AlignedBuf;
use crate::create::CreateOptions;
use crate::crypto::area::HeaderArea;
use crate::crypto::luks::{self, Luks, LuksAmendOptions, LuksCreateOptions};
use crate::crypto::{qcow_aes, SectorCrypto, SECTOR_SIZE};
use crate::error::{Error, Result};
use crate::node::{NodeRef, WriteFlags};

use super::meta::Meta;
use super::Qcow2;

/// Largest piece of guest data encrypted in one bounce buffer.
const ENCRYPT_CHUNK: usize = 1 << 20;

/// `crypt_method` of legacy AES.
pub const CRYPT_AES: u32 = 1;
/// `crypt_method` of LUKS.
pub const CRYPT_LUKS: u32 = 2;

/// The encryption state of an open image.
pub struct Encryption {
    /// The header's crypt_method.
    pub method: u32,
    /// The data cipher (`None` when opened without I/O, e.g. for `info`).
    crypto: Option<SectorCrypto>,
    /// The LUKS volume and where its header lives.
    luks: Option<(Mutex<Luks>, HeaderArea)>,
    /// Unaligned writes take this exclusively, others shared.
    pub rmw: RwLock<()>,
}

/// Sets up the encryption of an image whose metadata `m` was just loaded.
pub(super) async fn open(
    file: &NodeRef,
    m: &Meta,
    key_secret: Option<&str>,
    no_io: bool,
) -> Result<Option<Encryption>> {
    let method = m.h.crypt_method;
    if method == 0 {
        return Ok(None);
    }
    let secret = if no_io {
        None
    } else {
        Some(key_secret.ok_or_else(|| {
            Error::invalid("Parameter 'encrypt.key-secret' is required for cipher")
        })?)
    };
    let mut enc = Encryption {
        method,
        crypto: None,
        luks: None,
        rmw: RwLock::new(()),
    };
    if method == CRYPT_AES {
        if let Some(s) = secret {
            enc.crypto = Some(qcow_aes::open(s)?);
        }
    } else {
        let Some((off, len)) = m.h.crypto_header else {
            return Err(Error::invalid(format!(
                "Missing CRYPTO header for crypt method {method}"
            )));
        };
        let area = HeaderArea {
            node: file.clone(),
            base: off,
            len,
        };
        let l = Luks::open(&area, secret).await?;
        enc.crypto = l.sector_crypto()?;
        enc.luks = Some((Mutex::new(l), area));
    }
    Ok(Some(enc))
}

impl Encryption {
    /// The IV sector of data at guest offset `guest`, host offset `host`.
    fn sector(&self, guest: u64, host: u64) -> u64 {
        if self.method == CRYPT_LUKS {
            host / SECTOR_SIZE
        } else {
            guest / SECTOR_SIZE
        }
    }

    /// What `info` shows under `encrypt:`.
    pub async fn info(&self) -> Map<String, Value> {
        match &self.luks {
            Some((l, _)) => l.lock().await.info(),
            None => {
                let mut d = Map::new();
                d.insert("format".into(), json!("aes"));
                d
            }
        }
    }
}

impl Qcow2 {
    fn crypto(&self) -> Option<(&Encryption, &SectorCrypto)> {
        let e = self.encryption.as_ref()?;
        Some((e, e.crypto.as_ref()?))
    }

    /// Whether guest data is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.encryption.is_some()
    }

    /// Reads guest data at `guest` stored at `host` of the data file, decrypting it.
    pub(super) async fn read_data(&self, guest: u64, host: u64, buf: &mut [u8]) -> Result<()> {
        let Some((e, c)) = self.crypto() else {
            if self.encryption.is_some() {
                return Err(Error::errno(libc::EIO));
            }
            return self.data().read(host, buf).await;
        };
        let head = host % SECTOR_SIZE;
        let end = host + buf.len() as u64;
        if head == 0 && end.is_multiple_of(SECTOR_SIZE) {
            self.data().read(host, buf).await?;
            c.decrypt(e.sector(guest, host), buf);
            return Ok(());
        }
        let start = host - head;
        let aend = end.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        let mut tmp = AlignedBuf::io((aend - start) as usize);
        self.data().read(start, &mut tmp).await?;
        c.decrypt(e.sector(guest - head, start), &mut tmp);
        let h = head as usize;
        buf.copy_from_slice(&tmp[h..h + buf.len()]);
        Ok(())
    }

    /// Writes guest data for `guest` at `host` of the data file, encrypting it (whole
    /// sectors only when encrypted).
    pub(super) async fn write_data(&self, guest: u64, host: u64, buf: &[u8]) -> Result<()> {
        let Some((e, c)) = self.crypto() else {
            if self.encryption.is_some() {
                return Err(Error::errno(libc::EIO));
            }
            return self.data().write(host, buf, WriteFlags::NONE).await;
        };
        if !host.is_multiple_of(SECTOR_SIZE) || !(buf.len() as u64).is_multiple_of(SECTOR_SIZE) {
            return Err(Error::errno(libc::EINVAL));
        }
        // Encrypt a copy, a piece at a time (one bounce buffer, reused).
        let mut tmp = AlignedBuf::io(buf.len().min(ENCRYPT_CHUNK));
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(ENCRYPT_CHUNK);
            let piece = &mut tmp[..n];
            piece.copy_from_slice(&buf[done..done + n]);
            let off = done as u64;
            c.encrypt(e.sector(guest + off, host + off), piece);
            self.data()
                .write(host + off, piece, WriteFlags::NONE)
                .await?;
            done += n;
        }
        Ok(())
    }

    /// A write of guest data to an encrypted image: sector-aligned writes go straight
    /// on, others read, patch and write the sectors around them.
    pub(super) async fn write_encrypted(
        &self,
        e: &Encryption,
        offset: u64,
        buf: &[u8],
    ) -> Result<()> {
        let end = offset + buf.len() as u64;
        if offset.is_multiple_of(SECTOR_SIZE) && end.is_multiple_of(SECTOR_SIZE) {
            let _g = e.rmw.read().await;
            return self.write_guest_aligned(offset, buf).await;
        }
        let _g = e.rmw.write().await;
        let start = offset / SECTOR_SIZE * SECTOR_SIZE;
        let aend = end.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        let mut tmp = AlignedBuf::io((aend - start) as usize);
        self.read_guest(start, &mut tmp).await?;
        let h = (offset - start) as usize;
        tmp[h..h + buf.len()].copy_from_slice(buf);
        self.write_guest_aligned(start, &tmp).await
    }

    /// What `info` shows under `encrypt:`, for encrypted images.
    pub async fn encrypt_info(&self) -> Option<Map<String, Value>> {
        match &self.encryption {
            Some(e) => Some(e.info().await),
            None => None,
        }
    }

    /// Changes LUKS key slots (`qemu-img amend -o encrypt.*`).
    pub async fn amend_encryption(&self, o: &LuksAmendOptions, force: bool) -> Result<()> {
        match self.encryption.as_ref().map(|e| (e.method, &e.luks)) {
            None => Err(Error::invalid(
                "Can't amend encryption options - encryption not present",
            )),
            Some((_, Some((l, area)))) => {
                let mut l = l.lock().await;
                l.amend(area, o, force).await?;
                Ok(())
            }
            Some(_) => Err(Error::invalid(
                "Only LUKS encryption options can be amended",
            )),
        }
    }
}

/// What the creation options ask for: nothing, legacy AES (with its secret) or LUKS.
#[derive(Debug, Clone)]
pub enum CreateEncryption {
    /// Legacy AES with this secret id.
    Aes(String),
    /// LUKS.
    Luks(LuksCreateOptions),
}

/// Reads the encryption creation options (`encryption=on`, `encrypt.*`).
pub fn create_options(o: &CreateOptions) -> Result<Option<CreateEncryption>> {
    let format = match (o.get("encrypt.format"), o.get_bool("encryption")) {
        (Some(_), Some(_)) => {
            return Err(Error::invalid(
                "'encrypt.format' and its alias 'encryption' can't be used at the same time",
            ))
        }
        (Some(f), None) => f.to_string(),
        (None, Some(true)) => "aes".to_string(),
        (None, _) => return Ok(None),
    };
    let get = |k: &str| o.get(&format!("encrypt.{k}")).map(str::to_string);
    match format.as_str() {
        "aes" => {
            // The legacy format takes a password and nothing else.
            for k in [
                "cipher-alg",
                "cipher-mode",
                "ivgen-alg",
                "ivgen-hash-alg",
                "hash-alg",
                "iter-time",
            ] {
                if get(k).is_some() {
                    return Err(Error::invalid(format!(
                        "Parameter 'encrypt.{k}' is unexpected"
                    )));
                }
            }
            let secret = get("key-secret").ok_or_else(|| {
                Error::invalid("Parameter 'encrypt.key-secret' is required for cipher")
            })?;
            Ok(Some(CreateEncryption::Aes(secret)))
        }
        "luks" => Ok(Some(CreateEncryption::Luks(
            LuksCreateOptions::from_options("encrypt.", get)?,
        ))),
        other => Err(Error::invalid(format!(
            "Parameter 'format' does not accept value '{other}'"
        ))),
    }
}

/// Sets up encryption on a freshly created image `q` in `file`.
pub(super) async fn create(q: &Qcow2, file: &NodeRef, enc: &CreateEncryption) -> Result<()> {
    match enc {
        CreateEncryption::Aes(secret) => {
            // Fail as QEMU does on an unknown secret.
            qcow_aes::open(secret)?;
            let mut m = q.meta.lock().await;
            m.h.crypt_method = CRYPT_AES;
            m.write_header().await
        }
        CreateEncryption::Luks(opts) => {
            crate::crypto::secret::lookup_utf8(&opts.key_secret)?;
            let len = luks::header_len(opts.params.key_bytes());
            let off = {
                let mut m = q.meta.lock().await;
                let cs = m.geo.cluster_size();
                let clusters = len.div_ceil(cs) * cs;
                let off = m.alloc_clusters(clusters).await?;
                m.flush_caches().await?;
                let zero = AlignedBuf::io(clusters as usize);
                file.write(off, &zero, WriteFlags::NONE).await?;
                off
            };
            let area = HeaderArea {
                node: file.clone(),
                base: off,
                len,
            };
            Luks::create(&area, opts).await?;
            let mut m = q.meta.lock().await;
            m.h.crypt_method = CRYPT_LUKS;
            m.h.crypto_header = Some((off, len));
            m.write_header().await
        }
    }
}

/// Takes `encrypt.*` options meant for the backing node out of `kv` (a `backing.`
/// child), for passing them on.
pub fn backing_encrypt_options(kv: &KeyVal) -> KeyVal {
    let mut out = KeyVal::new();
    for (k, v) in kv.iter() {
        if k.starts_with("encrypt.") {
            out.set(k, v);
        }
    }
    out
}

/// The name QEMU gives a node opened with a key secret (a strong option that a plain
/// filename cannot express): `json:{...}` with the driver, the file child and the
/// secret, in QEMU's key order. `None` when the file is not a plain file node.
pub fn json_filename(
    driver: &str,
    file: &NodeRef,
    secret_key: &str,
    secret: &str,
) -> Option<String> {
    if file.driver_name() != "file" {
        return None;
    }
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let child = format!(
        "{{\"driver\": \"file\", \"filename\": {}}}",
        q(&file.filename())
    );
    Some(if secret_key == "key-secret" {
        format!(
            "json:{{\"driver\": {}, \"file\": {child}, \"key-secret\": {}}}",
            q(driver),
            q(secret)
        )
    } else {
        format!(
            "json:{{{}: {}, \"driver\": {}, \"file\": {child}}}",
            q(secret_key),
            q(secret),
            q(driver)
        )
    })
}

#[cfg(test)]
mod tests {
    use crate::test_util::{block_on, check_raw_path, create, open, TempPath};

    /// Raw buffers on an encrypted qcow2 image: data is encrypted and decrypted in
    /// private buffers and copied to and from the raw ones.
    #[test]
    fn raw_buffers_on_an_encrypted_image() {
        crate::crypto::secret::define("rawpath-qcow2-sec", b"rawpath".to_vec());
        block_on(async {
            let p = TempPath::new("rawpath-luks.qcow2");
            create(
                &p.0,
                "qcow2",
                &[
                    ("size", "1M"),
                    ("encrypt.format", "luks"),
                    ("encrypt.key-secret", "rawpath-qcow2-sec"),
                    ("encrypt.iter-time", "10"),
                ],
            )
            .await;
            let b = open(&p.0, "encrypt.key-secret=rawpath-qcow2-sec").await;
            check_raw_path(&b).await;
            b.close().await.expect("close");
        });
    }
}
