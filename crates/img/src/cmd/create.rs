//! `rqemu-img create`: a new image of a format, size and backing file.

use rqemu_block::create::{help_text, CreateOptions};
use rqemu_block::OpenOptions;
use rqemu_cli::getopt::{HasArg, LongOpt};
use rqemu_cli::outp;

use crate::common::{block_on, Ctx};

const OBJECT: i32 = 256;

const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, 'h' as i32),
    LongOpt::new("quiet", HasArg::No, 'q' as i32),
    LongOpt::new("object", HasArg::Required, OBJECT),
    LongOpt::new("format", HasArg::Required, 'f' as i32),
    LongOpt::new("backing", HasArg::Required, 'b' as i32),
    LongOpt::new("backing-format", HasArg::Required, 'F' as i32),
    LongOpt::new("backing-unsafe", HasArg::No, 'u' as i32),
    LongOpt::new("options", HasArg::Required, 'o' as i32),
];

const HELP: &str = "\
Creates FILENAME as an empty image of format FMT (raw by default).

  -f, --format FMT           format of the new image
  -o, --options OPTS         format options, key=value[,...]; '-o help' lists them
  -b, --backing FILE         create an overlay on top of FILE
  -F, --backing-format FMT   format of the backing file (required with -b)
  -u, --backing-unsafe       do not open the backing file (SIZE is then required)
  -q, --quiet                print nothing on success
  --object OBJDEF            define an object (such as a secret)
  -h, --help                 show this help

SIZE takes the suffixes k, M, G, T, P, E (powers of 1024); without it the
backing file's size is used.
";

/// Whether a `-o` string asks for help.
pub fn has_help_option(list: &str) -> bool {
    rqemu_opts::keyval::split_escaped(list)
        .iter()
        .any(|e| e == "help" || e == "?")
}

/// Prints `-o help` for `format`; returns the exit status.
pub fn print_option_help(ctx: &Ctx, format: &str, filename: Option<&str>) -> i32 {
    match help_text(format, filename.is_some()) {
        Some(t) => {
            outp!("{t}");
            0
        }
        None => {
            ctx.error(&format!("Unknown file format '{format}'"));
            1
        }
    }
}

/// Converts a size operand as QEMU's `cvtnum` does.
pub fn cvtnum(ctx: &Ctx, name: &str, value: &str) -> Result<u64, i32> {
    match rqemu_opts::parse_size(value, 1) {
        Ok(v) if v <= i64::MAX as u64 => Ok(v),
        Err(rqemu_opts::SizeError::Invalid) => {
            ctx.error(&format!("Invalid {name} specified: '{value}'."));
            Err(1)
        }
        _ => {
            ctx.error(&format!(
                "Invalid {name} specified. Must be between 0 and {}.",
                i64::MAX
            ));
            Err(1)
        }
    }
}

