//! What the `rqemu-img` cross-check tests share: running both tools on the same
//! arguments in a scratch directory (relative names, so both print the same file
//! names) and comparing exit status, stdout and stderr.

// Each test crate uses its own subset of these helpers.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

use rqemu::{bin, need_qemu, need_qemu_10};

/// Whether exact-output comparisons can run; skips (or fails a strict run) when not.
pub fn exact_qemu() -> bool {
    need_qemu() && need_qemu_10()
}

/// Runs a program with `args` in `dir`.
pub fn run_in(dir: &Path, prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running {prog}: {e}"))
}

/// Runs one of rqemu's binaries with `args` in `dir`.
pub fn rqemu(dir: &Path, tool: &str, args: &[&str]) -> Output {
    run_in(dir, &bin(tool).to_string_lossy(), args)
}

/// Exit status, stdout and stderr, with rqemu's program name read as QEMU's and
/// `bench`'s run time masked.
pub fn outcome(o: &Output) -> (Option<i32>, String, String) {
    let text = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .replace("rqemu-img", "qemu-img")
            .split_inclusive('\n')
            .map(|l| match l.strip_prefix("Run completed in ") {
                Some(_) => "Run completed in T seconds.\n".to_string(),
                None => l.to_string(),
            })
            .collect::<String>()
    };
    (o.status.code(), text(&o.stdout), text(&o.stderr))
}

/// `rqemu-img args` in `dir`, as [`outcome`] shows it.
pub fn rqemu_img(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    outcome(&rqemu(dir, "rqemu-img", args))
}

/// Asserts that qemu-img and rqemu-img answer `args` identically.
pub fn same(dir: &Path, args: &[&str]) {
    let q = outcome(&run_in(dir, "qemu-img", args));
    assert_eq!(rqemu_img(dir, args), q, "qemu-img {}", args.join(" "));
}

/// Runs a setup command, which must succeed; returns its stdout.
pub fn setup(dir: &Path, prog: &str, args: &[&str]) -> String {
    let o = run_in(dir, prog, args);
    assert!(o.status.success(), "{prog} {args:?}: {o:?}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `io_tool` (qemu-io or rqemu-io) with one `-c` per command on `img`.
pub fn io(dir: &Path, io_tool: &str, img: &str, cmds: &[&str]) -> String {
    let mut args = vec![];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(img);
    setup(dir, io_tool, &args)
}

/// Runs `qemu-img` with the whitespace-separated arguments of `line`, which must
/// succeed.
pub fn qemu_img(dir: &Path, line: &str) -> String {
    setup(
        dir,
        "qemu-img",
        &line.split_whitespace().collect::<Vec<_>>(),
    )
}

/// Builds `base.qcow2` (1 MiB: data, a zero cluster, a partial cluster) and
/// `top.qcow2` (2 MiB over it: data over both, a compressed cluster) with QEMU's tools.
pub fn chain(dir: &Path) {
    qemu_img(dir, "create -q -f qcow2 base.qcow2 1M");
    io(
        dir,
        "qemu-io",
        "base.qcow2",
        &[
            "write -P 1 0 64k",
            "write -z 128k 64k",
            "write -P 2 300k 10k",
        ],
    );
    qemu_img(
        dir,
        "create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 2M",
    );
    io(
        dir,
        "qemu-io",
        "top.qcow2",
        &["write -P 3 32k 64k", "write -c -P 4 1M 64k"],
    );
}
