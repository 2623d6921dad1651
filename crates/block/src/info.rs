//! What nodes report about themselves: format-specific information, snapshots, and the
//! results of a consistency check, in the shapes `qemu-img info` and `check` print.

use serde_json::{Map, Value};

/// Format-specific information (`Format specific information:` in `qemu-img info`).
///
/// QEMU prints this structure generically in both outputs: JSON as is, and human-readably
/// with `-` in keys turned into spaces. Keeping it as an ordered JSON object lets both
/// printers stay generic.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FormatInfo {
    /// The union tag (`qcow2`, `file`, ...); `None` when the driver has nothing to say.
    pub type_name: Option<&'static str>,
    /// The fields, in QEMU's order.
    pub data: Map<String, Value>,
}

/// One internal snapshot, as `qemu-img snapshot -l` and `info` list them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Unique ID string.
    pub id: String,
    /// Name (tag).
    pub name: String,
    /// Size of the saved VM state in bytes.
    pub vm_state_size: u64,
    /// Creation time: seconds since the epoch.
    pub date_sec: u32,
    /// Creation time: nanoseconds.
    pub date_nsec: u32,
    /// Guest run time at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Record/replay instruction count, if recorded.
    pub icount: Option<u64>,
}

/// What `check -r` may repair.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepairMode {
    /// Repair leaked clusters.
    pub leaks: bool,
    /// Repair errors (corruptions).
    pub errors: bool,
}

/// The outcome of a consistency check, in QEMU's `ImageCheck` shape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Errors that made the check incomplete.
    pub check_errors: u64,
    /// Corruptions found and still present.
    pub corruptions: u64,
    /// Leaked clusters found and still present.
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// First byte past the last used cluster.
    pub image_end_offset: Option<u64>,
    /// Clusters of the virtual disk.
    pub total_clusters: Option<u64>,
    /// Allocated clusters of the virtual disk.
    pub allocated_clusters: Option<u64>,
    /// Allocated clusters that are not contiguous with their predecessor.
    pub fragmented_clusters: Option<u64>,
    /// Compressed clusters.
    pub compressed_clusters: Option<u64>,
    /// Messages printed while checking (QEMU prints these to stderr as it goes).
    pub messages: Vec<String>,
}
