//! The guest-physical memory map.
//!
//! ```text
//! 0x0000_0500  GDT            0x0000_7000  zero page (boot_params)
//! 0x0000_9000  page tables    0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA (reserved)
//! 0x000e_0000  ACPI tables    0x000f_0000  SMBIOS
//! 0x0010_0000  kernel         ... initrd at the top of low RAM
//! RAM up to 3 GiB, then the PCI hole: 32-bit BARs from 0xc000_0000,
//! IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000; RAM above 3 GiB continues at 4 GiB.
//! ```

use vm_memory::GuestAddress;

/// GDT of the boot vCPU state.
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty IDT.
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux zero page.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables (PML4, PDPT, PD).
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages covering the first GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line accepted.
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the extended BIOS data area (reserved in E820).
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first).
pub const ACPI_START: u64 = 0xe0000;
/// SMBIOS entry point and tables.
pub const SMBIOS_START: u64 = 0xf0000;
/// Where the 32/64-bit kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// End of low RAM: the 32-bit PCI hole starts here.
pub const MEM_32BIT_GAP_START: u64 = 0xc000_0000;
/// RAM above the hole continues here.
pub const RAM_64BIT_START: u64 = 1 << 32;
/// First address of the 32-bit PCI MMIO window.
pub const PCI_MMIO_START: u64 = MEM_32BIT_GAP_START;
/// End (exclusive) of the 32-bit PCI MMIO window.
pub const PCI_MMIO_END: u64 = 0xfec0_0000;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (three pages) just below 4 GiB, out of the guest's way.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity map page (Intel, real-mode emulation).
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// ACPI power-management block (PM1a event, PM1a control, PM timer) in port space.
pub const ACPI_PM_PORT: u16 = 0x600;
/// Reset control register (port 0xcf9), also the ACPI reset register.
pub const RESET_PORT: u16 = 0xcf9;
/// The ACPI SCI's interrupt.
pub const SCI_IRQ: u32 = 9;

/// The guest RAM regions for `mem_size` bytes, split around the PCI hole.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    let low = mem_size.min(MEM_32BIT_GAP_START);
    let mut regions = vec![(GuestAddress(0), low as usize)];
    if mem_size > MEM_32BIT_GAP_START {
        regions.push((
            GuestAddress(RAM_64BIT_START),
            (mem_size - MEM_32BIT_GAP_START) as usize,
        ));
    }
    regions
}

/// E820 entry type: usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 entry type: reserved.
pub const E820_RESERVED: u32 = 2;

/// The E820 map for `mem_size` bytes of RAM: (address, length, type).
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let low = mem_size.min(MEM_32BIT_GAP_START);
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xa0000 - EBDA_START, E820_RESERVED),
        (0xe0000, 0x20000, E820_RESERVED),
        (HIMEM_START, low - HIMEM_START, E820_RAM),
    ];
    if mem_size > MEM_32BIT_GAP_START {
        map.push((RAM_64BIT_START, mem_size - MEM_32BIT_GAP_START, E820_RAM));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_around_the_hole() {
        assert_eq!(ram_regions(1 << 30).len(), 1);
        let r = ram_regions(4 << 30);
        assert_eq!(r[1], (GuestAddress(1 << 32), 1 << 30));
        let e = e820_map(4 << 30);
        let ram: u64 = e.iter().filter(|x| x.2 == E820_RAM).map(|x| x.1).sum();
        assert_eq!(ram, (4 << 30) - (HIMEM_START - EBDA_START));
    }
}
