//! `rqemu-img convert`: copies one or more images (concatenated) into a new or existing
//! target of any format, optionally compressed, sparse, or on top of a backing file.
//!
//! This module owns the command line and the set-up (opening the sources, creating and
//! opening the target) in qemu-img's order, so errors come out as qemu-img's do;
//! [`plan`] decides what each stretch of the target gets, [`copy`] moves the data, and
//! [`sparse`] finds zeroes in data.

mod copy;
mod plan;
mod sparse;

use rqemu_block::create::CreateOptions;
use rqemu_block::format::qcow2::Qcow2;
use rqemu_block::{BlockBackend, CacheMode};
use rqemu_cli::getopt::{HasArg, LongOpt};
use rqemu_opts::KeyVal;

use super::create::{has_help_option, print_option_help};
use crate::common::{block_on, check_image_opts, cvtnum_full, open_image, Ctx, ImageArgs, Objects};
use crate::progress::Progress;
use copy::{Job, Source};

const OBJECT: i32 = 256;
const IMAGE_OPTS: i32 = 257;
const TARGET_IMAGE_OPTS: i32 = 258;
const SALVAGE: i32 = 259;
const TARGET_IS_ZERO: i32 = 260;
const BITMAPS: i32 = 261;
const SKIP_BROKEN: i32 = 262;

const SOURCE_IMAGE_OPTS: i32 = IMAGE_OPTS;

const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, 'h' as i32),
    LongOpt::new("quiet", HasArg::No, 'q' as i32),
    LongOpt::new("object", HasArg::Required, OBJECT),
    LongOpt::new("source-format", HasArg::Required, 'f' as i32),
    LongOpt::new("image-opts", HasArg::No, IMAGE_OPTS),
    LongOpt::new("source-image-opts", HasArg::No, SOURCE_IMAGE_OPTS),
    LongOpt::new("source-cache", HasArg::Required, 'T' as i32),
    LongOpt::new("snapshot", HasArg::Required, 'l' as i32),
    LongOpt::new("sparse-size", HasArg::Required, 'S' as i32),
    LongOpt::new("output-cache", HasArg::Required, 't' as i32),
    LongOpt::new("output-format", HasArg::Required, 'O' as i32),
    LongOpt::new("options", HasArg::Required, 'o' as i32),
    LongOpt::new("backing", HasArg::Required, 'B' as i32),
    LongOpt::new("backing-format", HasArg::Required, 'F' as i32),
    LongOpt::new("target-image-opts", HasArg::No, TARGET_IMAGE_OPTS),
    LongOpt::new("salvage", HasArg::No, SALVAGE),
    LongOpt::new("target-is-zero", HasArg::No, TARGET_IS_ZERO),
    LongOpt::new("bitmaps", HasArg::No, BITMAPS),
    LongOpt::new("skip-broken-bitmaps", HasArg::No, SKIP_BROKEN),
    LongOpt::new("parallel", HasArg::Required, 'm' as i32),
    LongOpt::new("oob-writes", HasArg::No, 'W' as i32),
    LongOpt::new("copy-range-offloading", HasArg::No, 'C' as i32),
    LongOpt::new("rate", HasArg::Required, 'r' as i32),
    LongOpt::new("force-share", HasArg::No, 'U' as i32),
];

const SHORT: &str = "hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:";

const SYNOPSIS: &str = "[--object OBJDEF] [--image-opts] [--target-image-opts] \
[--target-is-zero] [--bitmaps [--skip-broken-bitmaps]] [-U] [-C] [-c] [-p] [-q] [-n] \
[-f FMT] [-t CACHE] [-T SRC_CACHE] [-O OUTPUT_FMT] [-B BACKING_FILE [-F BACKING_FMT]] \
[-o OPTIONS] [-l SNAPSHOT_PARAM] [-S SPARSE_SIZE] [-r RATE_LIMIT] [-m NUM_COROUTINES] \
[-W] [--salvage] FILENAME [FILENAME2 [...]] OUTPUT_FILENAME";

