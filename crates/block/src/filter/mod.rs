//! Filter nodes: nodes over one child that pass requests on and change how they are
//! served (`blkdebug`: error injection, breakpoints and request alignment for tests;
//! `blklogwrites`: a log of every write and flush, for power-cut replay; `quorum`:
//! several equal children that vote on reads).

pub mod blkdebug;
pub mod blklogwrites;
pub mod quorum;
