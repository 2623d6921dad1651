//! Power-cut tests of the qcow2 driver: every workload is recorded through a
//! `blklogwrites` node and replayed into the states a power cut could leave (see
//! `power_cut_common`); in each, `qemu-img check` must find no corruption, the image must
//! open in rqemu and in QEMU, and every byte a completed flush covered must read back.
//!
//! `power_cut_states` checks a bounded sample of every workload (a few thousand states in
//! all); the ignored `power_cut_sweep` checks up to `RQEMU_POWER_CUT_STATES` states per
//! workload (10,000 by default, `RQEMU_POWER_CUT_SAMPLES` random ones per cut point
//! before thinning, 512 by default: over 100,000 in all), as `docs/reliability.md`
//! describes.

use std::path::{Path, PathBuf};

use rqemu::{need_qemu, Scratch};

mod power_cut_common;
use power_cut_common::{
    check_states, logged_spec, record_command, record_steps, states, Budget, Recording,
    Step::{self, *},
};

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

/// In-process workloads: (name, create options, virtual size, steps).
fn step_workloads() -> Vec<(&'static str, &'static str, u64, Vec<Step>)> {
    vec![
        (
            "allocating-writes",
            "",
            8 * M,
            vec![
                Write(0, 4 * K),
                Write(100 * K, 200 * K),
                Checkpoint,
                Write(64 * K, 64 * K),
                Write(1000 * K, 4 * K),
                Parallel(vec![
                    (2 * M, 64 * K),
                    (3 * M, 100 * K),
                    (5 * M + 512, 3 * K),
                ]),
                Checkpoint,
                Write(2 * M + 4 * K, 8 * K),
                Write(0, 512),
                Checkpoint,
            ],
        ),
        (
            // 512-byte clusters: an L2 table covers 32 KiB and a refcount block 64
            // clusters, so a few MiB of data grow the refcount table and allocate dozens of
            // L2 tables and refcount blocks.
            "l2-and-refcount-growth",
            "cluster_size=512,refcount_bits=64",
            4 * M,
            vec![
                Write(0, 256 * K),
                Checkpoint,
                Parallel(vec![
                    (512 * K, 128 * K),
                    (1024 * K, 128 * K),
                    (3 * M, 64 * K),
                ]),
                Write(1536 * K, 1024 * K),
                Checkpoint,
                Write(16 * K, 64 * K),
                Checkpoint,
            ],
        ),
        (
            // The L1 table of a 1 MiB image with 512-byte clusters holds 32 entries;
            // growing the image to 12 MiB moves it to a larger table.
            "l1-growth",
            "cluster_size=512",
            M,
            vec![
                Write(0, 64 * K),
                Checkpoint,
                Resize(12 * M),
                Write(11 * M, 64 * K),
                Checkpoint,
                Write(6 * M, 32 * K),
                Checkpoint,
            ],
        ),
        (
            "discard-and-zero-writes",
            "",
            8 * M,
            vec![
                Write(0, 1024 * K),
                Write(2 * M, 512 * K),
                Checkpoint,
                Discard(0, 128 * K),
                Zero(256 * K, 128 * K, true),
                Zero(2 * M, 64 * K, false),
                Checkpoint,
                Write(64 * K, 64 * K),
                Zero(2 * M + 100 * K, 8 * K, false),
                Discard(512 * K, 512 * K),
                Checkpoint,
            ],
        ),
        (
            "compressed-writes",
            "",
            8 * M,
            vec![
                Compressed(0, 64 * K),
                Compressed(64 * K, 64 * K),
                Checkpoint,
                Compressed(1024 * K, 64 * K),
                // A compressed cluster rewritten in part is copied out first.
                Write(16 * K, 4 * K),
                Compressed(2 * M, 64 * K),
                Checkpoint,
                Write(64 * K, 64 * K),
                Discard(1024 * K, 64 * K),
                Checkpoint,
            ],
        ),
        (
            "lazy-refcounts",
            "lazy_refcounts=on,cluster_size=4096",
            8 * M,
            vec![
                Write(0, 64 * K),
                Checkpoint,
                Write(M, 512 * K),
                Parallel(vec![(3 * M, 16 * K), (4 * M, 16 * K)]),
                Checkpoint,
                Discard(M, 256 * K),
                Write(6 * M, 12 * K),
                Checkpoint,
            ],
        ),
        (
            "subclusters",
            "extended_l2=on",
            8 * M,
            vec![
                Write(0, 2 * K),
                Write(8 * K, 4 * K),
                Checkpoint,
                Write(4 * K, 2 * K),
                Zero(16 * K, 4 * K, false),
                Checkpoint,
                Write(64 * K + 2 * K, 60 * K),
                Checkpoint,
            ],
        ),
    ]
}

fn qemu_io(dir: &Path, img: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(img);
    let o = std::process::Command::new("qemu-io")
        .args(&args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "qemu-io {args:?}: {o:?}");
}

fn qemu_img(dir: &Path, args: &[&str]) {
    let o = std::process::Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "qemu-img {args:?}: {o:?}");
}

/// An image written by QEMU: `opts`, data in a few places.
fn qemu_image(dir: &Path, name: &str, opts: &str) -> PathBuf {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([name, "8M"]);
    qemu_img(dir, &args);
    qemu_io(
        dir,
        name,
        &[
            "write -P 0x11 0 256k",
            "write -P 0x22 1M 64k",
            "write -P 0x33 3M 1M",
        ],
    );
    dir.join(name)
}

/// An image written by QEMU with a snapshot `s1`, then written again.
fn image_with_snapshot(dir: &Path) -> PathBuf {
    let img = qemu_image(dir, "img.qcow2", "");
    qemu_img(dir, &["snapshot", "-c", "s1", "img.qcow2"]);
    qemu_io(
        dir,
        "img.qcow2",
        &["write -P 0x44 0 128k", "write -P 0x55 5M 1M"],
    );
    img
}

