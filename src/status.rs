//! What every receiver reports about its peer, in shared memory, and the status functions
//! that read it: `mtm.get_nodes_state()` and `mtm.get_cluster_state()`.

use mmts_core::config::Mode;
use mmts_core::replication::format_lsn;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, pg_sys, PGRXSharedMemory, PgLwLock};

use mmts_core::config::{ClusterConfig, NodeConfig};
use mmts_core::conninfo::ConnInfo;
use mmts_core::flow::{Lag, Throttle};
use mmts_core::membership::{self, bit, format_mask, Mask, Report, State, View};
use mmts_core::NodeId;

use mmts_core::lease::{self, Held, Lease, Unreadable};

use crate::backend::{monotonic, now};
use crate::gucs::{self, MAX_NODES};

/// One peer as its receiver sees it.
#[derive(Clone, Copy)]
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
    /// Where the receiver's stream last resumed: everything before took effect here.
    pub resumed_at: u64,
    /// The peer's last heartbeat, and when it came (0: never).
    pub report: Report,
    pub report_time: pg_sys::TimestampTz,
    /// That heartbeat's `sent_at` (the peer's monotonic clock), and when it came (this node's
    /// monotonic clock): what this node echoes to grant the peer a lease.
    pub report_sent_at: i64,
    pub report_received: i64,
    /// The lease this node holds from the peer (see `mmts_core::lease`).
    pub lease: Held,
    /// Until when (monotonic clock) this node promised the peer to count it among its members.
    pub promised_until: i64,
    /// The receiver holds transactions of the peer set aside, so the stream's position here
    /// is past transactions not yet prepared (see `nodes::join_node`).
    pub set_aside: bool,
    /// The receiver cannot go on: the peer's transaction `xid` waits (since `since`, 0: no
    /// wait) for this node to apply node `node`'s stream as far as `lsn`.
    pub wait: Wait,
    /// The error that last stopped the receiver, and when (0: none since it applied a
    /// transaction of the peer).
    pub apply_error: [u8; ERROR_LEN],
    pub apply_error_time: pg_sys::TimestampTz,
    /// The latest precommits of the peer's transactions that the receiver passed without
    /// committing them (see [`passed_precommit`]), and where the next one goes.
    pub passed: [Passed; PASSED],
    pub passed_next: usize,
    /// How far this node has ended the peer's transactions by what other nodes forwarded of
    /// them (`Signal::Ended` in a forwarding stream, see `mmts_core::forward`).
    pub forwarded_through: u64,
    /// `mtm.forwarded` may hold transactions of the peer (see `apply::forwarded`).
    pub forwards_recorded: bool,
    /// How many forwards of the peer's transactions were recorded here (see
    /// [`note_forwards_left`]).
    pub forwards_recorded_count: u64,
    /// A stream here, applying a transaction this node takes no part in, has waited at least
    /// `heartbeat_recv_timeout` for a row lock held by the peer's prepared transaction
    /// `held_up` (its xid there, 0: none): the peer's receiver settles it with the other nodes now (see
    /// `indoubt::Resolver::tick`) rather than wait for its outcome in the peer's stream.
    pub held_up: u32,
}

const PASSED: usize = 32;

/// A precommit of the peer's transaction `xid` at `ts`, ending at `lsn` in its stream.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct Passed {
    pub lsn: u64,
    pub xid: u32,
    pub ts: i64,
}

const ERROR_LEN: usize = 240;

impl Default for PeerStatus {
    fn default() -> Self {
        PeerStatus {
            connected: false,
            last_message_time: 0,
            peer_wal_end: 0,
            applied_lsn: 0,
            applied_commit_time: 0,
            transactions_applied: 0,
            caught_up: false,
            ended_lsn: 0,
            resumed_at: 0,
            report: Report::default(),
            report_time: 0,
            report_sent_at: 0,
            report_received: 0,
            lease: Held::default(),
            promised_until: 0,
            set_aside: false,
            wait: Wait::default(),
            apply_error: [0; ERROR_LEN],
            apply_error_time: 0,
            passed: [Passed::default(); PASSED],
            passed_next: 0,
            forwarded_through: 0,
            forwards_recorded: false,
            forwards_recorded_count: 0,
            held_up: 0,
        }
    }
}

