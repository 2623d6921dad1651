//! `rqemu-img info`: what an image is, in qemu-img's human and JSON forms.

use rqemu_block::graph::file_child;
use rqemu_block::node::{ChildRole, NodeRef};
use rqemu_cli::getopt::{HasArg, LongOpt};
use rqemu_cli::human::size_to_str;
use rqemu_cli::outp;
use rqemu_cli::qjson::{dump_human, to_json_pretty, QDict, QValue};

use crate::common::{block_on, open_image, parse_output, Ctx, ImageArgs};

const OBJECT: i32 = 256;
const IMAGE_OPTS: i32 = 257;
const OUTPUT: i32 = 258;
const LIMITS: i32 = 259;

const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, 'h' as i32),
    LongOpt::new("format", HasArg::Required, 'f' as i32),
    LongOpt::new("output", HasArg::Required, OUTPUT),
    LongOpt::new("backing-chain", HasArg::No, 'b' as i32),
    LongOpt::new("object", HasArg::Required, OBJECT),
    LongOpt::new("image-opts", HasArg::No, IMAGE_OPTS),
    LongOpt::new("force-share", HasArg::No, 'U' as i32),
    LongOpt::new("limits", HasArg::No, LIMITS),
];

const HELP: &str = "\
Shows the format, sizes, backing file and format-specific details of FILENAME.

  -f, --format FMT        the image's format (probed when not given)
  --image-opts            FILENAME is a full option string (driver=...,file.filename=...)
  -b, --backing-chain     also show every image of the backing chain
  -U, --force-share       open without locks, while another process uses the image
  --output human|json     output format (default human)
  --object OBJDEF         define an object (such as a secret)
  -h, --help              show this help
";

/// Rounds a length up to whole 512-byte sectors, as QEMU reports lengths.
fn sectors(len: u64) -> u64 {
    len.div_ceil(512) * 512
}

/// Builds QEMU's `BlockGraphInfo` for `node` (children included, backing excluded).
pub async fn graph_info(node: &NodeRef) -> QDict {
    let mut d = QDict::new();
    let filename = node.filename();
    let format = node.driver_name();
    d.insert("filename", filename.as_str());
    d.insert("format", format);
    let dirty = match node
        .as_any()
        .downcast_ref::<rqemu_block::format::qcow2::Qcow2>()
    {
        Some(q) => q.is_dirty().await,
        None => false,
    };
    d.insert("dirty-flag", dirty);
    if let Some(a) = node.allocated_size().await {
        d.insert("actual-size", a);
    }
    d.insert("virtual-size", sectors(node.size()));
    if node.encrypted() {
        d.insert("encrypted", true);
    }
    if let Some(q) = node
        .as_any()
        .downcast_ref::<rqemu_block::format::qcow2::Qcow2>()
    {
        d.insert("cluster-size", q.cluster_size());
        let (bf, bfmt) = q.backing_spec().await;
        if let Some(bf) = bf.filter(|s| !s.is_empty()) {
            d.insert("backing-filename", bf.as_str());
            // QEMU names the backing file's real place only where the image has a
            // directory (a file, or formats and filters over one).
            if let Some(full) = rqemu_block::open::resolve_in(node.dirname(), &bf) {
                d.insert("full-backing-filename", full);
            }
            if let Some(f) = bfmt.filter(|s| !s.is_empty()) {
                d.insert("backing-filename-format", f);
            }
        }
    }
    if let Ok(snaps) = node.snapshots().await {
        if !snaps.is_empty() {
            let list: Vec<QValue> = snaps
                .iter()
                .map(|s| {
                    let mut o = QDict::new();
                    o.insert("id", s.id.as_str());
                    o.insert("name", s.name.as_str());
                    o.insert("vm-state-size", s.vm_state_size);
                    o.insert("date-sec", s.date_sec as u64);
                    o.insert("date-nsec", s.date_nsec as u64);
                    o.insert("vm-clock-sec", s.vm_clock_nsec / 1_000_000_000);
                    o.insert("vm-clock-nsec", s.vm_clock_nsec % 1_000_000_000);
                    if let Some(ic) = s.icount {
                        o.insert("icount", ic);
                    }
                    QValue::Dict(o)
                })
                .collect();
            d.insert("snapshots", QValue::List(list));
        }
    }
    if let Ok(fi) = node.format_info().await {
        if let Some(t) = fi.type_name {
            let mut spec = QDict::new();
            spec.insert("type", t);
            spec.insert("data", QValue::from(&serde_json::Value::Object(fi.data)));
            d.insert("format-specific", spec);
        }
    }
    let mut children = Vec::new();
    for (role, child) in node.children() {
        if role == ChildRole::Backing {
            continue;
        }
        let mut c = QDict::new();
        c.insert("name", role.name());
        c.insert("info", Box::pin(graph_info(&child)).await);
        children.push(QValue::Dict(c));
    }
    d.insert("children", QValue::List(children));
    d
}

