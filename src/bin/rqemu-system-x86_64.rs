//! The `rqemu-system-x86_64` binary.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    std::process::exit(rqemu_vmm::run(args));
}
