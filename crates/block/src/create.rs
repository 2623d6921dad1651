//! Image creation: each format's creation options (with their help text and the order
//! QEMU prints them in), parsing `-o key=value` lists against them, and running the
//! format's creation.

use rqemu_opts::{parse_size, KeyVal};

use crate::error::{Error, Result};
use crate::format::{qcow2, raw};

/// The type of a creation option's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptKind {
    /// Free text.
    Str,
    /// `on`/`off`.
    Bool,
    /// A size with optional suffix.
    Size,
    /// A plain number.
    Number,
}

impl OptKind {
    fn help_name(self) -> &'static str {
        match self {
            OptKind::Str => "str",
            OptKind::Bool => "bool (on/off)",
            OptKind::Size => "size",
            OptKind::Number => "num",
        }
    }
}

/// One creation option.
#[derive(Debug, Clone, Copy)]
pub struct OptDesc {
    /// Name as written in `-o`.
    pub name: &'static str,
    /// Value type.
    pub kind: OptKind,
    /// Help text.
    pub help: &'static str,
    /// Default shown in the `Formatting` line.
    pub default: Option<&'static str>,
}

const fn opt(name: &'static str, kind: OptKind, help: &'static str) -> OptDesc {
    OptDesc {
        name,
        kind,
        help,
        default: None,
    }
}

const fn opt_def(
    name: &'static str,
    kind: OptKind,
    help: &'static str,
    default: &'static str,
) -> OptDesc {
    OptDesc {
        name,
        kind,
        help,
        default: Some(default),
    }
}

/// Options of the `file` protocol, in print order.
pub const FILE_OPTS: &[OptDesc] = &[
    opt("size", OptKind::Size, "Virtual disk size"),
    opt(
        "preallocation",
        OptKind::Str,
        "Preallocation mode (allowed values: off, falloc, full)",
    ),
    opt(
        "nocow",
        OptKind::Bool,
        "Turn off copy-on-write (valid only on btrfs)",
    ),
    opt(
        "extent_size_hint",
        OptKind::Size,
        "Extent size hint for the image file, 0 to disable",
    ),
];

/// Options of luks, in the order QEMU prints them in the `Formatting` line.
pub const LUKS_OPT_LIST: [OptDesc; 9] = [
    opt("size", OptKind::Size, "Virtual disk size"),
    opt(
        "key-secret",
        OptKind::Str,
        "ID of the secret that provides the keyslot passphrase",
    ),
    opt(
        "cipher-alg",
        OptKind::Str,
        "Name of encryption cipher algorithm",
    ),
    opt(
        "cipher-mode",
        OptKind::Str,
        "Name of encryption cipher mode",
    ),
    opt("ivgen-alg", OptKind::Str, "Name of IV generator algorithm"),
    opt(
        "ivgen-hash-alg",
        OptKind::Str,
        "Name of IV generator hash algorithm",
    ),
    opt(
        "hash-alg",
        OptKind::Str,
        "Name of encryption hash algorithm",
    ),
    opt(
        "iter-time",
        OptKind::Number,
        "Time to spend in PBKDF in milliseconds",
    ),
    opt(
        "detached-header",
        OptKind::Bool,
        "Create a detached LUKS header",
    ),
];

