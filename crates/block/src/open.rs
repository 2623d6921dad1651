//! Opening images: the one place that turns [`OpenOptions`] into a node graph.
//!
//! Protocol node first (with the cache mode, AIO engine and locks), then the format,
//! probed from the first bytes when not named, then the backing chain, each backing file
//! resolved relative to its overlay and opened read-only. Loops in the chain are refused.

use std::path::Path;
use std::sync::Arc;

use rqemu_opts::KeyVal;

use crate::backend::BlockBackend;
use crate::error::{Error, Result};
use crate::format::qcow2::{Qcow2, Qcow2Options};
use crate::format::raw::RawNode;
use crate::node::NodeRef;
use crate::options::{AioMode, CacheMode, OpenOptions};
use crate::perm::PermRequest;
use crate::probe::{probe_format, PROBE_BUF_SIZE};
use crate::protocol::file::{FileNode, FileOptions};

/// Longest backing chain rqemu opens.
pub const MAX_CHAIN_DEPTH: usize = 1000;

/// Resolves a backing or data file name relative to the image that names it, as QEMU
/// does: absolute names and protocol URLs stay as they are; relative names are taken
/// from the directory part of `base`.
pub fn resolve_relative(base: &str, name: &str) -> String {
    if name.starts_with('/') || is_protocol_name(name) || name.starts_with("json:") {
        return name.to_string();
    }
    match base.rfind('/') {
        Some(i) => format!("{}{}", &base[..=i], name),
        None => name.to_string(),
    }
}

/// `name` as QEMU finds it from an image in directory `dir` (a
/// [`BlockDriver::dirname`]): absolute names, protocol names and `json:` stand alone,
/// relative ones need the directory.
pub fn resolve_in(dir: Option<String>, name: &str) -> Option<String> {
    if name.starts_with('/') || is_protocol_name(name) || name.starts_with("json:") {
        return Some(name.to_string());
    }
    dir.map(|d| format!("{d}{name}"))
}

pub(crate) fn is_protocol_name(name: &str) -> bool {
    match name.find(':') {
        Some(i) => {
            let p = &name[..i];
            !p.is_empty()
                && !p.contains('/')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '_')
                && matches!(
                    p,
                    "nbd" | "nbd+unix" | "nbd+tcp" | "file" | "http" | "https" | "blkdebug"
                )
        }
        None => false,
    }
}

/// Flags that apply to a whole graph.
#[derive(Debug, Clone)]
pub struct GraphFlags {
    /// The top node is opened read-only.
    pub read_only: bool,
    /// Cache mode for every node.
    pub cache: CacheMode,
    /// AIO engine for file nodes.
    pub aio: AioMode,
    /// Take no locks and share everything.
    pub force_share: bool,
    /// Do not open backing files.
    pub no_backing: bool,
    /// Opened by `check` (corrupt images may be opened for repair; no repair on open).
    pub check: bool,
    /// Print nothing about probed raw images.
    pub quiet_probe: bool,
    /// Only metadata will be read.
    pub no_io: bool,
    /// The backing node this many levels down is opened read-write (`commit`'s base).
    pub writable_backing: Option<u32>,
}

impl GraphFlags {
    /// Flags from open options.
    pub fn from_options(o: &OpenOptions) -> GraphFlags {
        GraphFlags {
            read_only: o.read_only,
            cache: o.cache,
            aio: o.aio,
            force_share: o.force_share,
            no_backing: o.no_backing,
            check: o.check,
            quiet_probe: o.quiet_probe,
            no_io: o.no_io,
            writable_backing: o.writable_backing,
        }
    }
}

fn take_bool(kv: &mut KeyVal, key: &str) -> Result<Option<bool>> {
    match kv.take(key) {
        None => Ok(None),
        Some(v) => rqemu_opts::bool_opt(&v)
            .map(Some)
            .ok_or_else(|| Error::invalid(format!("Parameter '{key}' expects 'on' or 'off'"))),
    }
}

