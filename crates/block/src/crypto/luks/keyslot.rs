//! Key slots: deriving a slot key from a password (PBKDF2), storing the master key in a
//! slot (split, encrypted with the slot key) and recovering it, and erasing a slot.

use crate::crypto::area::HeaderArea;
use crate::crypto::error::Result;
use crate::crypto::random;
use crate::crypto::sector::SectorCrypto;

use super::afsplit;
use super::header::{KeySlot, LuksHeader, SECTOR, STRIPES};
use super::LuksParams;

/// Times erased key material is overwritten with random bytes.
const ERASE_PASSES: usize = 16;

/// The key that encrypts slot `slot`'s material, derived from `password`.
fn slot_crypto(
    p: &LuksParams,
    h: &LuksHeader,
    slot: &KeySlot,
    password: &[u8],
) -> Result<SectorCrypto> {
    let mut key = vec![0u8; h.key_bytes as usize];
    p.hash
        .pbkdf2(password, &slot.salt, slot.iterations, &mut key);
    SectorCrypto::new(p.cipher, p.mode, p.ivgen, p.ivhash, &key)
}

/// Whether `key` is the master key: its PBKDF2 digest matches the header's.
pub fn check_master_key(p: &LuksParams, h: &LuksHeader, key: &[u8]) -> bool {
    let mut d = [0u8; super::header::DIGEST_LEN];
    p.hash
        .pbkdf2(key, &h.mk_digest_salt, h.mk_digest_iter, &mut d);
    d == h.mk_digest
}

/// Tries to recover the master key from slot `i` with `password`.
pub async fn unlock_slot(
    area: &HeaderArea,
    p: &LuksParams,
    h: &LuksHeader,
    i: usize,
    password: &[u8],
) -> Result<Option<Vec<u8>>> {
    let slot = &h.slots[i];
    if !slot.active {
        return Ok(None);
    }
    let mut material = vec![0u8; h.material_len()];
    area.read(slot.key_offset as u64 * SECTOR, &mut material)
        .await?;
    let sc = slot_crypto(p, h, slot, password)?;
    sc.decrypt(0, &mut material);
    let key = afsplit::merge(p.hash, &material, h.key_bytes as usize, STRIPES as usize);
    Ok(check_master_key(p, h, &key).then_some(key))
}

/// Stores `master_key` in slot `i` under `password` with `iterations` (material first,
/// then the header).
pub async fn store(
    area: &HeaderArea,
    p: &LuksParams,
    h: &mut LuksHeader,
    i: usize,
    password: &[u8],
    master_key: &[u8],
    iterations: u32,
) -> Result<()> {
    let mut salt = [0u8; super::header::SALT_LEN];
    random::fill(&mut salt)?;
    let mut slot = h.slots[i].clone();
    slot.salt = salt;
    slot.iterations = iterations;
    let mut material = afsplit::split(p.hash, master_key, STRIPES as usize)?;
    slot_crypto(p, h, &slot, password)?.encrypt(0, &mut material);
    area.write(slot.key_offset as u64 * SECTOR, &material)
        .await?;
    area.flush().await?;
    slot.active = true;
    h.slots[i] = slot;
    area.write(0, &h.to_bytes()).await?;
    area.flush().await
}

/// Erases slot `i`: the header forgets it, then its material is overwritten.
pub async fn erase(area: &HeaderArea, h: &mut LuksHeader, i: usize) -> Result<()> {
    let slot = &mut h.slots[i];
    slot.active = false;
    slot.iterations = 0;
    slot.salt = [0; super::header::SALT_LEN];
    let offset = slot.key_offset as u64 * SECTOR;
    area.write(0, &h.to_bytes()).await?;
    area.flush().await?;
    let mut garbage = vec![0u8; h.material_len()];
    for _ in 0..ERASE_PASSES {
        random::fill(&mut garbage)?;
        area.write(offset, &garbage).await?;
        area.flush().await?;
    }
    Ok(())
}
