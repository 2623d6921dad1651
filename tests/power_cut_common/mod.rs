//! The power-cut harness: a workload runs on a qcow2 image through a `blklogwrites`
//! node, which logs every write, discard and flush that reaches the image file; the log
//! is then replayed into the states a power cut could leave (see
//! `rqemu_block::filter::blklogwrites::replay`), and each state is checked:
//!
//! - `qemu-img check` finds no corruption (leaked clusters are allowed, as in QEMU);
//!   images with lazy refcounts are first repaired by opening them read-write, by rqemu
//!   or by QEMU in turn;
//! - the image opens in rqemu, and every guest sector reads as it was at the last
//!   checkpoint before the cut (a completed flush, recorded as a mark in the log) or as
//!   one of the values written to it since.
//!
//! Workloads are steps run in-process on rqemu's block layer (writes, zero writes,
//! discards, compressed writes, resizes, concurrent writes, checkpoints), or whole
//! `rqemu-img` commands run on a `json:` filename that puts the logging node under the
//! image; a command's states are checked against the image before and after it.

// Each test crate uses its own subset of these helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use rqemu::{bin, run_ok, Scratch};
use rqemu_block::filter::blklogwrites::log::{self, Log};
use rqemu_block::filter::blklogwrites::replay::{self, CrashState, Rng};
use rqemu_block::filter::blklogwrites::BlkLogWritesNode;
use rqemu_block::{BlockBackend, OpenOptions};

const SECTOR: u64 = 512;

/// One step of an in-process workload.
#[derive(Debug, Clone)]
pub enum Step {
    /// Writes `len` bytes at `off` (sector-aligned) with a fresh pattern.
    Write(u64, u64),
    /// Writes zeroes (deallocating where `unmap`).
    Zero(u64, u64, bool),
    /// Discards.
    Discard(u64, u64),
    /// Writes whole clusters compressed.
    Compressed(u64, u64),
    /// Runs writes (`Write` steps) concurrently.
    Parallel(Vec<(u64, u64)>),
    /// Grows (or shrinks) the image.
    Resize(u64),
    /// Flushes, then marks the log: everything before is now durable.
    Checkpoint,
}

/// What a checkpoint allows a guest sector to read.
struct Checkpoint {
    /// Guest content at the checkpoint.
    content: Vec<u8>,
    /// Sector-uniform writes since: `(first sector, count, value)`.
    since: Vec<(u64, u64, u8)>,
    /// For a whole command: the content it leaves, which any sector may already hold.
    after: Option<Vec<u8>>,
}

impl Checkpoint {
    fn new(content: Vec<u8>) -> Checkpoint {
        Checkpoint {
            content,
            since: Vec::new(),
            after: None,
        }
    }
}

/// The guest-visible content at each checkpoint, and what was written after it.
pub struct Model {
    /// Content now.
    cur: Vec<u8>,
    /// The checkpoints (index = mark label).
    checkpoints: Vec<Checkpoint>,
    /// A whole command: its log has no marks, its end is checkpoint 1.
    command: bool,
    next_value: u8,
}

impl Model {
    /// A model of an image reading `initial`, for in-process steps.
    pub fn new(initial: Vec<u8>) -> Model {
        Model {
            checkpoints: vec![Checkpoint::new(initial.clone())],
            cur: initial,
            command: false,
            next_value: 0,
        }
    }

    /// A model of a whole command that turns `before` into `after`.
    fn command(before: Vec<u8>, after: Vec<u8>) -> Model {
        let mut start = Checkpoint::new(before);
        start.after = Some(after.clone());
        Model {
            checkpoints: vec![start, Checkpoint::new(after.clone())],
            cur: after,
            command: true,
            next_value: 0,
        }
    }

    fn value(&mut self) -> u8 {
        self.next_value = self.next_value % 250 + 1;
        self.next_value
    }

    fn fill(&mut self, off: u64, len: u64, v: u8) {
        let end = (off + len).min(self.cur.len() as u64);
        if off < end {
            self.cur[off as usize..end as usize].fill(v);
        }
        for c in self.checkpoints.iter_mut() {
            c.since.push((off / SECTOR, len.div_ceil(SECTOR), v));
        }
    }

    fn resize(&mut self, size: u64) {
        self.cur.resize(size as usize, 0);
    }

    /// A checkpoint: returns its label.
    fn checkpoint(&mut self) -> String {
        self.checkpoints.push(Checkpoint::new(self.cur.clone()));
        (self.checkpoints.len() - 1).to_string()
    }

