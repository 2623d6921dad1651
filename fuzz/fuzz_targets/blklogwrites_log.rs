//! Fuzzes the write-log reader and the power-cut replayer on arbitrary bytes: a log
//! parses or is refused with an error, never a panic or an allocation in proportion to
//! a field; every state built from a parsed log names only bytes inside the log.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rqemu_block::filter::blklogwrites::log::parse;
use rqemu_block::filter::blklogwrites::replay::{every_subset, sample, Rng};

fuzz_target!(|data: &[u8]| {
    let Ok(log) = parse(data) else {
        return;
    };
    let mut rng = Rng::new(data.len() as u64);
    for cut in [0, log.ops.len() / 2, log.ops.len()] {
        let mut states = every_subset(&log, cut, 3).unwrap_or_default();
        states.push(sample(&log, cut, &mut rng));
        for st in states {
            for p in st.pieces {
                if let Some(d) = p.data {
                    assert!(d + p.len <= data.len() as u64, "piece outside the log");
                }
            }
        }
    }
});
