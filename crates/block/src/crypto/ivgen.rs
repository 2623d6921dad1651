//! IV generators: `plain` (32-bit sector number), `plain64` (64-bit) and `essiv` (the
//! sector number encrypted with a key hashed from the data key), little-endian and
//! padded to the cipher's block, as dm-crypt and QEMU define them.

use super::cipher::{new_cipher, CipherAlg, CipherMode, SectorCipher};
use super::error::{CryptoError, Result};
use super::hash::HashAlg;

/// An IV generator algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvGenAlg {
    /// The low 32 bits of the sector number.
    Plain,
    /// The sector number.
    Plain64,
    /// Encrypted sector number.
    Essiv,
}

impl IvGenAlg {
    /// Parses QEMU's name.
    pub fn parse_option(key: &str, s: &str) -> Result<IvGenAlg> {
        match s {
            "plain" => Ok(IvGenAlg::Plain),
            "plain64" => Ok(IvGenAlg::Plain64),
            "essiv" => Ok(IvGenAlg::Essiv),
            _ => Err(CryptoError::invalid(format!(
                "Parameter '{key}' does not accept value '{s}'"
            ))),
        }
    }

    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            IvGenAlg::Plain => "plain",
            IvGenAlg::Plain64 => "plain64",
            IvGenAlg::Essiv => "essiv",
        }
    }
}

/// A keyed IV generator.
pub enum IvGen {
    /// `plain`.
    Plain,
    /// `plain64`.
    Plain64,
    /// `essiv`, with its ECB cipher.
    Essiv(Box<dyn SectorCipher>),
}

impl IvGen {
    /// The generator `alg` for data key `key` of cipher `alg_cipher` (`hash` for ESSIV).
    pub fn new(
        alg: IvGenAlg,
        cipher: CipherAlg,
        hash: Option<HashAlg>,
        key: &[u8],
    ) -> Result<IvGen> {
        Ok(match alg {
            IvGenAlg::Plain => IvGen::Plain,
            IvGenAlg::Plain64 => IvGen::Plain64,
            IvGenAlg::Essiv => {
                let hash = hash.ok_or_else(|| {
                    CryptoError::invalid("Missing hash algorithm for essiv ivgen")
                })?;
                let ivc = essiv_cipher(cipher, hash)?;
                let salt = hash.digest(&[key]);
                IvGen::Essiv(new_cipher(ivc, CipherMode::Ecb, &salt)?)
            }
        })
    }

    /// The IV of `sector`.
    pub fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(c) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                c.encrypt_block(&mut iv);
            }
        }
        iv
    }
}

/// The cipher ESSIV encrypts sector numbers with: the data cipher's family, keyed by
/// the digest of the data key (so its key size is the digest size).
pub fn essiv_cipher(cipher: CipherAlg, hash: HashAlg) -> Result<CipherAlg> {
    cipher.with_key_len(hash.digest_len()).ok_or_else(|| {
        CryptoError::invalid(format!(
            "No {} cipher with key size {} available",
            cipher.luks_name().to_uppercase(),
            hash.digest_len()
        ))
    })
}
