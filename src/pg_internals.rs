//! Everything of PostgreSQL's that differs between the versions mmts supports (15 to 18), or
//! that mmts declares by hand (not in pgrx's bindings), each from the server's headers of the
//! versions named on its declaration: the `cfg` gates on versions live here and nowhere else.
//! Also the functions mmts calls without pgrx's guard, with the one C helper around them.
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

// executor/executor.h and tcop/utility.h, PostgreSQL 15 to 18 (ExecutorRun: see
// `ExecutorRunCall`).
unsafe extern "C-unwind" {
    #[link_name = "standard_ExecutorStart"]
    pub fn standard_executor_start(query: *mut pg_sys::QueryDesc, eflags: i32);
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

// executor/executor.h, PostgreSQL 15 to 17.
#[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
unsafe extern "C-unwind" {
    fn standard_ExecutorRun(
        query: *mut pg_sys::QueryDesc,
        direction: pg_sys::ScanDirection::Type,
        count: u64,
        execute_once: bool,
    );
}
// executor/executor.h, PostgreSQL 18 (no `execute_once`).
#[cfg(feature = "pg18")]
unsafe extern "C-unwind" {
    fn standard_ExecutorRun(query: *mut pg_sys::QueryDesc, direction: pg_sys::ScanDirection::Type, count: u64);
}

/// One call of ExecutorRun, as its hook received it (the arguments differ between versions).
pub struct ExecutorRunCall {
    pub query: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
    #[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
    execute_once: bool,
}

impl ExecutorRunCall {
    /// Runs the query: through `previous` (the hook installed before mmts's), or the standard
    /// function.
    ///
    /// # Safety
    /// Main thread, with the arguments PostgreSQL gave the hook; raises errors by longjmp.
    pub unsafe fn run(&self, previous: pg_sys::ExecutorRun_hook_type) {
        #[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
        // SAFETY: as the caller promises; the declaration above matches these versions.
        unsafe {
            match previous {
                Some(previous) => previous(self.query, self.direction, self.count, self.execute_once),
                None => standard_ExecutorRun(self.query, self.direction, self.count, self.execute_once),
            }
        }
        #[cfg(feature = "pg18")]
        // SAFETY: as above, for PostgreSQL 18.
        unsafe {
            match previous {
                Some(previous) => previous(self.query, self.direction, self.count),
                None => standard_ExecutorRun(self.query, self.direction, self.count),
            }
        }
    }
}

/// mmts's ExecutorRun hook, in the version's signature (see `commit::hooks::executor_run`).
#[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
#[pgrx::pg_guard]
pub unsafe extern "C-unwind" fn executor_run_hook(
    query: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
    execute_once: bool,
) {
    crate::commit::executor_run(ExecutorRunCall { query, direction, count, execute_once });
}

/// mmts's ExecutorRun hook, in the version's signature (see `commit::hooks::executor_run`).
#[cfg(feature = "pg18")]
#[pgrx::pg_guard]
pub unsafe extern "C-unwind" fn executor_run_hook(
    query: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
) {
    crate::commit::executor_run(ExecutorRunCall { query, direction, count });
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

// access/twophase.h, PostgreSQL 15 to 18.
unsafe extern "C-unwind" {
    #[link_name = "TwoPhaseGetXidByVirtualXID"]
    pub fn two_phase_get_xid_by_virtual_xid(
        vxid: pg_sys::VirtualTransactionId,
        have_more: *mut bool,
    ) -> pg_sys::TransactionId;
}

// storage/sinvaladt.h, PostgreSQL 15 and 16 (17 numbers backends by their PGPROC:
// `ProcNumberGetProc`).
#[cfg(any(feature = "pg15", feature = "pg16"))]
unsafe extern "C-unwind" {
    fn BackendIdGetProc(backend_id: c_int) -> *mut pg_sys::PGPROC;
}

/// This backend's PGPROC number (`pgprocno`; `MyProcNumber` from 17 on).
pub fn my_proc_number() -> i32 {
    // SAFETY: MyProc is this backend's own PGPROC, set before any mmts code runs (main thread).
    unsafe { proc_number(pg_sys::MyProc) }
}

/// The number of the PGPROC `proc_` in `ProcGlobal->allProcs`.
///
/// # Safety
/// `proc_` points into `ProcGlobal->allProcs`.
pub unsafe fn proc_number(proc_: *const pg_sys::PGPROC) -> i32 {
    #[cfg(any(feature = "pg15", feature = "pg16"))]
    // SAFETY: as the caller promises; `pgprocno` never changes.
    unsafe {
        (*proc_).pgprocno
    }
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    // SAFETY: as the caller promises (`GetNumberFromPGProc` of storage/proc.h).
    unsafe {
        proc_.offset_from((*pg_sys::ProcGlobal).allProcs) as i32
    }
}

/// The local id of the transaction that the backend of `proc_` runs.
///
/// # Safety
/// `proc_` points into `ProcGlobal->allProcs`; read without a lock, as PostgreSQL does.
pub unsafe fn proc_local_xid(proc_: *const pg_sys::PGPROC) -> u32 {
    #[cfg(any(feature = "pg15", feature = "pg16"))]
    // SAFETY: as the caller promises.
    unsafe {
        (*proc_).lxid
    }
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    // SAFETY: as the caller promises.
    unsafe {
        (*proc_).vxid.lxid
    }
}

/// Whether the PGPROC `proc_` is a background worker's (18: not a regular backend's).
///
/// # Safety
/// As [`proc_local_xid`].
pub unsafe fn proc_is_worker(proc_: *const pg_sys::PGPROC) -> bool {
    #[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
    // SAFETY: as the caller promises.
    unsafe {
        (*proc_).isBackgroundWorker
    }
    #[cfg(feature = "pg18")]
    // SAFETY: as the caller promises.
    unsafe {
        !(*proc_).isRegularBackend
    }
}

/// The PGPROC of the backend that holds the virtual transaction id `vxid` (NULL if none), or
/// `None` for a prepared transaction recovered at start-up (no backend).
///
/// # Safety
/// Main thread.
pub unsafe fn vxid_proc(vxid: &pg_sys::VirtualTransactionId) -> Option<*mut pg_sys::PGPROC> {
    #[cfg(any(feature = "pg15", feature = "pg16"))]
    // SAFETY: main thread; the backend id comes from the lock manager.
    unsafe {
        (vxid.backendId != pg_sys::InvalidBackendId).then(|| BackendIdGetProc(vxid.backendId))
    }
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    // SAFETY: as above; pgrx's binding.
    unsafe {
        (vxid.procNumber != pg_sys::INVALID_PROC_NUMBER).then(|| pg_sys::ProcNumberGetProc(vxid.procNumber))
    }
}

/// The attribute `i` of the tuple descriptor `desc` (`TupleDescAttr`).
///
/// # Safety
/// `desc` is a valid descriptor with more than `i` attributes.
pub unsafe fn tuple_desc_attr(desc: pg_sys::TupleDesc, i: usize) -> *mut pg_sys::FormData_pg_attribute {
    #[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
    // SAFETY: as the caller promises.
    unsafe {
        (*desc).attrs.as_mut_ptr().add(i)
    }
    #[cfg(feature = "pg18")]
    // SAFETY: as the caller promises; in 18 the attributes follow `natts` compact ones
    // (access/tupdesc.h's `TupleDescAttrAddress`).
    unsafe {
        (*desc).compact_attrs.as_mut_ptr().add((*desc).natts as usize).cast::<pg_sys::FormData_pg_attribute>().add(i)
    }
}

/// A row of a decoded change (`ReorderBufferTupleBuf`; a `HeapTuple` from 17 on).
#[cfg(any(feature = "pg15", feature = "pg16"))]
pub type ChangeTuple = *mut pg_sys::ReorderBufferTupleBuf;
/// A row of a decoded change (`ReorderBufferTupleBuf`; a `HeapTuple` from 17 on).
#[cfg(any(feature = "pg17", feature = "pg18"))]
pub type ChangeTuple = pg_sys::HeapTuple;

/// The heap tuple of a decoded change's row.
///
/// # Safety
/// `tuple` is a row of a change being decoded.
pub unsafe fn change_heap_tuple(tuple: ChangeTuple) -> pg_sys::HeapTuple {
    #[cfg(any(feature = "pg15", feature = "pg16"))]
    // SAFETY: as the caller promises.
    unsafe {
        &raw mut (*tuple).tuple
    }
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    {
        tuple
    }
}

/// Sets up an executor state's range table to hold the one relation `rte`, as PostgreSQL's
/// logical replication worker does (with permission info from 16 on, and the relation
/// unpruned in 18).
///
/// # Safety
/// Main thread, in a transaction; `rte` a palloc'd relation entry.
pub unsafe fn init_range_table(estate: *mut pg_sys::EState, rte: *mut pg_sys::RangeTblEntry) {
    // SAFETY: as the caller promises; pgrx's bindings of each version.
    unsafe {
        let rtable = pg_sys::lappend(std::ptr::null_mut(), rte.cast());
        #[cfg(feature = "pg15")]
        pg_sys::ExecInitRangeTable(estate, rtable);
        #[cfg(any(feature = "pg16", feature = "pg17", feature = "pg18"))]
        let mut perminfos: *mut pg_sys::List = std::ptr::null_mut();
        #[cfg(any(feature = "pg16", feature = "pg17", feature = "pg18"))]
        pg_sys::addRTEPermissionInfo(&mut perminfos, rte);
        #[cfg(any(feature = "pg16", feature = "pg17"))]
        pg_sys::ExecInitRangeTable(estate, rtable, perminfos);
        #[cfg(feature = "pg18")]
        pg_sys::ExecInitRangeTable(estate, rtable, perminfos, pg_sys::bms_make_singleton(1));
    }
}

/// The relation's primary key index (`InvalidOid` if none), deferrable or not.
///
/// # Safety
/// Main thread; `rel` open.
pub unsafe fn primary_key_index(rel: pg_sys::Relation) -> pg_sys::Oid {
    // SAFETY: as the caller promises.
    unsafe {
        #[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
        let index = pg_sys::RelationGetPrimaryKeyIndex(rel);
        #[cfg(feature = "pg18")]
        let index = pg_sys::RelationGetPrimaryKeyIndex(rel, true);
        index
    }
}

/// `EvalPlanQualInit` with no plan, auxiliary row marks or result relations.
///
/// # Safety
/// Main thread; `estate` set up.
pub unsafe fn eval_plan_qual_init(epq: *mut pg_sys::EPQState, estate: *mut pg_sys::EState) {
    // SAFETY: as the caller promises.
    unsafe {
        #[cfg(feature = "pg15")]
        pg_sys::EvalPlanQualInit(epq, estate, std::ptr::null_mut(), std::ptr::null_mut(), -1);
        #[cfg(any(feature = "pg16", feature = "pg17", feature = "pg18"))]
        pg_sys::EvalPlanQualInit(epq, estate, std::ptr::null_mut(), std::ptr::null_mut(), -1, std::ptr::null_mut());
    }
}

/// `ExecuteTruncateGuts`, checking permissions as the current user.
///
/// # Safety
/// Main thread, in a transaction; the lists as `ExecuteTruncateGuts` takes them.
pub unsafe fn execute_truncate_guts(
    rels: *mut pg_sys::List,
    relids: *mut pg_sys::List,
    behavior: pg_sys::DropBehavior::Type,
    restart_identity: bool,
) {
    // SAFETY: as the caller promises.
    unsafe {
        #[cfg(feature = "pg15")]
        pg_sys::ExecuteTruncateGuts(rels, relids, relids, behavior, restart_identity);
        #[cfg(any(feature = "pg16", feature = "pg17", feature = "pg18"))]
        pg_sys::ExecuteTruncateGuts(rels, relids, relids, behavior, restart_identity, false);
    }
}

/// Makes this session's changes carry the replication origin `origin`.
///
/// # Safety
/// Main thread; raises errors by longjmp as pgrx's bindings do.
pub unsafe fn replorigin_session_setup(origin: pg_sys::RepOriginId) {
    // SAFETY: as the caller promises.
    unsafe {
        #[cfg(feature = "pg15")]
        pg_sys::replorigin_session_setup(origin);
        #[cfg(any(feature = "pg16", feature = "pg17", feature = "pg18"))]
        pg_sys::replorigin_session_setup(origin, 0);
    }
}

/// A wait event set for `events` events, in TopMemoryContext, owned by no resource owner.
///
/// # Safety
/// Main thread; the caller frees it with `FreeWaitEventSet`.
pub unsafe fn create_wait_event_set(events: i32) -> *mut pg_sys::WaitEventSet {
    // SAFETY: as the caller promises.
    unsafe {
        #[cfg(any(feature = "pg15", feature = "pg16"))]
        let set = pg_sys::CreateWaitEventSet(pg_sys::TopMemoryContext, events);
        #[cfg(any(feature = "pg17", feature = "pg18"))]
        let set = pg_sys::CreateWaitEventSet(std::ptr::null_mut(), events);
        set
    }
}

// replication/message.h, PostgreSQL 15 and 16.
#[cfg(any(feature = "pg15", feature = "pg16"))]
unsafe extern "C-unwind" {
    fn LogLogicalMessage(prefix: *const c_char, message: *const c_char, size: usize, transactional: bool) -> u64;
}
// replication/message.h, PostgreSQL 17 and 18 (a `flush` argument).
#[cfg(any(feature = "pg17", feature = "pg18"))]
unsafe extern "C-unwind" {
    fn LogLogicalMessage(
        prefix: *const c_char,
        message: *const c_char,
        size: usize,
        transactional: bool,
        flush: bool,
    ) -> u64;
}

/// Writes a logical decoding message to WAL (not flushed; a transactional one goes with its
/// transaction's commit record).
///
/// # Safety
/// Main thread; `prefix` NUL-terminated, `message` `size` bytes; raises errors by longjmp
/// (call it through `pg_guard_ffi_boundary`).
pub unsafe fn log_logical_message(
    prefix: *const c_char,
    message: *const c_char,
    size: usize,
    transactional: bool,
) -> u64 {
    #[cfg(any(feature = "pg15", feature = "pg16"))]
    // SAFETY: as the caller promises, with the declaration above.
    unsafe {
        LogLogicalMessage(prefix, message, size, transactional)
    }
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    // SAFETY: as the caller promises, with the declaration above.
    unsafe {
        LogLogicalMessage(prefix, message, size, transactional, false)
    }
}

// utils/timeout.h, PostgreSQL 15 and 16 (17 adds TRANSACTION_TIMEOUT before USER_TIMEOUT).
#[cfg(any(feature = "pg15", feature = "pg16"))]
pub const USER_TIMEOUT: i32 = 12;
#[cfg(any(feature = "pg17", feature = "pg18"))]
pub const USER_TIMEOUT: i32 = 13;
unsafe extern "C-unwind" {
    #[link_name = "RegisterTimeout"]
    pub fn register_timeout(id: i32, handler: Option<unsafe extern "C-unwind" fn()>) -> i32;
    #[link_name = "enable_timeout_every"]
    pub fn enable_timeout_every(id: i32, fin_time: pg_sys::TimestampTz, delay_ms: i32);
    #[link_name = "disable_timeout"]
    pub fn disable_timeout(id: i32, keep_indicator: bool);
}

/// libpq/libpq.h's `PQcommMethods`, PostgreSQL 15 to 18.
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

unsafe extern "C" {
    /// libpq/libpq.h: the backend's current client communication methods.
    ///
    /// `static mut` because this declares PostgreSQL's own mutable global (`extern` blocks
    /// have no other way to say so): no storage of mmts's. Every access is `unsafe`, on the
    /// main thread only.
    #[link_name = "PqCommMethods"]
    pub static mut PQ_COMM_METHODS: *const PqCommMethods;
}

/// The WAL record logical decoding is at, as an output plugin's origin filter sees it.
pub struct CurrentRecord<'a> {
    /// Where the record begins.
    pub lsn: u64,
    pub xid: u32,
    /// The top-level transaction, on the first record of a subtransaction (else 0).
    pub top_xid: u32,
    pub rmid: u8,
    pub info: u8,
    pub data: &'a [u8],
}

/// The record `ctx`'s WAL reader decoded last. Its header and main data are laid out alike in
/// 15 to 18 (`access/xlogreader.h`, `DecodedXLogRecord`).
///
/// # Safety
/// `ctx` is the decoding context of a callback running now; the record stays valid while the
/// callback runs, and the result must not outlive it.
pub unsafe fn current_record<'a>(ctx: *mut pg_sys::LogicalDecodingContext) -> Option<CurrentRecord<'a>> {
    // SAFETY: per the contract above; a NULL reader or record is checked.
    unsafe {
        let reader = (*ctx).reader;
        if reader.is_null() || (*reader).record.is_null() {
            return None;
        }
        let r = &*(*reader).record;
        let data = if r.main_data.is_null() || r.main_data_len == 0 {
            &[][..]
        } else {
            std::slice::from_raw_parts(r.main_data.cast::<u8>(), r.main_data_len as usize)
        };
        Some(CurrentRecord {
            lsn: r.lsn,
            xid: r.header.xl_xid.into_inner(),
            top_xid: r.toplevel_xid.into_inner(),
            rmid: r.header.xl_rmid,
            info: r.header.xl_info,
            data,
        })
    }
}

/// `xl_logical_message` up to its `message` (`replication/message.h`, the same in 15 to 18:
/// `Oid dbId; bool transactional; Size prefix_size; Size message_size; char message[]`). The
/// prefix (NUL-terminated) and the message follow.
#[repr(C)]
struct XlLogicalMessage {
    db_id: pg_sys::Oid,
    transactional: bool,
    prefix_size: usize,
    message_size: usize,
}

/// A logical message's transactional flag, prefix (without its NUL) and content, from the
/// main data of its WAL record; `None` when the data is too short for what it says it holds.
pub fn logical_message(data: &[u8]) -> Option<(bool, &[u8], &[u8])> {
    let header = std::mem::size_of::<XlLogicalMessage>();
    if data.len() < header {
        return None;
    }
    let field = |at: usize| usize::from_ne_bytes(data[at..at + 8].try_into().expect("8 bytes"));
    let transactional = data[std::mem::offset_of!(XlLogicalMessage, transactional)] != 0;
    let prefix_size = field(std::mem::offset_of!(XlLogicalMessage, prefix_size));
    let message_size = field(std::mem::offset_of!(XlLogicalMessage, message_size));
    let prefix_end = header.checked_add(prefix_size)?;
    let end = prefix_end.checked_add(message_size)?;
    if prefix_size == 0 || end > data.len() {
        return None;
    }
    let prefix = &data[header..prefix_end - 1];
    Some((transactional, prefix, &data[prefix_end..end]))
}
