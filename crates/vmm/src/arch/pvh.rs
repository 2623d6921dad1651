//! The PVH boot protocol (Xen's HVM direct boot, which Linux supports with CONFIG_PVH):
//! an ELF kernel whose `XEN_ELFNOTE_PHYS32_ENTRY` note names a 32-bit entry point is
//! entered there in flat protected mode, paging off, with `ebx` holding the address of an
//! `hvm_start_info` that gives the command line, the initrd (as module 0), the RSDP and
//! the memory map.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{e820_map, CMDLINE_START};
use crate::error::{Error, Result};

/// Where `hvm_start_info` goes (below the zero page, above the GDT/IDT).
pub const START_INFO: u64 = 0x6000;
/// The module list (one entry: the initrd).
const MODLIST: u64 = 0x6040;
/// The memory map.
const MEMMAP: u64 = 0x6080;
/// `XEN_HVM_START_MAGIC_VALUE`.
const MAGIC: u32 = 0x336e_c578;
/// Room for memory map entries before the zero page at 0x7000.
const MAX_MEMMAP: usize = (0x7000 - MEMMAP as usize) / 24;

fn put<T: vm_memory::ByteValued>(mem: &GuestMemoryMmap, at: u64, v: T) -> Result<()> {
    mem.write_obj(v, GuestAddress(at))
        .map_err(|e| Error::Memory {
            what: "PVH start info",
            msg: e.to_string(),
        })
}

/// Writes `hvm_start_info` (version 1), the module list and the memory map.
pub fn write_start_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<()> {
    let map = e820_map(mem_size);
    if map.len() > MAX_MEMMAP {
        return Err(Error::Boot("PVH memory map too large".into()));
    }
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        let at = MEMMAP + 24 * i as u64;
        put(mem, at, *addr)?;
        put(mem, at + 8, *size)?;
        put(mem, at + 16, *kind)?;
        put(mem, at + 20, 0u32)?;
    }
    if let Some((addr, size)) = initrd {
        put(mem, MODLIST, addr)?;
        put(mem, MODLIST + 8, size)?;
        put(mem, MODLIST + 16, 0u64)?;
        put(mem, MODLIST + 24, 0u64)?;
    }
    put(mem, START_INFO, MAGIC)?;
    put(mem, START_INFO + 4, 1u32)?; // version
    put(mem, START_INFO + 8, 0u32)?; // flags
    put(mem, START_INFO + 12, u32::from(initrd.is_some()))?; // nr_modules
    put(
        mem,
        START_INFO + 16,
        if initrd.is_some() { MODLIST } else { 0 },
    )?;
    put(mem, START_INFO + 24, CMDLINE_START)?;
    put(mem, START_INFO + 32, rsdp)?;
    put(mem, START_INFO + 40, MEMMAP)?;
    put(mem, START_INFO + 48, map.len() as u32)?;
    put(mem, START_INFO + 52, 0u32)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_info_layout() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        write_start_info(&mem, 512 << 20, Some((0x1000_0000, 0x1234)), 0xe0000).unwrap();
        let r32 = |a: u64| mem.read_obj::<u32>(GuestAddress(a)).unwrap();
        let r64 = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(r32(START_INFO), MAGIC);
        assert_eq!(r32(START_INFO + 12), 1);
        assert_eq!(r64(START_INFO + 16), MODLIST);
        assert_eq!(r64(MODLIST + 8), 0x1234);
        assert_eq!(r64(START_INFO + 32), 0xe0000);
        let n = r32(START_INFO + 48) as u64;
        assert!(n >= 2);
        // The last RAM entry ends at the top of memory.
        let ram_end = (0..n)
            .filter(|i| r32(MEMMAP + 24 * i + 16) == 1)
            .map(|i| r64(MEMMAP + 24 * i) + r64(MEMMAP + 24 * i + 8))
            .max();
        assert_eq!(ram_end, Some(512 << 20));
    }
}
