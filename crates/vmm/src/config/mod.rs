//! QEMU's system-emulator command line, parsed into a [`VmConfig`].
//!
//! Options are single- or double-dash long options; those with an argument take the next
//! word. A word that is not an option is the first disk (`-hda`). Messages name the
//! option as QEMU's do (`-smp 0: ...`).

pub mod drive;
mod help;

use std::path::PathBuf;

use rqemu_opts::{bool_opt, parse_size, KeyVal};

use crate::error::{Error, Result};
pub use drive::{BlkDeviceConfig, DriveConfig, Interface, Throttle};

/// Default guest RAM, as QEMU's.
pub const DEFAULT_MEM: u64 = 128 << 20;
/// Most vCPUs the machine builds (one byte APIC ids in the MADT, below the broadcast id).
pub const MAX_CPUS: u32 = 254;

/// CPU topology from `-smp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Smp {
    /// vCPUs present at boot.
    pub cpus: u32,
    /// Sockets.
    pub sockets: u32,
    /// Cores per socket.
    pub cores: u32,
    /// Threads per core.
    pub threads: u32,
    /// Most vCPUs (only `cpus` are created; the rest are not hot-pluggable here).
    pub maxcpus: u32,
}

impl Default for Smp {
    fn default() -> Self {
        Smp {
            cpus: 1,
            sockets: 1,
            cores: 1,
            threads: 1,
            maxcpus: 1,
        }
    }
}

/// Where a serial port's bytes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialBackend {
    /// The VMM's standard input and output.
    Stdio,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded; reads see nothing.
    Null,
}

/// The guest's RTC base (`-rtc base=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RtcBase {
    /// Host time in UTC.
    Utc,
    /// Host time in the host's time zone.
    LocalTime,
    /// A fixed start (seconds since the epoch, UTC) that then advances.
    Fixed(i64),
}

/// `-rtc` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtcConfig {
    /// What the clock starts from.
    pub base: RtcBase,
    /// `clock=vm`: the RTC stops while the VM is stopped (it never is here, so it runs).
    pub clock_vm: bool,
}

/// The machine type name given with `-machine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineType {
    /// `pc` (i440FX names): host bridge 8086:1237.
    Pc,
    /// `q35`: host bridge 8086:29c0.
    Q35,
}

/// The CPU model given with `-cpu`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuModel {
    /// Everything KVM supports (`host`, `max`).
    Host,
    /// A named model: KVM's supported set less features the model lacks (virtualisation
    /// extensions are hidden).
    Named(String),
}

/// Everything needed to build and run the machine.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// vCPUs.
    pub smp: Smp,
    /// `-kernel`.
    pub kernel: Option<PathBuf>,
    /// `-initrd`.
    pub initrd: Option<PathBuf>,
    /// `-append`.
    pub append: String,
    /// `-drive` and the shorthands, in command-line order.
    pub drives: Vec<DriveConfig>,
    /// `-device virtio-blk-pci`.
    pub blk_devices: Vec<BlkDeviceConfig>,
    /// `-object iothread,id=`.
    pub iothreads: Vec<String>,
    /// Serial ports COM1..COM4.
    pub serials: Vec<SerialBackend>,
    /// `-name`.
    pub name: Option<String>,
    /// `-uuid`.
    pub uuid: Option<[u8; 16]>,
    /// `-no-reboot`: a guest reset ends the VMM.
    pub no_reboot: bool,
    /// `-no-shutdown`: accepted; a guest power-off ends the VMM all the same.
    pub no_shutdown: bool,
    /// `-machine`.
    pub machine: MachineType,
    /// `-cpu`.
    pub cpu: CpuModel,
    /// `-rtc`.
    pub rtc: RtcConfig,
    /// Ctrl-a x on a terminal quits (`-nographic`).
    pub nographic: bool,
}

/// The outcome of parsing: a machine to run, or a text to print (`-h`, `-version`).
#[derive(Debug)]
pub enum Parsed {
    /// Build and run this machine.
    Run(Box<VmConfig>),
    /// Print this and exit 0.
    Exit(String),
}

