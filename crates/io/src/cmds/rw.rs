//! Reading and writing: `read`, `write`, `readv`, `writev`, `aio_read`, `aio_write`.

use std::time::Instant;

use rqemu_block::buffer::AlignedBuf;
use rqemu_block::{BlockBackend, WriteFlags};
use rqemu_cli::{outln, outp};

use super::{parse_opts, usage, CmdInfo};
use crate::args::{num, parse_pattern};
use crate::report::{dump_buffer, report};
use crate::state::State;

/// Largest request length.
const MAX_REQUEST: u64 = (i32::MAX as u64) & !511;

pub(super) const READ_HELP: &str = "
 reads bytes from the image at the given offset

 Example:
 'read -v 512 1k' - reads 1 KiB from offset 512 and dumps it

 -b, -- read from the VM state area instead of the disk
 -C, -- report statistics in a machine-readable form
 -l, -- length for pattern verification (only with -P)
 -p, -- ignored (compatibility)
 -P, -- check that every byte read equals the pattern
 -q, -- quiet: no statistics
 -r, -- accepted (buffer registration)
 -s, -- offset for pattern verification (only with -P)
 -v, -- hex dump of the data read
";

pub(super) const WRITE_HELP: &str = "
 writes bytes to the image at the given offset

 Example:
 'write -P 0xab 512 1k' - writes 1 KiB of 0xab bytes at offset 512

 -b, -- write to the VM state area instead of the disk
 -c, -- write compressed (one whole cluster)
 -C, -- report statistics in a machine-readable form
 -f, -- force unit access (durable on completion)
 -n, -- with -z: fail instead of writing explicit zeroes
 -p, -- ignored (compatibility)
 -P, -- the byte to write (default 0xcd)
 -q, -- quiet: no statistics
 -r, -- accepted (buffer registration)
 -s, -- take the data from a file
 -u, -- with -z: the range may be deallocated
 -z, -- write zeroes with a write-zeroes request
";

pub(super) const READV_HELP: &str = "
 reads bytes at the given offset into several buffers of the given lengths

 -C, -- report statistics in a machine-readable form
 -P, -- check that every byte read equals the pattern
 -q, -- quiet: no statistics
 -r, -- accepted (buffer registration)
 -v, -- hex dump of the data read
";

pub(super) const WRITEV_HELP: &str = "
 writes several buffers of the given lengths at the given offset

 -C, -- report statistics in a machine-readable form
 -f, -- force unit access
 -P, -- the byte to write (default 0xcd)
 -q, -- quiet: no statistics
 -r, -- accepted (buffer registration)
";

pub(super) const AIO_READ_HELP: &str = "
 starts reading bytes at the given offset into several buffers; the result is
 printed when the request completes (aio_flush waits for it)

 -C, -- report statistics in a machine-readable form
 -i, -- accepted (accounting)
 -P, -- check that every byte read equals the pattern
 -q, -- quiet: no statistics
 -r, -- accepted (buffer registration)
 -v, -- hex dump of the data read
";

pub(super) const AIO_WRITE_HELP: &str = "
 starts writing several buffers at the given offset; the result is printed when
 the request completes (aio_flush waits for it)

 -C, -- report statistics in a machine-readable form
 -f, -- force unit access
 -i, -- accepted (accounting)
 -P, -- the byte to write (default 0xcd)
 -q, -- quiet: no statistics
 -r, -- accepted (buffer registration)
 -u, -- with -z: the range may be deallocated
 -z, -- write zeroes
";

fn blk(st: &State) -> BlockBackend {
    st.blk
        .clone()
        .expect("commands needing a file are checked before they run")
}

fn err_line(op: &str, e: &rqemu_block::Error) {
    outln!(
        "{op} failed: {}",
        rqemu_block::error::strerror(e.errno_value())
    );
}

fn check_len(count: u64, arg: &str) -> Result<(), i32> {
    if count > MAX_REQUEST {
        outln!("length cannot exceed {MAX_REQUEST}, given {arg}");
        return Err(-libc::EINVAL);
    }
    Ok(())
}

