//! `rqemu-img compare`: whether two images show the guest the same contents.
//!
//! Exit status as qemu-img's: 0 identical, 1 different, 2 an image could not be opened,
//! 3 allocation status could not be read, 4 data could not be read. Ranges both images
//! know to be zero are skipped without reading; ranges only one of them allocates must
//! read as zeroes there; the rest is read in large chunks (both images at once) and
//! compared. Strict mode also requires equal sizes and equal allocation status.

use rqemu_block::backend::is_zero;
use rqemu_block::node::NodeRef;
use rqemu_block::status::block_status_chain;
use rqemu_block::{BlockBackend, CacheMode};
use rqemu_cli::getopt::{HasArg, LongOpt};
use rqemu_cli::outp;

use crate::common::{
    block_on, check_image_opts, open_image, read_sectors, Ctx, ImageArgs, Objects,
};
use crate::progress::Progress;

const OBJECT: i32 = 256;
const IMAGE_OPTS: i32 = 257;

const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, 'h' as i32),
    LongOpt::new("a-format", HasArg::Required, 'f' as i32),
    LongOpt::new("b-format", HasArg::Required, 'F' as i32),
    LongOpt::new("image-opts", HasArg::No, IMAGE_OPTS),
    LongOpt::new("strict", HasArg::No, 's' as i32),
    LongOpt::new("cache", HasArg::Required, 'T' as i32),
    LongOpt::new("force-share", HasArg::No, 'U' as i32),
    LongOpt::new("progress", HasArg::No, 'p' as i32),
    LongOpt::new("quiet", HasArg::No, 'q' as i32),
    LongOpt::new("object", HasArg::Required, OBJECT),
];

const SYNOPSIS: &str = "[[-f FMT] [-F FMT] | --image-opts] [-s] [-T CACHE] [-U] [-p] [-q]\n        [--object OBJDEF] FILENAME1 FILENAME2";

const HELP: &str = "\
Compares what a guest would read from FILENAME1 and FILENAME2, whatever their
formats and allocation. Images of different sizes can still be identical if the
longer one reads as zeroes past the end of the shorter one.
Exit status: 0 identical, 1 different, 2 an image could not be opened, 3 the
allocation status could not be read, 4 the data could not be read.

  -f, --a-format FMT      format of FILENAME1 (probed when not given)
  -F, --b-format FMT      format of FILENAME2 (probed when not given)
  --image-opts            the file names are full option strings
  -s, --strict            also require equal sizes and equal allocation
  -T, --cache MODE        cache mode for reading both images (default writeback)
  -U, --force-share       open without locks, while other processes use the images
  -p, --progress          show progress
  -q, --quiet             print nothing; only the exit status tells
  --object OBJDEF         define an object (such as a secret)
  -h, --help              show this help
";

/// How much is compared per read (qemu-img's buffer size).
const CHUNK: u64 = 2 << 20;

/// QEMU's `BDRV_BLOCK_*` status bits, compared in strict mode.
mod bits {
    pub const DATA: u32 = 0x01;
    pub const ZERO: u32 = 0x02;
    pub const OFFSET_VALID: u32 = 0x04;
    pub const ALLOCATED: u32 = 0x10;
    pub const EOF: u32 = 0x20;
    pub const COMPRESSED: u32 = 0x80;
}

/// One of the two images.
struct Side<'a> {
    ctx: &'a Ctx,
    blk: BlockBackend,
    top: NodeRef,
    name: &'a str,
    /// Length in whole sectors, as QEMU reports it.
    len: u64,
}

/// Why the comparison stopped.
enum Stop {
    /// The images differ (already reported).
    Differ,
    /// An error with its exit status (already reported).
    Fail(i32),
}

