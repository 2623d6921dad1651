//! `rqemu-img resize`: changes an image's virtual size (absolute, or `+`/`-` relative),
//! refusing to shrink unless `--shrink` says so.

use rqemu_block::Prealloc;
use rqemu_cli::getopt::{HasArg, LongOpt};
use rqemu_cli::outp;

use crate::common::{block_on, check_image_opts, open_image, Ctx, ImageArgs, Objects};

const OBJECT: i32 = 256;
const IMAGE_OPTS: i32 = 257;
const PREALLOCATION: i32 = 258;
const SHRINK: i32 = 259;

const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, 'h' as i32),
    LongOpt::new("quiet", HasArg::No, 'q' as i32),
    LongOpt::new("format", HasArg::Required, 'f' as i32),
    LongOpt::new("image-opts", HasArg::No, IMAGE_OPTS),
    LongOpt::new("shrink", HasArg::No, SHRINK),
    LongOpt::new("preallocation", HasArg::Required, PREALLOCATION),
    LongOpt::new("object", HasArg::Required, OBJECT),
];

const SYNOPSIS: &str = "[-f FMT | --image-opts] [--preallocation PREALLOC] [--shrink] \
[--object OBJECTDEF] [-q] FILENAME [+-]SIZE[bkKMGTPE]";

const HELP: &str = "\
Sets the virtual size of FILENAME to SIZE, or grows (+SIZE) or shrinks (-SIZE) it
by that much. SIZE takes the suffixes k, M, G, T, P, E (powers of 1024).

  -f, --format FMT           format of FILENAME (probed when not given)
  --image-opts               FILENAME is an option string
  --shrink                   allow making the image smaller (data past the new
                             end is lost)
  --preallocation PREALLOC   allocate the added space: off, metadata (qcow2),
                             falloc or full
  -q, --quiet                print nothing on success
  --object OBJECTDEF         define an object (such as a secret)
  -h, --help                 show this help
";

/// Runs `resize`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    // The size comes last and may start with '-': take it before option parsing.
    if args.len() < 2 {
        return ctx.usage_error("resize", "Expecting image file name and size");
    }
    let (size, args) = args.split_last().expect("two or more arguments");
    let p = match ctx.getopt("resize", args, "f:hq", LONG) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let mut a = ImageArgs {
        writable: true,
        ..Default::default()
    };
    let (mut quiet, mut shrink, mut prealloc) = (false, false, Prealloc::Off);
    let mut objects = Objects::default();
    for (k, v) in &p.opts {
        let v = v.clone().unwrap_or_default();
        match *k {
            k if k == 'h' as i32 => {
                crate::help::print_command(&ctx.prog, "resize", SYNOPSIS, HELP);
                return 0;
            }
            k if k == 'f' as i32 => a.format = Some(v),
            k if k == 'q' as i32 => quiet = true,
            IMAGE_OPTS => a.image_opts = true,
            SHRINK => shrink = true,
            PREALLOCATION => match Prealloc::parse(&v) {
                Some(m) => prealloc = m,
                None => {
                    ctx.error(&format!("Invalid preallocation mode '{v}'"));
                    return 1;
                }
            },
            OBJECT => {
                if let Err(c) = objects.define(ctx, &v, 1) {
                    return c;
                }
            }
            _ => {}
        }
    }
    if p.operands.len() != 1 {
        return ctx.usage_error("resize", "Expecting image file name and size");
    }
    a.filename = p.operands[0].clone();
    let (relative, digits) = match size.as_bytes().first() {
        Some(b'+') => (1i8, &size[1..]),
        Some(b'-') => (-1, &size[1..]),
        _ => (0, size.as_str()),
    };
    let n = match rqemu_opts::parse_size(digits, 1) {
        Ok(n) => n,
        Err(_) => {
            ctx.error(&rqemu_block::create::size_param_error("size").to_string());
            return 1;
        }
    };
    if !check_image_opts(ctx, &a) {
        return 1;
    }
    block_on(async {
        let Some(blk) = open_image(ctx, &a).await else {
            return 1;
        };
        // qemu-img computes in signed 64-bit: sizes past 8 EiB come out negative.
        let current = blk.size() as i64;
        let total = match relative {
            0 => n as i64,
            r => current.wrapping_add((n as i64).wrapping_mul(r as i64)),
        };
        let fail = |msg: &str| {
            ctx.error(msg);
            1
        };
        let code = if total <= 0 {
            fail("New image size must be positive")
        } else if total <= current && prealloc != Prealloc::Off {
            fail("Preallocation can only be used for growing images")
        } else if total < current && !shrink {
            ctx.error("Use the --shrink option to perform a shrink operation.");
            ctx.error(
                "warning: Shrinking an image will delete all data beyond the shrunken \
                 image's end. Before performing such an operation, make sure there is no \
                 important data there.",
            );
            1
        } else {
            match blk.truncate(total as u64, true, prealloc).await {
                Ok(()) => {
                    if !quiet {
                        outp!("Image resized.\n");
                    }
                    0
                }
                Err(e) => fail(&e.to_string()),
            }
        };
        if let Err(e) = blk.close().await {
            if code == 0 {
                return fail(&e.to_string());
            }
        }
        code
    })
}