/// `read`.
pub async fn read(st: &mut State, c: &CmdInfo, argv: &[String]) -> i32 {
    let p = match parse_opts(c, argv, "bCl:pP:qrs:v") {
        Ok(p) => p,
        Err(e) => return e,
    };
    let (mut machine, mut quiet, mut dump, mut vmstate) = (false, false, false, false);
    let mut pattern: Option<u8> = None;
    let mut pat_off: Option<u64> = None;
    let mut pat_len: Option<u64> = None;
    for (k, v) in &p.opts {
        let v = v.clone().unwrap_or_default();
        match *k as u8 as char {
            'b' => vmstate = true,
            'C' => machine = true,
            'l' => match num(&v) {
                Ok(n) => pat_len = Some(n),
                Err(e) => return e,
            },
            'P' => match parse_pattern(&v) {
                Ok(b) => pattern = Some(b),
                Err(e) => return e,
            },
            'q' => quiet = true,
            's' => match num(&v) {
                Ok(n) => pat_off = Some(n),
                Err(e) => return e,
            },
            'v' => dump = true,
            _ => {}
        }
    }
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
    if let Err(e) = check_len(count, &p.operands[1]) {
        return e;
    }
    if pattern.is_none() && (pat_len.is_some() || pat_off.is_some()) {
        usage(c);
        return -libc::EINVAL;
    }
    let pat_off = pat_off.unwrap_or(0);
    let pat_len = pat_len.unwrap_or(count.saturating_sub(pat_off));
    if pat_off + pat_len > count {
        outln!("pattern verification range exceeds end of read data");
        return -libc::EINVAL;
    }
    if vmstate {
        if offset % 512 != 0 {
            outln!("{offset} is not a sector-aligned value for 'offset'");
            return -libc::EINVAL;
        }
        if count % 512 != 0 {
            outln!("{count} is not a sector-aligned value for 'count'");
            return -libc::EINVAL;
        }
    }
    let b = blk(st);
    let mut buf = AlignedBuf::io(count as usize);
    let t = Instant::now();
    let r = if vmstate {
        b.load_vmstate(offset, &mut buf).await
    } else {
        b.read(offset, &mut buf).await
    };
    let d = t.elapsed();
    if let Err(e) = r {
        err_line("read", &e);
        return -e.errno_value();
    }
    let mut rc = 0;
    if let Some(pb) = pattern {
        let region = &buf[pat_off as usize..(pat_off + pat_len) as usize];
        if region.iter().any(|&x| x != pb) {
            outln!(
                "Pattern verification failed at offset {}, {pat_len} bytes",
                offset + pat_off
            );
            rc = -libc::EINVAL;
        }
    }
    if quiet {
        return rc;
    }
    if dump {
        outp!("{}", dump_buffer(&buf, offset));
    }
    outp!("{}", report("read", d, offset, count, count, 1, machine));
    rc
}

/// Parsed options shared by the write commands.
struct WriteOpts {
    machine: bool,
    quiet: bool,
    fua: bool,
    zero: bool,
    unmap: bool,
    no_fallback: bool,
    compressed: bool,
    vmstate: bool,
    pattern: u8,
    pattern_given: bool,
    source: Option<String>,
}

fn parse_write_opts(
    c: &CmdInfo,
    argv: &[String],
    optstring: &str,
) -> Result<(WriteOpts, Vec<String>), i32> {
    let p = parse_opts(c, argv, optstring)?;
    let mut o = WriteOpts {
        machine: false,
        quiet: false,
        fua: false,
        zero: false,
        unmap: false,
        no_fallback: false,
        compressed: false,
        vmstate: false,
        pattern: 0xcd,
        pattern_given: false,
        source: None,
    };
    for (k, v) in &p.opts {
        let v = v.clone().unwrap_or_default();
        match *k as u8 as char {
            'b' => o.vmstate = true,
            'c' => o.compressed = true,
            'C' => o.machine = true,
            'f' => o.fua = true,
            'n' => o.no_fallback = true,
            'P' => {
                o.pattern = parse_pattern(&v)?;
                o.pattern_given = true;
            }
            'q' => o.quiet = true,
            's' => o.source = Some(v),
            'u' => o.unmap = true,
            'z' => o.zero = true,
            _ => {}
        }
    }
    Ok((o, p.operands))
}

