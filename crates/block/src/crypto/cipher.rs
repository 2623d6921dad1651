//! Ciphers and modes: QEMU's names for them, and keyed sector ciphers built on the
//! RustCrypto implementations (AES in ECB, CBC and XTS modes).

use aes::cipher::array::Array;
use aes::cipher::consts::U16;
use aes::cipher::{
    BlockCipherDecrypt, BlockCipherEncrypt, BlockModeDecrypt, BlockModeEncrypt, BlockSizeUser,
    InnerIvInit, KeyInit,
};

use super::error::{CryptoError, Result};

/// A cipher algorithm with its key size, as QEMU names it (`aes-256`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherAlg {
    /// AES with a 128-bit key.
    Aes128,
    /// AES with a 192-bit key.
    Aes192,
    /// AES with a 256-bit key.
    Aes256,
}

/// Cipher names QEMU accepts but rqemu does not implement.
const UNIMPLEMENTED: &[&str] = &[
    "des",
    "3des",
    "cast5-128",
    "serpent-128",
    "serpent-192",
    "serpent-256",
    "twofish-128",
    "twofish-192",
    "twofish-256",
    "sm4",
];

impl CipherAlg {
    /// Parses a QEMU option value (`encrypt.cipher-alg`).
    pub fn parse_option(key: &str, s: &str) -> Result<CipherAlg> {
        match s {
            "aes-128" => Ok(CipherAlg::Aes128),
            "aes-192" => Ok(CipherAlg::Aes192),
            "aes-256" => Ok(CipherAlg::Aes256),
            _ if UNIMPLEMENTED.contains(&s) => Err(CryptoError::invalid(format!(
                "Cipher algorithm {s} not supported by this build of rqemu"
            ))),
            _ => Err(CryptoError::invalid(format!(
                "Parameter '{key}' does not accept value '{s}'"
            ))),
        }
    }

    /// The algorithm a LUKS header names (`aes`) with a key of `key_len` bytes.
    pub fn from_luks_name(name: &str, key_len: usize) -> Result<CipherAlg> {
        match (name, key_len) {
            ("aes", 16) => Ok(CipherAlg::Aes128),
            ("aes", 24) => Ok(CipherAlg::Aes192),
            ("aes", 32) => Ok(CipherAlg::Aes256),
            _ => Err(CryptoError::invalid(format!(
                "Cipher '{name}' with key size {} bits not supported",
                key_len * 8
            ))),
        }
    }

    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 => "aes-128",
            CipherAlg::Aes192 => "aes-192",
            CipherAlg::Aes256 => "aes-256",
        }
    }

    /// The family name a LUKS header stores.
    pub fn luks_name(self) -> &'static str {
        "aes"
    }

    /// Key length in bytes.
    pub fn key_len(self) -> usize {
        match self {
            CipherAlg::Aes128 => 16,
            CipherAlg::Aes192 => 24,
            CipherAlg::Aes256 => 32,
        }
    }

    /// The algorithm of the same family whose key is `len` bytes (ESSIV keys its IV
    /// cipher with a digest).
    pub fn with_key_len(self, len: usize) -> Option<CipherAlg> {
        match len {
            16 => Some(CipherAlg::Aes128),
            24 => Some(CipherAlg::Aes192),
            32 => Some(CipherAlg::Aes256),
            _ => None,
        }
    }
}

/// A block cipher mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherMode {
    /// Electronic codebook (no IV).
    Ecb,
    /// Cipher block chaining.
    Cbc,
    /// XEX with ciphertext stealing (two keys).
    Xts,
}

impl CipherMode {
    /// Parses QEMU's name (`ctr` is QEMU's too, but rqemu does not implement it).
    pub fn parse_option(key: &str, s: &str) -> Result<CipherMode> {
        match s {
            "ecb" => Ok(CipherMode::Ecb),
            "cbc" => Ok(CipherMode::Cbc),
            "xts" => Ok(CipherMode::Xts),
            "ctr" => Err(CryptoError::invalid(
                "Cipher mode ctr not supported by this build of rqemu",
            )),
            _ => Err(CryptoError::invalid(format!(
                "Parameter '{key}' does not accept value '{s}'"
            ))),
        }
    }

    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Ecb => "ecb",
            CipherMode::Cbc => "cbc",
            CipherMode::Xts => "xts",
        }
    }

    /// Key bytes this mode needs for `alg` (XTS takes two keys).
    pub fn key_len(self, alg: CipherAlg) -> usize {
        match self {
            CipherMode::Xts => 2 * alg.key_len(),
            _ => alg.key_len(),
        }
    }
}

