//! Receiver background workers: one per peer. A receiver streams the peer's changes from the
//! slot `mtm_slot_<this node>` on the peer, in the mmts protocol, and applies them under the
//! replication origin `mtm_node_<peer>`, so they are never sent on, and so that after a crash
//! it resumes exactly after the last transaction it committed.
//!
//! It also creates, on this node, what the peer's receiver needs: the slot `mtm_slot_<peer>`.
//! A peer that cannot be reached is retried with back-off; the worker itself never exits on
//! a connection problem. An error while applying (e.g. a constraint only this node has) ends
//! the worker with that error in the log; the postmaster starts it again after a delay.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use mmts_core::config::ClusterConfig;
use mmts_core::forward::{forwards_wanted, Forwards, Notices};
use mmts_core::membership::bit;
use mmts_core::replication::{format_lsn, origin_name, slot_name, status_update, Progress, ServerMessage};
use mmts_core::twopc::{Signal, SIGNAL_PREFIX};
use mmts_core::wire;
use mmts_core::NodeId;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::apply::Applier;
use crate::indoubt::Resolver;
use crate::libpq::{Connection, CopyData, PqError};
use crate::logging::log;
use crate::outbox::Outbox;
use crate::twophase;
use crate::workers::{connect_to_database, reload_if_asked, worker_start};
use crate::{gucs, nodes, status};

/// When this receiver started (see `apply::out_of_reach`).
static STARTED: AtomicI64 = AtomicI64::new(0);