const HELP: &str = "\
Copies the FILENAMEs (one after another) into OUTPUT_FILENAME, an image of format
OUTPUT_FMT (raw by default) created with the sources' total size.

  -f, --source-format FMT        format of the sources (probed when not given)
  --image-opts, --source-image-opts
                                 the FILENAMEs are option strings
  -T, --source-cache SRC_CACHE   cache mode of the sources (default writeback)
  -l, --snapshot SNAPSHOT_PARAM  copy an internal snapshot: ID or NAME, or
                                 snapshot.id=ID,snapshot.name=NAME
  -O, --output-format FMT        format of the target
  -o, --options OPTIONS          options of the new target, key=value[,...];
                                 '-o help' lists them
  -t, --output-cache CACHE       cache mode of the target (default unsafe)
  -B, --backing BACKING_FILE     give the target this backing file and copy only
                                 what the sources' top layers allocate
  -F, --backing-format FMT       format of BACKING_FILE (required with -B)
  -c                             compress the target's clusters (qcow2)
  -n                             write into an existing OUTPUT_FILENAME
  --target-image-opts            OUTPUT_FILENAME is an option string (needs -n)
  --target-is-zero               the existing target reads as zeroes (needs -n)
  -S, --sparse-size SIZE         zero runs of at least SIZE bytes (default 4k)
                                 become holes; 0 writes everything
  -m, --parallel N               requests in flight, 1 to 16 (default 8)
  -W, --oob-writes               let writes complete out of order
  -C, --copy-range-offloading    let the file system copy where it can
  -r, --rate RATE                write at most RATE bytes per second
  --bitmaps                      copy persistent bitmaps too
  --skip-broken-bitmaps          with --bitmaps, leave out inconsistent bitmaps
  --salvage                      carry on past read errors (zeroes instead)
  -U, --force-share              open the sources without locks
  -p                             show progress
  -q, --quiet                    print nothing but errors
  --object OBJDEF                define an object (such as a secret)
  -h, --help                     show this help
";

/// Longest buffer qemu-img allows for sparse detection, in sectors (16 MiB).
const MAX_BUF_SECTORS: i64 = 32768;
/// Largest `-m`.
const MAX_COROUTINES: i64 = 16;

/// What the command line asked for.
struct Args {
    fmt: Option<String>,
    out_fmt: Option<String>,
    out_baseimg: Option<String>,
    backing_fmt: Option<String>,
    options: Option<String>,
    cache: String,
    src_cache: String,
    snapshot: Option<SnapshotSel>,
    compressed: bool,
    copy_range: bool,
    progress: bool,
    quiet: bool,
    skip_create: bool,
    wr_in_order: bool,
    force_share: bool,
    image_opts: bool,
    tgt_image_opts: bool,
    salvage: bool,
    target_is_zero: bool,
    bitmaps: bool,
    skip_broken: bool,
    min_sparse: u64,
    explicit_min_sparse: bool,
    num_coroutines: usize,
    rate_limit: u64,
    files: Vec<String>,
}

/// `-l`: a snapshot by ID or name, or by explicit `snapshot.id`/`snapshot.name`.
enum SnapshotSel {
    IdOrName(String),
    Explicit {
        id: Option<String>,
        name: Option<String>,
    },
}

/// Runs `convert`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let a = match parse(ctx, args) {
        Ok(a) => a,
        Err(c) => return c,
    };
    block_on(convert(ctx, a))
}

