//! The power-cut test can fail: with the qcow2 driver's test-only switch that lets L2
//! tables reach the disk before the refcount blocks and data they depend on, some power
//! cut leaves an image that `qemu-img check` finds corrupt. (A test binary of its own:
//! the switch is process-wide.)

use std::sync::atomic::Ordering;

use rqemu::{need_qemu, Scratch};
use rqemu_block::format::qcow2::meta::UNORDERED_L2_FOR_TESTS;

mod power_cut_common;
use power_cut_common::{check_states, record_steps, states, Budget, Step::*};

#[test]
fn a_broken_ordering_is_caught() {
    if !need_qemu() {
        return;
    }
    const K: u64 = 1024;
    let s = Scratch::new("power-cut-broken");
    UNORDERED_L2_FOR_TESTS.store(true, Ordering::Relaxed);
    let rec = record_steps(
        &s,
        "unordered-l2",
        "cluster_size=512,refcount_bits=64",
        4 << 20,
        &[
            Write(0, 64 * K),
            Checkpoint,
            Write(512 * K, 256 * K),
            Checkpoint,
        ],
    );
    UNORDERED_L2_FOR_TESTS.store(false, Ordering::Relaxed);
    let st = states(
        &rec,
        Budget {
            states: 400,
            samples: 2,
            exhaustive: 3,
        },
        1,
    );
    let caught = std::panic::catch_unwind(|| check_states(&rec, &st, 4));
    let why = match caught {
        Ok(n) => panic!("{n} states of a broken ordering checked and none found corrupt"),
        Err(e) => e.downcast_ref::<String>().cloned().unwrap_or_default(),
    };
    assert!(
        why.contains("qemu-img check exits 2") || why.contains("neither its content"),
        "{why}"
    );
    eprintln!("caught: {}", why.lines().next().unwrap_or(""));
}
