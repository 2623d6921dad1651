//! `rqemu-img bench`: a simple I/O benchmark. COUNT reads (or writes) of BUFFER_SIZE
//! bytes, DEPTH of them in flight at once on one runtime, at offsets advancing by
//! STEP_SIZE and wrapping inside the image, optionally with a flush every INTERVAL
//! requests (waiting for the queue to drain first unless `--no-drain`).

use std::sync::Arc;
use std::time::Instant;

use rqemu_block::{AioMode, BlockBackend, CacheMode};
use rqemu_cli::getopt::{HasArg, LongOpt};
use rqemu_cli::outp;
use tokio::task::JoinSet;

use crate::bufpool::BufPool;
use crate::common::{block_on, check_image_opts, cvtnum_full, open_image, Ctx, ImageArgs};

const IMAGE_OPTS: i32 = 257;
const PATTERN: i32 = 260;
const FLUSH_INTERVAL: i32 = 261;
const NO_DRAIN: i32 = 262;

const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, 'h' as i32),
    LongOpt::new("format", HasArg::Required, 'f' as i32),
    LongOpt::new("image-opts", HasArg::No, IMAGE_OPTS),
    LongOpt::new("cache", HasArg::Required, 't' as i32),
    LongOpt::new("count", HasArg::Required, 'c' as i32),
    LongOpt::new("depth", HasArg::Required, 'd' as i32),
    LongOpt::new("offset", HasArg::Required, 'o' as i32),
    LongOpt::new("buffer-size", HasArg::Required, 's' as i32),
    LongOpt::new("step-size", HasArg::Required, 'S' as i32),
    LongOpt::new("write", HasArg::No, 'w' as i32),
    LongOpt::new("pattern", HasArg::Required, PATTERN),
    LongOpt::new("flush-interval", HasArg::Required, FLUSH_INTERVAL),
    LongOpt::new("no-drain", HasArg::No, NO_DRAIN),
    LongOpt::new("aio", HasArg::Required, 'i' as i32),
    LongOpt::new("native", HasArg::No, 'n' as i32),
    LongOpt::new("force-share", HasArg::No, 'U' as i32),
];

const SYNOPSIS: &str = "[-f FMT | --image-opts] [-t CACHE] [-c COUNT] [-d DEPTH] [-o OFFSET]\n        [-s BUFFER_SIZE] [-S STEP_SIZE] [-i AIO] [-n] [-U] [-q]\n        [-w [--pattern PATTERN] [--flush-interval INTERVAL [--no-drain]]] FILENAME";

const HELP: &str = "\
Measures how fast FILENAME serves a stream of reads (or writes, with -w) and
prints the time the run took.

  -c, --count COUNT            requests to send (default 75000)
  -d, --depth DEPTH            requests in flight at once (default 64)
  -s, --buffer-size SIZE       bytes per request (default 4k)
  -o, --offset OFFSET          offset of the first request (default 0)
  -S, --step-size SIZE         distance between request offsets (default: SIZE
                               of the requests); offsets wrap inside the image
  -w, --write                  write instead of read
  --pattern BYTE               byte value written (default 0)
  --flush-interval N           flush after every N requests (writes only)
  --no-drain                   flush without waiting for requests in flight
  -t, --cache MODE             cache mode (default writeback)
  -i, --aio threads|native|io_uring   how I/O is submitted
  -n, --native                 native AIO (needs -t none or directsync)
  -f, --format FMT             the image's format (probed when not given)
  --image-opts                 FILENAME is a full option string
  -U, --force-share            open without locks (reads only)
  -q, --quiet                  accepted for compatibility
  -h, --help                   show this help
";

/// The run's parameters.
struct Bench {
    write: bool,
    count: u64,
    depth: u64,
    offset: u64,
    bufsize: u64,
    step: u64,
    pattern: u8,
    flush_interval: u64,
    drain: bool,
}

/// A finished request.
enum Done {
    /// A read or a write.
    Io(rqemu_block::Result<()>),
    /// A flush; `true` when the queue was drained for it.
    Flush(rqemu_block::Result<()>, bool),
}

