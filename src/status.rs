//! What every receiver reports about its peer, in shared memory, and the status functions
//! that read it: `mtm.get_nodes_state()` and `mtm.get_cluster_state()`.

use mmts_core::config::Mode;
use mmts_core::replication::format_lsn;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, pg_sys, PGRXSharedMemory, PgLwLock};

use mmts_core::config::ClusterConfig;
use mmts_core::membership::{self, bit, format_mask, Mask, Report, State, View};
use mmts_core::NodeId;

use crate::gucs::{self, MAX_NODES};

/// One peer as its receiver sees it.
#[derive(Clone, Copy, Default)]
pub struct PeerStatus {
    /// The receiver is streaming from the peer now.
    pub connected: bool,
    /// When the receiver last heard from the peer (0: never).
    pub last_message_time: pg_sys::TimestampTz,
    /// The peer's WAL end as last reported by it.
    pub peer_wal_end: u64,
    /// Position in the peer's WAL up to which everything for this node is applied here.
    pub applied_lsn: u64,
    /// Commit time (on the peer) of the last transaction applied here.
    pub applied_commit_time: pg_sys::TimestampTz,
    pub transactions_applied: u64,
    /// The receiver has applied what the peer had to send when it connected.
    pub caught_up: bool,
    /// End LSN (in the peer's WAL) of the last of its transactions committed or rolled back
    /// here: those end in stream order (prepares may not).
    pub ended_lsn: u64,
    /// The peer's last heartbeat, and when it came (0: never).
    pub report: Report,
    pub report_time: pg_sys::TimestampTz,
}

/// How far this node has applied node `id`'s stream: the end of the last of its
/// transactions committed or rolled back here (see `mmts_core::twopc::dependencies_met`).
pub fn applied(id: u32) -> u64 {
    peer(id).ended_lsn
}

#[derive(Clone, Copy)]
pub struct Peers {
    peers: [PeerStatus; MAX_NODES as usize],
    /// The members this node last counted, and how many times that changed.
    members: Mask,
    generation: u64,
    /// Nodes removed from the cluster (`mtm.dropped_nodes`, see `nodes`).
    dropped: Mask,
}

impl Default for Peers {
    fn default() -> Self {
        Peers { peers: [PeerStatus::default(); MAX_NODES as usize], members: 0, generation: 0, dropped: 0 }
    }
}

// SAFETY: plain old data, no pointers.
unsafe impl PGRXSharedMemory for Peers {}

static PEERS: PgLwLock<Peers> = unsafe { PgLwLock::new(c"mmts peers") };

/// Reserves the shared memory; called from `_PG_init` while preloading.
pub fn init() {
    pg_shmem_init!(PEERS);
}

/// Updates what is known about peer `id` (1-based).
pub fn update(id: u32, f: impl FnOnce(&mut PeerStatus)) {
    f(&mut PEERS.exclusive().peers[id as usize - 1]);
}

/// Peer `id`'s last heartbeat and when it came (0: none yet).
pub fn last_report(id: u32) -> (Report, pg_sys::TimestampTz) {
    let p = peer(id);
    (p.report, p.report_time)
}

/// Whether this node's receiver is streaming from peer `id` now.
pub fn connected(id: u32) -> bool {
    peer(id).connected
}

fn peer(id: u32) -> PeerStatus {
    PEERS.share().peers[id as usize - 1]
}

/// Nodes removed from the cluster.
pub fn dropped() -> Mask {
    PEERS.share().dropped
}

pub fn set_dropped(mask: Mask) {
    PEERS.exclusive().dropped = mask;
}

/// The nodes of the cluster now: those configured, less those dropped.
pub fn configured(config: &ClusterConfig) -> Mask {
    config.nodes.iter().fold(0, |m, n| m | bit(n.id)) & !dropped()
}

/// The peers of the cluster now (dropped ones left out).
pub fn peers(config: &ClusterConfig) -> impl Iterator<Item = &mmts_core::config::NodeConfig> {
    let dropped = dropped();
    config.peers().filter(move |n| dropped & bit(n.id) == 0)
}

/// Records a peer's heartbeat.
pub fn record_report(from: u32, report: Report) {
    if from == 0 || from > MAX_NODES as u32 {
        return;
    }
    let now = now();
    update(from, |p| {
        p.report = report;
        p.report_time = now;
    });
}

/// This node's view of the cluster now (see [`membership::view`]).
pub struct Current {
    pub view: View,
    /// How many times the members this node counts changed since it started.
    pub generation: u64,
    /// What this node says of itself in its heartbeats.
    pub report: Report,
}

