//! `key=value,key2=value2` option lists as QEMU writes them.
//!
//! A literal comma inside a value is written `,,`. The first element may omit its key when
//! the caller names an implied key (`-drive disk.img` means `file=disk.img`). A bare `key`
//! means `key=on`. Keys may be dotted (`file.filename=x`) to address a child's options;
//! [`KeyVal::child`] extracts them. `json:{...}` filenames are flattened into the same form
//! by [`parse_json_filename`].

use serde_json::Value;
use thiserror::Error;

/// Why an option string was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyValError {
    /// An element without `=` where no implied key applies, such as an empty element.
    #[error("Invalid parameter '{0}'")]
    InvalidParameter(String),
    /// The `json:` filename is not a JSON object.
    #[error("Could not parse the JSON options")]
    BadJson,
    /// A key appears twice.
    #[error("Duplicate option '{0}'")]
    Duplicate(String),
}

/// An ordered list of option keys and values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyVal {
    entries: Vec<(String, String)>,
}

impl KeyVal {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses `s`; a first element without `=` gets `implied_key` if one is given.
    /// Later duplicates replace earlier values, as QemuOpts does.
    pub fn parse(s: &str, implied_key: Option<&str>) -> Result<Self, KeyValError> {
        let mut kv = KeyVal::new();
        if s.is_empty() {
            return Ok(kv);
        }
        for (index, element) in split_escaped(s).into_iter().enumerate() {
            match element.split_once('=') {
                Some((key, value)) => kv.set(key, value),
                None => match implied_key {
                    Some(key) if index == 0 => kv.set(key, &element),
                    _ if element.is_empty() => {
                        return Err(KeyValError::InvalidParameter(element));
                    }
                    _ => kv.set(&element, "on"),
                },
            }
        }
        Ok(kv)
    }

    /// Sets `key` to `value`, replacing an earlier value.
    pub fn set(&mut self, key: &str, value: &str) {
        if let Some(entry) = self.entries.iter_mut().find(|(k, _)| k == key) {
            entry.1 = value.to_string();
        } else {
            self.entries.push((key.to_string(), value.to_string()));
        }
    }

    /// Appends every entry of `other`, replacing values of keys already present.
    pub fn merge(&mut self, other: &KeyVal) {
        for (k, v) in &other.entries {
            self.set(k, v);
        }
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Removes `key` and returns its value.
    pub fn take(&mut self, key: &str) -> Option<String> {
        let pos = self.entries.iter().position(|(k, _)| k == key)?;
        Some(self.entries.remove(pos).1)
    }

    /// Removes and returns every `prefix.`-dotted entry, with the prefix stripped.
    pub fn take_child(&mut self, prefix: &str) -> KeyVal {
        let dotted = format!("{prefix}.");
        let mut child = KeyVal::new();
        self.entries.retain(|(k, v)| match k.strip_prefix(&dotted) {
            Some(rest) => {
                child.entries.push((rest.to_string(), v.clone()));
                false
            }
            None => true,
        });
        child
    }

    /// Every `prefix.`-dotted entry with the prefix stripped, leaving `self` unchanged.
    pub fn child(&self, prefix: &str) -> KeyVal {
        self.clone().take_child(prefix)
    }

    /// The entries in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The keys in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.as_str())
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Writes the list back in QEMU syntax, doubling commas inside values.
    pub fn to_opt_string(&self) -> String {
        self.entries
            .iter()
            .map(|(k, v)| format!("{k}={}", v.replace(',', ",,")))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Splits at single commas; `,,` stands for a literal comma.
pub fn split_escaped(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

/// Parses the part after `json:` of a filename into dotted options
/// (`{"file": {"filename": "x"}}` becomes `file.filename=x`).
pub fn parse_json_filename(json: &str) -> Result<KeyVal, KeyValError> {
    let json = single_to_double_quotes(json);
    let value: Value = serde_json::from_str(&json).map_err(|_| KeyValError::BadJson)?;
    let Value::Object(map) = value else {
        return Err(KeyValError::BadJson);
    };
    let mut kv = KeyVal::new();
    for (k, v) in map {
        flatten_json(&mut kv, &k, &v);
    }
    Ok(kv)
}

/// QEMU's JSON parser also takes strings in single quotes: rewrites them as standard
/// double-quoted strings (a `"` inside gets escaped, `\'` loses its backslash).
fn single_to_double_quotes(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut chars = json.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                out.push('"');
                while let Some(d) = chars.next() {
                    out.push(d);
                    match d {
                        '\\' => {
                            if let Some(e) = chars.next() {
                                out.push(e);
                            }
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '\'' => {
                out.push('"');
                while let Some(d) = chars.next() {
                    match d {
                        '\\' => match chars.next() {
                            Some('\'') => out.push('\''),
                            Some(e) => {
                                out.push('\\');
                                out.push(e);
                            }
                            None => out.push('\\'),
                        },
                        '"' => out.push_str("\\\""),
                        '\'' => break,
                        _ => out.push(d),
                    }
                }
                out.push('"');
            }
            _ => out.push(c),
        }
    }
    out
}

fn flatten_json(kv: &mut KeyVal, prefix: &str, value: &Value) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                flatten_json(kv, &format!("{prefix}.{k}"), v);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                flatten_json(kv, &format!("{prefix}.{i}"), v);
            }
        }
        Value::String(s) => kv.set(prefix, s),
        Value::Bool(b) => kv.set(prefix, if *b { "on" } else { "off" }),
        Value::Number(n) => kv.set(prefix, &n.to_string()),
        Value::Null => kv.set(prefix, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_quoted_json_strings() {
        let kv =
            parse_json_filename("{'driver': 'qcow2', 'file': {'filename': 'a\\'b\"c'}}").unwrap();
        assert_eq!(kv.get("driver"), Some("qcow2"));
        assert_eq!(kv.get("file.filename"), Some("a'b\"c"));
    }

    #[test]
    fn implied_key_and_escapes() {
        let kv = KeyVal::parse("a,,b.img,if=virtio,cache=none", Some("file")).unwrap();
        assert_eq!(kv.get("file"), Some("a,b.img"));
        assert_eq!(kv.get("if"), Some("virtio"));
        assert_eq!(kv.get("cache"), Some("none"));
    }

    #[test]
    fn bare_key_means_on() {
        let kv = KeyVal::parse("server,nowait", None).unwrap();
        assert_eq!(kv.get("server"), Some("on"));
    }

    #[test]
    fn dotted_children() {
        let mut kv = KeyVal::parse("driver=qcow2,file.driver=file,file.filename=x", None).unwrap();
        let file = kv.take_child("file");
        assert_eq!(file.get("filename"), Some("x"));
        assert_eq!(kv.len(), 1);
    }

    #[test]
    fn json_flattens() {
        let kv = parse_json_filename(r#"{"driver":"raw","file":{"driver":"file","filename":"a"}}"#)
            .unwrap();
        assert_eq!(kv.get("file.filename"), Some("a"));
        assert!(parse_json_filename("[1]").is_err());
    }
}
