//! Dropping a node from the cluster.
//!
//! `mtm.drop_node(id)` records the node in `mtm.dropped_nodes`, a replicated table, in a
//! transaction committed like any write (so every live node has the row, or none). Each
//! node's receivers read that table into shared memory when they start and about once a
//! second: from then on the dropped node counts for nothing (majorities are of the nodes
//! left, its heartbeats are ignored), and this node's receiver for it settles what the node
//! left in doubt here, drops the slot it streamed from and its replication origin, and stops
//! for good. The node list itself (`multimaster.conn_strings`) is not rewritten: the table
//! says which of its nodes are gone, also after a restart.

use std::cell::Cell;
use std::ffi::CString;
use std::time::{Duration, Instant};

use mmts_core::config::Mode;
use mmts_core::membership::{bit, Mask};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use crate::{commit, gucs, receiver, status};

/// How often receivers look at `mtm.dropped_nodes`.
const EVERY: Duration = Duration::from_secs(1);

/// Runs `f` in a transaction of its own, with a snapshot for its queries (outside one).
fn in_transaction<R>(f: impl FnOnce() -> R) -> R {
    // An error ends the transaction and the worker's loop (or `forget`'s catch) goes on.
    let f = std::panic::AssertUnwindSafe(f);
    BackgroundWorker::transaction(move || unsafe {
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        let whole = f; // captured whole, so as the unwind-safe wrapper
        let result = (whole.0)();
        pg_sys::PopActiveSnapshot();
        result
    })
}

/// Reads `mtm.dropped_nodes` into shared memory (outside a transaction); returns the nodes in it.
pub fn load_dropped() -> Mask {
    let mask = in_transaction(|| {
        // No table yet (CREATE EXTENSION mmts not run here): nothing dropped.
        let exists = Spi::get_one::<bool>("SELECT pg_catalog.to_regclass('mtm.dropped_nodes') IS NOT NULL");
        if !exists.ok().flatten().unwrap_or(false) {
            return 0;
        }
        Spi::get_one::<i64>(
            "SELECT coalesce(bit_or(1::bigint << (node_id - 1)), 0) FROM mtm.dropped_nodes WHERE node_id BETWEEN 1 AND 64",
        )
        .ok()
        .flatten()
        .unwrap_or(0)
    }) as Mask;
    status::set_dropped(mask);
    mask
}

/// Calls [`load_dropped`] at most every [`EVERY`].
pub fn refresh_dropped() {
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    if LAST.with(Cell::get).is_some_and(|t| t.elapsed() < EVERY) {
        return;
    }
    LAST.with(|l| l.set(Some(Instant::now())));
    load_dropped();
}

/// Removes what this node keeps for dropped node `peer` (called by its receiver, outside a
/// transaction, once nothing of the peer is left prepared here): the slot the peer streamed
/// from (its walsender is stopped first) and the peer's replication origin. Returns whether
/// both are gone.
pub fn forget(peer: u32) -> bool {
    let slot = receiver::slot_name(peer);
    let origin = CString::new(receiver::origin_name(peer)).expect("no NUL");
    PgTryBuilder::new(|| unsafe {
        // None: no slot; Some(0): nobody streams from it; Some(pid): the peer's walsender.
        let streamer = in_transaction(|| {
            Spi::get_one_with_args::<i32>(
                "SELECT coalesce(active_pid, 0) FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                &[slot.as_str().into()],
            )
        })
        .ok()
        .flatten();
        match streamer {
            Some(0) => {
                let name = CString::new(slot.as_str()).expect("no NUL");
                pg_sys::ReplicationSlotDrop(name.as_ptr(), true);
            }
            Some(pid) => {
                // It no longer has anything to send; the slot goes once it has stopped.
                in_transaction(|| {
                    Spi::get_one_with_args::<bool>("SELECT pg_catalog.pg_terminate_backend($1)", &[pid.into()])
                })
                .ok();
                return false;
            }
            None => {}
        }
        if pg_sys::replorigin_session_origin != pg_sys::InvalidRepOriginId as pg_sys::RepOriginId {
            // This receiver set the origin up for its session: release it to drop it.
            pg_sys::replorigin_session_reset();
            pg_sys::replorigin_session_origin = pg_sys::InvalidRepOriginId as pg_sys::RepOriginId;
        }
        in_transaction(|| pg_sys::replorigin_drop_by_name(origin.as_ptr(), true, true));
        true
    })
    .catch_others(|e| {
        unsafe { pg_sys::AbortCurrentTransaction() };
        let message = match &e {
            pgrx::pg_sys::panic::CaughtError::PostgresError(r)
            | pgrx::pg_sys::panic::CaughtError::ErrorReport(r)
            | pgrx::pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => r.message().to_string(),
        };
        ereport!(
            PgLogLevel::LOG,
            PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
            format!("mmts: cannot yet remove the slot and origin of dropped node {peer}: {message}; retrying")
        );
        false
    })
    .execute()
}

/// Removes node `node_id` from the cluster for good (superusers only). Run on any other node
/// that accepts writes; the node's slots and origins on the others are dropped as they learn
/// of it.
#[pg_extern(volatile)]
fn drop_node(node_id: i32) {
    let Mode::Multimaster(config) = gucs::mode() else {
        refuse(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, "this server is not a multimaster node", None);
    };
    if !unsafe { pg_sys::superuser() } {
        refuse(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "permission denied for mtm.drop_node",
            Some("Only superusers may change the nodes of the cluster."),
        );
    }
    let Some(node) = config.nodes.iter().find(|n| n.id.0 as i32 == node_id) else {
        refuse(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            &format!("there is no node {node_id} in the cluster"),
            Some("mtm.get_nodes_state() lists the nodes."),
        );
    };
    if node.id == config.node_id {
        refuse(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            &format!("node {node_id} cannot drop itself"),
            Some("Run mtm.drop_node on another node."),
        );
    }
    let left = status::configured(config);
    if left & bit(node.id) == 0 {
        ereport!(
            PgLogLevel::NOTICE,
            PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
            format!("node {node_id} was already dropped")
        );
        return;
    }
    if (left & !bit(node.id)).count_ones() < 2 {
        refuse(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            &format!("dropping node {node_id} would leave a single node"),
            Some("A cluster keeps at least two nodes."),
        );
    }
    // Committed on every live node, as a write of a replicated table.
    commit::note_write();
    Spi::run_with_args("INSERT INTO mtm.dropped_nodes(node_id) VALUES ($1) ON CONFLICT DO NOTHING", &[node_id.into()])
        .unwrap_or_else(|e| refuse(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, &e.to_string(), None));
}

fn refuse(code: PgSqlErrorCode, message: &str, hint: Option<&str>) -> ! {
    let mut report = ErrorReport::new(code, format!("mmts: {message}"), "mmts");
    if let Some(hint) = hint {
        report = report.set_hint(hint);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!()
}