fn parse(ctx: &Ctx, args: &[String]) -> Result<Args, i32> {
    let p = ctx.getopt("convert", args, SHORT, LONG)?;
    let mut a = Args {
        fmt: None,
        out_fmt: None,
        out_baseimg: None,
        backing_fmt: None,
        options: None,
        cache: "unsafe".into(),
        src_cache: "writeback".into(),
        snapshot: None,
        compressed: false,
        copy_range: false,
        progress: false,
        quiet: false,
        skip_create: false,
        wr_in_order: true,
        force_share: false,
        image_opts: false,
        tgt_image_opts: false,
        salvage: false,
        target_is_zero: false,
        bitmaps: false,
        skip_broken: false,
        min_sparse: 8,
        explicit_min_sparse: false,
        num_coroutines: 8,
        rate_limit: 0,
        files: p.operands.clone(),
    };
    let mut objects = Objects::default();
    for (k, v) in &p.opts {
        let v = v.clone().unwrap_or_default();
        match *k {
            k if k == 'h' as i32 => {
                crate::help::print_command(&ctx.prog, "convert", SYNOPSIS, HELP);
                return Err(0);
            }
            k if k == 'f' as i32 => a.fmt = Some(v),
            k if k == 'O' as i32 => a.out_fmt = Some(v),
            k if k == 'B' as i32 => a.out_baseimg = Some(v),
            k if k == 'F' as i32 => a.backing_fmt = Some(v),
            k if k == 'C' as i32 => a.copy_range = true,
            k if k == 'c' as i32 => a.compressed = true,
            k if k == 'o' as i32 => {
                a.options = Some(match a.options.take() {
                    Some(o) => format!("{o},{v}"),
                    None => v,
                })
            }
            k if k == 'l' as i32 => a.snapshot = Some(parse_snapshot(ctx, &v)?),
            k if k == 'S' as i32 => {
                let sval = cvtnum_full(ctx, "buffer size for sparse output", &v, true, 0, i64::MAX)
                    .ok_or(1)?;
                if sval % 512 != 0 || sval / 512 > MAX_BUF_SECTORS {
                    ctx.error(
                        "Invalid buffer size for sparse output specified. Valid sizes are \
                         multiples of 512 up to 16777216. Select 0 to disable sparse \
                         detection (fully allocates output).",
                    );
                    return Err(1);
                }
                a.min_sparse = sval as u64 / 512;
                a.explicit_min_sparse = true;
            }
            k if k == 'p' as i32 => a.progress = true,
            k if k == 't' as i32 => a.cache = v,
            k if k == 'T' as i32 => a.src_cache = v,
            k if k == 'q' as i32 => a.quiet = true,
            k if k == 'n' as i32 => a.skip_create = true,
            k if k == 'm' as i32 => {
                a.num_coroutines =
                    cvtnum_full(ctx, "number of coroutines", &v, false, 1, MAX_COROUTINES)
                        .ok_or(1)? as usize;
            }
            k if k == 'W' as i32 => a.wr_in_order = false,
            k if k == 'U' as i32 => a.force_share = true,
            k if k == 'r' as i32 => {
                a.rate_limit =
                    cvtnum_full(ctx, "rate limit", &v, true, 0, i64::MAX).ok_or(1)? as u64;
            }
            OBJECT => objects.define(ctx, &v, 1)?,
            IMAGE_OPTS => a.image_opts = true,
            TARGET_IMAGE_OPTS => a.tgt_image_opts = true,
            SALVAGE => a.salvage = true,
            TARGET_IS_ZERO => a.target_is_zero = true,
            BITMAPS => a.bitmaps = true,
            SKIP_BROKEN => a.skip_broken = true,
            _ => {}
        }
    }
    if a.out_fmt.is_none() && !a.tgt_image_opts {
        a.out_fmt = Some("raw".into());
    }
    let refuse = |msg: &str| {
        ctx.error(msg);
        Err(1)
    };
    if a.skip_broken && !a.bitmaps {
        return refuse("Use of --skip-broken-bitmaps requires --bitmaps");
    }
    if a.compressed && a.copy_range {
        return refuse("Cannot enable copy offloading when -c is used");
    }
    if a.explicit_min_sparse && a.copy_range {
        return refuse("Cannot enable copy offloading when -S is used");
    }
    if a.copy_range && a.salvage {
        return refuse("Cannot use copy offloading in salvaging mode");
    }
    if a.tgt_image_opts && !a.skip_create {
        return refuse("--target-image-opts requires use of -n flag");
    }
    if a.skip_create && a.options.is_some() {
        return refuse("-o has no effect when skipping image creation");
    }
    if a.target_is_zero && !a.skip_create {
        return refuse("--target-is-zero requires use of -n flag");
    }
    if let Some(o) = &a.options {
        if has_help_option(o) {
            return Err(match &a.out_fmt {
                Some(f) => print_option_help(ctx, f, a.files.last().map(String::as_str)),
                None => {
                    ctx.error("Option help requires a format be specified");
                    1
                }
            });
        }
    }
    if a.files.len() < 2 {
        return refuse("Must specify image file name");
    }
    Ok(a)
}

