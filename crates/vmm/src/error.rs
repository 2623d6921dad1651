//! The VMM's errors. Each prints as one line in QEMU's words; the front end prefixes the
//! program's name.

use std::io;

/// Everything that can stop the machine from being built or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command-line option is wrong; the message names the option as QEMU does.
    #[error("{0}")]
    Usage(String),
    /// `/dev/kvm` cannot be used.
    #[error("Could not access KVM kernel module: {0}")]
    KvmOpen(String),
    /// A KVM ioctl failed while building the machine.
    #[error("{what}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up.
    #[error("cannot set up guest memory '{what}': {msg}")]
    Memory {
        /// Which region.
        what: &'static str,
        /// Why.
        msg: String,
    },
    /// The kernel or initrd could not be loaded.
    #[error("{0}")]
    Boot(String),
    /// A disk could not be opened.
    #[error("{opt}: {msg}")]
    Drive {
        /// The option as given (`-drive file=...`).
        opt: String,
        /// The block layer's message.
        msg: String,
    },
    /// A host I/O error (files, threads, event fds).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A vCPU failed in a way the guest cannot recover from.
    #[error("{0}")]
    Vcpu(String),
}

impl Error {
    /// A usage error with QEMU's message.
    pub fn usage(msg: impl Into<String>) -> Error {
        Error::Usage(msg.into())
    }

    /// Wraps a KVM error.
    pub fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { what, source }
    }

    /// Wraps a host I/O error.
    pub fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

/// Short alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
