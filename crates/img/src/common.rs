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
    /// AIO engine (`-i`, `-n`), when not the default.
    pub aio: Option<rqemu_block::AioMode>,
    /// Let zero writes deallocate (QEMU's `BDRV_O_UNMAP`).
    pub unmap: bool,
    /// Open the backing node this many levels down read-write too.
    pub writable_backing: Option<u32>,
    /// Further open options (`encrypt.key-secret` of a target qemu-img created).
    pub extra: Vec<(String, String)>,
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
    if let Some(aio) = a.aio {
        o.aio = aio;
    }
    if a.unmap {
        o.discard = rqemu_block::DiscardMode::Unmap;
    }
    o.writable_backing = a.writable_backing;
    if a.image_opts {
        o.options = KeyVal::parse(&a.filename, Some("file"))
            .map_err(|e| rqemu_block::Error::invalid(e.to_string()))?;
    } else {
        o.filename = a.filename.clone();
        o.format = a.format.clone();
    }
    for (k, v) in &a.extra {
        o.options.set(k, v);
    }
    BlockBackend::open(&o).await
}

/// Parses `--output` values.
pub fn parse_output(ctx: &Ctx, v: &str) -> Result<bool, i32> {
    match v {
        "json" => Ok(true),
        "human" => Ok(false),
        _ => {
            ctx.error("--output must be used with human or json as argument.");
            Err(1)
        }
    }
}

/// Converts a numeric option as qemu-img's `cvtnum_full` does: a size with suffixes when
/// `is_size`, else a C integer (decimal, `0x` hex or `0` octal); values outside
/// `min..=max` are refused. Errors are reported in QEMU's words.
pub fn cvtnum_full(
    ctx: &Ctx,
    name: &str,
    value: &str,
    is_size: bool,
    min: i64,
    max: i64,
) -> Option<i64> {
    let parsed = if is_size {
        parse_size_signed(value)
    } else {
        rqemu_opts::parse_c_u64(value)
    };
    match parsed {
        Err(rqemu_opts::SizeError::Invalid) => {
            ctx.error(&format!("Invalid {name} specified: '{value}'."));
            None
        }
        Ok(v) if v >= min.max(0) as u64 && v <= max as u64 => Some(v as i64),
        _ => {
            ctx.error(&format!(
                "Invalid {name} specified. Must be between {min} and {max}."
            ));
            None
        }
    }
}

/// `qemu_strtosz`, which calls a negative number out of range rather than invalid.
fn parse_size_signed(value: &str) -> Result<u64, rqemu_opts::SizeError> {
    let t = value.trim_start();
    if let Some(rest) = t.strip_prefix('-') {
        if rest.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(rqemu_opts::SizeError::Range);
        }
    }
    rqemu_opts::parse_size(value, 1)
}

/// Why an `--object` definition was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjectError {
    /// Help was asked for and printed: exit successfully.
    Help,
    /// The definition was refused; the error has been reported.
    Invalid,
}

/// User-creatable object types, as `--object help` lists them.
const OBJECT_TYPES: &[&str] = &[
    "authz-list",
    "authz-list-file",
    "authz-simple",
    "main-loop",
    "pr-manager-helper",
    "secret",
    "secret_keyring",
    "thread-context",
    "throttle-group",
    "tls-creds-anon",
    "tls-creds-psk",
    "tls-creds-x509",
];

/// The `--object` definitions of one command line (QEMU's user-creatable objects). rqemu
/// validates them as QEMU does when it creates them; secrets are handed to the block
/// layer's registry ([`rqemu_block::crypto::secret`]) for encrypted images.
#[derive(Debug, Default)]
pub struct Objects {
    ids: Vec<String>,
}

impl Objects {
    /// Checks and records one definition. When the command has to stop, returns its
    /// exit status: 0 after printing help, `fail` after reporting an error.
    pub fn define(&mut self, ctx: &Ctx, def: &str, fail: i32) -> Result<(), i32> {
        self.add(ctx, def).map_err(|e| match e {
            ObjectError::Help => 0,
            ObjectError::Invalid => fail,
        })
    }

