//! The hooks through which mmts follows a client's transaction: `ExecutorRun`/`ExecutorFinish`
//! and `ProcessUtility` spot writes and transaction statements, `emit_log` words a wounded
//! transaction's cancel as a serialization failure, and the transaction callback starts the
//! two-phase commit just before PREPARE.

use std::ffi::{c_char, CStr};
use std::sync::OnceLock;

use mmts_core::config::{ClusterConfig, Mode};
use mmts_core::lease::Unreadable;
use pgrx::pg_sys;
use pgrx::pg_sys::ffi::pg_guard_ffi_boundary;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use super::coordinating::start_two_phase;
use super::marking::{mark_implicit, transaction_statement, wounded_message, WOUNDED_HINT};
use super::{active, is_client, note_write, refuse_if_wounded, session, Session};
use crate::{gucs, status, twophase};

/// The hooks installed before mmts's, called by mmts's: set once, in the postmaster while
/// it preloads mmts, and inherited by every backend it forks.
struct Previous {
    start: pg_sys::ExecutorStart_hook_type,
    run: pg_sys::ExecutorRun_hook_type,
    finish: pg_sys::ExecutorFinish_hook_type,
    utility: pg_sys::ProcessUtility_hook_type,
    emit_log: pg_sys::emit_log_hook_type,
}

static PREVIOUS: OnceLock<Previous> = OnceLock::new();

fn previous() -> &'static Previous {
    PREVIOUS.get().expect("mmts's hooks are installed")
}

/// Installs mmts's hooks (once, while preloading).
pub fn install() {
    // SAFETY: the postmaster's main thread, while it loads shared_preload_libraries: nothing
    // else reads or writes the hook variables.
    unsafe {
        let previous = Previous {
            start: pg_sys::ExecutorStart_hook,
            run: pg_sys::ExecutorRun_hook,
            finish: pg_sys::ExecutorFinish_hook,
            utility: pg_sys::ProcessUtility_hook,
            emit_log: pg_sys::emit_log_hook,
        };
        if PREVIOUS.set(previous).is_err() {
            return;
        }
        pg_sys::ExecutorStart_hook = Some(executor_start);
        pg_sys::ExecutorRun_hook = Some(crate::pg_internals::executor_run_hook);
        pg_sys::ExecutorFinish_hook = Some(executor_finish);
        pg_sys::ProcessUtility_hook = Some(process_utility);
        pg_sys::emit_log_hook = Some(emit_log);
        pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut());
    }
}

/// `ExecutorStart`: refuses writes that mmts could not replicate faithfully. A table without a
/// primary key or replica identity cannot have its updates and deletes found on the peers, so
/// with `multimaster.ignore_tables_without_pk = off` (the default) any write to one is an error
/// instead of a silent divergence; with it on, such tables stay local (the output plugin does
/// not send them). A write to a replicated table enters the synchronous commit.
///
/// Called by PostgreSQL only, as `ExecutorStart_hook`.
#[pg_guard]
unsafe extern "C-unwind" fn executor_start(query: *mut pg_sys::QueryDesc, eflags: i32) {
    // SAFETY: PostgreSQL calls the hook on the main thread, inside a transaction, with a valid
    // QueryDesc and plan.
    unsafe {
        if let Mode::Multimaster(config) = gucs::mode() {
            refuse_if_wounded();
            check_result_relations((*query).plannedstmt);
            refuse_stale_reads(config, query);
        }
        // SAFETY: nothing here needs dropping; errors leave as raised (see `pg_internals`).
        crate::pg_internals::keeping_errors(
            || match previous().start {
                Some(previous) => previous(query, eflags),
                None => crate::pg_internals::standard_executor_start(query, eflags),
            },
            || {},
        );
    }
}

