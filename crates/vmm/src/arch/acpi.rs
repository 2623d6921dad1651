//! ACPI tables: RSDP, XSDT, FADT (with the PM1a event/control blocks, the PM timer and the
//! reset register), FACS, MADT (one local APIC per vCPU, the IOAPIC, the SCI override)
//! and a DSDT with the PCI root bridge and the `\_S5` sleep type that powers off.

use acpi_tables::aml;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;
use crate::error::{Error, Result};

const OEM_ID: [u8; 6] = *b"RQEMU ";

/// The value of `\_S5`'s SLP_TYP that powers the machine off.
pub const SLP_TYP_S5: u16 = 5;
/// The reset register's value.
pub const RESET_VALUE: u8 = 6;

fn gas_io(sdt: &mut Sdt, offset: usize, port: u16, bits: u8) {
    sdt.write_u8(offset, 1); // system I/O space
    sdt.write_u8(offset + 1, bits);
    sdt.write_u8(offset + 2, 0);
    sdt.write_u8(
        offset + 3,
        if bits >= 32 {
            3
        } else if bits >= 16 {
            2
        } else {
            1
        },
    );
    sdt.write_u64(offset + 4, u64::from(port));
}

fn dsdt(machine_q35: bool) -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, *b"RQEMDSDT", 1);
    let mut body: Vec<u8> = Vec::new();
    let bus = aml::AddressSpace::new_bus_number(0u16, 0xffu16);
    let cfg_io = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = aml::AddressSpace::new_io(0u16, 0xcf7u16, None);
    let io_high = aml::AddressSpace::new_io(0xd00u16, 0xffffu16, None);
    let mmio = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO_START as u32,
        (PCI_MMIO_END - 1) as u32,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &cfg_io, &io_low, &io_high, &mmio]);
    let hid = aml::EISAName::new(if machine_q35 { "PNP0A08" } else { "PNP0A03" });
    let cid = aml::EISAName::new("PNP0A03");
    let zero = aml::ZERO;
    let hid_name = aml::Name::new("_HID".into(), &hid);
    let cid_name = aml::Name::new("_CID".into(), &cid);
    let adr = aml::Name::new("_ADR".into(), &zero);
    let seg = aml::Name::new("_SEG".into(), &zero);
    let uid = aml::Name::new("_UID".into(), &zero);
    let bbn = aml::Name::new("_BBN".into(), &zero);
    let crs_name = aml::Name::new("_CRS".into(), &crs);
    let pci0 = aml::Device::new(
        "_SB_.PCI0".into(),
        vec![&hid_name, &cid_name, &adr, &seg, &uid, &bbn, &crs_name],
    );
    pci0.to_aml_bytes(&mut body);
    let typ = SLP_TYP_S5 as u8;
    let zero_b = 0u8;
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&typ, &typ, &zero_b, &zero_b]),
    );
    s5.to_aml_bytes(&mut body);
    dsdt.append_slice(&body);
    dsdt
}

fn fadt(dsdt_addr: u64, facs_addr: u64) -> Sdt {
    let mut f = Sdt::new(*b"FACP", 276, 6, OEM_ID, *b"RQEMFACP", 1);
    f.write_u32(36, facs_addr as u32); // FIRMWARE_CTRL
    f.write_u32(40, dsdt_addr as u32); // DSDT
    f.write_u8(45, 0); // preferred PM profile: unspecified
    f.write_u16(46, SCI_IRQ as u16); // SCI_INT
                                     // SMI_CMD = 0: the machine is always in ACPI mode.
    f.write_u32(56, u32::from(ACPI_PM_PORT)); // PM1a_EVT_BLK
    f.write_u32(64, u32::from(ACPI_PM_PORT + 4)); // PM1a_CNT_BLK
    f.write_u32(76, u32::from(ACPI_PM_PORT + 8)); // PM_TMR_BLK
    f.write_u8(88, 4); // PM1_EVT_LEN
    f.write_u8(89, 2); // PM1_CNT_LEN
    f.write_u8(91, 4); // PM_TMR_LEN
    f.write_u16(96, 0x0fff); // P_LVL2_LAT: C2 unsupported
    f.write_u16(98, 0x0fff); // P_LVL3_LAT: C3 unsupported
                             // IAPC_BOOT_ARCH: legacy devices, no 8042 keyboard driver needed, no VGA.
    f.write_u16(109, 0x1 | (1 << 2));
    // Flags: WBINVD, power and sleep buttons absent, 32-bit PM timer, reset register.
    f.write_u32(112, 1 | (1 << 4) | (1 << 5) | (1 << 8) | (1 << 10));
    gas_io(&mut f, 116, RESET_PORT, 8); // RESET_REG
    f.write_u8(128, RESET_VALUE);
    f.write_u8(131, 3); // FADT minor version: 6.3
    f.write_u64(132, facs_addr); // X_FIRMWARE_CTRL
    f.write_u64(140, dsdt_addr); // X_DSDT
    gas_io(&mut f, 148, ACPI_PM_PORT, 32); // X_PM1a_EVT_BLK
    gas_io(&mut f, 172, ACPI_PM_PORT + 4, 16); // X_PM1a_CNT_BLK
    gas_io(&mut f, 208, ACPI_PM_PORT + 8, 32); // X_PM_TMR_BLK
    f.write_bytes(268, b"RQEMU\0\0\0"); // hypervisor vendor identity
    f
}