    /// Whether sector `s` holding `got` is allowed after checkpoint `mark`.
    fn allowed(&self, mark: usize, s: u64, got: &[u8]) -> bool {
        let at = (s * SECTOR) as usize;
        let c = &self.checkpoints[mark];
        let zero = got.iter().all(|&b| b == 0);
        let held = c.content.get(at..at + got.len());
        if held == Some(got) || (held.is_none() && zero) {
            return true;
        }
        if let Some(after) = &c.after {
            // What a command shrinks away may read as zeroes before the new size lands.
            if (at >= after.len() && zero) || after.get(at..at + got.len()) == Some(got) {
                return true;
            }
        }
        got.iter().all(|&b| b == got[0])
            && c.since
                .iter()
                .any(|&(f, n, v)| s >= f && s < f + n && v == got[0])
    }
}

/// A recorded workload: the image before it, the log, and the model.
pub struct Recording {
    /// What the workload was.
    pub name: String,
    dir: PathBuf,
    base: PathBuf,
    log_bytes: Vec<u8>,
    log: Log,
    model: Model,
    lazy: bool,
}

impl Recording {
    /// Entries in the log.
    pub fn log_len(&self) -> usize {
        self.log.ops.len()
    }
}

/// The `json:` filename of `img` opened through a blklogwrites node logging to `log`.
pub fn logged_spec(img: &Path, log: &Path) -> String {
    serde_json::json!({
        "driver": "qcow2",
        "file": {
            "driver": "blklogwrites",
            "file": {"driver": "file", "filename": img},
            "log": {"driver": "file", "filename": log},
        }
    })
    .to_string()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("test runtime")
}

/// The guest-visible content of the qcow2 image at `img`, read by rqemu.
pub fn read_image(img: &Path) -> Vec<u8> {
    runtime().block_on(async {
        let o = OpenOptions {
            filename: img.to_string_lossy().into_owned(),
            format: Some("qcow2".into()),
            read_only: true,
            force_share: true,
            ..Default::default()
        };
        let b = BlockBackend::open(&o)
            .await
            .unwrap_or_else(|e| panic!("rqemu cannot open {}: {e}", img.display()));
        let mut buf = vec![0u8; b.size() as usize];
        b.read(0, &mut buf)
            .await
            .unwrap_or_else(|e| panic!("rqemu cannot read {}: {e}", img.display()));
        let _ = b.close().await;
        buf
    })
}

fn find_logger(node: &rqemu_block::NodeRef) -> Option<rqemu_block::NodeRef> {
    if node.as_any().is::<BlkLogWritesNode>() {
        return Some(node.clone());
    }
    node.children().iter().find_map(|(_, c)| find_logger(c))
}

/// Creates a qcow2 image with `opts` in `s`, runs `steps` on it in-process through a
/// logging node, and returns the recording.
pub fn record_steps(s: &Scratch, name: &str, opts: &str, size: u64, steps: &[Step]) -> Recording {
    let dir = s.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("img.qcow2");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    let img_s = img.to_string_lossy().into_owned();
    let size_s = size.to_string();
    args.extend([img_s.as_str(), size_s.as_str()]);
    run_ok(bin("rqemu-img"), &args);
    let base = dir.join("base.qcow2");
    std::fs::copy(&img, &base).unwrap();
    let log_path = dir.join("log");
    std::fs::write(&log_path, b"").unwrap();
    let mut model = Model::new(vec![0; size as usize]);
    runtime().block_on(async {
        let o = OpenOptions {
            filename: format!("json:{}", logged_spec(&img, &log_path)),
            ..Default::default()
        };
        let b = BlockBackend::open(&o)
            .await
            .expect("open through blklogwrites");
        let logger = find_logger(b.root()).expect("the logging node");
        let logger = logger
            .as_any()
            .downcast_ref::<BlkLogWritesNode>()
            .expect("a blklogwrites node");
        for step in steps {
            match step {
                Step::Write(off, len) => {
                    let v = model.value();
                    b.write(*off, &vec![v; *len as usize], false).await.unwrap();
                    model.fill(*off, *len, v);
                }
                Step::Zero(off, len, unmap) => {
                    b.write_zeroes(*off, *len, *unmap).await.unwrap();
                    model.fill(*off, *len, 0);
                }
                Step::Discard(off, len) => {
                    b.discard_always(*off, *len).await.unwrap();
                    model.fill(*off, *len, 0);
                }
                Step::Compressed(off, len) => {
                    let v = model.value();
                    b.write_compressed(*off, &vec![v; *len as usize])
                        .await
                        .unwrap();
                    model.fill(*off, *len, v);
                }
                Step::Parallel(ws) => {
                    let bufs: Vec<(u64, Vec<u8>)> = ws
                        .iter()
                        .map(|&(off, len)| (off, vec![model.value(); len as usize]))
                        .collect();
                    let futs = bufs.iter().map(|(off, buf)| b.write(*off, buf, false));
                    for r in futures::future::join_all(futs).await {
                        r.unwrap();
                    }
                    for (off, buf) in &bufs {
                        model.fill(*off, buf.len() as u64, buf[0]);
                    }
                }
                Step::Resize(size) => {
                    b.truncate(*size, false, rqemu_block::Prealloc::Off)
                        .await
                        .unwrap();
                    model.resize(*size);
                }
                Step::Checkpoint => {
                    b.flush().await.unwrap();
                    logger.mark(&model.checkpoint()).await.unwrap();
                }
            }
        }
        b.close().await.unwrap();
    });
    assert_eq!(
        read_image(&img),
        model.cur,
        "{name}: the image after the workload"
    );
    finish(
        name,
        dir,
        base,
        log_path,
        model,
        opts.contains("lazy_refcounts=on"),
    )
}

