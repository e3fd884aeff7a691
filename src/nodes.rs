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
use std::time::{Duration, Instant};

use mmts_core::config::Mode;
use mmts_core::membership::{bit, Mask};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use crate::logging::log;
use crate::{commit, gucs, status};
use mmts_core::replication::{format_lsn, parse_lsn};
use mmts_core::NodeId;

/// How often receivers look at `mtm.dropped_nodes`.
const EVERY: Duration = Duration::from_secs(1);

/// Runs `f` in a transaction of its own, with a snapshot for its queries (outside one).
pub fn in_transaction<R>(f: impl FnOnce() -> R) -> R {
    // An error ends the transaction and the worker's loop (or `forget`'s catch) goes on.
    let f = std::panic::AssertUnwindSafe(f);
    // SAFETY: inside the transaction just started, on the worker's main thread; the snapshot
    // pushed is popped (or, on an error, dropped with the transaction).
    BackgroundWorker::transaction(move || unsafe {
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        let whole = f; // captured whole, so as the unwind-safe wrapper
        let result = (whole.0)();
        pg_sys::PopActiveSnapshot();
        result
    })
}

/// Reads `mtm.dropped_nodes` and `mtm.added_nodes` into shared memory (outside a
/// transaction), and starts the receivers of added nodes not started yet; returns the
/// dropped nodes.
pub fn load_nodes() -> Mask {
    // mtm.added_nodes is for superusers (its connection strings may hold passwords); the
    // receivers may run as another user.
    let (dropped, added) = in_transaction(|| as_superuser(read_nodes));
    status::set_nodes(dropped, &added);
    start_added_receivers(&added, dropped);
    dropped
}

/// The dropped nodes and the added ones (id, connection string), as the tables say (inside a
/// transaction, as a user that may read them).
fn read_nodes() -> (Mask, Vec<(u32, String)>) {
    // No tables yet (CREATE EXTENSION mmts not run here): nothing dropped or added.
    let exists = Spi::get_one::<bool>("SELECT pg_catalog.to_regclass('mtm.added_nodes') IS NOT NULL");
    if !exists.ok().flatten().unwrap_or(false) {
        return (0, Vec::new());
    }
    let dropped = Spi::get_one::<i64>(
        "SELECT coalesce(bit_or(1::bigint << (node_id - 1)), 0) FROM mtm.dropped_nodes WHERE node_id BETWEEN 1 AND 64",
    )
    .ok()
    .flatten()
    .unwrap_or(0) as Mask;
    let added = Spi::connect(|client| {
        client
            .select("SELECT node_id, conn_string FROM mtm.added_nodes ORDER BY node_id", None, &[])
            .map(|rows| rows.filter_map(|r| Some((r.get::<i32>(1).ok()?? as u32, r.get::<String>(2).ok()??))).collect())
            .unwrap_or_default()
    });
    (dropped, added)
}

/// Starts, once per server start, the receiver of each node added to the cluster that is not
/// in `multimaster.conn_strings` (those have theirs from the start).
fn start_added_receivers(added: &[(u32, String)], dropped: Mask) {
    let Mode::Multimaster(config) = gucs::mode() else { return };
    for &(id, _) in added {
        let configured = config.nodes.iter().any(|n| n.id.0 == id);
        if configured || dropped & bit(NodeId(id)) != 0 || !status::claim_receiver(id) {
            continue;
        }
        if crate::workers::start_receiver(id) {
            log(format!("mmts: node {id} was added to the cluster: its receiver started"));
        } else {
            status::unclaim_receiver(id);
            log(format!("mmts: cannot start the receiver for added node {id}; raise max_worker_processes (retrying)"));
        }
    }
}

/// Runs `f` as the bootstrap superuser (inside a transaction: its end, an error's too, gives
/// the session its user back).
pub fn as_superuser<R>(f: impl FnOnce() -> R) -> R {
    let (mut user, mut context) = (pg_sys::Oid::INVALID, 0);
    // SAFETY: inside a transaction (the caller's), main thread; the end of the transaction (an
    // error's too) restores the user, as below does on success.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID),
            context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
    }
    let result = f();
    unsafe { pg_sys::SetUserIdAndSecContext(user, context) };
    result
}

