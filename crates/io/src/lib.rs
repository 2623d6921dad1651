//! `rqemu-io`: qemu-io's command set over the rqemu block layer.
//!
//! The program runs on one single-threaded runtime; asynchronous commands (`aio_read`,
//! `aio_write`) become tasks on it that complete while later commands run, and print
//! their reports when they do, as qemu-io's do.
#![warn(missing_docs)]

pub mod args;
pub mod cmds;
pub mod report;
pub mod state;

use std::io::{BufRead, IsTerminal, Write};

use rqemu_block::{CacheMode, DiscardMode, OpenOptions};
use rqemu_cli::getopt::{self, HasArg, LongOpt};
use rqemu_cli::outp;

use state::State;

const OBJECT: i32 = 256;
const IMAGE_OPTS: i32 = 257;

const LONG: &[LongOpt] = &[
    LongOpt::new("help", HasArg::No, 'h' as i32),
    LongOpt::new("version", HasArg::No, 'V' as i32),
    LongOpt::new("offset", HasArg::Required, 'o' as i32),
    LongOpt::new("cmd", HasArg::Required, 'c' as i32),
    LongOpt::new("format", HasArg::Required, 'f' as i32),
    LongOpt::new("read-only", HasArg::No, 'r' as i32),
    LongOpt::new("snapshot", HasArg::No, 's' as i32),
    LongOpt::new("nocache", HasArg::No, 'n' as i32),
    LongOpt::new("copy-on-read", HasArg::No, 'C' as i32),
    LongOpt::new("misalign", HasArg::No, 'm' as i32),
    LongOpt::new("native-aio", HasArg::No, 'k' as i32),
    LongOpt::new("aio", HasArg::Required, 'i' as i32),
    LongOpt::new("discard", HasArg::Required, 'd' as i32),
    LongOpt::new("cache", HasArg::Required, 't' as i32),
    LongOpt::new("trace", HasArg::Required, 'T' as i32),
    LongOpt::new("object", HasArg::Required, OBJECT),
    LongOpt::new("image-opts", HasArg::No, IMAGE_OPTS),
    LongOpt::new("force-share", HasArg::No, 'U' as i32),
];

/// Handles one `--object` definition: secrets go to the block layer's registry; other
/// object types are accepted and have no effect in rqemu-io.
fn define_object(def: &str) -> Result<(), String> {
    let kv = rqemu_opts::KeyVal::parse(def, Some("qom-type")).map_err(|e| e.to_string())?;
    let Some(ty) = kv.get("qom-type") else {
        return Err("Parameter 'qom-type' is missing".into());
    };
    if ty != "secret" {
        return Ok(());
    }
    let Some(id) = kv.get("id") else {
        return Err("Parameter 'id' is missing".into());
    };
    let value = rqemu_block::crypto::secret::load(kv.get("data"), kv.get("file"), kv.get("format"))
        .map_err(|e| e.to_string())?;
    rqemu_block::crypto::secret::define(id, value);
    Ok(())
}

fn usage(prog: &str) {
    outp!(
        "Usage: {prog} [OPTIONS]... [-c STRING]... [file]\n\
Exercises a disk image with qemu-io's commands.\n\
\n\
  --object OBJDEF      define an object (such as a secret)\n\
  --image-opts         the file argument is a full option string\n\
  -c, --cmd STRING     run a command (may be repeated; without -c, commands are\n\
                       read from standard input)\n\
  -f, --format FMT     image format (probed when not given)\n\
  -r, --read-only      open read-only\n\
  -s, --snapshot       write to a temporary overlay\n\
  -n, --nocache        bypass the host page cache (same as -t none)\n\
  -C, --copy-on-read   accepted for compatibility\n\
  -m, --misalign       accepted for compatibility\n\
  -k, --native-aio     use native AIO (io_uring)\n\
  -i, --aio=MODE       AIO engine: threads, native or io_uring\n\
  -t, --cache=MODE     cache mode: none, writeback, writethrough, directsync, unsafe\n\
  -d, --discard=MODE   discard mode: ignore or unmap\n\
  -T, --trace ...      accepted for compatibility\n\
  -U, --force-share    open without locks\n\
  -h, --help           show this help\n\
  -V, --version        show the version\n\
\n\
'{prog} -c help' lists the commands.\n"
    );
}

/// Runs `rqemu-io` with `args` (program name first); returns the exit status.
pub fn run(args: Vec<String>) -> i32 {
    let prog = args
        .first()
        .map(|a| a.rsplit('/').next().unwrap_or(a).to_string())
        .unwrap_or_else(|| "rqemu-io".into());
    rqemu_block::error::set_program_name(&prog);
    rqemu_block::filter::blkdebug::set_printer(|msg| outp!("{msg}"));
    let code = main_inner(&prog, &args[1.min(args.len())..]);
    rqemu_cli::out::flush();
    code
}

