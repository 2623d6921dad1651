//! `rqemu-img map`.

use crate::common::Ctx;

/// Runs `map`.
pub fn run(ctx: &Ctx, _args: &[String]) -> i32 {
    ctx.usage_error("", "Command not found: map")
}
