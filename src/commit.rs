//! Synchronous commit of client transactions (`multimaster.mode = sync`).
//!
//! PostgreSQL 15 has no hook that can turn a COMMIT into a two-phase commit, so mmts does it
//! in three steps, in the client's backend:
//!
//! 1. **Spot writes.** `ExecutorStart` notes DML on a replicated table (including DML run by
//!    functions and triggers), `ProcessUtility` notes COPY FROM and TRUNCATE of one.
//! 2. **Mark the transaction for PREPARE.** An implicit transaction (an autocommit statement, a
//!    multi-statement simple query, an extended-protocol batch up to Sync) is marked as soon as
//!    a top-level statement that wrote has run: `BeginImplicitTransactionBlock()` +
//!    `PrepareTransactionBlock(gid)`, so that PostgreSQL's own end of statement (or Sync)
//!    prepares it instead of committing (the "no transaction in progress" WARNING this raises is
//!    hidden). In an explicit block, the COMMIT statement itself becomes
//!    `PrepareTransactionBlock(gid)`. The gid is `mtm_<node>_<xid>`. Just before the PREPARE
//!    record is written (`XACT_EVENT_PRE_PREPARE`) the transaction gets its [`Key`], a
//!    coordinator, and a transactional signal telling the peers to vote.
//! 3. **Finish before the client hears.** Every message to the client goes through
//!    `PqCommMethods->putmessage`; mmts wraps it. The first CommandComplete ('C') or
//!    ReadyForQuery ('Z') after the PREPARE, with no transaction open, waits for the peers'
//!    votes (delivered by the receivers), then runs COMMIT PREPARED (or ROLLBACK PREPARED) and
//!    waits until every live peer has finished too. A rollback reaches the client as an ERROR
//!    in place of that message, as a deferred constraint failing at commit would.
//!
//! A write transaction that would still commit without PREPARE (a procedure that COMMITs
//! inside, a portal suspended before Sync) is refused at `XACT_EVENT_PRE_COMMIT`, so no write
//! ever escapes the two-phase commit.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CString};
use std::time::Duration;

use mmts_core::config::Mode;
use mmts_core::coordinator::{Action, Coordination, Coordinator, Event, Reply};
use mmts_core::indoubt::{Answer, Ballot, Outcome};
use mmts_core::membership::{self, bit, format_mask, Mask, State};
use mmts_core::twopc::{Key, Signal, Vote, SERIALIZATION_FAILURE};
use mmts_core::NodeId;
use pgrx::pg_sys;
use pgrx::pg_sys::ffi::pg_guard_ffi_boundary;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use crate::pg_internals::{PqCommMethods, PQ_COMM_METHODS};
use crate::{gucs, status, twophase};

/// A prepared transaction to finish before the client hears of it.
struct Pending {
    gid: CString,
    xid: u32,
    slot: usize,
    coordination: Coordination,
    /// The members it is prepared on.
    members: Mask,
    /// Its priority in conflicts (its key's timestamp).
    priority: i64,
}

#[derive(Default)]
struct Session {
    /// The transaction wrote a replicated table.
    wrote: bool,
    /// The transaction is an explicit block (BEGIN).
    explicit: bool,
    /// Its end was turned into PREPARE TRANSACTION (`gid`).
    gid: Option<CString>,
    /// The application ran PREPARE TRANSACTION.
    application_prepare: bool,
    /// Executor and utility calls under way (0: at top level).
    nesting: u32,
    pending: Option<Pending>,
    /// Hide the "there is no transaction in progress" WARNING while marking.
    quiet: bool,
    /// The priority of this session's last transaction, rolled back for a conflict, and when:
    /// a retry soon after keeps it, so that it is not always the youngest and does not lose
    /// every conflict (a schema change under a steady write load, a hot row).
    retry: Option<(i64, std::time::Instant)>,
}

thread_local! {
    static SESSION: RefCell<Session> = RefCell::new(Session::default());
}

fn session<R>(f: impl FnOnce(&mut Session) -> R) -> R {
    SESSION.with(|s| f(&mut s.borrow_mut()))
}

