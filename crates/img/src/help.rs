//! Help and version texts.

use rqemu_cli::outp;

/// The version line (QEMU's tools print their version first; rqemu reports the QEMU
/// release whose behaviour it follows).
pub fn print_version(prog: &str) {
    outp!(
        "{prog} version {} (rqemu, compatible with qemu-img 10.0)\n",
        env!("CARGO_PKG_VERSION")
    );
}

/// `rqemu-img --help`.
pub fn print_global(prog: &str) {
    print_version(prog);
    outp!(
        "Disk image tool of rqemu, command-compatible with qemu-img.\n\
\n\
Usage: {prog} [standard options] COMMAND [--help | command options]\n\
\n\
Standard options:\n\
  -h, --help       show this help and exit\n\
  -V, --version    show the version and exit\n\
\n\
Commands ({prog} COMMAND --help shows a command's options):\n\
  amend    change format-specific options of an image\n\
  bench    measure the speed of I/O on an image\n\
  bitmap   add, remove, clear, enable, disable or merge persistent bitmaps\n\
  check    check an image's metadata for consistency, and repair it\n\
  commit   write an overlay's data into its backing image\n\
  compare  compare the guest-visible contents of two images\n\
  convert  copy an image, converting its format\n\
  create   create a new image\n\
  dd       copy with dd's syntax\n\
  info     show what an image is and how it is made\n\
  map      show how guest ranges map to the image file\n\
  measure  compute the file size an image needs\n\
  rebase   change an image's backing file\n\
  resize   change an image's virtual size\n\
  snapshot list, create, apply or delete internal snapshots\n\
\n\
Formats: qcow2 raw\n"
    );
}

/// Prints a command's help text.
pub fn print_command(prog: &str, cmd: &str, synopsis: &str, body: &str) {
    outp!("Usage: {prog} {cmd} {synopsis}\n\n{body}");
}