fn get<'a>(d: &'a QDict, key: &str) -> Option<&'a QValue> {
    d.iter_qemu_order()
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

fn get_u64(d: &QDict, key: &str) -> Option<u64> {
    match get(d, key)? {
        QValue::Int(i) => Some(*i as u64),
        QValue::UInt(u) => Some(*u),
        _ => None,
    }
}

fn get_str<'a>(d: &'a QDict, key: &str) -> Option<&'a str> {
    match get(d, key)? {
        QValue::Str(s) => Some(s),
        _ => None,
    }
}

/// The snapshot table header line.
pub fn snapshot_header() -> String {
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    )
}

/// One snapshot table line.
pub fn snapshot_line(s: &rqemu_block::info::SnapshotInfo) -> String {
    let date = local_time(s.date_sec as i64);
    let secs = s.vm_clock_nsec / 1_000_000_000;
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (s.vm_clock_nsec / 1_000_000) % 1000
    );
    let icount = s.icount.map(|i| i.to_string()).unwrap_or_default();
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        s.id,
        s.name,
        size_to_str(s.vm_state_size),
        date,
        clock,
        icount
    )
}

/// `%Y-%m-%d %H:%M:%S` in local time.
pub fn local_time(t: i64) -> String {
    // SAFETY: tm is plain data; localtime_r fills it from a valid time_t pointer.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let tt: libc::time_t = t;
    // SAFETY: both pointers are valid for the duration of the call.
    unsafe { libc::localtime_r(&tt, &mut tm) };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

fn dump_node(
    d: &QDict,
    indent: usize,
    snaps: &[rqemu_block::info::SnapshotInfo],
    out: &mut String,
) {
    let ind = " ".repeat(indent * 4);
    let children = match get(d, "children") {
        Some(QValue::List(l)) => l.clone(),
        _ => Vec::new(),
    };
    // Protocol nodes print as such only as children; the image itself is always an
    // "image" with a "file format".
    let protocol = children.is_empty() && indent > 0;
    let vsize = get_u64(d, "virtual-size").unwrap_or(0);
    let dsize = get_u64(d, "actual-size")
        .map(size_to_str)
        .unwrap_or_else(|| "unavailable".into());
    out.push_str(&format!(
        "{ind}{}: {}\n{ind}{}: {}\n{ind}{}: {} ({vsize} bytes)\n{ind}disk size: {dsize}\n",
        if protocol { "filename" } else { "image" },
        get_str(d, "filename").unwrap_or(""),
        if protocol {
            "protocol type"
        } else {
            "file format"
        },
        get_str(d, "format").unwrap_or(""),
        if protocol {
            "file length"
        } else {
            "virtual size"
        },
        size_to_str(vsize),
    ));
    if matches!(get(d, "encrypted"), Some(QValue::Bool(true))) {
        out.push_str(&format!("{ind}encrypted: yes\n"));
    }
    if let Some(cs) = get_u64(d, "cluster-size") {
        out.push_str(&format!("{ind}cluster_size: {cs}\n"));
    }
    if matches!(get(d, "dirty-flag"), Some(QValue::Bool(true))) {
        out.push_str(&format!("{ind}cleanly shut down: no\n"));
    }
    if let Some(bf) = get_str(d, "backing-filename") {
        out.push_str(&format!("{ind}backing file: {bf}"));
        match get_str(d, "full-backing-filename") {
            None => out.push_str(" (cannot determine actual path)"),
            Some(full) if full != bf => out.push_str(&format!(" (actual path: {full})")),
            _ => {}
        }
        out.push('\n');
    }
    if let Some(f) = get_str(d, "backing-filename-format") {
        out.push_str(&format!("{ind}backing file format: {f}\n"));
    }
    if !snaps.is_empty() {
        out.push_str(&format!(
            "{ind}Snapshot list:\n{ind}{}\n",
            snapshot_header()
        ));
        for s in snaps {
            out.push_str(&format!("{ind}{}\n", snapshot_line(s)));
        }
    }
    if let Some(QValue::Dict(spec)) = get(d, "format-specific") {
        if let Some(QValue::Dict(data)) = get(spec, "data") {
            if !data.is_empty() {
                out.push_str(&format!("{ind}Format specific information:\n"));
                dump_human(indent + 1, &QValue::Dict(data.clone()), out);
            }
        }
    }
}

fn dump_graph(
    d: &QDict,
    indent: usize,
    path: &str,
    snaps: &[rqemu_block::info::SnapshotInfo],
    out: &mut String,
) {
    dump_node(d, indent, snaps, out);
    if let Some(QValue::List(children)) = get(d, "children") {
        for c in children {
            let QValue::Dict(c) = c else { continue };
            let name = get_str(c, "name").unwrap_or("");
            out.push_str(&format!(
                "{}Child node '{path}{name}':\n",
                " ".repeat(indent * 4)
            ));
            if let Some(QValue::Dict(info)) = get(c, "info") {
                dump_graph(info, indent + 1, &format!("{path}{name}/"), &[], out);
            }
        }
    }
}

/// Runs `info`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let p = match ctx.getopt("info", args, "f:hbU", LONG) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let mut a = ImageArgs {
        no_backing: true,
        no_io: true,
        ..Default::default()
    };
    let mut json = false;
    let mut chain = false;
    let mut objects = crate::common::Objects::default();
    for (k, v) in &p.opts {
        let v = v.clone().unwrap_or_default();
        match *k {
            k if k == 'h' as i32 => {
                crate::help::print_command(
                    &ctx.prog,
                    "info",
                    "[-f FMT | --image-opts] [-b] [-U] [--output human|json] [--object OBJDEF] FILENAME",
                    HELP,
                );
                return 0;
            }
            k if k == 'f' as i32 => a.format = Some(v),
            k if k == 'b' as i32 => chain = true,
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
        return ctx.usage_error("info", "Expecting one image file name");
    };
    if let Some(extra) = p.operands.get(1) {
        return ctx.usage_error("info", &format!("Unexpected argument: {extra}"));
    }
    a.filename = filename.clone();
    let result = block_on(async {
        let mut infos: Vec<(QDict, Vec<rqemu_block::info::SnapshotInfo>)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut cur = Some(a.clone());
        while let Some(args) = cur.take() {
            if !seen.insert(args.filename.clone()) {
                ctx.error(&format!(
                    "Backing file '{}' creates an infinite loop.",
                    args.filename
                ));
                return None;
            }
            let blk = open_image(ctx, &args).await?;
            let root = blk.root().clone();
            let info = graph_info(&root).await;
            let snaps = root.snapshots().await.unwrap_or_default();
            let _ = blk.close().await;
            if chain {
                if let Some(full) = get_str(&info, "full-backing-filename") {
                    cur = Some(ImageArgs {
                        filename: full.to_string(),
                        format: get_str(&info, "backing-filename-format").map(str::to_string),
                        image_opts: false,
                        ..args.clone()
                    });
                }
            }
            infos.push((info, snaps));
        }
        Some(infos)
    });
    let Some(infos) = result else {
        return 1;
    };
    if json {
        let v = if chain {
            QValue::List(infos.into_iter().map(|(d, _)| QValue::Dict(d)).collect())
        } else {
            infos
                .into_iter()
                .next()
                .map(|(d, _)| QValue::Dict(d))
                .unwrap_or(QValue::Null)
        };
        outp!("{}\n", to_json_pretty(&v));
    } else {
        let mut out = String::new();
        for (i, (d, snaps)) in infos.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            dump_graph(d, 0, "/", snaps, &mut out);
        }
        outp!("{out}");
    }
    let _ = file_child;
    0
}
