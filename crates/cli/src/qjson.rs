//! QEMU's JSON output and its human-readable dump of QAPI objects.
//!
//! QEMU builds its output as QDicts, hash tables whose iteration order is bucket order
//! (and, within a bucket, newest first). Both `--output=json` and the human dump of
//! format-specific information follow that order, so [`QDict`] keeps insertion order and
//! reproduces QEMU's iteration order when printed.

use serde_json::Value;

/// A JSON value as QEMU's QObject model has them.
#[derive(Debug, Clone, PartialEq)]
pub enum QValue {
    /// `null`.
    Null,
    /// A boolean.
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// An unsigned integer.
    UInt(u64),
    /// A floating-point number.
    Float(f64),
    /// A string.
    Str(String),
    /// A list.
    List(Vec<QValue>),
    /// A dictionary.
    Dict(QDict),
}

/// A dictionary that prints in QEMU's QDict order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QDict {
    entries: Vec<(String, QValue)>,
}

const BUCKETS: u32 = 512;

fn tdb_hash(name: &str) -> u32 {
    let mut value = 0x238F_13AFu32.wrapping_mul(name.len() as u32);
    for (i, b) in name.bytes().enumerate() {
        value = value.wrapping_add((b as u32) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345)
}

impl QDict {
    /// An empty dictionary.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) an entry; the order of insertion is the QAPI field order.
    pub fn insert(&mut self, key: &str, value: impl Into<QValue>) -> &mut Self {
        let value = value.into();
        if let Some(e) = self.entries.iter_mut().find(|(k, _)| k == key) {
            e.1 = value;
        } else {
            self.entries.push((key.to_string(), value));
        }
        self
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the dictionary is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries in QEMU's iteration order.
    pub fn iter_qemu_order(&self) -> Vec<&(String, QValue)> {
        let mut v: Vec<(u32, usize, &(String, QValue))> = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (tdb_hash(&e.0) % BUCKETS, i, e))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        v.into_iter().map(|(_, _, e)| e).collect()
    }
}

impl From<bool> for QValue {
    fn from(b: bool) -> Self {
        QValue::Bool(b)
    }
}
impl From<i64> for QValue {
    fn from(v: i64) -> Self {
        QValue::Int(v)
    }
}
impl From<u64> for QValue {
    fn from(v: u64) -> Self {
        QValue::Int(v as i64)
    }
}
impl From<&str> for QValue {
    fn from(v: &str) -> Self {
        QValue::Str(v.to_string())
    }
}
impl From<String> for QValue {
    fn from(v: String) -> Self {
        QValue::Str(v)
    }
}
impl From<QDict> for QValue {
    fn from(v: QDict) -> Self {
        QValue::Dict(v)
    }
}
impl From<Vec<QValue>> for QValue {
    fn from(v: Vec<QValue>) -> Self {
        QValue::List(v)
    }
}

impl From<&Value> for QValue {
    fn from(v: &Value) -> Self {
        match v {
            Value::Null => QValue::Null,
            Value::Bool(b) => QValue::Bool(*b),
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    QValue::Int(i)
                } else if let Some(u) = n.as_u64() {
                    QValue::UInt(u)
                } else {
                    QValue::Float(n.as_f64().unwrap_or(0.0))
                }
            }
            Value::String(s) => QValue::Str(s.clone()),
            Value::Array(a) => QValue::List(a.iter().map(QValue::from).collect()),
            Value::Object(m) => {
                let mut d = QDict::new();
                for (k, v) in m {
                    d.insert(k, QValue::from(v));
                }
                QValue::Dict(d)
            }
        }
    }
}

fn quoted(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04X}"));
                }
            }
        }
    }
    out.push('"');
}

fn newline(out: &mut String, indent: usize) {
    out.push('\n');
    for _ in 0..indent {
        out.push_str("    ");
    }
}