fn finish(
    name: &str,
    dir: PathBuf,
    base: PathBuf,
    log_path: PathBuf,
    model: Model,
    lazy: bool,
) -> Recording {
    let log_bytes = std::fs::read(&log_path).unwrap();
    let log = log::parse(&log_bytes).unwrap_or_else(|e| panic!("{name}: the log: {e}"));
    Recording {
        name: name.to_string(),
        dir,
        base,
        log_bytes,
        log,
        model,
        lazy,
    }
}

/// Runs one command of rqemu's (`args[0]`: `rqemu-img`, `rqemu-io`) on an image
/// prepared by `prepare` (which gets the directory and returns the image to record),
/// with `{}` in `args` standing for the filename `spec` makes of the image and the log
/// (the image's `json:` filename through the logging node, for most). The command's states must read as the image
/// before or after it.
pub fn record_command(
    s: &Scratch,
    name: &str,
    prepare: impl FnOnce(&Path) -> PathBuf,
    spec: impl FnOnce(&Path, &Path) -> String,
    args: &[&str],
) -> Recording {
    let dir = s.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let img = prepare(&dir);
    let base = dir.join("base.qcow2");
    std::fs::copy(&img, &base).unwrap();
    let before = read_image(&img);
    let lazy = run_ok(bin("rqemu-img"), &["info", &img.to_string_lossy()])
        .contains("lazy refcounts: true");
    let log_path = dir.join("log");
    std::fs::write(&log_path, b"").unwrap();
    let spec = spec(&img, &log_path);
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            if *a == "{}" {
                spec.clone()
            } else {
                a.to_string()
            }
        })
        .collect();
    let (tool, args) = args.split_first().expect("a tool and its arguments");
    let o = Command::new(bin(tool))
        .args(args)
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{name}: {tool} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let model = Model::command(before, read_image(&img));
    let rec = finish(name, dir, base, log_path, model, lazy);
    assert!(
        matches!(rec.log.ops.last(), Some(log::Op::Flush)),
        "{name}: the command did not end with a flush"
    );
    rec
}

/// The label of the checkpoint a state is checked against.
fn checkpoint_of(rec: &Recording, cut: usize) -> usize {
    // A command's log has no marks: its end (a flush with nothing after it) is its
    // checkpoint.
    if rec.model.command {
        return usize::from(cut == rec.log.ops.len());
    }
    replay::last_mark(&rec.log, cut)
        .and_then(|m| m.parse().ok())
        .unwrap_or(0)
}

