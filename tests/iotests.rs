//! QEMU's own qemu-iotests against rqemu's binaries.
//!
//! The suite (QEMU 10.0.2's `tests/qemu-iotests`, from Debian's source package) is
//! fetched once into a cache directory by `tests/iotests/fetch.sh`. Each format of
//! [`FORMATS`] runs the tests `tests/iotests/expected.txt` says must pass, with
//! `qemu-img`, `qemu-io` (and `qemu-nbd` once rqemu has one) replaced by rqemu's
//! binaries under those names; any of them failing fails this test, with the test's diff
//! printed. Where the suite cannot be fetched, or the harness's own requirements are
//! missing, the test says so in one line and passes.
//!
//! Environment: `RQEMU_IOTESTS_SRC` (a `qemu-10.0.2` source tree to use as is),
//! `RQEMU_IOTESTS_CACHE` (where to fetch it; default `~/.cache/rqemu-iotests`),
//! `RQEMU_IOTESTS_ALL=1` (also run the tests listed as failing, to find new passes),
//! `RQEMU_IOTESTS=FMT:TEST,...` (run only these).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use rqemu::{bin, need_tool, skip};

/// The formats (and protocols) the suite runs for; a new one joins with its entries in
/// `expected.txt`.
const FORMATS: &[&str] = &["qcow2", "raw", "luks"];

/// Longest time one format's run may take.
const TIMEOUT_SECS: u32 = 1500;

/// What `expected.txt` says of one test.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Pass,
    Exclude(String),
    Todo(String),
}

fn expectations() -> BTreeMap<(String, String), Expect> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/iotests/expected.txt");
    let text = std::fs::read_to_string(&path).expect("tests/iotests/expected.txt");
    let mut map = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.splitn(4, char::is_whitespace);
        let (kind, fmt, test) = (parts.next(), parts.next(), parts.next());
        let reason = parts.next().unwrap_or("").trim().to_string();
        let (Some(kind), Some(fmt), Some(test)) = (kind, fmt, test) else {
            panic!("expected.txt:{}: malformed line", n + 1);
        };
        let e = match kind {
            "pass" => Expect::Pass,
            "exclude" => Expect::Exclude(reason),
            "todo" => Expect::Todo(reason),
            other => panic!("expected.txt:{}: unknown kind {other}", n + 1),
        };
        map.insert((fmt.to_string(), test.to_string()), e);
    }
    map
}

/// The QEMU source tree with the suite, fetching it when needed; `Err` says why not.
fn suite() -> Result<PathBuf, String> {
    let check = |p: &Path| p.join("tests/qemu-iotests/check").is_file();
    if let Ok(src) = std::env::var("RQEMU_IOTESTS_SRC") {
        let p = PathBuf::from(src);
        return if check(&p) {
            Ok(p)
        } else {
            Err(format!(
                "RQEMU_IOTESTS_SRC={} has no tests/qemu-iotests",
                p.display()
            ))
        };
    }
    let cache = std::env::var("RQEMU_IOTESTS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let home = std::env::var("HOME").unwrap_or_else(|_| "/tmp".into());
            Path::new(&home).join(".cache/rqemu-iotests")
        });
    let tree = cache.join("qemu-10.0.2");
    if !check(&tree) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/iotests/fetch.sh");
        let o = Command::new(&script)
            .arg(&cache)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !o.status.success() || !check(&tree) {
            let why = String::from_utf8_lossy(&o.stderr).trim().to_string();
            return Err(format!("cannot fetch QEMU's test suite ({why})"));
        }
    }
    Ok(tree)
}

/// One result line of `check`: the test, its outcome and the output up to the next one.
struct Outcome {
    result: String,
    output: String,
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else if c == '\r' {
            // Progress lines are overwritten in place: each becomes a line of its own.
            out.push('\n');
        } else {
            out.push(c);
        }
    }
    out
}

/// Splits `check`'s output into per-test outcomes.
fn parse_results(text: &str, tests: &[String]) -> BTreeMap<String, Outcome> {
    let mut out: BTreeMap<String, Outcome> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in strip_ansi(text).lines() {
        let mut words = line.split_whitespace();
        let (first, second) = (words.next(), words.next());
        if let (Some(t), Some(r)) = (first, second) {
            if tests.iter().any(|x| x == t) && matches!(r, "pass" | "fail" | "not") {
                let result = if r == "not" { "notrun" } else { r };
                out.insert(
                    t.to_string(),
                    Outcome {
                        result: result.to_string(),
                        output: String::new(),
                    },
                );
                current = Some(t.to_string());
                continue;
            }
        }
        if let Some(o) = current.as_ref().and_then(|c| out.get_mut(c)) {
            o.output.push_str(line);
            o.output.push('\n');
        }
    }
    out
}

/// A directory with `qemu-img`, `qemu-io` and `qemu-nbd` for the harness: rqemu's
/// binaries under QEMU's names (so messages carry the names the reference output has).
fn tool_dir(work: &Path) -> PathBuf {
    let dir = work.join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    let link = |name: &str, target: PathBuf| {
        let l = dir.join(name);
        let _ = std::fs::remove_file(&l);
        std::os::unix::fs::symlink(target, &l).unwrap();
    };
    link("qemu-img", bin("rqemu-img"));
    link("qemu-io", bin("rqemu-io"));
    let nbd = bin("rqemu-nbd");
    link(
        "qemu-nbd",
        if nbd.exists() {
            nbd
        } else {
            which("qemu-nbd").unwrap_or_else(|| PathBuf::from("/usr/bin/qemu-nbd"))
        },
    );
    dir
}