/// Options that take an argument.
const WITH_ARG: &[&str] = &[
    "machine",
    "M",
    "cpu",
    "accel",
    "smp",
    "m",
    "kernel",
    "initrd",
    "append",
    "drive",
    "device",
    "object",
    "hda",
    "hdb",
    "hdc",
    "hdd",
    "cdrom",
    "serial",
    "display",
    "vga",
    "name",
    "uuid",
    "rtc",
    "boot",
    "monitor",
    "nic",
    "net",
    "netdev",
    "chardev",
    "mon",
    "qmp",
    "pidfile",
    "L",
    "bios",
    "global",
    "k",
    "D",
    "d",
    "parallel",
    "vnc",
    "smbios",
    "incoming",
    "mem-path",
    "numa",
    "sandbox",
    "audiodev",
    "trace",
    "action",
    "msg",
    "overcommit",
    "fda",
    "fdb",
];

/// Options without an argument.
const FLAGS: &[&str] = &[
    "enable-kvm",
    "nographic",
    "no-reboot",
    "no-shutdown",
    "snapshot",
    "version",
    "h",
    "help",
    "S",
    "nodefaults",
    "no-user-config",
    "no-hpet",
    "daemonize",
    "mem-prealloc",
    "full-screen",
    "enable-fips",
    "no-acpi",
];

fn parse_smp(arg: &str) -> Result<Smp> {
    let opt = format!("-smp {arg}");
    let kv = KeyVal::parse(arg, Some("cpus")).map_err(|e| Error::usage(format!("{opt}: {e}")))?;
    let get = |key: &str| -> Result<Option<u32>> {
        match kv.get(key) {
            None => Ok(None),
            Some(v) => v.parse::<u32>().map(Some).map_err(|_| {
                Error::usage(format!("{opt}: Parameter 'smp.{key}' expects a number"))
            }),
        }
    };
    let cpus = get("cpus")?;
    let sockets = get("sockets")?;
    let dies = get("dies")?.unwrap_or(1);
    let cores = get("cores")?;
    let threads = get("threads")?;
    let maxcpus = get("maxcpus")?;
    for k in kv.keys() {
        if ![
            "cpus", "sockets", "dies", "cores", "threads", "maxcpus", "clusters", "books",
            "drawers", "modules",
        ]
        .contains(&k)
        {
            return Err(Error::usage(format!("{opt}: Invalid parameter '{k}'")));
        }
    }
    if [cpus, sockets, cores, threads, maxcpus].contains(&Some(0)) {
        return Err(Error::usage(format!(
            "{opt}: Invalid CPU topology: CPU topology parameters must be greater than zero"
        )));
    }
    // QEMU's rules: omitted values are computed, preferring cores over sockets.
    let threads = threads.unwrap_or(1);
    let maxcpus0 = maxcpus.or(cpus);
    let per = |n: u32| n.saturating_mul(dies).saturating_mul(threads).max(1);
    let (sockets, cores) = match (sockets, cores) {
        (Some(s), Some(c)) => (s, c),
        (Some(s), None) => (s, (maxcpus0.unwrap_or(per(s)) / per(s)).max(1)),
        (None, Some(c)) => ((maxcpus0.unwrap_or(per(c)) / per(c)).max(1), c),
        (None, None) => (1, (maxcpus0.unwrap_or(per(1)) / per(1)).max(1)),
    };
    let product = sockets
        .saturating_mul(dies)
        .saturating_mul(cores)
        .saturating_mul(threads);
    let maxcpus = maxcpus.unwrap_or(product);
    let cpus = cpus.unwrap_or(maxcpus);
    if product != maxcpus {
        return Err(Error::usage(format!(
            "{opt}: Invalid CPU topology: product of the hierarchy must match maxcpus: sockets ({sockets}) * dies ({dies}) * cores ({cores}) * threads ({threads}) != maxcpus ({maxcpus})"
        )));
    }
    if cpus > maxcpus {
        return Err(Error::usage(format!(
            "{opt}: Invalid CPU topology: maxcpus must be equal to or greater than smp: sockets ({sockets}) * dies ({dies}) * cores ({cores}) * threads ({threads}) == maxcpus ({maxcpus}) < smp_cpus ({cpus})"
        )));
    }
    if maxcpus > MAX_CPUS {
        return Err(Error::usage(format!(
            "{opt}: Invalid SMP CPUs {maxcpus}. The max CPUs supported by machine 'pc-q35-10.0' is {MAX_CPUS}"
        )));
    }
    Ok(Smp {
        cpus,
        sockets,
        cores: cores * dies,
        threads,
        maxcpus,
    })
}

