//! What `qemu-img info` shows for qcow2 (the "Format specific information" section),
//! built in QEMU's field order.

use serde_json::{json, Map, Value};

use crate::error::Result;
use crate::info::FormatInfo;

use super::bitmaps;
use super::types::*;
use super::Qcow2;

/// The qcow2 section of `info`.
pub async fn format_info(q: &Qcow2) -> Result<FormatInfo> {
    let m = q.meta.lock().await;
    let mut d = Map::new();
    let v3 = m.h.version >= 3;
    d.insert("compat".into(), json!(if v3 { "1.1" } else { "0.10" }));
    d.insert("compression-type".into(), json!(q.compression.name()));
    if v3 {
        d.insert(
            "lazy-refcounts".into(),
            json!(m.h.compatible_features & compat::LAZY_REFCOUNTS != 0),
        );
    }
    if let Some(bm) = &m.h.bitmaps {
        if m.h.autoclear_features & autoclear::BITMAPS != 0 && bm.nb_bitmaps > 0 {
            let mut dir = vec![0u8; bm.directory_size.min(bitmaps::MAX_DIRECTORY_SIZE) as usize];
            if m.file.read(bm.directory_offset, &mut dir).await.is_ok() {
                if let Ok(list) = bitmaps::parse_directory(&dir, bm.nb_bitmaps) {
                    let items: Vec<Value> = list
                        .iter()
                        .map(|b| {
                            let mut flags = Vec::new();
                            if b.flags & bitmaps::FLAG_IN_USE != 0 {
                                flags.push(json!("in-use"));
                            }
                            if b.flags & bitmaps::FLAG_AUTO != 0 {
                                flags.push(json!("auto"));
                            }
                            let mut o = Map::new();
                            o.insert("flags".into(), Value::Array(flags));
                            o.insert("name".into(), json!(b.name));
                            o.insert(
                                "granularity".into(),
                                json!(1u64 << b.granularity_bits.min(63)),
                            );
                            Value::Object(o)
                        })
                        .collect();
                    d.insert("bitmaps".into(), Value::Array(items));
                }
            }
        }
    }
    d.insert("refcount-bits".into(), json!(m.geo.refcount_bits()));
    if let Some(e) = q.encrypt_info().await {
        d.insert("encrypt".into(), Value::Object(e));
    }
    if m.has_data_file() {
        if let Some(name) = &m.h.data_file {
            d.insert("data-file".into(), json!(name));
        }
        d.insert("data-file-raw".into(), json!(q.data_file_raw));
    }
    if v3 {
        d.insert(
            "corrupt".into(),
            json!(m.h.incompatible_features & incompat::CORRUPT != 0),
        );
        d.insert("extended-l2".into(), json!(m.geo.extended_l2));
    }
    Ok(FormatInfo {
        type_name: Some("qcow2"),
        data: d,
    })
}

impl Qcow2 {
    /// The virtual disk's cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }

    /// Whether the image's dirty bit is set.
    pub async fn is_dirty(&self) -> bool {
        let m = self.meta.lock().await;
        m.h.incompatible_features & incompat::DIRTY != 0
    }
}
