//! `rqemu-img rebase`: gives an image another backing file (or none). In the default
//! safe mode, whatever would read differently through the new backing file is first
//! copied into the image from the old one, so the guest sees the same disk; `-u` only
//! rewrites the header.

use futures::stream::{self, StreamExt};
use rqemu_block::format::qcow2::Qcow2;
use rqemu_block::node::NodeRef;
use rqemu_block::status::{block_status, is_zero};
use rqemu_block::{BlockBackend, CacheMode, OpenOptions};
use rqemu_cli::getopt::{HasArg, LongOpt};

use super::commit::allocated_above;
use crate::bufpool::{BufPool, PoolBuf};
use crate::common::{
    block_on, check_image_opts, compress_on_pool, open_image, Ctx, ImageArgs, Objects, QEMU_FORMATS,
};
use crate::ordered::write_in_order;
use crate::progress::Progress;

const OBJECT: i32 = 256;
const IMAGE_OPTS: i32 = 257;

const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, 'h' as i32),
    LongOpt::new("quiet", HasArg::No, 'q' as i32),
    LongOpt::new("progress", HasArg::No, 'p' as i32),
    LongOpt::new("format", HasArg::Required, 'f' as i32),
    LongOpt::new("image-opts", HasArg::No, IMAGE_OPTS),
    LongOpt::new("cache", HasArg::Required, 't' as i32),
    LongOpt::new("backing", HasArg::Required, 'b' as i32),
    LongOpt::new("backing-format", HasArg::Required, 'F' as i32),
    LongOpt::new("backing-cache", HasArg::Required, 'T' as i32),
    LongOpt::new("backing-unsafe", HasArg::No, 'u' as i32),
    LongOpt::new("compress", HasArg::No, 'c' as i32),
    LongOpt::new("force-share", HasArg::No, 'U' as i32),
    LongOpt::new("object", HasArg::Required, OBJECT),
];

const SYNOPSIS: &str = "[-f FMT | --image-opts] [-t CACHE] [-q] [-U] [-p] \
[-b BACKING_FILENAME [-F BACKING_FMT] [-T BACKING_CACHE]] [-u] [--object OBJDEF] [-c] FILENAME";