    fn add(&mut self, ctx: &Ctx, def: &str) -> Result<(), ObjectError> {
        let invalid = |msg: &str| {
            ctx.error(msg);
            Err(ObjectError::Invalid)
        };
        let kv = match KeyVal::parse(def, Some("qom-type")) {
            Ok(kv) => kv,
            Err(e) => return invalid(&e.to_string()),
        };
        let Some(ty) = kv.get("qom-type") else {
            return invalid("Parameter 'qom-type' is missing");
        };
        if ty == "help" {
            rqemu_cli::outp!("List of user creatable objects:\n");
            for t in OBJECT_TYPES {
                rqemu_cli::outp!("  {t}\n");
            }
            return Err(ObjectError::Help);
        }
        if !OBJECT_TYPES.contains(&ty) {
            return invalid(&format!(
                "Parameter 'qom-type' does not accept value '{ty}'"
            ));
        }
        if ty == "secret" && kv.contains("help") {
            rqemu_cli::outp!(
                "secret options:\n  data=<string>\n  file=<string>\n  format=<QCryptoSecretFormat>\n  iv=<string>\n  keyid=<string>\n"
            );
            return Err(ObjectError::Help);
        }
        let Some(id) = kv.get("id") else {
            return invalid("Parameter 'id' is missing");
        };
        let ident = id.starts_with(|c: char| c.is_ascii_alphabetic())
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
        if !ident {
            return invalid("Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter.");
        }
        if ty == "secret" {
            for (k, v) in kv.iter() {
                match k {
                    "qom-type" | "id" | "data" | "file" | "keyid" | "iv" | "loaded" => {}
                    "format" if v == "raw" || v == "base64" => {}
                    "format" => {
                        return invalid(&format!("Parameter 'format' does not accept value '{v}'"))
                    }
                    other => return invalid(&format!("Parameter '{other}' is unexpected")),
                }
            }
            match rqemu_block::crypto::secret::load(
                kv.get("data"),
                kv.get("file"),
                kv.get("format"),
            ) {
                Ok(value) => {
                    if !self.contains(id) {
                        rqemu_block::crypto::secret::define(id, value);
                    }
                }
                Err(e) => return invalid(&e.to_string()),
            }
        }
        if self.ids.iter().any(|i| i == id) {
            return invalid(&format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            ));
        }
        self.ids.push(id.to_string());
        Ok(())
    }

    /// Whether an object with this id was defined.
    pub fn contains(&self, id: &str) -> bool {
        self.ids.iter().any(|i| i == id)
    }
}

/// qemu-img's checks before opening with `--image-opts`: no `-f` beside it.
pub fn check_image_opts(ctx: &Ctx, a: &ImageArgs) -> bool {
    if a.image_opts && a.format.is_some() {
        ctx.error("--image-opts and --format are mutually exclusive");
        return false;
    }
    if !a.image_opts {
        return true;
    }
    if let Ok(kv) = KeyVal::parse(&a.filename, Some("file")) {
        if a.force_share && kv.get("force-share").is_some_and(|v| v != "on") {
            ctx.error("--force-share/-U conflicts with image options");
            return false;
        }
        // A plain `file=NAME` refers to an existing node, and qemu-img has none.
        if let Some(name) = kv.get("file") {
            ctx.error(&format!(
                "Could not open '{}': Cannot find device='{name}' nor node-name='{name}'",
                a.filename
            ));
            return false;
        }
    }
    true
}

/// Reads `buf.len()` bytes at `offset` of an image whose length QEMU counts in whole
/// sectors: the part of a raw file's partial last sector past its end reads as zeroes.
pub async fn read_sectors(
    blk: &BlockBackend,
    offset: u64,
    buf: &mut [u8],
) -> rqemu_block::Result<()> {
    let n = blk.size().saturating_sub(offset).min(buf.len() as u64) as usize;
    buf[n..].fill(0);
    blk.read(offset, &mut buf[..n]).await
}

/// The block drivers QEMU 10 knows by name (`qemu-img --help`), for checks of format
/// names that QEMU makes before anything is opened.
pub const QEMU_FORMATS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "iscsi",
    "iser",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "snapshot-access",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// Compresses one cluster on the blocking pool (all cores), handing the buffer back with
/// its compressed form (`None`: it does not compress); `None` if the task failed.
pub async fn compress_on_pool<B>(
    c: rqemu_block::format::qcow2::compress::Compressor,
    data: B,
) -> Option<(Option<Vec<u8>>, B)>
where
    B: AsRef<[u8]> + Send + 'static,
{
    // The task is never cancelled; it fails only if it panicked.
    tokio::task::spawn_blocking(move || (c.compress_cluster(data.as_ref()), data))
        .await
        .ok()
}
