//! `rqemu-img measure`: the file size a new image would need, for a given virtual size
//! or to hold what an existing image (or one of its snapshots) holds.

use rqemu_block::create::CreateOptions;
use rqemu_block::format::qcow2::measure::{measure, MeasureParams, Measurement};
use rqemu_block::format::qcow2::Qcow2;
use rqemu_block::BlockBackend;
use rqemu_cli::getopt::{HasArg, LongOpt};
use rqemu_cli::outp;
use rqemu_cli::qjson::{to_json_pretty, QDict, QValue};

use crate::common::{block_on, check_image_opts, cvtnum_full, open_image, Ctx, ImageArgs, Objects};

const OBJECT: i32 = 256;
const IMAGE_OPTS: i32 = 257;
const OUTPUT: i32 = 258;
const SIZE: i32 = 259;

const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, 'h' as i32),
    LongOpt::new("target-format", HasArg::Required, 'O' as i32),
    LongOpt::new("options", HasArg::Required, 'o' as i32),
    LongOpt::new("format", HasArg::Required, 'f' as i32),
    LongOpt::new("image-opts", HasArg::No, IMAGE_OPTS),
    LongOpt::new("snapshot", HasArg::Required, 'l' as i32),
    LongOpt::new("force-share", HasArg::No, 'U' as i32),
    LongOpt::new("output", HasArg::Required, OUTPUT),
    LongOpt::new("object", HasArg::Required, OBJECT),
    LongOpt::new("size", HasArg::Required, SIZE),
];

const SYNOPSIS: &str = "[-f FMT | --image-opts] [-l SNAPSHOT] [-O OUTPUT_FMT] [-o OPTIONS]\n        [--output human|json] [-U] [--object OBJDEF] (--size SIZE | FILENAME)";

const HELP: &str = "\
Computes how large a file of format OUTPUT_FMT must be: either for an empty image
of SIZE bytes, or to hold what FILENAME holds (as a conversion would copy it).
'required size' counts the data present, 'fully allocated size' every cluster;
'bitmaps size' is the room persistent bitmaps of FILENAME would take.

  --size SIZE               virtual size of the new image (suffixes k, M, G, T, P, E)
  -O, --target-format FMT   format of the new image (default raw)
  -o, --options OPTS        its creation options, key=value[,...]
  -f, --format FMT          format of FILENAME (probed when not given)
  --image-opts              FILENAME is a full option string
  -l, --snapshot SNAPSHOT   measure internal snapshot SNAPSHOT (ID or name, or
                            snapshot.id=ID,snapshot.name=NAME) of FILENAME
  -U, --force-share         open FILENAME without locks
  --output human|json       output format (default human)
  --object OBJDEF           define an object (such as a secret)
  -h, --help                show this help
";

/// QEMU drivers that can create images but not measure them.
pub(crate) const NO_MEASURE: &[&str] = &[
    "qcow",
    "qed",
    "vdi",
    "vmdk",
    "vpc",
    "vhdx",
    "parallels",
    "file",
    "host_device",
    "nbd",
    "ssh",
    "gluster",
    "rbd",
    "nfs",
];

/// QEMU drivers that cannot create images at all.
pub(crate) const NO_CREATE: &[&str] = &[
    "bochs",
    "cloop",
    "dmg",
    "blkdebug",
    "blkverify",
    "blklogwrites",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "host_cdrom",
    "null-co",
    "null-aio",
    "preallocate",
    "quorum",
    "snapshot-access",
    "throttle",
    "vvfat",
    "http",
    "https",
    "ftp",
    "ftps",
];

/// `-l`: a snapshot by ID or name, or by `snapshot.id`/`snapshot.name`.
enum Snapshot {
    IdOrName(String),
    Params(Option<String>, Option<String>),
}

/// Whether a `-o` list can be appended to others (qemu-img's `is_valid_option_list`).
fn valid_option_list(list: &str) -> bool {
    if list.is_empty() || list.starts_with(',') {
        return false;
    }
    let trailing = list.len() - list.trim_end_matches(',').len();
    trailing.is_multiple_of(2)
}

