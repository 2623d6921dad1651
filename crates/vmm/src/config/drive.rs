//! `-drive` and its shorthands (`-hda`, `-cdrom`, a bare image name), and
//! `-device virtio-blk-pci`: what each disk is and how it is opened.

use rqemu_block::options::{AioMode, CacheMode, DetectZeroes, DiscardMode, OpenOptions};
use rqemu_opts::{bool_opt, KeyVal};

use crate::error::{Error, Result};

/// The `if=` of a drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interface {
    /// A virtio-blk-pci device is created for the drive.
    Virtio,
    /// No device: a `-device` names the drive with `drive=ID`.
    None,
    /// Known to QEMU, not provided by this machine yet.
    Unsupported(&'static str),
}

impl Interface {
    fn parse(s: &str) -> Option<Interface> {
        Some(match s {
            "virtio" => Interface::Virtio,
            "none" => Interface::None,
            "ide" => Interface::Unsupported("ide"),
            "scsi" => Interface::Unsupported("scsi"),
            "floppy" => Interface::Unsupported("floppy"),
            "pflash" => Interface::Unsupported("pflash"),
            "mtd" => Interface::Unsupported("mtd"),
            "sd" => Interface::Unsupported("sd"),
            "xen" => Interface::Unsupported("xen"),
            _ => return None,
        })
    }
}

/// I/O limits of a drive (`throttling.*` and the legacy `bps`/`iops` names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Throttle {
    /// Total bytes per second.
    pub bps_total: u64,
    /// Read bytes per second.
    pub bps_read: u64,
    /// Written bytes per second.
    pub bps_write: u64,
    /// Total requests per second.
    pub iops_total: u64,
    /// Read requests per second.
    pub iops_read: u64,
    /// Write requests per second.
    pub iops_write: u64,
}

impl Throttle {
    /// Whether any limit is set.
    pub fn is_enabled(&self) -> bool {
        *self != Throttle::default()
    }
}

/// One disk as the command line describes it.
#[derive(Debug, Clone)]
pub struct DriveConfig {
    /// The option as typed, for messages (`-drive file=x,if=virtio`).
    pub opt: String,
    /// `id=`, or QEMU's generated name.
    pub id: String,
    /// `if=`.
    pub interface: Interface,
    /// `index=`/`bus=`/`unit=` collapse into one position among the virtio disks.
    pub index: Option<u32>,
    /// `media=cdrom` makes the disk read-only.
    pub cdrom: bool,
    /// `serial=`: what the guest's get-id request returns.
    pub serial: Option<String>,
    /// `addr=`: PCI slot (and function) of the device.
    pub addr: Option<u8>,
    /// I/O limits.
    pub throttle: Throttle,
    /// How the block layer opens the image.
    pub open: OpenOptions,
    /// `werror=`/`rerror=`: only `report` and `ignore` are honoured; `stop` acts as `report`.
    pub ignore_errors: bool,
}

fn opt_bool(opt: &str, key: &str, v: &str) -> Result<bool> {
    bool_opt(v)
        .ok_or_else(|| Error::usage(format!("{opt}: Parameter '{key}' expects 'on' or 'off'")))
}

fn opt_num(opt: &str, key: &str, v: &str) -> Result<u64> {
    v.parse::<u64>().map_err(|_| {
        Error::usage(format!(
            "{opt}: Parameter '{key}' expects a non-negative number below 2^64"
        ))
    })
}

