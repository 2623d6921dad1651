//! What tests across the workspace share about skipping: a test that cannot run here (a
//! tool, a source or a machine feature is missing) prints one line and returns, except
//! in a strict run (`RQEMU_TEST_STRICT=1`, as CI runs), where it fails, naming what was
//! missing.

/// The environment variable that makes a test run strict.
pub const STRICT_VAR: &str = "RQEMU_TEST_STRICT";

/// Whether this is a strict test run (see [`STRICT_VAR`]).
pub fn strict() -> bool {
    std::env::var(STRICT_VAR).is_ok_and(|v| v == "1")
}

/// Skips the calling test for want of `what`: prints one line, or in a strict run fails
/// the test with that line. Callers return after it.
#[track_caller]
pub fn skip(what: &str) {
    if strict() {
        panic!("{STRICT_VAR}=1 and this test cannot run: {what}");
    }
    eprintln!("skipped: {what}");
}
