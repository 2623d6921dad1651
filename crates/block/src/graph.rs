//! Walking the node graph: closing it in order, and listing the backing chain.

use std::collections::HashSet;

use crate::error::Result;
use crate::node::{ChildRole, NodeRef};

/// Closes `root` and then its children, each node once, parents before children
/// (a format node writes its metadata through its file node before that closes).
pub async fn close_tree(root: &NodeRef) -> Result<()> {
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    collect(root, &mut order, &mut seen);
    let mut first_err = None;
    for node in order {
        if let Err(e) = node.close().await {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

fn collect(node: &NodeRef, order: &mut Vec<NodeRef>, seen: &mut HashSet<usize>) {
    let key = std::sync::Arc::as_ptr(node) as *const () as usize;
    if !seen.insert(key) {
        return;
    }
    order.push(node.clone());
    for (_, child) in node.children() {
        collect(&child, order, seen);
    }
}

/// The backing chain from `top` down: `top`, its backing node, that node's backing, ...
pub fn backing_chain(top: &NodeRef) -> Vec<NodeRef> {
    let mut chain = vec![top.clone()];
    while let Some(next) = chain.last().and_then(|n| n.backing()) {
        chain.push(next);
    }
    chain
}

/// The `file` child of a node, if it has one.
pub fn file_child(node: &NodeRef) -> Option<NodeRef> {
    node.children()
        .into_iter()
        .find(|(r, _)| *r == ChildRole::File)
        .map(|(_, n)| n)
}
