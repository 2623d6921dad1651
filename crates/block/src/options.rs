//! Open options shared by every front end: cache modes, AIO engines, discard and
//! detect-zeroes policies, and what to open.

use rqemu_opts::KeyVal;

use crate::error::{Error, Result};

/// A cache mode as QEMU defines it: three independent switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheMode {
    /// Bypass the host page cache (O_DIRECT).
    pub direct: bool,
    /// Ignore flush requests.
    pub no_flush: bool,
    /// The guest sees a volatile write cache; without it every write is made durable.
    pub writeback: bool,
}

impl CacheMode {
    /// `writeback`, QEMU's default for images.
    pub const WRITEBACK: CacheMode = CacheMode {
        direct: false,
        no_flush: false,
        writeback: true,
    };

    /// Parses `none`, `writeback`, `writethrough`, `directsync`, `unsafe` (and `off` = `none`).
    pub fn parse(s: &str) -> Result<CacheMode> {
        let (direct, no_flush, writeback) = match s {
            "none" | "off" => (true, false, true),
            "writeback" => (false, false, true),
            "writethrough" => (false, false, false),
            "directsync" => (true, false, false),
            "unsafe" => (false, true, true),
            _ => return Err(Error::invalid(format!("Invalid cache option: {s}"))),
        };
        Ok(CacheMode {
            direct,
            no_flush,
            writeback,
        })
    }

    /// QEMU's name for this mode.
    pub fn name(&self) -> &'static str {
        match (self.direct, self.no_flush, self.writeback) {
            (true, false, true) => "none",
            (false, false, true) => "writeback",
            (false, false, false) => "writethrough",
            (true, false, false) => "directsync",
            (false, true, _) => "unsafe",
            (true, true, _) => "none",
        }
    }
}

impl Default for CacheMode {
    fn default() -> Self {
        CacheMode::WRITEBACK
    }
}

/// How file I/O is submitted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AioMode {
    /// A pool of worker threads (with an inline fast path for page-cache hits).
    #[default]
    Threads,
    /// Linux native AIO; rqemu serves it with io_uring, the best native engine.
    Native,
    /// io_uring.
    IoUring,
}

impl AioMode {
    /// Parses `threads`, `native`, `io_uring`.
    pub fn parse(s: &str) -> Result<AioMode> {
        match s {
            "threads" => Ok(AioMode::Threads),
            "native" => Ok(AioMode::Native),
            "io_uring" => Ok(AioMode::IoUring),
            _ => Err(Error::invalid(format!("invalid aio option '{s}'"))),
        }
    }
}

/// What discard requests do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DiscardMode {
    /// Discards are ignored.
    #[default]
    Ignore,
    /// Discards are passed down.
    Unmap,
}

impl DiscardMode {
    /// Parses `ignore`/`off` and `unmap`/`on`.
    pub fn parse(s: &str) -> Result<DiscardMode> {
        match s {
            "ignore" | "off" => Ok(DiscardMode::Ignore),
            "unmap" | "on" => Ok(DiscardMode::Unmap),
            _ => Err(Error::invalid(format!("Invalid discard option: '{s}'"))),
        }
    }
}

/// Whether writes of all-zero buffers become write-zeroes requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DetectZeroes {
    /// No detection.
    #[default]
    Off,
    /// Zero buffers become write-zeroes.
    On,
    /// Zero buffers become write-zeroes with unmap (needs `discard=unmap`).
    Unmap,
}

impl DetectZeroes {
    /// Parses `off`, `on`, `unmap`.
    pub fn parse(s: &str) -> Result<DetectZeroes> {
        match s {
            "off" => Ok(DetectZeroes::Off),
            "on" => Ok(DetectZeroes::On),
            "unmap" => Ok(DetectZeroes::Unmap),
            _ => Err(Error::invalid(format!(
                "Parameter 'detect-zeroes' does not accept value '{s}'"
            ))),
        }
    }
}

/// Everything needed to open an image (a node graph behind a [`crate::BlockBackend`]).
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Filename or protocol URL; may be `json:{...}`. Empty when `options` names the file.
    pub filename: String,
    /// Format driver; probed from the image's first bytes when absent.
    pub format: Option<String>,
    /// Further driver options in QEMU's dotted form (`file.filename=`, `backing.driver=`).
    pub options: KeyVal,
    /// Open read-only.
    pub read_only: bool,
    /// Cache mode.
    pub cache: CacheMode,
    /// AIO engine for file nodes.
    pub aio: AioMode,
    /// Share the image with other writers and take no locks (`-U`).
    pub force_share: bool,
    /// Do not open backing files.
    pub no_backing: bool,
    /// Put a temporary qcow2 overlay on top; writes go there and vanish on close.
    pub snapshot: bool,
    /// Discard policy.
    pub discard: DiscardMode,
    /// Zero detection policy.
    pub detect_zeroes: DetectZeroes,
    /// Do not print the "probed raw" warning (callers that warn themselves).
    pub quiet_probe: bool,
    /// Opened by `check`: corrupt images may be opened for repair, no repair on open.
    pub check: bool,
    /// Only metadata will be read (no external data file, no repair on open).
    pub no_io: bool,
    /// Open the backing node this many levels below the top read-write as well.
    pub writable_backing: Option<u32>,
}
