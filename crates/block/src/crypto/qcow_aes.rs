//! qcow2's legacy `aes` encryption (crypt_method 1): AES-128-CBC with `plain64` IVs of
//! the guest sector number, the key being the password's first 16 bytes, zero-padded.

use super::cipher::{CipherAlg, CipherMode};
use super::error::Result;
use super::ivgen::IvGenAlg;
use super::secret;
use super::sector::SectorCrypto;

/// The sector cipher for the password in secret `secret_id`.
pub fn open(secret_id: &str) -> Result<SectorCrypto> {
    let password = secret::lookup_utf8(secret_id)?;
    let mut key = [0u8; 16];
    let n = password.len().min(16);
    key[..n].copy_from_slice(&password.as_bytes()[..n]);
    SectorCrypto::new(
        CipherAlg::Aes128,
        CipherMode::Cbc,
        IvGenAlg::Plain64,
        None,
        &key,
    )
}
