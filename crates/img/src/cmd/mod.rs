//! One module per rqemu-img command.

pub mod check;
pub mod create;
pub mod info;
