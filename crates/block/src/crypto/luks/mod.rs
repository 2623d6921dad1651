//! LUKS1: creating a header with one key slot, opening (unlocking the master key with
//! a password), the information `qemu-img info` shows, and amending key slots.
//!
//! [`header`] is the on-disk header, [`afsplit`] the anti-forensic splitter,
//! [`keyslot`] the per-slot key derivation and storage. The data cipher, IV generator
//! and hash come from the header's names ([`LuksParams`]).

pub mod afsplit;
pub mod header;
pub mod keyslot;

use serde_json::{json, Map, Value};

use super::area::HeaderArea;
use super::cipher::{CipherAlg, CipherMode};
use super::error::{CryptoError, Result};
use super::hash::HashAlg;
use super::ivgen::{essiv_cipher, IvGenAlg};
use super::random;
use super::secret;
use super::sector::SectorCrypto;
use header::{
    material_sectors, KeySlot, LuksHeader, KEY_SLOT_ALIGN, KEY_SLOT_OFFSET, NUM_SLOTS, SALT_LEN,
    SECTOR, STRIPES,
};

/// Fewest PBKDF2 iterations of the master key digest.
const MIN_DIGEST_ITERS: u64 = 1000;
/// Fewest PBKDF2 iterations of a key slot.
const MIN_SLOT_ITERS: u64 = 1000;
/// Default `iter-time` in milliseconds.
pub const DEFAULT_ITER_TIME: u64 = 2000;

/// The algorithms a LUKS volume uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LuksParams {
    /// Data cipher.
    pub cipher: CipherAlg,
    /// Its mode.
    pub mode: CipherMode,
    /// IV generator.
    pub ivgen: IvGenAlg,
    /// Hash of the IV generator, if it names one.
    pub ivhash: Option<HashAlg>,
    /// Hash of PBKDF2 and the splitter.
    pub hash: HashAlg,
}

impl LuksParams {
    /// The algorithms a header names.
    pub fn from_header(h: &LuksHeader) -> Result<LuksParams> {
        let (mode_name, ivspec) = h.cipher_mode.split_once('-').ok_or_else(|| {
            CryptoError::invalid(format!(
                "Unexpected cipher mode string format {}",
                h.cipher_mode
            ))
        })?;
        let mode = CipherMode::parse_option("cipher-mode", mode_name)?;
        let (ivname, ivhash) = match ivspec.split_once(':') {
            Some((n, hname)) => (
                n,
                Some(HashAlg::parse(hname).ok_or_else(|| {
                    CryptoError::invalid(format!("Unsupported hash algorithm name {hname}"))
                })?),
            ),
            None => (ivspec, None),
        };
        let ivgen = IvGenAlg::parse_option("ivgen-alg", ivname)?;
        let key_len = if mode == CipherMode::Xts {
            h.key_bytes as usize / 2
        } else {
            h.key_bytes as usize
        };
        if mode == CipherMode::Xts && !h.key_bytes.is_multiple_of(2) {
            return Err(CryptoError::invalid(format!(
                "Cipher '{}' with key size {} bits not supported",
                h.cipher_name,
                h.key_bytes * 8
            )));
        }
        let cipher = CipherAlg::from_luks_name(&h.cipher_name, key_len)?;
        if ivgen == IvGenAlg::Essiv {
            let ivh = ivhash
                .ok_or_else(|| CryptoError::invalid("Missing IV generator hash specification"))?;
            essiv_cipher(cipher, ivh)?;
        }
        let hash = HashAlg::parse(&h.hash_spec).ok_or_else(|| {
            CryptoError::invalid(format!("Unsupported hash algorithm name {}", h.hash_spec))
        })?;
        Ok(LuksParams {
            cipher,
            mode,
            ivgen,
            ivhash,
            hash,
        })
    }

    /// The header's mode string (`xts-plain64`, `cbc-essiv:sha256`).
    pub fn mode_spec(&self) -> String {
        match self.ivhash {
            Some(h) => format!("{}-{}:{}", self.mode.name(), self.ivgen.name(), h.name()),
            None => format!("{}-{}", self.mode.name(), self.ivgen.name()),
        }
    }

