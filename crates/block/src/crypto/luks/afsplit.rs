//! LUKS's anti-forensic splitter: a key is stored as `stripes` blocks, all but the last
//! random, chained through a hash-based diffusion, so that losing any part of the
//! material loses the key.

use crate::crypto::error::Result;
use crate::crypto::hash::HashAlg;
use crate::crypto::random;

/// Replaces `block` by its diffusion: each digest-sized piece (the last may be shorter)
/// becomes the hash of its big-endian index followed by the piece, truncated.
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let dl = hash.digest_len();
    for (i, piece) in block.chunks_mut(dl).enumerate() {
        let d = hash.digest(&[&(i as u32).to_be_bytes(), piece]);
        let n = piece.len();
        piece.copy_from_slice(&d[..n]);
    }
}

fn xor_into(acc: &mut [u8], other: &[u8]) {
    for (a, b) in acc.iter_mut().zip(other) {
        *a ^= b;
    }
}

/// Splits `key` into `stripes` blocks (`key.len() * stripes` bytes).
pub fn split(hash: HashAlg, key: &[u8], stripes: usize) -> Result<Vec<u8>> {
    let n = key.len();
    let mut out = random::bytes(n * stripes)?;
    let mut block = vec![0u8; n];
    for i in 0..stripes.saturating_sub(1) {
        xor_into(&mut block, &out[i * n..(i + 1) * n]);
        diffuse(hash, &mut block);
    }
    let last = &mut out[(stripes - 1) * n..stripes * n];
    for (o, (b, k)) in last.iter_mut().zip(block.iter().zip(key)) {
        *o = b ^ k;
    }
    Ok(out)
}

/// Recovers a `key_len`-byte key from `material` (`key_len * stripes` bytes).
pub fn merge(hash: HashAlg, material: &[u8], key_len: usize, stripes: usize) -> Vec<u8> {
    let mut block = vec![0u8; key_len];
    if stripes == 0 || material.len() < key_len * stripes {
        return block;
    }
    for i in 0..stripes - 1 {
        xor_into(&mut block, &material[i * key_len..(i + 1) * key_len]);
        diffuse(hash, &mut block);
    }
    xor_into(
        &mut block,
        &material[(stripes - 1) * key_len..stripes * key_len],
    );
    block
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_merge() {
        for hash in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
            let key: Vec<u8> = (0..48u8).collect();
            let m = split(hash, &key, 4000).unwrap();
            assert_eq!(merge(hash, &m, 48, 4000), key);
        }
    }
}
