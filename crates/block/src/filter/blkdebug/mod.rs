//! The `blkdebug` filter: a node over one child (`image`) for testing error paths.
//!
//! - **Rules** (`config.rs`, `rules.rs`): `inject-error` rules armed by debug events make
//!   later requests fail with an errno; `set-state` rules drive a small state machine that
//!   gates the others; breakpoints (qemu-io's `break`) suspend the request that fires an
//!   event until `resume`. Events come from the drivers above (`read_aio`, `l2_update`,
//!   … through [`BlockDriver::debug_event`]) and from this node's own request path
//!   (`pwritev`, `pwritev_rmw_head`, …), and `none` fires once when the node opens.
//! - **Limits** (`limits.rs`): `align` makes the node pad unaligned requests with
//!   read-modify-write (serialised against overlapping requests, `tracked.rs`);
//!   `max-transfer`, `opt-`/`max-write-zero` and `opt-`/`max-discard` split requests the
//!   way QEMU's block layer splits them for a node with those limits.
//! - **Names**: `blkdebug:[CONFIG]:IMAGE` filenames, or `driver=blkdebug` with `config`,
//!   `image.*` or `x-image`, `inject-error.N.*`, `set-state.N.*`.

pub mod config;
pub mod event;
mod io;
pub mod limits;
pub mod rules;
mod tracked;

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use async_trait::async_trait;
use rqemu_opts::KeyVal;

use crate::error::{Error, Result};
use crate::node::{BlockDriver, BlockStatus, ChildRole, NodeRef, Prealloc, WriteFlags};
pub use event::Event;
use limits::Limits;
use rules::{BreakError, Rules};

static PRINTER: OnceLock<fn(&str)> = OnceLock::new();

/// Sets where blkdebug's messages to standard output go (qemu-io routes them through
/// its own buffered stdout so they stay in order with its other output).
pub fn set_printer(f: fn(&str)) {
    let _ = PRINTER.set(f);
}

pub(crate) fn print(msg: &str) {
    match PRINTER.get() {
        Some(f) => f(msg),
        None => print!("{msg}"),
    }
}

/// The options of a blkdebug node, taken from its option list.
pub struct BlkdebugOptions {
    /// The config file, if one is named.
    pub config: Option<String>,
    /// The image's filename, from a `blkdebug:` filename or `x-image`.
    pub image_name: Option<String>,
    /// Request limits.
    pub limits: Limits,
    /// The rules, config file first.
    pub rules: Vec<config::RuleSpec>,
    /// Only `config` and the image were given (the node's name can be written back as a
    /// `blkdebug:` filename).
    pub plain: bool,
}

impl BlkdebugOptions {
    /// Takes blkdebug's own options out of `kv` (the `image.*` child options stay) and
    /// reads the config file. `filename` may be a `blkdebug:` filename.
    pub fn take_from(filename: &str, kv: &mut KeyVal) -> Result<BlkdebugOptions> {
        let (mut config, mut image_name) = (None, None);
        if filename.starts_with("blkdebug:") {
            let (c, i) = config::parse_filename(filename)?;
            config = c;
            image_name = Some(i);
        } else if !filename.is_empty() {
            image_name = Some(filename.to_string());
        }
        if let Some(c) = kv.take("config") {
            config = Some(c);
        }
        if let Some(i) = kv.take("x-image") {
            image_name = Some(i);
        }
        let limits = Limits::take_from(kv)?;
        for key in ["take-child-perms", "unshare-child-perms"] {
            kv.take_child(key);
            kv.take(key);
        }
        let mut rules = Vec::new();
        if let Some(path) = &config {
            let text = std::fs::read(path)
                .map_err(|e| Error::io("Could not read blkdebug config file", &e))?;
            rules.extend(config::parse_config(&String::from_utf8_lossy(&text))?);
        }
        let option_rules = config::take_option_rules(kv)?;
        let plain = option_rules.is_empty() && limits == Limits::NONE;
        rules.extend(option_rules);
        Ok(BlkdebugOptions {
            config,
            image_name,
            limits,
            rules,
            plain,
        })
    }
}