    /// Master key length.
    pub fn key_bytes(&self) -> u32 {
        self.mode.key_len(self.cipher) as u32
    }

    /// A data sector cipher keyed with `key`.
    pub fn sector_crypto(&self, key: &[u8]) -> Result<SectorCrypto> {
        SectorCrypto::new(self.cipher, self.mode, self.ivgen, self.ivhash, key)
    }
}

/// Options of a new LUKS volume (QEMU's `QCryptoBlockCreateOptionsLUKS`).
#[derive(Debug, Clone)]
pub struct LuksCreateOptions {
    /// Id of the secret holding the password of key slot 0.
    pub key_secret: String,
    /// The algorithms.
    pub params: LuksParams,
    /// Milliseconds of PBKDF2 work per key.
    pub iter_time: u64,
}

impl LuksCreateOptions {
    /// Reads QEMU's creation options through `get` (keys without a prefix:
    /// `key-secret`, `cipher-alg`, ...); `prefix` is how the user spelled them
    /// (`encrypt.` for qcow2), for messages.
    pub fn from_options(
        prefix: &str,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<LuksCreateOptions> {
        let key = |k: &str| format!("{prefix}{k}");
        let cipher = match get("cipher-alg") {
            Some(v) => CipherAlg::parse_option("cipher-alg", &v)?,
            None => CipherAlg::Aes256,
        };
        let mode = match get("cipher-mode") {
            Some(v) => CipherMode::parse_option("cipher-mode", &v)?,
            None => CipherMode::Xts,
        };
        let ivgen = match get("ivgen-alg") {
            Some(v) => IvGenAlg::parse_option("ivgen-alg", &v)?,
            None => IvGenAlg::Plain64,
        };
        let mut ivhash = match get("ivgen-hash-alg") {
            Some(v) => Some(HashAlg::parse_option("ivgen-hash-alg", &v)?),
            None => None,
        };
        if ivgen == IvGenAlg::Essiv && ivhash.is_none() {
            ivhash = Some(HashAlg::Sha256);
        }
        let hash = match get("hash-alg") {
            Some(v) => HashAlg::parse_option("hash-alg", &v)?,
            None => HashAlg::Sha256,
        };
        if ivgen == IvGenAlg::Essiv {
            essiv_cipher(cipher, ivhash.unwrap_or(HashAlg::Sha256))?;
        }
        let iter_time = match get("iter-time") {
            Some(v) => parse_iter_time(&v)?,
            None => DEFAULT_ITER_TIME,
        };
        let key_secret = get("key-secret").ok_or_else(|| {
            CryptoError::invalid(format!(
                "Parameter '{}' is required for cipher",
                key("key-secret")
            ))
        })?;
        Ok(LuksCreateOptions {
            key_secret,
            params: LuksParams {
                cipher,
                mode,
                ivgen,
                ivhash,
                hash,
            },
            iter_time,
        })
    }
}

/// Parses `iter-time` (milliseconds).
pub fn parse_iter_time(v: &str) -> Result<u64> {
    rqemu_opts::parse_c_u64(v)
        .ok()
        .filter(|&n| n <= u32::MAX as u64)
        .ok_or_else(|| {
            CryptoError::invalid(format!(
                "Parameter 'iter-time' expects a number of milliseconds, got '{v}'"
            ))
        })
}

/// The key slot layout for a master key of `key_bytes`: each slot's material offset
/// (sectors) and the payload offset (sectors).
pub fn layout(key_bytes: u32) -> ([u32; NUM_SLOTS], u32) {
    let header_sectors = KEY_SLOT_OFFSET / SECTOR;
    let per_slot = material_sectors(key_bytes, STRIPES).next_multiple_of(KEY_SLOT_ALIGN / SECTOR);
    let offsets = std::array::from_fn(|i| (header_sectors + i as u64 * per_slot) as u32);
    (
        offsets,
        (header_sectors + NUM_SLOTS as u64 * per_slot) as u32,
    )
}

/// Bytes a LUKS header with its key material takes for a master key of `key_bytes`.
pub fn header_len(key_bytes: u32) -> u64 {
    layout(key_bytes).1 as u64 * SECTOR
}

/// PBKDF2 iterations for `iter_time` ms at `per_sec`, divided by `div`, at least `min`.
fn scale_iters(per_sec: u64, iter_time: u64, div: u64, min: u64) -> Result<u32> {
    let n = (per_sec as u128 * iter_time as u128 / 1000 / div as u128).max(min as u128);
    u32::try_from(n)
        .map_err(|_| CryptoError::invalid(format!("PBKDF iterations {n} larger than {}", u32::MAX)))
}

/// Slot iterations for `password` under `params` and `iter_time`.
fn slot_iters(params: &LuksParams, password: &[u8], iter_time: u64) -> Result<u32> {
    let salt = random::bytes(SALT_LEN)?;
    let per_sec = params
        .hash
        .pbkdf2_iters_per_sec(password, &salt, params.key_bytes() as usize);
    scale_iters(per_sec, iter_time, 1, MIN_SLOT_ITERS)
}

/// An open LUKS volume.
pub struct Luks {
    /// The header as last written or read.
    pub header: LuksHeader,
    /// Its algorithms.
    pub params: LuksParams,
    /// The master key, once unlocked.
    master_key: Option<Vec<u8>>,
}

impl Luks {
    /// Creates a volume in `area`: a new master key in slot 0 under the password of
    /// `opts.key_secret`. The area must be [`header_len`] bytes and read as zeroes.
    pub async fn create(area: &HeaderArea, opts: &LuksCreateOptions) -> Result<Luks> {
        let password = secret::lookup_utf8(&opts.key_secret)?.into_bytes();
        let p = opts.params;
        let key_bytes = p.key_bytes();
        let master_key = random::bytes(key_bytes as usize)?;
        let mut mk_digest_salt = [0u8; SALT_LEN];
        random::fill(&mut mk_digest_salt)?;
        let per_sec = p
            .hash
            .pbkdf2_iters_per_sec(&master_key, &mk_digest_salt, header::DIGEST_LEN);
        let mk_digest_iter = scale_iters(per_sec, opts.iter_time, 8, MIN_DIGEST_ITERS)?;
        let mut mk_digest = [0u8; header::DIGEST_LEN];
        p.hash
            .pbkdf2(&master_key, &mk_digest_salt, mk_digest_iter, &mut mk_digest);
        let (offsets, payload_offset) = layout(key_bytes);
        let mut h = LuksHeader {
            cipher_name: p.cipher.luks_name().to_string(),
            cipher_mode: p.mode_spec(),
            hash_spec: p.hash.name().to_string(),
            payload_offset,
            key_bytes,
            mk_digest,
            mk_digest_salt,
            mk_digest_iter,
            uuid: random::uuid()?,
            slots: std::array::from_fn(|i| KeySlot {
                active: false,
                iterations: 0,
                salt: [0; SALT_LEN],
                key_offset: offsets[i],
                stripes: STRIPES,
            }),
        };
        area.write(0, &h.to_bytes()).await?;
        let iters = slot_iters(&p, &password, opts.iter_time)?;
        keyslot::store(area, &p, &mut h, 0, &password, &master_key, iters).await?;
        Ok(Luks {
            header: h,
            params: p,
            master_key: Some(master_key),
        })
    }

