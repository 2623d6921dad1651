//! The errors of the crypto layer, worded as QEMU words them; they become block-layer
//! errors (EINVAL, or EIO for failed reads and writes of header data).

/// A crypto-layer failure.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// Wrong options, unsupported algorithms, unknown secrets, wrong passwords.
    #[error("{0}")]
    Invalid(String),
    /// A malformed LUKS header or key slot.
    #[error("{0}")]
    Corrupt(String),
    /// Reading or writing header data failed.
    #[error("{0}")]
    Io(#[from] crate::error::Error),
}

impl CryptoError {
    /// An [`CryptoError::Invalid`] with this message.
    pub fn invalid(msg: impl std::fmt::Display) -> Self {
        CryptoError::Invalid(msg.to_string())
    }

    /// A [`CryptoError::Corrupt`] with this message.
    pub fn corrupt(msg: impl std::fmt::Display) -> Self {
        CryptoError::Corrupt(msg.to_string())
    }
}

impl From<CryptoError> for crate::error::Error {
    fn from(e: CryptoError) -> Self {
        match e {
            CryptoError::Invalid(m) | CryptoError::Corrupt(m) => crate::error::Error::invalid(m),
            CryptoError::Io(e) => e,
        }
    }
}

/// Short alias for this module's results.
pub type Result<T, E = CryptoError> = std::result::Result<T, E>;
