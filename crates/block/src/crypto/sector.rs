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
        self.parallel(sector, buf, true);
    }

    /// Decrypts `buf` (whole sectors) whose first sector is number `sector`.
    pub fn decrypt(&self, sector: u64, buf: &mut [u8]) {
        self.parallel(sector, buf, false);
    }

    /// Large buffers are cut into one piece per CPU (up to [`MAX_THREADS`]), each
    /// transformed on its own thread, as QEMU spreads encryption over its thread pool.
    fn parallel(&self, sector: u64, buf: &mut [u8], encrypt: bool) {
        let threads = threads();
        if threads < 2 || buf.len() < PARALLEL_MIN {
            return self.run(sector, buf, encrypt);
        }
        let per = buf.len().div_ceil(threads).div_ceil(SECTOR_SIZE as usize) * SECTOR_SIZE as usize;
        std::thread::scope(|s| {
            let mut pieces = buf.chunks_mut(per).enumerate();
            let first = pieces.next();
            for (i, piece) in pieces {
                let start = sector + (i * per) as u64 / SECTOR_SIZE;
                s.spawn(move || self.run(start, piece, encrypt));
            }
            if let Some((_, piece)) = first {
                self.run(sector, piece, encrypt);
            }
        });
    }

    fn run(&self, sector: u64, buf: &mut [u8], encrypt: bool) {
        for (i, s) in buf.chunks_mut(SECTOR_SIZE as usize).enumerate() {
            let iv = self.ivgen.iv(sector + i as u64);
            if encrypt {
                self.cipher.encrypt(s, &iv);
            } else {
                self.cipher.decrypt(s, &iv);
            }
        }
    }
}

/// Buffers at least this large are transformed on several threads.
const PARALLEL_MIN: usize = 256 << 10;
/// Most threads one buffer is spread over.
const MAX_THREADS: usize = 4;

fn threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(MAX_THREADS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::cipher::{CipherAlg, CipherMode};
    use crate::crypto::ivgen::IvGenAlg;

    #[test]
    fn parallel_equals_serial() {
        let c = SectorCrypto::new(
            CipherAlg::Aes256,
            CipherMode::Xts,
            IvGenAlg::Plain64,
            None,
            &[3u8; 64],
        )
        .unwrap();
        let data: Vec<u8> = (0..(1usize << 20) + 512).map(|i| (i % 253) as u8).collect();
        let mut a = data.clone();
        c.encrypt(77, &mut a);
        let mut b = data.clone();
        for (i, s) in b.chunks_mut(512).enumerate() {
            c.run(77 + i as u64, s, true);
        }
        assert_eq!(a, b);
        c.decrypt(77, &mut a);
        assert_eq!(a, data);
    }
}