    /// Opens the volume in `area`. With `secret_id`, unlocks the master key with its
    /// password; without, only the header is read (for `info`).
    pub async fn open(area: &HeaderArea, secret_id: Option<&str>) -> Result<Luks> {
        let mut b = [0u8; header::HEADER_LEN];
        area.read(0, &mut b).await?;
        let h = LuksHeader::parse(&b)?;
        let params = LuksParams::from_header(&h)?;
        let mut luks = Luks {
            header: h,
            params,
            master_key: None,
        };
        if let Some(id) = secret_id {
            let password = secret::lookup_utf8(id)?.into_bytes();
            let key = luks.find_key(area, &password).await?.ok_or_else(|| {
                CryptoError::invalid("Invalid password, cannot unlock any keyslot")
            })?;
            params.sector_crypto(&key)?;
            luks.master_key = Some(key);
        }
        Ok(luks)
    }

    /// The master key from the first slot `password` unlocks, and that slot.
    async fn find_key(&self, area: &HeaderArea, password: &[u8]) -> Result<Option<Vec<u8>>> {
        for i in 0..NUM_SLOTS {
            if let Some(k) =
                keyslot::unlock_slot(area, &self.params, &self.header, i, password).await?
            {
                return Ok(Some(k));
            }
        }
        Ok(None)
    }