/// Client backends only: workers apply what they get under a replication origin.
fn is_client() -> bool {
    unsafe { pg_sys::MyBackendType == pg_sys::BackendType::B_BACKEND }
}

fn active() -> bool {
    gucs::synchronous() && is_client() && gucs::in_replicated_database()
}

/// Refuses the first write of a transaction while this node does not accept writes.
pub fn refuse_unless_writable() {
    if active() && !session(|s| s.wrote) {
        refuse_unless_online();
    }
}

/// Notes that the current transaction writes a replicated table.
pub fn note_write() {
    if active() {
        if !session(|s| s.wrote) {
            refuse_unless_online();
        }
        session(|s| s.wrote = true);
        install_pqcomm();
    } else if is_client() && !gucs::synchronous() && gucs::in_replicated_database() {
        note_async_write();
    }
}

/// In asynchronous mode, the first write of a transaction tells the peers which of the other
/// nodes' transactions this node had applied (`Signal::Seen`), before its changes: a peer then
/// records as a conflict only an overwrite of a version this node had not seen.
fn note_async_write() {
    thread_local! {
        /// The local transaction that has told it already.
        static TOLD: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
    }
    let Mode::Multimaster(config) = gucs::mode() else { return };
    let lxid = unsafe { (*pg_sys::MyProc).lxid };
    if TOLD.with(|t| t.replace(Some(lxid))) == Some(lxid) {
        return;
    }
    let others = status::configured(config) & !bit(config.node_id);
    let applied = membership::nodes(others).map(|n| (n, status::applied_commit_time(n.0))).collect();
    twophase::emit(&Signal::Seen { applied }, true);
}

// ---- hooks ---------------------------------------------------------------------------------

static mut PREV_RUN: pg_sys::ExecutorRun_hook_type = None;
static mut PREV_FINISH: pg_sys::ExecutorFinish_hook_type = None;
static mut PREV_UTILITY: pg_sys::ProcessUtility_hook_type = None;
static mut PREV_EMIT_LOG: pg_sys::emit_log_hook_type = None;

pub fn install() {
    unsafe {
        PREV_RUN = pg_sys::ExecutorRun_hook;
        pg_sys::ExecutorRun_hook = Some(executor_run);
        PREV_FINISH = pg_sys::ExecutorFinish_hook;
        pg_sys::ExecutorFinish_hook = Some(executor_finish);
        PREV_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
        PREV_EMIT_LOG = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(emit_log);
        pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut());
    }
}

/// Interrupts held off while it lives (released on unwind too).
struct HeldInterrupts;

impl HeldInterrupts {
    fn hold() -> HeldInterrupts {
        unsafe { pg_sys::InterruptHoldoffCount += 1 };
        HeldInterrupts
    }
}

impl Drop for HeldInterrupts {
    fn drop(&mut self) {
        unsafe { pg_sys::InterruptHoldoffCount = pg_sys::InterruptHoldoffCount.saturating_sub(1) };
    }
}

/// Runs what a hook wraps one nesting level down; an error raised inside leaves with its
/// ErrorData whole (see `pg_internals::keeping_errors`), the level restored.
fn nested(mut call: impl FnMut()) {
    let leave = || session(|s| s.nesting = s.nesting.saturating_sub(1));
    session(|s| s.nesting += 1);
    // SAFETY: the closures capture by reference; `leave` neither fails nor panics.
    unsafe { crate::pg_internals::keeping_errors(&mut call, leave) };
    leave();
}