pub fn started() -> i64 {
    STARTED.load(Ordering::Relaxed)
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn mmts_receiver_main(arg: pg_sys::Datum) {
    STARTED.store(crate::backend::now(), Ordering::Relaxed);
    let peer_id = arg.value() as u32;
    let Some(config) = worker_start() else { return };
    // As PostgreSQL's apply workers: only replica triggers fire, names are always qualified,
    // and applied transactions commit asynchronously (the peer learns that a position is
    // durable here only once the local WAL is flushed past its commit: see `Progress`).
    for (name, value) in
        [(c"session_replication_role", c"replica"), (c"search_path", c""), (c"synchronous_commit", c"off")]
    {
        // SAFETY: the worker's main thread; static C strings.
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_OVERRIDE,
            )
        };
    }
    connect_to_database(config);

    let mut resolver = Resolver::new(NodeId(peer_id));
    let dropped = nodes::load_nodes();
    if dropped & bit(config.node_id) != 0 {
        return log(format!("mmts: this node was dropped from the cluster: no replication from node {peer_id}"));
    }
    if dropped & bit(NodeId(peer_id)) != 0 {
        return retire(config, peer_id, &mut resolver);
    }
    if !nodes::made_to_join(config.node_id.0) {
        ereport!(
            PgLogLevel::WARNING,
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("mmts: node {} was added to the cluster but this server was not made through a join point: no replication from node {peer_id}", config.node_id),
            format!("Make the node again: pg_basebackup of another node with recovery_target_name = 'mtm_join_{}_from_<that node>', then mtm.join_node({}) there.", config.node_id, config.node_id)
        );
        return;
    }
    let Some(peer) = status::node(config, peer_id) else {
        return log(format!("mmts: node {peer_id} is neither configured nor added: no replication from it"));
    };
    let joining = nodes::joined_from(config.node_id.0, peer_id).filter(|_| {
        let name = crate::backend::cstring(&origin_name(peer_id));
        // SAFETY: inside the worker's transaction; `name` outlives the closure.
        BackgroundWorker::transaction(|| unsafe {
            let id = pg_sys::replorigin_by_name(name.as_ptr(), true);
            id == pg_sys::InvalidRepOriginId as pg_sys::RepOriginId || pg_sys::replorigin_get_progress(id, false) == 0
        })
    });
    if joining.is_some() {
        // Before this node applies anything of the peer: its sequences are the peer's.
        nodes::spread_sequences_after_join();
    }
    // A node starting as usual makes the slot at once, before it writes anything the peer
    // would miss; a node that joined as a copy, by a worker of its own (see `SlotMaker`).
    if !nodes::joined(config.node_id.0) {
        BackgroundWorker::transaction(|| create_slot(peer_id));
    }
    let mut slot = SlotMaker::new(peer_id);
    slot.tick();
    let origin = BackgroundWorker::transaction(|| {
        let name = crate::backend::cstring(&origin_name(peer_id));
        // SAFETY: inside the worker's transaction; `name` outlives the block.
        unsafe {
            let mut id = pg_sys::replorigin_by_name(name.as_ptr(), true);
            if id == pg_sys::InvalidRepOriginId as pg_sys::RepOriginId {
                id = pg_sys::replorigin_create(name.as_ptr());
            }
            crate::commit_origin::create();
            // A node that joined as a copy of the peer has the peer's changes up to where the
            // copy ends, and none after (see `nodes::join_node`).
            if let Some(end) = joining {
                pg_sys::replorigin_advance(id, end, pg_sys::InvalidXLogRecPtr as u64, false, true);
                log(format!("mmts: this node joined as a copy of node {peer_id} ending at {}", format_lsn(end)));
            }
            id
        }
    });
    // SAFETY: the worker's main thread, outside a transaction; `origin` exists (made above).
    // The session's origin is a plain global.
    unsafe {
        crate::pg_internals::replorigin_session_setup(origin);
        pg_sys::replorigin_session_origin = origin;
    }

    // Transactions of the peer prepared by an earlier run of this worker are no longer tracked,
    // nor claimed.
    twophase::unregister_applied(peer_id, None);
    status::release(peer_id, None);
    let applied = unsafe { pg_sys::replorigin_session_get_progress(false) };
    status::update(peer_id, |p| {
        p.ended_lsn = applied;
        p.resumed_at = 0;
        p.wait = status::Wait::default();
    });

    let mut backoff = Duration::from_millis(200);
    // Kept across reconnects: transactions it set aside are not sent again.
    let mut applier = Applier::new(peer_id, config.node_id.0);
    // Also written once the stream is cut: the last transactions ended may be just before.
    let mut ended = EndedSignal::default();
    let application_name = status::application_name(config.node_id.0);
    let mut reconnecting: Option<Instant> = None;
    while !BackgroundWorker::sigterm_received() {
        let started = Instant::now();
        // An error applying the peer's stream stops this worker (it starts again 5 s later);
        // what it was shows in mtm.get_nodes_state() until the stream is applied again.
        let result = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
            stream(
                &peer.conninfo.to_string(),
                &application_name,
                config,
                peer_id,
                &mut resolver,
                &mut applier,
                &mut slot,
                &mut ended,
            )
        }))
        .catch_others(|e| {
            let (pgrx::pg_sys::panic::CaughtError::PostgresError(r)
            | pgrx::pg_sys::panic::CaughtError::ErrorReport(r)
            | pgrx::pg_sys::panic::CaughtError::RustPanic { ereport: r, .. }) = &e;
            status::set_apply_error(peer_id, r.message());
            e.rethrow()
        })
        .execute();
        applier.reset_stream();
        // Read again at once, still counted as connected (and caught up, if it was): the stream
        // goes on from the position it was read up to, so the peer misses nothing of this node
        // and neither node counts the other out meanwhile. The peer's walsender of the old
        // connection may hold the slot for a moment longer (55006): tried again meanwhile.
        let slot_in_use = matches!(&result, Err(e) if e.sqlstate.as_deref() == Some("55006"));
        match &result {
            Ok(Ended::Reconnect) => reconnecting = Some(Instant::now()),
            _ if slot_in_use && reconnecting.is_some_and(|at| at.elapsed() < Duration::from_secs(5)) => {}
            _ => reconnecting = None,
        }
        if reconnecting.is_some() {
            crate::backend::nap(50);
            continue;
        }
        status::update(peer_id, |p| {
            p.connected = false;
            p.caught_up = false;
        });
        if status::dropped() & bit(config.node_id) != 0 {
            return log(format!("mmts: this node was dropped from the cluster: replication from node {peer_id} stops"));
        }
        if status::dropped() & bit(NodeId(peer_id)) != 0 {
            return retire(config, peer_id, &mut resolver);
        }
        match result {
            Ok(_) => break, // asked to stop
            Err(e) => log(format!(
                "mmts: replication from node {peer_id} interrupted: {e}; retrying in {} ms",
                backoff.as_millis()
            )),
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(200);
        }
        // The peer out of reach: its transactions in doubt here are settled with the others.
        ended.tick(config, peer_id);
        resolver.tick(config);
        slot.tick();
        if !BackgroundWorker::wait_latch(Some(backoff)) {
            break;
        }
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// The peer was dropped from the cluster: once what it left in doubt here is settled, removes
/// its slot and origin and returns (the worker then ends for good).
fn retire(config: &ClusterConfig, peer_id: u32, resolver: &mut Resolver) {
    log(format!("mmts: node {peer_id} was dropped from the cluster; settling what it left in doubt here"));
    status::update(peer_id, |p| {
        p.connected = false;
        p.caught_up = false;
    });
    while !BackgroundWorker::sigterm_received() {
        resolver.tick(config);
        if crate::indoubt::prepared(NodeId(peer_id), Duration::ZERO).is_empty() && nodes::forget(peer_id) {
            log(format!("mmts: node {peer_id} is gone from this node: its slot and origin are dropped"));
            return;
        }
        BackgroundWorker::wait_latch(Some(Duration::from_secs(1)));
    }
}