const HELP: &str = "\
Makes BACKING_FILENAME the backing file of FILENAME (\"\" for none). Unless -u is
given, what would then read differently is first copied into FILENAME from its
current backing chain, so its contents stay the same.

  -f, --format FMT             format of FILENAME (probed when not given)
  --image-opts                 FILENAME is an option string
  -t, --cache CACHE            cache mode of FILENAME (default writeback)
  -b, --backing BACKING_FILENAME
                               the new backing file (\"\": none)
  -F, --backing-format FMT     format of the new backing file
  -T, --backing-cache CACHE    cache mode of the backing files (default writeback)
  -u, --backing-unsafe         only change the name in the header
  -c, --compress               write the copied clusters compressed
  -U, --force-share            open the new backing file without locks
  -p, --progress               show progress
  -q, --quiet                  print nothing but errors
  --object OBJDEF              define an object (such as a secret)
  -h, --help                   show this help
";

/// Step of the comparison (qemu-img's buffer size).
const STEP: u64 = 2 << 20;
/// Steps being read at once (both backing files of a step at the same time), finishing
/// in any order; a step is compared as soon as its two buffers are in. Few steps keep
/// the buffers in the CPU's last-level cache between the read, the comparison and the
/// write: with eight steps in flight (36 MiB of buffers) they came back from memory, and
/// the rebase of bench/img-ops.sh took 0.44-0.48 s instead of 0.35-0.38 s.
const READ_AHEAD: usize = 2;
/// Compared steps with data to copy that may wait for the writer while reads go on.
/// Writes to one file run one at a time (its inode lock), so where the backing files
/// differ the writer sets the pace; one waiting step keeps it busy, and more only push
/// buffers out of the cache (medians of 7-9 interleaved runs: 0.26 s with one, 0.28 s
/// with four).
const MAX_BACKLOG: usize = 1;

/// Runs `rebase`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let p = match ctx.getopt("rebase", args, "hf:F:b:upt:T:qUc", LONG) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let mut a = ImageArgs {
        writable: true,
        cache: Some("writeback".into()),
        ..Default::default()
    };
    let mut backing: Option<String> = None;
    let mut backing_fmt: Option<String> = None;
    let mut src_cache = "writeback".to_string();
    let (mut unsafe_mode, mut progress, mut quiet, mut force_share, mut compress) =
        (false, false, false, false, false);
    let mut objects = Objects::default();
    for (k, v) in &p.opts {
        let v = v.clone().unwrap_or_default();
        match *k {
            k if k == 'h' as i32 => {
                crate::help::print_command(&ctx.prog, "rebase", SYNOPSIS, HELP);
                return 0;
            }
            k if k == 'f' as i32 => a.format = Some(v),
            k if k == 'F' as i32 => backing_fmt = Some(v),
            k if k == 'b' as i32 => backing = Some(v),
            k if k == 'u' as i32 => unsafe_mode = true,
            k if k == 'p' as i32 => progress = true,
            k if k == 't' as i32 => a.cache = Some(v),
            k if k == 'T' as i32 => src_cache = v,
            k if k == 'q' as i32 => quiet = true,
            k if k == 'U' as i32 => force_share = true,
            k if k == 'c' as i32 => compress = true,
            IMAGE_OPTS => a.image_opts = true,
            OBJECT => {
                if let Err(c) = objects.define(ctx, &v, 1) {
                    return c;
                }
            }
            _ => {}
        }
    }
    if quiet {
        progress = false;
    }
    if p.operands.len() != 1 {
        return ctx.usage_error("rebase", "Expecting one image file name");
    }
    if !unsafe_mode && backing.is_none() {
        return ctx.usage_error(
            "rebase",
            "Must specify backing file (-b) or use unsafe mode (-u)",
        );
    }
    a.filename = p.operands[0].clone();
    a.no_backing = unsafe_mode;
    let opts = Opts {
        backing,
        backing_fmt,
        src_cache,
        unsafe_mode,
        force_share,
        compress,
    };
    block_on(async {
        let mut meter = Progress::new(progress, 2.0);
        meter.print(0.0, 100);
        let ok = rebase(ctx, &a, &opts, &mut meter).await;
        meter.end();
        if ok {
            0
        } else {
            1
        }
    })
}

/// What the command line asked for, beyond the image.
struct Opts {
    backing: Option<String>,
    backing_fmt: Option<String>,
    src_cache: String,
    unsafe_mode: bool,
    force_share: bool,
    compress: bool,
}

async fn rebase(ctx: &Ctx, a: &ImageArgs, o: &Opts, meter: &mut Progress) -> bool {
    if let Some(c) = &a.cache {
        if CacheMode::parse(c).is_err() {
            ctx.error(&format!("Invalid cache option: {c}"));
            return false;
        }
    }
    if CacheMode::parse(&o.src_cache).is_err() {
        ctx.error(&format!("Invalid source cache option: {}", o.src_cache));
        return false;
    }
    if !check_image_opts(ctx, a) {
        return false;
    }
    let Some(blk) = open_image(ctx, a).await else {
        return false;
    };
    let ok = rebase_open(ctx, &blk, o, meter).await;
    let closed = blk.close().await;
    if let Err(e) = &closed {
        if ok {
            ctx.error(&e.to_string());
        }
    }
    ok && closed.is_ok()
}

