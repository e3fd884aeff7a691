//! What every mmts process uses of its PostgreSQL backend, in one place: the time, a nap on
//! its latch, C strings.

use std::ffi::CString;

use pgrx::pg_sys;

/// The time now (`GetCurrentTimestamp`: microseconds since 2000-01-01).
pub fn now() -> pg_sys::TimestampTz {
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// The machine's monotonic clock in microseconds (`CLOCK_MONOTONIC`: the same for every
/// process here, never set back): what leases are measured with (see `mmts_core::lease`).
pub fn monotonic() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given; CLOCK_MONOTONIC always exists on
    // Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000 + ts.tv_nsec / 1_000
}

/// Sleeps `ms` milliseconds on the latch (woken early when it is set).
pub fn nap(ms: i64) {
    // SAFETY: main thread; `MyLatch` is this process's latch, set up before any mmts code runs.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            ms as std::ffi::c_long,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
}

/// `s` as a C string (mmts's names and statements hold no NUL).
pub fn cstring(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}