fn parse_snapshot(ctx: &Ctx, v: &str) -> Result<SnapshotSel, i32> {
    if !v.starts_with("snapshot.") {
        return Ok(SnapshotSel::IdOrName(v.to_string()));
    }
    let fail = |msg: String| {
        ctx.error(&msg);
        ctx.error(&format!("Failed in parsing snapshot param '{v}'"));
        1
    };
    let kv = KeyVal::parse(v, None).map_err(|e| fail(e.to_string()))?;
    let (mut id, mut name) = (None, None);
    for (k, val) in kv.iter() {
        match k {
            "snapshot.id" => id = Some(val.to_string()),
            "snapshot.name" => name = Some(val.to_string()),
            other => return Err(fail(format!("Invalid parameter '{other}'"))),
        }
    }
    Ok(SnapshotSel::Explicit { id, name })
}

async fn convert(ctx: &Ctx, a: Args) -> i32 {
    if CacheMode::parse(&a.src_cache).is_err() {
        ctx.error(&format!("Invalid source cache option: {}", a.src_cache));
        return 1;
    }
    let mut progress = Progress::new(a.progress && !a.quiet, 1.0);
    progress.print(0.0, 100);
    let (out_filename, inputs) = a.files.split_last().expect("two or more operands");
    let mut job = None;
    let mut sources: Vec<BlockBackend> = Vec::new();
    let code = setup(ctx, &a, out_filename, inputs, &mut sources, &mut job).await;
    let code = match (code, job) {
        (0, Some(job)) => {
            let target = job.target.clone();
            let mut code = match job.run(&mut progress).await {
                Ok(()) => 0,
                Err(()) => 1,
            };
            if code == 0 && a.bitmaps {
                if let Some(src) = sources.first() {
                    code = copy_bitmaps(ctx, src, &target, a.skip_broken).await;
                }
            }
            if let Err(e) = target.close().await {
                if code == 0 {
                    ctx.error(&format!("error while closing '{out_filename}': {e}"));
                    code = 1;
                }
            }
            code
        }
        (c, _) => c,
    };
    for s in &sources {
        let _ = s.close().await;
    }
    if code == 0 {
        progress.print(100.0, 0);
    }
    progress.end();
    code
}

