//! Protocol drivers: nodes that store bytes somewhere outside the block layer.

pub mod file;
pub mod mem;
pub mod nbd;
pub mod null;
