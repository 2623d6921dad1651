//! Linux direct boot: the kernel (bzImage; or an ELF vmlinux, entered through PVH when it
//! carries the PVH entry note, else at its 64-bit entry point), the initrd at the top of
//! low RAM, the command line, and the zero page with the E820 map and the RSDP address
//! (plus, for PVH, the `hvm_start_info` of [`super::pvh`]).

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;
use crate::error::{Error, Result};

/// Where the kernel was put and where the boot vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// The entry point: 64-bit, or PVH's 32-bit one.
    pub entry: u64,
    /// Entered through PVH (32-bit protected mode, `ebx` at the start info).
    pub pvh: bool,
}

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const LOADFLAG_LOADED_HIGH: u8 = 0x01;
const LOADFLAG_CAN_USE_HEAP: u8 = 0x80;

/// Loads the kernel, initrd and command line, and writes the zero page.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: u64,
) -> Result<LoadedKernel> {
    let kerr = |e: std::io::Error| {
        Error::Boot(format!("could not load kernel '{}': {e}", kernel.display()))
    };
    let mut file = File::open(kernel).map_err(kerr)?;
    let (entry, header, kernel_end, pvh) =
        match BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
            Ok(r) => (r.kernel_load.0 + 0x200, r.setup_header, r.kernel_end, false),
            Err(bz_err) => {
                let mut file = File::open(kernel).map_err(kerr)?;
                match Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
                    Ok(r) => match r.pvh_boot_cap {
                        PvhBootCapability::PvhEntryPresent(at) => (at.0, None, r.kernel_end, true),
                        _ => (r.kernel_load.0, None, r.kernel_end, false),
                    },
                    Err(_) => {
                        return Err(Error::Boot(format!(
                            "could not load kernel '{}': {bz_err}",
                            kernel.display()
                        )))
                    }
                }
            }
        };

    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    } else {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.loadflags |= LOADFLAG_LOADED_HIGH | LOADFLAG_CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    params.hdr.vid_mode = 0xffff;

    if cmdline.len() + 1 > CMDLINE_MAX_SIZE
        || (header.is_some() && cmdline.len() as u64 >= u64::from(params.hdr.cmdline_size.max(255)))
    {
        return Err(Error::Boot(format!(
            "kernel command line too long ({} bytes)",
            cmdline.len()
        )));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|e| Error::Boot(format!("cannot write the command line: {e}")))?;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = bytes.len() as u32;

    let low_end = mem_size.min(MEM_32BIT_GAP_START);
    let mut loaded_initrd = None;
    if let Some(path) = initrd {
        let data = std::fs::read(path)
            .map_err(|e| Error::Boot(format!("could not load initrd '{}': {e}", path.display())))?;
        let max = if header.is_some() && params.hdr.initrd_addr_max != 0 {
            u64::from(params.hdr.initrd_addr_max).min(low_end - 1)
        } else {
            low_end - 1
        };
        let size = data.len() as u64;
        let addr = (max + 1)
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|a| *a >= kernel_end.max(HIMEM_START))
            .ok_or_else(|| {
                Error::Boot(format!(
                    "initrd '{}' does not fit in guest memory (try a larger -m)",
                    path.display()
                ))
            })?;
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(|e| Error::Boot(format!("cannot write the initrd: {e}")))?;
        loaded_initrd = Some((addr, size));
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    params.acpi_rsdp_addr = rsdp;
    let map = e820_map(mem_size);
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|e| Error::Boot(format!("cannot write the zero page: {e}")))?;
    if pvh {
        super::pvh::write_start_info(mem, mem_size, loaded_initrd, rsdp)?;
    }
    Ok(LoadedKernel { entry, pvh })
}