/// A blkdebug node.
pub struct BlkdebugNode {
    child: NodeRef,
    rules: Rules,
    limits: Limits,
    tracker: tracked::Tracker,
    config: Option<String>,
    plain: bool,
    /// Write-type requests finished (successful or not), and the count the last
    /// successful flush covered: a flush with nothing new to flush does nothing, as
    /// in QEMU's block layer.
    write_gen: AtomicU64,
    flushed_gen: AtomicU64,
}

impl BlkdebugNode {
    /// Puts a blkdebug node with `opts` over `child`, and fires the `none` event.
    pub async fn open(child: NodeRef, opts: BlkdebugOptions) -> Result<BlkdebugNode> {
        let node = BlkdebugNode {
            child,
            rules: Rules::new(&opts.rules),
            limits: opts.limits,
            tracker: tracked::Tracker::default(),
            config: opts.config,
            plain: opts.plain,
            write_gen: AtomicU64::new(0),
            flushed_gen: AtomicU64::new(0),
        };
        node.fire(Event::None).await;
        Ok(node)
    }

    /// Processes an event: arms rules, switches state, suspends at breakpoints.
    async fn fire(&self, ev: Event) {
        let hits = self.rules.event(ev);
        for (tag, _) in &hits {
            print(&format!("blkdebug: Suspended request '{tag}'\n"));
        }
        for (_, rx) in hits {
            let _ = rx.await;
        }
    }

    /// Fails the request if an armed rule matches it.
    async fn check(&self, offset: u64, bytes: u64, ty: config::IoType) -> Result<()> {
        match self.rules.check(offset, bytes, ty) {
            None => Ok(()),
            Some(i) => {
                if !i.immediately {
                    tokio::task::yield_now().await;
                }
                Err(Error::errno(i.errno))
            }
        }
    }

    /// Refuses a parent that writes without resizing (a raw format node) when the size
    /// is not a multiple of the alignment, as QEMU's permission check does.
    pub fn check_write_without_resize(&self) -> Result<()> {
        if !self.child.size().is_multiple_of(self.limits.align) {
            return Err(Error::invalid(
                "Cannot get 'write' permission without 'resize': Image size is not a multiple of request alignment",
            ));
        }
        Ok(())
    }

    /// qemu-io's `break EVENT TAG`.
    pub fn add_breakpoint(&self, event: &str, tag: &str) -> std::result::Result<(), BreakError> {
        self.rules.add_breakpoint(event, tag)
    }

    /// qemu-io's `remove_break TAG`.
    pub fn remove_breakpoint(&self, tag: &str) -> std::result::Result<(), BreakError> {
        self.rules.remove_breakpoint(tag)
    }

    /// qemu-io's `resume TAG`.
    pub fn resume(&self, tag: &str) -> std::result::Result<(), BreakError> {
        self.rules.resume(tag)
    }

    /// Whether a request is suspended as `tag` (qemu-io's `wait_break` polls this).
    pub fn is_suspended(&self, tag: &str) -> bool {
        self.rules.is_suspended(tag)
    }
}

/// The first blkdebug node at or below `node` along primary children, as QEMU looks for
/// the node that takes breakpoints.
pub fn find(node: &NodeRef) -> Option<NodeRef> {
    let mut cur = node.clone();
    loop {
        if cur.as_any().is::<BlkdebugNode>() {
            return Some(cur);
        }
        let next = cur
            .children()
            .into_iter()
            .find(|(r, _)| r.is_primary())
            .map(|(_, n)| n)?;
        cur = next;
    }
}