/// Refuses a peer that runs another major version of PostgreSQL: the nodes of a cluster run
/// the same one (mmts sends rows in text form, but its prepared transactions, commit records
/// and catalogs are only tested between equal versions).
fn same_major_version(conn: &Connection, peer_id: u32) -> Result<(), PqError> {
    let own = pgrx::pg_sys::PG_VERSION_NUM as i32;
    let peer = conn.server_version();
    if peer / 10000 == own / 10000 {
        return Ok(());
    }
    let version = |v: i32| format!("{}.{}", v / 10000, v % 10000);
    Err(PqError {
        message: format!(
            "node {peer_id} runs PostgreSQL {} and this node {}: the nodes of an mmts cluster must run the same major version",
            version(peer),
            version(own)
        ),
        sqlstate: Some("0A000".into()),
    })
}

/// Why a stream ended without an error.
enum Ended {
    /// The worker was asked to stop.
    Stop,
    /// To be read again at once, with other options (see `stream`).
    Reconnect,
}

/// Streams from the peer until SIGTERM or a reason to read it again at once (`Ok`), or a
/// connection problem (`Err`).
fn stream(
    conninfo: &str,
    application_name: &str,
    config: &ClusterConfig,
    peer_id: u32,
    resolver: &mut Resolver,
    applier: &mut Applier,
    slot: &mut SlotMaker,
    ended: &mut EndedSignal,
) -> Result<Ended, PqError> {
    let mut conn = Connection::connect_replication(conninfo, application_name)?;
    same_major_version(&conn, peer_id)?;
    let mut outbox = Outbox::new(conninfo, &format!("{application_name}_signals"), peer_id, config.node_id);
    let waits = Waits::new(conn.socket(), outbox.socket());
    let (start, confirmed) = resume_point(&mut conn, config, peer_id);
    // In synchronous mode, with `multimaster.forwarding`, the peer also sends what it committed
    // of other nodes' transactions that left this node out (see `apply::forwarded`): whole
    // while a node this one must catch up with is out of reach, else as notices. The stream
    // is then read from where the slot confirmed it, which notices held keep back, with this
    // node's own transactions from `start` on.
    let forwarding = gucs::synchronous() && gucs::FORWARDING.get() && crate::apply::forwarding_table_exists();
    let forwards = forwarding.then(|| forwards_wanted(crate::apply::out_of_reach(config, peer_id)));
    let (from, options) = match forwards {
        None => (start, String::new()),
        Some(forwards) => (
            confirmed.unwrap_or(start).min(start),
            format!(
                ", \"mmts_forward\" '{}', \"mmts_forward_notices\" '{}', \"mmts_own_from\" '{}'",
                config.node_id,
                if forwards == Forwards::Notices { "on" } else { "off" },
                format_lsn(start)
            ),
        ),
    };
    conn.exec(&format!(
        "START_REPLICATION SLOT {} LOGICAL {} (\"mmts_protocol\" '{}', \"mmts_streaming\" 'on'{options})",
        slot_name(config.node_id.0),
        format_lsn(from),
        wire::PROTOCOL_VERSION
    ))?;
    applier.set_forwards(forwards);
    if forwarding {
        crate::apply::forget_forwards_before(NodeId(peer_id), start);
    }
    status::update(peer_id, |p| p.connected = true);
    match forwards {
        Some(Forwards::Whole) => log(format!(
            "mmts: streaming from node {peer_id} from {}, with what it forwards (its own transactions from {})",
            format_lsn(from),
            format_lsn(start)
        )),
        Some(Forwards::Notices) if from < start => log(format!(
            "mmts: streaming from node {peer_id} from {}, for the notices of what it forwards (its own transactions from {})",
            format_lsn(from),
            format_lsn(start)
        )),
        _ => log(format!("mmts: streaming from node {peer_id} from {}", format_lsn(start))),
    }

    reload_if_asked();
    let heartbeat = Duration::from_millis(gucs::HEARTBEAT_SEND_TIMEOUT.get() as u64);
    let mut silence = Duration::from_millis(gucs::HEARTBEAT_RECV_TIMEOUT.get() as u64);
    applier.reset_stream();
    let mut link = Link {
        conn,
        peer_id,
        me: config.node_id.0,
        heartbeat,
        last_heard: Instant::now(),
        last_sent: Instant::now() - heartbeat,
        backlog: VecDeque::new(),
        replies: Vec::new(),
    };
    // What this node reports as flushed lets the peer's slot advance and its walsender finish
    // a shutdown.
    // SAFETY: reads this node's WAL insert position (shared memory, under its lock).
    let local_end = unsafe { pg_sys::GetXLogInsertRecPtr() };
    let mut progress = Progress::resumed(confirmed.unwrap_or(from).min(from), start, local_end);
    // The notices held (see `mmts_core::forward::Notices`); where the last message received
    // ended, and where the transaction being received began.
    let mut notices = Notices::default();
    let (mut last_end, mut began_at) = (from, from);
    let mut all_reachable_since = Instant::now();
    let mut caught_up = false;
    let mut looked_for_table = Instant::now();
    let connected_at = crate::backend::now();
    let mut shown = Instant::now();
    loop {
        link.read_available()?;
        outbox.push(std::mem::take(&mut link.replies));
        let listened = Instant::now();
        let mut finished = Vec::new();
        while let Some((end, message)) = link.backlog.pop_front() {
            if !applier.in_transaction() {
                began_at = last_end;
            }
            last_end = end;
            // While a large transaction is applied, signals are still delivered and the peer
            // still hears from this node. While the stream waits in place between attempts (a
            // node catching up waits for a lock or for another stream), transactions in doubt
            // are settled: the lock may be held by one of them (this node's own, prepared
            // before it restarted), and its outcome may be what the other stream waits for.
            let mut keep_up = || {
                link.keep_up(&progress);
                outbox.push(std::mem::take(&mut link.replies));
                if unsafe { !pg_sys::IsTransactionState() } {
                    resolver.tick(config);
                }
            };
            let done = message.and_then(|message| applier.apply(message, &mut keep_up));
            if let Some(why) = applier.take_give_way() {
                return Err(PqError { message: why, sqlstate: None });
            }
            if let Some(why) = applier.take_reread() {
                log(format!("mmts: {why}"));
                return Ok(Ended::Reconnect);
            }
            for (origin, xid, prepared_at) in applier.take_notices() {
                notices.push(began_at, origin, xid, prepared_at);
                progress.hold(notices.hold());
            }
            report_set_aside(peer_id, applier);
            outbox.push(applier.take_signals());
            progress.received(end);
            if done.is_some() {
                // SAFETY: a plain global of this process, on its main thread.
                progress.committed(unsafe { pg_sys::XactLastCommitEnd });
            }
            // Between transactions, everything received is applied (what the peer skipped
            // carries other origins).
            if !applier.in_transaction() {
                progress.caught_up();
            }
            finished.extend(done);
            // Shown at least every tenth of a second while a long backlog is applied (a node
            // catching up reports its progress: see `mmts_core::flow`).
            if link.backlog.is_empty() || shown.elapsed() >= Duration::from_millis(100) {
                shown = Instant::now();
                status::update(peer_id, |p| {
                    p.applied_lsn = progress.applied_lsn();
                    p.peer_wal_end = p.peer_wal_end.max(end);
                });
            }
        }
        finished.extend(applier.retry_waiting(&mut || link.keep_up(&progress)));
        report_set_aside(peer_id, applier);
        outbox.push(applier.take_signals());
        // Caught up: received as far as the peer's WAL reached when it last reported (a report
        // sent since this connection began), with nothing left to apply.
        let (report, reported_at) = status::last_report(peer_id);
        if !caught_up
            && reported_at >= connected_at
            && progress.received_lsn() >= report.wal_end
            && link.backlog.is_empty()
            && !applier.has_waiting()
            && !applier.in_transaction()
        {
            caught_up = true;
            status::update(peer_id, |p| p.caught_up = true);
        }
        if let Some(last) = finished.last() {
            status::update(peer_id, |p| {
                p.applied_commit_time = last.commit_time;
                p.transactions_applied += finished.len() as u64;
                // The stream is applied again.
                p.apply_error_time = 0;
            });
        }
        if !notices.is_empty() {
            let ended = |origin: NodeId, xid: u32, prepared_at: u64| {
                status::applied_through(origin.0) >= prepared_at && twophase::applied_members(origin.0, xid).is_none()
            };
            // SAFETY: read this node's WAL positions (shared memory, under their locks).
            let (local_end, local_flushed) =
                unsafe { (pg_sys::GetXLogInsertRecPtr(), pg_sys::GetFlushRecPtr(std::ptr::null_mut())) };
            notices.drop_ended(ended, local_end, local_flushed);
            progress.hold(notices.hold());
        }
        if !applier.in_transaction() {
            if let Some(why) = switch_forwards(forwards, &notices, config, peer_id, &mut all_reachable_since) {
                log(format!("mmts: {why}"));
                return Ok(Ended::Reconnect);
            }
        }
        if !applier.in_transaction() && unsafe { !pg_sys::IsTransactionState() } {
            ended.tick(config, peer_id);
            resolver.tick(config);
            slot.tick();
            nodes::refresh_nodes();
            if status::dropped() & (bit(NodeId(peer_id)) | bit(config.node_id)) != 0 {
                return Err(PqError { message: "a node was dropped from the cluster".into(), sqlstate: None });
            }
            // `CREATE EXTENSION mmts` ran since this connection began: from now on the peer
            // forwards (see `apply::forwarded`).
            if !forwarding
                && gucs::synchronous()
                && gucs::FORWARDING.get()
                && looked_for_table.elapsed() >= Duration::from_secs(1)
            {
                looked_for_table = Instant::now();
                if crate::apply::forwarding_table_exists() {
                    log(format!(
                        "mmts: mtm.forwarded was created: reading node {peer_id}'s stream again, with what it forwards"
                    ));
                    return Ok(Ended::Reconnect);
                }
            }
        }
        if listened.elapsed() >= heartbeat {
            // Applying, or settling, took a while: the peer was not silent, this node was not
            // listening (nor asking for its replies). It has a heartbeat from now to answer.
            link.last_heard = link.last_heard.max(Instant::now() - heartbeat);
        }
        if link.last_heard.elapsed() > silence {
            return Err(PqError {
                message: format!("no message from node {peer_id} for {} ms", silence.as_millis()),
                sqlstate: None,
            });
        }
        if link.last_sent.elapsed() >= heartbeat {
            link.send_status(&mut progress)?;
        }
        let mut timeout = heartbeat.saturating_sub(link.last_sent.elapsed()).max(Duration::from_millis(1));
        if applier.has_waiting() {
            timeout = timeout.min(Duration::from_millis(1));
        }
        let events = waits.wait(timeout);
        if events & pg_sys::WL_LATCH_SET != 0 {
            // SAFETY: `MyLatch` is this process's latch; main thread.
            unsafe { pg_sys::ResetLatch(pg_sys::MyLatch) };
        }
        outbox.pump();
        if BackgroundWorker::sigterm_received() {
            return Ok(Ended::Stop);
        }
        if reload_if_asked() {
            link.heartbeat = Duration::from_millis(gucs::HEARTBEAT_SEND_TIMEOUT.get() as u64);
            silence = Duration::from_millis(gucs::HEARTBEAT_RECV_TIMEOUT.get() as u64);
        }
        // A receiver stops on SIGTERM only; a stray cancel is not a reason to restart.
        // SAFETY: main thread; a `sig_atomic_t` PostgreSQL's handlers only ever set.
        unsafe { pg_sys::QueryCancelPending = 0 };
        pgrx::check_for_interrupts!();
        link.conn.consume_input()?;
    }
}