/// Options of qcow2, in the order QEMU prints them in the `Formatting` line.
pub const QCOW2_OPTS: &[OptDesc] = &[
    opt(
        "encryption",
        OptKind::Bool,
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    ),
    opt(
        "encrypt.format",
        OptKind::Str,
        "Encrypt the image, format choices: 'aes', 'luks'",
    ),
    opt(
        "encrypt.key-secret",
        OptKind::Str,
        "ID of secret providing qcow AES key or LUKS passphrase",
    ),
    opt(
        "encrypt.cipher-alg",
        OptKind::Str,
        "Name of encryption cipher algorithm",
    ),
    opt(
        "encrypt.cipher-mode",
        OptKind::Str,
        "Name of encryption cipher mode",
    ),
    opt(
        "encrypt.ivgen-alg",
        OptKind::Str,
        "Name of IV generator algorithm",
    ),
    opt(
        "encrypt.ivgen-hash-alg",
        OptKind::Str,
        "Name of IV generator hash algorithm",
    ),
    opt(
        "encrypt.hash-alg",
        OptKind::Str,
        "Name of encryption hash algorithm",
    ),
    opt(
        "encrypt.iter-time",
        OptKind::Number,
        "Time to spend in PBKDF in milliseconds",
    ),
    opt_def("cluster_size", OptKind::Size, "qcow2 cluster size", "65536"),
    opt_def("extended_l2", OptKind::Bool, "Extended L2 tables", "off"),
    opt(
        "preallocation",
        OptKind::Str,
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
    ),
    opt_def(
        "compression_type",
        OptKind::Str,
        "Compression method used for image cluster compression",
        "zlib",
    ),
    opt("size", OptKind::Size, "Virtual disk size"),
    opt(
        "compat",
        OptKind::Str,
        "Compatibility level (v2 [0.10] or v3 [1.1])",
    ),
    opt("backing_file", OptKind::Str, "File name of a base image"),
    opt(
        "backing_fmt",
        OptKind::Str,
        "Image format of the base image",
    ),
    opt(
        "data_file",
        OptKind::Str,
        "File name of an external data file",
    ),
    opt(
        "data_file_raw",
        OptKind::Bool,
        "The external data file must stay valid as a raw image",
    ),
    opt_def(
        "lazy_refcounts",
        OptKind::Bool,
        "Postpone refcount updates",
        "off",
    ),
    opt_def(
        "refcount_bits",
        OptKind::Number,
        "Width of a reference count entry in bits",
        "16",
    ),
];

/// Options of raw (its own, before the protocol's).
pub const RAW_OPTS: &[OptDesc] = &[opt("size", OptKind::Size, "Virtual disk size")];

/// Formats rqemu can create.
pub const CREATABLE: &[&str] = &["qcow2", "raw"];

/// A format's own creation options.
pub fn format_opts(format: &str) -> Option<&'static [OptDesc]> {
    match format {
        "qcow2" => Some(QCOW2_OPTS),
        "raw" => Some(RAW_OPTS),
        "luks" => Some(&LUKS_OPT_LIST),
        _ => None,
    }
}

/// The format's options followed by the protocol's (names not repeated), in print order.
pub fn merged_opts(format: &str) -> Option<Vec<OptDesc>> {
    let mut v: Vec<OptDesc> = format_opts(format)?.to_vec();
    for o in FILE_OPTS {
        if !v.iter().any(|x| x.name == o.name) {
            v.push(*o);
        }
    }
    Some(v)
}

/// The `-o help` text: the format's options alone (`with_protocol` false, as without a
/// filename) or merged with the protocol's, sorted by name as QEMU prints them.
pub fn help_text(format: &str, with_protocol: bool) -> Option<String> {
    let mut list = if with_protocol {
        merged_opts(format)?
    } else {
        format_opts(format)?.to_vec()
    };
    list.sort_by(|a, b| a.name.cmp(b.name));
    let mut out = if with_protocol {
        "Supported options:\n".to_string()
    } else {
        format!("Supported {format} options:\n")
    };
    for o in list {
        let lhs = format!("{}=<{}>", o.name, o.kind.help_name());
        out.push_str(&format!("  {lhs:<22} - {}\n", o.help));
    }
    if !with_protocol {
        out.push_str("\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n");
    }
    Some(out)
}

/// Options of existing images that `amend` can change (qcow2's), which are not all
/// creation options.
const QCOW2_AMEND_ONLY: &[OptDesc] = &[
    opt(
        "encrypt.keyslot",
        OptKind::Number,
        "Select a single keyslot to modify explicitly",
    ),
    opt(
        "encrypt.new-secret",
        OptKind::Str,
        "New secret to set in the matching keyslots. Empty string to erase",
    ),
    opt(
        "encrypt.old-secret",
        OptKind::Str,
        "Select all keyslots that match this password",
    ),
    opt(
        "encrypt.state",
        OptKind::Str,
        "Select new state of affected keyslots (active/inactive)",
    ),
];

