//! Building and running the machine.
//!
//! [`run`] opens what lives for the whole process (KVM, I/O threads, disks, serial back
//! ends), then boots: a KVM VM with in-kernel irqchip and PIT, guest RAM split around the
//! PCI hole, ACPI and SMBIOS tables, the kernel, the legacy devices, the PCI bus with one
//! virtio-blk per disk, and one thread per vCPU. When the guest resets, the VM is torn
//! down and built again over the same disks; power-off, `-no-reboot` resets, Ctrl-a x and
//! SIGINT/SIGTERM end the process after the disks are flushed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::arch::{acpi, boot, cpuid, layout, regs, smbios};
use crate::config::{Interface, MachineType, SerialBackend, VmConfig};
use crate::devices::acpi_pm::{AcpiPm, ResetControl};
use crate::devices::bus::{lock, Control, PioBus, StopReason};
use crate::devices::i8042::I8042;
use crate::devices::rtc::Rtc;
use crate::devices::serial::{self, IrqTrigger, SerialPort, COM_PORTS};
use crate::error::{Error, Result};
use crate::iothread::IoThread;
use crate::pci::{PciData, PciRoot};
use crate::vcpu::{self, Buses};
use crate::virtio::blk::{Blk, Disk};
use crate::virtio::msix::MsiSink;
use crate::virtio::pci::{VirtioPci, BAR_SIZE};

/// Default virtqueue size (QEMU's).
const DEFAULT_QUEUE_SIZE: u16 = 256;

static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_term_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
}

fn install_term_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_term_signal as *const () as libc::sighandler_t);
        }
    }
}

/// One virtio disk to build at each boot.
struct DiskPlan {
    disk: Arc<Disk>,
    queues: usize,
    queue_size: u16,
    slot: Option<u8>,
    runtime: tokio::runtime::Handle,
}

struct SerialSlot {
    port: u16,
    irq: u32,
    dev: Arc<Mutex<SerialPort>>,
    evt: EventFd,
}

fn open_disks(
    cfg: &VmConfig,
    main_io: &IoThread,
    iothreads: &HashMap<String, IoThread>,
) -> Result<(Vec<DiskPlan>, Vec<rqemu_block::BlockBackend>)> {
    let default_queues = (cfg.smp.cpus as usize).clamp(1, 64);
    let mut opened = HashMap::new();
    for d in &cfg.drives {
        let backend = main_io
            .handle()
            .block_on(rqemu_block::BlockBackend::open(&d.open))
            .map_err(|e| Error::Drive {
                opt: d.opt.clone(),
                msg: e.to_string(),
            })?;
        opened.insert(d.id.clone(), backend);
    }
    let mut virtio: Vec<_> = cfg
        .drives
        .iter()
        .enumerate()
        .filter(|(_, d)| d.interface == Interface::Virtio)
        .collect();
    virtio.sort_by_key(|(n, d)| (d.index.is_none(), d.index, *n));
    let mut plans = Vec::new();
    for (_, d) in virtio {
        let Some(backend) = opened.get(&d.id) else {
            continue;
        };
        plans.push(DiskPlan {
            disk: Arc::new(Disk::new(
                backend.clone(),
                d.serial.as_deref(),
                d.throttle,
                None,
                d.ignore_errors,
            )),
            queues: default_queues,
            queue_size: DEFAULT_QUEUE_SIZE,
            slot: d.addr,
            runtime: main_io.handle().clone(),
        });
    }
    for dev in &cfg.blk_devices {
        let (Some(d), Some(backend)) = (
            cfg.drives.iter().find(|d| d.id == dev.drive),
            opened.get(&dev.drive),
        ) else {
            continue;
        };
        let runtime = match &dev.iothread {
            Some(id) => iothreads
                .get(id)
                .map(|t| t.handle().clone())
                .unwrap_or_else(|| main_io.handle().clone()),
            None => main_io.handle().clone(),
        };
        let serial = dev.serial.as_deref().or(d.serial.as_deref());
        plans.push(DiskPlan {
            disk: Arc::new(Disk::new(
                backend.clone(),
                serial,
                d.throttle,
                dev.write_cache,
                d.ignore_errors,
            )),
            queues: dev.num_queues.map(usize::from).unwrap_or(default_queues),
            queue_size: dev.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE),
            slot: dev.addr.or(d.addr),
            runtime,
        });
    }
    let all = cfg
        .drives
        .iter()
        .filter_map(|d| opened.get(&d.id).cloned())
        .collect();
    Ok((plans, all))
}