#[async_trait]
impl BlockDriver for BlkdebugNode {
    fn driver_name(&self) -> &'static str {
        "blkdebug"
    }

    fn filename(&self) -> String {
        let inner = self.child.filename();
        if self.plain {
            format!("blkdebug:{}:{inner}", self.config.as_deref().unwrap_or(""))
        } else {
            format!(
                "json:{{\"driver\": \"blkdebug\", \"image\": {{\"driver\": \"{}\", \"filename\": \"{inner}\"}}}}",
                self.child.driver_name()
            )
        }
    }

    fn size(&self) -> u64 {
        self.child.size()
    }

    fn read_only(&self) -> bool {
        self.child.read_only()
    }

    fn alignment(&self) -> crate::node::Alignment {
        let c = self.child.alignment();
        crate::node::Alignment {
            request: c.request.max(self.limits.align as u32),
            memory: c.memory,
        }
    }

    fn children(&self) -> Vec<(ChildRole, NodeRef)> {
        vec![(ChildRole::Image, self.child.clone())]
    }

    fn supports_backing(&self) -> bool {
        self.child.supports_backing()
    }

    fn backing(&self) -> Option<NodeRef> {
        // A filter is transparent to backing chains: what lies below its child's
        // allocation is its child's backing node.
        self.child.backing()
    }

    fn cluster_size(&self) -> Option<u64> {
        self.child.cluster_size()
    }

    fn has_zero_init(&self) -> bool {
        self.child.has_zero_init()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    async fn debug_event(&self, ev: Event) {
        self.fire(ev).await;
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_padded(offset, buf).await
    }

    async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        let r = self.write_padded(offset, buf, flags).await;
        self.write_gen.fetch_add(1, Ordering::AcqRel);
        r
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        let r = self.write_zeroes_padded(offset, len, flags).await;
        self.write_gen.fetch_add(1, Ordering::AcqRel);
        r
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let r = self.discard_split(offset, len).await;
        self.write_gen.fetch_add(1, Ordering::AcqRel);
        r
    }

    async fn flush(&self) -> Result<()> {
        let gen = self.write_gen.load(Ordering::Acquire);
        if self.flushed_gen.load(Ordering::Acquire) == gen {
            return Ok(());
        }
        self.check(0, 0, config::IoType::Flush).await?;
        self.child.flush().await?;
        self.flushed_gen.fetch_max(gen, Ordering::AcqRel);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.block_status_aligned(offset, len).await
    }

    async fn truncate(&self, size: u64, exact: bool, prealloc: Prealloc) -> Result<()> {
        let r = self.child.truncate(size, exact, prealloc).await;
        self.write_gen.fetch_add(1, Ordering::AcqRel);
        r
    }

    async fn close(&self) -> Result<()> {
        self.rules.resume_all();
        self.child.close().await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::protocol::mem::MemNode;

    async fn node(opts: &str, data: Vec<u8>) -> (Arc<MemNode>, BlkdebugNode) {
        let mem = Arc::new(MemNode::new(data, false));
        let mut kv = KeyVal::parse(opts, None).unwrap();
        let o = BlkdebugOptions::take_from("", &mut kv).unwrap();
        assert!(kv.is_empty());
        (mem.clone(), BlkdebugNode::open(mem, o).await.unwrap())
    }

    #[tokio::test]
    async fn unaligned_requests_are_padded() {
        let (mem, n) = node("align=4096,max-transfer=8192", vec![1u8; 65536]).await;
        n.write(1000, &[2u8; 10000], WriteFlags::NONE)
            .await
            .unwrap();
        let c = mem.contents();
        assert!(c[..1000].iter().all(|&b| b == 1));
        assert!(c[1000..11000].iter().all(|&b| b == 2));
        assert!(c[11000..].iter().all(|&b| b == 1));
        let mut buf = vec![0u8; 3];
        n.read(999, &mut buf).await.unwrap();
        assert_eq!(buf, [1, 2, 2]);
        n.write_zeroes(5000, 20000, WriteFlags::NONE).await.unwrap();
        let c = mem.contents();
        assert!(c[5000..25000].iter().all(|&b| b == 0));
        assert!(c[4999] == 2 && c[25000] == 1);
    }

    #[tokio::test]
    async fn injected_errors_follow_their_rules() {
        let (_, n) = node(
            "inject-error.0.event=write_aio,inject-error.0.errno=28,inject-error.0.once=on,\
             inject-error.1.event=none,inject-error.1.iotype=read,inject-error.1.sector=2",
            vec![0u8; 8192],
        )
        .await;
        let mut buf = [0u8; 512];
        // Armed at open: reads covering sector 2 fail.
        assert_eq!(
            n.read(1024, &mut buf).await.unwrap_err().errno_value(),
            libc::EIO
        );
        n.read(0, &mut buf).await.unwrap();
        n.write(0, &buf, WriteFlags::NONE).await.unwrap();
        n.debug_event(Event::WriteAio).await;
        // The new event replaces the armed rules; `once` fails one request.
        assert_eq!(
            n.read(1024, &mut buf).await.unwrap_err().errno_value(),
            libc::ENOSPC
        );
        n.read(1024, &mut buf).await.unwrap();
        assert!(n.filename().starts_with("json:{\"driver\": \"blkdebug\""));
    }
}