/// `write`.
pub async fn write(st: &mut State, c: &CmdInfo, argv: &[String]) -> i32 {
    let (o, ops) = match parse_write_opts(c, argv, "bcCfnpP:qrs:uz") {
        Ok(x) => x,
        Err(e) => return e,
    };
    if ops.len() != 2 {
        usage(c);
        return -libc::EINVAL;
    }
    if o.vmstate && o.fua {
        outln!("-b and -f cannot be specified at the same time");
        return -libc::EINVAL;
    }
    if o.vmstate && o.compressed {
        outln!("-b and -c cannot be specified at the same time");
        return -libc::EINVAL;
    }
    if o.vmstate && o.zero {
        outln!("-b and -z cannot be specified at the same time");
        return -libc::EINVAL;
    }
    if [o.zero, o.pattern_given, o.source.is_some()]
        .iter()
        .filter(|x| **x)
        .count()
        > 1
    {
        outln!("Only one of -z, -P, and -s can be specified at the same time");
        return -libc::EINVAL;
    }
    if o.unmap && !o.zero {
        outln!("-u requires -z to be specified");
        return -libc::EINVAL;
    }
    if o.no_fallback && !o.zero {
        outln!("-n requires -z to be specified");
        return -libc::EINVAL;
    }
    if o.compressed && o.zero {
        outln!("Cannot use -c and -z at the same time");
        return -libc::EINVAL;
    }
    let offset = match num(&ops[0]) {
        Ok(n) => n,
        Err(e) => return e,
    };
    let count = match num(&ops[1]) {
        Ok(n) => n,
        Err(e) => return e,
    };
    if !o.zero {
        if let Err(e) = check_len(count, &ops[1]) {
            return e;
        }
    }
    if o.vmstate {
        if offset % 512 != 0 {
            outln!("{offset} is not a sector-aligned value for 'offset'");
            return -libc::EINVAL;
        }
        if count % 512 != 0 {
            outln!("{count} is not a sector-aligned value for 'count'");
            return -libc::EINVAL;
        }
    }
    let b = blk(st);
    let mut buf = AlignedBuf::io(if o.zero { 0 } else { count as usize });
    if let Some(src) = &o.source {
        let data = match std::fs::read(src) {
            Ok(d) => d,
            Err(e) => {
                outln!(
                    "Failed to open {src}: {}",
                    rqemu_block::error::strerror(e.raw_os_error().unwrap_or(libc::EIO))
                );
                return -libc::EINVAL;
            }
        };
        if (data.len() as u64) < count {
            outln!("Failed to read {count} bytes from {src}");
            return -libc::EINVAL;
        }
        buf.copy_from_slice(&data[..count as usize]);
    } else if !o.zero {
        buf.fill(o.pattern);
    }
    let t = Instant::now();
    let r = if o.vmstate {
        b.save_vmstate(offset, &buf).await
    } else if o.zero {
        b.write_zeroes_flags(
            offset,
            count,
            WriteFlags {
                fua: o.fua,
                may_unmap: o.unmap,
                no_fallback: o.no_fallback,
            },
        )
        .await
    } else if o.compressed {
        b.write_compressed(offset, &buf).await
    } else {
        b.write(offset, &buf, o.fua).await
    };
    let d = t.elapsed();
    if let Err(e) = r {
        err_line("write", &e);
        return -e.errno_value();
    }
    if !o.quiet {
        outp!("{}", report("wrote", d, offset, count, count, 1, o.machine));
    }
    0
}

fn parse_lengths(ops: &[String]) -> Result<(u64, Vec<u64>), i32> {
    let offset = num(&ops[0])?;
    let mut lens = Vec::new();
    for a in &ops[1..] {
        let n = num(a)?;
        check_len(n, a)?;
        lens.push(n);
    }
    let total: u64 = lens.iter().sum();
    if total > MAX_REQUEST {
        outln!("length cannot exceed {MAX_REQUEST}, given {total}");
        return Err(-libc::EINVAL);
    }
    Ok((offset, lens))
}

/// `readv`.
pub async fn readv(st: &mut State, c: &CmdInfo, argv: &[String]) -> i32 {
    let p = match parse_opts(c, argv, "CP:qrv") {
        Ok(p) => p,
        Err(e) => return e,
    };
    let (mut machine, mut quiet, mut dump) = (false, false, false);
    let mut pattern = None;
    for (k, v) in &p.opts {
        match *k as u8 as char {
            'C' => machine = true,
            'P' => match parse_pattern(v.as_deref().unwrap_or("")) {
                Ok(b) => pattern = Some(b),
                Err(e) => return e,
            },
            'q' => quiet = true,
            'v' => dump = true,
            _ => {}
        }
    }
    if p.operands.len() < 2 {
        usage(c);
        return -libc::EINVAL;
    }
    let (offset, lens) = match parse_lengths(&p.operands) {
        Ok(x) => x,
        Err(e) => return e,
    };
    let total: u64 = lens.iter().sum();
    let b = blk(st);
    let mut buf = AlignedBuf::io(total as usize);
    let t = Instant::now();
    let r = b.read(offset, &mut buf).await;
    let d = t.elapsed();
    if let Err(e) = r {
        err_line("readv", &e);
        return -e.errno_value();
    }
    let mut rc = 0;
    if let Some(pb) = pattern {
        if buf.iter().any(|&x| x != pb) {
            outln!("Pattern verification failed at offset {offset}, {total} bytes");
            rc = -libc::EINVAL;
        }
    }
    if quiet {
        return rc;
    }
    if dump {
        outp!("{}", dump_buffer(&buf, offset));
    }
    outp!("{}", report("read", d, offset, total, total, 1, machine));
    rc
}

