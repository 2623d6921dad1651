//! The blkdebug commands: `break`, `remove_break`, `resume`, `wait_break`. They act on
//! the first blkdebug node below the image's root along `file` children, as qemu-io's
//! do; without one, they report "Operation not supported".

use rqemu_block::filter::blkdebug::{self, BlkdebugNode};
use rqemu_block::NodeRef;
use rqemu_cli::outln;

use crate::state::State;

fn strerror(errno: i32) -> String {
    rqemu_block::error::strerror(errno)
}

/// Runs one blkdebug command (`argv[0]` is its name; the argument count is checked).
pub async fn run(st: &mut State, name: &str, argv: &[String]) -> i32 {
    let Some(root) = st.blk.as_ref().map(|b| b.root().clone()) else {
        return -libc::EINVAL;
    };
    let node: Option<NodeRef> = blkdebug::find(&root);
    let bd = node
        .as_ref()
        .and_then(|n| n.as_any().downcast_ref::<BlkdebugNode>());
    let errno = |r: Result<(), blkdebug::rules::BreakError>| match (bd, r) {
        (None, _) => libc::ENOTSUP,
        (Some(_), Ok(())) => 0,
        (Some(_), Err(_)) => libc::ENOENT,
    };
    match name {
        "break" => {
            let e = errno(bd.map_or(Ok(()), |b| b.add_breakpoint(&argv[1], &argv[2])));
            if e != 0 {
                outln!("Could not set breakpoint: {}", strerror(e));
            }
            0
        }
        "remove_break" => {
            let e = errno(bd.map_or(Ok(()), |b| b.remove_breakpoint(&argv[1])));
            if e != 0 {
                outln!("Could not remove breakpoint {}: {}", argv[1], strerror(e));
            }
            0
        }
        "resume" => {
            let e = errno(bd.map_or(Ok(()), |b| b.resume(&argv[1])));
            if e != 0 {
                outln!("Could not resume request: {}", strerror(e));
            }
            0
        }
        _ => {
            // wait_break: let the requests in flight run until one stops at the tag.
            let Some(b) = bd else {
                return 0;
            };
            while !b.is_suspended(&argv[1]) {
                tokio::task::yield_now().await;
                if !b.is_suspended(&argv[1]) {
                    tokio::time::sleep(std::time::Duration::from_micros(200)).await;
                }
            }
            0
        }
    }
}