/// Runs `create`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let p = match ctx.getopt("create", args, "F:b:f:ho:qu", LONG) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let mut fmt = "raw".to_string();
    let mut base: Option<String> = None;
    let mut base_fmt: Option<String> = None;
    let mut options: Option<String> = None;
    let mut quiet = false;
    let mut unsafe_backing = false;
    let mut objects = crate::common::Objects::default();
    for (k, v) in &p.opts {
        let v = v.clone().unwrap_or_default();
        match *k {
            k if k == 'h' as i32 => {
                crate::help::print_command(
                    &ctx.prog,
                    "create",
                    "[-f FMT] [-o OPTS] [-b FILE [-F FMT]] [-u] [-q] [--object OBJDEF] FILENAME [SIZE]",
                    HELP,
                );
                return 0;
            }
            k if k == 'f' as i32 => fmt = v,
            k if k == 'b' as i32 => base = Some(v),
            k if k == 'F' as i32 => base_fmt = Some(v),
            k if k == 'o' as i32 => {
                options = Some(match options {
                    Some(o) => format!("{o},{v}"),
                    None => v,
                })
            }
            k if k == 'q' as i32 => quiet = true,
            k if k == 'u' as i32 => unsafe_backing = true,
            OBJECT => {
                if let Err(c) = objects.define(ctx, &v, 1) {
                    return c;
                }
            }
            _ => {}
        }
    }
    let filename = p.operands.first().cloned();
    if let Some(o) = &options {
        if has_help_option(o) {
            return print_option_help(ctx, &fmt, filename.as_deref());
        }
    }
    let Some(filename) = filename else {
        return ctx.usage_error("create", "Expecting image file name");
    };
    let mut size: Option<u64> = None;
    if let Some(s) = p.operands.get(1) {
        match cvtnum(ctx, "image size", s) {
            Ok(v) => size = Some(v),
            Err(c) => return c,
        }
    }
    if let Some(extra) = p.operands.get(2) {
        return ctx.usage_error("create", &format!("Unexpected argument: {extra}"));
    }
    let fail = |msg: String| {
        ctx.error(&format!("{filename}: {msg}"));
        1
    };
    let mut opts = match CreateOptions::new(&fmt) {
        Ok(o) => o,
        Err(_) if super::measure::NO_CREATE.contains(&fmt.as_str()) => {
            return fail(format!(
                "Format driver '{fmt}' does not support image creation"
            ))
        }
        Err(_) => return fail(format!("Unknown file format '{fmt}'")),
    };
    if let Some(o) = &options {
        if let Err(e) = opts.parse(o) {
            return fail(e.to_string());
        }
    }
    if !opts.has("size") {
        if let Some(s) = size {
            let _ = opts.set("size", &s.to_string());
        }
    } else if size.is_some() {
        return fail("The image size must be specified only once".into());
    }
    if let Some(b) = &base {
        if opts.set("backing_file", b).is_err() {
            return fail(format!(
                "Backing file not supported for file format '{fmt}'"
            ));
        }
    }
    if let Some(bf) = &base_fmt {
        if opts.set("backing_fmt", bf).is_err() {
            return fail(format!(
                "Backing file format not supported for file format '{fmt}'"
            ));
        }
    }
    let backing_file = opts.get("backing_file").map(str::to_string);
    if let Some(bf) = &backing_file {
        if *bf == filename {
            return fail(
                "Error: Trying to create an image with the same filename as the backing file"
                    .into(),
            );
        }
        if bf.is_empty() {
            return fail("Expected backing file name, got empty string".into());
        }
    }
    let backing_fmt = opts.get("backing_fmt").map(str::to_string);
    if let Some(bf) = &backing_file {
        if !unsafe_backing {
            let full = rqemu_block::open::resolve_relative(&filename, bf);
            let r = block_on(async {
                let o = OpenOptions {
                    filename: full.clone(),
                    format: backing_fmt.clone(),
                    read_only: true,
                    force_share: true,
                    no_io: true,
                    quiet_probe: true,
                    ..Default::default()
                };
                let b = rqemu_block::BlockBackend::open(&o).await?;
                let info = (b.root().driver_name(), b.size());
                let _ = b.close().await;
                Ok::<_, rqemu_block::Error>(info)
            });
            match r {
                Err(e) => {
                    ctx.error(&format!("{filename}: {e}"));
                    eprintln!("Could not open backing image.");
                    return 1;
                }
                Ok((detected, bsize)) => {
                    if backing_fmt.is_none() {
                        ctx.error(&format!(
                            "{filename}: Backing file specified without backing format"
                        ));
                        eprintln!("Detected format of {detected}.");
                        return 1;
                    }
                    if !opts.has("size") {
                        let _ = opts.set("size", &bsize.to_string());
                    }
                }
            }
        } else if backing_fmt.is_none() {
            return fail("Backing file specified without backing format".into());
        }
    }
    if !opts.has("size") {
        return fail("Image creation needs a size parameter".into());
    }
    if !quiet {
        outp!("Formatting '{filename}', fmt={fmt} {}\n", opts.print_line());
        rqemu_cli::out::flush();
    }
    match block_on(rqemu_block::create::create(&filename, &opts)) {
        Ok(()) => 0,
        Err(e) if e.errno_value() == libc::EFBIG => {
            let hint = if opts.format() == "qcow2" {
                " (try using a larger cluster size)"
            } else {
                ""
            };
            fail(format!(
                "The image size is too large for file format '{fmt}'{hint}"
            ))
        }
        Err(e) => fail(e.to_string()),
    }
}
