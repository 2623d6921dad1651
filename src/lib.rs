//! Helpers for the cross-check tests in `tests/`: locating rqemu's binaries and QEMU's,
//! scratch directories on a RAM-backed file system, and running commands.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The directory holding the binaries of the build the tests belong to.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("test executable lives in target/<profile>/deps")
}

/// Path of one of rqemu's binaries (`rqemu-img`, `rqemu-io`, ...).
pub fn bin(name: &str) -> PathBuf {
    target_dir().join(name)
}

/// Whether a QEMU tool is installed.
pub fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Whether the installed qemu-img is QEMU 10 (exact-output comparisons need it).
pub fn qemu_is_10() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("version 10."))
        .unwrap_or(false)
}

pub use rqemu_block::testing::{skip, strict, STRICT_VAR};

/// Whether qemu-img and qemu-io are installed; [`skip`]s when not.
#[track_caller]
pub fn need_qemu() -> bool {
    if have("qemu-img") && have("qemu-io") {
        return true;
    }
    skip("qemu-img/qemu-io (qemu-utils) not installed");
    false
}

/// Whether the installed qemu-img is QEMU 10 (exact output comparisons need it);
/// [`skip`]s when not.
#[track_caller]
pub fn need_qemu_10() -> bool {
    if qemu_is_10() {
        return true;
    }
    skip("exact output comparison needs qemu-img 10");
    false
}

/// Whether `tool` is installed; [`skip`]s when not, naming `why`.
#[track_caller]
pub fn need_tool(tool: &str, why: &str) -> bool {
    if have(tool) {
        return true;
    }
    skip(&format!("{tool} not installed ({why})"));
    false
}

/// Returns from the calling test unless qemu-img and qemu-io are installed (see
/// [`need_qemu`]).
#[macro_export]
macro_rules! require_qemu {
    () => {
        if !$crate::need_qemu() {
            return;
        }
    };
}

/// A scratch directory, removed when dropped. Lives on /dev/shm when it exists, so the
/// shared disk's noise stays out of the tests.
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// Creates a fresh scratch directory.
    pub fn new(tag: &str) -> Scratch {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = base.join(format!("rqemu-test-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create scratch dir");
        Scratch { path }
    }

    /// A path inside the directory.
    pub fn file(&self, name: &str) -> String {
        self.path.join(name).to_string_lossy().into_owned()
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Runs a program with arguments and returns its output.
pub fn run<S: AsRef<std::ffi::OsStr>>(prog: impl AsRef<std::ffi::OsStr>, args: &[S]) -> Output {
    Command::new(prog.as_ref())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {:?}: {e}", prog.as_ref()))
}

/// Runs a program and panics with its output unless it succeeds; returns stdout.
pub fn run_ok<S: AsRef<std::ffi::OsStr>>(prog: impl AsRef<std::ffi::OsStr>, args: &[S]) -> String {
    let o = run(prog.as_ref(), args);
    assert!(
        o.status.success(),
        "{:?} {:?} failed ({}):\nstdout: {}\nstderr: {}",
        prog.as_ref(),
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>(),
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `qemu-img` output with the parts that legitimately differ filtered: timing figures of
/// qemu-io and the program name prefix.
pub fn normalize(s: &str) -> String {
    s.lines()
        .map(|l| {
            let l = l
                .strip_prefix("rqemu-img:")
                .map(|r| format!("qemu-img:{r}"))
                .or_else(|| l.strip_prefix("rqemu-io:").map(|r| format!("qemu-io:{r}")))
                .unwrap_or_else(|| l.to_string());
            if let Some(i) = l.find(" ops; ") {
                format!("{} ops; <timing>", &l[..i])
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asserts `qemu-img check` finds no errors and no leaks in `img`.
pub fn assert_qemu_check_clean(img: &str) {
    let o = run("qemu-img", &["check", img]);
    assert!(
        o.status.success(),
        "qemu-img check {img} failed ({}):\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The guest-visible content of an image, as qemu-img reads it (converted to raw).
pub fn qemu_raw_content(img: &str, scratch: &Scratch) -> Vec<u8> {
    let out = scratch.file("content.raw");
    let _ = std::fs::remove_file(&out);
    run_ok("qemu-img", &["convert", "-U", "-O", "raw", img, &out]);
    let data = std::fs::read(&out).expect("read converted image");
    let _ = std::fs::remove_file(&out);
    data
}
