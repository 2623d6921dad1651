//! `rqemu-img check`: metadata consistency, repair, and qemu-img's report and exit codes
//! (0 clean, 1 check failed, 2 corruptions, 3 leaks, 63 no check for this format).

use rqemu_block::info::{CheckReport, RepairMode};
use rqemu_cli::getopt::{HasArg, LongOpt};
use rqemu_cli::outp;
use rqemu_cli::qjson::{to_json_pretty, QDict, QValue};

use crate::common::{block_on, open_image, parse_output, Ctx, ImageArgs};

const OBJECT: i32 = 256;
const IMAGE_OPTS: i32 = 257;
const OUTPUT: i32 = 258;

const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, 'h' as i32),
    LongOpt::new("format", HasArg::Required, 'f' as i32),
    LongOpt::new("repair", HasArg::Required, 'r' as i32),
    LongOpt::new("output", HasArg::Required, OUTPUT),
    LongOpt::new("object", HasArg::Required, OBJECT),
    LongOpt::new("image-opts", HasArg::No, IMAGE_OPTS),
    LongOpt::new("force-share", HasArg::No, 'U' as i32),
    LongOpt::new("quiet", HasArg::No, 'q' as i32),
    LongOpt::new("cache", HasArg::Required, 'T' as i32),
];

const HELP: &str = "\
Checks the metadata of FILENAME for consistency and, with -r, repairs it.
Exit status: 0 no errors, 1 the check could not complete, 2 corruptions found,
3 leaked clusters found, 63 the format has no check.

  -f, --format FMT        the image's format (probed when not given)
  --image-opts            FILENAME is a full option string
  -r, --repair leaks|all  repair leaked clusters only, or everything
  -T, --cache MODE        cache mode used while checking (default writeback)
  -U, --force-share       open without locks (not with -r)
  --output human|json     output format (default human)
  -q, --quiet             print nothing
  --object OBJDEF         define an object (such as a secret)
  -h, --help              show this help
";

fn to_qdict(filename: &str, format: &str, r: &CheckReport) -> QDict {
    let mut d = QDict::new();
    d.insert("filename", filename);
    d.insert("format", format);
    d.insert("check-errors", r.check_errors);
    if r.corruptions != 0 {
        d.insert("corruptions", r.corruptions);
    }
    if r.leaks != 0 {
        d.insert("leaks", r.leaks);
    }
    if r.corruptions_fixed != 0 {
        d.insert("corruptions-fixed", r.corruptions_fixed);
    }
    if r.leaks_fixed != 0 {
        d.insert("leaks-fixed", r.leaks_fixed);
    }
    if let Some(v) = r.image_end_offset {
        d.insert("image-end-offset", v);
    }
    if let Some(v) = r.total_clusters {
        d.insert("total-clusters", v);
    }
    if let Some(v) = r.allocated_clusters {
        d.insert("allocated-clusters", v);
    }
    if let Some(v) = r.fragmented_clusters {
        d.insert("fragmented-clusters", v);
    }
    if let Some(v) = r.compressed_clusters {
        d.insert("compressed-clusters", v);
    }
    d
}

fn human(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions != 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks != 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors != 0 {
            s.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if let (Some(total), Some(alloc)) = (r.total_clusters, r.allocated_clusters) {
        let frag = r.fragmented_clusters.unwrap_or(0);
        let comp = r.compressed_clusters.unwrap_or(0);
        s.push_str(&format!(
            "{alloc}/{total} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            alloc as f64 * 100.0 / total as f64,
            frag as f64 * 100.0 / alloc as f64,
            comp as f64 * 100.0 / alloc as f64
        ));
    }
    if let Some(e) = r.image_end_offset {
        s.push_str(&format!("Image end offset: {e}\n"));
    }
    s
}

/// Runs `check`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let p = match ctx.getopt("check", args, "hf:r:T:qU", LONG) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let mut a = ImageArgs {
        check: true,
        ..Default::default()
    };
    let mut json = false;
    let mut quiet = false;
    let mut objects = crate::common::Objects::default();
    let mut repair = RepairMode::default();
    for (k, v) in &p.opts {
        let v = v.clone().unwrap_or_default();
        match *k {
            k if k == 'h' as i32 => {
                crate::help::print_command(
                    &ctx.prog,
                    "check",
                    "[-f FMT | --image-opts] [-T CACHE] [-r leaks|all] [-U] [--output human|json] [-q] FILENAME",
                    HELP,
                );
                return 0;
            }
            k if k == 'f' as i32 => a.format = Some(v),
            k if k == 'r' as i32 => {
                a.writable = true;
                repair = match v.as_str() {
                    "leaks" => RepairMode {
                        leaks: true,
                        errors: false,
                    },
                    "all" => RepairMode {
                        leaks: true,
                        errors: true,
                    },
                    _ => {
                        return ctx.usage_error(
                            "check",
                            &format!("--repair (-r) expects 'leaks' or 'all' not '{v}'"),
                        )
                    }
                };
            }
            k if k == 'T' as i32 => a.cache = Some(v),
            k if k == 'q' as i32 => quiet = true,
            k if k == 'U' as i32 => a.force_share = true,
            OUTPUT => match parse_output(ctx, &v) {
                Ok(j) => json = j,
                Err(c) => return c,
            },
            OBJECT => {
                if let Err(c) = objects.define(ctx, &v, 1) {
                    return c;
                }
            }
            IMAGE_OPTS => a.image_opts = true,
            _ => {}
        }
    }
    let Some(filename) = p.operands.first() else {
        return ctx.usage_error("check", "Expecting one image file name");
    };
    if let Some(extra) = p.operands.get(1) {
        return ctx.usage_error("check", &format!("Unexpected argument: {extra}"));
    }
    a.filename = filename.clone();
    block_on(async {
        let Some(blk) = open_image(ctx, &a).await else {
            return 1;
        };
        let root = blk.root().clone();
        let format = root.driver_name();
        let first = match root.check(repair).await {
            Ok(r) => r,
            Err(e) if e.errno_value() == libc::ENOTSUP => {
                ctx.error("This image format does not support checks");
                let _ = blk.close().await;
                return 63;
            }
            Err(e) => {
                ctx.error(&format!(
                    "Check failed: {}",
                    rqemu_block::error::strerror(e.errno_value())
                ));
                let _ = blk.close().await;
                return 1;
            }
        };
        let mut report = first.clone();
        if first.corruptions_fixed > 0 || first.leaks_fixed > 0 {
            if !json && !quiet {
                outp!(
                    "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                    first.leaks_fixed,
                    first.corruptions_fixed
                );
            }
            match root.check(RepairMode::default()).await {
                Ok(r) => {
                    report = r;
                    report.leaks_fixed = first.leaks_fixed;
                    report.corruptions_fixed = first.corruptions_fixed;
                }
                Err(e) => {
                    ctx.error(&format!(
                        "Check failed: {}",
                        rqemu_block::error::strerror(e.errno_value())
                    ));
                    let _ = blk.close().await;
                    return 1;
                }
            }
        }
        if !quiet {
            if json {
                outp!(
                    "{}\n",
                    to_json_pretty(&QValue::Dict(to_qdict(filename, format, &report)))
                );
            } else {
                outp!("{}", human(&report));
            }
        }
        let _ = blk.close().await;
        if report.check_errors > 0 {
            ctx.error("Check failed");
            1
        } else if report.corruptions > 0 {
            2
        } else if report.leaks > 0 {
            3
        } else {
            0
        }
    })
}
