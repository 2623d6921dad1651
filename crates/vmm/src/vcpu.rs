//! vCPU threads: each runs `KVM_RUN` and dispatches port and MMIO exits to the buses;
//! system events and triple faults become stop requests. The main thread stops a vCPU by
//! setting the stop flag and signalling the thread, which makes `KVM_RUN` return.

use std::sync::Arc;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::Mutex;

use crate::devices::bus::{lock, Control, PioBus, StopReason};
use crate::pci::PciRoot;

/// What vCPU exits are dispatched to.
pub struct Buses {
    /// Port I/O.
    pub pio: PioBus,
    /// MMIO: the PCI devices' BARs.
    pub pci: Arc<Mutex<PciRoot>>,
}

/// The signal that kicks a vCPU out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick signal's handler (once per process).
pub fn install_kick_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler);
    });
}

/// Runs vCPU `fd` until the machine stops.
pub fn run(mut fd: VcpuFd, index: u32, buses: Arc<Buses>, control: Arc<Control>) {
    while !control.is_stopping() {
        match fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => buses.pio.read(port, data),
                VcpuExit::IoOut(port, data) => buses.pio.write(port, data),
                VcpuExit::MmioRead(addr, data) => {
                    let pci = lock(&buses.pci);
                    if !pci.mmio_read(addr, data) {
                        data.fill(0xff);
                    }
                }
                VcpuExit::MmioWrite(addr, data) => {
                    let pci = lock(&buses.pci);
                    pci.mmio_write(addr, data);
                }
                VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr => {}
                VcpuExit::Shutdown => control.request(StopReason::Reset),
                VcpuExit::SystemEvent(kind, _) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => control.request(StopReason::PowerOff),
                    KVM_SYSTEM_EVENT_RESET => control.request(StopReason::Reset),
                    KVM_SYSTEM_EVENT_CRASH => {
                        control.request(StopReason::Error(format!("vCPU {index}: guest crashed")))
                    }
                    _ => {}
                },
                VcpuExit::FailEntry(reason, _) => control.request(StopReason::Error(format!(
                    "KVM: entry failed, hardware error 0x{reason:x}"
                ))),
                VcpuExit::InternalError => control.request(StopReason::Error(format!(
                    "KVM internal error on vCPU {index}"
                ))),
                other => control.request(StopReason::Error(format!(
                    "vCPU {index}: unexpected exit {other:?}"
                ))),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                control.request(StopReason::Error(format!("vCPU {index}: KVM_RUN: {e}")));
            }
        }
    }
}
