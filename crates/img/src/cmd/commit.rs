//! `rqemu-img commit`: writes what an overlay (and the layers between it and the base)
//! holds into a backing file, then empties the overlay unless `-d`.

use futures::stream::{self, StreamExt};
use rqemu_block::node::NodeRef;
use rqemu_block::status::{block_status, block_status_chain};
use rqemu_block::{BlockBackend, CacheMode, Error, Prealloc, WriteFlags};
use rqemu_cli::getopt::{HasArg, LongOpt};
use rqemu_cli::outp;

use crate::bufpool::{BufPool, PoolBuf};
use crate::common::{block_on, check_image_opts, cvtnum_full, open_image, Ctx, ImageArgs, Objects};
use crate::ordered::write_in_order;
use crate::progress::Progress;
use crate::ratelimit::RateLimiter;

const OBJECT: i32 = 256;
const IMAGE_OPTS: i32 = 257;

const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, 'h' as i32),
    LongOpt::new("quiet", HasArg::No, 'q' as i32),
    LongOpt::new("progress", HasArg::No, 'p' as i32),
    LongOpt::new("format", HasArg::Required, 'f' as i32),
    LongOpt::new("image-opts", HasArg::No, IMAGE_OPTS),
    LongOpt::new("cache", HasArg::Required, 't' as i32),
    LongOpt::new("drop", HasArg::No, 'd' as i32),
    LongOpt::new("base", HasArg::Required, 'b' as i32),
    LongOpt::new("rate", HasArg::Required, 'r' as i32),
    LongOpt::new("object", HasArg::Required, OBJECT),
];

const SYNOPSIS: &str =
    "[-f FMT | --image-opts] [-t CACHE_MODE] [-b BASE_IMG] [-d] [-r RATE] [-p] [-q] \
[--object OBJDEF] FILENAME";

const HELP: &str = "\
Writes the contents of FILENAME (an overlay) into its backing file, or into BASE_IMG
further down its backing chain, and then empties FILENAME.

  -f, --format FMT         format of FILENAME (probed when not given)
  --image-opts             FILENAME is an option string
  -t, --cache CACHE_MODE   cache mode (default writeback)
  -b, --base BASE_IMG      commit into this image of the backing chain (default:
                           the immediate backing file); implies -d
  -d, --drop               leave FILENAME as it is afterwards
  -r, --rate RATE          write at most RATE bytes per second
  -p, --progress           show progress
  -q, --quiet              print nothing on success
  --object OBJDEF          define an object (such as a secret)
  -h, --help               show this help
";

/// Requests being read at once, and requests read that may wait for the writer while
/// reads go on. Writes to the base run one at a time (its inode lock): few requests in
/// flight keep the buffers in the CPU's last-level cache between read and write, as in
/// `rebase` (bench/img-ops.sh's commit, 11 interleaved runs, fastest: 0.52 s with 2 and
/// 1, 0.55 s with 4 and 2, 0.58 s with the earlier 8 in order and no reads during writes).
const READ_AHEAD: usize = 2;
const MAX_BACKLOG: usize = 1;
/// Longest copy request.
const MAX_REQUEST: u64 = 1 << 20;