/// A keyed cipher that transforms whole sectors in place, given each sector's IV.
pub trait SectorCipher: Send + Sync {
    /// Encrypts `buf` (a multiple of 16 bytes) with `iv`.
    fn encrypt(&self, buf: &mut [u8], iv: &[u8; 16]);
    /// Decrypts `buf` (a multiple of 16 bytes) with `iv`.
    fn decrypt(&self, buf: &mut [u8], iv: &[u8; 16]);
    /// Encrypts one 16-byte block with no chaining (ESSIV's IV cipher).
    fn encrypt_block(&self, block: &mut [u8; 16]);
}

fn blocks(buf: &mut [u8]) -> &mut [Array<u8, U16>] {
    Array::<u8, U16>::slice_as_chunks_mut(buf).0
}

struct Ecb<C>(C);

impl<C> SectorCipher for Ecb<C>
where
    C: BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16> + Send + Sync,
{
    fn encrypt(&self, buf: &mut [u8], _iv: &[u8; 16]) {
        self.0.encrypt_blocks(blocks(buf));
    }
    fn decrypt(&self, buf: &mut [u8], _iv: &[u8; 16]) {
        self.0.decrypt_blocks(blocks(buf));
    }
    fn encrypt_block(&self, block: &mut [u8; 16]) {
        self.0.encrypt_blocks(blocks(block));
    }
}

struct Cbc<C>(C);

impl<C> SectorCipher for Cbc<C>
where
    C: BlockCipherEncrypt
        + BlockCipherDecrypt
        + BlockSizeUser<BlockSize = U16>
        + Clone
        + Send
        + Sync,
{
    fn encrypt(&self, buf: &mut [u8], iv: &[u8; 16]) {
        let mut m = cbc::Encryptor::<C>::inner_iv_init(self.0.clone(), &Array(*iv));
        m.encrypt_blocks(blocks(buf));
    }
    fn decrypt(&self, buf: &mut [u8], iv: &[u8; 16]) {
        let mut m = cbc::Decryptor::<C>::inner_iv_init(self.0.clone(), &Array(*iv));
        m.decrypt_blocks(blocks(buf));
    }
    fn encrypt_block(&self, block: &mut [u8; 16]) {
        self.0.encrypt_blocks(blocks(block));
    }
}

/// XTS over a block cipher: `data` encrypts data, `tweak` the tweaks. Whole blocks go
/// through the cipher in batches (one call per sector: AES backends that work on many
/// blocks at once are much faster that way); a sector that is not a whole number of
/// blocks (ciphertext stealing, which LUKS never produces) goes to the `xts-mode` crate,
/// which the unit tests also check this against.
struct Xts<C> {
    data: C,
    tweak: C,
    stealing: xts_mode::Xts128<C>,
}

/// Multiplies a tweak by the primitive element of GF(2^128) (little-endian).
fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

/// Most blocks one batch takes (a 512-byte sector).
const XTS_BATCH: usize = 32;

impl<C> Xts<C>
where
    C: BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16> + Send + Sync,
{
    fn run(&self, buf: &mut [u8], iv: &[u8; 16], encrypt: bool) {
        if buf.len() < 16 {
            return;
        }
        if !buf.len().is_multiple_of(16) {
            if encrypt {
                self.stealing.encrypt_sector(buf, Array(*iv));
            } else {
                self.stealing.decrypt_sector(buf, Array(*iv));
            }
            return;
        }
        let mut t = Array(*iv);
        self.tweak.encrypt_block(&mut t);
        let mut t = u128::from_le_bytes(t.0);
        let mut tweaks = [0u128; XTS_BATCH];
        for chunk in buf.chunks_mut(16 * XTS_BATCH) {
            let blocks = blocks(chunk);
            for (b, tw) in blocks.iter_mut().zip(tweaks.iter_mut()) {
                *tw = t;
                b.0 = (u128::from_le_bytes(b.0) ^ t).to_le_bytes();
                t = mul_alpha(t);
            }
            if encrypt {
                self.data.encrypt_blocks(blocks);
            } else {
                self.data.decrypt_blocks(blocks);
            }
            for (b, tw) in blocks.iter_mut().zip(tweaks.iter()) {
                b.0 = (u128::from_le_bytes(b.0) ^ tw).to_le_bytes();
            }
        }
    }
}

impl<C> SectorCipher for Xts<C>
where
    C: BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16> + Send + Sync,
{
    fn encrypt(&self, buf: &mut [u8], iv: &[u8; 16]) {
        self.run(buf, iv, true);
    }
    fn decrypt(&self, buf: &mut [u8], iv: &[u8; 16]) {
        self.run(buf, iv, false);
    }
    fn encrypt_block(&self, block: &mut [u8; 16]) {
        self.data.encrypt_blocks(blocks(block));
    }
}