fn at_top_level() -> bool {
    session(|s| s.nesting == 0)
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_run(
    query: *mut pg_sys::QueryDesc,
    direction: pg_sys::ScanDirection::Type,
    count: u64,
    execute_once: bool,
) {
    nested(|| unsafe {
        match PREV_RUN {
            Some(prev) => prev(query, direction, count, execute_once),
            None => crate::pg_internals::standard_executor_run(query, direction, count, execute_once),
        }
    });
    if at_top_level() {
        mark_implicit();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_finish(query: *mut pg_sys::QueryDesc) {
    nested(|| unsafe {
        match PREV_FINISH {
            Some(prev) => prev(query),
            None => crate::pg_internals::standard_executor_finish(query),
        }
    });
    if at_top_level() {
        mark_implicit();
    }
}

#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    let stmt = unsafe { (*pstmt).utilityStmt };
    if is_client() && matches!(gucs::mode(), Mode::Multimaster(_)) {
        unsafe { refuse_reserved_gid(stmt) };
    }
    // Held in a cell: an error in the statement leaves this frame by longjmp, and the capture
    // is undone (dropped) on the way (see `nested`).
    let ddl = std::cell::RefCell::new(Some(unsafe { crate::ddl::before(pstmt, query_string) }));
    let run = || {
        let leave = || {
            session(|s| s.nesting = s.nesting.saturating_sub(1));
            drop(ddl.borrow_mut().take());
        };
        session(|s| s.nesting += 1);
        // SAFETY: the closures capture by reference; `leave` neither fails nor panics.
        unsafe {
            crate::pg_internals::keeping_errors(
                || match PREV_UTILITY {
                    Some(prev) => prev(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
                    None => crate::pg_internals::standard_process_utility(
                        pstmt,
                        query_string,
                        read_only_tree,
                        context,
                        params,
                        query_env,
                        dest,
                        qc,
                    ),
                },
                leave,
            )
        };
        session(|s| s.nesting = s.nesting.saturating_sub(1));
    };
    let finish_ddl = || {
        if let Some(d) = ddl.borrow_mut().take() {
            d.finish();
        }
    };
    if !active() {
        run();
        finish_ddl();
        return;
    }
    // Transaction control is left alone: ROLLBACK must work, and a COMMIT of a wounded
    // transaction fails (and ends it) when its PREPARE is refused.
    if unsafe { (*stmt).type_ } != pg_sys::NodeTag::T_TransactionStmt {
        refuse_if_wounded();
    }
    unsafe {
        match (*stmt).type_ {
            pg_sys::NodeTag::T_TransactionStmt => {
                // A cancel (a peer's transaction wounding this one) must not fail a COMMIT
                // before it is turned into PREPARE: the block would stay open, aborted. Held
                // off until then, it fails the PREPARE, which ends the transaction.
                let go_on = {
                    let _held = HeldInterrupts::hold();
                    transaction_statement(stmt.cast())
                };
                if go_on {
                    run();
                }
                return;
            }
            pg_sys::NodeTag::T_CopyStmt => {
                let copy = stmt as *mut pg_sys::CopyStmt;
                if (*copy).is_from && !(*copy).relation.is_null() && replicated((*copy).relation) {
                    note_write();
                }
            }
            pg_sys::NodeTag::T_TruncateStmt => {
                let truncate = stmt as *mut pg_sys::TruncateStmt;
                let rels = (*truncate).relations;
                for i in 0..if rels.is_null() { 0 } else { (*rels).length } {
                    if replicated(pg_sys::list_nth(rels, i) as *mut pg_sys::RangeVar) {
                        note_write();
                    }
                }
            }
            _ => {}
        }
    }
    run();
    finish_ddl();
    if context == pg_sys::ProcessUtilityContext::PROCESS_UTILITY_TOPLEVEL && at_top_level() {
        mark_implicit();
    }
}

/// Whether the table `rv` names is one mmts replicates.
unsafe fn replicated(rv: *mut pg_sys::RangeVar) -> bool {
    unsafe {
        let relid = crate::executor_hook::relation_id(rv);
        if relid == pg_sys::InvalidOid {
            return false;
        }
        let rel = pg_sys::RelationIdGetRelation(relid);
        if rel.is_null() {
            return false;
        }
        let yes = crate::executor_hook::replicated_table(rel);
        pg_sys::RelationClose(rel);
        yes
    }
}

/// Prefix of the names of the prepared transactions mmts makes (`mtm_<node>_<xid>`).
const GID_PREFIX: &str = "mtm_";

/// Refuses an application's PREPARE TRANSACTION with a name mmts uses for its own.
unsafe fn refuse_reserved_gid(stmt: *mut pg_sys::Node) {
    unsafe {
        if (*stmt).type_ != pg_sys::NodeTag::T_TransactionStmt {
            return;
        }
        let stmt = stmt as *mut pg_sys::TransactionStmt;
        if (*stmt).kind != pg_sys::TransactionStmtKind::TRANS_STMT_PREPARE || (*stmt).gid.is_null() {
            return;
        }
        if std::ffi::CStr::from_ptr((*stmt).gid).to_bytes().starts_with(GID_PREFIX.as_bytes()) {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_RESERVED_NAME,
                format!("mmts: prepared transaction names starting with \"{GID_PREFIX}\" are reserved for mmts"),
                "mmts",
            )
            .set_hint("Choose another name.")
            .report(PgLogLevel::ERROR);
        }
    }
}

/// Handles BEGIN / COMMIT / PREPARE / ...; returns whether PostgreSQL should run it as usual.
unsafe fn transaction_statement(stmt: *mut pg_sys::TransactionStmt) -> bool {
    use pg_sys::TransactionStmtKind::*;
    let kind = unsafe { (*stmt).kind };
    let marked = session(|s| s.gid.is_some());
    if marked {
        // An implicit transaction already set to PREPARE: only a COMMIT (which ends it anyway)
        // makes sense; PostgreSQL cannot run the others from that state.
        if kind == TRANS_STMT_COMMIT {
            return false;
        }
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_ACTIVE_SQL_TRANSACTION,
            "mmts: transaction control statements cannot follow a write in an implicit transaction",
            "mmts",
        )
        .set_hint("Start the transaction with BEGIN before its first statement.")
        .report(PgLogLevel::ERROR);
    }
    match kind {
        TRANS_STMT_BEGIN | TRANS_STMT_START => session(|s| s.explicit = true),
        TRANS_STMT_COMMIT => {
            let wrote = session(|s| s.wrote && s.explicit);
            if wrote
                && unsafe { !pg_sys::IsAbortedTransactionBlockState() }
                && unsafe { pg_sys::GetTopTransactionIdIfAny() }.into_inner() != 0
            {
                if unsafe { (*stmt).chain } {
                    ErrorReport::new(
                        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                        "mmts: COMMIT AND CHAIN is not supported for write transactions",
                        "mmts",
                    )
                    .set_hint("Use COMMIT, then BEGIN.")
                    .report(PgLogLevel::ERROR);
                }
                mark(false);
                return false;
            }
        }
        TRANS_STMT_PREPARE => {
            if session(|s| s.wrote) {
                refuse_temporary();
                session(|s| s.application_prepare = true);
                let gid = unsafe { std::ffi::CStr::from_ptr((*stmt).gid) }.to_owned();
                session(|s| s.gid = Some(gid));
            }
        }
        _ => {}
    }
    true
}

/// PostgreSQL refuses PREPARE for transactions that used temporary tables: say so clearly.
fn refuse_temporary() {
    if unsafe { pg_sys::MyXactFlags } & pg_sys::XACT_FLAGS_ACCESSEDTEMPNAMESPACE as i32 != 0 {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "mmts: a transaction that writes replicated tables cannot also use temporary tables",
            "mmts",
        )
        .set_detail("Synchronous commit prepares the transaction on every node, and PostgreSQL cannot prepare a transaction that used temporary objects.")
        .set_hint("Use temporary tables in separate transactions, or a table made local with mtm.make_table_local().")
        .report(PgLogLevel::ERROR);
    }
}