/// Refuses updates and deletes of tables without a key (unless they are kept local): a peer
/// could not find the rows. Inserts into them replicate, as in PostgreSQL's own logical
/// replication. Tells the synchronous commit that the transaction writes a replicated table.
///
/// # Safety
/// `stmt` must be the valid plan of the query being started, inside its transaction, on the
/// backend's main thread.
unsafe fn check_result_relations(stmt: *mut pg_sys::PlannedStmt) {
    // SAFETY: `stmt` is the plan ExecutorStart got, inside its transaction: resultRelations
    // holds 1-based indexes into its range table (list_nth stays in bounds). Each relation
    // RelationIdGetRelation opens is read (relname is NUL-terminated) and closed before any
    // error is raised. Its planTree, when not NULL, is a plan node, cast to ModifyTable only
    // once its tag says so.
    unsafe {
        let results = (*stmt).resultRelations;
        let n = if results.is_null() { 0 } else { (*results).length };
        // Only new rows: a plain INSERT (or one that does nothing on a conflict).
        let plan = (*stmt).planTree;
        let only_inserts = (*stmt).commandType == pg_sys::CmdType::CMD_INSERT
            && !(!plan.is_null()
                && (*plan).type_ == pg_sys::NodeTag::T_ModifyTable
                && (*(plan as *mut pg_sys::ModifyTable)).onConflictAction
                    == pg_sys::OnConflictAction::ONCONFLICT_UPDATE);
        for i in 0..n {
            let rti = pg_sys::list_nth_int(results, i);
            let rte = pg_sys::list_nth((*stmt).rtable, rti - 1) as *mut pg_sys::RangeTblEntry;
            if (*rte).rtekind != pg_sys::RTEKind::RTE_RELATION {
                continue;
            }
            let rel = pg_sys::RelationIdGetRelation((*rte).relid);
            if rel.is_null() {
                continue;
            }
            let replicated = crate::tables::replicated_table(rel);
            let keyless = replicated && !crate::tables::has_replica_identity(rel);
            let name = CStr::from_ptr((*(*rel).rd_rel).relname.data.as_ptr()).to_string_lossy().into_owned();
            pg_sys::RelationClose(rel);
            let local = keyless && gucs::IGNORE_TABLES_WITHOUT_PK.get();
            if keyless && !local && !only_inserts {
                ErrorReport::new(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!("table \"{name}\" has no primary key or replica identity, so mmts cannot replicate updates or deletes of its rows"),
                    "mmts",
                )
                .set_detail("Inserts into it replicate; an update or a delete could not find its rows on the other nodes.")
                .set_hint(
                    "Add a primary key, or ALTER TABLE ... REPLICA IDENTITY FULL, or set multimaster.ignore_tables_without_pk = on to keep such tables local to each node.",
                )
                .report(PgLogLevel::ERROR);
            }
            if replicated && !local {
                note_write();
            }
        }
    }
}

/// Refuses a client's statement that reads a replicated table while this node may miss
/// commits of the cluster: it is not online, or it holds no lease from some member (see
/// `mmts_core::lease`). `multimaster.allow_stale_reads` lets a session read anyway.
///
/// # Safety
/// `query` must be the valid QueryDesc ExecutorStart got, inside its transaction, on the
/// backend's main thread.
unsafe fn refuse_stale_reads(config: &ClusterConfig, query: *mut pg_sys::QueryDesc) {
    // SAFETY: reads of this backend's globals and of the plan ExecutorStart got, on the main
    // thread inside the transaction; list_nth stays within the range table's length, and each
    // relation opened is closed before any error is raised.
    unsafe {
        if !active() || gucs::ALLOW_STALE_READS.get() {
            return;
        }
        let stmt = (*query).plannedstmt;
        let rtable = (*stmt).rtable;
        let n = if rtable.is_null() { 0 } else { (*rtable).length };
        let user_relations = (0..n)
            .map(|i| pg_sys::list_nth(rtable, i) as *mut pg_sys::RangeTblEntry)
            .filter(|&rte| {
                (*rte).rtekind == pg_sys::RTEKind::RTE_RELATION && (*rte).relid.to_u32() >= pg_sys::FirstNormalObjectId
            })
            .map(|rte| (*rte).relid)
            .collect::<Vec<_>>();
        if refuse_stale_reads_of(config, user_relations) {
            renew_snapshot(query);
        }
    }
}

/// The statement's snapshot was taken while this node could not answer reads yet (it waited
/// for a lease, or for a member's writes to be applied): a READ COMMITTED statement gets a new
/// one; a transaction whose snapshot is fixed (REPEATABLE READ, SERIALIZABLE) is refused, to be
/// retried.
///
/// # Safety
/// As for [`refuse_stale_reads`], before the standard ExecutorStart reads the snapshot.
unsafe fn renew_snapshot(query: *mut pg_sys::QueryDesc) {
    // SAFETY: the QueryDesc holds one registration of its snapshot (CreateQueryDesc), which
    // FreeQueryDesc gives back: the new snapshot is registered before the old one is given
    // back, so the counts stay balanced and the portal's active snapshot (a copy of its own)
    // is untouched. Main thread, inside the transaction.
    unsafe {
        if pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32 {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                "mmts: this transaction's snapshot was taken before this node could answer reads",
                "mmts",
            )
            .set_hint("Retry the transaction.")
            .report(PgLogLevel::ERROR);
        }
        let old = (*query).snapshot;
        (*query).snapshot = pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot());
        pg_sys::UnregisterSnapshot(old);
    }
}

