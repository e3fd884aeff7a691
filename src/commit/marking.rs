//! Marking a transaction that wrote for PREPARE TRANSACTION (`mtm_<node>_<xid>`), and
//! refusing, with a clear error, what cannot be committed on every node.

use mmts_core::config::Mode;
use mmts_core::membership::{format_mask, Mask, State};
use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use super::{active, is_client, session};
use crate::{gucs, status, twophase};

/// Handles BEGIN / COMMIT / PREPARE / ...; returns whether PostgreSQL should run it as usual.
///
/// # Safety
/// `stmt` must be a valid TransactionStmt (the utility statement ProcessUtility got, its tag
/// checked), on the backend's main thread.
pub(super) unsafe fn transaction_statement(stmt: *mut pg_sys::TransactionStmt) -> bool {
    use pg_sys::TransactionStmtKind::*;
    // SAFETY: the caller passes a valid TransactionStmt.
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
                // SAFETY: the caller passes a valid TransactionStmt.
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
                // SAFETY: the parser always gives PREPARE TRANSACTION its gid, a NUL-terminated
                // string of the parse tree, alive while the statement runs; copied here.
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
    // SAFETY: a plain global of this backend's transaction, read on its main thread.
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
pub(super) fn mark_implicit() {
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
    let gid = crate::backend::cstring(&mmts_core::twopc::gid(config.node_id, xid));
    session(|s| s.quiet = true);
    // SAFETY: the backend's main thread, inside the transaction (the callers checked it is
    // live and has an xid); PrepareTransactionBlock copies the gid into TopTransactionContext.
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

pub(super) const WOUNDED_HINT: &str = "The transaction made no change on any node; retry it.";

pub(super) fn wounded_message(by: u32) -> String {
    format!("mmts: could not serialize access: a transaction of node {by} being committed needs a row this transaction locked")
}

pub(super) fn wounded_error(by: u32) -> ! {
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
pub(super) fn refuse_unless_online() -> Mask {
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
    .set_hint("Write on an online node (mtm.get_cluster_state()), or retry once this node is online again.")
    .report(PgLogLevel::ERROR);
    unreachable!()
}
