//! `rqemu-img compare`.

use crate::common::Ctx;

/// Runs `compare`.
pub fn run(ctx: &Ctx, _args: &[String]) -> i32 {
    ctx.usage_error("", "Command not found: compare")
}
