//! The `quorum` filter: one node over several children holding the same data. Writes go
//! to every child; reads ask every child and return the version at least
//! `vote-threshold` of them agree on (`read-pattern=quorum`), or the first child that
//! answers (`read-pattern=fifo`).

use std::any::Any;

use async_trait::async_trait;
use futures::future::join_all;
use rqemu_opts::KeyVal;

use crate::error::{Error, Result};
use crate::node::{BlockDriver, BlockStatus, ChildRole, NodeRef, Prealloc, WriteFlags};

/// How reads are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadPattern {
    /// Every child is read and the versions vote.
    Quorum,
    /// Children are read in turn until one succeeds.
    Fifo,
}

/// The options of a quorum node (its children are opened by the caller).
#[derive(Debug)]
pub struct QuorumOptions {
    /// Agreeing children a read or write needs.
    pub threshold: usize,
    /// How reads are served.
    pub read_pattern: ReadPattern,
}

impl QuorumOptions {
    /// Takes `vote-threshold`, `read-pattern`, `blkverify` and `rewrite-corrupted` out
    /// of `kv`; `children` counts the children named.
    pub fn take_from(kv: &mut KeyVal, children: usize) -> Result<QuorumOptions> {
        let threshold = kv
            .take("vote-threshold")
            .ok_or_else(|| Error::invalid("Parameter 'vote-threshold' is missing"))?;
        let threshold: usize = threshold
            .parse()
            .map_err(|_| Error::invalid("Parameter 'vote-threshold' expects a number"))?;
        let read_pattern = match kv.take("read-pattern").as_deref() {
            None | Some("quorum") => ReadPattern::Quorum,
            Some("fifo") => ReadPattern::Fifo,
            Some(other) => {
                return Err(Error::invalid(format!(
                    "Parameter 'read-pattern' does not accept value '{other}'"
                )))
            }
        };
        for k in ["blkverify", "rewrite-corrupted"] {
            if let Some(v) = kv.take(k) {
                rqemu_opts::bool_opt(&v).ok_or_else(|| {
                    Error::invalid(format!("Parameter '{k}' expects 'on' or 'off'"))
                })?;
            }
        }
        if children == 0 {
            return Err(Error::invalid(
                "Number of provided children must be 1 or more",
            ));
        }
        if threshold < 1 {
            return Err(Error::invalid(
                "Parameter 'vote-threshold' expects a value >= 1",
            ));
        }
        if threshold > children {
            return Err(Error::invalid("threshold may not exceed children count"));
        }
        Ok(QuorumOptions {
            threshold,
            read_pattern,
        })
    }
}

/// A quorum node.
pub struct QuorumNode {
    children: Vec<NodeRef>,
    opts: QuorumOptions,
}

impl QuorumNode {
    /// A quorum over `children` (at least one, checked by [`QuorumOptions::take_from`]).
    pub fn new(children: Vec<NodeRef>, opts: QuorumOptions) -> QuorumNode {
        QuorumNode { children, opts }
    }

    /// Whether enough of `results` succeeded; the first error otherwise.
    fn vote_ok(&self, results: Vec<Result<()>>) -> Result<()> {
        let ok = results.iter().filter(|r| r.is_ok()).count();
        if ok >= self.opts.threshold {
            return Ok(());
        }
        Err(results
            .into_iter()
            .find_map(|r| r.err())
            .unwrap_or_else(|| Error::errno(libc::EIO)))
    }
}

