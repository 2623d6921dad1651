//! x86-64 specifics: where things live in guest memory ([`layout`]), what the vCPUs
//! report ([`cpuid`]) and start with ([`regs`]), how Linux is loaded ([`boot`], [`unpack`], [`pvh`]), and the
//! firmware tables the guest reads ([`acpi`], [`smbios`]).

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod pvh;
pub mod regs;
pub mod smbios;
pub mod unpack;
