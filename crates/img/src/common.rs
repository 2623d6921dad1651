//! What rqemu-img's commands share: QEMU-style error reporting, option helpers, opening
//! images, and the async runtime.

use std::future::Future;

use rqemu_block::{BlockBackend, CacheMode, OpenOptions};
use rqemu_cli::getopt::{self, LongOpt, Parsed};
use rqemu_opts::KeyVal;

/// Invocation context.
pub struct Ctx {
    /// Program name as invoked (its basename), used as the message prefix.
    pub prog: String,
}

impl Ctx {
    /// Prints `prog: msg` to stderr (QEMU's `error_report`).
    pub fn error(&self, msg: &str) {
        eprintln!("{}: {msg}", self.prog);
    }

    /// Prints a usage error with the help hint and returns exit status 1.
    pub fn usage_error(&self, cmd: &str, msg: &str) -> i32 {
        self.error(msg);
        let c = if cmd.is_empty() {
            String::new()
        } else {
            format!(" {cmd}")
        };
        eprintln!("Try '{}{c} --help' for more info", self.prog);
        1
    }

    /// Parses a command's options; getopt errors print glibc's message and the hint.
    pub fn getopt(
        &self,
        cmd: &str,
        args: &[String],
        short: &str,
        long: &[LongOpt],
    ) -> Result<Parsed, i32> {
        let label = format!("{} {cmd}", self.prog);
        getopt::parse(&label, args, short, long).map_err(|e| {
            eprintln!("{}", e.0);
            eprintln!("Try '{} {cmd} --help' for more info", self.prog);
            1
        })
    }
}

/// Runs a future to completion on a single-threaded runtime.
pub fn block_on<F: Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime can always be built");
    rt.block_on(f)
}

/// How a command wants an image opened.
#[derive(Debug, Clone, Default)]
pub struct ImageArgs {
    /// Filename (or option string with `image_opts`).
    pub filename: String,
    /// `-f`.
    pub format: Option<String>,
    /// `--image-opts`.
    pub image_opts: bool,
    /// `-U`.
    pub force_share: bool,
    /// Open read-write.
    pub writable: bool,
    /// Skip the backing chain.
    pub no_backing: bool,
    /// `-t` cache mode.
    pub cache: Option<String>,
    /// Opened by `check`.
    pub check: bool,
    /// Metadata only (no data file, no repair).
    pub no_io: bool,
}

/// Opens an image as qemu-img's `img_open` does; errors are reported as
/// `Could not open 'FILE': reason` and yield `None`.
pub async fn open_image(ctx: &Ctx, a: &ImageArgs) -> Option<BlockBackend> {
    match open_image_err(a).await {
        Ok(b) => Some(b),
        Err(e) => {
            ctx.error(&format!("Could not open '{}': {e}", a.filename));
            None
        }
    }
}

/// [`open_image`] without the reporting.
pub async fn open_image_err(a: &ImageArgs) -> rqemu_block::Result<BlockBackend> {
    let mut o = OpenOptions {
        read_only: !a.writable,
        force_share: a.force_share,
        no_backing: a.no_backing,
        check: a.check,
        no_io: a.no_io,
        ..Default::default()
    };
    if let Some(c) = &a.cache {
        o.cache = CacheMode::parse(c)?;
    }
    if a.image_opts {
        o.options = KeyVal::parse(&a.filename, Some("file"))
            .map_err(|e| rqemu_block::Error::invalid(e.to_string()))?;
    } else {
        o.filename = a.filename.clone();
        o.format = a.format.clone();
    }
    BlockBackend::open(&o).await
}

/// Parses `--output` values.
pub fn parse_output(ctx: &Ctx, v: &str) -> Result<bool, i32> {
    match v {
        "json" => Ok(true),
        "human" => Ok(false),
        _ => {
            ctx.error(&format!(
                "--output must be used with human or json as argument."
            ));
            Err(1)
        }
    }
}
