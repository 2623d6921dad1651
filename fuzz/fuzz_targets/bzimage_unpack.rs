//! Fuzzes the VMM's bzImage unpacking with arbitrary bytes as a kernel image: the setup
//! header, the compressed payload, the ELF and program headers inside it and the
//! relocation table after it, loaded into a small guest memory with and without KASLR.
//! Any input must be refused or loaded: never a panic, a hang or a claimed-size
//! allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    rqemu_vmm::arch::unpack::fuzz_one(data);
});