/// Turns the end of an implicit transaction that wrote into PREPARE TRANSACTION.
fn mark_implicit() {
    if !active() {
        return;
    }
    let due = session(|s| s.wrote && !s.explicit && s.gid.is_none());
    if due
        && unsafe { pg_sys::IsTransactionState() && !pg_sys::IsAbortedTransactionBlockState() }
        && unsafe { pg_sys::GetTopTransactionIdIfAny() }.into_inner() != 0
    {
        mark(true);
    }
}

fn mark(implicit: bool) {
    refuse_temporary();
    let Mode::Multimaster(config) = gucs::mode() else { return };
    let xid = unsafe { pg_sys::GetTopTransactionId() }.into_inner();
    let gid = CString::new(format!("{GID_PREFIX}{}_{}", config.node_id.0, xid)).expect("no NUL");
    session(|s| s.quiet = true);
    unsafe {
        if implicit {
            pg_sys::BeginImplicitTransactionBlock();
        }
        pg_sys::PrepareTransactionBlock(gid.as_ptr());
    }
    session(|s| {
        s.quiet = false;
        s.gid = Some(gid);
    });
}

#[pg_guard]
unsafe extern "C-unwind" fn emit_log(edata: *mut pg_sys::ErrorData) {
    unsafe {
        if session(|s| s.quiet)
            && (*edata).elevel == pg_sys::WARNING as i32
            && (*edata).sqlerrcode == PgSqlErrorCode::ERRCODE_NO_ACTIVE_SQL_TRANSACTION as i32
        {
            (*edata).output_to_client = false;
            (*edata).output_to_server = false;
        }
        // A statement canceled because a peer's transaction wounded this one (see
        // `twophase::classify_holder`): a serialization failure, not a user's cancel.
        if (*edata).elevel == pg_sys::PGERROR as i32
            && (*edata).sqlerrcode == PgSqlErrorCode::ERRCODE_QUERY_CANCELED as i32
            && is_client()
        {
            let wound = twophase::wounded_by(pg_sys::GetTopTransactionIdIfAny().into_inner())
                .or_else(|| twophase::wounded_lately((*pg_sys::MyProc).pgprocno));
            if let Some(by) = wound {
                let message = CString::new(wounded_message(by)).expect("no NUL");
                let hint = CString::new(WOUNDED_HINT).expect("no NUL");
                (*edata).sqlerrcode = PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE as i32;
                (*edata).message = pg_sys::MemoryContextStrdup(pg_sys::ErrorContext, message.as_ptr());
                (*edata).hint = pg_sys::MemoryContextStrdup(pg_sys::ErrorContext, hint.as_ptr());
                (*edata).detail = std::ptr::null_mut();
            }
        }
        if let Some(prev) = PREV_EMIT_LOG {
            pg_guard_ffi_boundary(|| prev(edata));
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    if !active() {
        return;
    }
    match event {
        XACT_EVENT_PRE_PREPARE => {
            let gid = session(|s| s.gid.take());
            if let Some(gid) = gid {
                let application = session(|s| s.application_prepare);
                start_two_phase(gid, application);
            }
        }
        XACT_EVENT_PRE_COMMIT => {
            // A statement that could write and changed nothing (an UPDATE matching no row,
            // EXPLAIN of an UPDATE) took no transaction id: there is nothing to replicate.
            if session(|s| s.wrote) && unsafe { pg_sys::GetTopTransactionIdIfAny() }.into_inner() != 0 {
                ErrorReport::new(
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    "mmts: this write transaction cannot be committed synchronously on all nodes",
                    "mmts",
                )
                .set_detail("It was about to commit without the two-phase commit mmts needs: a COMMIT inside a procedure, or a portal not run to completion.")
                .set_hint("Commit from the client, or set multimaster.mode = async.")
                .report(PgLogLevel::ERROR);
            }
        }
        XACT_EVENT_ABORT => {
            let pending = session(|s| {
                let nesting = s.nesting;
                let pending = s.pending.take();
                *s = Session { nesting, ..Session::default() };
                pending
            });
            if let Some(p) = pending {
                twophase::unregister(p.slot, p.xid);
            }
        }
        XACT_EVENT_COMMIT | XACT_EVENT_PREPARE => session(|s| {
            s.wrote = false;
            s.explicit = false;
            s.gid = None;
            s.application_prepare = false;
        }),
        _ => {}
    }
}

const WOUNDED_HINT: &str = "The transaction made no change on any node; retry it.";

fn wounded_message(by: u32) -> String {
    format!("mmts: could not serialize access: a transaction of node {by} being committed needs a row this transaction locked")
}

fn wounded_error(by: u32) -> ! {
    ErrorReport::new(PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE, wounded_message(by), "mmts")
        .set_hint(WOUNDED_HINT)
        .report(PgLogLevel::ERROR);
    unreachable!()
}

/// Fails the statement about to run if a peer's transaction wounded this one.
pub fn refuse_if_wounded() {
    if !is_client() {
        return;
    }
    if let Some(by) = twophase::wounded_by(unsafe { pg_sys::GetTopTransactionIdIfAny() }.into_inner()) {
        wounded_error(by);
    }
}

/// Refuses a write on a node that is not a member of the cluster (see `status::current`).
/// Returns the members.
fn refuse_unless_online() -> Mask {
    let Mode::Multimaster(config) = gucs::mode() else { return 0 };
    let cur = status::current(config);
    let view = cur.view;
    if view.state == State::Online {
        return view.members;
    }
    let me = config.node_id;
    let why = match (view.state, view.excluded_by) {
        (State::Dropped, _) => "it was dropped from the cluster (mtm.drop_node)".to_string(),
        (State::Recovery, _) => "it is catching up with the cluster (recovery)".to_string(),
        (_, Some(by)) => format!("it is isolated: node {by} does not count it in the cluster"),
        _ => format!(
            "it is isolated: it is in no majority of nodes that all reach each other and report to it (it reaches nodes {} of {})",
            format_mask(cur.report.sees),
            status::configured(config).count_ones()
        ),
    };
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("mmts: node {me} does not accept writes now: {why}"),
        "mmts",
    )
    .set_detail(format!(
        "State {}; members {} (generation {}).",
        view.state.name(),
        format_mask(cur.report.members),
        cur.generation
    ))
    .set_hint("Write on an online node (mtm.get_cluster_state()), or retry once this node is online again. Reads on this node may miss the latest writes.")
    .report(PgLogLevel::ERROR);
    unreachable!()
}

/// How soon a retry must come to keep the priority of the transaction it retries.
const RETRY_WINDOW: Duration = Duration::from_secs(2);

/// Just before PREPARE: the transaction's key, its coordinator, and the signal for the peers.
fn start_two_phase(gid: CString, application: bool) {
    let Mode::Multimaster(config) = gucs::mode() else { return };
    let members = refuse_unless_online();
    let xid = unsafe { pg_sys::GetTopTransactionId() }.into_inner();
    let ts = twophase::clock_next();
    let priority = session(|s| s.retry.take())
        .filter(|(_, at)| at.elapsed() < RETRY_WINDOW)
        .map_or(ts, |(earlier, _)| earlier.min(ts));
    let key = Key { ts: priority, node: config.node_id };
    let others = status::configured(config) & !bit(config.node_id);
    let after = membership::nodes(others).map(|n| (n, status::applied(n.0))).collect();
    twophase::emit(&Signal::Coordinated { key, members, after }, true);
    let procno = unsafe { (*pg_sys::MyProc).pgprocno };
    let size = status::configured(config).count_ones();
    let wake = twophase::Wake { participants: members & !bit(config.node_id), size };
    let slot = match twophase::register(xid, key, procno, wake) {
        Ok(slot) => slot,
        Err(twophase::Refused::Wounded(by)) => wounded_error(by),
        Err(twophase::Refused::Full) => {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
                "mmts: too many transactions in two-phase commit at once",
                "mmts",
            )
            .report(PgLogLevel::ERROR);
            unreachable!()
        }
    };
    let live = membership::nodes(members).filter(|&id| id != config.node_id);
    // Peers apply a large transaction for about as long as it ran here.
    let ran = now() - unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    let deadline = ts + gucs::vote_timeout_us(ran);
    let finish_timeout = gucs::TWOPC_MIN_TIMEOUT.get() as i64 * 1000;
    let coordination =
        Coordination::new(Coordinator::new(size as usize, live, ts, deadline), application, finish_timeout);
    session(|s| s.pending = Some(Pending { gid, xid, slot, coordination, members, priority }));
}