/// Records why the receiver from `id` stopped.
pub fn set_apply_error(id: u32, message: &str) {
    let mut end = message.len().min(ERROR_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let time = now();
    update(id, |p| {
        p.apply_error = [0; ERROR_LEN];
        p.apply_error[..end].copy_from_slice(&message.as_bytes()[..end]);
        p.apply_error_time = time;
    });
}

#[derive(Clone, Copy, Default)]
pub struct Wait {
    pub since: pg_sys::TimestampTz,
    pub xid: u32,
    pub node: u32,
    pub lsn: u64,
}

/// How far this node has applied node `id`'s stream: the end of the last of its
/// transactions committed or rolled back here. What this node's transactions say they
/// depend on (`Signal::Coordinated`'s `after`).
pub fn applied(id: u32) -> u64 {
    let p = peer(id);
    p.ended_lsn.max(p.forwarded_through)
}

/// How far everything of node `id`'s stream has taken effect here: [`applied`], or where the
/// stream last resumed if that is further (see `mmts_core::replication::resume_point`). What
/// a peer's transaction that depends on that stream waits for (see
/// `mmts_core::twopc::dependencies_met`).
pub fn applied_through(id: u32) -> u64 {
    let p = peer(id);
    p.ended_lsn.max(p.resumed_at).max(p.forwarded_through)
}

#[derive(Clone, Copy)]
pub struct Peers {
    peers: [PeerStatus; MAX_NODES as usize],
    /// The members this node last counted, and how many times that changed.
    members: Mask,
    generation: u64,
    /// Nodes removed from the cluster (`mtm.dropped_nodes`, see `nodes`).
    dropped: Mask,
    /// Nodes added to the cluster since it was configured (`mtm.added_nodes`).
    added: Mask,
    /// Added nodes whose receiver this node has started.
    receivers: Mask,
    /// This node is shutting down and gave its read leases back.
    released: bool,
    /// The spacing (µs) of this member's write commits while a node catches up (see
    /// `mmts_core::flow`), and the earliest time (`now()`) the next one may go ahead.
    commit_interval: u64,
    next_commit: i64,
    /// Transactions of other nodes a receiver is applying now while they may also come in
    /// another stream (see [`claim`]).
    claims: [Claim; CLAIMS],
}

/// Transaction `xid` of node `origin`, being applied by the receiver from node `by` (0: free).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Claim {
    origin: u32,
    xid: u32,
    by: u32,
}

const CLAIMS: usize = 2 * MAX_NODES as usize;

impl Default for Peers {
    fn default() -> Self {
        Peers {
            peers: [PeerStatus::default(); MAX_NODES as usize],
            members: 0,
            generation: 0,
            dropped: 0,
            added: 0,
            receivers: 0,
            released: false,
            commit_interval: 0,
            next_commit: 0,
            claims: [Claim::default(); CLAIMS],
        }
    }
}

// SAFETY: plain old data, no pointers.
unsafe impl PGRXSharedMemory for Peers {}

// SAFETY: no other shared memory of this server is named so (the name is the lock's only
// condition); it is attached by `pg_shmem_init!` in `init`, while preloading.
static PEERS: PgLwLock<Peers> = unsafe { PgLwLock::new(c"mmts peers") };

/// The longest connection string of an added node (`mtm.add_node` refuses longer ones).
pub const CONN_STRING_MAX: usize = 1024;

/// Connection strings of the nodes added since the cluster was configured, by node id.
#[derive(Clone, Copy)]
pub struct AddedNodes([[u8; CONN_STRING_MAX]; MAX_NODES as usize]);

impl Default for AddedNodes {
    fn default() -> Self {
        AddedNodes([[0; CONN_STRING_MAX]; MAX_NODES as usize])
    }
}

// SAFETY: plain old data, no pointers.
unsafe impl PGRXSharedMemory for AddedNodes {}

// SAFETY: as for `PEERS`: a name of its own.
static ADDED: PgLwLock<AddedNodes> = unsafe { PgLwLock::new(c"mmts added nodes") };

/// Reserves the shared memory; called from `_PG_init` while preloading.
pub fn init() {
    pg_shmem_init!(PEERS);
    pg_shmem_init!(ADDED);
}

/// Updates what is known about peer `id` (1-based).
pub fn update(id: u32, f: impl FnOnce(&mut PeerStatus)) {
    f(&mut PEERS.exclusive().peers[id as usize - 1]);
}