fn parse_mem(arg: &str) -> Result<u64> {
    let opt = format!("-m {arg}");
    let kv = KeyVal::parse(arg, Some("size")).map_err(|e| Error::usage(format!("{opt}: {e}")))?;
    let Some(size) = kv.get("size") else {
        return Ok(DEFAULT_MEM);
    };
    let bytes = parse_size(size, 1 << 20)
        .map_err(|_| Error::usage(format!("{opt}: Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.")))?;
    let bytes = bytes & !((1 << 12) - 1);
    if bytes < (16 << 20) {
        return Err(Error::usage(format!(
            "{opt}: at least 16 MiB of RAM are needed to boot a Linux guest"
        )));
    }
    if bytes > (1u64 << 40) {
        return Err(Error::usage(format!("{opt}: ram size too large")));
    }
    Ok(bytes)
}

/// Parses `-uuid`'s `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let groups: Vec<&str> = s.split('-').collect();
    if groups.len() != 5 || groups.iter().map(|g| g.len()).collect::<Vec<_>>() != [8, 4, 4, 4, 12] {
        return None;
    }
    let hex: String = groups.concat();
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn parse_rtc_date(s: &str) -> Option<i64> {
    let (date, time) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    let mut d = date.split('-');
    let y: i64 = d.next()?.parse().ok()?;
    let m: u32 = d.next()?.parse().ok()?;
    let day: u32 = d.next()?.parse().ok()?;
    if d.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    let mut secs = days_from_civil(y, m, day) * 86400;
    if let Some(t) = time {
        let mut p = t.split(':');
        let h: i64 = p.next()?.parse().ok()?;
        let mi: i64 = p.next()?.parse().ok()?;
        let sec: i64 = p.next()?.parse().ok()?;
        if p.next().is_some() || h > 23 || mi > 59 || sec > 59 {
            return None;
        }
        secs += h * 3600 + mi * 60 + sec;
    }
    Some(secs)
}

fn parse_rtc(arg: &str, rtc: &mut RtcConfig) -> Result<()> {
    let opt = format!("-rtc {arg}");
    let kv = KeyVal::parse(arg, None).map_err(|e| Error::usage(format!("{opt}: {e}")))?;
    for (key, value) in kv.iter() {
        match key {
            "base" => {
                rtc.base = match value {
                    "utc" => RtcBase::Utc,
                    "localtime" => RtcBase::LocalTime,
                    d => RtcBase::Fixed(parse_rtc_date(d).ok_or_else(|| {
                        Error::usage(format!(
                            "{opt}: invalid datetime format\nvalid formats: '2006-06-17T16:01:21' or '2006-06-17'"
                        ))
                    })?),
                }
            }
            "clock" => match value {
                "host" | "rt" => rtc.clock_vm = false,
                "vm" => rtc.clock_vm = true,
                _ => return Err(Error::usage(format!("{opt}: invalid option value '{value}'"))),
            },
            "driftfix" => {
                if value != "none" && value != "slew" {
                    return Err(Error::usage(format!("{opt}: invalid option value '{value}'")));
                }
            }
            _ => return Err(Error::usage(format!("{opt}: Invalid parameter '{key}'"))),
        }
    }
    Ok(())
}

