//! SMBIOS 3.0 tables: BIOS information (type 0), system information (type 1, with the
//! `-uuid` the guest reads from `/sys/class/dmi/id/product_uuid`) and the end marker.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::SMBIOS_START;
use crate::error::{Error, Result};

fn structure(out: &mut Vec<u8>, formatted: &[u8], strings: &[&str]) {
    out.extend_from_slice(formatted);
    if strings.is_empty() {
        out.extend_from_slice(&[0, 0]);
        return;
    }
    for s in strings {
        out.extend(s.bytes().filter(|b| *b != 0));
        out.push(0);
    }
    out.push(0);
}

/// The SMBIOS structure table.
pub fn tables(uuid: Option<[u8; 16]>, product: &str, version: &str) -> Vec<u8> {
    let mut t = Vec::new();
    let mut bios = vec![0u8, 0x18, 0, 0, 1, 2, 0x00, 0xe8, 3, 0];
    bios.extend_from_slice(&8u64.to_le_bytes()); // characteristics not supported
    bios.extend_from_slice(&[0, 0x08, 0, 0, 0xff, 0xff]); // virtual machine
    structure(&mut t, &bios, &["rqemu", version, "04/01/2014"]);

    let mut sys = vec![1u8, 0x1b, 1, 0, 1, 2, 3, 0];
    let mut id = uuid.unwrap_or([0; 16]);
    // SMBIOS 2.6+ stores the first three UUID fields little-endian.
    id[0..4].reverse();
    id[4..6].reverse();
    id[6..8].reverse();
    sys.extend_from_slice(&id);
    sys.extend_from_slice(&[6, 0, 0]); // woken by power switch; no SKU, no family
    structure(&mut t, &sys, &["QEMU", product, version]);

    structure(&mut t, &[127, 4, 2, 0], &[]);
    t
}

/// Writes the entry point at [`SMBIOS_START`] and the tables after it.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    uuid: Option<[u8; 16]>,
    product: &str,
    version: &str,
) -> Result<()> {
    let table = tables(uuid, product, version);
    let table_addr = SMBIOS_START + 0x100;
    let mut ep = vec![0u8; 24];
    ep[0..5].copy_from_slice(b"_SM3_");
    ep[6] = 24;
    ep[7] = 3; // version 3.0
    ep[8] = 0;
    ep[9] = 0;
    ep[10] = 1; // entry point revision
    ep[12..16].copy_from_slice(&(table.len() as u32).to_le_bytes());
    ep[16..24].copy_from_slice(&table_addr.to_le_bytes());
    let sum = ep.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    ep[5] = sum.wrapping_neg();
    let werr = |e: vm_memory::GuestMemoryError| Error::Memory {
        what: "SMBIOS",
        msg: e.to_string(),
    };
    mem.write_slice(&ep, GuestAddress(SMBIOS_START))
        .map_err(werr)?;
    mem.write_slice(&table, GuestAddress(table_addr))
        .map_err(werr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_is_stored_as_smbios_reads_it() {
        let uuid = crate::config::parse_uuid("12345678-9abc-def0-1122-334455667788").unwrap();
        let t = tables(Some(uuid), "p", "v");
        let sys = t.windows(2).position(|w| w == [1, 0x1b]).unwrap();
        assert_eq!(&t[sys + 8..sys + 12], &[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(
            &t[sys + 16..sys + 24],
            &[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]
        );
        assert!(t.ends_with(&[127, 4, 2, 0, 0, 0]));
    }
}
