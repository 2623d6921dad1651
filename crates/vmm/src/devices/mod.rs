//! The machine's buses and legacy devices.
//!
//! - [`bus`]: port-I/O dispatch by address range, and the [`bus::Control`] through which
//!   devices ask for power-off or reset.
//! - [`serial`]: 16550 UARTs (vm-superio) on COM1..COM4 with their host back ends.
//! - [`i8042`]: the keyboard controller, enough for its reset line.
//! - [`rtc`]: the MC146818 CMOS clock.
//! - [`acpi_pm`]: the ACPI power-management block and the reset control register.

pub mod acpi_pm;
pub mod bus;
pub mod i8042;
pub mod rtc;
pub mod serial;