    /// The data cipher, when the master key is unlocked.
    pub fn sector_crypto(&self) -> Result<Option<SectorCrypto>> {
        match &self.master_key {
            Some(k) => Ok(Some(self.params.sector_crypto(k)?)),
            None => Ok(None),
        }
    }

    /// Bytes of the header and key material.
    pub fn header_len(&self) -> u64 {
        self.header.payload_offset as u64 * SECTOR
    }

    /// QEMU's `QCryptoBlockInfoLUKS` (what `info` prints under `encrypt:`).
    pub fn info(&self) -> Map<String, Value> {
        let h = &self.header;
        let p = &self.params;
        let mut d = Map::new();
        d.insert("format".into(), json!("luks"));
        d.insert("cipher-alg".into(), json!(p.cipher.name()));
        d.insert("cipher-mode".into(), json!(p.mode.name()));
        d.insert("ivgen-alg".into(), json!(p.ivgen.name()));
        if let (IvGenAlg::Essiv, Some(ih)) = (p.ivgen, p.ivhash) {
            d.insert("ivgen-hash-alg".into(), json!(ih.name()));
        }
        d.insert("hash-alg".into(), json!(p.hash.name()));
        d.insert("detached-header".into(), json!(false));
        d.insert("payload-offset".into(), json!(self.header_len()));
        d.insert("master-key-iters".into(), json!(h.mk_digest_iter));
        d.insert("uuid".into(), json!(h.uuid));
        let slots: Vec<Value> = h
            .slots
            .iter()
            .map(|s| {
                let mut o = Map::new();
                o.insert("active".into(), json!(s.active));
                if s.active {
                    o.insert("iters".into(), json!(s.iterations));
                    o.insert("stripes".into(), json!(s.stripes));
                }
                o.insert("key-offset".into(), json!(s.key_offset as u64 * SECTOR));
                Value::Object(o)
            })
            .collect();
        d.insert("slots".into(), Value::Array(slots));
        d
    }

    /// Changes key slots as `qemu-img amend` asks.
    pub async fn amend(
        &mut self,
        area: &HeaderArea,
        o: &LuksAmendOptions,
        force: bool,
    ) -> Result<()> {
        if let Some(k) = o.keyslot {
            if !(0..NUM_SLOTS as i64).contains(&k) {
                return Err(CryptoError::invalid(format!(
                    "Invalid keyslot {k} specified, must be between 0 and {}",
                    NUM_SLOTS - 1
                )));
            }
        }
        if o.active {
            self.add_keyslot(area, o, force).await
        } else {
            self.erase_keyslots(area, o, force).await
        }
    }