/// Loads the snapshot `-l` names, read-only, in place of the current state.
async fn load_snapshot(blk: &BlockBackend, sn: &Snapshot) -> Result<(), String> {
    let Some(q) = blk.root().as_any().downcast_ref::<Qcow2>() else {
        return Err(format!(
            "Block format '{}' used by device '' does not support temporarily loading internal snapshots",
            blk.root().driver_name()
        ));
    };
    let r = match sn {
        Snapshot::Params(id, name) => q.snapshot_load_tmp(id.as_deref(), name.as_deref()).await,
        Snapshot::IdOrName(s) => match q.snapshot_load_tmp(Some(s), None).await {
            Err(e) if matches!(e.errno_value(), libc::ENOENT | libc::EINVAL) => {
                q.snapshot_load_tmp(None, Some(s)).await
            }
            other => other,
        },
    };
    r.map_err(|e| e.to_string())
}

fn print(m: &Measurement, json: bool) {
    if json {
        let mut d = QDict::new();
        if let Some(b) = m.bitmaps {
            d.insert("bitmaps", b);
        }
        d.insert("required", m.required);
        d.insert("fully-allocated", m.fully_allocated);
        outp!("{}\n", to_json_pretty(&QValue::Dict(d)));
    } else {
        outp!(
            "required size: {}\nfully allocated size: {}\n",
            m.required,
            m.fully_allocated
        );
        if let Some(b) = m.bitmaps {
            outp!("bitmaps size: {b}\n");
        }
    }
}

/// Measures for `out_fmt`; errors are reported here.
async fn run_measure(
    ctx: &Ctx,
    input: Option<&BlockBackend>,
    out_fmt: &str,
    options: Option<&str>,
    size: Option<u64>,
    objects: &Objects,
) -> Result<Measurement, ()> {
    let fail = |msg: &str| {
        ctx.error(msg);
    };
    if NO_CREATE.contains(&out_fmt) {
        fail(&format!(
            "Format driver '{out_fmt}' does not support image creation"
        ));
        return Err(());
    }
    if NO_MEASURE.contains(&out_fmt) {
        fail(&format!(
            "Block driver '{out_fmt}' does not support size measurement"
        ));
        return Err(());
    }
    let mut opts = match CreateOptions::new(out_fmt) {
        Ok(o) => o,
        Err(_) => {
            fail(&format!("Unknown file format '{out_fmt}'"));
            return Err(());
        }
    };
    if let Some(list) = options {
        if let Err(e) = opts.parse(list) {
            fail(&e.to_string());
            fail(&format!("Invalid options for file format '{out_fmt}'"));
            return Err(());
        }
    }
    if let Some(s) = size {
        let _ = opts.set("size", &s.to_string());
    }
    let node = input.map(|b| b.root().clone());
    if out_fmt == "raw" {
        let required = match &node {
            Some(n) => n.size().div_ceil(512) * 512,
            None => opts.get_size("size").unwrap_or(0).div_ceil(512) * 512,
        };
        return Ok(Measurement {
            required,
            fully_allocated: required,
            bitmaps: None,
        });
    }
    if out_fmt == "luks" {
        // The LUKS header and key material, then the payload.
        use rqemu_block::crypto::{luks, secret};
        let lo = luks::LuksCreateOptions::from_options("", |k| opts.get(k).map(str::to_string))
            .map_err(|e| fail(&e.to_string()))?;
        secret::lookup_utf8(&lo.key_secret).map_err(|e| fail(&e.to_string()))?;
        let size = match &node {
            Some(n) => n.size(),
            None => opts.get_size("size").unwrap_or(0),
        };
        let total = luks::header_len(lo.params.key_bytes()) + size;
        return Ok(Measurement {
            required: total,
            fully_allocated: total,
            bitmaps: None,
        });
    }
    let exists = |id: &str| objects.contains(id);
    let params = MeasureParams::from_options(&opts, &exists).map_err(|e| fail(&e.to_string()))?;
    measure(&params, node.as_ref())
        .await
        .map_err(|e| fail(&e.to_string()))
}