impl Side<'_> {
    /// QEMU's status bits and length for the range at `offset`, the whole chain looked at.
    async fn status(&self, offset: u64, len: u64) -> Result<(u32, u64), Stop> {
        let cs = block_status_chain(&self.top, offset, len)
            .await
            .map_err(|_| {
                self.ctx
                    .error(&format!("Sector allocation test failed for {}", self.name));
                Stop::Fail(3)
            })?;
        let st = &cs.status;
        let pnum = st.len.max(1);
        let mut flags = 0;
        if st.data {
            flags |= bits::DATA;
        }
        if st.zero {
            flags |= bits::ZERO;
        }
        if st.host.is_some() {
            flags |= bits::OFFSET_VALID;
        }
        if st.allocated {
            flags |= bits::ALLOCATED;
        }
        if st.compressed {
            flags |= bits::COMPRESSED;
        }
        if !st.allocated && st.zero {
            // Zeroes past the end of a shorter backing file count as allocated there.
            let mut layer = self.top.clone();
            for _ in 0..cs.depth {
                if let Some(b) = layer.backing() {
                    layer = b;
                }
            }
            if let Some(b) = layer.backing() {
                if offset >= b.size().div_ceil(512) * 512 {
                    flags = bits::ZERO | bits::ALLOCATED;
                }
            }
        }
        if offset + pnum == self.len {
            flags |= bits::EOF;
        }
        Ok((flags, pnum))
    }

    /// Reads `buf.len()` bytes at `offset`.
    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Stop> {
        read_sectors(&self.blk, offset, buf).await.map_err(|e| {
            self.ctx.error(&format!(
                "Error while reading offset {offset} of {}: {}",
                self.name,
                rqemu_block::error::strerror(e.errno_value())
            ));
            Stop::Fail(4)
        })
    }

    /// Checks that `[offset, offset + len)` reads as zeroes.
    async fn check_empty(
        &self,
        offset: u64,
        len: u64,
        buf: &mut [u8],
        quiet: bool,
    ) -> Result<(), Stop> {
        let buf = &mut buf[..len as usize];
        self.read(offset, buf).await?;
        if let Some(i) = first_nonzero_sector(buf) {
            if !quiet {
                outp!("Content mismatch at offset {}!\n", offset + i);
            }
            return Err(Stop::Differ);
        }
        Ok(())
    }
}

/// The start of the first 512-byte sector of `buf` that is not all zeroes.
fn first_nonzero_sector(buf: &[u8]) -> Option<u64> {
    if is_zero(buf) {
        return None;
    }
    let i = buf.chunks(512).position(|c| !is_zero(c))?;
    Some(i as u64 * 512)
}

/// The start of the first 512-byte sector in which `a` and `b` differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<u64> {
    if a == b {
        return None;
    }
    const STEP: usize = 64 << 10;
    let mut base = 0;
    for (x, y) in a.chunks(STEP).zip(b.chunks(STEP)) {
        if x != y {
            let i = x.chunks(512).zip(y.chunks(512)).position(|(p, q)| p != q)?;
            return Some((base + i * 512) as u64);
        }
        base += x.len();
    }
    None
}

async fn compare(
    s1: &Side<'_>,
    s2: &Side<'_>,
    strict: bool,
    quiet: bool,
    progress: &mut Progress,
) -> Result<(), Stop> {
    let total = s1.len.min(s2.len);
    let base = s1.len.max(s2.len);
    progress.print(0.0, 100);
    if strict && s1.len != s2.len {
        if !quiet {
            outp!("Strict mode: Image size mismatch!\n");
        }
        return Err(Stop::Differ);
    }
    let mut buf1 = vec![0u8; CHUNK as usize];
    let mut buf2 = vec![0u8; CHUNK as usize];
    let step = |progress: &mut Progress, chunk: u64| {
        progress.print(chunk as f32 / base as f32 * 100.0, 100);
    };
    let mut offset = 0;
    while offset < total {
        let (f1, p1) = s1.status(offset, s1.len - offset).await?;
        let (f2, p2) = s2.status(offset, s2.len - offset).await?;
        let mut chunk = p1.min(p2);
        if strict && f1 != f2 {
            if !quiet {
                outp!("Strict mode: Offset {offset} block status mismatch!\n");
            }
            return Err(Stop::Differ);
        }
        let (a1, a2) = (f1 & bits::ALLOCATED != 0, f2 & bits::ALLOCATED != 0);
        if f1 & f2 & bits::ZERO != 0 {
            // Both read as zeroes.
        } else if a1 == a2 {
            if a1 {
                chunk = chunk.min(CHUNK);
                let n = chunk as usize;
                let (r1, r2) = tokio::join!(
                    s1.read(offset, &mut buf1[..n]),
                    s2.read(offset, &mut buf2[..n])
                );
                r1?;
                r2?;
                if let Some(i) = first_difference(&buf1[..n], &buf2[..n]) {
                    if !quiet {
                        outp!("Content mismatch at offset {}!\n", offset + i);
                    }
                    return Err(Stop::Differ);
                }
            }
        } else {
            chunk = chunk.min(CHUNK);
            let side = if a1 { s1 } else { s2 };
            side.check_empty(offset, chunk, &mut buf1, quiet).await?;
        }
        offset += chunk;
        step(progress, chunk);
    }
    if s1.len != s2.len {
        if !quiet {
            outp!("Warning: Image size mismatch!\n");
        }
        let over = if s1.len > s2.len { s1 } else { s2 };
        while offset < base {
            let (f, mut chunk) = over.status(offset, base - offset).await?;
            if f & bits::ALLOCATED != 0 && f & bits::ZERO == 0 {
                chunk = chunk.min(CHUNK);
                over.check_empty(offset, chunk, &mut buf1, quiet).await?;
            }
            offset += chunk;
            step(progress, chunk);
        }
    }
    if !quiet {
        outp!("Images are identical.\n");
    }
    Ok(())
}