/// Calls [`load_nodes`] at most every [`EVERY`].
pub fn refresh_nodes() {
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    if LAST.with(Cell::get).is_some_and(|t| t.elapsed() < EVERY) {
        return;
    }
    LAST.with(|l| l.set(Some(Instant::now())));
    load_nodes();
}

/// Removes what this node keeps for dropped node `peer` (called by its receiver, outside a
/// transaction, once nothing of the peer is left prepared here): the slot the peer streamed
/// from (its walsender is stopped first) and the peer's replication origin. Returns whether
/// both are gone.
pub fn forget(peer: u32) -> bool {
    let slot = mmts_core::replication::slot_name(peer);
    let origin = crate::backend::cstring(&mmts_core::replication::origin_name(peer));
    // SAFETY: the receiver's main thread, outside a transaction; `name` and `origin` outlive the
    // calls. Resetting the session's origin before dropping it is what replorigin_drop needs.
    let done = caught(|| unsafe {
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
                let name = crate::backend::cstring(&slot);
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
    });
    done.unwrap_or_else(|message| {
        log(format!("mmts: cannot yet remove the slot and origin of dropped node {peer}: {message}; retrying"));
        false
    })
}

/// Runs `f` (outside a transaction); an error ends the transaction it was in and comes back
/// as its message.
fn caught<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe) -> Result<R, String> {
    PgTryBuilder::new(|| Ok(f()))
        .catch_others(|e| {
            unsafe { pg_sys::AbortCurrentTransaction() };
            Err(match &e {
                pgrx::pg_sys::panic::CaughtError::PostgresError(r)
                | pgrx::pg_sys::panic::CaughtError::ErrorReport(r)
                | pgrx::pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => r.message().to_string(),
            })
        })
        .execute()
}

/// On a node that has just joined as a copy of another (outside a transaction): gives its
/// sequences this node's values (they hand out the copied node's), as `mtm.alter_sequences()`.
pub fn spread_sequences_after_join() {
    let spread = caught(|| {
        in_transaction(|| as_superuser(|| Spi::get_one::<i64>("SELECT count(*) FROM mtm.alter_sequences()")))
    });
    match spread {
        Ok(n) => log(format!(
            "mmts: this node's sequences now hand out its own values ({} sequences)",
            n.ok().flatten().unwrap_or(0)
        )),
        Err(message) => ereport!(
            PgLogLevel::WARNING,
            PgSqlErrorCode::ERRCODE_WARNING,
            format!("mmts: cannot give this node's sequences its own values: {message}"),
            "Run SELECT mtm.alter_sequences() on this node before writes use its sequences."
        ),
    }
}