/// Runs `measure`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let p = match ctx.getopt("measure", args, "hf:O:o:l:U", LONG) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let mut a = ImageArgs::default();
    let mut out_fmt = "raw".to_string();
    let mut options: Option<String> = None;
    let mut snapshot: Option<Snapshot> = None;
    let mut json = false;
    let mut size: Option<u64> = None;
    let mut objects = Objects::default();
    for (k, v) in &p.opts {
        let v = v.clone().unwrap_or_default();
        match *k {
            k if k == 'h' as i32 => {
                crate::help::print_command(&ctx.prog, "measure", SYNOPSIS, HELP);
                return 0;
            }
            k if k == 'f' as i32 => a.format = Some(v),
            k if k == 'O' as i32 => out_fmt = v,
            k if k == 'U' as i32 => a.force_share = true,
            k if k == 'o' as i32 => {
                if !valid_option_list(&v) {
                    ctx.error(&format!("Invalid option list: {v}"));
                    return 1;
                }
                options = Some(match options {
                    Some(o) => format!("{o},{v}"),
                    None => v,
                });
            }
            k if k == 'l' as i32 => {
                if v.starts_with("snapshot.") {
                    let parsed = rqemu_opts::KeyVal::parse(&v, None).ok().filter(|kv| {
                        kv.keys()
                            .all(|k| k == "snapshot.id" || k == "snapshot.name")
                    });
                    let Some(kv) = parsed else {
                        ctx.error(&format!("Invalid parameter '{}'", first_bad_key(&v)));
                        ctx.error(&format!("Failed in parsing snapshot param '{v}'"));
                        return 1;
                    };
                    snapshot = Some(Snapshot::Params(
                        kv.get("snapshot.id").map(str::to_string),
                        kv.get("snapshot.name").map(str::to_string),
                    ));
                } else {
                    snapshot = Some(Snapshot::IdOrName(v));
                }
            }
            OUTPUT => match v.as_str() {
                "json" => json = true,
                "human" => json = false,
                _ => {
                    return ctx.usage_error(
                        "measure",
                        &format!("--output expects 'human' or 'json' not '{v}'"),
                    )
                }
            },
            SIZE => match cvtnum_full(ctx, "image size", &v, true, 0, i64::MAX) {
                Some(n) => size = Some(n as u64),
                None => return 1,
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
    if p.operands.len() > 1 {
        ctx.error("At most one filename argument is allowed.");
        return 1;
    }
    let filename = p.operands.first().cloned();
    if filename.is_none() && (a.image_opts || a.format.is_some() || snapshot.is_some()) {
        ctx.error("--image-opts, -f, and -l require a filename argument.");
        return 1;
    }
    if filename.is_some() && size.is_some() {
        ctx.error("--size N cannot be used together with a filename.");
        return 1;
    }
    if filename.is_none() && size.is_none() {
        ctx.error("Either --size N or one filename must be specified.");
        return 1;
    }
    block_on(async {
        let mut input = None;
        if let Some(f) = filename {
            a.filename = f;
            if !check_image_opts(ctx, &a) {
                return 1;
            }
            let Some(blk) = open_image(ctx, &a).await else {
                return 1;
            };
            if let Some(sn) = &snapshot {
                if let Err(e) = load_snapshot(&blk, sn).await {
                    ctx.error(&format!("Failed to load snapshot: {e}"));
                    let _ = blk.close().await;
                    return 1;
                }
            }
            input = Some(blk);
        }
        let r = run_measure(
            ctx,
            input.as_ref(),
            &out_fmt,
            options.as_deref(),
            size,
            &objects,
        )
        .await;
        if let Some(b) = &input {
            let _ = b.close().await;
        }
        match r {
            Ok(m) => {
                print(&m, json);
                0
            }
            Err(()) => 1,
        }
    })
}

/// The first key of a `-l snapshot.…` list that is not a snapshot parameter.
fn first_bad_key(v: &str) -> String {
    rqemu_opts::keyval::split_escaped(v)
        .into_iter()
        .map(|e| e.split_once('=').map(|(k, _)| k.to_string()).unwrap_or(e))
        .find(|k| k != "snapshot.id" && k != "snapshot.name")
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_lists_join_as_qemu_allows() {
        assert!(valid_option_list("cluster_size=4k"));
        assert!(valid_option_list("a=b,,"));
        assert!(!valid_option_list(""));
        assert!(!valid_option_list(",a=b"));
        assert!(!valid_option_list("a=b,"));
    }
}
