//! The `rqemu-io` binary.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    std::process::exit(rqemu_io::run(args));
}