/// Removes node `node_id` from the cluster for good (superusers only). Run on any other node
/// that accepts writes; the node's slots and origins on the others are dropped as they learn
/// of it.
#[pg_extern(volatile)]
fn drop_node(node_id: i32) {
    let config = cluster_admin("mtm.drop_node");
    let Some(node) = status::known(config).into_iter().find(|n| n.id.0 as i32 == node_id) else {
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

/// Adds a node to the running cluster (superusers only) and returns its id: the next free one.
/// `conn_string` is how the other nodes reach it. Every node then starts a receiver for it
/// and makes the slot it will stream from; the node itself is made from a copy of one node
/// (`pg_basebackup`) that [`join_node`], run on that node, lets go at a point of its own.
#[pg_extern(volatile)]
fn add_node(conn_string: &str) -> i32 {
    let config = cluster_admin("mtm.add_node");
    if let Err(e) = mmts_core::conninfo::ConnInfo::parse(conn_string) {
        refuse(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            &format!("invalid connection string for the new node: {e}"),
            Some("Give a libpq connection string, e.g. 'host=node4 dbname=postgres user=postgres'."),
        );
    }
    if conn_string.len() >= status::CONN_STRING_MAX {
        refuse(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            &format!("the connection string is longer than {} bytes", status::CONN_STRING_MAX - 1),
            None,
        );
    }
    let known = status::known(config).iter().fold(status::dropped(), |m, n| m | bit(n.id));
    let id = 64 - known.leading_zeros() + 1;
    if id > gucs::MAX_NODES as u32 {
        refuse(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            &format!("a cluster has at most {} node ids", gucs::MAX_NODES),
            None,
        );
    }
    // This node needs room for one more peer (the others say so in their logs).
    let peers = status::configured(config).count_ones() as i32;
    // SAFETY (the three reads): plain globals, set at server start; main thread.
    let needs = [
        (
            "max_replication_slots",
            unsafe { pg_sys::max_replication_slots },
            peers + 1 + mmts_core::config::COMMIT_ORIGINS,
        ),
        // SAFETY: GUC globals, read on the main thread (as above).
        ("max_wal_senders", unsafe { pg_sys::max_wal_senders }, peers + 2),
        ("max_worker_processes", unsafe { pg_sys::max_worker_processes }, peers + mmts_core::config::EXTRA_WORKERS),
    ];
    for (setting, have, need) in needs {
        if have < need {
            refuse(
                PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
                &format!("{setting} = {have} leaves no room for node {id}: {need} needed"),
                Some(&format!("Raise {setting} on every node (restarting them one at a time), then add the node.")),
            );
        }
    }
    // Committed on every live node, as a write of a replicated table.
    commit::note_write();
    Spi::run_with_args(
        "INSERT INTO mtm.added_nodes(node_id, conn_string) VALUES ($1, $2)",
        &[(id as i32).into(), conn_string.into()],
    )
    .unwrap_or_else(|e| refuse(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, &e.to_string(), None));
    ereport!(
        PgLogLevel::NOTICE,
        PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
        format!("node {id} added to the cluster"),
        format!(
            "Copy a node with pg_basebackup -R, give the copy multimaster.node_id = {id}, the connection strings of all {id} nodes and recovery_target_name = 'mtm_join_{id}_from_<node copied>', start it, then run SELECT mtm.join_node({id}) on the node copied."
        )
    );
    id as i32
}

/// How long [`join_node`] waits for each thing it needs. Making a logical slot under a write
/// load takes tens of seconds: PostgreSQL's snapshot builder moves on at each record of the
/// running transactions, which the background writer logs every 15 s.
const JOIN_WAIT: Duration = Duration::from_secs(120);

/// Lets node `node_id`, a copy of this node being recovered with `recovery_target_name =
/// 'mtm_join_<node_id>_from_<this node>'`, go at a point where this node's state is whole
/// (superusers only): a restore point of that name, whose position is returned. The copy
/// stops there, promotes itself, and streams each node's changes from where this node's
/// copy ends: this node's from the restore point, the others' from this node's replication
/// origins (each of the other nodes must have made its slot for the new node by then).
///
/// The point is taken when no receiver here holds a transaction set aside (applied out of
/// stream order): otherwise a stream's position would be past a transaction the copy lacks.
#[pg_extern(volatile)]
fn join_node(node_id: i32) -> String {
    let config = cluster_admin("mtm.join_node");
    let me = config.node_id;
    let id = node_id as u32;
    // A node added a moment ago (the receivers read the tables only every second).
    let (dropped, added) = read_nodes();
    status::set_nodes(dropped, &added);
    let configured = status::configured(config);
    if id == me.0 || !(1..=gucs::MAX_NODES as u32).contains(&id) || configured & bit(NodeId(id)) == 0 {
        refuse(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            &format!("node {node_id} is not a node this node can let join"),
            Some("Add the node with mtm.add_node first; run mtm.join_node on the node it is a copy of."),
        );
    }
    if status::connected(id) {
        refuse(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            &format!("node {id} has joined already: this node streams from it"),
            None,
        );
    }
    let view = status::current(config).view;
    let others = configured & !bit(NodeId(id));
    if view.state != mmts_core::membership::State::Online || view.members != others {
        refuse(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            &format!(
                "node {id} can join only while every other node is an online member (members now: {})",
                mmts_core::membership::format_mask(view.members)
            ),
            Some("Wait until mtm.get_cluster_state() shows all other nodes as members."),
        );
    }
    // Every other node's slot for the new node must start before what this node applied of
    // that node's stream (applied, or found to hold nothing for this node): the new node
    // streams from where this node's copy ends.
    let slot = mmts_core::replication::slot_name(id);
    for peer in status::peers(config).into_iter().filter(|n| n.id.0 != id) {
        let query = format!(
            "SELECT confirmed_flush_lsn FROM pg_catalog.pg_replication_slots WHERE slot_name = '{slot}' AND confirmed_flush_lsn IS NOT NULL"
        );
        let start = wait_for_value(&format!("node {}'s slot for node {id}", peer.id), || {
            let mut conn = crate::libpq::Connection::connect(&peer.conninfo.to_string(), "mmts_join", false).ok()?;
            conn.query_value(&query, Duration::from_secs(5)).ok().flatten()
        });
        let start = parse_lsn(&start).unwrap_or(u64::MAX);
        wait_for_value(
            &format!("this node to apply node {}'s changes as far as {}", peer.id, format_lsn(start)),
            || (status::applied_lsn(peer.id.0) >= start).then_some(()),
        );
    }
    wait_for_value(&format!("this node's slot for node {id}"), || {
        Spi::get_one_with_args::<bool>(
            "SELECT true FROM pg_catalog.pg_replication_slots WHERE slot_name = $1 AND confirmed_flush_lsn IS NOT NULL",
            &[slot.as_str().into()],
        )
        .ok()
        .flatten()
    });
    let name = crate::backend::cstring(&join_point_name(id, me.0));
    let since = Instant::now();
    let end = wait_for_value("a moment with no transaction set aside", || {
        let end =
            status::with_set_asides_held(|held| (!held).then(|| unsafe { pg_sys::XLogRestorePoint(name.as_ptr()) }));
        end.inspect(|&end| unsafe { pg_sys::XLogFlush(end) })
    });
    log(format!(
        "mmts: node {id} may join at {} (restore point {}, found after {} ms)",
        format_lsn(end),
        name.to_string_lossy(),
        since.elapsed().as_millis()
    ));
    format_lsn(end)
}

/// The name of the restore point a copy of node `donor` stops at to join as node `node`.
fn join_point_name(node: u32, donor: u32) -> String {
    format!("{}{donor}", join_point_prefix(node))
}

fn join_point_prefix(node: u32) -> String {
    format!("mtm_join_{node}_from_")
}

/// Whether this node may replicate: a node added to the running cluster must have been made
/// through a join point (a copy started any other way has another node's data without the
/// positions that go with it: replicating would apply transactions twice or lose some).
pub fn made_to_join(me: u32) -> bool {
    status::added() & bit(NodeId(me)) == 0 || joined(me)
}

/// Whether this server was made through a join point to join as node `me`.
pub fn joined(me: u32) -> bool {
    join_point(me).is_some()
}

/// Where the copy this node was made from ends in node `donor`'s WAL, if this node joined
/// the cluster as a copy of `donor` (see [`join_node`]).
pub fn joined_from(me: u32, donor: u32) -> Option<u64> {
    join_point(me).filter(|&(d, _)| d == donor).map(|(_, end)| end)
}

/// The join point this server was made through to join as node `me`: the node copied and
/// the end of the restore point, where recovery stopped, as the history file of the timeline
/// it then began says (`<timeline>\t<switch point>\tat restore point "<name>"`).
fn join_point(me: u32) -> Option<(u32, u64)> {
    let timeline = unsafe { pg_sys::GetWALInsertionTimeLine() };
    let history = std::fs::read_to_string(format!("pg_wal/{timeline:08X}.history")).ok()?;
    let prefix = format!("at restore point \"{}", join_point_prefix(me));
    history.lines().find_map(|line| {
        let mut fields = line.split('\t').skip(1);
        let end = parse_lsn(fields.next()?)?;
        let donor = fields.next()?.strip_prefix(&prefix)?.strip_suffix('"')?.parse().ok()?;
        Some((donor, end))
    })
}

/// Calls `f` every 10 ms until it has a value; gives up with an error after [`JOIN_WAIT`].
fn wait_for_value<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let since = Instant::now();
    loop {
        if let Some(value) = f() {
            return value;
        }
        if since.elapsed() > JOIN_WAIT {
            refuse(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                &format!("gave up waiting for {what} after {} s", JOIN_WAIT.as_secs()),
                Some("See the server logs of the nodes; mtm.join_node can be run again."),
            );
        }
        crate::backend::nap(10);
    }
}

/// The cluster's configuration, for a function that changes the cluster (superusers only).
fn cluster_admin(function: &str) -> &'static mmts_core::config::ClusterConfig {
    let Mode::Multimaster(config) = gucs::mode() else {
        refuse(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, "this server is not a multimaster node", None);
    };
    if !unsafe { pg_sys::superuser() } {
        refuse(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            &format!("permission denied for {function}"),
            Some("Only superusers may change the nodes of the cluster."),
        );
    }
    config
}
