//! The other commands: `open`, `close`, `flush`, `discard`, `truncate`,
//! `length`, `info`, `map`, `alloc`, `sleep`, `sigraise`, `abort`.

use std::time::Instant;

use rqemu_block::node::{BlockDriver, ChildRole, NodeRef, Prealloc};
use rqemu_block::{BlockBackend, CacheMode, DiscardMode, OpenOptions};
use rqemu_cli::qjson::{dump_human, QValue};
use rqemu_cli::{outln, outp};

use super::{parse_opts, usage, CmdInfo};
use crate::args::num;
use crate::report::{cvtstr, report};
use crate::state::State;

pub(super) const DISCARD_HELP: &str = "
 discards (unmaps) bytes of the image at the given offset

 -C, -- report statistics in a machine-readable form
 -q, -- quiet: no statistics
";

pub(super) const OPEN_HELP: &str = "
 opens a new image, closing the current one

 -r, -- read-only
 -s, -- use a temporary overlay (snapshot mode)
 -C, -- accepted (copy-on-read)
 -n, -- bypass the host page cache (cache=none)
 -k, -- native AIO (io_uring)
 -t, -- cache mode
 -d, -- discard mode (ignore or unmap)
 -U, -- open without locks
 -o, -- options in key=value form (driver=..., file.filename=...)
";

fn blk(st: &State) -> BlockBackend {
    st.blk
        .clone()
        .expect("commands needing a file are checked before they run")
}

/// Runs one of the commands of this module.
pub async fn run(st: &mut State, name: &str, c: &CmdInfo, argv: &[String]) -> i32 {
    match name {
        "abort" => {
            rqemu_cli::out::flush();
            std::process::abort()
        }
        "close" => {
            st.close().await;
            0
        }
        "flush" => match blk(st).flush().await {
            Ok(()) => 0,
            Err(e) => -e.errno_value(),
        },
        "length" => {
            outln!("{}", cvtstr(blk(st).size().div_ceil(512) as f64 * 512.0));
            0
        }
        "discard" => discard(st, c, argv).await,
        "truncate" => truncate(st, c, argv).await,
        "info" => info(st).await,
        "map" => map(st).await,
        "alloc" => alloc(st, argv).await,
        "open" => open(st, c, argv).await,
        "reopen" => super::reopen::reopen(st, c, argv).await,
        "sleep" => {
            let Ok(ms) = argv[1].parse::<u64>() else {
                outln!("{} is not a valid number", argv[1]);
                return -libc::EINVAL;
            };
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            0
        }
        "sigraise" => {
            let Ok(sig) = argv[1].parse::<i32>() else {
                outln!("{} is not a valid signal number", argv[1]);
                return -libc::EINVAL;
            };
            rqemu_cli::out::flush();
            // SAFETY: raise() has no memory-safety preconditions.
            unsafe { libc::raise(sig) };
            0
        }
        _ => -libc::EINVAL,
    }
}

async fn discard(st: &mut State, c: &CmdInfo, argv: &[String]) -> i32 {
    let p = match parse_opts(c, argv, "Cq") {
        Ok(p) => p,
        Err(e) => return e,
    };
    let machine = p.opts.iter().any(|(k, _)| *k == 'C' as i32);
    let quiet = p.opts.iter().any(|(k, _)| *k == 'q' as i32);
    if p.operands.len() != 2 {
        usage(c);
        return -libc::EINVAL;
    }
    let offset = match num(&p.operands[0]) {
        Ok(n) => n,
        Err(e) => return e,
    };
    let count = match num(&p.operands[1]) {
        Ok(n) => n,
        Err(e) => return e,
    };
    let b = blk(st);
    let t = Instant::now();
    let r = b.discard_always(offset, count).await;
    let d = t.elapsed();
    if let Err(e) = r {
        outln!(
            "discard failed: {}",
            rqemu_block::error::strerror(e.errno_value())
        );
        return -e.errno_value();
    }
    if !quiet {
        outp!("{}", report("discard", d, offset, count, count, 1, machine));
    }
    0
}