/// Parses one `-drive` argument. `default_if` is the interface when `if=` is absent;
/// `snapshot` is the global `-snapshot`.
pub fn parse_drive(arg: &str, auto_index: usize, snapshot: bool) -> Result<DriveConfig> {
    let opt = format!("-drive {arg}");
    let mut kv = KeyVal::parse(arg, None).map_err(|e| Error::usage(format!("{opt}: {e}")))?;
    let mut open = OpenOptions {
        snapshot,
        ..OpenOptions::default()
    };
    let interface = match kv.take("if") {
        None => Interface::Virtio,
        Some(s) => Interface::parse(&s)
            .ok_or_else(|| Error::usage(format!("{opt}: unsupported bus type '{s}'")))?,
    };
    if let Interface::Unsupported(name) = interface {
        return Err(Error::usage(format!(
            "{opt}: machine type does not support if={name}: only if=virtio and if=none drives exist on this machine"
        )));
    }
    let mut index = None;
    let mut bus = None;
    let mut unit = None;
    let mut cdrom = false;
    let mut serial = None;
    let mut addr = None;
    let mut id = None;
    let mut throttle = Throttle::default();
    let mut ignore_errors = false;
    let mut direct: Option<bool> = None;
    let mut no_flush: Option<bool> = None;
    let mut aio_given = None;
    let mut passthrough = KeyVal::new();
    for (key, value) in kv.iter() {
        let (key, value) = (key.to_string(), value.to_string());
        match key.as_str() {
            "file" => open.filename = value,
            "format" => {
                if value == "?" || value == "help" {
                    return Err(Error::usage(format!("{opt}: Supported formats: qcow2 raw")));
                }
                open.format = Some(value)
            }
            "index" => index = Some(opt_num(&opt, &key, &value)? as u32),
            "bus" => bus = Some(opt_num(&opt, &key, &value)? as u32),
            "unit" => unit = Some(opt_num(&opt, &key, &value)? as u32),
            "media" => match value.as_str() {
                "disk" => cdrom = false,
                "cdrom" => cdrom = true,
                _ => return Err(Error::usage(format!("{opt}: '{value}' invalid media"))),
            },
            "snapshot" => open.snapshot = opt_bool(&opt, &key, &value)?,
            "readonly" | "read-only" => open.read_only = opt_bool(&opt, &key, &value)?,
            "cache" => {
                open.cache =
                    CacheMode::parse(&value).map_err(|e| Error::usage(format!("{opt}: {e}")))?;
                direct.get_or_insert(open.cache.direct);
                no_flush.get_or_insert(open.cache.no_flush);
                direct = Some(open.cache.direct);
                no_flush = Some(open.cache.no_flush);
            }
            "cache.direct" => direct = Some(opt_bool(&opt, &key, &value)?),
            "cache.no-flush" => no_flush = Some(opt_bool(&opt, &key, &value)?),
            "cache.writeback" => open.cache.writeback = opt_bool(&opt, &key, &value)?,
            "aio" => {
                open.aio =
                    AioMode::parse(&value).map_err(|e| Error::usage(format!("{opt}: {e}")))?;
                aio_given = Some(value);
            }
            "discard" => {
                open.discard =
                    DiscardMode::parse(&value).map_err(|e| Error::usage(format!("{opt}: {e}")))?
            }
            "detect-zeroes" => {
                open.detect_zeroes =
                    DetectZeroes::parse(&value).map_err(|e| Error::usage(format!("{opt}: {e}")))?
            }
            "serial" => serial = Some(value),
            "addr" => {
                let slot = value.split('.').next().unwrap_or("");
                let slot = slot.strip_prefix("0x").unwrap_or(slot);
                let n = u8::from_str_radix(slot, 16)
                    .ok()
                    .filter(|n| *n < 32)
                    .ok_or_else(|| {
                        Error::usage(format!(
                            "{opt}: Property 'virtio-blk-pci.addr' doesn't take value '{value}'"
                        ))
                    })?;
                addr = Some(n);
            }
            "id" => id = Some(value),
            "werror" | "rerror" => match value.as_str() {
                "ignore" => ignore_errors = true,
                "report" | "stop" | "enospc" => {}
                _ => {
                    return Err(Error::usage(format!(
                        "{opt}: '{value}' invalid {key} argument"
                    )))
                }
            },
            "driver" => open.format = Some(value),
            // Options of the NBD protocol driver (`driver=nbd,server.type=inet,...`).
            "export" | "tls-creds" | "tls-hostname" | "x-dirty-bitmap" | "reconnect-delay"
            | "open-timeout" => passthrough.set(&key, &value),
            "copy-on-read" | "auto-read-only" | "force-share" | "locking" => {
                passthrough.set(&key, &value)
            }
            "bps" | "throttling.bps-total" => throttle.bps_total = opt_num(&opt, &key, &value)?,
            "bps_rd" | "throttling.bps-read" => throttle.bps_read = opt_num(&opt, &key, &value)?,
            "bps_wr" | "throttling.bps-write" => throttle.bps_write = opt_num(&opt, &key, &value)?,
            "iops" | "throttling.iops-total" => throttle.iops_total = opt_num(&opt, &key, &value)?,
            "iops_rd" | "throttling.iops-read" => throttle.iops_read = opt_num(&opt, &key, &value)?,
            "iops_wr" | "throttling.iops-write" => {
                throttle.iops_write = opt_num(&opt, &key, &value)?
            }
            k if k.starts_with("throttling.")
                || k.starts_with("bps_")
                || k.starts_with("iops_") =>
            {
                // Burst lengths and sizes: accepted, the plain limits are what is enforced.
                opt_num(&opt, &key, &value)?;
            }
            k if k.contains('.') => passthrough.set(&key, &value),
            _ => {
                return Err(Error::usage(format!(
                    "{opt}: Block format '{}' does not support the option '{key}'",
                    open.format.as_deref().unwrap_or("raw")
                )))
            }
        }
    }
    if let Some(d) = direct {
        open.cache.direct = d;
    }
    if let Some(n) = no_flush {
        open.cache.no_flush = n;
    }
    if open.aio == AioMode::Native && !open.cache.direct && aio_given.is_some() {
        return Err(Error::usage(format!(
            "{opt}: aio=native was specified, but it requires cache.direct=on, which was not specified."
        )));
    }
    if open.detect_zeroes == DetectZeroes::Unmap && open.discard != DiscardMode::Unmap {
        return Err(Error::usage(format!(
            "{opt}: setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
        )));
    }
    if cdrom {
        open.read_only = true;
    }
    let protocol_driver = matches!(open.format.as_deref(), Some("nbd"));
    if open.filename.is_empty() && !passthrough.contains("file.filename") && !protocol_driver {
        return Err(Error::usage(format!(
            "{opt}: A block device must be specified for \"file\""
        )));
    }
    open.options = passthrough;
    // Virtio (and if=none) drives have no units per bus in QEMU: a drive's position is
    // its unit, whatever its bus; without one it takes the next free position.
    let index = match (index, bus, unit) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err(Error::usage(format!(
                "{opt}: index cannot be used with bus and unit"
            )))
        }
        (Some(i), None, None) => Some(i),
        (None, _, u) => u,
    };
    let id = id.unwrap_or_else(|| {
        let n = index.map(|i| i as usize).unwrap_or(auto_index);
        match interface {
            Interface::None => format!("none{n}"),
            _ => format!("virtio{n}"),
        }
    });
    Ok(DriveConfig {
        opt,
        id,
        interface,
        index,
        cdrom,
        serial,
        addr,
        throttle,
        open,
        ignore_errors,
    })
}

