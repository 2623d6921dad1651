//! Linux direct boot: the kernel (bzImage; or an ELF vmlinux, entered through PVH when it
//! carries the PVH entry note, else at its 64-bit entry point), the initrd at the top of
//! low RAM, the command line, and the zero page with the E820 map and the RSDP address
//! (plus, for PVH, the `hvm_start_info` of [`super::pvh`]).

use std::fs::File;
use std::io::Seek;
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;
use super::unpack::Unpacking;
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
const LOADFLAG_KASLR: u8 = 0x02;
const LOADFLAG_CAN_USE_HEAP: u8 = 0x80;
/// End of the identity map the 64-bit entry starts with (see [`super::regs`]).
const IDENTITY_MAPPED_END: u64 = 1 << 30;

/// The kernel as loaded.
struct Kernel {
    entry: u64,
    /// The bzImage's setup header (none for an ELF).
    header: Option<setup_header>,
    /// End of the kernel's memory: the initrd goes above.
    end: u64,
    pvh: bool,
    /// Placed at random by the VMM (the zero page's `KASLR_FLAG`).
    kaslr: bool,
}

/// Loads the kernel, initrd and command line, and writes the zero page.
///
/// A bzImage that [`unpack`](super::unpack) understands is unpacked by the VMM straight
/// into place (the initrd first, at the top of low RAM, the kernel below it); any other
/// kernel is loaded as it is.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: u64,
) -> Result<LoadedKernel> {
    let low_end = mem_size.min(MEM_32BIT_GAP_START);
    let mut file = File::open(kernel).map_err(|e| kernel_error(kernel, e))?;
    let initrd = initrd
        .map(|path| {
            std::fs::read(path).map(|data| (path, data)).map_err(|e| {
                Error::Boot(format!("could not load initrd '{}': {e}", path.display()))
            })
        })
        .transpose()?;
    let initrd = initrd.as_ref().map(|(p, d)| (*p, d.as_slice()));
    let kaslr = !cmdline.split_ascii_whitespace().any(|w| w == "nokaslr");
    let mut unpacked = None;
    if let Some(u) = Unpacking::open(&file) {
        let header = u.header;
        let min = u.default_phys() + u.size();
        // (Where that leaves no room, the bzImage is loaded as it is.)
        if let Ok(placed_initrd) = place_initrd(mem, initrd, Some(&header), low_end, min) {
            // The kernel stays below the initrd and inside the boot page tables' map.
            let limit = placed_initrd
                .map_or(low_end, |(addr, _)| addr)
                .min(IDENTITY_MAPPED_END);
            if let Some(p) = u.load(mem, limit, kaslr) {
                let k = Kernel {
                    entry: p.entry,
                    header: Some(header),
                    end: p.end,
                    pvh: false,
                    kaslr: p.kaslr,
                };
                unpacked = Some((k, placed_initrd));
            }
        }
    }
    let (k, loaded_initrd) = match unpacked {
        Some(done) => done,
        None => {
            let k = load_image(mem, kernel, &mut file)?;
            let placed = place_initrd(mem, initrd, k.header.as_ref(), low_end, k.end)?;
            (k, placed)
        }
    };
    let (entry, header, pvh) = (k.entry, k.header, k.pvh);

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

    if let Some((addr, size)) = loaded_initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if k.kaslr {
        params.hdr.loadflags |= LOADFLAG_KASLR;
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

/// The error for a kernel file that cannot be loaded.
fn kernel_error(kernel: &Path, why: impl std::fmt::Display) -> Error {
    Error::Boot(format!(
        "could not load kernel '{}': {why}",
        kernel.display()
    ))
}

/// Loads the kernel file `file` (named `kernel`) as it is: a bzImage (which
/// decompresses itself), or an ELF vmlinux.
fn load_image(mem: &GuestMemoryMmap, kernel: &Path, file: &mut File) -> Result<Kernel> {
    let kerr = |e| kernel_error(kernel, e);
    file.rewind().map_err(kerr)?;
    match BzImage::load(mem, None, file, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => Ok(Kernel {
            entry: r.kernel_load.0 + 0x200,
            header: r.setup_header,
            end: r.kernel_end,
            pvh: false,
            kaslr: false,
        }),
        Err(bz_err) => {
            file.rewind().map_err(kerr)?;
            let r = Elf::load(mem, None, file, Some(GuestAddress(HIMEM_START)))
                .map_err(|_| kernel_error(kernel, bz_err))?;
            let (entry, pvh) = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(at) => (at.0, true),
                _ => (r.kernel_load.0, false),
            };
            Ok(Kernel {
                entry,
                header: None,
                end: r.kernel_end,
                pvh,
                kaslr: false,
            })
        }
    }
}

/// Puts the initrd at the top of low RAM (below the header's `initrd_addr_max`), above
/// `min`; returns its address and size.
fn place_initrd(
    mem: &GuestMemoryMmap,
    initrd: Option<(&Path, &[u8])>,
    header: Option<&setup_header>,
    low_end: u64,
    min: u64,
) -> Result<Option<(u64, u64)>> {
    let Some((path, data)) = initrd else {
        return Ok(None);
    };
    let max = match header.map(|h| h.initrd_addr_max) {
        Some(m) if m != 0 => u64::from(m).min(low_end - 1),
        _ => low_end - 1,
    };
    let size = data.len() as u64;
    let addr = (max + 1)
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= min.max(HIMEM_START))
        .ok_or_else(|| {
            Error::Boot(format!(
                "initrd '{}' does not fit in guest memory (try a larger -m)",
                path.display()
            ))
        })?;
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|e| Error::Boot(format!("cannot write the initrd: {e}")))?;
    Ok(Some((addr, size)))
}