/// The receiver from `id` passed the precommit `p` without committing its transaction: this
/// node had not accepted it (it was catching up, not a participant).
pub fn pass_precommit(id: u32, p: Passed) {
    update(id, |s| {
        s.passed[s.passed_next % PASSED] = p;
        s.passed_next += 1;
    });
}

/// The precommit of peer `id`'s stream passed without a commit that ends exactly at `lsn`.
pub fn passed_precommit(id: u32, lsn: u64) -> Option<Passed> {
    peer(id).passed.iter().copied().find(|p| p.lsn == lsn && lsn != 0)
}

/// The receiver from node `by` claims transaction `xid` of node `origin`, which it is about to
/// apply while the transaction may come in another stream too (the origin's, or forwarded by
/// a third node: see `mmts_core::forward`). `Err` with the claiming receiver's peer when
/// another receiver has it. Each receiver holds one claim at a time, so the table (two
/// entries per node) is never full; if it were, going on unclaimed could apply a transaction
/// twice, so the receiver stops with an error instead (and gives its claims back as it
/// starts again).
pub fn claim(origin: u32, xid: u32, by: u32) -> Result<(), u32> {
    let mut shared = PEERS.exclusive();
    if let Some(c) = shared.claims.iter().find(|c| c.by != 0 && c.origin == origin && c.xid == xid) {
        return if c.by == by { Ok(()) } else { Err(c.by) };
    }
    if let Some(c) = shared.claims.iter_mut().find(|c| c.by == 0) {
        *c = Claim { origin, xid, by };
        return Ok(());
    }
    drop(shared);
    ereport!(
        PgLogLevel::ERROR,
        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        format!(
            "mmts: cannot claim transaction {xid} of node {origin}: the table of claims is full ({CLAIMS} entries)"
        )
    );
    unreachable!()
}

/// The receiver from node `by` that claims transaction `xid` of node `origin`, if any.
pub fn claimed_by(origin: u32, xid: u32) -> Option<u32> {
    PEERS.share().claims.iter().find(|c| c.by != 0 && c.origin == origin && c.xid == xid).map(|c| c.by)
}

/// Gives back what the receiver from node `by` claimed (`xid`: that one only).
pub fn release(by: u32, xid: Option<(u32, u32)>) {
    let mut shared = PEERS.exclusive();
    for c in shared.claims.iter_mut().filter(|c| c.by == by && xid.is_none_or(|(o, x)| c.origin == o && c.xid == x)) {
        *c = Claim::default();
    }
}

/// Whether `mtm.forwarded` may hold transactions of node `id`.
pub fn forwards_recorded(id: u32) -> bool {
    peer(id).forwards_recorded
}

/// Notes, before a look at `mtm.forwarded`, what may escape it: whether a receiver claims a
/// transaction of node `id` (a forward being applied, recorded but not committed yet), and how
/// many forwards of node `id`'s transactions were recorded so far.
pub fn forwards_in_flight(id: u32) -> (bool, u64) {
    let shared = PEERS.share();
    let claimed = shared.claims.iter().any(|c| c.by != 0 && c.origin == id);
    (claimed, shared.peers[id as usize - 1].forwards_recorded_count)
}

/// Notes whether `mtm.forwarded` may hold transactions of node `id`, after a look at it that
/// found `left`, taken after [`forwards_in_flight`] gave `before`: a forward claimed then, or
/// recorded since, may be missing from that look, so the answer is then yes.
pub fn note_forwards_left(id: u32, left: bool, before: (bool, u64)) {
    let mut shared = PEERS.exclusive();
    let p = &mut shared.peers[id as usize - 1];
    p.forwards_recorded = left || before.0 || p.forwards_recorded_count != before.1;
}

/// The members this node counted last.
pub fn members() -> Mask {
    PEERS.share().members
}

/// Commit time (on peer `id`) of the last of its transactions applied here.
pub fn applied_commit_time(id: u32) -> pg_sys::TimestampTz {
    peer(id).applied_commit_time
}

/// How far this node has received peer `id`'s stream with nothing of it left to apply but
/// what is set aside (see `PeerStatus::applied_lsn`).
pub fn applied_lsn(id: u32) -> u64 {
    peer(id).applied_lsn
}

