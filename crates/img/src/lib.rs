//! `rqemu-img`: qemu-img's command set over the rqemu block layer.
//!
//! [`run`] dispatches to one module per command under [`cmd`]; [`common`] holds what the
//! commands share (error reporting in QEMU's form, opening images, the runtime).
#![warn(missing_docs)]

pub mod bufpool;
pub mod cmd;
pub mod common;
pub mod help;
pub mod ordered;
pub mod progress;
pub mod ratelimit;

use common::Ctx;

/// Runs `rqemu-img` with `args` (program name first); returns the exit status.
pub fn run(args: Vec<String>) -> i32 {
    let prog = args
        .first()
        .map(|a| a.rsplit('/').next().unwrap_or(a).to_string())
        .unwrap_or_else(|| "rqemu-img".into());
    rqemu_block::error::set_program_name(&prog);
    let ctx = Ctx { prog };
    let code = dispatch(&ctx, &args[1.min(args.len())..]);
    rqemu_cli::out::flush();
    code
}

fn dispatch(ctx: &Ctx, args: &[String]) -> i32 {
    let Some(first) = args.first() else {
        return ctx.usage_error("", "Not enough arguments");
    };
    match first.as_str() {
        "-h" | "--help" => {
            help::print_global(&ctx.prog);
            return 0;
        }
        "-V" | "--version" => {
            help::print_version(&ctx.prog);
            return 0;
        }
        _ => {}
    }
    let rest = &args[1..];
    match first.as_str() {
        "amend" => cmd::amend::run(ctx, rest),
        "create" => cmd::create::run(ctx, rest),
        "info" => cmd::info::run(ctx, rest),
        "check" => cmd::check::run(ctx, rest),
        "commit" => cmd::commit::run(ctx, rest),
        "map" => cmd::map::run(ctx, rest),
        "compare" => cmd::compare::run(ctx, rest),
        "convert" => cmd::convert::run(ctx, rest),
        "measure" => cmd::measure::run(ctx, rest),
        "bench" => cmd::bench::run(ctx, rest),
        "bitmap" => cmd::bitmap::run(ctx, rest),
        "dd" => cmd::dd::run(ctx, rest),
        "snapshot" => cmd::snapshot::run(ctx, rest),
        "rebase" => cmd::rebase::run(ctx, rest),
        "resize" => cmd::resize::run(ctx, rest),
        other if other.starts_with('-') => {
            // Standard options before the command (only -T/--trace take arguments).
            ctx.usage_error("", &format!("Command not found: {other}"))
        }
        other => ctx.usage_error("", &format!("Command not found: {other}")),
    }
}