/// Runs `commit`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let p = match ctx.getopt("commit", args, "f:ht:b:dpqr:", LONG) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let mut a = ImageArgs {
        writable: true,
        unmap: true,
        cache: Some("writeback".into()),
        ..Default::default()
    };
    let (mut base, mut drop, mut progress, mut quiet, mut rate) = (None, false, false, false, 0);
    let mut objects = Objects::default();
    for (k, v) in &p.opts {
        let v = v.clone().unwrap_or_default();
        match *k {
            k if k == 'h' as i32 => {
                crate::help::print_command(&ctx.prog, "commit", SYNOPSIS, HELP);
                return 0;
            }
            k if k == 'f' as i32 => a.format = Some(v),
            k if k == 't' as i32 => a.cache = Some(v),
            k if k == 'b' as i32 => {
                // The layers between the base and the top become invalid: keep the top
                // as it is so that it still reads the same.
                base = Some(v);
                drop = true;
            }
            k if k == 'd' as i32 => drop = true,
            k if k == 'p' as i32 => progress = true,
            k if k == 'q' as i32 => quiet = true,
            k if k == 'r' as i32 => match cvtnum_full(ctx, "rate limit", &v, true, 0, i64::MAX) {
                Some(r) => rate = r as u64,
                None => return 1,
            },
            IMAGE_OPTS => a.image_opts = true,
            OBJECT => {
                if let Err(c) = objects.define(ctx, &v, 1) {
                    return c;
                }
            }
            _ => {}
        }
    }
    if p.operands.len() != 1 {
        return ctx.usage_error("commit", "Expecting one image file name");
    }
    a.filename = p.operands[0].clone();
    if quiet {
        progress = false;
    }
    if let Some(c) = &a.cache {
        if CacheMode::parse(c).is_err() {
            ctx.error(&format!("Invalid cache option: {c}"));
            return 1;
        }
    }
    if !check_image_opts(ctx, &a) {
        return 1;
    }
    block_on(async {
        a.writable_backing = Some(1);
        let Some(mut blk) = open_image(ctx, &a).await else {
            return 1;
        };
        let mut meter = Progress::new(progress, 1.0);
        meter.print(0.0, 100);
        let depth = match find_base(blk.root(), &a.filename, base.as_deref()) {
            Ok(d) => d,
            Err(msg) => {
                meter.end();
                let _ = blk.close().await;
                ctx.error(&msg);
                return 1;
            }
        };
        if depth != 1 {
            // Reopen with the base read-write (the immediate backing file is by default).
            let _ = blk.close().await;
            std::mem::drop(blk);
            a.writable_backing = Some(depth);
            let Some(b) = open_image(ctx, &a).await else {
                meter.end();
                return 1;
            };
            blk = b;
        }
        // Errors of the copy are the block job's; emptying the overlay is named.
        let strerror = |e: &rqemu_block::Error| rqemu_block::error::strerror(e.errno_value());
        let r = commit(&blk, depth, rate, &mut meter).await.map_err(|e| {
            Error::other(
                format!("Block job failed: {}", strerror(&e)),
                e.errno_value(),
            )
        });
        let r = match r {
            Ok(()) if !drop => match blk.root().make_empty().await {
                Err(e) if e.errno_value() == libc::ENOTSUP => Ok(()),
                Err(e) => Err(Error::other(
                    format!("Failed to empty {}: {}", a.filename, strerror(&e)),
                    e.errno_value(),
                )),
                r => r,
            },
            r => r,
        };
        let closed = match blk.close().await {
            // A close that failed (bitmaps that could not be stored) is tried once more,
            // as QEMU's final close does, before the failure is reported.
            Err(e) => {
                let _ = blk.close().await;
                Err(e)
            }
            ok => ok,
        };
        meter.end();
        match r.and(closed) {
            Ok(()) => {
                if !quiet {
                    outp!("Image committed.\n");
                }
                0
            }
            Err(e) => {
                ctx.error(&e.to_string());
                1
            }
        }
    })
}

/// The depth of the base below `top`: its immediate backing file, or the image of the
/// chain `name` designates (by the name an image records, or by its resolved path).
fn find_base(top: &NodeRef, filename: &str, name: Option<&str>) -> Result<u32, String> {
    let Some(name) = name else {
        return match top.backing() {
            Some(_) => Ok(1),
            None => Err("Image does not have a backing file".into()),
        };
    };
    let mut cur = top.clone();
    let mut depth = 0;
    while let Some(below) = cur.backing() {
        depth += 1;
        if same_image(&cur, &below, name) {
            return Ok(depth);
        }
        cur = below;
    }
    Err(format!(
        "Did not find '{name}' in the backing chain of '{filename}'"
    ))
}

/// Whether `name` designates `below`, the backing node of `cur`.
fn same_image(cur: &NodeRef, below: &NodeRef, name: &str) -> bool {
    let full = rqemu_block::open::resolve_relative(&cur.filename(), name);
    let canon = |p: &str| std::fs::canonicalize(p).ok();
    // A relative name is taken relative to the overlay only (QEMU does not also try it
    // relative to the working directory).
    let direct = full == name;
    (direct && name == below.filename())
        || match (canon(&full), canon(&below.filename())) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        }
}

/// The node `depth` levels below `top`.
fn node_at(top: &NodeRef, depth: u32) -> Option<NodeRef> {
    let mut n = top.clone();
    for _ in 0..depth {
        n = n.backing()?;
    }
    Some(n)
}

/// Whether `[offset, offset + len)` is allocated in one of the `depth` layers from the
/// top, and for how many bytes that answer holds.
pub async fn allocated_above(
    top: &NodeRef,
    depth: u32,
    offset: u64,
    len: u64,
) -> rqemu_block::Result<(bool, u64)> {
    let mut node = top.clone();
    let mut len = len;
    for level in 0..depth {
        let st = block_status(&node, offset, len).await?;
        if st.len == 0 {
            return Ok((false, len));
        }
        len = len.min(st.len);
        if st.allocated {
            return Ok((true, len));
        }
        if level + 1 < depth {
            match node.backing() {
                Some(b) => node = b,
                None => break,
            }
        }
    }
    Ok((false, len))
}