/// Peer `id`'s last heartbeat and when it came (0: none yet).
pub fn last_report(id: u32) -> (Report, pg_sys::TimestampTz) {
    let p = peer(id);
    (p.report, p.report_time)
}

/// The peers this node's receivers stream from now.
pub fn connected_mask() -> Mask {
    let shared = PEERS.share();
    (1..=MAX_NODES as u32).filter(|&id| shared.peers[id as usize - 1].connected).fold(0, |m, id| m | bit(NodeId(id)))
}

/// The nodes of the cluster (configured or added, not dropped, other than this node and
/// those in `except`) that this node has not streamed from for at least `for_`: not connected,
/// and last heard from that long ago (never: since `since`).
pub fn out_of_reach_for(config: &ClusterConfig, except: Mask, for_: std::time::Duration, since: i64) -> Mask {
    let shared = PEERS.share();
    let others = configured_mask(config, &shared) & !shared.dropped & !bit(config.node_id) & !except;
    let started = since;
    let before = now() - for_.as_micros() as i64;
    (1..=MAX_NODES as u32)
        .filter(|&id| others & bit(NodeId(id)) != 0)
        .filter(|&id| {
            let p = &shared.peers[id as usize - 1];
            let heard = if p.last_message_time != 0 { p.last_message_time } else { started };
            !p.connected && heard <= before
        })
        .fold(0, |m, id| m | bit(NodeId(id)))
}

/// Whether this node's receiver is streaming from peer `id` now.
pub fn connected(id: u32) -> bool {
    peer(id).connected
}

/// The peer's transaction that a stream here waits behind (see [`PeerStatus::held_up`]).
pub fn held_up(id: u32) -> u32 {
    peer(id).held_up
}

fn peer(id: u32) -> PeerStatus {
    PEERS.share().peers[id as usize - 1]
}

/// Nodes removed from the cluster.
pub fn dropped() -> Mask {
    PEERS.share().dropped
}

/// Records the nodes dropped from the cluster and those added to it (id and connection
/// string; see `nodes`).
pub fn set_nodes(dropped: Mask, added: &[(u32, String)]) {
    let mut strings = ADDED.exclusive();
    let mut mask = 0;
    for (id, conn) in added.iter().filter(|(id, c)| (1..=MAX_NODES as u32).contains(id) && c.len() < CONN_STRING_MAX) {
        let slot = &mut strings.0[*id as usize - 1];
        slot.fill(0);
        slot[..conn.len()].copy_from_slice(conn.as_bytes());
        mask |= bit(NodeId(*id));
    }
    drop(strings);
    let mut shared = PEERS.exclusive();
    shared.dropped = dropped;
    shared.added = mask;
}

/// The nodes added to the running cluster (`mtm.added_nodes`).
pub fn added() -> Mask {
    PEERS.share().added
}

/// Claims the start of the receiver for added node `id`: true once per server start.
pub fn claim_receiver(id: u32) -> bool {
    let mut shared = PEERS.exclusive();
    let claimed = shared.receivers & bit(NodeId(id)) == 0;
    shared.receivers |= bit(NodeId(id));
    claimed
}

/// Gives the claim back (the receiver could not be started).
pub fn unclaim_receiver(id: u32) {
    PEERS.exclusive().receivers &= !bit(NodeId(id));
}

fn configured_mask(config: &ClusterConfig, shared: &Peers) -> Mask {
    (config.nodes.iter().fold(0, |m, n| m | bit(n.id)) | shared.added) & !shared.dropped
}

/// The nodes of the cluster now: those configured or added, less those dropped.
pub fn configured(config: &ClusterConfig) -> Mask {
    configured_mask(config, &PEERS.share())
}

/// Node `id` as configured (`multimaster.conn_strings`) or added (`mtm.added_nodes`), dropped
/// or not.
pub fn node(config: &ClusterConfig, id: u32) -> Option<NodeConfig> {
    if let Some(n) = config.nodes.iter().find(|n| n.id.0 == id) {
        return Some(n.clone());
    }
    if !(1..=MAX_NODES as u32).contains(&id) || PEERS.share().added & bit(NodeId(id)) == 0 {
        return None;
    }
    let bytes = ADDED.share().0[id as usize - 1];
    let text =
        String::from_utf8_lossy(&bytes[..bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len())]).into_owned();
    ConnInfo::parse(&text).ok().map(|conninfo| NodeConfig { id: NodeId(id), conninfo })
}

