//! Permissions a node takes on its children, and what it lets others do (QEMU's
//! `BLK_PERM_*`). The file protocol turns them into lock bytes so that two processes
//! using the same image see each other, exactly as QEMU processes do.

/// A set of permissions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Perm(pub u8);

impl Perm {
    /// Reads return consistent data.
    pub const CONSISTENT_READ: Perm = Perm(0x01);
    /// Writes that change content.
    pub const WRITE: Perm = Perm(0x02);
    /// Writes that do not change content.
    pub const WRITE_UNCHANGED: Perm = Perm(0x04);
    /// Changing the size.
    pub const RESIZE: Perm = Perm(0x08);
    /// Every permission.
    pub const ALL: Perm = Perm(0x0f);
    /// No permission.
    pub const NONE: Perm = Perm(0);

    /// Names in bit order, as lock error messages print them.
    pub const NAMES: [&'static str; 4] = ["consistent read", "write", "write unchanged", "resize"];

    /// Union.
    pub const fn or(self, other: Perm) -> Perm {
        Perm(self.0 | other.0)
    }

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    /// The complement within [`Perm::ALL`].
    pub const fn complement(self) -> Perm {
        Perm(!self.0 & Perm::ALL.0)
    }
}

/// What a node needs from a child and what it lets other users of that child do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PermRequest {
    /// Permissions taken.
    pub perm: Perm,
    /// Permissions others may hold at the same time.
    pub shared: Perm,
}

impl PermRequest {
    /// What a user (tool, device) asks of the image it opens: read, write if writable,
    /// and everything shared (QEMU's BlockBackend default).
    pub fn user(writable: bool) -> PermRequest {
        PermRequest {
            perm: if writable {
                Perm::CONSISTENT_READ.or(Perm::WRITE)
            } else {
                Perm::CONSISTENT_READ
            },
            shared: Perm::ALL,
        }
    }

    /// What a metadata format (qcow2) takes on its file: it must be able to grow the
    /// file, and nobody else may write or resize it (unless sharing is forced).
    pub fn metadata_format(writable: bool, force_share: bool) -> PermRequest {
        PermRequest {
            perm: if writable {
                Perm::CONSISTENT_READ.or(Perm::WRITE).or(Perm::RESIZE)
            } else {
                Perm::CONSISTENT_READ
            },
            shared: if force_share {
                Perm::ALL
            } else {
                Perm::CONSISTENT_READ.or(Perm::WRITE_UNCHANGED)
            },
        }
    }
}
