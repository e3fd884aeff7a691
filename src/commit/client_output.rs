//! Holding the client's answer until the commit is finished: every message to the client goes
//! through `PqCommMethods->putmessage`, which mmts wraps in a backend that wrote.

use std::ffi::{c_char, c_int};
use std::sync::OnceLock;

use pgrx::pg_sys;
use pgrx::pg_sys::ffi::pg_guard_ffi_boundary;
use pgrx::prelude::*;

use super::coordinating::finish;
use super::marking::mark_implicit;
use super::session;
use crate::pg_internals::{PqCommMethods, PQ_COMM_METHODS};

/// This backend's client methods as PostgreSQL set them, and the copy with mmts's
/// [`putmessage`] that `PqCommMethods` points to once installed (each backend fills its own:
/// the postmaster never does). `OnceLock` gives the copy a fixed address for the life of the
/// process.
static ORIGINAL: OnceLock<PqCommMethods> = OnceLock::new();
static WRAPPED: OnceLock<PqCommMethods> = OnceLock::new();

/// Routes this backend's messages to its client through [`putmessage`] (once per backend).
pub(super) fn install_pqcomm() {
    // SAFETY: the backend's main thread, where PostgreSQL's globals `whereToSendOutput` and
    // `PqCommMethods` are read and written; the latter points to PostgreSQL's methods for this
    // connection (static in pqcomm.c) or to `WRAPPED`, which lives as long as the process.
    unsafe {
        let current = PQ_COMM_METHODS;
        if current.is_null() || WRAPPED.get().is_some_and(|w| std::ptr::eq(current, w)) {
            return;
        }
        if pg_sys::whereToSendOutput != pg_sys::CommandDest::DestRemote {
            return;
        }
        let original = *ORIGINAL.get_or_init(|| *current);
        let wrapped = WRAPPED.get_or_init(|| PqCommMethods { putmessage: Some(putmessage), ..original });
        PQ_COMM_METHODS = wrapped;
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn putmessage(msgtype: c_char, s: *const c_char, len: usize) -> c_int {
    if msgtype as u8 == b'C' || msgtype as u8 == b'Z' {
        if unsafe { !pg_sys::IsTransactionState() } {
            if let Some(pending) = session(|s| s.pending.take()) {
                finish(pending);
            }
        } else if msgtype as u8 == b'C' {
            // Extended protocol: a statement done, the commit comes at Sync.
            mark_implicit();
        }
    }
    let original = ORIGINAL.get().and_then(|m| m.putmessage).expect("installed");
    // SAFETY: PostgreSQL's own putmessage, with the arguments it gave this one.
    unsafe { pg_guard_ffi_boundary(|| original(msgtype, s, len)) }
}
