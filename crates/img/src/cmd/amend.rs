//! `rqemu-img amend`: changes options of an existing image (`-o compat=...`,
//! `lazy_refcounts`, `refcount_bits`, `size`, `data_file`, ...), refusing what the format
//! cannot change as qemu-img does.

use rqemu_block::create::{amend_help_text, amend_opts, merged_opts, CreateOptions};
use rqemu_block::crypto::luks::LuksAmendOptions;
use rqemu_block::format::luks::LuksNode;
use rqemu_block::format::qcow2::amend::Amend;
use rqemu_block::format::qcow2::Qcow2;
use rqemu_block::CacheMode;
use rqemu_cli::getopt::{HasArg, LongOpt};
use rqemu_cli::outp;

use super::create::has_help_option;
use crate::common::{block_on, check_image_opts, open_image, Ctx, ImageArgs, Objects};
use crate::progress::Progress;

const OBJECT: i32 = 256;
const IMAGE_OPTS: i32 = 257;
const FORCE: i32 = 258;

const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, 'h' as i32),
    LongOpt::new("quiet", HasArg::No, 'q' as i32),
    LongOpt::new("progress", HasArg::No, 'p' as i32),
    LongOpt::new("format", HasArg::Required, 'f' as i32),
    LongOpt::new("image-opts", HasArg::No, IMAGE_OPTS),
    LongOpt::new("cache", HasArg::Required, 't' as i32),
    LongOpt::new("force", HasArg::No, FORCE),
    LongOpt::new("options", HasArg::Required, 'o' as i32),
    LongOpt::new("object", HasArg::Required, OBJECT),
];

const SYNOPSIS: &str =
    "[-f FMT | --image-opts] [-t CACHE] [--force] [-p] [-q] [--object OBJDEF] -o OPTIONS FILENAME";

const HELP: &str = "\
Changes format-specific options of FILENAME; '-o help' lists those that can change.

  -o, --options OPTIONS  the options to change, key=value[,...]
  -f, --format FMT       format of FILENAME (probed when not given)
  --image-opts           FILENAME is an option string
  -t, --cache CACHE      cache mode (default writeback)
  --force                allow changes that need it
  -p, --progress         show progress
  -q, --quiet            print nothing but errors
  --object OBJDEF        define an object (such as a secret)
  -h, --help             show this help
";

/// Runs `amend`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let p = match ctx.getopt("amend", args, "ho:f:t:pq", LONG) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let mut a = ImageArgs {
        writable: true,
        cache: Some("writeback".into()),
        ..Default::default()
    };
    let mut options: Option<String> = None;
    let (mut progress, mut quiet) = (false, false);
    let mut objects = Objects::default();
    let mut force = false;
    for (k, v) in &p.opts {
        let v = v.clone().unwrap_or_default();
        match *k {
            k if k == 'h' as i32 => {
                crate::help::print_command(&ctx.prog, "amend", SYNOPSIS, HELP);
                return 0;
            }
            k if k == 'o' as i32 => {
                options = Some(match options.take() {
                    Some(o) => format!("{o},{v}"),
                    None => v,
                })
            }
            k if k == 'f' as i32 => a.format = Some(v),
            k if k == 't' as i32 => a.cache = Some(v),
            k if k == 'p' as i32 => progress = true,
            k if k == 'q' as i32 => quiet = true,
            IMAGE_OPTS => a.image_opts = true,
            FORCE => force = true,
            OBJECT => {
                if let Err(c) = objects.define(ctx, &v, 1) {
                    return c;
                }
            }
            _ => {}
        }
    }
    let Some(options) = options else {
        return ctx.usage_error("amend", "Must specify options (-o)");
    };
    if quiet {
        progress = false;
    }
    let mut meter = Progress::new(progress, 1.0);
    let code = amend(ctx, &mut a, &options, &p.operands, &mut meter, force);
    meter.end();
    code
}

fn print_help(ctx: &Ctx, fmt: &str) -> i32 {
    match amend_help_text(fmt) {
        Some(t) => {
            outp!("{t}");
            0
        }
        None => {
            ctx.error(&format!(
                "Format driver '{fmt}' does not support option amendment"
            ));
            1
        }
    }
}