fn num_to_string(v: &QValue) -> String {
    match v {
        QValue::Int(i) => i.to_string(),
        QValue::UInt(u) => u.to_string(),
        QValue::Float(f) => format!("{f}"),
        _ => String::new(),
    }
}

fn to_json(v: &QValue, pretty: bool, indent: usize, out: &mut String) {
    match v {
        QValue::Null => out.push_str("null"),
        QValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        QValue::Int(_) | QValue::UInt(_) | QValue::Float(_) => out.push_str(&num_to_string(v)),
        QValue::Str(s) => quoted(s, out),
        QValue::Dict(d) => {
            out.push('{');
            for (i, (k, val)) in d.iter_qemu_order().into_iter().enumerate() {
                if i > 0 {
                    out.push_str(if pretty { "," } else { ", " });
                }
                if pretty {
                    newline(out, indent + 1);
                }
                quoted(k, out);
                out.push_str(": ");
                to_json(val, pretty, indent + 1, out);
            }
            if pretty {
                newline(out, indent);
            }
            out.push('}');
        }
        QValue::List(l) => {
            out.push('[');
            for (i, val) in l.iter().enumerate() {
                if i > 0 {
                    out.push_str(if pretty { "," } else { ", " });
                }
                if pretty {
                    newline(out, indent + 1);
                }
                to_json(val, pretty, indent + 1, out);
            }
            if pretty {
                newline(out, indent);
            }
            out.push(']');
        }
    }
}

/// `qobject_to_json_pretty`.
pub fn to_json_pretty(v: &QValue) -> String {
    let mut s = String::new();
    to_json(v, true, 0, &mut s);
    s
}

/// `qobject_to_json` (one line).
pub fn to_json_compact(v: &QValue) -> String {
    let mut s = String::new();
    to_json(v, false, 0, &mut s);
    s
}

/// QEMU's human dump of a QAPI object (`dump_qobject`): keys with `-` shown as spaces,
/// four spaces per level.
pub fn dump_human(indent: usize, v: &QValue, out: &mut String) {
    let pad = |n: usize| " ".repeat(n * 4);
    match v {
        QValue::Dict(d) => {
            for (k, val) in d.iter_qemu_order() {
                let composite = matches!(val, QValue::Dict(_) | QValue::List(_));
                out.push_str(&format!("{}{}:", pad(indent), k.replace('-', " ")));
                out.push_str(if composite { "\n" } else { " " });
                dump_human(indent + 1, val, out);
            }
        }
        QValue::List(l) => {
            for (i, val) in l.iter().enumerate() {
                let composite = matches!(val, QValue::Dict(_) | QValue::List(_));
                out.push_str(&format!(
                    "{}[{i}]:{}",
                    pad(indent),
                    if composite { '\n' } else { ' ' }
                ));
                dump_human(indent + 1, val, out);
            }
        }
        QValue::Str(s) => {
            out.push_str(s);
            out.push('\n');
        }
        QValue::Bool(b) => out.push_str(if *b { "true\n" } else { "false\n" }),
        QValue::Null => out.push_str("null\n"),
        _ => {
            out.push_str(&num_to_string(v));
            out.push('\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qdict_order_matches_qemu() {
        let mut d = QDict::new();
        for k in [
            "filename",
            "format",
            "dirty-flag",
            "actual-size",
            "virtual-size",
            "cluster-size",
            "format-specific",
            "children",
        ] {
            d.insert(k, 0i64);
        }
        let keys: Vec<&str> = d.iter_qemu_order().iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            keys,
            [
                "children",
                "virtual-size",
                "filename",
                "cluster-size",
                "format",
                "actual-size",
                "format-specific",
                "dirty-flag"
            ]
        );
    }

    #[test]
    fn pretty_empty_containers() {
        let mut d = QDict::new();
        d.insert("children", QValue::List(vec![]));
        d.insert("data", QDict::new());
        assert_eq!(
            to_json_pretty(&QValue::Dict(d)),
            "{\n    \"children\": [\n    ],\n    \"data\": {\n    }\n}"
        );
    }
}
