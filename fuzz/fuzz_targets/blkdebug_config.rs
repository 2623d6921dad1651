//! Fuzzes blkdebug's rules as users write them: a config file (`[inject-error]` and
//! `[set-state]` sections) or a `blkdebug:CONFIG:IMAGE` filename with `align`,
//! `max-transfer`, ... and `inject-error.N.*` / `set-state.N.*` options, then runs the
//! rules that parse: events, breakpoints and requests taken from the bytes after the
//! first NUL. Any input must give rules or an error, never a panic or a hang, and an
//! injected error is always a real errno.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rqemu_block::filter::blkdebug::config::{
    parse_config, parse_filename, take_option_rules, IoType, RuleSpec,
};
use rqemu_block::filter::blkdebug::limits::Limits;
use rqemu_block::filter::blkdebug::rules::Rules;
use rqemu_block::filter::blkdebug::{set_printer, Event};
use rqemu_opts::KeyVal;

const EVENTS: &[&str] = &[
    "none",
    "l1_update",
    "l2_load",
    "l2_update",
    "read_aio",
    "write_aio",
    "cow_read",
    "cow_write",
    "refblock_alloc",
    "cluster_alloc",
    "flush_to_os",
    "flush_to_disk",
    "pwritev_rmw_head",
    "pwritev_rmw_tail",
    "pwritev",
    "pwritev_done",
];

const IOTYPES: &[IoType] = &[
    IoType::Read,
    IoType::Write,
    IoType::WriteZeroes,
    IoType::Discard,
    IoType::Flush,
    IoType::BlockStatus,
];

/// The rules of a `blkdebug:` filename (first line) and option list (second line).
fn from_options(text: &str) -> Option<Vec<RuleSpec>> {
    let (filename, opts) = text.split_once('\n').unwrap_or((text, ""));
    if filename.starts_with("blkdebug:") {
        let (_config, _image) = parse_filename(filename).ok()?;
    }
    let mut kv = KeyVal::parse(opts, None).ok()?;
    let limits = Limits::take_from(&mut kv).ok()?;
    assert!(limits.align.is_power_of_two());
    assert!(limits.max_transfer % limits.align == 0);
    take_option_rules(&mut kv).ok()
}

fn run(rules: &[RuleSpec], script: &[u8]) {
    let engine = Rules::new(rules);
    for op in script.chunks(2) {
        let (a, b) = (op[0], op.get(1).copied().unwrap_or(0));
        let event = EVENTS[usize::from(b) % EVENTS.len()];
        match a % 4 {
            0 => {
                let ev = Event::parse(event).expect("a known event");
                drop(engine.event(ev));
            }
            1 => {
                let offset = u64::from(b) * 512;
                let bytes = u64::from(a >> 2) * 512;
                let ty = IOTYPES[usize::from(a >> 2) % IOTYPES.len()];
                if let Some(i) = engine.check(offset, bytes, ty) {
                    assert!(i.errno > 0, "injected errno {}", i.errno);
                }
            }
            2 => {
                let _ = engine.add_breakpoint(event, &format!("t{}", a >> 6));
            }
            _ => {
                let tag = format!("t{}", a >> 6);
                if a & 4 != 0 {
                    let _ = engine.resume(&tag);
                } else {
                    let _ = engine.remove_breakpoint(&tag);
                }
            }
        }
    }
    engine.resume_all();
}

fuzz_target!(|data: &[u8]| {
    set_printer(|_| {});
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let nul = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    let (text, script) = rest.split_at(nul);
    let script = script.get(1..).unwrap_or(&[]);
    let text = String::from_utf8_lossy(text);
    let rules = if mode & 1 == 0 {
        match parse_config(&text) {
            Ok(r) => r,
            Err(e) => {
                assert!(!e.to_string().is_empty());
                return;
            }
        }
    } else {
        match from_options(&text) {
            Some(r) => r,
            None => return,
        }
    };
    run(&rules, script);
});
