//! `rqemu-img map`: how the guest-visible ranges of an image map onto files, as a table
//! (`Offset Length Mapped to File`, data ranges only) or as JSON (every range, with its
//! backing depth and allocation flags), merged into extents the way qemu-img merges them.

use rqemu_block::node::NodeRef;
use rqemu_block::status::block_status_chain;
use rqemu_cli::getopt::{HasArg, LongOpt};
use rqemu_cli::outp;

use crate::common::{block_on, check_image_opts, cvtnum_full, open_image, Ctx, ImageArgs, Objects};

const OBJECT: i32 = 256;
const IMAGE_OPTS: i32 = 257;
const OUTPUT: i32 = 258;

const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, 'h' as i32),
    LongOpt::new("format", HasArg::Required, 'f' as i32),
    LongOpt::new("output", HasArg::Required, OUTPUT),
    LongOpt::new("object", HasArg::Required, OBJECT),
    LongOpt::new("image-opts", HasArg::No, IMAGE_OPTS),
    LongOpt::new("force-share", HasArg::No, 'U' as i32),
    LongOpt::new("start-offset", HasArg::Required, 's' as i32),
    LongOpt::new("max-length", HasArg::Required, 'l' as i32),
];

const SYNOPSIS: &str = "[-f FMT | --image-opts] [--start-offset OFFSET] [--max-length LENGTH]\n        [--output human|json] [-U] [--object OBJDEF] FILENAME";

const HELP: &str = "\
Shows which guest ranges of FILENAME hold data, which read as zeroes, which come
from a backing file, and where the data is stored. The human table lists data
ranges only, with their offsets in the file named in the last column; JSON lists
every range with its backing depth and flags.

  -f, --format FMT           the image's format (probed when not given)
  --image-opts               FILENAME is a full option string (driver=...,file.filename=...)
  -s, --start-offset OFFSET  begin at guest offset OFFSET instead of 0
  -l, --max-length LENGTH    stop after LENGTH bytes instead of at the end
  --output human|json        output format (default human)
  -U, --force-share          open without locks, while another process uses the image
  --object OBJDEF            define an object (such as a secret)
  -h, --help                 show this help
";

/// One extent of the map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Entry {
    start: u64,
    length: u64,
    depth: u32,
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    /// Offset in `filename`'s node, when the range is stored contiguously.
    offset: Option<u64>,
    /// The node holding the range (only with an offset).
    filename: Option<String>,
}

impl Entry {
    /// Whether `next` continues this extent (qemu-img's `entry_mergeable`).
    fn mergeable(&self, next: &Entry) -> bool {
        if self.length == 0
            || self.zero != next.zero
            || self.data != next.data
            || self.compressed != next.compressed
            || self.depth != next.depth
            || self.present != next.present
            || self.filename != next.filename
            || self.offset.is_some() != next.offset.is_some()
        {
            return false;
        }
        match (self.offset, next.offset) {
            (Some(a), Some(b)) => a.checked_add(self.length) == Some(b),
            _ => true,
        }
    }
}

/// `%#-16x`: C prints zero without the `0x` prefix.
fn hex16(v: u64) -> String {
    let s = if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    };
    format!("{s:<16}")
}

/// Prints one extent. In human form, extents after it that read as zeroes lose the
/// data/zero distinction so that they merge (the table does not show them anyway).
fn dump(ctx: &Ctx, json: bool, e: &Entry, next: Option<&mut Entry>) -> Result<(), ()> {
    if json {
        let mut s = format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
        );
        if let Some(o) = e.offset {
            s.push_str(&format!(", \"offset\": {o}"));
        }
        s.push('}');
        if next.is_some() {
            s.push_str(",\n");
        }
        outp!("{s}");
        return Ok(());
    }
    if e.data && e.offset.is_none() {
        ctx.error("File contains external, encrypted or compressed clusters.");
        return Err(());
    }
    if e.data && !e.zero {
        outp!(
            "{}{}{}{}\n",
            hex16(e.start),
            hex16(e.length),
            hex16(e.offset.unwrap_or(0)),
            e.filename.as_deref().unwrap_or("")
        );
    }
    if let Some(n) = next {
        if !n.data || n.zero {
            n.data = false;
            n.zero = true;
        }
    }
    Ok(())
}

/// The node `depth` backing levels below `top`.
fn node_at_depth(top: &NodeRef, depth: u32) -> NodeRef {
    let mut n = top.clone();
    for _ in 0..depth {
        match n.backing() {
            Some(b) => n = b,
            None => break,
        }
    }
    n
}