fn build_serials(cfg: &VmConfig) -> Result<Vec<SerialSlot>> {
    let mut out = Vec::new();
    for (i, backend) in cfg.serials.iter().enumerate() {
        let (port, irq) = COM_PORTS[i];
        let evt = EventFd::new(0).map_err(Error::io("cannot create an eventfd"))?;
        let trigger = IrqTrigger(
            evt.try_clone()
                .map_err(Error::io("cannot clone an eventfd"))?,
        );
        let dev = Arc::new(Mutex::new(SerialPort(Serial::new(
            trigger,
            serial::writer(backend)?,
        ))));
        out.push(SerialSlot {
            port,
            irq,
            dev,
            evt,
        });
    }
    Ok(out)
}

/// Builds and runs the machine; returns the process's exit status.
pub fn run(cfg: VmConfig, prog: &str) -> Result<i32> {
    let kvm = Kvm::new().map_err(|e| {
        Error::KvmOpen(
            std::io::Error::from_raw_os_error(e.errno())
                .to_string()
                .split(" (os error")
                .next()
                .unwrap_or("")
                .to_string(),
        )
    })?;
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!(
            "{prog}: warning: /dev/kvm is kvm_pvm: only PVM-enabled guest kernels run at native speed"
        );
    }
    vcpu::install_kick_handler();
    install_term_handlers();

    let main_io = IoThread::spawn("main")?;
    let mut iothreads = HashMap::new();
    for id in &cfg.iothreads {
        iothreads.insert(id.clone(), IoThread::spawn(id)?);
    }
    let (disks, backends) = open_disks(&cfg, &main_io, &iothreads)?;
    let serials = build_serials(&cfg)?;
    let quit = Arc::new(AtomicBool::new(false));
    if cfg.nographic {
        serial::raw_terminal();
    }
    if let Some(i) = cfg.serials.iter().position(|s| *s == SerialBackend::Stdio) {
        serial::spawn_stdin_reader(serials[i].dev.clone(), quit.clone(), cfg.nographic);
    }

    let result = loop {
        let control = Control::new();
        match boot(&kvm, &cfg, &disks, &serials, &control, &quit) {
            Err(e) => break Err(e),
            Ok(StopReason::PowerOff) => break Ok(0),
            Ok(StopReason::Reset) if cfg.no_reboot => break Ok(0),
            Ok(StopReason::Reset) => continue,
            Ok(StopReason::Quit(msg)) => {
                if !msg.is_empty() {
                    eprintln!("{prog}: {msg}");
                }
                break Ok(0);
            }
            Ok(StopReason::Error(msg)) => {
                eprintln!("{prog}: {msg}");
                break Ok(1);
            }
        }
    };
    drop(disks);
    // Completed writes become durable and cached metadata reaches the images (under
    // cache=unsafe too, where only the flush is skipped).
    for backend in backends {
        main_io.handle().block_on(async move {
            let _ = backend.flush().await;
            let _ = backend.close().await;
        });
    }
    serial::restore_terminal();
    result
}