/// Opens the graph for `opts` and wraps it in a backend.
pub async fn open_backend(opts: &OpenOptions) -> Result<BlockBackend> {
    let mut flags = GraphFlags::from_options(opts);
    let mut kv = opts.options.clone();
    let mut filename = opts.filename.clone();
    if let Some(json) = filename.strip_prefix("json:") {
        let parsed =
            rqemu_opts::parse_json_filename(json).map_err(|e| Error::invalid(e.to_string()))?;
        let mut merged = parsed;
        merged.merge(&kv);
        kv = merged;
        filename.clear();
    }
    if let Some(ro) = take_bool(&mut kv, "read-only")? {
        flags.read_only = ro;
    }
    if let Some(fs) = take_bool(&mut kv, "force-share")? {
        flags.force_share = fs;
    }
    if flags.force_share && !flags.read_only {
        return Err(Error::invalid(
            "force-share=on can only be used with read-only images",
        ));
    }
    let mut discard = opts.discard;
    if let Some(d) = kv.take("discard") {
        discard = crate::options::DiscardMode::parse(&d)?;
    }
    let mut detect = opts.detect_zeroes;
    if let Some(d) = kv.take("detect-zeroes") {
        detect = crate::options::DetectZeroes::parse(&d)?;
    }
    // An explicit format (-f) wins over a driver named in the options.
    let named = kv.take("driver");
    let format = opts.format.clone().or(named);
    let snapshot = opts.snapshot;
    let mut base_flags = flags.clone();
    if snapshot {
        base_flags.read_only = true;
    }
    let mut chain = Vec::new();
    let root = open_node(&filename, format.as_deref(), kv, &base_flags, &mut chain).await?;
    let mut temp_files = Vec::new();
    let root = if snapshot {
        let (overlay, path) = temporary_overlay(&root, &flags).await?;
        temp_files.push(path);
        overlay
    } else {
        root
    };
    Ok(
        BlockBackend::new(root, flags.read_only, flags.cache, discard, detect)
            .with_temp_files(temp_files),
    )
}