/// Checks one state; `Err` describes what is wrong.
fn check_state(
    rec: &Recording,
    state: &CrashState,
    work: &Path,
    turn: usize,
) -> Result<(), String> {
    let img = work.join("state.qcow2");
    replay::materialize(&rec.base, &img, &rec.log_bytes, state).map_err(|e| e.to_string())?;
    let img_s = img.to_string_lossy().into_owned();
    if rec.lazy {
        // The dirty bit is set: opening read-write repairs the refcounts.
        if turn.is_multiple_of(2) {
            runtime().block_on(async {
                let o = OpenOptions {
                    filename: img_s.clone(),
                    format: Some("qcow2".into()),
                    ..Default::default()
                };
                let b = BlockBackend::open(&o)
                    .await
                    .map_err(|e| format!("rqemu cannot open the state for repair: {e}"))?;
                b.close().await.map_err(|e| e.to_string())
            })?;
        } else {
            let o = Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", "flush", &img_s])
                .output()
                .map_err(|e| e.to_string())?;
            if !o.status.success() {
                return Err(format!(
                    "QEMU cannot open the state for repair: {}",
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
        }
    }
    let o = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", &img_s])
        .output()
        .map_err(|e| e.to_string())?;
    let mut code = o.status.code().unwrap_or(-1);
    let text = String::from_utf8_lossy(&o.stdout) + String::from_utf8_lossy(&o.stderr);
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("ERROR")).collect();
    if code == 2 && !errors.is_empty() && errors.iter().all(|l| l.contains("OFLAG_COPIED")) {
        // A snapshot operation changes a cluster's refcount and the COPIED flag of the L2
        // entry pointing at it in two writes: a cut between them leaves the flag stale
        // whichever goes first (QEMU's driver has the same window). The flag only saves
        // copy-on-write decisions, and the snapshot table names the new snapshot only
        // after both are durable; `check -r all` corrects it, and it must.
        let r = Command::new("qemu-img")
            .args(["check", "-q", "-r", "all", "-f", "qcow2", &img_s])
            .output()
            .map_err(|e| e.to_string())?;
        code = r.status.code().unwrap_or(-1);
    }
    if code != 0 && code != 3 {
        return Err(format!(
            "qemu-img check exits {code}:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    let got = std::panic::catch_unwind(|| read_image(&img))
        .map_err(|_| "rqemu cannot open or read the state".to_string())?;
    let mark = checkpoint_of(rec, state.cut);
    for (s, sector) in got.chunks(SECTOR as usize).enumerate() {
        if !rec.model.allowed(mark, s as u64, sector) {
            return Err(format!(
                "guest sector {s} (offset {}) reads {:?}.. which is neither its content at \
                 checkpoint {mark} nor anything written to it since",
                s as u64 * SECTOR,
                &sector[..8]
            ));
        }
    }
    Ok(())
}

/// How many states to check per recording.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// States at most (spread evenly over the log's cut points).
    pub states: usize,
    /// Random states per cut point besides the exhaustive ones.
    pub samples: usize,
    /// Writes after the last flush up to which every subset is checked.
    pub exhaustive: usize,
}

/// The states of `rec` under `budget`, spread over its cut points.
pub fn states(rec: &Recording, budget: Budget, seed: u64) -> Vec<CrashState> {
    let n = rec.log.ops.len();
    let mut rng = Rng::new(seed);
    let mut per_cut: Vec<Vec<CrashState>> = Vec::new();
    for cut in 0..=n {
        let mut v = replay::every_subset(&rec.log, cut, budget.exhaustive).unwrap_or_default();
        if replay::volatile_count(&rec.log, cut) > 0 {
            for _ in 0..budget.samples {
                v.push(replay::sample(&rec.log, cut, &mut rng));
            }
        }
        per_cut.push(v);
    }
    let all: Vec<CrashState> = per_cut.into_iter().flatten().collect();
    let total = all.len();
    if total <= budget.states {
        return all;
    }
    // Thinned evenly over the cut points: state i is kept when i * states / total
    // steps up.
    all.into_iter()
        .enumerate()
        .filter(|(i, _)| i * budget.states / total != (i + 1) * budget.states / total)
        .map(|(_, st)| st)
        .collect()
}

/// Checks `states` of `rec` on `threads` threads; returns how many were checked, or
/// panics with the first failure (its cut, its pieces and why).
pub fn check_states(rec: &Recording, states: &[CrashState], threads: usize) -> usize {
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|sc| {
        for t in 0..threads {
            let (next, failure) = (&next, &failure);
            sc.spawn(move || {
                let work = rec.dir.join(format!("t{t}"));
                std::fs::create_dir_all(&work).unwrap();
                // Backing files are found next to the image.
                for e in std::fs::read_dir(&rec.dir).unwrap().flatten() {
                    let p = e.path();
                    if p.is_file() && p != rec.base {
                        let _ = std::fs::copy(&p, work.join(e.file_name()));
                    }
                }
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= states.len() || failure.lock().unwrap().is_some() {
                        break;
                    }
                    if let Err(why) = check_state(rec, &states[i], &work, i) {
                        let st = &states[i];
                        *failure.lock().unwrap() = Some(format!(
                            "{}: power cut after {} of {} log entries ({} durable pieces, \
                             then {:?}): {why}",
                            rec.name,
                            st.cut,
                            rec.log.ops.len(),
                            st.durable,
                            &st.pieces[st.durable..]
                        ));
                    }
                }
            });
        }
    });
    if let Some(f) = failure.into_inner().unwrap() {
        panic!("{f}");
    }
    states.len()
}

/// Log entries by kind, for reports: writes, discards, flushes.
pub fn entry_counts(rec: &Recording) -> HashMap<&'static str, usize> {
    let mut m = HashMap::new();
    for op in &rec.log.ops {
        let k = match op {
            log::Op::Write { .. } => "writes",
            log::Op::Discard { .. } => "discards",
            log::Op::Flush => "flushes",
            log::Op::Mark(_) => "marks",
        };
        *m.entry(k).or_insert(0) += 1;
    }
    m
}