pub fn current(config: &ClusterConfig) -> Current {
    let me = config.node_id;
    let fresh_after = now() - gucs::HEARTBEAT_RECV_TIMEOUT.get() as i64 * 1000;
    let shared = *PEERS.share();
    let configured = config.nodes.iter().fold(0, |m, n| m | bit(n.id)) & !shared.dropped;
    let peer = |id: NodeId| &shared.peers[id.0 as usize - 1];
    let reports: Vec<Option<Report>> = (1..=MAX_NODES as u32)
        .map(NodeId)
        .map(|id| {
            (id != me && configured & bit(id) != 0 && peer(id).connected && peer(id).report_time > fresh_after)
                .then_some(peer(id).report)
        })
        .collect();
    let live = || config.peers().filter(|n| configured & bit(n.id) != 0 && peer(n.id).connected);
    let sees = live().fold(bit(me), |m, n| m | bit(n.id));
    // A member stays caught up (it takes part in every commit); another node is once it has
    // heard from every peer it streams from, and applied what those caught up had sent.
    let ready = shared.members & bit(me) != 0
        || live().all(|n| match reports[n.id.0 as usize - 1] {
            Some(r) => !r.ready || peer(n.id).caught_up,
            None => false,
        });
    let view = if configured & bit(me) == 0 {
        View { partition: 0, members: 0, state: State::Dropped, excluded_by: None }
    } else {
        membership::view(me, configured, sees, ready, &reports)
    };
    let wal_end = unsafe { pg_sys::GetFlushRecPtr(std::ptr::null_mut()) };
    let report = Report { sees, partition: view.partition, members: view.members, ready, wal_end };
    let mut generation = shared.generation;
    if view.members != shared.members {
        let mut shared = PEERS.exclusive();
        let changed = view.members != shared.members;
        if changed {
            shared.members = view.members;
            shared.generation += 1;
        }
        generation = shared.generation;
        drop(shared);
        if changed {
            ereport!(
                PgLogLevel::LOG,
                PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
                format!(
                    "mmts: node {me} is {}: members {} (generation {generation})",
                    view.state.name(),
                    format_mask(view.members)
                )
            );
        }
    }
    Current { view, generation, report }
}

fn now() -> pg_sys::TimestampTz {
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// Application names of the walsenders connected to this node (one per peer receiver).
fn walsender_clients() -> Vec<String> {
    Spi::connect(|client| {
        client
            .select(
                "SELECT application_name::text FROM pg_stat_replication WHERE application_name LIKE 'mmts_node_%'",
                None,
                &[],
            )
            .map(|rows| rows.filter_map(|r| r.get::<String>(1).ok().flatten()).collect())
            .unwrap_or_default()
    })
}

/// The application name a receiver on node `id` connects to its peers with.
pub fn application_name(id: u32) -> String {
    format!("mmts_node_{id}")
}

/// Every configured node as this node sees it. Connection strings show no passwords.
#[pg_extern(volatile, parallel_safe)]
fn get_nodes_state() -> TableIterator<
    'static,
    (
        name!(node_id, i32),
        name!(conn_string, String),
        name!(is_self, bool),
        name!(state, String),
        name!(receiver_connected, Option<bool>),
        name!(walsender_connected, Option<bool>),
        name!(lag_bytes, Option<i64>),
        name!(lag, Option<pgrx::datum::Interval>),
        name!(applied_lsn, Option<String>),
        name!(transactions_applied, Option<i64>),
        name!(last_message_time, Option<pgrx::datum::TimestampWithTimeZone>),
    ),
> {
    let Mode::Multimaster(config) = gucs::mode() else {
        return TableIterator::new(Vec::new());
    };
    let walsenders = walsender_clients();
    let cur = current(config);
    let status_dropped = dropped();
    let rows: Vec<_> = config
        .nodes
        .iter()
        .map(|n| {
            let conn = n.conninfo.masked();
            if n.id == config.node_id {
                let state = if gucs::synchronous() || cur.view.state == State::Dropped {
                    cur.view.state.name()
                } else {
                    "online"
                };
                return (n.id.0 as i32, conn, true, state.into(), None, None, None, None, None, None, None);
            }
            let p = peer(n.id.0);
            let walsender = walsenders.contains(&application_name(n.id.0));
            let dropped = status_dropped & bit(n.id) != 0;
            let lag_bytes = p.peer_wal_end.saturating_sub(p.applied_lsn) as i64;
            let lag_us = if !p.connected || p.applied_commit_time == 0 || lag_bytes == 0 {
                0
            } else {
                (now() - p.applied_commit_time).max(0)
            };
            let state = if dropped {
                "dropped"
            } else if !p.connected {
                "unreachable"
            } else if !gucs::synchronous() || cur.view.members & bit(n.id) != 0 {
                "online"
            } else if cur.view.partition & bit(n.id) != 0 {
                "recovery"
            } else {
                "isolated"
            };
            (
                n.id.0 as i32,
                conn,
                false,
                state.into(),
                Some(p.connected),
                Some(walsender),
                Some(if p.last_message_time == 0 { 0 } else { lag_bytes }),
                Some(pgrx::datum::Interval::from_micros(lag_us)),
                Some(format_lsn(p.applied_lsn)),
                Some(p.transactions_applied as i64),
                (p.last_message_time != 0)
                    .then(|| unsafe {
                        pgrx::datum::TimestampWithTimeZone::from_datum(p.last_message_time.into(), false)
                    })
                    .flatten(),
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// This node and the cluster as it sees them.
#[pg_extern(volatile, parallel_safe)]
fn get_cluster_state() -> TableIterator<
    'static,
    (
        name!(node_id, i32),
        name!(state, String),
        name!(nodes_configured, i32),
        name!(nodes_connected, i32),
        name!(has_majority, bool),
        name!(members, Vec<i32>),
        name!(generation, i64),
    ),
> {
    let row = match gucs::mode() {
        Mode::Standalone => (0, "standalone".to_string(), 0, 0, false, Vec::new(), 0),
        Mode::Multimaster(config) => {
            let configured = configured(config);
            let connected = 1 + peers(config).filter(|n| peer(n.id.0).connected).count() as i32;
            let cur = current(config);
            let (state, members) = if gucs::synchronous() || cur.view.state == State::Dropped {
                (cur.view.state.name(), cur.view.members)
            } else {
                ("online", configured)
            };
            let configured = configured.count_ones() as i32;
            (
                config.node_id.0 as i32,
                state.to_string(),
                configured,
                connected,
                connected * 2 > configured,
                membership::nodes(members).map(|n| n.0 as i32).collect(),
                cur.generation as i64,
            )
        }
    };
    TableIterator::once(row)
}