/// A directory with QEMU's own `qemu-img`, `qemu-io` and `qemu-nbd`: the reference a
/// failing test is run with again.
fn qemu_tool_dir(work: &Path) -> PathBuf {
    let dir = work.join("qemu-bin");
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["qemu-img", "qemu-io", "qemu-nbd"] {
        let l = dir.join(name);
        let _ = std::fs::remove_file(&l);
        if let Some(target) = which(name) {
            std::os::unix::fs::symlink(target, &l).unwrap();
        }
    }
    dir
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Runs `check` for one format over `tests`; returns its whole output.
fn run_check(src: &Path, tools: &Path, work: &Path, fmt: &str, tests: &[String]) -> String {
    let scratch = work.join(format!("scratch-{fmt}"));
    let sock = work.join(format!("sock-{fmt}"));
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::create_dir_all(&sock).unwrap();
    let abs = |p: PathBuf| p.to_string_lossy().into_owned();
    let o = Command::new("timeout")
        .arg(TIMEOUT_SECS.to_string())
        .arg("./check")
        .arg(format!("-{fmt}"))
        .args(tests)
        .current_dir(src.join("tests/qemu-iotests"))
        .env("QEMU_IMG_PROG", abs(tools.join("qemu-img")))
        .env("QEMU_IO_PROG", abs(tools.join("qemu-io")))
        .env("QEMU_NBD_PROG", abs(tools.join("qemu-nbd")))
        .env("QEMU_PROG", abs(which("qemu-system-x86_64").unwrap()))
        .env("QSD_PROG", abs(which("qemu-storage-daemon").unwrap()))
        .env("TEST_DIR", &scratch)
        .env("SOCK_DIR", &sock)
        .output()
        .expect("running qemu-iotests' check");
    let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&o.stderr));
    text
}

#[test]
fn qemu_iotests_pass() {
    let src = match suite() {
        Ok(s) => s,
        Err(why) => {
            skip(&format!("qemu-iotests: {why}"));
            return;
        }
    };
    for tool in ["qemu-system-x86_64", "qemu-storage-daemon", "qemu-nbd"] {
        if !need_tool(
            tool,
            "qemu-iotests' harness needs it; QEMU 10 from bookworm-backports",
        ) {
            return;
        }
    }
    let expect = expectations();
    let all = std::env::var("RQEMU_IOTESTS_ALL").is_ok_and(|v| v == "1");
    let only: Option<Vec<(String, String)>> = std::env::var("RQEMU_IOTESTS").ok().map(|v| {
        v.split(',')
            .filter_map(|s| s.split_once(':'))
            .map(|(f, t)| (f.to_string(), t.to_string()))
            .collect()
    });
    let work = std::env::temp_dir().join(format!("rqemu-iotests-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let tools = tool_dir(&work);
    let mut failures = Vec::new();
    let mut summary = Vec::new();
    for fmt in FORMATS {
        let selected: Vec<String> = expect
            .iter()
            .filter(|((f, _), e)| {
                f == fmt && (**e == Expect::Pass || (all && matches!(e, Expect::Todo(_))))
            })
            .map(|((_, t), _)| t.clone())
            .filter(|t| {
                only.as_ref()
                    .is_none_or(|o| o.iter().any(|(f, x)| f == fmt && x == t))
            })
            .collect();
        if selected.is_empty() {
            continue;
        }
        let text = run_check(&src, &tools, &work, fmt, &selected);
        let results = parse_results(&text, &selected);
        let mut passed = 0;
        let mut failed: Vec<(String, String)> = Vec::new();
        for t in &selected {
            let must = expect.get(&(fmt.to_string(), t.clone())) == Some(&Expect::Pass);
            match results.get(t) {
                Some(o) if o.result == "pass" => {
                    passed += 1;
                    if !must {
                        eprintln!(
                            "qemu-iotests: {fmt} {t} passes now: mark it `pass` in expected.txt"
                        );
                    }
                }
                Some(o) if must => failed.push((
                    t.clone(),
                    format!("{fmt} {t}: {}\n{}", o.result, o.output.trim_end()),
                )),
                None if must => failed.push((
                    t.clone(),
                    format!("{fmt} {t}: no result\n{}", text.trim_end()),
                )),
                _ => {}
            }
        }
        // A test that QEMU's own tools fail here as well depends on the machine (some
        // compare the host file system's allocation before and after a write): it is
        // reported, not counted against rqemu.
        if !failed.is_empty() {
            let names: Vec<String> = failed.iter().map(|(t, _)| t.clone()).collect();
            let qemu = qemu_tool_dir(&work);
            let reference = parse_results(&run_check(&src, &qemu, &work, fmt, &names), &names);
            for (t, msg) in failed {
                if reference.get(&t).is_some_and(|o| o.result != "pass") {
                    eprintln!(
                        "qemu-iotests: {fmt} {t} fails with QEMU's own tools on this machine too, \
                         not counted:\n{msg}"
                    );
                } else {
                    failures.push(msg);
                }
            }
        }
        let excluded = expect
            .iter()
            .filter(|((f, _), e)| f == fmt && !matches!(e, Expect::Pass))
            .count();
        summary.push(format!(
            "{fmt}: {passed}/{} passed ({excluded} not expected to pass)",
            selected.len()
        ));
    }
    let _ = std::fs::remove_dir_all(&work);
    eprintln!("qemu-iotests: {}", summary.join("; "));
    assert!(
        failures.is_empty(),
        "qemu-iotests failing:\n\n{}",
        failures.join("\n\n")
    );
}