/// Opens one node (format over protocol) and, recursively, its backing chain.
pub async fn open_node(
    filename: &str,
    format: Option<&str>,
    mut kv: KeyVal,
    flags: &GraphFlags,
    chain: &mut Vec<std::path::PathBuf>,
) -> Result<NodeRef> {
    if chain.len() > MAX_CHAIN_DEPTH {
        return Err(Error::invalid("Backing chain is too deep"));
    }
    let mut cache = flags.cache;
    if let Some(d) = take_bool(&mut kv, "cache.direct")? {
        cache.direct = d;
    }
    if let Some(n) = take_bool(&mut kv, "cache.no-flush")? {
        cache.no_flush = n;
    }
    kv.take("node-name");
    kv.take("auto-read-only");
    if let Some(d) = kv.take("discard") {
        crate::options::DiscardMode::parse(&d)?;
    }
    if let Some(d) = kv.take("detect-zeroes") {
        crate::options::DetectZeroes::parse(&d)?;
    }
    // A json: filename (a backing file may be named so).
    let mut format = format;
    let json_driver;
    let mut filename = filename;
    if let Some(json) = filename.strip_prefix("json:") {
        let mut parsed =
            rqemu_opts::parse_json_filename(json).map_err(|e| Error::invalid(e.to_string()))?;
        parsed.merge(&kv);
        kv = parsed;
        json_driver = kv.take("driver");
        if format.is_none() {
            format = json_driver.as_deref();
        }
        filename = "";
    }
    if format == Some("blkdebug") {
        let (node, _) = open_blkdebug(filename, kv, flags, cache, false, chain).await?;
        return Ok(node);
    }
    if format == Some("quorum") {
        return open_quorum(kv, flags).await;
    }
    if format == Some("blklogwrites") {
        return Ok(open_blklogwrites(kv, flags, cache).await?.0);
    }
    // Null devices (driver=null-co / null-aio).
    if let Some(name @ ("null-co" | "null-aio")) = format {
        let name = if name == "null-co" {
            "null-co"
        } else {
            "null-aio"
        };
        return Ok(Arc::new(crate::protocol::null::NullNode::open(
            name,
            &mut kv,
            flags.read_only,
        )?));
    }
    // Protocol-only opens (driver=nbd).
    if format == Some("nbd") {
        let fname = kv.take("filename").unwrap_or_else(|| filename.to_string());
        return Ok(crate::protocol::nbd::open(
            &fname,
            &mut kv,
            flags.read_only,
        )?);
    }
    // Protocol-only opens (driver=file).
    if let Some(proto @ ("file" | "host_device" | "host_cdrom")) = format {
        let fname = kv.take("filename").unwrap_or_else(|| filename.to_string());
        let file = open_file(
            &fname,
            kv,
            flags,
            cache,
            PermRequest::user(!flags.read_only),
            Some(proto),
        )?;
        return Ok(file);
    }
    let mut file_kv = kv.take_child("file");
    if let Some(inner) = file_kv
        .get("driver")
        .filter(|d| matches!(*d, "qcow2" | "raw" | "null-co" | "null-aio"))
        .map(str::to_string)
    {
        // A format node as the `file` child (QEMU takes any driver there).
        file_kv.take("driver");
        let inner_name = file_kv.take("filename").unwrap_or_default();
        // Its own backing chain is separate from the one this node belongs to.
        let mut inner_chain = Vec::new();
        let child = Box::pin(open_node(
            &inner_name,
            Some(&inner),
            file_kv,
            flags,
            &mut inner_chain,
        ))
        .await?;
        let format = format.unwrap_or("raw").to_string();
        let name = child.filename();
        return format_over(child, &format, false, name, kv, flags, cache, chain).await;
    }
    let mut fname = match kv.take("file") {
        Some(f) => f,
        None => file_kv
            .take("filename")
            .unwrap_or_else(|| filename.to_string()),
    };
    if let Some(p) = fname.strip_prefix("file:") {
        // A colon before the first slash would read as another protocol: QEMU keeps
        // such a relative name unambiguous with a leading "./".
        fname = match p.find([':', '/']) {
            Some(i) if p.as_bytes()[i] == b':' => format!("./{p}"),
            _ => p.to_string(),
        };
    }
    let proto = file_kv.take("driver");
    file_kv.take("node-name");
    file_kv.take("auto-read-only");
    let nbd = proto.as_deref() == Some("nbd")
        || (proto.is_none() && crate::protocol::nbd::is_nbd_filename(&fname));
    if fname.is_empty()
        && !nbd
        && !matches!(
            proto.as_deref(),
            Some("blkdebug" | "quorum" | "blklogwrites")
        )
    {
        return Err(Error::invalid(
            "A block device must be specified for \"file\"",
        ));
    }
    match proto.as_deref() {
        None | Some("file") | Some("host_device") | Some("host_cdrom") | Some("nbd")
        | Some("blkdebug") | Some("quorum") | Some("blklogwrites") => {}
        Some(other) => {
            return Err(Error::invalid(format!("Unknown protocol '{other}'")));
        }
    }
    // Open the file without locks first: probing needs to read, and the lock request
    // depends on the format.
    let blkdebug =
        proto.as_deref() == Some("blkdebug") || (proto.is_none() && fname.starts_with("blkdebug:"));
    let (file_ref, file): (NodeRef, Option<Arc<FileNode>>) = if proto.as_deref() == Some("quorum") {
        (open_quorum(file_kv, flags).await?, None)
    } else if proto.as_deref() == Some("blklogwrites") {
        let (node, image) = open_blklogwrites(file_kv, flags, cache).await?;
        // Backing files are found relative to the logged image.
        fname = image;
        (node, None)
    } else if blkdebug {
        let (node, image) = open_blkdebug(&fname, file_kv, flags, cache, true, chain).await?;
        // Backing files are found relative to the image below the filter.
        fname = image;
        (node, None)
    } else if nbd {
        let node = crate::protocol::nbd::open(&fname, &mut file_kv, flags.read_only)?;
        (node, None)
    } else {
        let f = Arc::new(FileNode::open(&file_options(
            &fname,
            &mut file_kv,
            flags,
            cache,
            proto.as_deref(),
        )?)?);
        reject_unknown("file", &file_kv, true)?;
        (f.clone(), Some(f))
    };
    let (format, probed) = match format {
        Some(f) => (f.to_string(), false),
        None => {
            let mut head = vec![0u8; PROBE_BUF_SIZE];
            let n = (file_ref.size() as usize).min(PROBE_BUF_SIZE);
            if n > 0 {
                file_ref.read(0, &mut head[..n]).await.map_err(|e| {
                    e.context("Could not read image for determining its format".to_string())
                })?;
            }
            (probe_format(&head[..n], &fname).to_string(), true)
        }
    };
    let writable = !flags.read_only;
    let req = match format.as_str() {
        "raw" => PermRequest::user(writable),
        _ => PermRequest::metadata_format(writable, flags.force_share),
    };
    if let Some(file) = file.as_ref().filter(|_| !flags.force_share) {
        file.set_perm(req)?;
    }
    format_over(file_ref, &format, probed, fname, kv, flags, cache, chain).await
}

