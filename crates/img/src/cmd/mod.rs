//! One module per rqemu-img command.

pub mod bench;
pub mod check;
pub mod compare;
pub mod convert;
pub mod create;
pub mod dd;
pub mod info;
pub mod map;
pub mod measure;
pub mod snapshot;