fn parse_serial(arg: &str) -> Result<Option<SerialBackend>> {
    Ok(Some(match arg {
        "stdio" | "mon:stdio" => SerialBackend::Stdio,
        "null" => SerialBackend::Null,
        "none" => return Ok(None),
        s if s.starts_with("file:") => SerialBackend::File(PathBuf::from(&s[5..])),
        s if s.starts_with("vc") => SerialBackend::Null,
        s => {
            let kind = s.split(':').next().unwrap_or(s);
            return Err(Error::usage(format!(
                "-serial {s}: '{kind}' is not a supported serial backend here (stdio, file:PATH, null, none)"
            )));
        }
    }))
}

/// Parses the arguments after the program name.
pub fn parse_args(args: &[String]) -> Result<Parsed> {
    let mut cfg = VmConfig {
        mem_size: DEFAULT_MEM,
        smp: Smp::default(),
        kernel: None,
        initrd: None,
        append: String::new(),
        drives: Vec::new(),
        blk_devices: Vec::new(),
        iothreads: Vec::new(),
        serials: Vec::new(),
        name: None,
        uuid: None,
        no_reboot: false,
        no_shutdown: false,
        machine: MachineType::Q35,
        cpu: CpuModel::Named("qemu64".into()),
        rtc: RtcConfig {
            base: RtcBase::Utc,
            clock_vm: false,
        },
        nographic: false,
    };
    let mut snapshot = false;
    let mut raw_drives: Vec<(String, bool)> = Vec::new();
    let mut serial_given = false;
    let mut serial_args: Vec<String> = Vec::new();
    let mut positional_disk: Option<String> = None;
    let mut i = 0;
    while i < args.len() {
        let word = &args[i];
        i += 1;
        let Some(name) = word
            .strip_prefix("--")
            .or_else(|| word.strip_prefix('-'))
            .filter(|_| word.len() > 1)
        else {
            if positional_disk.is_none() {
                positional_disk = Some(word.clone());
                continue;
            }
            return Err(Error::usage(format!("{word}: invalid option")));
        };
        let value = if WITH_ARG.contains(&name) {
            let Some(v) = args.get(i) else {
                return Err(Error::usage(format!("-{name}: requires an argument")));
            };
            i += 1;
            v.clone()
        } else if FLAGS.contains(&name) {
            String::new()
        } else {
            return Err(Error::usage(format!("-{name}: invalid option")));
        };
        let opt = format!("-{name} {value}");
        match name {
            "h" | "help" => return Ok(Parsed::Exit(help::help_text())),
            "version" => return Ok(Parsed::Exit(help::version_text())),
            "enable-kvm" | "nodefaults" | "no-user-config" | "no-hpet" | "S" | "mem-prealloc"
            | "full-screen" | "no-acpi" => {}
            "accel" => {
                let kv = KeyVal::parse(&value, Some("accel"))
                    .map_err(|e| Error::usage(format!("{opt}: {e}")))?;
                match kv.get("accel") {
                    Some("kvm") | None => {}
                    Some(other) => {
                        return Err(Error::usage(format!(
                            "{opt}: invalid accelerator {other}: only kvm is available"
                        )))
                    }
                }
            }
            "machine" | "M" => {
                let kv = KeyVal::parse(&value, Some("type"))
                    .map_err(|e| Error::usage(format!("{opt}: {e}")))?;
                if let Some(t) = kv.get("type") {
                    cfg.machine = match t {
                        "help" | "?" => {
                            return Ok(Parsed::Exit(
                                "Supported machines are:\npc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-10.0)\nq35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-10.0)\n".into(),
                            ))
                        }
                        t if t == "pc" || t.starts_with("pc-i440fx") => MachineType::Pc,
                        t if t == "q35" || t.starts_with("pc-q35") => MachineType::Q35,
                        t => {
                            return Err(Error::usage(format!(
                                "{opt}: unsupported machine type: \"{t}\"\nUse -machine help to list supported machines"
                            )))
                        }
                    };
                }
                if let Some(a) = kv.get("accel") {
                    if a != "kvm" {
                        return Err(Error::usage(format!(
                            "{opt}: invalid accelerator {a}: only kvm is available"
                        )));
                    }
                }
            }
            "cpu" => {
                let model = value.split(',').next().unwrap_or("");
                cfg.cpu = match model {
                    "host" | "max" => CpuModel::Host,
                    "help" | "?" => {
                        return Ok(Parsed::Exit(
                            "Available CPUs:\n  host\n  max\n  qemu64\n  kvm64\n".into(),
                        ))
                    }
                    m => CpuModel::Named(m.to_string()),
                };
            }
            "smp" => cfg.smp = parse_smp(&value)?,
            "m" => cfg.mem_size = parse_mem(&value)?,
            "kernel" => cfg.kernel = Some(PathBuf::from(value)),
            "initrd" => cfg.initrd = Some(PathBuf::from(value)),
            "append" => cfg.append = value,
            "drive" => raw_drives.push((value, false)),
            "hda" | "hdb" | "hdc" | "hdd" => {
                let idx = (name.as_bytes()[2] - b'a') as u32;
                raw_drives.push((format!("file={},index={idx}", value.replace(',', ",,")), false));
            }
            "cdrom" => raw_drives.push((
                format!("file={},index=2,media=cdrom", value.replace(',', ",,")),
                false,
            )),
            "fda" | "fdb" => {
                return Err(Error::usage(format!(
                    "{opt}: machine type does not support if=floppy: only if=virtio and if=none drives exist on this machine"
                )))
            }
            "device" => cfg.blk_devices.push(drive::parse_device(&value)?),
            "object" => {
                let kv = KeyVal::parse(&value, Some("qom-type"))
                    .map_err(|e| Error::usage(format!("{opt}: {e}")))?;
                match kv.get("qom-type") {
                    Some("iothread") => {
                        let id = kv.get("id").ok_or_else(|| {
                            Error::usage(format!("{opt}: Parameter 'id' is missing"))
                        })?;
                        cfg.iothreads.push(id.to_string());
                    }
                    Some(t) => {
                        return Err(Error::usage(format!("{opt}: invalid object type: {t}")))
                    }
                    None => return Err(Error::usage(format!("{opt}: Parameter 'qom-type' is missing"))),
                }
            }
            "serial" => {
                serial_given = true;
                serial_args.push(value);
            }
            "nographic" => cfg.nographic = true,
            "display" => {
                let kind = value.split(',').next().unwrap_or("");
                if kind != "none" {
                    return Err(Error::usage(format!(
                        "{opt}: Display '{kind}' is not available; use -display none or -nographic"
                    )));
                }
            }
            "vga" => {
                if value != "none" {
                    return Err(Error::usage(format!(
                        "{opt}: VGA '{value}' is not available; use -vga none"
                    )));
                }
            }
            "nic" | "net" => {
                if value != "none" {
                    return Err(Error::usage(format!(
                        "{opt}: network devices are not available; use -nic none"
                    )));
                }
            }
            "monitor" | "parallel" => {
                if value != "none" {
                    return Err(Error::usage(format!("{opt}: only 'none' is supported")));
                }
            }
            "name" => {
                let kv = KeyVal::parse(&value, Some("guest"))
                    .map_err(|e| Error::usage(format!("{opt}: {e}")))?;
                cfg.name = kv.get("guest").map(str::to_string);
            }
            "uuid" => {
                cfg.uuid = Some(parse_uuid(&value).ok_or_else(|| {
                    Error::usage("Fail to parse UUID string. Wrong format.")
                })?);
            }
            "rtc" => parse_rtc(&value, &mut cfg.rtc)?,
            "no-reboot" => cfg.no_reboot = true,
            "no-shutdown" => cfg.no_shutdown = true,
            "snapshot" => snapshot = true,
            "boot" | "k" | "msg" | "overcommit" | "sandbox" | "action" | "global" | "smbios"
            | "L" | "bios" | "D" | "d" | "trace" | "pidfile" => {
                // Accepted for compatibility: they do not change a direct kernel boot.
                if name == "pidfile" {
                    std::fs::write(&value, format!("{}\n", std::process::id()))
                        .map_err(Error::io(format!("Failed to write PID file {value}")))?;
                }
            }
            _ => {
                return Err(Error::usage(format!(
                    "-{name}: option not supported by rqemu-system-x86_64"
                )))
            }
        }
    }
    if let Some(disk) = positional_disk {
        raw_drives.insert(
            0,
            (format!("file={},index=0", disk.replace(',', ",,")), true),
        );
    }
    for (n, (arg, _)) in raw_drives.iter().enumerate() {
        cfg.drives.push(drive::parse_drive(arg, n, snapshot)?);
    }
    // A drive's position is checked before its ID, as in QEMU.
    let mut seen_index = std::collections::HashSet::new();
    for d in &cfg.drives {
        if let Some(i) = d.index {
            if !seen_index.insert(i) {
                return Err(Error::usage(format!(
                    "{}: drive with bus=0, unit={} (index={}) exists",
                    d.opt, i, i
                )));
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    for d in &cfg.drives {
        if !seen.insert(d.id.clone()) {
            return Err(Error::usage(format!(
                "{}: Duplicate ID '{}' for drive",
                d.opt, d.id
            )));
        }
    }
    for dev in &cfg.blk_devices {
        match cfg.drives.iter().find(|d| d.id == dev.drive) {
            None => {
                return Err(Error::usage(format!(
                    "{}: Property 'virtio-blk-pci.drive' can't find value '{}'",
                    dev.opt, dev.drive
                )))
            }
            Some(d) if d.interface != Interface::None => {
                return Err(Error::usage(format!(
                    "{}: Property 'virtio-blk-pci.drive' can't take value '{}': drive is already in use by another device",
                    dev.opt, dev.drive
                )))
            }
            _ => {}
        }
        if let Some(t) = &dev.iothread {
            if !cfg.iothreads.contains(t) {
                return Err(Error::usage(format!(
                    "{}: Property 'virtio-blk-pci.iothread' can't find value '{t}'",
                    dev.opt
                )));
            }
        }
    }
    for arg in &serial_args {
        if let Some(b) = parse_serial(arg)? {
            if cfg.serials.len() >= 4 {
                return Err(Error::usage(format!(
                    "-serial {arg}: too many serial ports"
                )));
            }
            cfg.serials.push(b);
        }
    }
    if !serial_given {
        cfg.serials.push(if cfg.nographic {
            SerialBackend::Stdio
        } else {
            SerialBackend::Null
        });
    }
    if cfg.smp.cpus == 0 {
        cfg.smp = Smp::default();
    }
    if cfg.kernel.is_none() {
        return Err(Error::usage(
            "no -kernel given: this machine boots Linux directly (-kernel bzImage [-initrd] [-append])",
        ));
    }
    if cfg.initrd.is_some() && cfg.kernel.is_none() {
        return Err(Error::usage("-initrd cannot be used without -kernel"));
    }
    let _ = bool_opt;
    Ok(Parsed::Run(Box::new(cfg)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    fn cfg(s: &str) -> VmConfig {
        match parse_args(&args(s)).unwrap() {
            Parsed::Run(c) => *c,
            Parsed::Exit(_) => panic!("exit"),
        }
    }

    #[test]
    fn smp_topology() {
        assert_eq!(parse_smp("4").unwrap().cores, 4);
        let s = parse_smp("cpus=2,sockets=2").unwrap();
        assert_eq!((s.sockets, s.cores, s.threads), (2, 1, 1));
        let s = parse_smp("2,maxcpus=4").unwrap();
        assert_eq!((s.cpus, s.maxcpus), (2, 4));
        assert!(parse_smp("cpus=3,sockets=2,cores=1").is_err());
        assert!(parse_smp("0").is_err());
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_mem("512").unwrap(), 512 << 20);
        assert_eq!(parse_mem("1G").unwrap(), 1 << 30);
        assert_eq!(parse_mem("size=2G,slots=2,maxmem=4G").unwrap(), 2 << 30);
    }

    #[test]
    fn whole_line() {
        let c = cfg("-enable-kvm -cpu host -smp 2 -m 1G -kernel bz -append console=ttyS0 -drive file=d.qcow2,if=virtio,cache=none,aio=native -nographic -uuid 12345678-1234-5678-9abc-def012345678 -snapshot");
        assert_eq!(c.smp.cpus, 2);
        assert_eq!(c.mem_size, 1 << 30);
        assert_eq!(c.serials, vec![SerialBackend::Stdio]);
        assert!(c.drives[0].open.snapshot);
        assert_eq!(c.uuid.unwrap()[0], 0x12);
        let c = cfg("-kernel bz disk.img -hdb b.img");
        assert_eq!(c.drives[0].open.filename, "disk.img");
        assert_eq!(c.drives[1].index, Some(1));
        assert_eq!(c.serials, vec![SerialBackend::Null]);
    }

    /// The remaining options of the manuals' -drive and machine lines, as QEMU takes them.
    #[test]
    fn drive_and_machine_options() {
        let c = cfg(
            "-kernel bz -m 256M -smp 2,maxcpus=4 -cdrom cd.iso -hda a.img \
            -drive file=b.img,if=virtio,index=3,addr=0x9,detect-zeroes=on,throttling.iops-total=50 \
            -drive file=c.img,if=virtio,bus=1,unit=1,media=cdrom \
            -serial file:/tmp/ttyS0.log -serial null -display none -vga none -name vm1 \
            -rtc base=localtime,clock=rt -no-reboot",
        );
        assert_eq!(c.mem_size, 256 << 20);
        assert_eq!((c.smp.cpus, c.smp.maxcpus), (2, 4));
        let drive = |file: &str| c.drives.iter().find(|d| d.open.filename == file).unwrap();
        let cd = drive("cd.iso");
        assert!(cd.cdrom && cd.open.read_only);
        assert_eq!(drive("a.img").index, Some(0));
        let b = drive("b.img");
        assert_eq!((b.index, b.addr), (Some(3), Some(9)));
        assert_eq!(b.open.detect_zeroes, rqemu_block::options::DetectZeroes::On);
        assert_eq!(b.throttle.iops_total, 50);
        let m = drive("c.img");
        assert_eq!((m.id.as_str(), m.index), ("virtio1", Some(1)));
        assert!(m.cdrom && m.open.read_only);
        // As QEMU says it.
        let e = |s: &str| parse_args(&args(s)).unwrap_err().to_string();
        assert_eq!(
            e("-kernel bz -drive file=x,if=virtio,index=1,unit=0"),
            "-drive file=x,if=virtio,index=1,unit=0: index cannot be used with bus and unit"
        );
        assert_eq!(
            e("-kernel bz -drive file=x,if=virtio,index=3 -drive file=y,if=virtio,index=3"),
            "-drive file=y,if=virtio,index=3: drive with bus=0, unit=3 (index=3) exists"
        );
        assert_eq!(
            c.serials,
            vec![
                SerialBackend::File("/tmp/ttyS0.log".into()),
                SerialBackend::Null
            ]
        );
        assert_eq!(c.name.as_deref(), Some("vm1"));
        assert_eq!(c.rtc.base, RtcBase::LocalTime);
        assert!(c.no_reboot);
    }

    #[test]
    fn rtc_and_uuid() {
        let mut r = RtcConfig {
            base: RtcBase::Utc,
            clock_vm: false,
        };
        parse_rtc("base=2006-06-17T16:01:21,clock=vm", &mut r).unwrap();
        assert_eq!(r.base, RtcBase::Fixed(1150560081));
        assert!(parse_rtc("base=2006-13-01", &mut r).is_err());
        assert!(parse_uuid("1234").is_none());
    }

    #[test]
    fn errors() {
        let e = parse_args(&args("-kernel bz -bogus"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "-bogus: invalid option");
        let e = parse_args(&args("-kernel bz -uuid x"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "Fail to parse UUID string. Wrong format.");
        let e = parse_args(&args(
            "-kernel bz -drive file=x,if=none,id=d -device virtio-blk-pci,drive=e",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("can't find value 'e'"), "{e}");
    }
}