/// Opens a blkdebug node from its options (and a `blkdebug:` filename) over its image:
/// the `image.*` options (any driver), or else the image's filename, opened as a file
/// when the node is the protocol layer of a format (`protocol`) and probed otherwise.
/// Returns the node and the image's filename.
async fn open_blkdebug(
    filename: &str,
    mut kv: KeyVal,
    flags: &GraphFlags,
    cache: CacheMode,
    protocol: bool,
    chain: &mut Vec<std::path::PathBuf>,
) -> Result<(NodeRef, String)> {
    use crate::filter::blkdebug::{BlkdebugNode, BlkdebugOptions};
    let mut image_kv = kv.take_child("image");
    let opts = BlkdebugOptions::take_from(filename, &mut kv)?;
    kv.take("filename");
    reject_unknown("blkdebug", &kv, true)?;
    let name = image_kv
        .take("filename")
        .or_else(|| opts.image_name.clone())
        .unwrap_or_default();
    let child = match image_kv.take("driver") {
        Some(d) => {
            let mut inner_chain = Vec::new();
            Box::pin(open_node(
                &name,
                Some(&d),
                image_kv,
                flags,
                &mut inner_chain,
            ))
            .await?
        }
        None if name.is_empty() => {
            return Err(Error::invalid(
                "The 'file' block driver requires a file name",
            ))
        }
        None if protocol => open_file(
            &name,
            image_kv,
            flags,
            cache,
            PermRequest::user(!flags.read_only),
            None,
        )?,
        None => Box::pin(open_node(&name, None, image_kv, flags, chain)).await?,
    };
    let image = if name.is_empty() {
        child.filename()
    } else {
        name
    };
    let node: NodeRef = Arc::new(BlkdebugNode::open(child, opts).await?);
    Ok((node, image))
}

/// Opens a blklogwrites node over its `file.*` child, logging to its `log.*` child (each
/// a file unless it names another driver). Returns the node and the file's name.
async fn open_blklogwrites(
    mut kv: KeyVal,
    flags: &GraphFlags,
    cache: CacheMode,
) -> Result<(NodeRef, String)> {
    use crate::filter::blklogwrites::{BlkLogWritesNode, BlkLogWritesOptions};
    let mut children = Vec::new();
    for role in ["file", "log"] {
        let mut ckv = kv.take_child(role);
        let name = kv
            .take(role)
            .or_else(|| ckv.take("filename"))
            .unwrap_or_default();
        let child = match ckv.take("driver").filter(|d| d != "file") {
            Some(d) => {
                let mut chain = Vec::new();
                Box::pin(open_node(&name, Some(&d), ckv, flags, &mut chain)).await?
            }
            None if name.is_empty() => {
                return Err(Error::invalid(format!(
                    "A block device must be specified for \"{role}\""
                )))
            }
            None => open_file(
                &name,
                ckv,
                flags,
                cache,
                PermRequest::user(!flags.read_only),
                None,
            )?,
        };
        children.push((child, name));
    }
    let opts = BlkLogWritesOptions::take_from(&mut kv)?;
    kv.take("filename");
    reject_unknown("blklogwrites", &kv, true)?;
    let (log, _) = children.pop().expect("two children");
    let (file, name) = children.pop().expect("two children");
    let node: NodeRef = Arc::new(BlkLogWritesNode::open(file, log, opts).await?);
    Ok((node, name))
}