/// Creation options of qcow2 that `amend` also takes.
const QCOW2_AMENDABLE: &[&str] = &[
    "backing_file",
    "backing_fmt",
    "compat",
    "data_file",
    "data_file_raw",
    "encrypt.iter-time",
    "lazy_refcounts",
    "refcount_bits",
    "size",
];

/// The options `amend` takes for `format`, sorted by name (`None`: the format cannot
/// amend).
pub fn amend_opts(format: &str) -> Option<Vec<OptDesc>> {
    if format == "luks" {
        let mut v: Vec<OptDesc> = QCOW2_AMEND_ONLY
            .iter()
            .chain(QCOW2_OPTS.iter().filter(|o| o.name == "encrypt.iter-time"))
            .map(|o| OptDesc {
                name: o.name.trim_start_matches("encrypt."),
                ..*o
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(b.name));
        return Some(v);
    }
    if format != "qcow2" {
        return None;
    }
    let mut v: Vec<OptDesc> = QCOW2_OPTS
        .iter()
        .filter(|o| QCOW2_AMENDABLE.contains(&o.name))
        .chain(QCOW2_AMEND_ONLY)
        .copied()
        .collect();
    v.sort_by(|a, b| a.name.cmp(b.name));
    Some(v)
}

/// `amend -o help` for `format`.
pub fn amend_help_text(format: &str) -> Option<String> {
    let mut out = format!("Amend options for '{format}':\n");
    for o in amend_opts(format)? {
        let lhs = format!("{}=<{}>", o.name, o.kind.help_name());
        out.push_str(&format!("  {lhs:<22} - {}\n", o.help));
    }
    Some(out)
}

/// Validated creation options: values by name, in print order.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    format: String,
    descs: Vec<OptDesc>,
    values: Vec<(String, String)>,
}

/// A number option as QemuOpts reads it: C's `strtoull` over the whole value (decimal,
/// `0x` hex or leading-zero octal; a minus sign wraps around).
pub fn parse_number(value: &str) -> Option<u64> {
    rqemu_opts::parse_c_u64(value).ok()
}

/// The message QEMU gives for a size it cannot parse, with its hint.
pub fn size_param_error(name: &str) -> Error {
    Error::invalid(format!(
        "Parameter '{name}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
    ))
}

impl CreateOptions {
    /// Starts an option set for `format` (the format must be creatable).
    pub fn new(format: &str) -> Result<CreateOptions> {
        let descs = merged_opts(format)
            .ok_or_else(|| Error::invalid(format!("Unknown file format '{format}'")))?;
        Ok(CreateOptions {
            format: format.to_string(),
            descs,
            values: Vec::new(),
        })
    }

    /// An option set over the given descriptions (such as [`amend_opts`]).
    pub fn with_descs(format: &str, descs: Vec<OptDesc>) -> CreateOptions {
        CreateOptions {
            format: format.to_string(),
            descs,
            values: Vec::new(),
        }
    }

    /// The format name.
    pub fn format(&self) -> &str {
        &self.format
    }

    /// Sets one option, checking its type like QemuOpts does.
    pub fn set(&mut self, name: &str, value: &str) -> Result<()> {
        let Some(d) = self.descs.iter().find(|d| d.name == name) else {
            return Err(Error::invalid(format!("Invalid parameter '{name}'")));
        };
        match d.kind {
            OptKind::Bool => {
                if rqemu_opts::bool_opt(value).is_none() {
                    return Err(Error::invalid(format!(
                        "Parameter '{name}' expects 'on' or 'off'"
                    )));
                }
            }
            OptKind::Size => {
                if value.trim_start().starts_with('-') {
                    return Err(Error::invalid(format!(
                        "Value '{value}' is out of range for parameter '{name}'"
                    )));
                }
                parse_size(value, 1).map_err(|_| size_param_error(name))?;
            }
            OptKind::Number => {
                if parse_number(value).is_none() {
                    return Err(Error::invalid(format!(
                        "Parameter '{name}' expects a number"
                    )));
                }
            }
            OptKind::Str => {}
        }
        if let Some(v) = self.values.iter_mut().find(|(k, _)| k == name) {
            v.1 = value.to_string();
        } else {
            self.values.push((name.to_string(), value.to_string()));
        }
        Ok(())
    }