/// A `-device virtio-blk-pci,...` naming a drive.
#[derive(Debug, Clone, Default)]
pub struct BlkDeviceConfig {
    /// The option as typed.
    pub opt: String,
    /// `drive=`: the id of an `if=none` drive.
    pub drive: String,
    /// `id=`.
    pub id: Option<String>,
    /// `serial=`.
    pub serial: Option<String>,
    /// `iothread=`.
    pub iothread: Option<String>,
    /// `num-queues=`.
    pub num_queues: Option<u16>,
    /// `queue-size=`.
    pub queue_size: Option<u16>,
    /// `addr=` slot.
    pub addr: Option<u8>,
    /// `write-cache=on|off` (absent: as the cache mode implies).
    pub write_cache: Option<bool>,
}

/// Parses one `-device` argument (only virtio-blk exists).
pub fn parse_device(arg: &str) -> Result<BlkDeviceConfig> {
    let opt = format!("-device {arg}");
    let mut kv =
        KeyVal::parse(arg, Some("driver")).map_err(|e| Error::usage(format!("{opt}: {e}")))?;
    let driver = kv.take("driver").unwrap_or_default();
    if driver == "help" || driver == "?" {
        return Err(Error::usage(
            "Storage devices:\nname \"virtio-blk-pci\", bus PCI, alias \"virtio-blk\"".to_string(),
        ));
    }
    if driver != "virtio-blk-pci" && driver != "virtio-blk" {
        return Err(Error::usage(format!(
            "{opt}: '{driver}' is not a valid device model name"
        )));
    }
    let mut dev = BlkDeviceConfig {
        opt: opt.clone(),
        ..BlkDeviceConfig::default()
    };
    for (key, value) in kv.iter() {
        let bad = || {
            Error::usage(format!(
                "{opt}: Property 'virtio-blk-pci.{key}' doesn't take value '{value}'"
            ))
        };
        match key {
            "drive" => dev.drive = value.to_string(),
            "id" => dev.id = Some(value.to_string()),
            "serial" => dev.serial = Some(value.to_string()),
            "iothread" => dev.iothread = Some(value.to_string()),
            "num-queues" => {
                dev.num_queues = Some(
                    value
                        .parse()
                        .ok()
                        .filter(|n| (1..=64).contains(n))
                        .ok_or_else(bad)?,
                )
            }
            "queue-size" => {
                dev.queue_size = Some(
                    value
                        .parse()
                        .ok()
                        .filter(|n: &u16| n.is_power_of_two() && (2..=1024).contains(n))
                        .ok_or_else(bad)?,
                )
            }
            "addr" => {
                let slot = value.split('.').next().unwrap_or("");
                let slot = slot.strip_prefix("0x").unwrap_or(slot);
                dev.addr = Some(
                    u8::from_str_radix(slot, 16)
                        .ok()
                        .filter(|n| *n < 32)
                        .ok_or_else(bad)?,
                );
            }
            "write-cache" => {
                dev.write_cache = match value {
                    "auto" => None,
                    v => Some(bool_opt(v).ok_or_else(bad)?),
                }
            }
            "bootindex"
            | "bus"
            | "disable-legacy"
            | "disable-modern"
            | "config-wce"
            | "scsi"
            | "discard"
            | "write-zeroes"
            | "ioeventfd"
            | "vectors"
            | "seg-max-adjust"
            | "logical_block_size"
            | "physical_block_size"
            | "multifunction"
            | "rombar" => {}
            _ => {
                return Err(Error::usage(format!(
                    "{opt}: Property 'virtio-blk-pci.{key}' not found"
                )))
            }
        }
    }
    if dev.drive.is_empty() {
        return Err(Error::usage(format!("{opt}: drive property not set")));
    }
    Ok(dev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drive_options() {
        let d = parse_drive(
            "file=a,,b.qcow2,if=virtio,cache=none,aio=native,serial=S1,id=d0,discard=unmap,detect-zeroes=unmap,readonly=on,bps=1000",
            0,
            false,
        )
        .unwrap();
        assert_eq!(d.open.filename, "a,b.qcow2");
        assert!(d.open.cache.direct);
        assert_eq!(d.open.aio, AioMode::Native);
        assert_eq!(d.serial.as_deref(), Some("S1"));
        assert_eq!(d.id, "d0");
        assert!(d.open.read_only);
        assert_eq!(d.throttle.bps_total, 1000);
    }

    #[test]
    fn nbd_drives() {
        let d = parse_drive(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=10809,export=x,if=virtio",
            0,
            false,
        )
        .unwrap();
        assert_eq!(d.open.format.as_deref(), Some("nbd"));
        assert!(d.open.filename.is_empty());
        assert_eq!(d.open.options.get("server.host"), Some("127.0.0.1"));
        assert_eq!(d.open.options.get("export"), Some("x"));
        let d = parse_drive("file=nbd://127.0.0.1:10809/x,format=raw", 0, false).unwrap();
        assert_eq!(d.open.filename, "nbd://127.0.0.1:10809/x");
        let d = parse_drive("file=nbd:127.0.0.1:10809:exportname=x", 0, false).unwrap();
        assert_eq!(d.open.filename, "nbd:127.0.0.1:10809:exportname=x");
        // Without a server the file is still required.
        assert!(parse_drive("if=virtio,export=x", 0, false).is_err());
    }

    #[test]
    fn refusals() {
        let e = parse_drive("file=x,if=ide", 0, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("-drive file=x,if=ide: machine type does not support if=ide"),
            "{e}"
        );
        let e = parse_drive("file=x,if=foo", 0, false)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "-drive file=x,if=foo: unsupported bus type 'foo'");
        let e = parse_drive("file=x,aio=native", 0, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("requires cache.direct=on"), "{e}");
        let e = parse_drive("file=x,cache=bogus", 0, false)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "-drive file=x,cache=bogus: Invalid cache option: bogus");
        assert!(parse_drive("if=virtio", 0, false).is_err());
    }

    #[test]
    fn devices() {
        let d = parse_device("virtio-blk-pci,drive=d0,num-queues=2,iothread=io0").unwrap();
        assert_eq!(d.drive, "d0");
        assert_eq!(d.num_queues, Some(2));
        let e = parse_device("e1000,netdev=n").unwrap_err().to_string();
        assert_eq!(
            e,
            "-device e1000,netdev=n: 'e1000' is not a valid device model name"
        );
    }
}
