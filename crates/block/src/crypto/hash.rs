//! Hash algorithms of LUKS headers (key derivation, anti-forensic diffusion, ESSIV) and
//! PBKDF2 over them, with the iteration benchmark LUKS uses to size its work factors.

use sha2::Digest;

use super::error::{CryptoError, Result};

/// A hash algorithm QEMU names in LUKS options and headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlg {
    /// SHA-1.
    Sha1,
    /// SHA-224.
    Sha224,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl HashAlg {
    /// Parses QEMU's (and the LUKS header's) name. `None` for unknown names.
    pub fn parse(s: &str) -> Option<HashAlg> {
        Some(match s {
            "sha1" => HashAlg::Sha1,
            "sha224" => HashAlg::Sha224,
            "sha256" => HashAlg::Sha256,
            "sha384" => HashAlg::Sha384,
            "sha512" => HashAlg::Sha512,
            _ => return None,
        })
    }

    /// Parses a name QEMU knows, refusing the ones rqemu cannot compute.
    pub fn parse_option(key: &str, s: &str) -> Result<HashAlg> {
        match s {
            "md5" | "ripemd160" | "sm3" => Err(CryptoError::invalid(format!(
                "Hash algorithm {s} not supported by this build of rqemu"
            ))),
            _ => HashAlg::parse(s).ok_or_else(|| {
                CryptoError::invalid(format!("Parameter '{key}' does not accept value '{s}'"))
            }),
        }
    }

    /// The name.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// The digest of the concatenation of `parts`.
    pub fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        }
        match self {
            HashAlg::Sha1 => run::<sha1::Sha1>(parts),
            HashAlg::Sha224 => run::<sha2::Sha224>(parts),
            HashAlg::Sha256 => run::<sha2::Sha256>(parts),
            HashAlg::Sha384 => run::<sha2::Sha384>(parts),
            HashAlg::Sha512 => run::<sha2::Sha512>(parts),
        }
    }

    /// PBKDF2-HMAC with this hash: fills `out` from `password` and `salt`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        match self {
            HashAlg::Sha1 => pbkdf2::pbkdf2_hmac::<sha1::Sha1>(password, salt, iterations, out),
            HashAlg::Sha224 => pbkdf2::pbkdf2_hmac::<sha2::Sha224>(password, salt, iterations, out),
            HashAlg::Sha256 => pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, salt, iterations, out),
            HashAlg::Sha384 => pbkdf2::pbkdf2_hmac::<sha2::Sha384>(password, salt, iterations, out),
            HashAlg::Sha512 => pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password, salt, iterations, out),
        }
    }

    /// How many PBKDF2 iterations of `out_len` bytes this machine computes per second
    /// (measured on the calling thread's CPU time, for at least 50 ms).
    pub fn pbkdf2_iters_per_sec(self, password: &[u8], salt: &[u8], out_len: usize) -> u64 {
        let mut out = vec![0u8; out_len];
        let mut iters: u32 = 1 << 12;
        loop {
            let start = thread_cpu_ns();
            self.pbkdf2(password, salt, iters, &mut out);
            let ns = thread_cpu_ns().saturating_sub(start);
            if ns >= 50_000_000 || iters >= 1 << 30 {
                return (iters as u128 * 1_000_000_000 / ns.max(1) as u128).min(u64::MAX as u128)
                    as u64;
            }
            iters = iters.saturating_mul(if ns < 5_000_000 { 8 } else { 2 });
        }
    }
}

/// CPU time of the calling thread in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_known_answer() {
        // RFC 6070, test 2 (PBKDF2-HMAC-SHA1, 2 iterations).
        let mut out = [0u8; 20];
        HashAlg::Sha1.pbkdf2(b"password", b"salt", 2, &mut out);
        assert_eq!(
            out,
            [
                0xea, 0x6c, 0x01, 0x4d, 0xc7, 0x2d, 0x6f, 0x8c, 0xcd, 0x1e, 0xd9, 0x2a, 0xce, 0x1d,
                0x41, 0xf0, 0xd8, 0xde, 0x89, 0x57
            ]
        );
    }
}
