//! The LUKS1 partition header: 592 big-endian bytes (magic, cipher and hash names, the
//! master key digest, UUID) followed by eight key slot descriptors. Parsing checks
//! everything QEMU checks, plus bounds that keep a hostile header from asking for absurd
//! work (iteration counts, key sizes).

use crate::crypto::error::{CryptoError, Result};

/// The header's length in bytes.
pub const HEADER_LEN: usize = 592;
/// Magic bytes.
pub const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
/// Key slots.
pub const NUM_SLOTS: usize = 8;
/// Anti-forensic stripes of every key slot.
pub const STRIPES: u32 = 4000;
/// Length of salts.
pub const SALT_LEN: usize = 32;
/// Length of the master key digest.
pub const DIGEST_LEN: usize = 20;
/// Where the first key slot's material starts, in bytes.
pub const KEY_SLOT_OFFSET: u64 = 4096;
/// Key material areas are aligned to this many bytes.
pub const KEY_SLOT_ALIGN: u64 = 4096;
/// Sector size of offsets in the header.
pub const SECTOR: u64 = 512;
/// `active` value of an enabled key slot.
pub const SLOT_ENABLED: u32 = 0x00AC_71F3;
/// `active` value of a disabled key slot.
pub const SLOT_DISABLED: u32 = 0x0000_DEAD;
/// The largest key (XTS with AES-256) rqemu accepts.
pub const MAX_KEY_BYTES: u32 = 64;
/// The most PBKDF2 iterations rqemu runs for one key slot or digest check: several
/// times what LUKS tools choose for 2 seconds on fast machines, and small enough that a
/// hostile header costs seconds, not hours.
pub const MAX_ITERATIONS: u32 = 1 << 25;

/// One key slot descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlot {
    /// Whether the slot holds a key.
    pub active: bool,
    /// PBKDF2 iterations for the slot key.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; SALT_LEN],
    /// Where the key material starts, in sectors from the header's start.
    pub key_offset: u32,
    /// Anti-forensic stripes.
    pub stripes: u32,
}

/// A LUKS1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksHeader {
    /// Cipher family (`aes`).
    pub cipher_name: String,
    /// Mode and IV generator (`xts-plain64`, `cbc-essiv:sha256`).
    pub cipher_mode: String,
    /// Hash of PBKDF2 and the splitter (`sha256`).
    pub hash_spec: String,
    /// Start of the encrypted payload, in sectors.
    pub payload_offset: u32,
    /// Master key length in bytes.
    pub key_bytes: u32,
    /// PBKDF2 digest of the master key.
    pub mk_digest: [u8; DIGEST_LEN],
    /// Salt of that digest.
    pub mk_digest_salt: [u8; SALT_LEN],
    /// Iterations of that digest.
    pub mk_digest_iter: u32,
    /// UUID text.
    pub uuid: String,
    /// Key slots.
    pub slots: [KeySlot; NUM_SLOTS],
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn c_string(b: &[u8], what: &str) -> Result<String> {
    let end = b
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| CryptoError::corrupt(format!("LUKS header {what} is not NUL terminated")))?;
    Ok(String::from_utf8_lossy(&b[..end]).into_owned())
}