/// Opens the sources and the target (creating it) as qemu-img does, in its order.
async fn setup(
    ctx: &Ctx,
    a: &Args,
    out_filename: &str,
    inputs: &[String],
    sources: &mut Vec<BlockBackend>,
    job: &mut Option<Job>,
) -> i32 {
    let mut srcs = Vec::new();
    let mut total_sectors = 0u64;
    for name in inputs {
        let ia = ImageArgs {
            filename: name.clone(),
            format: a.fmt.clone(),
            image_opts: a.image_opts,
            force_share: a.force_share,
            cache: Some(a.src_cache.clone()),
            ..Default::default()
        };
        if !check_image_opts(ctx, &ia) {
            return 1;
        }
        let Some(blk) = open_image(ctx, &ia).await else {
            return 1;
        };
        sources.push(blk.clone());
        let sectors = blk.size().div_ceil(512);
        let root = blk.root();
        let align = (root.alignment().request as u64).div_ceil(512).max(1);
        let cluster = root.cluster_size().map_or(0, |c| c / 512);
        srcs.push(Source {
            blk,
            sectors,
            alignment: align.max(cluster),
        });
        total_sectors += sectors;
    }
    if a.bitmaps {
        if srcs.len() > 1 {
            ctx.error("Copying bitmaps only possible with single source");
            return 1;
        }
        let Some(q) = qcow2(&srcs[0].blk).filter(|q| q.supports_persistent_bitmaps()) else {
            ctx.error("Source lacks bitmap support");
            return 1;
        };
        if !a.skip_broken {
            if let Some(b) = q.persistent_bitmaps().iter().find(|b| b.inconsistent) {
                ctx.error(&format!("Cannot copy inconsistent bitmap '{}'", b.name));
                eprintln!(
                    "Try --skip-broken-bitmaps, or use '{} bitmap --remove' to delete it",
                    ctx.prog
                );
                return 1;
            }
        }
    }
    if let Some(sel) = &a.snapshot {
        if matches!(sel, SnapshotSel::IdOrName(_)) && srcs.len() > 1 {
            ctx.error("No support for concatenating multiple snapshot");
            return 1;
        }
        if let Err(msg) = load_snapshot(&srcs[0].blk, sel).await {
            ctx.error(&format!("Failed to load snapshot: {msg}"));
            return 1;
        }
    }

    let mut out_baseimg = a.out_baseimg.clone();
    let mut create_opts = None;
    if !a.skip_create {
        let out_fmt = a.out_fmt.as_deref().unwrap_or("raw");
        let mut opts = match CreateOptions::new(out_fmt) {
            Ok(o) => o,
            Err(_) if super::measure::NO_CREATE.contains(&out_fmt) => {
                ctx.error(&format!(
                    "Format driver '{out_fmt}' does not support image creation"
                ));
                return 1;
            }
            Err(_) => {
                ctx.error(&format!("Unknown file format '{out_fmt}'"));
                return 1;
            }
        };
        if let Some(o) = &a.options {
            if let Err(e) = opts.parse(o) {
                ctx.error(&e.to_string());
                return 1;
            }
        }
        let _ = opts.set("size", &(total_sectors * 512).to_string());
        if let Some(b) = &a.out_baseimg {
            if opts.set("backing_file", b).is_err() {
                ctx.error(&format!(
                    "Backing file not supported for file format '{out_fmt}'"
                ));
                return 1;
            }
        }
        if let Some(bf) = &a.backing_fmt {
            if opts.set("backing_fmt", bf).is_err() {
                ctx.error(&format!(
                    "Backing file format not supported for file format '{out_fmt}'"
                ));
                return 1;
            }
        }
        if let Some(b) = opts.get("backing_file") {
            out_baseimg = Some(b.to_string());
        }
        create_opts = Some(opts);
    }
    let target_has_backing = out_baseimg.is_some();
    if srcs.len() > 1 && target_has_backing {
        ctx.error(
            "Having a backing file for the target makes no sense when concatenating \
             multiple input images",
        );
        return 1;
    }
    if let Some(opts) = &create_opts {
        let out_fmt = opts.format().to_string();
        if opts.has("backing_file") && !opts.has("backing_fmt") {
            ctx.error("Use of backing file requires explicit backing format");
            return 1;
        }
        if a.compressed {
            if out_fmt != "qcow2" {
                ctx.error("Compression not supported for this file format");
                return 1;
            }
            if opts.get_bool("encryption") == Some(true) || opts.has("encrypt.format") {
                ctx.error("Compression and encryption not supported at the same time");
                return 1;
            }
            if opts.get("preallocation").is_some_and(|p| p != "off") {
                ctx.error("Compression and preallocation not supported at the same time");
                return 1;
            }
        }
        if let Err(e) = rqemu_block::create::create(out_filename, opts).await {
            ctx.error(&format!(
                "{out_filename}: error while converting {out_fmt}: {}",
                create_error(&e, opts)
            ));
            return 1;
        }
    }

    let min_sparse = a.min_sparse;
    if CacheMode::parse(&a.cache).is_err() {
        ctx.error(&format!("Invalid cache option: {}", a.cache));
        return 1;
    }
    let ta = ImageArgs {
        filename: out_filename.to_string(),
        format: if a.tgt_image_opts {
            None
        } else {
            a.out_fmt.clone()
        },
        image_opts: a.tgt_image_opts,
        writable: true,
        cache: Some(a.cache.clone()),
        unmap: min_sparse > 0,
        // As qemu-img passes on the secrets of the image it created.
        extra: create_opts
            .iter()
            .flat_map(|o| o.values())
            .filter(|(k, _)| k.ends_with("key-secret"))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    let Some(target) = open_image(ctx, &ta).await else {
        return 1;
    };
    let troot = target.root().clone();
    if a.bitmaps && !qcow2(&target).is_some_and(|q| q.supports_persistent_bitmaps()) {
        ctx.error(&format!(
            "Format driver '{}' does not support bitmaps",
            troot.driver_name()
        ));
        let _ = target.close().await;
        return 1;
    }
    let compressor = target.compressor();
    if a.compressed && compressor.is_none() {
        ctx.error("Compression not supported for this file format");
        let _ = target.close().await;
        return 1;
    }
    let target_sectors = target.size().div_ceil(512);
    if a.skip_create && target_sectors < total_sectors {
        ctx.error("output file is smaller than input file");
        let _ = target.close().await;
        return 1;
    }
    let target_backing_sectors = if target_has_backing && !a.skip_create {
        troot.backing().map(|b| b.size().div_ceil(512))
    } else {
        None
    };
    let request_sectors = (troot.alignment().request as u64).div_ceil(512).max(1);
    let alignment = pow2floor(min_sparse).max(request_sectors);
    let cluster_sectors = troot.cluster_size().map_or(0, |c| c / 512);
    // Zero initialisation: a new target without backing file that reads as zeroes needs
    // no zero writes (and `--target-is-zero` vouches for an existing one).
    let mut has_zero_init = a.target_is_zero;
    if !has_zero_init && !a.skip_create && min_sparse > 0 && !target_has_backing {
        has_zero_init = troot.has_zero_init();
    }
    *job = Some(Job {
        sources: srcs,
        target,
        total_sectors,
        min_sparse,
        alignment,
        buf_sectors: if a.compressed {
            cluster_sectors
        } else {
            copy::BUF_SECTORS
        },
        cluster_sectors,
        compressor: if a.compressed { compressor } else { None },
        target_has_backing,
        target_backing_sectors,
        has_zero_init,
        wr_in_order: a.wr_in_order,
        num_coroutines: a.num_coroutines,
        salvage: a.salvage,
        quiet: a.quiet,
        rate_limit: a.rate_limit,
        copy_range: a.copy_range,
    });
    0
}

/// The qcow2 node at the top of `blk`, if it is one.
fn qcow2(blk: &BlockBackend) -> Option<&Qcow2> {
    blk.root().as_any().downcast_ref::<Qcow2>()
}

/// Copies the persistent bitmaps of `src` into `dst` (after the data), as qemu-img
/// does: each is created with the same granularity and state, then filled by a merge.
async fn copy_bitmaps(ctx: &Ctx, src: &BlockBackend, dst: &BlockBackend, skip_broken: bool) -> i32 {
    let (Some(sq), Some(dq)) = (qcow2(src), qcow2(dst)) else {
        return 0;
    };
    for b in sq.persistent_bitmaps() {
        if skip_broken && b.inconsistent {
            ctx.error(&format!(
                "warning: Skipping inconsistent bitmap '{}'",
                b.name
            ));
            continue;
        }
        if let Err(e) = dq
            .bitmap_add(&b.name, Some(b.granularity), !b.enabled)
            .await
        {
            ctx.error(&format!("Failed to create bitmap {}: {e}", b.name));
            return 1;
        }
        let filled = dq
            .bitmap_check_target(&b.name)
            .and_then(|()| sq.bitmap_contents(&b.name))
            .and_then(|bits| dq.bitmap_merge(&b.name, &bits));
        if let Err(e) = filled {
            ctx.error(&format!("Failed to populate bitmap {}: {e}", b.name));
            let _ = dq.bitmap_remove(&b.name).await;
            return 1;
        }
    }
    0
}

/// The error text of a failed target creation, with qemu-img's hint for sizes too large.
fn create_error(e: &rqemu_block::Error, opts: &CreateOptions) -> String {
    if e.errno_value() == libc::EFBIG {
        let hint = if opts.format() == "qcow2" {
            " (try using a larger cluster size)"
        } else {
            ""
        };
        return format!(
            "The image size is too large for file format '{}'{hint}",
            opts.format()
        );
    }
    e.to_string()
}

/// Loads an internal snapshot in place of the source's current state (read-only).
async fn load_snapshot(blk: &BlockBackend, sel: &SnapshotSel) -> Result<(), String> {
    let root = blk.root();
    let Some(q) = root.as_any().downcast_ref::<Qcow2>() else {
        return Err(format!(
            "Block format '{}' used by device '' does not support temporarily loading \
             internal snapshots",
            root.driver_name()
        ));
    };
    let r = match sel {
        SnapshotSel::IdOrName(s) => match q.snapshot_load_tmp(Some(s), None).await {
            Err(e) if matches!(e.errno_value(), libc::ENOENT | libc::EINVAL) => {
                q.snapshot_load_tmp(None, Some(s)).await
            }
            r => r,
        },
        SnapshotSel::Explicit { id, name } => {
            if id.is_none() && name.is_none() {
                return Err("snapshot_id and name are both NULL".into());
            }
            q.snapshot_load_tmp(id.as_deref(), name.as_deref()).await
        }
    };
    r.map_err(|e| e.to_string())
}

/// The largest power of two not above `n` (0 for 0).
fn pow2floor(n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        1 << (63 - n.leading_zeros())
    }
}