#[async_trait]
impl BlockDriver for QuorumNode {
    fn driver_name(&self) -> &'static str {
        "quorum"
    }

    fn filename(&self) -> String {
        let children: Vec<String> = self
            .children
            .iter()
            .map(|c| {
                format!(
                    "{{\"driver\": \"{}\", \"filename\": \"{}\"}}",
                    c.driver_name(),
                    c.filename()
                )
            })
            .collect();
        format!(
            "json:{{\"driver\": \"quorum\", \"vote-threshold\": {}, \"children\": [{}]}}",
            self.opts.threshold,
            children.join(", ")
        )
    }

    fn size(&self) -> u64 {
        self.children[0].size()
    }

    fn read_only(&self) -> bool {
        self.children.iter().any(|c| c.read_only())
    }

    fn children(&self) -> Vec<(ChildRole, NodeRef)> {
        self.children
            .iter()
            .map(|c| (ChildRole::Children, c.clone()))
            .collect()
    }

    fn dirname(&self) -> Option<String> {
        // Children in different places have no one directory (QEMU does not guess).
        None
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if self.opts.read_pattern == ReadPattern::Fifo {
            let mut last = Error::errno(libc::EIO);
            for c in &self.children {
                match c.read(offset, buf).await {
                    Ok(()) => return Ok(()),
                    Err(e) => last = e,
                }
            }
            return Err(last);
        }
        let len = buf.len();
        let reads = self.children.iter().map(|c| async move {
            let mut v = vec![0u8; len];
            c.read(offset, &mut v).await.map(|()| v)
        });
        let results = join_all(reads).await;
        // The version with the most votes wins if it has enough of them.
        let versions: Vec<&Vec<u8>> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        let best = versions
            .iter()
            .map(|v| (versions.iter().filter(|w| *w == v).count(), *v))
            .max_by_key(|(n, _)| *n);
        match best {
            Some((n, v)) if n >= self.opts.threshold => {
                buf.copy_from_slice(v);
                Ok(())
            }
            _ => Err(results
                .into_iter()
                .find_map(|r| r.err())
                .unwrap_or_else(|| Error::errno(libc::EIO))),
        }
    }

    async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        let r = join_all(self.children.iter().map(|c| c.write(offset, buf, flags))).await;
        self.vote_ok(r)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        let r = join_all(
            self.children
                .iter()
                .map(|c| c.write_zeroes(offset, len, flags)),
        )
        .await;
        self.vote_ok(r)
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let r = join_all(self.children.iter().map(|c| c.discard(offset, len))).await;
        self.vote_ok(r)
    }

    async fn flush(&self) -> Result<()> {
        let r = join_all(self.children.iter().map(|c| c.flush())).await;
        self.vote_ok(r)
    }

    async fn block_status(&self, _offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus::all_data(len))
    }

    async fn truncate(&self, _size: u64, _exact: bool, _prealloc: Prealloc) -> Result<()> {
        Err(Error::unsupported(
            "Image format driver does not support resize",
        ))
    }

    async fn close(&self) -> Result<()> {
        for c in &self.children {
            c.close().await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::protocol::mem::MemNode;
    use crate::test_util::block_on;

    fn node(children: &[&[u8]], threshold: usize) -> QuorumNode {
        let children = children
            .iter()
            .map(|d| Arc::new(MemNode::new(d.to_vec(), false)) as NodeRef)
            .collect();
        QuorumNode::new(
            children,
            QuorumOptions {
                threshold,
                read_pattern: ReadPattern::Quorum,
            },
        )
    }

    #[test]
    fn reads_return_the_majority_version() {
        let q = node(&[&[1; 512], &[2; 512], &[1; 512]], 2);
        let mut buf = [0u8; 512];
        block_on(q.read(0, &mut buf)).unwrap();
        assert_eq!(buf, [1; 512]);
        let q = node(&[&[1; 512], &[2; 512], &[3; 512]], 2);
        assert!(block_on(q.read(0, &mut buf)).is_err());
    }

    #[test]
    fn options_are_checked() {
        let mut kv = KeyVal::parse("vote-threshold=3", None).unwrap();
        assert_eq!(
            QuorumOptions::take_from(&mut kv, 2)
                .unwrap_err()
                .to_string(),
            "threshold may not exceed children count"
        );
        let mut kv = KeyVal::parse("vote-threshold=1,read-pattern=fifo", None).unwrap();
        let o = QuorumOptions::take_from(&mut kv, 2).unwrap();
        assert_eq!(o.read_pattern, ReadPattern::Fifo);
    }
}
