//! rqemu-system-x86_64: a KVM virtual machine monitor with QEMU's command line.
//!
//! The machine is built from rust-vmm crates (KVM, guest memory, kernel loading,
//! legacy devices, virtio queues); its disks are nodes of rqemu's block layer.
//!
//! - [`config`]: QEMU's command line turned into a [`config::VmConfig`].
//! - [`arch`]: x86 specifics: memory layout, CPUID, registers, Linux boot, ACPI, SMBIOS.
//! - [`devices`]: the port and MMIO buses and the legacy devices (UART, i8042, RTC, ACPI PM).
//! - [`pci`]: the PCI host bridge and configuration space.
//! - [`virtio`]: virtio-pci (modern, MSI-X) and virtio-blk over the block layer.
//! - [`machine`]: builds a machine from the configuration, runs its vCPUs, resets it.
#![warn(missing_docs)]

pub mod arch;
pub mod config;
pub mod devices;
pub mod error;
pub mod iothread;
pub mod machine;
pub mod pci;
pub mod vcpu;
pub mod virtio;

pub use error::{Error, Result};
/// Guest memory types, for users that drive devices directly (tests, fuzzing).
pub use vm_memory;

/// Runs `rqemu-system-x86_64` with `args` (the program name first); returns the exit status.
pub fn run(args: Vec<String>) -> i32 {
    let prog = args
        .first()
        .map(|a| {
            std::path::Path::new(a)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_else(|| a.clone())
        })
        .unwrap_or_else(|| "rqemu-system-x86_64".to_string());
    let cfg = match config::parse_args(&args[1.min(args.len())..]) {
        Ok(config::Parsed::Run(cfg)) => cfg,
        Ok(config::Parsed::Exit(text)) => {
            print!("{text}");
            return 0;
        }
        Err(e) => {
            eprintln!("{prog}: {e}");
            return 1;
        }
    };
    match machine::run(*cfg, &prog) {
        Ok(status) => status,
        Err(e) => {
            eprintln!("{prog}: {e}");
            1
        }
    }
}
