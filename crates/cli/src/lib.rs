//! Building blocks of rqemu's command-line front ends.
//!
//! - [`getopt`]: GNU `getopt_long` argument parsing with its messages (QEMU's tools use it).
//! - [`qjson`]: QEMU's JSON printer and its human-readable dump of QAPI objects, with
//!   QEMU's dictionary key order.
//! - [`human`]: sizes as QEMU prints them (`1 GiB`, `196 KiB`).
//! - [`out`]: stdout with C stdio's buffering, so output interleaves with stderr as QEMU's does.
#![warn(missing_docs)]

pub mod getopt;
pub mod human;
pub mod out;
pub mod qjson;
