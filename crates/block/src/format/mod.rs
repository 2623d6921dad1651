//! Format drivers: nodes that interpret an image file (raw, qcow2).

pub mod bochs;
pub mod compress;
pub mod qcow2;
pub mod raw;