async fn truncate(st: &mut State, c: &CmdInfo, argv: &[String]) -> i32 {
    let p = match parse_opts(c, argv, "m:") {
        Ok(p) => p,
        Err(e) => return e,
    };
    let mut prealloc = Prealloc::Off;
    for (k, v) in &p.opts {
        if *k == 'm' as i32 {
            let v = v.clone().unwrap_or_default();
            match Prealloc::parse(&v) {
                Some(m) => prealloc = m,
                None => {
                    st.error(&format!("Invalid preallocation mode '{v}'"));
                    return -libc::EINVAL;
                }
            }
        }
    }
    if p.operands.len() != 1 {
        usage(c);
        return -libc::EINVAL;
    }
    let size = match num(&p.operands[0]) {
        Ok(n) => n,
        Err(e) => return e,
    };
    match blk(st).truncate(size, false, prealloc).await {
        Ok(()) => 0,
        Err(e) => {
            st.error(&e.to_string());
            -e.errno_value()
        }
    }
}

async fn info(st: &mut State) -> i32 {
    let b = blk(st);
    let root = b.root();
    outln!("format name: {}", root.driver_name());
    let file_child = root
        .children()
        .into_iter()
        .find(|(r, _)| *r == ChildRole::File)
        .map(|(_, n)| n);
    // A protocol node is named twice: as format and as protocol.
    if file_child.is_none() {
        outln!("format name: {}", root.driver_name());
    }
    let Some(q) = root
        .as_any()
        .downcast_ref::<rqemu_block::format::qcow2::Qcow2>()
    else {
        // Other drivers report no cluster size; raw passes the question to its file,
        // and of the protocols only files answer it.
        let answers = |n: &NodeRef| n.driver_name() == "file";
        if file_child
            .as_ref()
            .map_or(answers(root), |f| root.driver_name() == "raw" && answers(f))
        {
            outln!("cluster size: 0 bytes");
            outln!("vm state offset: 0 bytes");
            return 0;
        }
        return -libc::ENOTSUP;
    };
    let cs = q.cluster_size();
    outln!("cluster size: {}", cvtstr(cs as f64));
    outln!("vm state offset: {}", cvtstr(q.vm_state_offset() as f64));
    if let Ok(fi) = root.format_info().await {
        if !fi.data.is_empty() {
            let mut s = String::new();
            dump_human(
                1,
                &QValue::from(&rqemu_block::serde_json_value(fi.data)),
                &mut s,
            );
            outp!("Format specific information:\n{s}");
        }
    }
    0
}

/// Whether `[offset, offset + len)` of `node` starts allocated, and for how long.
async fn is_allocated(node: &NodeRef, offset: u64, len: u64) -> rqemu_block::Result<(bool, u64)> {
    let st = rqemu_block::status::block_status(node, offset, len).await?;
    Ok((st.allocated, st.len))
}

async fn map(st: &mut State) -> i32 {
    let b = blk(st);
    let node = b.root().clone();
    let mut offset = 0u64;
    let mut bytes = node.size().div_ceil(512) * 512;
    while bytes > 0 {
        let (first, mut n) = match is_allocated(&node, offset, bytes).await {
            Ok(x) => x,
            Err(e) => {
                st.error(&format!(
                    "Failed to get allocation status: {}",
                    rqemu_block::error::strerror(e.errno_value())
                ));
                return -e.errno_value();
            }
        };
        if n == 0 {
            st.error("Unexpected end of image");
            return -libc::EIO;
        }
        while n < bytes {
            match is_allocated(&node, offset + n, bytes - n).await {
                Ok((a, m)) if a == first && m > 0 => n += m,
                _ => break,
            }
        }
        outln!(
            "{} (0x{n:x}) bytes {} at offset {} (0x{offset:x})",
            cvtstr(n as f64),
            if first {
                "    allocated"
            } else {
                "not allocated"
            },
            cvtstr(offset as f64)
        );
        offset += n;
        bytes -= n;
    }
    0
}