/// Copies everything allocated above the base into it (QEMU's commit job: data is
/// copied, zeroes written as zeroes, in the base's granularity).
async fn commit(
    blk: &BlockBackend,
    depth: u32,
    rate: u64,
    meter: &mut Progress,
) -> rqemu_block::Result<()> {
    let top = blk.root().clone();
    let base = node_at(&top, depth).ok_or_else(|| rqemu_block::Error::errno(libc::ENOENT))?;
    let size = blk.size();
    if base.size() < size {
        base.truncate(size, false, Prealloc::Off).await?;
    }
    let gran = base.cluster_size().map_or(65536, |c| c.clamp(4096, 65536));
    // The ranges to copy, in whole granules.
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let (alloc, n) = allocated_above(&top, depth, pos, size - pos).await?;
        let n = n.max(1);
        if alloc {
            let start = pos / gran * gran;
            let end = (pos + n).div_ceil(gran) * gran;
            let end = end.min(size.div_ceil(gran) * gran);
            match ranges.last_mut() {
                Some(last) if last.0 + last.1 >= start => {
                    last.1 = end.max(last.0 + last.1) - last.0
                }
                _ => ranges.push((start, end - start)),
            }
        }
        pos += n;
    }
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    // Split into requests and run a few at once.
    let mut requests = Vec::new();
    for (start, len) in ranges {
        let mut off = start;
        while off < start + len {
            let n = (start + len - off).min(MAX_REQUEST);
            requests.push((off, n));
            off += n;
        }
    }
    let lens: Vec<u64> = requests.iter().map(|r| r.1).collect();
    let mut limiter = RateLimiter::new(rate);
    let mut done = 0u64;
    // Buffers are taken in request order, so the oldest request always has its own:
    // what is read ahead stays within the pool's budget however fast reads complete.
    let pool = BufPool::new(
        (READ_AHEAD + MAX_BACKLOG + 1) * MAX_REQUEST as usize,
        MAX_REQUEST as usize,
    );
    let pool = &pool;
    let reads = stream::iter(requests.into_iter().enumerate())
        .then(|(i, (off, n))| async move { (i, off, n, pool.get(n as usize).await) })
        .map(|(i, off, n, mut buf)| async move {
            let ops = read_range(blk, &mut buf, off, n, size).await?;
            Ok::<_, rqemu_block::Error>((i, Some((n, buf, ops))))
        })
        .buffer_unordered(READ_AHEAD);
    // Writes land in order, so the base is laid out the same each time.
    write_in_order(
        reads,
        MAX_BACKLOG,
        |(n, buf, ops): (u64, PoolBuf, Vec<Op>)| {
            let due = limiter.due(n);
            let base = &base;
            async move {
                for op in ops {
                    match op {
                        Op::Data(pos, at, len) => {
                            let data = &buf[at..at + len];
                            base.write(pos, data, WriteFlags::NONE).await?
                        }
                        Op::Zero(pos, len) => {
                            let flags = WriteFlags {
                                may_unmap: true,
                                ..WriteFlags::NONE
                            };
                            base.write_zeroes(pos, len, flags).await?
                        }
                        Op::Discard(pos, len) => base.discard(pos, len).await?,
                    }
                }
                RateLimiter::sleep_until(due).await;
                Ok::<_, rqemu_block::Error>(())
            }
        },
        |i| {
            done += lens[i];
            meter.print(done as f32 / total as f32 * 100.0, 0);
        },
    )
    .await?;
    // qemu-img reports completion three times (the job's last step, the job's end and
    // the command's end), and each prints a 100% line.
    for _ in 0..3 {
        meter.print(100.0, 0);
    }
    base.flush().await
}

/// What one stretch of the base receives.
enum Op {
    /// Data at an offset, from the request's buffer at `at`, `len` bytes.
    Data(u64, usize, usize),
    Zero(u64, u64),
    Discard(u64, u64),
}

/// Reads one range from the top of the chain into `buf` (as long as the range): data
/// where the chain has data, zeroes or discards elsewhere (QEMU's commit job does the
/// same per status).
async fn read_range(
    blk: &BlockBackend,
    buf: &mut [u8],
    off: u64,
    n: u64,
    size: u64,
) -> rqemu_block::Result<Vec<Op>> {
    let n = n.min(size.saturating_sub(off));
    let mut ops = Vec::new();
    let mut pos = off;
    while pos < off + n {
        let cs = block_status_chain(blk.root(), pos, off + n - pos).await?;
        let len = cs.status.len.max(1).min(off + n - pos);
        if cs.status.data {
            let at = (pos - off) as usize;
            let len = len as usize;
            blk.read(pos, &mut buf[at..at + len]).await?;
            ops.push(Op::Data(pos, at, len));
        } else if cs.status.zero {
            ops.push(Op::Zero(pos, len));
        } else {
            ops.push(Op::Discard(pos, len));
        }
        pos += len;
    }
    Ok(ops)
}