// ---- finishing, before the client hears ----------------------------------------------------

static mut ORIGINAL: Option<PqCommMethods> = None;
static mut WRAPPED: PqCommMethods = PqCommMethods {
    comm_reset: None,
    flush: None,
    flush_if_writable: None,
    is_send_pending: None,
    putmessage: None,
    putmessage_noblock: None,
};

/// Routes this backend's messages to its client through [`putmessage`] (once per backend).
fn install_pqcomm() {
    unsafe {
        let current = PQ_COMM_METHODS;
        if current.is_null() || std::ptr::eq(current, &raw const WRAPPED) {
            return;
        }
        if pg_sys::whereToSendOutput != pg_sys::CommandDest::DestRemote {
            return;
        }
        ORIGINAL = Some(*current);
        WRAPPED = *current;
        WRAPPED.putmessage = Some(putmessage);
        PQ_COMM_METHODS = &raw const WRAPPED;
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
    unsafe {
        let original = (&raw const ORIGINAL).read().expect("installed").putmessage.expect("set");
        pg_guard_ffi_boundary(|| original(msgtype, s, len))
    }
}

fn now() -> i64 {
    unsafe { pg_sys::GetCurrentTimestamp() }
}

fn interrupted() -> bool {
    unsafe {
        std::ptr::read_volatile(&raw const pg_sys::InterruptPending) != 0
            && (std::ptr::read_volatile(&raw const pg_sys::QueryCancelPending) != 0
                || std::ptr::read_volatile(&raw const pg_sys::ProcDiePending) != 0)
    }
}

fn wait_a_little() {
    crate::apply::nap(10);
}

/// Feeds what arrived, what the receivers see, and the backend's interrupts into the
/// coordination.
fn update(p: &mut Pending) {
    let votes = twophase::votes(p.slot, p.xid);
    let c = &mut p.coordination;
    for node in votes.yes {
        c.step(Event::Vote { node, vote: Vote::Yes { proposal: votes.max_proposal } });
    }
    if let Some((node, sqlstate, message)) = votes.no {
        c.step(Event::Vote { node, vote: Vote::No { sqlstate, message } });
    }
    for node in votes.accepted {
        c.step(Event::Accepted(node));
    }
    for node in votes.finished {
        c.step(Event::Finished(node));
    }
    // A participant no longer reachable, or no longer a member, will not vote (or finish).
    let (members, size) = match gucs::mode() {
        Mode::Multimaster(config) => (status::current(config).view.members, status::configured(config).count_ones()),
        Mode::Standalone => (0, 0),
    };
    c.step(Event::ClusterSize(size as usize));
    let lost: Vec<NodeId> = c.participants().filter(|&n| !status::connected(n.0) || members & bit(n) == 0).collect();
    for node in lost {
        c.step(Event::PeerLost(node));
    }
    if interrupted() {
        c.step(Event::Interrupted);
    }
}

fn finish_prepared(gid: &CString, commit: bool) {
    unsafe {
        pg_sys::StartTransactionCommand();
        twophase::finish_prepared(gid, commit);
        pg_sys::CommitTransactionCommand();
    }
}

/// For tests (`multimaster.failpoint`): the backend stops here for good, as if the node died
/// at this point (the test then kills the node).
fn failpoint(name: &str) {
    let set = gucs::FAILPOINT.get();
    if set.as_deref().and_then(|s| s.to_str().ok()) == Some(name) {
        crate::logging::log(format!("mmts: failpoint {name} reached"));
        loop {
            crate::apply::nap(100);
        }
    }
}

/// Carries out what the transaction's coordination (`mmts_core::coordinator`) asks for until
/// the client is to hear the outcome; a rollback or an unknown outcome reaches it as an ERROR.
fn finish(mut p: Pending) {
    let me = match gucs::mode() {
        Mode::Multimaster(config) => config.node_id,
        Mode::Standalone => NodeId(0),
    };
    let reply = loop {
        update(&mut p);
        match p.coordination.poll(now()) {
            Action::Wait => wait_a_little(),
            Action::Precommit { ts } => {
                // Every node records `ts` as the commit timestamp; this node's clock passes it
                // first (a wait only as long as clock skew), so that what it commits later, or
                // what its client does after COMMIT, gets a later timestamp.
                let limit = now() + 1_000_000;
                while now() < ts.min(limit) {
                    std::thread::sleep(Duration::from_micros((ts - now()).clamp(1, 1000) as u64));
                }
                failpoint("before_precommit");
                let commit = Outcome::Commit { ts };
                let took = twophase::with_acceptor(me, p.xid, |a| a.accept(Ballot::coordinator(me), commit))
                    == Answer::Accepted;
                if took {
                    twophase::emit(&Signal::Precommit { origin: me, xid: p.xid, ts }, false);
                }
                p.coordination.step(Event::OwnAcceptance(took));
            }
            Action::CommitPrepared { ts } => {
                failpoint("before_commit");
                // Recording `ts` itself: a peer may commit at `ts` before this node does.
                crate::commit_origin::commit_prepared_at(&p.gid, ts);
                twophase::with_acceptor(me, p.xid, |a| a.decide(Outcome::Commit { ts }));
                twophase::committed_without(p.members, me, unsafe { pg_sys::XactLastCommitEnd });
                twophase::clock_observe(now());
                p.coordination.step(Event::CommittedHere);
            }
            Action::RollbackPrepared => {
                finish_prepared(&p.gid, false);
                twophase::with_acceptor(me, p.xid, |a| a.decide(Outcome::Abort));
                p.coordination.step(Event::RolledBackHere);
            }
            Action::Reply(reply) => break reply,
        }
    };
    // Left prepared after an unknown outcome: this node's receivers settle it with the other
    // nodes (`settle_orphans`).
    twophase::unregister(p.slot, p.xid);
    let rolled_back = |sqlstate: PgSqlErrorCode, message: String| {
        ErrorReport::new(sqlstate, message, "mmts")
            .set_hint("The transaction made no change on any node; retry it.")
            .report(PgLogLevel::ERROR)
    };
    match reply {
        // The application commits it with COMMIT PREPARED when it chooses.
        Reply::Prepared => {}
        Reply::Committed { late } => {
            if !late.is_empty() {
                let late: Vec<String> = late.iter().map(|n| n.to_string()).collect();
                ErrorReport::new(
                    PgSqlErrorCode::ERRCODE_WARNING,
                    format!("mmts: node {} has not confirmed the commit yet", late.join(", ")),
                    "mmts",
                )
                .set_detail("The transaction is committed; that node applies it as soon as it can, so a read there may not see it yet.")
                .report(PgLogLevel::WARNING);
            }
        }
        Reply::RolledBack(reason) => {
            if reason.sqlstate == SERIALIZATION_FAILURE {
                session(|s| s.retry = Some((p.priority, std::time::Instant::now())));
            }
            let message = match reason.node {
                Some(node) => format!("mmts: transaction rolled back on all nodes: node {node}: {}", reason.message),
                None => format!("mmts: transaction rolled back on all nodes: {}", reason.message),
            };
            rolled_back(twophase::sqlstate_code(&reason.sqlstate), message);
        }
        Reply::Canceled => {
            pgrx::check_for_interrupts!();
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_QUERY_CANCELED,
                "mmts: transaction rolled back on all nodes: canceled while waiting for the votes",
                "mmts",
            )
            .report(PgLogLevel::ERROR);
        }
        Reply::SettledElsewhere => rolled_back(
            PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
            "mmts: transaction rolled back on all nodes: the cluster settled it while this node was out of reach".into(),
        ),
        Reply::Unconfirmed => ErrorReport::new(
            PgSqlErrorCode::ERRCODE_TRANSACTION_RESOLUTION_UNKNOWN,
            "mmts: the commit of this transaction was not confirmed by a majority of the cluster in time",
            "mmts",
        )
        .set_detail("Every node voted to commit it; it is committed or rolled back on every node alike as soon as a majority of nodes reach each other.")
        .set_hint("Check whether its changes are there before retrying it.")
        .report(PgLogLevel::ERROR),
    }
}
