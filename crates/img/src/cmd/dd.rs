//! `rqemu-img dd`: copies an image (or a part of it) into a new image, with dd's
//! `if=`, `of=`, `bs=`, `count=` and `skip=` operands.
//!
//! As in qemu-img, `count` limits the end of the input range (so `skip` blocks come out
//! of it) and a `skip` past the end creates an empty image after a warning. The copy
//! moves large pieces with the next read overlapping the current write; every byte is
//! written, as qemu-img writes every block.

use rqemu_block::create::CreateOptions;
use rqemu_block::{BlockBackend, OpenOptions};
use rqemu_cli::getopt::{HasArg, LongOpt};

use super::measure::{NO_CREATE, NO_MEASURE};
use crate::bufpool::BufPool;
use crate::common::{
    block_on, check_image_opts, cvtnum_full, open_image, read_sectors, Ctx, ImageArgs, Objects,
};

const OBJECT: i32 = 256;
const IMAGE_OPTS: i32 = 257;

const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, 'h' as i32),
    LongOpt::new("format", HasArg::Required, 'f' as i32),
    LongOpt::new("image-opts", HasArg::No, IMAGE_OPTS),
    LongOpt::new("output-format", HasArg::Required, 'O' as i32),
    LongOpt::new("force-share", HasArg::No, 'U' as i32),
    LongOpt::new("object", HasArg::Required, OBJECT),
];

const SYNOPSIS: &str = "[-f FMT | --image-opts] [-O OUTPUT_FMT] [-U] [--object OBJDEF]\n        [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS] if=INPUT of=OUTPUT";

const HELP: &str = "\
Creates OUTPUT as a new image of format OUTPUT_FMT and copies INPUT's contents
into it, block by block as dd(1) would.

  if=INPUT                the image to read (an option string with --image-opts)
  of=OUTPUT               the image to create (replaced if it exists)
  bs=BLOCK_SIZE           bytes per block, with optional suffix k, M, G (default 512)
  count=BLOCKS            copy the input only up to BLOCKS blocks from its start
  skip=BLOCKS             leave out this many blocks at the start of the input
  -f, --format FMT        format of INPUT (probed when not given)
  --image-opts            INPUT is a full option string
  -O, --output-format FMT format of OUTPUT (default raw)
  -U, --force-share       open INPUT without locks
  --object OBJDEF         define an object (such as a secret)
  -h, --help              show this help
";

/// Bytes moved per request.
const PIECE: u64 = 4 << 20;

/// The operands.
struct Dd {
    bs: u64,
    count: Option<u64>,
    skip: Option<u64>,
    input: Option<String>,
    output: Option<String>,
}

/// Parses one `key=value` operand; errors are reported.
fn operand(ctx: &Ctx, dd: &mut Dd, arg: &str) -> Result<(), ()> {
    let Some((key, value)) = arg.split_once('=') else {
        ctx.error(&format!("unrecognized operand {arg}"));
        return Err(());
    };
    let num = |name: &str| cvtnum_full(ctx, name, value, false, 0, i64::MAX).map(|n| n as u64);
    match key {
        "bs" => dd.bs = cvtnum_full(ctx, "bs", value, true, 1, i32::MAX as i64).ok_or(())? as u64,
        "count" => dd.count = Some(num("count").ok_or(())?),
        "skip" => dd.skip = Some(num("skip").ok_or(())?),
        "if" => dd.input = Some(value.to_string()),
        "of" => dd.output = Some(value.to_string()),
        _ => {
            ctx.error(&format!("unrecognized operand {key}"));
            return Err(());
        }
    }
    Ok(())
}

/// Copies `[start, end)` of `src` to `dst` from offset 0, reading the next piece while
/// the current one is written.
async fn copy(ctx: &Ctx, src: &BlockBackend, dst: &BlockBackend, start: u64, end: u64) -> i32 {
    let len = |pos: u64| (end - pos).min(PIECE) as usize;
    // Two buffers, one read while the other is written.
    let pool = BufPool::new(2 * PIECE as usize, PIECE as usize);
    let mut cur = pool.get(len(start).max(1)).await;
    let mut next = pool.get(cur.len()).await;
    let read_err = |e: rqemu_block::Error| {
        ctx.error(&format!(
            "error while reading from input image file: {}",
            rqemu_block::error::strerror(e.errno_value())
        ));
        1
    };
    let mut pos = start;
    if pos < end {
        if let Err(e) = read_sectors(src, pos, &mut cur[..len(pos)]).await {
            return read_err(e);
        }
    }
    while pos < end {
        let n = len(pos);
        let after = pos + n as u64;
        let (w, r) = tokio::join!(dst.write(pos - start, &cur[..n], false), async {
            if after < end {
                read_sectors(src, after, &mut next[..len(after)]).await
            } else {
                Ok(())
            }
        });
        if let Err(e) = r {
            return read_err(e);
        }
        if let Err(e) = w {
            ctx.error(&format!(
                "error while writing to output image file: {}",
                rqemu_block::error::strerror(e.errno_value())
            ));
            return 1;
        }
        std::mem::swap(&mut cur, &mut next);
        pos = after;
    }
    0
}