async fn rebase_open(ctx: &Ctx, blk: &BlockBackend, o: &Opts, meter: &mut Progress) -> bool {
    let top = blk.root().clone();
    let qcow2 = top.as_any().downcast_ref::<Qcow2>();
    let compressor = blk.compressor();
    if o.compress && compressor.is_none() {
        ctx.error("Compression not supported for this file format");
        return false;
    }
    if let Some(f) = &o.backing_fmt {
        if !QEMU_FORMATS.contains(&f.as_str()) {
            ctx.error(&format!("Invalid format name: '{f}'"));
            return false;
        }
    }
    let write_align = match (qcow2, o.compress) {
        (Some(q), false) => q.subcluster_size(),
        (Some(_), true) => top.cluster_size().unwrap_or(1),
        (None, _) => 1,
    };
    if !o.unsafe_mode {
        let old = top.backing();
        let new = match o.backing.as_deref() {
            Some(name) if !name.is_empty() => match new_backing(ctx, &top, name, o).await {
                Some(n) => Some(n),
                None => return false,
            },
            _ => None,
        };
        if let Err(msg) = copy_differences(blk, old.as_ref(), new, write_align, o, meter).await {
            ctx.error(&msg);
            return false;
        }
    }
    let name = o.backing.as_deref().filter(|b| !b.is_empty());
    let r = match qcow2 {
        Some(_) if name.is_some() && o.backing_fmt.is_none() => {
            Err(rqemu_block::Error::errno(libc::EINVAL))
        }
        Some(q) => q.change_backing_file(name, o.backing_fmt.as_deref()).await,
        None => Err(rqemu_block::Error::errno(libc::ENOTSUP)),
    };
    if let Err(e) = r {
        let shown = name.unwrap_or("(null)");
        let why = match e.errno_value() {
            libc::ENOSPC => "No space left in the file header".to_string(),
            libc::EINVAL if name.is_some() && o.backing_fmt.is_none() => {
                "backing format must be specified".to_string()
            }
            n => rqemu_block::error::strerror(n),
        };
        ctx.error(&format!(
            "Could not change the backing file to '{shown}': {why}"
        ));
        return false;
    }
    meter.print(100.0, 0);
    true
}

/// Where the new backing file comes from: a node of the current chain when it names
/// one (then only what lies above it is compared), else a newly opened image.
enum NewBacking {
    InChain(NodeRef, u32),
    Opened(BlockBackend),
}

impl NewBacking {
    fn node(&self) -> NodeRef {
        match self {
            NewBacking::InChain(n, _) => n.clone(),
            NewBacking::Opened(b) => b.root().clone(),
        }
    }
}

async fn new_backing(ctx: &Ctx, top: &NodeRef, name: &str, o: &Opts) -> Option<NewBacking> {
    let real = rqemu_block::open::resolve_relative(&top.filename(), name);
    let canon = |p: &str| std::fs::canonicalize(p).ok();
    let want = canon(&real);
    let mut cur = top.clone();
    let mut depth = 0;
    while let Some(below) = cur.backing() {
        depth += 1;
        if want.is_some() && canon(&below.filename()) == want {
            return Some(NewBacking::InChain(below, depth));
        }
        cur = below;
    }
    let opts = OpenOptions {
        filename: real,
        format: o.backing_fmt.clone(),
        read_only: true,
        force_share: o.force_share,
        cache: CacheMode::parse(&o.src_cache).unwrap_or_default(),
        quiet_probe: true,
        ..Default::default()
    };
    match BlockBackend::open(&opts).await {
        Ok(b) => Some(NewBacking::Opened(b)),
        Err(e) => {
            ctx.error(&format!("Could not open new backing file '{name}': {e}"));
            None
        }
    }
}

/// One stretch the image does not allocate, to compare between old and new backing.
struct Stretch {
    offset: u64,
    len: u64,
    /// Both backing files read as zeroes here (by their metadata): nothing to compare.
    zero: bool,
}