/// Refuses a client's read of `relations` if one is a replicated table and this node may miss
/// commits of the cluster (see [`refuse_stale_reads`]). Returns whether it waited until the
/// node could answer (a snapshot taken before is too old).
///
/// # Safety
/// Inside a transaction, on the backend's main thread.
unsafe fn refuse_stale_reads_of(config: &ClusterConfig, user_relations: Vec<pg_sys::Oid>) -> bool {
    // SAFETY: as in `refuse_stale_reads`: each relation opened is closed before any error.
    unsafe {
        if user_relations.is_empty() || !active() || gucs::ALLOW_STALE_READS.get() {
            return false;
        }
        let why = match readable_soon(config) {
            Ok(waited) => return waited,
            Err(why) => why,
        };
        let replicated = user_relations.into_iter().find_map(|relid| {
            let rel = pg_sys::RelationIdGetRelation(relid);
            if rel.is_null() {
                return None;
            }
            let name = crate::tables::replicated_table(rel)
                .then(|| CStr::from_ptr((*(*rel).rd_rel).relname.data.as_ptr()).to_string_lossy().into_owned());
            pg_sys::RelationClose(rel);
            name
        });
        let Some(table) = replicated else { return false };
        let me = config.node_id;
        let why = match why {
            Unreadable::NotOnline(state) => format!("it is {}, not online", state.name()),
            Unreadable::NoLease(node) => format!("it has not heard from member {node} lately"),
            Unreadable::Released => "it is shutting down".to_string(),
            Unreadable::Behind { node, .. } => {
                format!("it has not yet applied what member {node} committed while it did not count this node")
            }
        };
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("mmts: node {me} does not answer reads of replicated table \"{table}\" now: {why}"),
            "mmts",
        )
        .set_detail("Its data may miss transactions the cluster has committed.")
        .set_hint("Read on an online node (mtm.get_cluster_state()), retry once this node is online again, or SET multimaster.allow_stale_reads = on to read what this node has.")
        .report(PgLogLevel::ERROR);
        unreachable!()
    }
}

/// Whether this node may answer reads now (`Ok(true)`: after waiting); a member waits up to
/// `heartbeat_recv_timeout` for a lease to be renewed or for a member's writes to be applied
/// (a node that just got online again).
fn readable_soon(config: &ClusterConfig) -> Result<bool, Unreadable> {
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_millis(gucs::HEARTBEAT_RECV_TIMEOUT.get() as u64);
    let mut waited = false;
    loop {
        match status::readable(config) {
            Err(Unreadable::NoLease(_) | Unreadable::Behind { .. }) if std::time::Instant::now() < deadline => {
                waited = true;
                crate::backend::nap(5);
                pgrx::check_for_interrupts!();
            }
            verdict => return verdict.map(|()| waited),
        }
    }
}

/// Interrupts held off while it lives (released on unwind too).
struct HeldInterrupts;

impl HeldInterrupts {
    fn hold() -> HeldInterrupts {
        // SAFETY: a plain counter of this backend (HOLD_INTERRUPTS), on its main thread; its
        // signal handlers do not touch it.
        unsafe { pg_sys::InterruptHoldoffCount += 1 };
        HeldInterrupts
    }
}

