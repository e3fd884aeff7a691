//! Everything of PostgreSQL's that mmts declares by hand (not in pgrx's bindings), each from the
//! server's headers of the versions named on its declaration, so that supporting another
//! version is a list of gates here; and the functions mmts calls without pgrx's guard, with the
//! one C helper around them.
//!
//! Why unguarded: pgrx's bindings catch a PostgreSQL error (longjmp), turn it into a Rust
//! panic and raise it again later from what its `ErrorReport` holds. That loses an SQLSTATE
//! pgrx does not know (a `RAISE … USING ERRCODE = 'P0042'` becomes XX000), the CONTEXT lines,
//! the names of the constraint, table and column, the cursor position, and it adds a Rust
//! backtrace to the DETAIL when the environment asks for one. mmts's hooks sit under every
//! statement a client runs, so they call what they wrap through [`keeping_errors`]: the error
//! reaches PostgreSQL's own handler exactly as it was raised.
//!
//! Each `unsafe extern` block below is sound as far as its declarations match the header (and
//! versions) named above it; that is what its comment records.

use std::ffi::{c_char, c_int, c_void};

use pgrx::pg_sys;

unsafe extern "C-unwind" {
    // src/c/keep_errors.c
    fn mmts_keeping_errors(
        body: unsafe extern "C-unwind" fn(*mut c_void),
        on_error: unsafe extern "C-unwind" fn(*mut c_void),
        arg: *mut c_void,
    );
}

struct Calls<B, E> {
    body: B,
    on_error: E,
}

unsafe extern "C-unwind" fn run_body<B: FnMut(), E: FnMut()>(arg: *mut c_void) {
    // SAFETY: `arg` is the `Calls` that `keeping_errors` passes, alive for the whole call.
    unsafe { ((*arg.cast::<Calls<B, E>>()).body)() }
}

unsafe extern "C-unwind" fn run_on_error<B: FnMut(), E: FnMut()>(arg: *mut c_void) {
    // SAFETY: as in `run_body`.
    unsafe { ((*arg.cast::<Calls<B, E>>()).on_error)() }
}

/// Runs `body`, which calls PostgreSQL functions directly (a previous hook's pointer, or the
/// `standard_*` functions below); an error raised there runs `on_error`, then leaves by
/// longjmp straight to PostgreSQL's handler, unchanged.
///
/// # Safety
/// The error passes over this frame and the caller's without unwinding them: the closures must
/// capture by reference, and the caller must hold no value that needs dropping across the
/// call (undo such state in `on_error`). `on_error` must neither raise an error nor panic.
/// Main thread only.
pub unsafe fn keeping_errors<B: FnMut(), E: FnMut()>(body: B, on_error: E) {
    let mut calls = Calls { body, on_error };
    // SAFETY: the trampolines match `Calls<B, E>`, and `calls` outlives the call.
    unsafe { mmts_keeping_errors(run_body::<B, E>, run_on_error::<B, E>, (&raw mut calls).cast::<c_void>()) }
}

// executor/executor.h and tcop/utility.h, PostgreSQL 15 to 17 (18 drops ExecutorRun's
// `execute_once`).
#[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
unsafe extern "C-unwind" {
    #[link_name = "standard_ExecutorStart"]
    pub fn standard_executor_start(query: *mut pg_sys::QueryDesc, eflags: i32);
    #[link_name = "standard_ExecutorRun"]
    pub fn standard_executor_run(
        query: *mut pg_sys::QueryDesc,
        direction: pg_sys::ScanDirection::Type,
        count: u64,
        execute_once: bool,
    );
    #[link_name = "standard_ExecutorFinish"]
    pub fn standard_executor_finish(query: *mut pg_sys::QueryDesc);
    #[link_name = "standard_ProcessUtility"]
    #[allow(clippy::too_many_arguments)]
    pub fn standard_process_utility(
        pstmt: *mut pg_sys::PlannedStmt,
        query_string: *const c_char,
        read_only_tree: bool,
        context: pg_sys::ProcessUtilityContext::Type,
        params: pg_sys::ParamListInfo,
        query_env: *mut pg_sys::QueryEnvironment,
        dest: *mut pg_sys::DestReceiver,
        qc: *mut pg_sys::QueryCompletion,
    );
}

// access/twophase.h, PostgreSQL 15 to 18.
unsafe extern "C-unwind" {
    #[link_name = "FinishPreparedTransaction"]
    pub fn finish_prepared_transaction(gid: *const c_char, is_commit: bool);
    #[link_name = "LookupGXact"]
    pub fn lookup_gxact(
        gid: *const c_char,
        prepare_at_lsn: pg_sys::XLogRecPtr,
        prepare_time: pg_sys::TimestampTz,
    ) -> bool;
}

// storage/sinvaladt.h and access/twophase.h, PostgreSQL 15 and 16 (17 replaces backend ids by
// proc numbers: `ProcNumberGetProc`, and `VirtualTransactionId.procNumber`).
#[cfg(any(feature = "pg15", feature = "pg16"))]
unsafe extern "C-unwind" {
    #[link_name = "BackendIdGetProc"]
    pub fn backend_id_get_proc(backend_id: c_int) -> *mut pg_sys::PGPROC;
    #[link_name = "TwoPhaseGetXidByVirtualXID"]
    pub fn two_phase_get_xid_by_virtual_xid(
        vxid: pg_sys::VirtualTransactionId,
        have_more: *mut bool,
    ) -> pg_sys::TransactionId;
}

// replication/message.h, PostgreSQL 15 to 17 (18 adds a `flush` argument).
#[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
unsafe extern "C-unwind" {
    #[link_name = "LogLogicalMessage"]
    pub fn log_logical_message(prefix: *const c_char, message: *const c_char, size: usize, transactional: bool) -> u64;
}

// utils/timeout.h, PostgreSQL 15 and 16 (17 adds TRANSACTION_TIMEOUT before USER_TIMEOUT).
#[cfg(any(feature = "pg15", feature = "pg16"))]
pub const USER_TIMEOUT: i32 = 12;
unsafe extern "C-unwind" {
    #[link_name = "RegisterTimeout"]
    pub fn register_timeout(id: i32, handler: Option<unsafe extern "C-unwind" fn()>) -> i32;
    #[link_name = "enable_timeout_every"]
    pub fn enable_timeout_every(id: i32, fin_time: pg_sys::TimestampTz, delay_ms: i32);
    #[link_name = "disable_timeout"]
    pub fn disable_timeout(id: i32, keep_indicator: bool);
}

/// libpq/libpq.h's `PQcommMethods`, PostgreSQL 15 to 17.
#[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PqCommMethods {
    pub comm_reset: Option<unsafe extern "C-unwind" fn()>,
    pub flush: Option<unsafe extern "C-unwind" fn() -> c_int>,
    pub flush_if_writable: Option<unsafe extern "C-unwind" fn() -> c_int>,
    pub is_send_pending: Option<unsafe extern "C-unwind" fn() -> bool>,
    pub putmessage: Option<unsafe extern "C-unwind" fn(c_char, *const c_char, usize) -> c_int>,
    pub putmessage_noblock: Option<unsafe extern "C-unwind" fn(c_char, *const c_char, usize)>,
}

#[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
unsafe extern "C" {
    /// libpq/libpq.h: the backend's current client communication methods.
    ///
    /// `static mut` because this declares PostgreSQL's own mutable global (`extern` blocks
    /// have no other way to say so): no storage of mmts's. Every access is `unsafe`, on the
    /// main thread only.
    #[link_name = "PqCommMethods"]
    pub static mut PQ_COMM_METHODS: *const PqCommMethods;
}