fn put_str(b: &mut [u8], s: &str) {
    let n = s.len().min(b.len() - 1);
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// Sectors of one slot's key material.
pub fn material_sectors(key_bytes: u32, stripes: u32) -> u64 {
    (key_bytes as u64 * stripes as u64).div_ceil(SECTOR)
}

impl LuksHeader {
    /// Parses and validates a header.
    pub fn parse(b: &[u8]) -> Result<LuksHeader> {
        if b.len() < HEADER_LEN || &b[..6] != MAGIC {
            return Err(CryptoError::corrupt("Volume is not in LUKS format"));
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(CryptoError::corrupt(format!(
                "LUKS version {version} is not supported"
            )));
        }
        let mut slots: [KeySlot; NUM_SLOTS] = std::array::from_fn(|_| KeySlot {
            active: false,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_offset: 0,
            stripes: 0,
        });
        let mut raw_active = [0u32; NUM_SLOTS];
        for (i, s) in slots.iter_mut().enumerate() {
            let o = 208 + i * 48;
            raw_active[i] = be32(b, o);
            s.active = raw_active[i] == SLOT_ENABLED;
            s.iterations = be32(b, o + 4);
            s.salt.copy_from_slice(&b[o + 8..o + 40]);
            s.key_offset = be32(b, o + 40);
            s.stripes = be32(b, o + 44);
        }
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(&b[112..132]);
        let mut mk_digest_salt = [0u8; SALT_LEN];
        mk_digest_salt.copy_from_slice(&b[132..164]);
        let h = LuksHeader {
            cipher_name: c_string(&b[8..40], "cipher name")?,
            cipher_mode: c_string(&b[40..72], "cipher mode")?,
            hash_spec: c_string(&b[72..104], "hash spec")?,
            payload_offset: be32(b, 104),
            key_bytes: be32(b, 108),
            mk_digest,
            mk_digest_salt,
            mk_digest_iter: be32(b, 164),
            uuid: c_string(&b[168..208], "uuid")?,
            slots,
        };
        h.validate(&raw_active)?;
        Ok(h)
    }

    fn validate(&self, raw_active: &[u32; NUM_SLOTS]) -> Result<()> {
        let header_sectors = KEY_SLOT_OFFSET / SECTOR;
        if (self.payload_offset as u64) < header_sectors {
            return Err(CryptoError::corrupt(
                "LUKS payload is overlapping with the header",
            ));
        }
        if self.mk_digest_iter == 0 {
            return Err(CryptoError::corrupt("LUKS key iteration count is zero"));
        }
        if self.mk_digest_iter > MAX_ITERATIONS {
            return Err(CryptoError::corrupt(format!(
                "LUKS key iteration count {} is too large",
                self.mk_digest_iter
            )));
        }
        if self.key_bytes == 0 || self.key_bytes > MAX_KEY_BYTES {
            return Err(CryptoError::corrupt(format!(
                "LUKS key size {} is not supported",
                self.key_bytes
            )));
        }
        for (i, s) in self.slots.iter().enumerate() {
            if s.stripes != STRIPES {
                return Err(CryptoError::corrupt(format!(
                    "Keyslot {i} is corrupted (stripes {} != {STRIPES})",
                    s.stripes as i32
                )));
            }
            if raw_active[i] != SLOT_ENABLED && raw_active[i] != SLOT_DISABLED {
                return Err(CryptoError::corrupt(format!(
                    "Keyslot {i} state (active/disable) is corrupted"
                )));
            }
            if s.active && s.iterations == 0 {
                return Err(CryptoError::corrupt(format!(
                    "Keyslot {i} iteration count is zero"
                )));
            }
            if s.active && s.iterations > MAX_ITERATIONS {
                return Err(CryptoError::corrupt(format!(
                    "Keyslot {i} iteration count {} is too large",
                    s.iterations
                )));
            }
            let start = s.key_offset as u64;
            let len = material_sectors(self.key_bytes, s.stripes);
            if start < header_sectors {
                return Err(CryptoError::corrupt(format!(
                    "Keyslot {i} is overlapping with the LUKS header"
                )));
            }
            if start + len > self.payload_offset as u64 {
                return Err(CryptoError::corrupt(format!(
                    "Keyslot {i} is overlapping with the encrypted payload"
                )));
            }
            for (j, t) in self.slots.iter().enumerate().skip(i + 1) {
                let s2 = t.key_offset as u64;
                let l2 = material_sectors(self.key_bytes, t.stripes);
                if start < s2 + l2 && s2 < start + len {
                    return Err(CryptoError::corrupt(format!(
                        "Keyslots {i} and {j} are overlapping in the header"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The header's bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..6].copy_from_slice(MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        put_str(&mut b[8..40], &self.cipher_name);
        put_str(&mut b[40..72], &self.cipher_mode);
        put_str(&mut b[72..104], &self.hash_spec);
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_digest_salt);
        b[164..168].copy_from_slice(&self.mk_digest_iter.to_be_bytes());
        put_str(&mut b[168..208], &self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let o = 208 + i * 48;
            let active = if s.active {
                SLOT_ENABLED
            } else {
                SLOT_DISABLED
            };
            b[o..o + 4].copy_from_slice(&active.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[o + 8..o + 40].copy_from_slice(&s.salt);
            b[o + 40..o + 44].copy_from_slice(&s.key_offset.to_be_bytes());
            b[o + 44..o + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }

    /// Bytes of one slot's key material.
    pub fn material_len(&self) -> usize {
        self.key_bytes as usize * STRIPES as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage() {
        assert!(LuksHeader::parse(&[0u8; 10]).is_err());
        let mut b = [0u8; HEADER_LEN];
        b[..6].copy_from_slice(MAGIC);
        b[7] = 1;
        assert!(LuksHeader::parse(&b).is_err());
    }
}
