//! Block encryption: secrets, ciphers, IV generators and the two formats QEMU stores
//! encrypted data in — LUKS1 ([`luks`]) and qcow2's legacy AES ([`qcow_aes`]).
//!
//! [`sector::SectorCrypto`] is what a format driver holds once a key is unlocked: it
//! encrypts and decrypts whole 512-byte sectors, the IV of each derived from its sector
//! number. The LUKS code works on an [`area::HeaderArea`], the bytes of a node where the
//! LUKS header and key material live (the start of a raw LUKS file, or the clusters a
//! qcow2 image sets aside for it).

pub mod area;
pub mod cipher;
pub mod error;
pub mod hash;
pub mod ivgen;
pub mod luks;
pub mod qcow_aes;
pub mod random;
pub mod secret;
pub mod sector;

pub use error::CryptoError;
pub use sector::SectorCrypto;

/// Sector size of every encryption format QEMU implements.
pub const SECTOR_SIZE: u64 = 512;
