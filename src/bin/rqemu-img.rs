//! The `rqemu-img` binary.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    std::process::exit(rqemu_img::run(args));
}
