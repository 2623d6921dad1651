//! `rqemu-img dd`.

use crate::common::Ctx;

/// Runs `dd`.
pub fn run(ctx: &Ctx, _args: &[String]) -> i32 {
    ctx.usage_error("", "Command not found: dd")
}