impl Drop for HeldInterrupts {
    fn drop(&mut self) {
        // SAFETY: as in `hold` (saturating: a PostgreSQL ERROR resets the counter to 0 before
        // it unwinds to here).
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

/// mmts's part of the ExecutorRun hook (entered through `pg_internals::executor_run_hook`).
pub(crate) fn executor_run(call: crate::pg_internals::ExecutorRunCall) {
    // SAFETY: the previous hook or the standard function, with the arguments PostgreSQL gave
    // this hook, on its main thread.
    nested(|| unsafe { call.run(previous().run) });
    if at_top_level() {
        mark_implicit();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_finish(query: *mut pg_sys::QueryDesc) {
    // SAFETY: as in `executor_run`.
    nested(|| unsafe {
        match previous().finish {
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
    // `ddl::before` may edit the statement (a new sequence's start and step: see
    // `ddl::spread_sequence`). A read-only tree belongs to a cached plan (a statement in a
    // function, run again later): edited in place, it would point into memory freed after
    // this run. PostgreSQL copies such a tree before it edits one; so does mmts.
    let (pstmt, read_only_tree) = if read_only_tree {
        // SAFETY: `pstmt` is a valid PlannedStmt; the copy lives in the current memory
        // context, which outlasts the statement's execution.
        (unsafe { pg_sys::copyObjectImpl(pstmt.cast()) }.cast::<pg_sys::PlannedStmt>(), false)
    } else {
        (pstmt, false)
    };
    // SAFETY: `pstmt` is the valid plan PostgreSQL passed (or its copy); the plan of a utility
    // statement always has its utilityStmt, a valid parse node.
    let stmt = unsafe { (*pstmt).utilityStmt };
    if is_client() && matches!(gucs::mode(), Mode::Multimaster(_)) {
        // SAFETY: `stmt` is that valid node.
        unsafe { refuse_reserved_gid(stmt) };
    }
    // Held in a cell: an error in the statement leaves this frame by longjmp, and the capture
    // is undone (dropped) on the way (see `nested`).
    // SAFETY: `pstmt` and `query_string` as PostgreSQL passed them to this hook (the plan
    // possibly copied), on the backend's main thread.
    let ddl = std::cell::RefCell::new(Some(unsafe { crate::commit::ddl::before(pstmt, query_string) }));
    let run = || {
        let leave = || {
            session(|s| s.nesting = s.nesting.saturating_sub(1));
            drop(ddl.borrow_mut().take());
        };
        session(|s| s.nesting += 1);
        // SAFETY: the closures capture by reference; `leave` neither fails nor panics.
        unsafe {
            crate::pg_internals::keeping_errors(
                || match previous().utility {
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
    // SAFETY: `stmt` is a valid node (above).
    if unsafe { (*stmt).type_ } != pg_sys::NodeTag::T_TransactionStmt {
        refuse_if_wounded();
    }
    // SAFETY: `stmt` is a valid node, cast only to the struct its tag names; a COPY's relation
    // is read once non-NULL, TRUNCATE's relations is a list of RangeVars read below its length.
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
                // COPY of a table out reads it without the executor (and takes its snapshot
                // after this check).
                if let (false, false, Mode::Multimaster(config)) =
                    ((*copy).is_from, (*copy).relation.is_null(), gucs::mode())
                {
                    refuse_stale_reads_of(config, vec![crate::tables::relation_id((*copy).relation)]);
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
///
/// # Safety
/// `rv` must be a valid RangeVar, inside a transaction, on the backend's main thread.
unsafe fn replicated(rv: *mut pg_sys::RangeVar) -> bool {
    // SAFETY: the caller's valid RangeVar, in a transaction; the relation is checked non-NULL
    // and closed after it is read.
    unsafe {
        let relid = crate::tables::relation_id(rv);
        if relid == pg_sys::InvalidOid {
            return false;
        }
        let rel = pg_sys::RelationIdGetRelation(relid);
        if rel.is_null() {
            return false;
        }
        let yes = crate::tables::replicated_table(rel);
        pg_sys::RelationClose(rel);
        yes
    }
}

/// Refuses an application's PREPARE TRANSACTION with a name mmts uses for its own.
///
/// # Safety
/// `stmt` must be a valid parse node (a utility statement), on the backend's main thread.
unsafe fn refuse_reserved_gid(stmt: *mut pg_sys::Node) {
    // SAFETY: the caller's valid node, cast to TransactionStmt once its tag says so; a non-NULL
    // gid is a NUL-terminated string of the parse tree, alive while the statement runs.
    unsafe {
        if (*stmt).type_ != pg_sys::NodeTag::T_TransactionStmt {
            return;
        }
        let stmt = stmt as *mut pg_sys::TransactionStmt;
        if (*stmt).kind != pg_sys::TransactionStmtKind::TRANS_STMT_PREPARE || (*stmt).gid.is_null() {
            return;
        }
        if std::ffi::CStr::from_ptr((*stmt).gid).to_bytes().starts_with(mmts_core::twopc::GID_PREFIX.as_bytes()) {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_RESERVED_NAME,
                format!(
                    "mmts: prepared transaction names starting with \"{}\" are reserved for mmts",
                    mmts_core::twopc::GID_PREFIX
                ),
                "mmts",
            )
            .set_hint("Choose another name.")
            .report(PgLogLevel::ERROR);
        }
    }
}

/// Called by PostgreSQL only, as `emit_log_hook`.
#[pg_guard]
unsafe extern "C-unwind" fn emit_log(edata: *mut pg_sys::ErrorData) {
    // SAFETY: PostgreSQL calls the hook on the main thread with the valid ErrorData being
    // reported, which lives in ErrorContext: strings put there (MemoryContextStrdup) live as
    // long as it does. MyProc is set in a client backend (`is_client`, checked first).
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
                .or_else(|| twophase::wounded_lately(crate::pg_internals::my_proc_number()));
            if let Some(by) = wound {
                let message = crate::backend::cstring(&wounded_message(by));
                let hint = crate::backend::cstring(WOUNDED_HINT);
                (*edata).sqlerrcode = PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE as i32;
                (*edata).message = pg_sys::MemoryContextStrdup(pg_sys::ErrorContext, message.as_ptr());
                (*edata).hint = pg_sys::MemoryContextStrdup(pg_sys::ErrorContext, hint.as_ptr());
                (*edata).detail = std::ptr::null_mut();
            }
        }
        if let Some(prev) = previous().emit_log {
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
                p.abandon();
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