/// Every node configured or added, dropped ones too.
pub fn known(config: &ClusterConfig) -> Vec<NodeConfig> {
    membership::nodes(known_mask(config)).filter_map(|id| node(config, id.0)).collect()
}

/// The ids of [`known`].
pub fn known_mask(config: &ClusterConfig) -> Mask {
    config.nodes.iter().fold(PEERS.share().added, |m, n| m | bit(n.id))
}

/// The other nodes of the cluster now (dropped ones left out, added ones in).
pub fn peers(config: &ClusterConfig) -> Vec<NodeConfig> {
    membership::nodes(configured(config) & !bit(config.node_id)).filter_map(|id| node(config, id.0)).collect()
}

/// Holds every receiver's report of set-aside transactions still while `f` runs, and tells
/// `f` whether a receiver holds any now.
pub fn with_set_asides_held<R>(f: impl FnOnce(bool) -> R) -> R {
    let shared = PEERS.exclusive();
    f(shared.peers.iter().any(|p| p.set_aside))
}

/// The lease rules with the configured length: `heartbeat_recv_timeout`.
pub fn lease() -> Lease {
    Lease { length: gucs::HEARTBEAT_RECV_TIMEOUT.get() as i64 * 1000 }
}

/// Records a peer's heartbeat: its report, when it sent it (its monotonic clock), and the
/// lease it grants this node (`echo`, see `mmts_core::lease`).
pub fn record_report(from: u32, report: Report, sent_at: i64, echo: i64) {
    if from == 0 || from > MAX_NODES as u32 {
        return;
    }
    let (now, received) = (now(), monotonic());
    let lease = lease();
    update(from, |p| {
        p.report = report;
        p.report_time = now;
        if sent_at >= p.report_sent_at {
            p.report_sent_at = sent_at;
            p.report_received = received;
        }
        p.lease = lease.renew(p.lease, echo, report.wal_end, received);
    });
}

/// The lease this node grants `peer` in its next heartbeat (the peer's latest `sent_at`; 0
/// when `members` leaves it out), promised (see `mmts_core::lease`) before it is sent. A lease
/// that had lapsed begins again only once no transaction here is in two-phase commit without
/// the peer: the WAL end sent with it then covers every transaction it missed.
pub fn grant_lease(peer: u32, members: Mask) -> i64 {
    if members & bit(NodeId(peer)) == 0 {
        return 0;
    }
    let lease = lease();
    let lapsed = PEERS.share().peers[peer as usize - 1].promised_until <= monotonic();
    if lapsed && crate::twophase::in_flight_without(NodeId(peer)) {
        return 0;
    }
    let mut echo = 0;
    update(peer, |p| {
        if p.report_sent_at > 0 {
            echo = p.report_sent_at;
            p.promised_until = p.promised_until.max(lease.promised_until(p.report_received));
        }
    });
    echo
}

/// Spaces this member's write commits while a node of its partition catches up without
/// gaining on the members (see `mmts_core::flow`); called every heartbeat with this node's
/// view. Changes from none to some spacing and back are logged.
pub fn throttle_commits(config: &ClusterConfig, current: &Current, throttle: &mut Throttle) {
    let me = config.node_id;
    let fresh_after = now() - gucs::HEARTBEAT_RECV_TIMEOUT.get() as i64 * 1000;
    let catching_up = current.view.partition & !current.view.members & !bit(me);
    let lag = (current.view.state == State::Online)
        .then(|| {
            membership::nodes(catching_up)
                .filter_map(|n| Some(last_report(n.0)).filter(|(_, at)| *at > fresh_after))
                .map(|(r, _)| Lag { behind: r.behind, applied: r.applied })
                .max_by_key(|l| l.behind)
        })
        .flatten();
    let max = gucs::CATCH_UP_THROTTLE.get() as u64 * 1000;
    let interval = throttle.observe(now(), lag, max);
    let before = std::mem::replace(&mut PEERS.exclusive().commit_interval, interval);
    if (before == 0) != (interval == 0) {
        crate::logging::log(match interval {
            0 => format!("mmts: node {me} no longer spaces its write commits"),
            _ => format!(
                "mmts: nodes {} catch up without gaining on the members ({} bytes behind): node {me} spaces its write commits",
                format_mask(catching_up),
                lag.map_or(0, |l| l.behind)
            ),
        });
    }
}