async fn alloc(st: &mut State, argv: &[String]) -> i32 {
    let start = match num(&argv[1]) {
        Ok(n) => n,
        Err(e) => return e,
    };
    let mut count = match argv.get(2) {
        Some(a) => match num(a) {
            Ok(n) => n,
            Err(e) => return e,
        },
        None => 512,
    };
    let node = blk(st).root().clone();
    let mut offset = start;
    let mut remaining = count;
    let mut sum = 0;
    while remaining > 0 {
        let (a, n) = match is_allocated(&node, offset, remaining).await {
            Ok(x) => x,
            Err(e) => {
                outln!(
                    "is_allocated failed: {}",
                    rqemu_block::error::strerror(e.errno_value())
                );
                return -e.errno_value();
            }
        };
        if n == 0 {
            count -= remaining;
            break;
        }
        offset += n;
        remaining -= n;
        if a {
            sum += n;
        }
    }
    outln!(
        "{sum}/{count} bytes allocated at offset {}",
        cvtstr(start as f64)
    );
    0
}

async fn open(st: &mut State, c: &CmdInfo, argv: &[String]) -> i32 {
    let p = match parse_opts(c, argv, "snCro:kt:d:U") {
        Ok(p) => p,
        Err(e) => return e,
    };
    let mut o = OpenOptions {
        cache: CacheMode {
            direct: false,
            no_flush: false,
            writeback: false,
        },
        discard: DiscardMode::Unmap,
        ..Default::default()
    };
    let mut kv = rqemu_opts::KeyVal::new();
    for (k, v) in &p.opts {
        let v = v.clone().unwrap_or_default();
        match *k as u8 as char {
            's' => o.snapshot = true,
            'n' => {
                o.cache = CacheMode {
                    direct: true,
                    no_flush: false,
                    writeback: true,
                }
            }
            'r' => o.read_only = true,
            'k' => o.aio = rqemu_block::AioMode::Native,
            't' => match CacheMode::parse(&v) {
                Ok(cm) => o.cache = cm,
                Err(_) => {
                    st.error(&format!("Invalid cache option: {v}"));
                    return -libc::EINVAL;
                }
            },
            'd' => match DiscardMode::parse(&v) {
                Ok(d) => o.discard = d,
                Err(_) => {
                    st.error(&format!("Invalid discard option: {v}"));
                    return -libc::EINVAL;
                }
            },
            'U' => o.force_share = true,
            'o' => match rqemu_opts::KeyVal::parse(&v, None) {
                Ok(x) => kv.merge(&x),
                Err(e) => {
                    st.error(&e.to_string());
                    return -libc::EINVAL;
                }
            },
            _ => {}
        }
    }
    if let Some(f) = kv.take("driver") {
        o.format = Some(f);
    }
    o.options = kv;
    let label = match p.operands.as_slice() {
        [f] if st.image_opts => {
            // With --image-opts the argument is an option string, as on the command line.
            match rqemu_opts::KeyVal::parse(f, None) {
                Ok(x) => o.options.merge(&x),
                Err(e) => {
                    st.error(&e.to_string());
                    return -libc::EINVAL;
                }
            }
            if let Some(d) = o.options.take("driver") {
                o.format = Some(d);
            }
            f.clone()
        }
        [f] => {
            o.filename = f.clone();
            f.clone()
        }
        [] if !o.options.is_empty() => String::new(),
        _ => {
            usage(c);
            return -libc::EINVAL;
        }
    };
    if let Err(e) = st.open(o, &label).await {
        // qemu-io names the device only when it was given a filename.
        if label.is_empty() {
            st.error(&format!("can't open: {e}"));
        } else {
            st.error(&format!("can't open device {label}: {e}"));
        }
        return -libc::EINVAL;
    }
    0
}

/// Keeps `BlockDriver` in scope for trait methods on nodes.
#[allow(dead_code)]
fn _uses(_: &dyn BlockDriver) {}