/// Opens a quorum node over its `children.N.*` (each opened as any node is).
async fn open_quorum(mut kv: KeyVal, flags: &GraphFlags) -> Result<NodeRef> {
    use crate::filter::quorum::{QuorumNode, QuorumOptions};
    let mut children = Vec::new();
    while kv
        .keys()
        .any(|k| k.starts_with(&format!("children.{}.", children.len())))
    {
        let mut ckv = kv.take_child(&format!("children.{}", children.len()));
        let driver = ckv.take("driver");
        let name = ckv.take("filename").unwrap_or_default();
        let mut chain = Vec::new();
        children.push(Box::pin(open_node(&name, driver.as_deref(), ckv, flags, &mut chain)).await?);
    }
    let opts = QuorumOptions::take_from(&mut kv, children.len())?;
    kv.take("filename");
    reject_unknown("quorum", &kv, false)?;
    Ok(Arc::new(QuorumNode::new(children, opts)))
}

fn unknown_driver(name: &str) -> Error {
    match name {
        "qcow" | "qed" | "vdi" | "vmdk" | "vpc" | "vhdx" | "dmg" | "parallels" | "cloop" => {
            Error::unsupported(format!(
                "Driver '{name}' is not supported by this build of rqemu"
            ))
        }
        _ => Error::invalid(format!("Unknown driver '{name}'")),
    }
}

fn reject_unknown(driver: &str, kv: &KeyVal, protocol: bool) -> Result<()> {
    if let Some(k) = kv.keys().next() {
        let what = if protocol { "protocol" } else { "format" };
        return Err(Error::invalid(format!(
            "Block {what} '{driver}' doesn't support the option '{k}'"
        )));
    }
    Ok(())
}

