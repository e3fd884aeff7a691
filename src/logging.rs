//! mmts's one way to write to the server log.
//!
//! `ereport` at LOG, always from the process's main thread: every line goes where the
//! server's own lines go, with its prefix, and `log_min_messages` applies. (A `tracing`
//! subscriber would end in the same `ereport`; mmts has no other threads that log.)

use std::cell::Cell;
use std::time::{Duration, Instant};

use pgrx::prelude::*;

/// Writes `message` to the server log.
pub fn log(message: String) {
    ereport!(PgLogLevel::LOG, PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION, message);
}

/// How often one process writes a rate-limited line at most.
const LIMITED_EVERY: Duration = Duration::from_secs(10);

thread_local! {
    static LAST_LIMITED: Cell<Option<Instant>> = const { Cell::new(None) };
    static SUPPRESSED: Cell<u64> = const { Cell::new(0) };
}

/// Writes `message` unless this process wrote a rate-limited line within [`LIMITED_EVERY`];
/// the next one written says how many were left out (for what peers or clients could make
/// this node log at will, such as rejected signals).
pub fn log_limited(message: String) {
    let now = Instant::now();
    if LAST_LIMITED.get().is_some_and(|t| now.duration_since(t) < LIMITED_EVERY) {
        SUPPRESSED.set(SUPPRESSED.get() + 1);
        return;
    }
    LAST_LIMITED.set(Some(now));
    let left_out = SUPPRESSED.replace(0);
    log(if left_out > 0 {
        format!("{message} ({left_out} more like it in the last seconds not logged)")
    } else {
        message
    });
}