/// Runs `compare`.
pub fn run(ctx: &Ctx, args: &[String]) -> i32 {
    let p = match ctx.getopt("compare", args, "hf:F:T:pqsU", LONG) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let mut a1 = ImageArgs::default();
    let mut a2 = ImageArgs::default();
    let mut cache = "writeback".to_string();
    let (mut strict, mut quiet, mut show_progress) = (false, false, false);
    let mut objects = Objects::default();
    for (k, v) in &p.opts {
        let v = v.clone().unwrap_or_default();
        match *k {
            k if k == 'h' as i32 => {
                crate::help::print_command(&ctx.prog, "compare", SYNOPSIS, HELP);
                return 0;
            }
            k if k == 'f' as i32 => a1.format = Some(v),
            k if k == 'F' as i32 => a2.format = Some(v),
            k if k == 'T' as i32 => cache = v,
            k if k == 'p' as i32 => show_progress = true,
            k if k == 'q' as i32 => quiet = true,
            k if k == 's' as i32 => strict = true,
            k if k == 'U' as i32 => {
                a1.force_share = true;
                a2.force_share = true;
            }
            OBJECT => {
                if let Err(c) = objects.define(ctx, &v, 2) {
                    return c;
                }
            }
            IMAGE_OPTS => {
                a1.image_opts = true;
                a2.image_opts = true;
            }
            _ => {}
        }
    }
    if quiet {
        show_progress = false;
    }
    if p.operands.len() != 2 {
        return ctx.usage_error("compare", "Expecting two image file names");
    }
    a1.filename = p.operands[0].clone();
    a2.filename = p.operands[1].clone();
    let mut progress = Progress::new(show_progress, 2.0);
    let code = block_on(async {
        if CacheMode::parse(&cache).is_err() {
            ctx.error(&format!("Invalid source cache option: {cache}"));
            return 2;
        }
        a1.cache = Some(cache.clone());
        a2.cache = Some(cache.clone());
        if !check_image_opts(ctx, &a1) {
            return 2;
        }
        let Some(b1) = open_image(ctx, &a1).await else {
            return 2;
        };
        if !check_image_opts(ctx, &a2) {
            let _ = b1.close().await;
            return 2;
        }
        let Some(b2) = open_image(ctx, &a2).await else {
            let _ = b1.close().await;
            return 2;
        };
        let side = |blk: &BlockBackend, name| Side {
            ctx,
            top: blk.root().clone(),
            len: blk.size().div_ceil(512) * 512,
            blk: blk.clone(),
            name,
        };
        let (s1, s2) = (side(&b1, &a1.filename), side(&b2, &a2.filename));
        let r = compare(&s1, &s2, strict, quiet, &mut progress).await;
        let _ = b2.close().await;
        let _ = b1.close().await;
        match r {
            Ok(()) => 0,
            Err(Stop::Differ) => 1,
            Err(Stop::Fail(c)) => c,
        }
    });
    progress.end();
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_are_reported_at_sector_starts() {
        let a = vec![0u8; 200_000];
        let mut b = a.clone();
        assert_eq!(first_difference(&a, &b), None);
        b[70_000] = 1;
        assert_eq!(first_difference(&a, &b), Some(69_632));
        b[3] = 1;
        assert_eq!(first_difference(&a, &b), Some(0));
        assert_eq!(first_nonzero_sector(&a), None);
        assert_eq!(first_nonzero_sector(&b), Some(0));
    }
}