/// Builds the format node `format` over `file_ref` (a protocol node, or another format
/// node when the options nest one under `file`).
#[allow(clippy::too_many_arguments)]
async fn format_over(
    file_ref: NodeRef,
    format: &str,
    probed: bool,
    fname: String,
    mut kv: KeyVal,
    flags: &GraphFlags,
    cache: CacheMode,
    chain: &mut Vec<std::path::PathBuf>,
) -> Result<NodeRef> {
    let writable = !flags.read_only;
    match format {
        "bochs" => {
            reject_unknown("bochs", &kv, false)?;
            Ok(Arc::new(
                crate::format::bochs::BochsNode::open(file_ref, flags.read_only).await?,
            ))
        }
        "raw" => {
            if probed && writable && !flags.quiet_probe {
                eprintln!(
                    "WARNING: Image format was not specified for '{fname}' and probing guessed raw.\n         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the restrictions."
                );
            }
            let offset = match kv.take("offset") {
                Some(v) => rqemu_opts::parse_size(&v, 1)
                    .map_err(|_| crate::create::size_param_error("offset"))?,
                None => 0,
            };
            let size = match kv.take("size") {
                Some(v) => Some(
                    rqemu_opts::parse_size(&v, 1)
                        .map_err(|_| crate::create::size_param_error("size"))?,
                ),
                None => None,
            };
            reject_unknown("raw", &kv, false)?;
            if let Some(bd) = file_ref
                .as_any()
                .downcast_ref::<crate::filter::blkdebug::BlkdebugNode>()
                .filter(|_| writable)
            {
                bd.check_write_without_resize()?;
            }
            Ok(Arc::new(RawNode::new(file_ref, offset, size, probed)?))
        }
        "qcow2" => {
            note_in_chain(chain, &fname)?;
            let mut qo = Qcow2Options::take_from(&mut kv)?;
            qo.read_only = flags.read_only;
            qo.no_flush = cache.no_flush;
            qo.check = flags.check;
            qo.no_io = flags.no_io;
            let data_file_opt = kv.take("data-file");
            let mut data_kv = kv.take_child("data-file");
            let backing_opt = kv.take("backing");
            let backing_kv = kv.take_child("backing");
            reject_unknown("qcow2", &kv, false)?;
            // External data file: named in the options or in the image header.
            let header_data_file = peek_data_file_name(&file_ref).await?;
            let data_name = data_file_opt
                .or_else(|| data_kv.take("filename"))
                .or_else(|| data_kv.take("file.filename"))
                // QEMU opens the name recorded in the header as it is (relative to the
                // working directory, unlike backing file names).
                .or(header_data_file);
            let data_name = if flags.no_io { None } else { data_name };
            // A data file given as a graph of its own (`data-file.driver=raw,...`).
            let data_driver = data_kv
                .get("driver")
                .filter(|d| *d != "file" && !flags.no_io)
                .map(str::to_string);
            if let Some(d) = data_driver {
                if !peek_has_data_file(&file_ref).await? {
                    return Err(Error::invalid(
                        "'data-file' can only be set for images with an external data file",
                    ));
                }
                data_kv.take("driver");
                let name = data_name.unwrap_or_default();
                let mut inner_chain = Vec::new();
                let node =
                    Box::pin(open_node(&name, Some(&d), data_kv, flags, &mut inner_chain)).await?;
                qo.data_file = Some(node);
            } else if let Some(dn) = data_name {
                if peek_has_data_file(&file_ref).await? || !data_kv.is_empty() {
                    let data = open_file(
                        &dn,
                        KeyVal::new(),
                        flags,
                        cache,
                        PermRequest::user(writable),
                        None,
                    )?;
                    qo.data_file = Some(data);
                } else {
                    return Err(Error::invalid(
                        "'data-file' can only be set for images with an external data file",
                    ));
                }
            }
            let q = Qcow2::open(file_ref, qo).await?;
            let skip_backing =
                flags.no_backing || matches!(backing_opt.as_deref(), Some("") | Some("null"));
            if !skip_backing {
                let (name, bfmt) = q.backing_spec().await;
                if let Some(name) = name {
                    let path = backing_kv
                        .get("file.filename")
                        .or(backing_kv.get("filename"))
                        .map(str::to_string)
                        .unwrap_or_else(|| resolve_relative(&fname, &name));
                    let depth = flags.writable_backing.and_then(|d| d.checked_sub(1));
                    let bflags = GraphFlags {
                        read_only: depth != Some(0),
                        writable_backing: depth.filter(|&d| d > 0),
                        quiet_probe: true,
                        check: false,
                        no_io: false,
                        ..flags.clone()
                    };
                    let bfmt = backing_kv.get("driver").map(str::to_string).or(bfmt);
                    let bkv = crate::format::qcow2::crypt::backing_encrypt_options(&backing_kv);
                    let backing = Box::pin(open_node(&path, bfmt.as_deref(), bkv, &bflags, chain))
                        .await
                        .map_err(|e| e.context("Could not open backing file"))?;
                    q.set_backing(Some(backing)).await;
                }
            }
            Ok(q)
        }
        "luks" => {
            let secret = kv.take("key-secret");
            reject_unknown("luks", &kv, false)?;
            Ok(Arc::new(
                crate::format::luks::LuksNode::open(
                    file_ref,
                    secret.as_deref(),
                    flags.no_io,
                    flags.read_only,
                )
                .await?,
            ))
        }
        "compress" => {
            reject_unknown("compress", &kv, false)?;
            Ok(Arc::new(crate::format::compress::CompressNode::new(
                file_ref,
            )?))
        }
        other => Err(unknown_driver(other)),
    }
}

fn note_in_chain(chain: &mut Vec<std::path::PathBuf>, fname: &str) -> Result<()> {
    let canon = std::fs::canonicalize(fname).unwrap_or_else(|_| Path::new(fname).to_path_buf());
    if chain.contains(&canon) {
        return Err(Error::invalid(format!(
            "Backing file '{fname}' creates an infinite loop."
        )));
    }
    chain.push(canon);
    Ok(())
}

fn file_options(
    fname: &str,
    kv: &mut KeyVal,
    flags: &GraphFlags,
    cache: CacheMode,
    driver: Option<&str>,
) -> Result<FileOptions> {
    let mut aio = flags.aio;
    if let Some(a) = kv.take("aio") {
        aio = AioMode::parse(&a)?;
    }
    let mut locking = !flags.force_share;
    if let Some(l) = kv.take("locking") {
        locking = match l.as_str() {
            "on" | "auto" => true,
            "off" => false,
            _ => {
                return Err(Error::invalid(format!(
                    "Parameter 'locking' does not accept value '{l}'"
                )))
            }
        };
    }
    let mut cache = cache;
    if let Some(d) = take_bool(kv, "cache.direct")? {
        cache.direct = d;
    }
    kv.take("cache.no-flush");
    kv.take("x-check-cache-dropped");
    kv.take("pr-manager");
    kv.take("drop-cache");
    Ok(FileOptions {
        filename: fname.to_string(),
        read_only: flags.read_only,
        cache,
        aio,
        locking,
        create: false,
        driver: driver.map(str::to_string),
    })
}