fn plain(img: &Path, log: &Path) -> String {
    format!("json:{}", logged_spec(img, log))
}

/// Whole-command workloads: each builds its image with QEMU's tools, then runs one of
/// rqemu's commands on it through the logging node.
fn command_workloads(s: &Scratch) -> Vec<Recording> {
    type Prepare = fn(&Path) -> PathBuf;
    type Spec = fn(&Path, &Path) -> String;
    let table: [(&str, Prepare, Spec, &[&str]); 9] = [
        (
            "snapshot-create",
            |d| qemu_image(d, "img.qcow2", ""),
            plain,
            &["rqemu-img", "snapshot", "-c", "s1", "{}"],
        ),
        (
            "snapshot-apply",
            image_with_snapshot,
            plain,
            &["rqemu-img", "snapshot", "-a", "s1", "{}"],
        ),
        (
            "snapshot-delete",
            image_with_snapshot,
            plain,
            &["rqemu-img", "snapshot", "-d", "s1", "{}"],
        ),
        (
            "bitmap-store",
            |d| {
                let img = qemu_image(d, "img.qcow2", "");
                qemu_img(d, &["bitmap", "--add", "img.qcow2", "b0"]);
                img
            },
            plain,
            &[
                "rqemu-io",
                "-c",
                "write -P 0x66 64k 1M",
                "-c",
                "write -P 0x77 6M 64k",
                "{}",
            ],
        ),
        (
            "resize-grow",
            |d| qemu_image(d, "img.qcow2", "cluster_size=4096"),
            plain,
            &["rqemu-img", "resize", "{}", "40M"],
        ),
        (
            "resize-shrink",
            |d| qemu_image(d, "img.qcow2", ""),
            plain,
            &["rqemu-img", "resize", "--shrink", "{}", "2M"],
        ),
        (
            "amend-refcount-bits",
            |d| qemu_image(d, "img.qcow2", "cluster_size=4096"),
            plain,
            &["rqemu-img", "amend", "-o", "refcount_bits=64", "{}"],
        ),
        (
            "commit",
            |d| {
                let base = qemu_image(d, "img.qcow2", "");
                qemu_img(
                    d,
                    &[
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "-b",
                        "img.qcow2",
                        "-F",
                        "qcow2",
                        "top.qcow2",
                    ],
                );
                qemu_io(
                    d,
                    "top.qcow2",
                    &["write -P 0x88 0 64k", "write -P 0x99 2M 2M"],
                );
                // The overlay names its backing file through the logging node.
                let logged = plain(&base, &d.join("log"));
                qemu_img(
                    d,
                    &["rebase", "-u", "-b", &logged, "-F", "qcow2", "top.qcow2"],
                );
                base
            },
            |img, _| {
                img.with_file_name("top.qcow2")
                    .to_string_lossy()
                    .into_owned()
            },
            &["rqemu-img", "commit", "{}"],
        ),
        (
            "rebase",
            |d| {
                qemu_image(d, "old.qcow2", "");
                qemu_img(d, &["create", "-q", "-f", "qcow2", "new.qcow2", "8M"]);
                qemu_io(
                    d,
                    "new.qcow2",
                    &["write -P 0x11 0 64k", "write -P 0xaa 6M 64k"],
                );
                qemu_img(
                    d,
                    &[
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "-b",
                        "old.qcow2",
                        "-F",
                        "qcow2",
                        "img.qcow2",
                    ],
                );
                qemu_io(d, "img.qcow2", &["write -P 0xbb 32k 64k"]);
                d.join("img.qcow2")
            },
            plain,
            &[
                "rqemu-img",
                "rebase",
                "-b",
                "new.qcow2",
                "-F",
                "qcow2",
                "{}",
            ],
        ),
    ];
    table
        .into_iter()
        .map(|(name, prepare, spec, args)| record_command(s, name, prepare, spec, args))
        .collect()
}

fn recordings(s: &Scratch) -> Vec<Recording> {
    let mut v: Vec<Recording> = step_workloads()
        .into_iter()
        .map(|(name, opts, size, steps)| record_steps(s, name, opts, size, &steps))
        .collect();
    v.extend(command_workloads(s));
    v
}

fn run(budget: Budget, threads: usize, seed: u64) {
    if !need_qemu() {
        return;
    }
    let s = Scratch::new("power-cut");
    let recs = recordings(&s);
    let mut total = 0;
    for (i, rec) in recs.iter().enumerate() {
        let st = states(rec, budget, seed + i as u64);
        let n = check_states(rec, &st, threads);
        eprintln!(
            "{}: {} log entries {:?}, {n} states checked",
            rec.name,
            rec.log_len(),
            power_cut_common::entry_counts(rec)
        );
        total += n;
    }
    eprintln!("{total} power-cut states checked, none corrupt, no flushed byte lost");
}

#[test]
fn power_cut_states() {
    run(
        Budget {
            states: 120,
            samples: 2,
            exhaustive: 3,
        },
        4,
        0x5eed,
    );
}

#[test]
#[ignore = "long: over 100,000 states (see docs/reliability.md)"]
fn power_cut_sweep() {
    let var = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    run(
        Budget {
            states: var("RQEMU_POWER_CUT_STATES", 10_000),
            samples: var("RQEMU_POWER_CUT_SAMPLES", 512),
            exhaustive: 4,
        },
        var("RQEMU_POWER_CUT_THREADS", 4),
        var("RQEMU_POWER_CUT_SEED", 0x5eed) as u64,
    );
}
