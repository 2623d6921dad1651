//! Fuzzes the virtio-blk request path with guest-controlled bytes: descriptor chains for
//! the request parser, and a virtqueue whose rings and descriptors live in arbitrary guest
//! memory, every request run against an in-memory disk. Any input must end in an error
//! status or a result: never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    rqemu_vmm::virtio::blk::fuzz::run_one(data);
});
