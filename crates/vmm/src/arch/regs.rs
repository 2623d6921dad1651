//! The boot vCPU's starting state for Linux's 64-bit boot protocol: long mode with an
//! identity map of the first GiB, a flat GDT with `__BOOT_CS` (0x10) and `__BOOT_DS`
//! (0x18), `rsi` at the zero page; or for PVH: flat 32-bit protected mode without paging,
//! `ebx` at the start info. Plus FPU, MSR and local APIC defaults for every vCPU.

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;
use crate::error::{Error, Result};

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 0 {
            raw_limit
        } else {
            (raw_limit << 12) | 0xfff
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

fn mem_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> Error {
    move |e| Error::Memory {
        what,
        msg: e.to_string(),
    }
}

/// Writes the GDT and IDT and puts the boot vCPU in long mode with identity page tables,
/// or (`pvh`) in 32-bit protected mode without paging.
pub fn setup_boot_sregs(vcpu: &VcpuFd, mem: &GuestMemoryMmap, pvh: bool) -> Result<()> {
    let gdt = [
        0,
        0,
        if pvh {
            gdt_entry(0xc09b, 0, 0xfffff) // 0x10: 32-bit code
        } else {
            gdt_entry(0xa09b, 0, 0xfffff) // 0x10: 64-bit code
        },
        gdt_entry(0xc093, 0, 0xfffff), // 0x18: data
        gdt_entry(0x808b, 0, 0xfffff), // 0x20: TSS
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(mem_err("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(mem_err("IDT"))?;
    mem.write_obj(PDPTE_START | 3, GuestAddress(PML4_START))
        .map_err(mem_err("page tables"))?;
    mem.write_obj(PDE_START | 3, GuestAddress(PDPTE_START))
        .map_err(mem_err("page tables"))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
            .map_err(mem_err("page tables"))?;
    }
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    let code = segment_from_gdt(gdt[2], 2);
    let data = segment_from_gdt(gdt[3], 3);
    let tss = segment_from_gdt(gdt[4], 4);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    if pvh {
        sregs.cr0 = (sregs.cr0 | X86_CR0_PE) & !X86_CR0_PG;
        sregs.cr4 = 0;
        sregs.efer = 0;
        return vcpu.set_sregs(&sregs).map_err(Error::kvm("KVM_SET_SREGS"));
    }
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(Error::kvm("KVM_SET_SREGS"))
}

/// General registers at the kernel's 64-bit entry point (`rsi` at the zero page), or at
/// the PVH entry point (`rbx` at the start info).
pub fn setup_boot_regs(vcpu: &VcpuFd, entry: u64, pvh: bool) -> Result<()> {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    if pvh {
        regs.rsi = 0;
        regs.rbx = super::pvh::START_INFO;
    }
    vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))
}

/// x87 and SSE control words as after a reset.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(Error::kvm("KVM_SET_FPU"))
}

/// MSRs a firmware would set: fast strings enabled.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<()> {
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_MISC_ENABLE,
        data: 1,
        ..Default::default()
    }])
    .map_err(|e| Error::Vcpu(format!("MSR list: {e:?}")))?;
    vcpu.set_msrs(&msrs).map_err(Error::kvm("KVM_SET_MSRS"))?;
    Ok(())
}

fn lapic_reg(state: &kvm_lapic_state, off: usize) -> u32 {
    let b = &state.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        state.regs[off + i] = *b as _;
    }
}

/// LINT0 as ExtINT (the PIC's virtual wire) and LINT1 as NMI, as a BIOS leaves them.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<()> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    let mut state = vcpu.get_lapic().map_err(Error::kvm("KVM_GET_LAPIC"))?;
    let lvt0 = lapic_reg(&state, APIC_LVT0);
    set_lapic_reg(
        &mut state,
        APIC_LVT0,
        (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8),
    );
    let lvt1 = lapic_reg(&state, APIC_LVT1);
    set_lapic_reg(
        &mut state,
        APIC_LVT1,
        (lvt1 & !0x700) | (APIC_MODE_NMI << 8),
    );
    vcpu.set_lapic(&state).map_err(Error::kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_code_segment() {
        let s = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 2);
        assert_eq!(
            (s.selector, s.l, s.present, s.limit),
            (0x10, 1, 1, 0xffff_ffff)
        );
        assert_eq!(s.type_, 0xb);
    }
}
