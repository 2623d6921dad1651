//! `reopen`: the open image with changed options. Everything is checked before the
//! image is touched, so a refused reopen leaves the image open as it was, as QEMU's
//! transactional reopen does.

use rqemu_block::node::{ChildRole, NodeRef};
use rqemu_block::CacheMode;
use rqemu_opts::KeyVal;

use super::{parse_opts, usage, CmdInfo};
use crate::state::State;

/// Options a reopen may not change, per node.
const FIXED: [&str; 2] = ["node-name", "driver"];
/// The nodes a reopen can name options of: the image, its file and its backing node.
const NODES: [&str; 3] = ["", "file.", "backing."];
/// Boolean options checked before anything else.
const BOOLS: [&str; 4] = [
    "read-only",
    "cache.no-flush",
    "cache.direct",
    "auto-read-only",
];

/// The `reopen` command.
pub async fn reopen(st: &mut State, c: &CmdInfo, argv: &[String]) -> i32 {
    let p = match parse_opts(c, argv, "c:o:rw") {
        Ok(p) => p,
        Err(e) => return e,
    };
    let (Some(mut o), Some(blk)) = (st.opts.clone(), st.blk.clone()) else {
        return -libc::EINVAL;
    };
    let (mut ro, mut rw, mut cache) = (false, false, None);
    let mut new = KeyVal::new();
    for (k, v) in &p.opts {
        let v = v.clone().unwrap_or_default();
        match *k as u8 as char {
            'c' => match CacheMode::parse(&v) {
                Ok(cm) => cache = Some(cm),
                Err(_) => {
                    st.error(&format!("Invalid cache option: {v}"));
                    return -libc::EINVAL;
                }
            },
            'o' => match KeyVal::parse(&v, None) {
                Ok(x) => new.merge(&x),
                Err(e) => {
                    st.error(&e.to_string());
                    return -libc::EINVAL;
                }
            },
            'r' => ro = true,
            'w' => rw = true,
            _ => {}
        }
    }
    if ro && rw {
        st.error("Only one -r/-w option may be given");
        return -libc::EINVAL;
    }
    if !p.operands.is_empty() {
        usage(c);
        return -libc::EINVAL;
    }
    if (ro || rw) && new.contains("read-only") {
        st.error("Cannot set both -r/-w and 'read-only'");
        return -libc::EINVAL;
    }
    if cache.is_some() && (new.contains("cache.direct") || new.contains("cache.no-flush")) {
        st.error("Cannot set both -c and the cache options");
        return -libc::EINVAL;
    }
    for key in BOOLS {
        if new
            .get(key)
            .is_some_and(|v| rqemu_opts::bool_opt(v).is_none())
        {
            st.error(&format!("Parameter '{key}' expects 'on' or 'off'"));
            return -libc::EINVAL;
        }
    }
    if let Some(key) = changed_fixed_option(blk.root(), &o.options, &new) {
        st.error(&format!("Cannot change the option '{key}'"));
        return -libc::EINVAL;
    }
    // A driver's runtime options last for one reopen only, as in QEMU.
    let mut options = KeyVal::new();
    for (k, v) in o.options.iter() {
        if !blk.root().is_runtime_option(k) {
            options.set(k, v);
        }
    }
    options.merge(&new);
    if let Err(e) = blk.root().check_reopen(&options) {
        st.error(&e.to_string());
        return -libc::EINVAL;
    }
    o.options = options;
    if let Some(cm) = cache {
        o.cache = cm;
    }
    if ro {
        o.read_only = true;
    }
    if rw {
        o.read_only = false;
    }
    st.close().await;
    let label = o.filename.clone();
    if let Err(e) = st.open(o, &label).await {
        st.error(&e.to_string());
        return -libc::EINVAL;
    }
    0
}

/// The first of `node-name` and `driver` that `new` sets, for the image, its file or
/// its backing node, to something other than what the node has now.
fn changed_fixed_option(root: &NodeRef, old: &KeyVal, new: &KeyVal) -> Option<&'static str> {
    for prefix in NODES {
        for key in FIXED {
            let full = format!("{prefix}{key}");
            let Some(wanted) = new.get(&full) else {
                continue;
            };
            let current = match (old.get(&full), key) {
                (Some(v), _) => Some(v.to_string()),
                (None, "driver") => node_at(root, prefix).map(|n| n.driver_name().to_string()),
                // A node without an explicit name has a generated one.
                (None, _) => None,
            };
            if current.as_deref() != Some(wanted) {
                return Some(key);
            }
        }
    }
    None
}

fn node_at(root: &NodeRef, prefix: &str) -> Option<NodeRef> {
    let role = match prefix {
        "" => return Some(root.clone()),
        "file." => ChildRole::File,
        _ => ChildRole::Backing,
    };
    root.children()
        .into_iter()
        .find(|(r, _)| *r == role)
        .map(|(_, n)| n)
}