    async fn add_keyslot(
        &mut self,
        area: &HeaderArea,
        o: &LuksAmendOptions,
        force: bool,
    ) -> Result<()> {
        let new_id = o.new_secret.as_deref().ok_or_else(|| {
            CryptoError::invalid("'new-secret' is required to activate a keyslot")
        })?;
        let slot = match o.keyslot {
            Some(k) => {
                let k = k as usize;
                if self.header.slots[k].active && !force {
                    return Err(CryptoError::invalid(format!(
                        "Refusing to overwrite active keyslot {k} - please erase it first"
                    )));
                }
                k
            }
            None => self
                .header
                .slots
                .iter()
                .position(|s| !s.active)
                .ok_or_else(|| {
                    CryptoError::invalid("Can't add a keyslot - all keyslots are in use")
                })?,
        };
        let master_key = match &o.old_secret {
            Some(id) => {
                let pw = secret::lookup_utf8(id)?.into_bytes();
                self.find_key(area, &pw).await?.ok_or_else(|| {
                    CryptoError::invalid("Invalid password, cannot unlock any keyslot")
                })?
            }
            None => self.master_key.clone().ok_or_else(|| {
                CryptoError::invalid("Invalid password, cannot unlock any keyslot")
            })?,
        };
        let password = secret::lookup_utf8(new_id)?.into_bytes();
        let iters = slot_iters(
            &self.params,
            &password,
            o.iter_time.unwrap_or(DEFAULT_ITER_TIME),
        )?;
        let p = self.params;
        keyslot::store(
            area,
            &p,
            &mut self.header,
            slot,
            &password,
            &master_key,
            iters,
        )
        .await
    }

    async fn erase_keyslots(
        &mut self,
        area: &HeaderArea,
        o: &LuksAmendOptions,
        force: bool,
    ) -> Result<()> {
        if o.new_secret.is_some() {
            return Err(CryptoError::invalid(
                "'new-secret' must not be given when erasing keyslots",
            ));
        }
        let old_password = match &o.old_secret {
            Some(id) => Some(secret::lookup_utf8(id)?.into_bytes()),
            None => None,
        };
        let active = self.header.slots.iter().filter(|s| s.active).count();
        if let Some(k) = o.keyslot {
            let k = k as usize;
            if let Some(pw) = &old_password {
                let opened = keyslot::unlock_slot(area, &self.params, &self.header, k, pw).await?;
                if opened.is_none() {
                    return Err(CryptoError::invalid(format!(
                        "Given keyslot {k} doesn't contain the given old password for erase operation"
                    )));
                }
            }
            if !self.header.slots[k].active && !force {
                return Err(CryptoError::invalid(format!(
                    "Given keyslot {k} is already erased (inactive) "
                )));
            }
            if self.header.slots[k].active && active == 1 && !force {
                return Err(CryptoError::invalid(format!(
                    "Attempt to erase the only active keyslot {k} which will erase all the data in the image irreversibly - refusing operation"
                )));
            }
            return keyslot::erase(area, &mut self.header, k).await;
        }
        let Some(pw) = old_password else {
            return Err(CryptoError::invalid(
                "To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given",
            ));
        };
        let mut matching = Vec::new();
        for i in 0..NUM_SLOTS {
            if keyslot::unlock_slot(area, &self.params, &self.header, i, &pw)
                .await?
                .is_some()
            {
                matching.push(i);
            }
        }
        if matching.is_empty() {
            return Err(CryptoError::invalid(
                "No keyslots match given (old) password for erase operation",
            ));
        }
        if matching.len() == active && !force {
            return Err(CryptoError::invalid(
                "All the active keyslots match the (old) password that was given and erasing them will erase all the data in the image irreversibly - refusing operation",
            ));
        }
        for i in matching {
            keyslot::erase(area, &mut self.header, i).await?;
        }
        Ok(())
    }
}

/// What `qemu-img amend` asks of LUKS key slots.
#[derive(Debug, Clone, Default)]
pub struct LuksAmendOptions {
    /// `state=active` (add a key) or `inactive` (erase keys).
    pub active: bool,
    /// The slot to change.
    pub keyslot: Option<i64>,
    /// Secret id of the password to erase, or to unlock the master key with.
    pub old_secret: Option<String>,
    /// Secret id of the password to add.
    pub new_secret: Option<String>,
    /// PBKDF2 time of the new slot in milliseconds.
    pub iter_time: Option<u64>,
}

/// Parses and validates a LUKS header from its bytes, unlocking nothing (for checks of
/// untrusted input).
pub fn parse_header(bytes: &[u8]) -> Result<(LuksHeader, LuksParams)> {
    let h = LuksHeader::parse(bytes)?;
    let p = LuksParams::from_header(&h)?;
    Ok((h, p))
}