/// The spacing (µs) of this member's write commits now.
pub fn commit_interval() -> u64 {
    PEERS.share().commit_interval
}

/// A write commit asked for at `now`: when it may go ahead, with the spacing set now.
pub fn next_commit(now: i64) -> i64 {
    let mut shared = PEERS.exclusive();
    let (start, next) = mmts_core::flow::next_commit(now, shared.next_commit, shared.commit_interval);
    shared.next_commit = next;
    start
}

/// How far this node's WAL is flushed.
pub fn wal_flushed() -> u64 {
    // SAFETY: a plain call that reads shared memory under its own lock; main thread.
    unsafe { pg_sys::GetFlushRecPtr(std::ptr::null_mut()) }
}

/// A peer shutting down gave back the lease this node granted it (at `sent_at`, its clock):
/// it need no longer be kept among the members, and what it reported before is not granted
/// again. A release older than the peer's latest heartbeat (read late, from WAL, after the peer
/// started again) changes nothing.
pub fn lease_released(from: u32, sent_at: i64) {
    if from == 0 || from > MAX_NODES as u32 {
        return;
    }
    let mut released = false;
    update(from, |p| {
        if sent_at >= p.report_sent_at {
            p.promised_until = 0;
            p.report_sent_at = 0;
            released = true;
        }
    });
    if released {
        crate::logging::log(format!("mmts: node {from} gave back its read lease: it shuts down"));
    }
}

/// This node is shutting down: it answers no more reads, so the leases it holds go back.
pub fn release_leases() {
    let mut shared = PEERS.exclusive();
    shared.released = true;
    for p in shared.peers.iter_mut() {
        p.lease = Held::default();
    }
}

/// Whether this node may answer reads of replicated tables now (see `mmts_core::lease`).
pub fn readable(config: &ClusterConfig) -> Result<(), Unreadable> {
    let cur = current(config);
    let now = monotonic();
    let shared = *PEERS.share();
    if shared.released {
        return Err(Unreadable::Released);
    }
    let held: Vec<Held> = shared.peers.iter().map(|p| p.lease).collect();
    let applied: Vec<u64> = shared.peers.iter().map(|p| p.applied_lsn).collect();
    lease::readable(config.node_id, &cur.view, &held, &applied, now)
}

/// This node's view of the cluster now (see [`membership::view`]).
pub struct Current {
    pub view: View,
    /// How many times the members this node counts changed since it started.
    pub generation: u64,
    /// What this node says of itself in its heartbeats.
    pub report: Report,
    /// The members as the reports make them, without the ones kept only because this node
    /// promised them a lease that still runs: the peers it grants leases to.
    pub granting: Mask,
}

pub fn current(config: &ClusterConfig) -> Current {
    let me = config.node_id;
    let fresh_after = now() - gucs::HEARTBEAT_RECV_TIMEOUT.get() as i64 * 1000;
    let shared = *PEERS.share();
    let configured = configured_mask(config, &shared);
    let peer = |id: NodeId| &shared.peers[id.0 as usize - 1];
    let reports: Vec<Option<Report>> = (1..=MAX_NODES as u32)
        .map(NodeId)
        .map(|id| {
            (id != me && configured & bit(id) != 0 && peer(id).connected && peer(id).report_time > fresh_after)
                .then_some(peer(id).report)
        })
        .collect();
    let live = || membership::nodes(configured & !bit(me)).filter(|&n| peer(n).connected);
    let sees = live().fold(bit(me), |m, n| m | bit(n));
    // A member stays caught up (it takes part in every commit); another node is once it has
    // heard from every peer it streams from, and applied what those caught up had sent.
    let ready = shared.members & bit(me) != 0
        || live().all(|n| match reports[n.0 as usize - 1] {
            Some(r) => !r.ready || peer(n).caught_up,
            None => false,
        });
    let mut view = if configured & bit(me) == 0 {
        View { partition: 0, members: 0, state: State::Dropped, excluded_by: None }
    } else {
        membership::view(me, configured, sees, ready, &reports)
    };
    let granting = view.members;
    // A peer this node promised a lease to stays a member until the promise ends: it may
    // still answer reads, so nothing commits without it (see `mmts_core::lease`).
    if view.state == State::Online {
        let now = monotonic();
        let promised = membership::nodes(configured & !bit(me))
            .filter(|&n| peer(n).promised_until > now)
            .fold(0, |m, n| m | bit(n));
        view.members |= promised;
    }
    let wal_end = wal_flushed();
    // Catching up: what this node has yet to apply of its caught-up peers' WAL, as far as they
    // last reported it (see `mmts_core::flow`).
    let (mut behind, mut applied) = (0u64, 0u64);
    if view.state != State::Online {
        for n in live().filter(|n| reports[n.0 as usize - 1].is_some_and(|r| r.ready)) {
            behind += peer(n).report.wal_end.saturating_sub(peer(n).applied_lsn);
            applied = applied.wrapping_add(peer(n).applied_lsn);
        }
    }
    let report = Report { sees, partition: view.partition, members: view.members, ready, wal_end, behind, applied };
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
            crate::logging::log(format!(
                "mmts: node {me} is {}: members {} (generation {generation})",
                view.state.name(),
                format_mask(view.members)
            ));
        }
    }
    Current { view, generation, report, granting }
}

