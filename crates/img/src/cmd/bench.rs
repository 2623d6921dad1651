//! `rqemu-img bench`.

use crate::common::Ctx;

/// Runs `bench`.
pub fn run(ctx: &Ctx, _args: &[String]) -> i32 {
    ctx.usage_error("", "Command not found: bench")
}
