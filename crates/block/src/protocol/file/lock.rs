//! QEMU-compatible image locking with open-file-description (OFD) locks.
//!
//! Byte `100 + n` is read-locked while this process holds permission bit `n`; byte
//! `200 + n` is read-locked while it refuses to share bit `n`. A conflict exists when
//! another process holds a byte we are about to forbid, or forbids one we are about to
//! hold; OFD locks let us test for those without disturbing our own.

use std::os::fd::RawFd;

use crate::error::{Error, Result};
use crate::perm::{Perm, PermRequest};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

fn flock_at(kind: i16, start: i64) -> libc::flock {
    // SAFETY: flock is a plain C struct; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = 1;
    fl
}

fn set_lock(fd: RawFd, start: i64, lock: bool) -> std::io::Result<()> {
    let mut fl = flock_at(
        if lock { libc::F_RDLCK } else { libc::F_UNLCK } as i16,
        start,
    );
    // SAFETY: fd is an open descriptor and fl a valid flock for F_OFD_SETLK.
    let rc = unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &mut fl) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file description holds a lock on byte `start`.
fn is_locked_by_other(fd: RawFd, start: i64) -> std::io::Result<bool> {
    let mut fl = flock_at(libc::F_WRLCK as i16, start);
    // SAFETY: fd is an open descriptor and fl a valid flock for F_OFD_GETLK.
    let rc = unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as i16)
}

/// Takes the lock bytes for `req` on `fd` and checks for conflicts with other processes.
/// The message names the first conflicting permission as QEMU does.
pub(crate) fn apply(fd: RawFd, req: PermRequest, filename: &str) -> Result<()> {
    let unshared = req.shared.complement();
    for bit in 0..4u8 {
        let p = Perm(1 << bit);
        let held = req.perm.contains(p);
        let refused = unshared.contains(p);
        let lock_err = |e: std::io::Error| Error::io("Failed to lock byte", &e);
        set_lock(fd, PERM_BASE + bit as i64, held).map_err(lock_err)?;
        set_lock(fd, SHARED_BASE + bit as i64, refused).map_err(lock_err)?;
    }
    for bit in 0..4u8 {
        let p = Perm(1 << bit);
        let name = Perm::NAMES[bit as usize];
        if req.perm.contains(p) && is_locked_by_other(fd, SHARED_BASE + bit as i64).unwrap_or(false)
        {
            release(fd);
            return Err(conflict(format!("Failed to get \"{name}\" lock"), filename));
        }
        if unshared.contains(p) && is_locked_by_other(fd, PERM_BASE + bit as i64).unwrap_or(false) {
            release(fd);
            return Err(conflict(
                format!("Failed to get shared \"{name}\" lock"),
                filename,
            ));
        }
    }
    Ok(())
}

fn conflict(msg: String, filename: &str) -> Error {
    Error::Permission {
        msg: format!("{msg}\nIs another process using the image [{filename}]?"),
        errno: libc::EAGAIN,
    }
}

/// Drops every lock byte this descriptor holds.
pub(crate) fn release(fd: RawFd) {
    for bit in 0..4 {
        let _ = set_lock(fd, PERM_BASE + bit, false);
        let _ = set_lock(fd, SHARED_BASE + bit, false);
    }
}
