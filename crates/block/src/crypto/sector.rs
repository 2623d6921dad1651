//! [`SectorCrypto`]: a cipher and an IV generator, encrypting and decrypting runs of
//! 512-byte sectors in place, each sector's IV taken from its number.

use super::cipher::{new_cipher, CipherAlg, CipherMode, SectorCipher};
use super::error::Result;
use super::hash::HashAlg;
use super::ivgen::{IvGen, IvGenAlg};
use super::SECTOR_SIZE;

/// Encrypts and decrypts sectors with one key.
pub struct SectorCrypto {
    cipher: Box<dyn SectorCipher>,
    ivgen: IvGen,
}

impl SectorCrypto {
    /// Keys `alg` in `mode` with `key`, IVs from `ivgen` (`ivhash` for ESSIV).
    pub fn new(
        alg: CipherAlg,
        mode: CipherMode,
        ivgen: IvGenAlg,
        ivhash: Option<HashAlg>,
        key: &[u8],
    ) -> Result<SectorCrypto> {
        Ok(SectorCrypto {
            cipher: new_cipher(alg, mode, key)?,
            ivgen: IvGen::new(ivgen, alg, ivhash, key)?,
        })
    }

    /// Encrypts `buf` (whole sectors) whose first sector is number `sector`.
    pub fn encrypt(&self, sector: u64, buf: &mut [u8]) {
        for (i, s) in buf.chunks_mut(SECTOR_SIZE as usize).enumerate() {
            let iv = self.ivgen.iv(sector + i as u64);
            self.cipher.encrypt(s, &iv);
        }
    }

    /// Decrypts `buf` (whole sectors) whose first sector is number `sector`.
    pub fn decrypt(&self, sector: u64, buf: &mut [u8]) {
        for (i, s) in buf.chunks_mut(SECTOR_SIZE as usize).enumerate() {
            let iv = self.ivgen.iv(sector + i as u64);
            self.cipher.decrypt(s, &iv);
        }
    }
}