/// `writev`.
pub async fn writev(st: &mut State, c: &CmdInfo, argv: &[String]) -> i32 {
    let (o, ops) = match parse_write_opts(c, argv, "CfqrP:") {
        Ok(x) => x,
        Err(e) => return e,
    };
    if ops.len() < 2 {
        usage(c);
        return -libc::EINVAL;
    }
    let (offset, lens) = match parse_lengths(&ops) {
        Ok(x) => x,
        Err(e) => return e,
    };
    let total: u64 = lens.iter().sum();
    let b = blk(st);
    let mut buf = AlignedBuf::io(total as usize);
    buf.fill(o.pattern);
    let t = Instant::now();
    let r = b.write(offset, &buf, o.fua).await;
    let d = t.elapsed();
    if let Err(e) = r {
        err_line("writev", &e);
        return -e.errno_value();
    }
    if !o.quiet {
        outp!("{}", report("wrote", d, offset, total, total, 1, o.machine));
    }
    0
}

/// `aio_read`: runs in the background and reports on completion.
pub async fn aio_read(st: &mut State, c: &CmdInfo, argv: &[String]) -> i32 {
    let p = match parse_opts(c, argv, "CiP:qrv") {
        Ok(p) => p,
        Err(e) => return e,
    };
    let (mut machine, mut quiet, mut dump) = (false, false, false);
    let mut pattern = None;
    for (k, v) in &p.opts {
        match *k as u8 as char {
            'C' => machine = true,
            'P' => match parse_pattern(v.as_deref().unwrap_or("")) {
                Ok(b) => pattern = Some(b),
                Err(e) => return e,
            },
            'q' => quiet = true,
            'v' => dump = true,
            _ => {}
        }
    }
    if p.operands.len() < 2 {
        usage(c);
        return -libc::EINVAL;
    }
    let (offset, lens) = match parse_lengths(&p.operands) {
        Ok(x) => x,
        Err(e) => return e,
    };
    let total: u64 = lens.iter().sum();
    let b = blk(st);
    let h = tokio::task::spawn_local(async move {
        let mut buf = AlignedBuf::io(total as usize);
        let t = Instant::now();
        let r = b.read(offset, &mut buf).await;
        let d = t.elapsed();
        if let Err(e) = r {
            outln!(
                "readv failed: {}",
                rqemu_block::error::strerror(e.errno_value())
            );
            return;
        }
        if let Some(pb) = pattern {
            if buf.iter().any(|&x| x != pb) {
                outln!("Pattern verification failed at offset {offset}, {total} bytes");
            }
        }
        if !quiet {
            if dump {
                outp!("{}", dump_buffer(&buf, offset));
            }
            outp!("{}", report("read", d, offset, total, total, 1, machine));
        }
    });
    st.aio.push(h);
    0
}

/// `aio_write`: runs in the background and reports on completion.
pub async fn aio_write(st: &mut State, c: &CmdInfo, argv: &[String]) -> i32 {
    let (o, ops) = match parse_write_opts(c, argv, "CfiqrP:uz") {
        Ok(x) => x,
        Err(e) => return e,
    };
    if ops.len() < 2 {
        usage(c);
        return -libc::EINVAL;
    }
    if o.zero && o.pattern_given {
        outln!("-z and -P cannot be specified at the same time");
        return -libc::EINVAL;
    }
    if o.unmap && !o.zero {
        outln!("-u requires -z to be specified");
        return -libc::EINVAL;
    }
    let (offset, lens) = match parse_lengths(&ops) {
        Ok(x) => x,
        Err(e) => return e,
    };
    let total: u64 = lens.iter().sum();
    let b = blk(st);
    let h = tokio::task::spawn_local(async move {
        let t = Instant::now();
        let r = if o.zero {
            b.write_zeroes_flags(
                offset,
                total,
                WriteFlags {
                    fua: o.fua,
                    may_unmap: o.unmap,
                    no_fallback: false,
                },
            )
            .await
        } else {
            let mut buf = AlignedBuf::io(total as usize);
            buf.fill(o.pattern);
            b.write(offset, &buf, o.fua).await
        };
        let d = t.elapsed();
        if let Err(e) = r {
            outln!(
                "aio_write failed: {}",
                rqemu_block::error::strerror(e.errno_value())
            );
            return;
        }
        if !o.quiet {
            outp!("{}", report("wrote", d, offset, total, total, 1, o.machine));
        }
    });
    st.aio.push(h);
    0
}