fn keyed<C: KeyInit>(key: &[u8]) -> Result<C> {
    C::new_from_slice(key).map_err(|_| CryptoError::invalid("Invalid cipher key length"))
}

fn build<C>(mode: CipherMode, key: &[u8]) -> Result<Box<dyn SectorCipher>>
where
    C: BlockCipherEncrypt
        + BlockCipherDecrypt
        + BlockSizeUser<BlockSize = U16>
        + KeyInit
        + Clone
        + Send
        + Sync
        + 'static,
{
    Ok(match mode {
        CipherMode::Ecb => Box::new(Ecb(keyed::<C>(key)?)),
        CipherMode::Cbc => Box::new(Cbc(keyed::<C>(key)?)),
        CipherMode::Xts => {
            let half = key.len() / 2;
            let (k1, k2) = key.split_at(half);
            let (c1, c2) = (keyed::<C>(k1)?, keyed::<C>(k2)?);
            Box::new(Xts {
                stealing: xts_mode::Xts128::new(c1.clone(), c2.clone()),
                data: c1,
                tweak: c2,
            })
        }
    })
}

/// A sector cipher for `alg` in `mode` keyed with `key` (of [`CipherMode::key_len`]).
pub fn new_cipher(alg: CipherAlg, mode: CipherMode, key: &[u8]) -> Result<Box<dyn SectorCipher>> {
    if key.len() != mode.key_len(alg) {
        return Err(CryptoError::invalid(format!(
            "Cipher key length {} must be {}",
            key.len(),
            mode.key_len(alg)
        )));
    }
    match alg {
        CipherAlg::Aes128 => build::<aes::Aes128>(mode, key),
        CipherAlg::Aes192 => build::<aes::Aes192>(mode, key),
        CipherAlg::Aes256 => build::<aes::Aes256>(mode, key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for mode in [CipherMode::Ecb, CipherMode::Cbc, CipherMode::Xts] {
            for alg in [CipherAlg::Aes128, CipherAlg::Aes192, CipherAlg::Aes256] {
                let key = vec![7u8; mode.key_len(alg)];
                let c = new_cipher(alg, mode, &key).unwrap();
                let mut buf: Vec<u8> = (0..512u32).map(|i| i as u8).collect();
                let orig = buf.clone();
                c.encrypt(&mut buf, &[1; 16]);
                assert_ne!(buf, orig);
                c.decrypt(&mut buf, &[1; 16]);
                assert_eq!(buf, orig);
            }
        }
    }

    #[test]
    fn xts_matches_the_xts_mode_crate() {
        for alg in [CipherAlg::Aes128, CipherAlg::Aes256] {
            let key: Vec<u8> = (0..CipherMode::Xts.key_len(alg) as u8)
                .map(|i| i.wrapping_mul(7) + 1)
                .collect();
            let ours = new_cipher(alg, CipherMode::Xts, &key).unwrap();
            let half = key.len() / 2;
            for len in [16usize, 256, 512, 1040] {
                let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
                let iv = [9u8; 16];
                let mut a = data.clone();
                ours.encrypt(&mut a, &iv);
                let mut b = data.clone();
                match alg {
                    CipherAlg::Aes128 => xts_mode::Xts128::new(
                        aes::Aes128::new_from_slice(&key[..half]).unwrap(),
                        aes::Aes128::new_from_slice(&key[half..]).unwrap(),
                    )
                    .encrypt_sector(&mut b, Array(iv)),
                    _ => xts_mode::Xts128::new(
                        aes::Aes256::new_from_slice(&key[..half]).unwrap(),
                        aes::Aes256::new_from_slice(&key[half..]).unwrap(),
                    )
                    .encrypt_sector(&mut b, Array(iv)),
                }
                assert_eq!(a, b, "{alg:?} {len}");
                ours.decrypt(&mut a, &iv);
                assert_eq!(a, data);
            }
        }
    }

    #[test]
    fn aes128_known_answer() {
        // FIPS-197 appendix C.1.
        let key: Vec<u8> = (0..16u8).collect();
        let c = new_cipher(CipherAlg::Aes128, CipherMode::Ecb, &key).unwrap();
        let mut b: [u8; 16] = [
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff,
        ];
        c.encrypt_block(&mut b);
        assert_eq!(
            b,
            [
                0x69, 0xc4, 0xe0, 0xd8, 0x6a, 0x7b, 0x04, 0x30, 0xd8, 0xcd, 0xb7, 0x80, 0x70, 0xb4,
                0xc5, 0x5a
            ]
        );
    }
}