fn facs() -> Vec<u8> {
    let mut v = vec![0u8; 64];
    v[0..4].copy_from_slice(b"FACS");
    v[4..8].copy_from_slice(&64u32.to_le_bytes());
    v[32] = 2; // version
    v
}

fn madt(apic_ids: &[u32]) -> Sdt {
    let mut m = Sdt::new(*b"APIC", 44, 5, OEM_ID, *b"RQEMAPIC", 1);
    m.write_u32(36, APIC_START as u32);
    m.write_u32(40, 1); // PCAT_COMPAT: the 8259 PICs are present
    let mut body = Vec::new();
    for (uid, apic) in apic_ids.iter().enumerate() {
        body.extend_from_slice(&[0, 8, uid as u8, *apic as u8]);
        body.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    // IOAPIC id 0 (after the LAPIC ids it would clash with, Linux renumbers as needed).
    body.extend_from_slice(&[1, 12, 0, 0]);
    body.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    // SCI: ISA IRQ 9 is level-triggered, active high.
    body.extend_from_slice(&[2, 10, 0, SCI_IRQ as u8]);
    body.extend_from_slice(&SCI_IRQ.to_le_bytes());
    body.extend_from_slice(&0x000du16.to_le_bytes());
    // NMI on LINT1 of every processor.
    body.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    m.append_slice(&body);
    m
}

fn align(v: u64, a: u64) -> u64 {
    (v + a - 1) & !(a - 1)
}

/// Writes every table at [`ACPI_START`] and returns the RSDP's address.
pub fn write_tables(mem: &GuestMemoryMmap, apic_ids: &[u32], machine_q35: bool) -> Result<u64> {
    let werr = |e: vm_memory::GuestMemoryError| Error::Memory {
        what: "ACPI tables",
        msg: e.to_string(),
    };
    let rsdp_addr = ACPI_START;
    let xsdt_addr = ACPI_START + 0x40;
    let facs_addr = ACPI_START + 0x100;
    let fadt_addr = ACPI_START + 0x200;
    let madt_addr = align(fadt_addr + 276, 0x40);
    let madt = madt(apic_ids);
    let dsdt_addr = align(madt_addr + madt.len() as u64, 0x40);
    let dsdt = dsdt(machine_q35);
    let end = dsdt_addr + dsdt.len() as u64;
    if end > SMBIOS_START {
        return Err(Error::Memory {
            what: "ACPI tables",
            msg: "tables do not fit below the SMBIOS area".into(),
        });
    }
    let fadt = fadt(dsdt_addr, facs_addr);
    let mut xsdt = Sdt::new(*b"XSDT", 36, 1, OEM_ID, *b"RQEMXSDT", 1);
    let mut entries = Vec::new();
    entries.extend_from_slice(&fadt_addr.to_le_bytes());
    entries.extend_from_slice(&madt_addr.to_le_bytes());
    xsdt.append_slice(&entries);
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    let mut rsdp_bytes = Vec::new();
    rsdp.to_aml_bytes(&mut rsdp_bytes);
    mem.write_slice(&rsdp_bytes, GuestAddress(rsdp_addr))
        .map_err(werr)?;
    mem.write_slice(xsdt.as_slice(), GuestAddress(xsdt_addr))
        .map_err(werr)?;
    mem.write_slice(&facs(), GuestAddress(facs_addr))
        .map_err(werr)?;
    mem.write_slice(fadt.as_slice(), GuestAddress(fadt_addr))
        .map_err(werr)?;
    mem.write_slice(madt.as_slice(), GuestAddress(madt_addr))
        .map_err(werr)?;
    mem.write_slice(dsdt.as_slice(), GuestAddress(dsdt_addr))
        .map_err(werr)?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    #[test]
    fn tables_are_well_formed() {
        let d = dsdt(true);
        assert!(checksum_ok(d.as_slice()));
        assert_eq!(
            u32::from_le_bytes(d.as_slice()[4..8].try_into().unwrap()) as usize,
            d.len()
        );
        let body = &d.as_slice()[36..];
        assert!(body.windows(4).any(|w| w == b"_S5_"));
        assert!(body.windows(4).any(|w| w == b"PCI0"));
        let m = madt(&[0, 1]);
        assert!(checksum_ok(m.as_slice()));
        assert_eq!(m.len(), 44 + 16 + 12 + 10 + 6);
        let f = fadt(0x1000, 0x2000);
        assert!(checksum_ok(f.as_slice()));
        assert_eq!(f.len(), 276);
    }
}