/// Creates the output and copies; returns the exit status.
async fn run_dd(ctx: &Ctx, a: &ImageArgs, dd: &Dd, out_fmt: &str) -> i32 {
    let (Some(_), Some(output)) = (&dd.input, &dd.output) else {
        ctx.error("Must specify both input and output files");
        return 1;
    };
    if !check_image_opts(ctx, a) {
        return 1;
    }
    let Some(src) = open_image(ctx, a).await else {
        return 1;
    };
    let r = create_and_copy(ctx, &src, dd, output, out_fmt).await;
    let _ = src.close().await;
    r
}

async fn create_and_copy(
    ctx: &Ctx,
    src: &BlockBackend,
    dd: &Dd,
    output: &str,
    out_fmt: &str,
) -> i32 {
    if NO_CREATE.contains(&out_fmt) {
        ctx.error(&format!(
            "Format driver '{out_fmt}' does not support image creation"
        ));
        return 1;
    }
    let known_elsewhere = NO_MEASURE.contains(&out_fmt);
    let mut opts = match CreateOptions::new(out_fmt) {
        Ok(o) => o,
        Err(_) if known_elsewhere => {
            ctx.error(&format!(
                "{output}: error while creating output image: Driver '{out_fmt}' is not supported by this build of rqemu"
            ));
            return 1;
        }
        Err(_) => {
            ctx.error("Unknown file format");
            return 1;
        }
    };
    let mut size = src.size().div_ceil(512) * 512;
    let bs = dd.bs;
    if let Some(count) = dd.count {
        if let Some(n) = count.checked_mul(bs).filter(|&n| n <= i64::MAX as u64) {
            size = size.min(n);
        }
    }
    let skip_bytes = dd
        .skip
        .map(|s| s.checked_mul(bs).filter(|&n| n <= i64::MAX as u64));
    let skip_past_end =
        matches!(skip_bytes, Some(None)) || matches!(skip_bytes, Some(Some(n)) if n > size);
    let start = match skip_bytes {
        Some(Some(n)) if !skip_past_end => n,
        Some(_) => size,
        None => 0,
    };
    let _ = opts.set("size", &(size - start).to_string());
    if let Err(e) = rqemu_block::create::create(output, &opts).await {
        ctx.error(&format!("{output}: error while creating output image: {e}"));
        return 1;
    }
    let o = OpenOptions {
        filename: output.to_string(),
        format: Some(out_fmt.to_string()),
        read_only: false,
        ..Default::default()
    };
    let dst = match BlockBackend::open(&o).await {
        Ok(b) => b,
        Err(e) => {
            ctx.error(&format!("Could not open '{output}': {e}"));
            return 1;
        }
    };
    if skip_past_end {
        ctx.error(&format!(
            "{}: cannot skip to specified offset",
            dd.input.as_deref().unwrap_or("")
        ));
    }
    let mut r = copy(ctx, src, &dst, start, size).await;
    if let Err(e) = dst.close().await {
        if r == 0 {
            ctx.error(&format!("Error while closing the image: {e}"));
            r = 1;
        }
    }
    r
}

/// Runs `dd`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let p = match ctx.getopt("dd", args, "hf:O:U", LONG) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let mut a = ImageArgs::default();
    let mut out_fmt = "raw".to_string();
    let mut objects = Objects::default();
    for (k, v) in &p.opts {
        let v = v.clone().unwrap_or_default();
        match *k {
            k if k == 'h' as i32 => {
                crate::help::print_command(&ctx.prog, "dd", SYNOPSIS, HELP);
                return 0;
            }
            k if k == 'f' as i32 => a.format = Some(v),
            k if k == 'O' as i32 => out_fmt = v,
            k if k == 'U' as i32 => a.force_share = true,
            OBJECT => {
                if let Err(c) = objects.define(ctx, &v, 1) {
                    return c;
                }
            }
            IMAGE_OPTS => a.image_opts = true,
            _ => {}
        }
    }
    let mut dd = Dd {
        bs: 512,
        count: None,
        skip: None,
        input: None,
        output: None,
    };
    for arg in &p.operands {
        if operand(ctx, &mut dd, arg).is_err() {
            return 1;
        }
    }
    a.filename = dd.input.clone().unwrap_or_default();
    block_on(run_dd(ctx, &a, &dd, &out_fmt))
}