fn boot(
    kvm: &Kvm,
    cfg: &VmConfig,
    disks: &[DiskPlan],
    serials: &[SerialSlot],
    control: &Arc<Control>,
    quit: &AtomicBool,
) -> Result<StopReason> {
    let vm: Arc<VmFd> = Arc::new(
        kvm.create_vm()
            .map_err(Error::kvm("failed to create the VM"))?,
    );
    vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
        .map_err(Error::kvm("KVM_SET_TSS_ADDR"))?;
    let _ = vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS);
    vm.create_irq_chip()
        .map_err(Error::kvm("KVM_CREATE_IRQCHIP"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(Error::kvm("KVM_CREATE_PIT2"))?;

    let mem = GuestMemoryMmap::from_ranges(&layout::ram_regions(cfg.mem_size)).map_err(|e| {
        Error::Memory {
            what: "pc.ram",
            msg: e.to_string(),
        }
    })?;
    let mem = Arc::new(mem);
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Memory {
                what: "pc.ram",
                msg: e.to_string(),
            })?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping of `region.len()` bytes owned by `mem`,
        // which outlives the VM: the VM is dropped at the end of this function, after every
        // user of `mem` (vCPU threads, devices) has been stopped and dropped.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }

    let smp = cfg.smp;
    let apic_ids: Vec<u32> = (0..smp.cpus).map(|i| cpuid::apic_id(&smp, i)).collect();
    let q35 = cfg.machine == MachineType::Q35;
    let rsdp = acpi::write_tables(&mem, &apic_ids, q35)?;
    let (product, version) = if q35 {
        ("Standard PC (Q35 + ICH9, 2009)", "pc-q35-10.0")
    } else {
        ("Standard PC (i440FX + PIIX, 1996)", "pc-i440fx-10.0")
    };
    smbios::write_tables(&mem, cfg.uuid, product, version)?;
    let kernel = cfg
        .kernel
        .as_deref()
        .ok_or_else(|| Error::usage("no -kernel given"))?;
    let loaded = boot::load_linux(
        &mem,
        cfg.mem_size,
        kernel,
        cfg.initrd.as_deref(),
        &cfg.append,
        rsdp,
    )?;

    let mut pio = PioBus::default();
    for s in serials {
        vm.register_irqfd(&s.evt, s.irq)
            .map_err(Error::kvm("KVM_IRQFD"))?;
        pio.insert(s.port, 8, s.dev.clone());
    }
    pio.insert(0x60, 5, Arc::new(Mutex::new(I8042::new(control.clone()))));
    pio.insert(
        0x70,
        2,
        Arc::new(Mutex::new(Rtc::new(&cfg.rtc, cfg.mem_size))),
    );
    pio.insert(
        layout::ACPI_PM_PORT,
        12,
        Arc::new(Mutex::new(AcpiPm::new(control.clone()))),
    );
    pio.insert(
        layout::RESET_PORT,
        1,
        Arc::new(Mutex::new(ResetControl::new(control.clone()))),
    );
    let pci = Arc::new(Mutex::new(PciRoot::new(q35)));
    pio.insert(0xcf8, 1, pci.clone());
    pio.insert(0xcfc, 4, Arc::new(Mutex::new(PciData(pci.clone()))));
    let mut bar = layout::PCI_MMIO_START;
    for d in disks {
        let blk = Blk::new(d.disk.clone(), d.queues, d.queue_size, d.runtime.clone());
        let sink: Arc<dyn MsiSink> = vm.clone();
        let dev = VirtioPci::new(
            Box::new(blk),
            bar as u32,
            mem.clone(),
            Some(vm.clone()),
            sink,
        )
        .map_err(Error::io("cannot create a virtio device"))?;
        bar += u64::from(BAR_SIZE);
        let mut root = lock(&pci);
        let slot = d
            .slot
            .filter(|s| *s != 0)
            .or_else(|| root.free_slot())
            .ok_or_else(|| Error::usage("no free PCI slot left"))?;
        if !root.insert(slot, Arc::new(Mutex::new(dev))) {
            return Err(Error::usage(format!(
                "PCI: slot {slot} function 0 not available for virtio-blk-pci, in use by another device"
            )));
        }
    }
    let buses = Arc::new(Buses { pio, pci });

    let base_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::new();
    for i in 0..smp.cpus {
        let fd = vm
            .create_vcpu(u64::from(apic_ids[i as usize]))
            .map_err(Error::kvm("KVM_CREATE_VCPU"))?;
        let id = cpuid::vcpu_cpuid(&base_cpuid, &smp, i, &cfg.cpu);
        fd.set_cpuid2(&id).map_err(Error::kvm("KVM_SET_CPUID2"))?;
        regs::setup_msrs(&fd)?;
        regs::setup_fpu(&fd)?;
        regs::setup_lint(&fd)?;
        if i == 0 {
            regs::setup_boot_regs(&fd, loaded.entry, loaded.pvh)?;
            regs::setup_boot_sregs(&fd, &mem, loaded.pvh)?;
        }
        vcpus.push(fd);
    }
    let mut threads = Vec::new();
    for (i, fd) in vcpus.into_iter().enumerate() {
        let (b, c) = (buses.clone(), control.clone());
        let t = std::thread::Builder::new()
            .name(format!("CPU {i}/KVM"))
            .spawn(move || vcpu::run(fd, i as u32, b, c))
            .map_err(Error::io("cannot start a vCPU thread"))?;
        threads.push(t);
    }

    let reason = loop {
        if let Some(r) = control.wait_timeout(Duration::from_millis(100)) {
            break r;
        }
        let sig = SIGNAL.swap(0, Ordering::SeqCst);
        if sig != 0 {
            control.request(StopReason::Quit(format!("terminating on signal {sig}")));
        }
        if quit.swap(false, Ordering::SeqCst) {
            control.request(StopReason::Quit(String::new()));
        }
    };
    while threads.iter().any(|t| !t.is_finished()) {
        for t in threads.iter().filter(|t| !t.is_finished()) {
            let _ = t.kill(vcpu::kick_signal());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    for t in threads {
        let _ = t.join();
    }
    for s in serials {
        let _ = vm.unregister_irqfd(&s.evt, s.irq);
    }
    // Devices go first (their queues stop), then the VM, then guest memory.
    drop(buses);
    drop(vm);
    drop(mem);
    Ok(reason)
}