/// Copies into the image what reads differently through the new backing file.
async fn copy_differences(
    blk: &BlockBackend,
    old: Option<&NodeRef>,
    new: Option<NewBacking>,
    write_align: u64,
    o: &Opts,
    meter: &mut Progress,
) -> Result<(), String> {
    let top = blk.root().clone();
    let size = blk.size();
    let old_size = old.map_or(0, |n| n.size());
    let new_node = new.as_ref().map(NewBacking::node);
    let prefix_depth = match &new {
        Some(NewBacking::InChain(_, d)) => Some(*d),
        _ => None,
    };
    let step_progress = if size != 0 {
        100.0f32 / (size / size.min(STEP)) as f32
    } else {
        0.0
    };
    let meta_err = |e: rqemu_block::Error| {
        format!(
            "error while reading image metadata: {}",
            rqemu_block::error::strerror(e.errno_value())
        )
    };
    // Plan the stretches (metadata only), then compare and write them.
    let mut stretches = Vec::new();
    let mut offset = 0;
    while offset < size {
        let mut n = STEP.min(size - offset);
        let st = block_status(&top, offset, n).await.map_err(meta_err)?;
        n = st.len.clamp(1, n);
        if st.allocated {
            offset += n;
            continue;
        }
        if let (Some(depth), Some(old)) = (prefix_depth, old) {
            let bytes = n;
            if offset >= old.size() {
                n = bytes;
            } else {
                let (alloc, len) = allocated_above(old, depth - 1, offset, n)
                    .await
                    .map_err(meta_err)?;
                n = len.max(1);
                if !alloc {
                    offset += n;
                    continue;
                }
            }
        }
        let start = offset / write_align * write_align;
        let end = (offset + n).div_ceil(write_align) * write_align;
        let len = end.min(size) - start;
        let zero = reads_as_zero(old, start, len).await.map_err(meta_err)?
            && reads_as_zero(new_node.as_ref(), start, len)
                .await
                .map_err(meta_err)?;
        stretches.push(Stretch {
            offset: start,
            len,
            zero,
        });
        offset = start + len;
    }
    let comp = if o.compress { blk.compressor() } else { None };
    // Both buffers of a step are taken in step order, so the oldest step always has its
    // own: what is read ahead stays within the pool's budget however fast reads complete.
    let pool = BufPool::new(
        2 * (READ_AHEAD + MAX_BACKLOG + 1) * STEP as usize,
        STEP as usize,
    );
    let pool = &pool;
    let reads = stream::iter(stretches.into_iter().enumerate())
        .then(|(i, s)| async move {
            let bufs = if s.zero {
                None
            } else {
                let old = pool.get(s.len as usize).await;
                Some((old, pool.get(s.len as usize).await))
            };
            (i, s, bufs)
        })
        .map(|(i, s, bufs)| {
            let (old, new) = (old.cloned(), new_node.clone());
            async move {
                let Some((mut buf_old, mut buf_new)) = bufs else {
                    return Ok::<_, String>((i, None));
                };
                let (r_old, r_new) = futures::join!(
                    read_backing(old.as_ref(), s.offset, &mut buf_old),
                    read_backing(new.as_ref(), s.offset, &mut buf_new)
                );
                r_old.map_err(|_| "error while reading from old backing file".to_string())?;
                r_new.map_err(|_| "error while reading from new backing file".to_string())?;
                // Buffers of steps with nothing to copy go back to the pool as they drop.
                let copy = CopyStep::plan(&s, buf_old, &buf_new, write_align, old_size);
                Ok((i, copy.ok()))
            }
        })
        .buffer_unordered(READ_AHEAD);
    // Steps are compared as their reads end, in any order, and written (and counted for
    // progress) in order, while the next ones are read.
    write_in_order(
        reads,
        MAX_BACKLOG,
        |c: CopyStep| c.write(blk, comp),
        |_| meter.print(step_progress, 100),
    )
    .await
}

/// What one compared step writes into the image: runs of the old backing file's data
/// (zeroes past its end) where the new backing file reads differently.
struct CopyStep {
    offset: u64,
    data: PoolBuf,
    /// (start in `data`, length, write zeroes)
    runs: Vec<(usize, usize, bool)>,
}

impl CopyStep {
    /// Compares a step's two buffers; gives the old one back when nothing differs.
    fn plan(
        s: &Stretch,
        data: PoolBuf,
        new: &[u8],
        write_align: u64,
        old_size: u64,
    ) -> Result<CopyStep, PoolBuf> {
        let mut runs = Vec::new();
        let mut done = 0usize;
        let mut old_eof = s.offset >= old_size;
        while done < data.len() {
            let (differ, n) = compare_chunks(&data[done..], &new[done..], write_align);
            let n = n as usize;
            if differ {
                runs.push((done, n, old_eof));
            }
            done += n;
            if s.offset + done as u64 >= old_size {
                old_eof = true;
            }
        }
        if runs.is_empty() {
            return Err(data);
        }
        Ok(CopyStep {
            offset: s.offset,
            data,
            runs,
        })
    }

    /// Writes the runs (the buffer goes back to its pool afterwards).
    async fn write(
        self,
        blk: &BlockBackend,
        comp: Option<rqemu_block::format::qcow2::compress::Compressor>,
    ) -> Result<(), String> {
        for &(start, len, zeroes) in &self.runs {
            let off = self.offset + start as u64;
            let data = &self.data[start..start + len];
            let r = if zeroes {
                blk.write_zeroes(off, len as u64, false).await
            } else if let Some(c) = comp {
                write_compressed(blk, c, off, data).await
            } else {
                blk.write(off, data, false).await
            };
            r.map_err(|e| {
                format!(
                    "Error while writing to COW image: {}",
                    rqemu_block::error::strerror(e.errno_value())
                )
            })?;
        }
        Ok(())
    }
}