/// Where the run is (qemu-img's `BenchData` counters).
struct State {
    /// Requests not yet completed.
    n: u64,
    in_flight: u64,
    in_flush: bool,
    offset: u64,
}

fn strerror(e: &rqemu_block::Error) -> String {
    rqemu_block::error::strerror(e.errno_value())
}

/// Runs the requests; returns the time taken, or the exit status after an error.
async fn bench(ctx: &Ctx, blk: &BlockBackend, b: &Bench) -> Result<f64, i32> {
    let image_size = blk.size();
    let data = Arc::new(vec![b.pattern; b.bufsize as usize]);
    // Reads take their buffers from a pool as deep as the queue: allocated once each.
    let len = b.bufsize as usize;
    let pool = BufPool::new(len.saturating_mul(b.depth as usize), len);
    let mut set: JoinSet<Done> = JoinSet::new();
    let mut st = State {
        n: b.count,
        in_flight: 0,
        in_flush: false,
        offset: b.offset,
    };
    let submit = |st: &mut State, set: &mut JoinSet<Done>| {
        while st.n > st.in_flight && st.in_flight < b.depth {
            let offset = st.offset;
            st.in_flight += 1;
            // qemu-img 10.0 wraps at the image size, so a request may cross the end.
            st.offset = (st.offset + b.step) % image_size.max(1);
            let blk = blk.clone();
            if b.write {
                let data = data.clone();
                set.spawn(async move { Done::Io(blk.write(offset, &data, false).await) });
            } else {
                let pool = pool.clone();
                set.spawn(async move {
                    let mut buf = pool.get(len).await;
                    Done::Io(blk.read(offset, &mut buf).await)
                });
            }
        }
    };
    let flush = |set: &mut JoinSet<Done>, drained: bool| {
        let blk = blk.clone();
        set.spawn(async move { Done::Flush(blk.flush().await, drained) });
    };
    let failed = |msg: String| {
        ctx.error(&msg);
        1
    };
    let start = Instant::now();
    submit(&mut st, &mut set);
    while st.n > 0 {
        let Some(done) = set.join_next().await else {
            break;
        };
        match done {
            Err(e) => return Err(failed(format!("Failed request: {e}"))),
            Ok(Done::Flush(Err(e), _)) => {
                return Err(failed(format!("Failed flush request: {}", strerror(&e))))
            }
            Ok(Done::Io(Err(e))) => {
                return Err(failed(format!("Failed request: {}", strerror(&e))))
            }
            Ok(Done::Flush(Ok(()), drained)) => {
                if !drained {
                    continue;
                }
                st.in_flush = false;
            }
            Ok(Done::Io(Ok(()))) => {
                let remaining = st.n - st.in_flight;
                st.n -= 1;
                st.in_flight -= 1;
                if b.flush_interval > 0 && remaining.is_multiple_of(b.flush_interval) {
                    if st.in_flight == 0 || !b.drain {
                        flush(&mut set, b.drain);
                        st.in_flush = b.drain;
                    }
                    if b.drain {
                        continue;
                    }
                }
            }
        }
        if !st.in_flush {
            submit(&mut st, &mut set);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // A flush issued after the last request still has to finish.
    while let Some(done) = set.join_next().await {
        if let Ok(Done::Flush(Err(e), _)) = done {
            return Err(failed(format!("Failed flush request: {}", strerror(&e))));
        }
    }
    Ok(elapsed)
}

/// Runs `bench`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let p = match ctx.getopt("bench", args, "hf:t:c:d:o:s:S:wi:nUq", LONG) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let mut a = ImageArgs::default();
    let mut b = Bench {
        write: false,
        count: 75000,
        depth: 64,
        offset: 0,
        bufsize: 4096,
        step: 0,
        pattern: 0,
        flush_interval: 0,
        drain: true,
    };
    let int_max = i32::MAX as i64;
    for (k, v) in &p.opts {
        let v = v.clone().unwrap_or_default();
        let num = |name: &str, is_size: bool, min: i64, max: i64| {
            cvtnum_full(ctx, name, &v, is_size, min, max).map(|n| n as u64)
        };
        let ok = match *k {
            k if k == 'h' as i32 => {
                crate::help::print_command(&ctx.prog, "bench", SYNOPSIS, HELP);
                return 0;
            }
            k if k == 'f' as i32 => {
                a.format = Some(v.clone());
                true
            }
            IMAGE_OPTS => {
                a.image_opts = true;
                true
            }
            k if k == 't' as i32 => {
                if CacheMode::parse(&v).is_err() {
                    ctx.error("Invalid cache mode");
                    return 1;
                }
                a.cache = Some(v.clone());
                true
            }
            k if k == 'c' as i32 => num("request count", false, 1, int_max)
                .map(|n| b.count = n)
                .is_some(),
            k if k == 'd' as i32 => num("queue depth", false, 1, int_max)
                .map(|n| b.depth = n)
                .is_some(),
            k if k == 'n' as i32 => {
                a.aio = Some(AioMode::Native);
                true
            }
            k if k == 'i' as i32 => {
                match v.as_str() {
                    "native" => a.aio = Some(AioMode::Native),
                    "io_uring" => a.aio = Some(AioMode::IoUring),
                    "threads" => {}
                    _ => {
                        ctx.error(&format!("Invalid aio option: {v}"));
                        return 1;
                    }
                }
                true
            }
            k if k == 'o' as i32 => num("offset", true, 0, i64::MAX)
                .map(|n| b.offset = n)
                .is_some(),
            k if k == 's' as i32 => num("buffer size", true, 1, int_max)
                .map(|n| b.bufsize = n)
                .is_some(),
            k if k == 'S' as i32 => num("step size", true, 0, int_max)
                .map(|n| b.step = n)
                .is_some(),
            k if k == 'w' as i32 => {
                a.writable = true;
                b.write = true;
                true
            }
            PATTERN => num("pattern byte", false, 0, 0xff)
                .map(|n| b.pattern = n as u8)
                .is_some(),
            FLUSH_INTERVAL => num("flush interval", false, 0, int_max)
                .map(|n| b.flush_interval = n)
                .is_some(),
            NO_DRAIN => {
                b.drain = false;
                true
            }
            k if k == 'U' as i32 => {
                a.force_share = true;
                true
            }
            _ => true,
        };
        if !ok {
            return 1;
        }
    }
    if p.operands.len() != 1 {
        return ctx.usage_error("bench", "Expecting one image file name");
    }
    a.filename = p.operands[0].clone();
    if !b.write && b.flush_interval > 0 {
        ctx.error("--flush-interval is only available in write tests");
        return 1;
    }
    if b.flush_interval > 0 && b.flush_interval < b.depth {
        ctx.error("Flush interval can't be smaller than depth");
        return 1;
    }
    if b.step == 0 {
        b.step = b.bufsize;
    }
    if !check_image_opts(ctx, &a) {
        return 1;
    }
    let direct = a
        .cache
        .as_deref()
        .and_then(|c| CacheMode::parse(c).ok())
        .is_some_and(|c| c.direct);
    if a.aio == Some(AioMode::Native) && !direct {
        ctx.error(&format!(
            "Could not open '{}': aio=native was specified, but it requires cache.direct=on, which was not specified.",
            a.filename
        ));
        return 1;
    }
    block_on(async {
        let Some(blk) = open_image(ctx, &a).await else {
            return 1;
        };
        outp!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})\n",
            b.count,
            if b.write { "write" } else { "read" },
            b.bufsize,
            b.depth,
            b.offset,
            b.step
        );
        if b.flush_interval > 0 {
            outp!("Sending flush every {} requests\n", b.flush_interval);
        }
        let r = bench(ctx, &blk, &b).await;
        let close = blk.close().await;
        match r {
            Ok(secs) => {
                outp!("Run completed in {secs:3.3} seconds.\n");
                if let Err(e) = close {
                    ctx.error(&format!("Error while closing the image: {e}"));
                    return 1;
                }
                0
            }
            Err(code) => code,
        }
    })
}
