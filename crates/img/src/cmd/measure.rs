//! `rqemu-img measure`.

use crate::common::Ctx;

/// Runs `measure`.
pub fn run(ctx: &Ctx, _args: &[String]) -> i32 {
    ctx.usage_error("", "Command not found: measure")
}
