//! QEMU's option syntax, shared by every rqemu front end.
//!
//! - [`size`]: numbers with `k`/`M`/`G`/`T`/`P`/`E` suffixes (1024-based), as `qemu_strtosz` reads them.
//! - [`keyval`]: `key=value,key2=value2` lists with `,,` for a literal comma and an implied first key,
//!   dotted keys (`file.filename=x`) and `json:{...}` filenames flattened into the same form.
//! - [`bool_opt`]: QEMU's `on|off|yes|no|true|false` booleans.
#![warn(missing_docs)]

pub mod keyval;
pub mod size;

pub use keyval::{parse_json_filename, KeyVal, KeyValError};
pub use size::{parse_c_u64, parse_size, SizeError};

/// Parses a QEMU boolean: `on`, `yes`, `true` or `off`, `no`, `false`.
pub fn bool_opt(value: &str) -> Option<bool> {
    match value {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}