fn open_file(
    fname: &str,
    mut kv: KeyVal,
    flags: &GraphFlags,
    cache: CacheMode,
    req: PermRequest,
    driver: Option<&str>,
) -> Result<NodeRef> {
    let fo = file_options(fname, &mut kv, flags, cache, driver)?;
    reject_unknown("file", &kv, true)?;
    let file = Arc::new(FileNode::open(&fo)?);
    if !flags.force_share {
        file.set_perm(req)?;
    }
    Ok(file)
}

async fn read_header_cluster(
    file: &NodeRef,
) -> Result<Option<crate::format::qcow2::header::Header>> {
    let mut head = vec![0u8; 4096];
    let n = (file.size() as usize).min(head.len());
    file.read(0, &mut head[..n]).await?;
    let Ok(mut h) = crate::format::qcow2::header::Header::parse(&head) else {
        return Ok(None);
    };
    let cs = 1usize << h.cluster_bits;
    let mut cluster = vec![0u8; cs.max(4096)];
    file.read(0, &mut cluster[..cs.max(n.min(cs))]).await?;
    let end = h.extensions_end();
    if h.parse_extensions(&cluster, end).is_err() {
        return Ok(None);
    }
    Ok(Some(h))
}

async fn peek_data_file_name(file: &NodeRef) -> Result<Option<String>> {
    Ok(read_header_cluster(file).await?.and_then(|h| {
        if h.incompatible_features & crate::format::qcow2::types::incompat::DATA_FILE != 0 {
            h.data_file
        } else {
            None
        }
    }))
}

async fn peek_has_data_file(file: &NodeRef) -> Result<bool> {
    Ok(read_header_cluster(file).await?.is_some_and(|h| {
        h.incompatible_features & crate::format::qcow2::types::incompat::DATA_FILE != 0
    }))
}

/// Creates a temporary qcow2 overlay over `base` (for `-snapshot`) in `$TMPDIR` or
/// `/var/tmp`, and returns it with the path to delete afterwards.
async fn temporary_overlay(
    base: &NodeRef,
    flags: &GraphFlags,
) -> Result<(NodeRef, std::path::PathBuf)> {
    let dir = std::env::var("TMPDIR").unwrap_or_else(|_| "/var/tmp".into());
    let path = loop {
        let p = Path::new(&dir).join(format!("vl.{:06x}", rand_u32() & 0xff_ffff));
        if !p.exists() {
            break p;
        }
    };
    let pstr = path.to_string_lossy().into_owned();
    let mut co = crate::create::CreateOptions::new("qcow2")?;
    co.set("size", &base.size().to_string())?;
    crate::create::create(&pstr, &co).await.map_err(|e| {
        Error::other(
            format!("Could not create temporary overlay '{pstr}': {e}"),
            e.errno_value(),
        )
    })?;
    let oflags = GraphFlags {
        read_only: false,
        no_backing: true,
        ..flags.clone()
    };
    let mut chain = Vec::new();
    let overlay = open_node(&pstr, Some("qcow2"), KeyVal::new(), &oflags, &mut chain).await?;
    if let Some(q) = overlay.as_any().downcast_ref::<Qcow2>() {
        q.set_backing(Some(base.clone())).await;
    }
    Ok((overlay, path))
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    t ^ std::process::id().rotate_left(16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_backing_names() {
        assert_eq!(resolve_relative("o.qcow2", "b.qcow2"), "b.qcow2");
        assert_eq!(
            resolve_relative("/dev/shm/o.qcow2", "b.qcow2"),
            "/dev/shm/b.qcow2"
        );
        assert_eq!(resolve_relative("d/o.qcow2", "/abs/b"), "/abs/b");
        assert_eq!(resolve_relative("d/o.qcow2", "nbd://h/x"), "nbd://h/x");
    }
}