fn timestamp(t: pg_sys::TimestampTz) -> Option<pgrx::datum::TimestampWithTimeZone> {
    // SAFETY: a timestamptz datum by value.
    (t != 0).then(|| unsafe { pgrx::datum::TimestampWithTimeZone::from_datum(t.into(), false) }).flatten()
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

/// Every configured node as this node sees it. Connection strings (shown to superusers only)
/// show no passwords.
#[pg_extern(volatile, parallel_safe)]
fn get_nodes_state() -> TableIterator<
    'static,
    (
        name!(node_id, i32),
        name!(conn_string, Option<String>),
        name!(is_self, bool),
        name!(state, String),
        name!(receiver_connected, Option<bool>),
        name!(walsender_connected, Option<bool>),
        name!(lag_bytes, Option<i64>),
        name!(lag, Option<pgrx::datum::Interval>),
        name!(applied_lsn, Option<String>),
        name!(transactions_applied, Option<i64>),
        name!(last_message_time, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(waiting, Option<String>),
        name!(apply_error, Option<String>),
    ),
> {
    let Mode::Multimaster(config) = gucs::mode() else {
        return TableIterator::new(Vec::new());
    };
    let walsenders = walsender_clients();
    let cur = current(config);
    let status_dropped = dropped();
    let rows: Vec<_> = known(config)
        .iter()
        .map(|n| {
            let conn = gucs::may_read_conn_strings().then(|| n.conninfo.masked());
            if n.id == config.node_id {
                let state = if gucs::synchronous() || cur.view.state == State::Dropped {
                    cur.view.state.name()
                } else {
                    "online"
                };
                return (n.id.0 as i32, conn, true, state.into(), None, None, None, None, None, None, None, None, None);
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
                timestamp(p.last_message_time),
                (p.wait.since != 0).then(|| {
                    format!(
                        "transaction {} of node {} waits since {} for this node to apply node {} as far as {} (applied: {})",
                        p.wait.xid,
                        n.id,
                        timestamp(p.wait.since).map(|t| t.to_string()).unwrap_or_default(),
                        p.wait.node,
                        format_lsn(p.wait.lsn),
                        format_lsn(applied_through(p.wait.node))
                    )
                }),
                (p.apply_error_time != 0).then(|| {
                    let len = p.apply_error.iter().position(|&b| b == 0).unwrap_or(p.apply_error.len());
                    format!(
                        "{}: {}",
                        timestamp(p.apply_error_time).map(|t| t.to_string()).unwrap_or_default(),
                        String::from_utf8_lossy(&p.apply_error[..len])
                    )
                }),
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
        name!(catch_up_lag, i64),
        name!(commit_spacing_ms, f64),
    ),
> {
    let row = match gucs::mode() {
        Mode::Standalone => (0, "standalone".to_string(), 0, 0, false, Vec::new(), 0, 0, 0.0),
        Mode::Multimaster(config) => {
            let configured = configured(config);
            let connected = 1 + peers(config).iter().filter(|n| peer(n.id.0).connected).count() as i32;
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
                cur.report.behind as i64,
                commit_interval() as f64 / 1000.0,
            )
        }
    };
    TableIterator::once(row)
}