/// The status of the range at `offset` (at most `len` bytes) from the top of the chain.
async fn block_status(top: &NodeRef, offset: u64, len: u64) -> rqemu_block::Result<Entry> {
    let cs = block_status_chain(top, offset, len).await?;
    let st = cs.status;
    let found = st.data || st.zero;
    let host = if found { st.host } else { None };
    let filename = host.as_ref().map(|h| match &h.node {
        Some(n) => n.filename(),
        None => node_at_depth(top, cs.depth).filename(),
    });
    Ok(Entry {
        start: offset,
        length: st.len.max(1),
        depth: cs.depth,
        present: st.allocated && found,
        zero: st.zero,
        data: st.data,
        compressed: st.compressed,
        offset: host.map(|h| h.offset),
        filename,
    })
}

async fn map_image(ctx: &Ctx, a: &ImageArgs, json: bool, start: u64, max_len: Option<u64>) -> i32 {
    let Some(blk) = open_image(ctx, a).await else {
        return 1;
    };
    let top = blk.root().clone();
    if json {
        outp!("[");
    } else {
        outp!(
            "{:<16}{:<16}{:<16}{}\n",
            "Offset",
            "Length",
            "Mapped to",
            "File"
        );
    }
    // Lengths are whole sectors in QEMU (a raw file's partial last sector counts).
    let mut length = blk.size().div_ceil(512) * 512;
    if let Some(m) = max_len {
        length = length.min(start.saturating_add(m));
    }
    let mut curr = Entry {
        start,
        ..Default::default()
    };
    let mut failed = false;
    while curr.start + curr.length < length {
        let offset = curr.start + curr.length;
        let mut next = match block_status(&top, offset, length - offset).await {
            Ok(e) => e,
            Err(e) => {
                ctx.error(&format!(
                    "Could not read file metadata: {}",
                    rqemu_block::error::strerror(e.errno_value())
                ));
                failed = true;
                break;
            }
        };
        if curr.mergeable(&next) {
            curr.length += next.length;
            continue;
        }
        if curr.length > 0 && dump(ctx, json, &curr, Some(&mut next)).is_err() {
            failed = true;
            break;
        }
        curr = next;
    }
    if !failed {
        failed = dump(ctx, json, &curr, None).is_err();
        if json && !failed {
            outp!("]\n");
        }
    }
    let _ = blk.close().await;
    i32::from(failed)
}

/// Runs `map`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let p = match ctx.getopt("map", args, "hf:s:l:U", LONG) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let mut a = ImageArgs::default();
    let mut json = false;
    let mut start = 0u64;
    let mut max_len = None;
    let mut objects = Objects::default();
    for (k, v) in &p.opts {
        let v = v.clone().unwrap_or_default();
        match *k {
            k if k == 'h' as i32 => {
                crate::help::print_command(&ctx.prog, "map", SYNOPSIS, HELP);
                return 0;
            }
            k if k == 'f' as i32 => a.format = Some(v),
            k if k == 'U' as i32 => a.force_share = true,
            k if k == 's' as i32 => match cvtnum_full(ctx, "start offset", &v, true, 0, i64::MAX) {
                Some(n) => start = n as u64,
                None => return 1,
            },
            k if k == 'l' as i32 => match cvtnum_full(ctx, "max length", &v, true, 0, i64::MAX) {
                Some(n) => max_len = Some(n as u64),
                None => return 1,
            },
            OUTPUT => match v.as_str() {
                "json" => json = true,
                "human" => json = false,
                _ => {
                    return ctx.usage_error(
                        "map",
                        &format!("--output expects 'human' or 'json' not '{v}'"),
                    )
                }
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
    if p.operands.len() != 1 {
        return ctx.usage_error("map", "Expecting one image file name");
    }
    a.filename = p.operands[0].clone();
    if !check_image_opts(ctx, &a) {
        return 1;
    }
    block_on(map_image(ctx, &a, json, start, max_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_columns_follow_c_alternate_form() {
        assert_eq!(hex16(0), format!("{:<16}", "0"));
        assert_eq!(hex16(0x10000), format!("{:<16}", "0x10000"));
    }

    #[test]
    fn extents_merge_only_when_contiguous() {
        let a = Entry {
            start: 0,
            length: 512,
            data: true,
            present: true,
            offset: Some(4096),
            filename: Some("f".into()),
            ..Default::default()
        };
        let mut b = Entry {
            start: 512,
            offset: Some(4608),
            ..a.clone()
        };
        assert!(a.mergeable(&b));
        b.offset = Some(8192);
        assert!(!a.mergeable(&b));
        let empty = Entry::default();
        assert!(!empty.mergeable(&a));
    }
}