fn main_inner(prog: &str, args: &[String]) -> i32 {
    let p = match getopt::parse(prog, args, "hVc:d:f:rsnCmki:t:T:U", LONG) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{}", e.0);
            usage(prog);
            return 1;
        }
    };
    let mut opts = OpenOptions {
        cache: CacheMode {
            direct: false,
            no_flush: false,
            writeback: false,
        },
        discard: DiscardMode::Unmap,
        ..Default::default()
    };
    let mut cmds: Vec<String> = Vec::new();
    let mut image_opts = false;
    for (k, v) in &p.opts {
        let v = v.clone().unwrap_or_default();
        match *k {
            k if k == 'h' as i32 => {
                usage(prog);
                return 0;
            }
            k if k == 'V' as i32 => {
                outp!(
                    "{prog} version {} (rqemu, compatible with qemu-io 10.0)\n",
                    env!("CARGO_PKG_VERSION")
                );
                return 0;
            }
            k if k == 'c' as i32 => cmds.push(v),
            k if k == 'f' as i32 => opts.format = Some(v),
            k if k == 'r' as i32 => opts.read_only = true,
            k if k == 's' as i32 => opts.snapshot = true,
            k if k == 'n' as i32 => {
                opts.cache = CacheMode {
                    direct: true,
                    no_flush: false,
                    writeback: true,
                }
            }
            k if k == 'k' as i32 => opts.aio = rqemu_block::AioMode::Native,
            k if k == 'i' as i32 => match rqemu_block::AioMode::parse(&v) {
                Ok(a) => opts.aio = a,
                Err(_) => {
                    eprintln!("{prog}: Invalid aio option: {v}");
                    return 1;
                }
            },
            k if k == 't' as i32 => match CacheMode::parse(&v) {
                Ok(c) => opts.cache = c,
                Err(_) => {
                    eprintln!("{prog}: Invalid cache option: {v}");
                    return 1;
                }
            },
            k if k == 'd' as i32 => match DiscardMode::parse(&v) {
                Ok(d) => opts.discard = d,
                Err(_) => {
                    eprintln!("{prog}: Invalid discard option: {v}");
                    return 1;
                }
            },
            k if k == 'U' as i32 => opts.force_share = true,
            IMAGE_OPTS => image_opts = true,
            OBJECT => {
                if let Err(e) = define_object(&v) {
                    eprintln!("{prog}: {e}");
                    return 1;
                }
            }
            _ => {}
        }
    }
    if p.operands.len() > 1 {
        usage(prog);
        return 1;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{prog}: {e}");
            return 1;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let mut st = State::new(prog.to_string());
        st.image_opts = image_opts;
        if let Some(file) = p.operands.first() {
            if image_opts {
                if opts.format.is_some() {
                    eprintln!("{prog}: --image-opts and --format are mutually exclusive");
                    return 1;
                }
                match rqemu_opts::KeyVal::parse(file, Some("file")) {
                    Ok(kv) => opts.options = kv,
                    Err(e) => {
                        eprintln!("{prog}: {e}");
                        return 1;
                    }
                }
            } else {
                opts.filename = file.clone();
            }
            if let Err(e) = st.open(opts, file).await {
                // With --image-opts qemu-io does not name a device.
                if image_opts {
                    eprintln!("{prog}: can't open: {e}");
                } else {
                    eprintln!("{prog}: can't open device {file}: {e}");
                }
                return 1;
            }
        }
        let mut failed = false;
        if cmds.is_empty() {
            let stdin = std::io::stdin();
            let interactive = stdin.is_terminal();
            let mut line = String::new();
            loop {
                outp!("qemu-io> ");
                rqemu_cli::out::flush();
                line.clear();
                match stdin.lock().read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let r = cmds::execute(&mut st, line.trim_end_matches('\n')).await;
                match r {
                    cmds::Outcome::Quit => break,
                    cmds::Outcome::Done(rc) => failed |= rc < 0,
                }
            }
            if interactive {
                let _ = std::io::stdout().write_all(b"\n");
            }
        } else {
            for c in &cmds {
                let r = cmds::execute(&mut st, c).await;
                match r {
                    cmds::Outcome::Quit => break,
                    cmds::Outcome::Done(rc) => failed |= rc < 0,
                }
            }
        }
        st.close().await;
        rqemu_cli::out::flush();
        i32::from(failed)
    })
}