/// Whether `[offset, offset + len)` reads as zeroes through `node` (no node: none).
async fn reads_as_zero(node: Option<&NodeRef>, offset: u64, len: u64) -> rqemu_block::Result<bool> {
    match node {
        Some(n) => is_zero(n, offset, len).await,
        None => Ok(true),
    }
}

/// Reads from a backing file (none: zeroes).
async fn read_backing(
    node: Option<&NodeRef>,
    offset: u64,
    buf: &mut [u8],
) -> rqemu_block::Result<()> {
    match node {
        Some(n) => read_node(n, offset, buf).await,
        None => {
            buf.fill(0);
            Ok(())
        }
    }
}

/// Reads from a node of a chain (bounded by its size, zeroes past an unaligned end).
async fn read_node(node: &NodeRef, offset: u64, buf: &mut [u8]) -> rqemu_block::Result<()> {
    let size = node.size();
    let n = (buf.len() as u64).min(size.saturating_sub(offset)) as usize;
    buf[n..].fill(0);
    if n > 0 {
        node.read(offset, &mut buf[..n]).await?;
    }
    Ok(())
}

/// Writes whole clusters compressed.
async fn write_compressed(
    blk: &BlockBackend,
    c: rqemu_block::format::qcow2::compress::Compressor,
    offset: u64,
    data: &[u8],
) -> rqemu_block::Result<()> {
    let cs = c.cluster_size();
    for (i, chunk) in data.chunks(cs).enumerate() {
        let Some((packed, chunk)) = compress_on_pool(c, chunk.to_vec()).await else {
            return Err(rqemu_block::Error::errno(libc::EIO));
        };
        blk.write_precompressed(offset + (i * cs) as u64, &chunk, packed)
            .await?;
    }
    Ok(())
}

/// Compares two buffers in chunks of `chunk` bytes: whether the first chunks differ, and
/// how long the prefix with that same answer is.
fn compare_chunks(a: &[u8], b: &[u8], chunk: u64) -> (bool, u64) {
    let chunk = if chunk == 0 { 512 } else { chunk as usize };
    let len = a.len().min(b.len());
    let mut i = len.min(chunk);
    let differ = a[..i] != b[..i];
    while i < len {
        let n = (len - i).min(chunk);
        if (a[i..i + n] != b[i..i + n]) != differ {
            break;
        }
        i += n;
    }
    (differ, i as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_with_the_same_answer_group() {
        let a = [0u8; 16];
        let mut b = [0u8; 16];
        assert_eq!(compare_chunks(&a, &b, 4), (false, 16));
        b[9] = 1;
        assert_eq!(compare_chunks(&a, &b, 4), (false, 8));
        assert_eq!(compare_chunks(&a[8..], &b[8..], 4), (true, 4));
    }

    #[test]
    fn a_step_copies_the_chunks_that_differ() {
        let s = Stretch {
            offset: 16,
            len: 16,
            zero: false,
        };
        let pool = BufPool::new(1 << 20, 4096);
        let old = || {
            let mut b = futures::FutureExt::now_or_never(pool.get(16)).expect("budget");
            b.fill(7);
            b
        };
        let same = old();
        let back = CopyStep::plan(&s, old(), &same, 4, 64).err();
        assert_eq!(back.as_deref(), Some(&same[..]));
        let mut new = same.to_vec();
        new[1] = 0;
        new[13] = 0;
        let c = CopyStep::plan(&s, old(), &new, 4, 64).expect("differs");
        assert_eq!(
            (c.offset, c.runs),
            (16, vec![(0, 4, false), (12, 4, false)])
        );
        // Past the old backing file's end, what differs is written as zeroes.
        let c = CopyStep::plan(&s, old(), &new, 4, 24).expect("differs");
        assert_eq!(c.runs, vec![(0, 4, false), (12, 4, true)]);
    }
}
