//! The heartbeat worker (`mmts heartbeat`): every `multimaster.heartbeat_send_timeout` it
//! tells every peer what this node sees (`Signal::Heartbeat`: the nodes it hears, the members
//! it counts, whether it is caught up, how far its WAL reaches), over a plain connection of its
//! own to each peer (see `outbox`). A peer it cannot reach gets no heartbeat (not one through
//! WAL, which it would read late, after the writes it claims to cover). A peer that has not
//! had this node's report for `heartbeat_recv_timeout` counts it unreachable
//! (`status::current`). Each heartbeat also carries this node's monotonic clock and the read
//! lease it grants the peer (`status::grant_lease`, `mmts_core::lease`); on a clean shutdown
//! the worker gives back the leases this node holds.
//!
//! It is a process of its own so that heartbeats go on while the receivers are busy: a
//! receiver applying one long statement (an index build, a table rewrite) neither listens nor
//! sends while it runs, and the peers would drop a node that is merely slow. It connects to
//! its peers without waiting, so that a peer out of reach delays no other peer's heartbeat.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mmts_core::membership::Report;
use mmts_core::twopc::Signal;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::outbox::Outbox;
use crate::workers::{connect_to_database, reload_if_asked, worker_start};
use crate::{gucs, status};

/// Registers the heartbeat worker (in the postmaster, while preloading).
pub fn register() {
    BackgroundWorkerBuilder::new("mmts heartbeat")
        .set_type("mmts heartbeat")
        .set_library("mmts")
        .set_function("mmts_heartbeat_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

/// How often a connection that failed is tried again.
const RECONNECT: Duration = Duration::from_secs(1);

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn mmts_heartbeat_main(_arg: pg_sys::Datum) {
    let Some(config) = worker_start() else { return };
    // Heartbeats go through WAL to a peer without `mtm.deliver_signals` yet (before its
    // CREATE EXTENSION): WAL messages belong to a database.
    connect_to_database(config);
    let application_name = format!("{}_heartbeat", status::application_name(config.node_id.0));
    // Each peer's outbox, and when it was made.
    let mut outboxes: BTreeMap<u32, (Outbox, Instant)> = BTreeMap::new();
    let mut last_sent: Option<Instant> = None;
    let mut throttle = mmts_core::flow::Throttle::default();
    while !BackgroundWorker::sigterm_received() {
        reload_if_asked();
        let every = Duration::from_millis(gucs::HEARTBEAT_SEND_TIMEOUT.get() as u64);
        let silence = Duration::from_millis(gucs::HEARTBEAT_RECV_TIMEOUT.get() as u64);
        if !gucs::synchronous() {
            outboxes.clear();
        } else if last_sent.is_none_or(|t| t.elapsed() >= every) {
            last_sent = Some(Instant::now());
            crate::twophase::sync_log();
            let current = status::current(config);
            status::throttle_commits(config, &current, &mut throttle);
            let peers = status::peers(config);
            let echoes: Vec<i64> = peers.iter().map(|p| status::grant_lease(p.id.0, current.granting)).collect();
            // The WAL end read after the leases were granted: a holder whose lease begins again
            // applies this much first (see `status::grant_lease`).
            let report = Report { wal_end: status::wal_flushed(), ..current.report };
            outboxes.retain(|id, _| peers.iter().any(|p| p.id.0 == *id));
            for (peer, &echo) in peers.iter().zip(&echoes) {
                let make = || {
                    let conninfo = peer.conninfo.to_string();
                    (Outbox::start(&conninfo, &application_name, peer.id.0, config.node_id), Instant::now())
                };
                let (outbox, made) = outboxes.entry(peer.id.0).or_insert_with(make);
                // A connection lost (no heartbeats went to the peer since), or one the peer has
                // not answered on for as long as it waits for a heartbeat: a new one.
                if (!outbox.connected() || outbox.waiting_for() > silence) && made.elapsed() >= RECONNECT {
                    (*outbox, *made) = make();
                }
                let sent_at = crate::backend::monotonic();
                outbox.push(vec![Signal::Heartbeat { from: config.node_id, report, sent_at, echo }]);
            }
        } else {
            for (outbox, _) in outboxes.values_mut() {
                outbox.pump();
            }
        }
        // While a connection is under way, or a result is awaited, look again soon.
        let pending = outboxes.values().any(|(o, _)| o.pending());
        let next = last_sent.map_or(every, |t| every.saturating_sub(t.elapsed()));
        let wait = if pending { next.min(Duration::from_millis(5)) } else { next };
        if !BackgroundWorker::wait_latch(Some(wait.max(Duration::from_millis(1)))) {
            break;
        }
    }
    release_leases(config.node_id, &mut outboxes);
}

/// On a clean shutdown: this node answers no more reads, and tells its peers (for up to half a
/// second), so that they need not keep it among their members until their promises end (see
/// `mmts_core::lease`).
fn release_leases(me: mmts_core::NodeId, outboxes: &mut BTreeMap<u32, (Outbox, Instant)>) {
    status::release_leases();
    crate::logging::log(format!("mmts: node {me} shuts down: it answers no more reads and gives its read leases back"));
    for (outbox, _) in outboxes.values_mut() {
        outbox.push(vec![Signal::LeaseReleased { from: me, sent_at: crate::backend::monotonic() }]);
    }
    let until = Instant::now() + Duration::from_millis(500);
    while outboxes.values().any(|(o, _)| o.pending()) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
        for (outbox, _) in outboxes.values_mut() {
            outbox.pump();
        }
    }
}