/// Makes the slot `mtm_slot_<peer>` the peer streams this node's changes from, in a worker of
/// its own, when the receiver did not at its start: making a logical slot waits until every
/// transaction running then has ended, and some of those may be prepared transactions this
/// receiver is to finish (a node that joined as a copy of another starts with that node's
/// prepared transactions).
struct SlotMaker {
    peer_id: u32,
    ready: bool,
    worker: Option<pgrx::bgworkers::DynamicBackgroundWorker>,
    last_look: Option<Instant>,
}

impl SlotMaker {
    fn new(peer_id: u32) -> SlotMaker {
        SlotMaker { peer_id, ready: false, worker: None, last_look: None }
    }

    /// Looks (at most once a second, outside a transaction) whether the slot exists, and
    /// starts the worker that makes it when none is at work.
    fn tick(&mut self) {
        if self.ready || self.last_look.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        self.last_look = Some(Instant::now());
        let slot = slot_name(self.peer_id);
        self.ready = nodes::in_transaction(|| {
            Spi::get_one_with_args::<bool>(
                "SELECT EXISTS (SELECT FROM pg_catalog.pg_replication_slots WHERE slot_name = $1 AND confirmed_flush_lsn IS NOT NULL)",
                &[slot.as_str().into()],
            )
        })
        .ok()
        .flatten()
        .unwrap_or(false);
        let at_work = self
            .worker
            .as_ref()
            .is_some_and(|w| !matches!(w.pid(), Err(pgrx::bgworkers::BackgroundWorkerStatus::Stopped)));
        if self.ready || at_work {
            return;
        }
        let worker = BackgroundWorkerBuilder::new(&format!("mmts slot maker for node {}", self.peer_id))
            .set_type("mmts slot maker")
            .set_library("mmts")
            .set_function("mmts_slot_maker_main")
            .set_argument(Some(pg_sys::Datum::from(self.peer_id as i64)))
            .enable_spi_access()
            .set_start_time(BgWorkerStartTime::RecoveryFinished)
            .set_restart_time(None)
            .load_dynamic();
        match worker {
            Ok(w) => self.worker = Some(w),
            Err(_) => log(format!(
                "mmts: no background worker free to make the slot for node {}; raise max_worker_processes (retrying)",
                self.peer_id
            )),
        }
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn mmts_slot_maker_main(arg: pg_sys::Datum) {
    let peer_id = arg.value() as u32;
    let Some(config) = worker_start() else { return };
    connect_to_database(config);
    BackgroundWorker::transaction(|| create_slot(peer_id));
}

/// Makes the slot `mtm_slot_<peer>` unless it exists (inside a transaction).
fn create_slot(peer_id: u32) {
    let slot = slot_name(peer_id);
    // A read-only statement: a logical slot cannot be made by a transaction with an xid.
    Spi::connect(|client| {
        client
            .select(
                "SELECT pg_catalog.pg_create_logical_replication_slot($1, 'mmts', false, true)
                  WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_replication_slots WHERE slot_name = $1)",
                None,
                &[slot.as_str().into()],
            )
            .map(|_| ())
    })
    .expect("create the slot for the peer");
}

/// `Signal::Ended` for the peer's stream, written while some node is out of the members (in
/// synchronous mode): a node left out then learns, reading this node's stream, how far it has
/// ended the peer's transactions by what this node forwarded (see `apply::forwarded`).
#[derive(Default)]
struct EndedSignal {
    through: u64,
    at: Option<Instant>,
}

impl EndedSignal {
    /// Between transactions (everything ended so far is committed here).
    fn tick(&mut self, config: &ClusterConfig, peer_id: u32) {
        if !gucs::synchronous() || self.at.is_some_and(|t| t.elapsed() < Duration::from_millis(100)) {
            return;
        }
        let members = status::members();
        let left_out = status::configured(config) & !members & !bit(config.node_id);
        let through = status::applied(peer_id);
        if members == 0 || left_out == 0 || through <= self.through {
            return;
        }
        twophase::emit(&Signal::Ended { stream: NodeId(peer_id), through }, false);
        *self = EndedSignal { through, at: Some(Instant::now()) };
    }
}

/// Tells `nodes::join_node` whether this receiver holds transactions set aside. Called after
/// each step of the applier, so before it prepares or commits a later transaction of the
/// stream (which moves the stream's position past the one set aside).
fn report_set_aside(peer_id: u32, applier: &Applier) {
    thread_local! {
        static REPORTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    let held = applier.has_waiting();
    if held != REPORTED.with(|r| r.replace(held)) {
        status::update(peer_id, |p| p.set_aside = held);
    }
}

/// The replication connection to the peer, and what goes over it.
struct Link {
    conn: Connection,
    peer_id: u32,
    me: u32,
    heartbeat: Duration,
    last_heard: Instant,
    last_sent: Instant,
    /// Received but not yet applied, in order.
    backlog: VecDeque<(u64, Option<wire::Message>)>,
    /// This node's answers to the peer's precommits, for the outbox.
    replies: Vec<Signal>,
}

impl Link {
    /// Reads what has arrived: signals for this node's transactions are delivered at once,
    /// the rest goes to the backlog.
    fn read_available(&mut self) -> Result<(), PqError> {
        let mut heard = false;
        let result = self.read_messages(&mut heard);
        if heard {
            self.last_heard = Instant::now();
            let now = crate::backend::now();
            status::update(self.peer_id, |p| p.last_message_time = now);
        }
        result
    }

    fn read_messages(&mut self, heard: &mut bool) -> Result<(), PqError> {
        loop {
            let CopyData::Message(buf) = self.conn.get_copy_data()? else { return Ok(()) };
            *heard = true;
            match ServerMessage::parse(&buf).map_err(|e| PqError { message: e.to_string(), sqlstate: None })? {
                ServerMessage::XLogData { end, data, .. } => {
                    let messages = wire::decode_frame(data).map_err(|e| PqError {
                        message: format!("malformed mmts message from node {}: {e}", self.peer_id),
                        sqlstate: None,
                    })?;
                    for message in messages {
                        self.replies.extend(deliver_signal(&message, self.peer_id, self.me));
                        if let wire::Message::RollbackPrepared { xid, .. } = message {
                            crate::apply::rolled_back_ahead(xid);
                        }
                        self.backlog.push_back((end, Some(message)));
                    }
                }
                ServerMessage::Keepalive { end, reply_requested, .. } => {
                    self.backlog.push_back((end, None));
                    if reply_requested {
                        self.last_sent = Instant::now() - self.heartbeat;
                    }
                }
            }
        }
    }

    /// Tells the peer what this node received and flushed, asking for a reply (the peer's
    /// keepalive is the heartbeat this node hears).
    fn send_status(&mut self, progress: &mut Progress) -> Result<(), PqError> {
        let now = crate::backend::now();
        let flushed = progress.flushed(unsafe { pg_sys::GetFlushRecPtr(std::ptr::null_mut()) });
        self.conn.put_copy_data(&status_update(progress.received_lsn(), flushed, flushed, now, true))?;
        self.last_sent = Instant::now();
        Ok(())
    }

    /// In the middle of a long apply: reads what arrived, and sends the heartbeat when due.
    /// Connection errors are left for the main loop to find.
    fn keep_up(&mut self, progress: &Progress) {
        let _ = self.conn.consume_input();
        let _ = self.read_available();
        if self.last_sent.elapsed() >= self.heartbeat {
            let now = crate::backend::now();
            let received = progress.received_lsn();
            let flushed = progress.flushed_so_far();
            if self.conn.put_copy_data(&status_update(received, flushed, flushed, now, true)).is_ok() {
                self.last_sent = Instant::now();
            }
        }
    }
}

/// Why the stream must be read again with other forwards, if it must: with notices, once the
/// origin of a notice held is out of reach (then whole forwards bring its transactions); with
/// whole forwards, once every node has been in reach for twice `heartbeat_recv_timeout`.
fn switch_forwards(
    forwards: Option<Forwards>,
    notices: &Notices,
    config: &ClusterConfig,
    peer_id: u32,
    all_reachable_since: &mut Instant,
) -> Option<String> {
    match forwards? {
        Forwards::Notices => {
            let gone = crate::apply::out_of_reach(config, peer_id) & notices.origins();
            (gone != 0).then(|| {
                format!(
                    "node {} is out of reach: reading node {peer_id}'s stream again with what it forwards",
                    mmts_core::membership::format_mask(gone)
                )
            })
        }
        Forwards::Whole => {
            if status::out_of_reach_for(config, 0, Duration::ZERO, started()) != 0 {
                *all_reachable_since = Instant::now();
            }
            let after = Duration::from_millis(2 * gucs::HEARTBEAT_RECV_TIMEOUT.get() as u64);
            (all_reachable_since.elapsed() >= after).then(|| {
                format!("every node is in reach again: reading node {peer_id}'s stream again with notices of what it forwards")
            })
        }
    }
}

/// Where the peer's stream resumes (see `mmts_core::replication::resume_point`): this
/// node's replication origin, or the peer's slot for this node if that confirmed more.
fn resume_point(conn: &mut Connection, config: &ClusterConfig, peer_id: u32) -> (u64, Option<u64>) {
    let origin = unsafe { pg_sys::replorigin_session_get_progress(false) };
    let query = format!(
        "SELECT confirmed_flush_lsn FROM pg_catalog.pg_replication_slots WHERE slot_name = '{}'",
        slot_name(config.node_id.0)
    );
    let confirmed = match conn.query_value(&query, Duration::from_secs(10)) {
        Ok(value) => value.as_deref().and_then(mmts_core::replication::parse_lsn),
        Err(e) => {
            log(format!("mmts: cannot read node {peer_id}'s slot for this node: {e}"));
            None
        }
    };
    let start = mmts_core::replication::resume_point(origin, confirmed);
    // (A new slot's first position is past a new origin's 0: nothing to say then.)
    if start > origin && origin != 0 {
        log(format!(
            "mmts: node {peer_id}'s stream resumes at {}, where its slot says this node confirmed it, past this node's replication origin ({}): transactions that depend on what came before do not wait for it",
            format_lsn(start),
            format_lsn(origin)
        ));
    }
    status::update(peer_id, |p| p.resumed_at = start);
    (start, confirmed)
}

/// What the receiver sleeps on: its latch, its connection's socket, the postmaster's death.
/// Made once per connection (not per wait: that costs an epoll set each time).
struct Waits(*mut pg_sys::WaitEventSet);

impl Waits {
    fn new(socket: pg_sys::pgsocket, signals: Option<pg_sys::pgsocket>) -> Waits {
        // SAFETY: main thread. The set lives in TopMemoryContext until `drop` frees it, and has
        // room for the four events at most added; `MyLatch` is this process's latch.
        unsafe {
            let set = crate::pg_internals::create_wait_event_set(4);
            let none = pg_sys::PGINVALID_SOCKET;
            let events = [
                (pg_sys::WL_SOCKET_READABLE, signals.unwrap_or(none), std::ptr::null_mut()),
                (pg_sys::WL_LATCH_SET, none, pg_sys::MyLatch),
                (pg_sys::WL_SOCKET_READABLE, socket, std::ptr::null_mut()),
                (pg_sys::WL_EXIT_ON_PM_DEATH, none, std::ptr::null_mut()),
            ];
            for (event, fd, latch) in events {
                if event != pg_sys::WL_SOCKET_READABLE || fd != none {
                    pg_sys::AddWaitEventToSet(set, event, fd, latch, std::ptr::null_mut());
                }
            }
            Waits(set)
        }
    }

    /// Waits at most `timeout`; returns the events that occurred (`WL_*`).
    fn wait(&self, timeout: Duration) -> u32 {
        let mut occurred = [pg_sys::WaitEvent::default(); 4];
        // SAFETY: the set is alive (freed only on drop); `occurred` has the room passed.
        let n = unsafe {
            pg_sys::WaitEventSetWait(
                self.0,
                timeout.as_millis() as std::ffi::c_long,
                occurred.as_mut_ptr(),
                occurred.len() as i32,
                pg_sys::PG_WAIT_EXTENSION,
            )
        };
        occurred[..n.max(0) as usize].iter().fold(0, |all, e| all | e.events)
    }
}

impl Drop for Waits {
    fn drop(&mut self) {
        // SAFETY: the set `new` made, freed once, here.
        unsafe { pg_sys::FreeWaitEventSet(self.0) };
    }
}

/// Hands a peer's vote or "finished" about one of this node's transactions to its backend;
/// returns this node's answer to a precommit.
fn deliver_signal(message: &wire::Message, peer: u32, me: u32) -> Option<Signal> {
    let wire::Message::LogicalMessage { transactional: false, prefix, content, .. } = message else { return None };
    if prefix != SIGNAL_PREFIX {
        return None;
    }
    let signal = crate::provenance::admit(peer, content)?;
    let answer = twophase::answer(&signal, mmts_core::NodeId(me));
    twophase::deliver_signal(signal, me);
    answer
}