    /// Parses a `-o` list (`help` is the caller's business).
    pub fn parse(&mut self, list: &str) -> Result<()> {
        let kv = KeyVal::parse(list, None).map_err(|e| Error::invalid(e.to_string()))?;
        for (k, v) in kv.iter() {
            self.set(k, v)?;
        }
        Ok(())
    }

    /// Whether an option was given.
    pub fn has(&self, name: &str) -> bool {
        self.values.iter().any(|(k, _)| k == name)
    }

    /// The value given (not the default).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A size option's value.
    pub fn get_size(&self, name: &str) -> Option<u64> {
        self.get(name).and_then(|v| parse_size(v, 1).ok())
    }

    /// A boolean option's value.
    pub fn get_bool(&self, name: &str) -> Option<bool> {
        self.get(name).and_then(rqemu_opts::bool_opt)
    }

    /// The options given, in print order, as (name, value).
    pub fn values(&self) -> impl Iterator<Item = (&str, &str)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Removes an option.
    pub fn remove(&mut self, name: &str) {
        self.values.retain(|(k, _)| k != name);
    }

    /// The options as QEMU prints them after `Formatting '…', fmt=…`.
    pub fn print_line(&self) -> String {
        let mut parts = Vec::new();
        for d in &self.descs {
            let (v, given) = match self.get(d.name) {
                Some(v) => (v.to_string(), true),
                None => match d.default {
                    Some(def) => (def.to_string(), false),
                    None => continue,
                },
            };
            let shown = match d.kind {
                OptKind::Str => v.replace(',', ",,"),
                OptKind::Size | OptKind::Number if given => {
                    parse_size(&v, 1).map(|n| n.to_string()).unwrap_or(v)
                }
                _ => v,
            };
            parts.push(format!("{}={}", d.name, shown));
        }
        parts.join(" ")
    }
}

/// The `size` (rounded up to whole sectors) and `preallocation` of a format whose image
/// is its data (raw, luks): `metadata` preallocation means nothing there.
pub(crate) fn size_and_prealloc(o: &CreateOptions) -> Result<(u64, crate::node::Prealloc)> {
    use crate::node::Prealloc;
    let size = o
        .get_size("size")
        .ok_or_else(|| Error::invalid("Image creation needs a size parameter"))?
        .div_ceil(512)
        * 512;
    let prealloc = match o.get("preallocation") {
        None => Prealloc::Off,
        Some(v) => match Prealloc::parse(v) {
            Some(Prealloc::Metadata) | None => {
                return Err(Error::invalid(format!(
                    "Parameter 'preallocation' does not accept value '{v}'"
                )))
            }
            Some(p) => p,
        },
    };
    Ok((size, prealloc))
}

/// Creates the image `filename` with `opts` (which must include `size`).
pub async fn create(filename: &str, opts: &CreateOptions) -> Result<()> {
    // `file:` names the protocol explicitly; the rest is the path.
    let filename = filename.strip_prefix("file:").unwrap_or(filename);
    match opts.format() {
        "qcow2" => qcow2::create::create(filename, opts).await,
        "raw" => raw::create(filename, opts).await,
        "luks" => crate::format::luks::create(filename, opts).await,
        other => Err(Error::unsupported(format!(
            "Format driver '{other}' does not support image creation"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_line_matches_qemu() {
        let mut o = CreateOptions::new("qcow2").unwrap();
        o.set("size", "1G").unwrap();
        assert_eq!(
            o.print_line(),
            "cluster_size=65536 extended_l2=off compression_type=zlib size=1073741824 lazy_refcounts=off refcount_bits=16"
        );
        o.set("backing_file", "a,b").unwrap();
        o.set("cluster_size", "4k").unwrap();
        assert!(o.print_line().contains("cluster_size=4096"));
        assert!(o.print_line().contains("backing_file=a,,b"));
        assert!(o.set("foo", "1").is_err());
        assert!(o.set("lazy_refcounts", "maybe").is_err());
    }
}