fn amend(
    ctx: &Ctx,
    a: &mut ImageArgs,
    options: &str,
    operands: &[String],
    meter: &mut Progress,
    force: bool,
) -> i32 {
    if let Some(f) = &a.format {
        if has_help_option(options) {
            return print_help(ctx, f);
        }
    }
    if operands.len() != 1 {
        ctx.error("Expecting one image file name");
        return 1;
    }
    a.filename = operands[0].clone();
    if let Some(c) = &a.cache {
        if CacheMode::parse(c).is_err() {
            ctx.error(&format!("Invalid cache option: {c}"));
            return 1;
        }
    }
    if !check_image_opts(ctx, a) {
        return 1;
    }
    block_on(async {
        let Some(blk) = open_image(ctx, a).await else {
            return 1;
        };
        let fmt = blk.root().driver_name();
        let code = if has_help_option(options) {
            print_help(ctx, fmt)
        } else {
            match parse_options(fmt, options) {
                Err(msg) => {
                    ctx.error(&msg);
                    1
                }
                Ok((am, enc)) => {
                    meter.print(0.0, 0);
                    let root = blk.root();
                    let q = root.as_any().downcast_ref::<Qcow2>();
                    let luks = root.as_any().downcast_ref::<LuksNode>();
                    let r = match (q, luks) {
                        (Some(q), _) => {
                            let mut cb = |done: u64, total: u64| {
                                if total > 0 {
                                    meter.print(100.0 * done as f32 / total as f32, 0);
                                }
                            };
                            match &enc {
                                Some(e) if !q.is_encrypted() => q.amend_encryption(e, force).await,
                                _ => match q.amend(&am, &mut cb).await {
                                    Ok(()) => match &enc {
                                        Some(e) => q.amend_encryption(e, force).await,
                                        None => Ok(()),
                                    },
                                    Err(e) => Err(e),
                                },
                            }
                        }
                        (None, Some(l)) => match &enc {
                            Some(e) => l.amend(e, force).await,
                            None => Ok(()),
                        },
                        _ => Err(rqemu_block::Error::errno(libc::ENOTSUP)),
                    };
                    meter.print(100.0, 0);
                    match r {
                        Ok(()) => 0,
                        Err(e) => {
                            ctx.error(&e.to_string());
                            1
                        }
                    }
                }
            }
        };
        if let Err(e) = blk.close().await {
            if code == 0 {
                ctx.error(&e.to_string());
                return 1;
            }
        }
        code
    })
}

/// Parses `-o` against what the format can amend; an option that only creation takes
/// gets qemu-img's hint. Key slot changes come back separately.
fn parse_options(fmt: &str, options: &str) -> Result<(Amend, Option<LuksAmendOptions>), String> {
    let Some(descs) = amend_opts(fmt) else {
        return Err(format!(
            "Format driver '{fmt}' does not support option amendment"
        ));
    };
    let mut o = CreateOptions::with_descs(fmt, descs);
    if let Err(e) = o.parse(options) {
        let mut msg = e.to_string();
        let mut create = CreateOptions::with_descs(fmt, merged_opts(fmt).unwrap_or_default());
        if create.parse(options).is_ok() {
            msg.push_str("\nThis option is only supported for image creation");
        }
        return Err(msg);
    }
    let prefix = if fmt == "qcow2" { "encrypt." } else { "" };
    let enc = luks_amend_options(&o, prefix)?;
    if fmt == "luks" {
        return Ok((Amend::default(), enc));
    }
    let version = match o.get("compat") {
        None => None,
        Some("0.10") | Some("v2") => Some(2),
        Some("1.1") | Some("v3") => Some(3),
        Some(other) => return Err(format!("Unknown compatibility level {other}")),
    };
    Ok((
        Amend {
            version,
            lazy_refcounts: o.get_bool("lazy_refcounts"),
            refcount_bits: o
                .get("refcount_bits")
                .and_then(rqemu_block::create::parse_number),
            size: o.get_size("size"),
            backing_file: o.get("backing_file").map(str::to_string),
            backing_fmt: o.get("backing_fmt").map(str::to_string),
            data_file: o.get("data_file").map(str::to_string),
            data_file_raw: o.get_bool("data_file_raw"),
        },
        enc,
    ))
}

/// The key slot options (`state`, `keyslot`, `new-secret`, `old-secret`, `iter-time`,
/// each after `prefix`), if any is given.
fn luks_amend_options(o: &CreateOptions, prefix: &str) -> Result<Option<LuksAmendOptions>, String> {
    let get = |k: &str| o.get(&format!("{prefix}{k}"));
    let keys = ["state", "keyslot", "new-secret", "old-secret", "iter-time"];
    if !keys.iter().any(|k| get(k).is_some()) {
        return Ok(None);
    }
    let active = match get("state") {
        None => return Err("Parameter 'state' is missing".into()),
        Some("active") => true,
        Some("inactive") => false,
        Some(v) => return Err(format!("Parameter 'state' does not accept value '{v}'")),
    };
    let keyslot = match get("keyslot") {
        None => None,
        Some(v) => Some(
            rqemu_opts::parse_c_u64(v)
                .map(|n| n as i64)
                .map_err(|_| format!("Parameter 'keyslot' expects an integer, got '{v}'"))?,
        ),
    };
    let iter_time = match get("iter-time") {
        None => None,
        Some(v) => Some(rqemu_block::crypto::luks::parse_iter_time(v).map_err(|e| e.to_string())?),
    };
    Ok(Some(LuksAmendOptions {
        active,
        keyslot,
        old_secret: get("old-secret").map(str::to_string),
        new_secret: get("new-secret").map(str::to_string),
        iter_time,
    }))
}
