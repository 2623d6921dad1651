//! Format drivers: nodes that interpret an image file (raw, qcow2, luks).

pub mod bochs;
pub mod compress;
pub mod luks;
pub mod qcow2;
pub mod raw;
