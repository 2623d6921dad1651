//! Filter nodes: nodes over one child that pass requests on and change how they are
//! served (`blkdebug`: error injection, breakpoints and request alignment for tests;
//! `quorum`: several equal children that vote on reads).

pub mod blkdebug;
pub mod quorum;
