//! Prepared transactions in doubt: a peer's that its coordinator, no longer in this node's
//! partition, did not finish; and this node's own whose backend is gone (it died, or the
//! node restarted, between PREPARE and the end). Receivers settle them with the other nodes
//! (`mmts_core::indoubt`: a majority agrees on one outcome, the coordinator's precommit
//! counting as its first ballot) and carry the outcome out here; a peer's transaction settled
//! here is announced to every node in this node's WAL ([`Signal::Resolved`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mmts_core::config::ClusterConfig;
use mmts_core::indoubt::{self, Answer, Outcome, Request, Step};
use mmts_core::membership::{bit, State};
use mmts_core::twopc::{decode_batch, Signal};
use mmts_core::NodeId;
use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::libpq::Connection;
use crate::logging::log;
use crate::{gucs, status, twophase};

/// How often a receiver looks for transactions in doubt.
const EVERY: Duration = Duration::from_secs(1);
/// How long a node's answer may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// The settling done by the receiver from `peer`.
pub struct Resolver {
    peer: NodeId,
    /// Connections to the peers, for requests (made when first needed).
    conns: HashMap<u32, Connection>,
    resolver: indoubt::Resolver,
    last: Option<Instant>,
}

impl Resolver {
    pub fn new(peer: NodeId) -> Resolver {
        Resolver { peer, conns: HashMap::new(), resolver: indoubt::Resolver::default(), last: None }
    }

    /// Settles what is in doubt (at most once a second): the peer's transactions once it is
    /// out of this node's partition, and this node's own whose backend is gone. Outside a
    /// transaction.
    pub fn tick(&mut self, config: &ClusterConfig) {
        let peer = self.peer;
        // This node's own transactions are settled by one receiver: the first peer's.
        let own = mmts_core::membership::nodes(status::configured(config) & !bit(config.node_id)).next() == Some(peer);
        if !gucs::synchronous() || self.last.is_some_and(|t| t.elapsed() < EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        if own {
            for (gid, xid, local_xid, since) in prepared(config.node_id, Duration::from_secs(1)) {
                if !twophase::is_coordinated(local_xid) {
                    self.settle(config, config.node_id, xid, since, &gid);
                }
            }
        }
        // A stream here, applying a transaction this node takes no part in, waits behind the
        // peer's prepared transaction (`status::PeerStatus::held_up`): settled now, whatever this node's
        // state and wherever the peer is. Asking while the coordinator still works on it is
        // safe (a majority chooses one outcome) and, that long after, rarely needed: the
        // cluster has mostly ended it already.
        let held_up = status::held_up(peer.0);
        if held_up != 0 {
            for (gid, xid, _, since) in prepared(peer, Duration::ZERO).into_iter().filter(|p| p.1 == held_up) {
                self.settle(config, peer, xid, since, &gid);
            }
            status::update(peer.0, |s| {
                if s.held_up == held_up {
                    s.held_up = 0;
                }
            });
        }
        // Otherwise only an online node settles a peer's transactions: a node cut off from
        // the others may see the coordinator gone while the majority still has it; asking
        // then would only make it roll back what the majority may still commit.
        let view = status::current(config).view;
        if view.state == State::Online && view.partition & bit(peer) == 0 {
            let silence = Duration::from_millis(gucs::HEARTBEAT_RECV_TIMEOUT.get() as u64);
            for (gid, xid, _, since) in prepared(peer, silence) {
                self.settle(config, peer, xid, since, &gid);
            }
        }
    }

    /// One attempt to settle transaction `xid` of node `origin`, prepared here as `gid`
    /// (`mmts_core::indoubt::Attempt`: promises, then acceptances).
    fn settle(&mut self, config: &ClusterConfig, origin: NodeId, xid: u32, since: i64, gid: &str) {
        let size = status::configured(config).count_ones() as usize;
        let (mut attempt, mut request) = self.resolver.attempt(config.node_id, size);
        let mut answered = 0;
        let outcome = loop {
            let signal = match request {
                Request::Promise(ballot) => Signal::Promise { origin, xid, since, ballot },
                Request::Accept(ballot, outcome) => Signal::Accept { origin, xid, since, ballot, outcome },
                Request::Precommit { .. } => unreachable!("a resolver never precommits"),
            };
            let answers = self.ask(config, signal);
            answered = answered.max(answers.len());
            for (from, answer) in answers {
                attempt.step(from, answer);
            }
            // Every node asked has answered or timed out.
            match attempt.next(true) {
                Step::Ask(next) => request = next,
                Step::Settled(o) => break Some(o),
                Step::GiveUp | Step::Wait => break None,
            }
        };
        self.resolver.learn(&attempt);
        match outcome {
            Some(o) => carry_out(config.node_id, origin, xid, gid, o),
            None => log(format!(
                "mmts: transaction {xid} of node {origin} is in doubt; {answered} of {size} nodes answered, retrying"
            )),
        }
    }

    /// The answers of this node and of the peers it streams from to `request`.
    fn ask(&mut self, config: &ClusterConfig, request: Signal) -> Vec<(NodeId, Answer)> {
        let (Signal::Promise { origin, xid, .. } | Signal::Accept { origin, xid, .. }) = request else {
            return Vec::new();
        };
        let mut answers = Vec::new();
        if let Some(Signal::Answered { answer, .. }) = twophase::answer(&request, config.node_id) {
            answers.push((config.node_id, answer));
        }
        let query = twophase::delivery_query(config.node_id, std::slice::from_ref(&request));
        for peer in status::peers(config).into_iter().filter(|n| status::connected(n.id.0)) {
            let id = peer.id.0;
            if !self.conns.contains_key(&id) {
                let app = format!("{}_resolver", status::application_name(config.node_id.0));
                match Connection::connect(&peer.conninfo.to_string(), &app, false) {
                    Ok(c) => {
                        self.conns.insert(id, c);
                    }
                    Err(e) => {
                        log(format!("mmts: cannot ask node {id} about transactions in doubt: {e}"));
                        continue;
                    }
                }
            }
            let conn = self.conns.get_mut(&id).expect("connected");
            match conn.query_value(&query, ANSWER_TIMEOUT) {
                Ok(Some(reply)) => {
                    for signal in decode_batch(&reply)
                        .unwrap_or_default()
                        .into_iter()
                        .filter_map(|s| crate::provenance::admit_signal(id, s))
                    {
                        if let Signal::Answered { origin: o, xid: x, voter, answer } = signal {
                            if o == origin && x == xid && voter == peer.id {
                                answers.push((voter, answer));
                            }
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    log(format!("mmts: node {id} did not answer about transactions in doubt: {e}"));
                    self.conns.remove(&id);
                }
            }
        }
        answers
    }
}

/// The prepared transactions of node `origin` here (gid, its xid there, the local xid, when
/// it was prepared here), prepared at least `age` ago.
pub fn prepared(origin: NodeId, age: Duration) -> Vec<(String, u32, u32, i64)> {
    let prefix = mmts_core::twopc::gid_prefix(origin);
    let found: Result<Vec<(String, i64, i64)>, pgrx::spi::SpiError> = BackgroundWorker::transaction(|| {
        Spi::connect(|client| {
            client
                .select(
                    "SELECT gid, transaction::text::bigint,
                            ((extract(epoch FROM prepared) - 946684800) * 1000000)::bigint
                       FROM pg_catalog.pg_prepared_xacts
                      WHERE left(gid, length($1)) = $1 AND database = current_database()
                        AND prepared < now() - make_interval(secs => $2)",
                    None,
                    &[prefix.as_str().into(), age.as_secs_f64().into()],
                )?
                .map(|row| {
                    Ok((
                        row.get::<String>(1)?.unwrap_or_default(),
                        row.get::<i64>(2)?.unwrap_or(0),
                        row.get::<i64>(3)?.unwrap_or(0),
                    ))
                })
                .collect()
        })
    });
    found
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(gid, local, since)| {
            let (node, xid) = mmts_core::twopc::parse_gid(&gid)?;
            (node == origin).then_some((gid, xid, local as u32, since))
        })
        .collect()
}

/// Commits or rolls back `gid` here as settled. This node's own transaction goes without a
/// replication origin (its peers get the end from this node's stream); a peer's goes under
/// the receiver's origin, with the settled commit timestamp, and is announced to every node.
fn carry_out(me: NodeId, origin: NodeId, xid: u32, gid: &str, outcome: Outcome) {
    let (commit, ts) = match outcome {
        Outcome::Commit { ts } => (true, ts),
        Outcome::Abort => (false, 0),
    };
    let own = origin == me;
    let gid_c = crate::backend::cstring(gid);
    // SAFETY (this block and the next): plain globals of this session, on its main thread.
    let saved = unsafe {
        (
            pg_sys::replorigin_session_origin,
            pg_sys::replorigin_session_origin_lsn,
            pg_sys::replorigin_session_origin_timestamp,
        )
    };
    // SAFETY: as above: this session's replication-origin globals, set on its main thread for
    // the commit below (and put back after it).
    unsafe {
        if own {
            pg_sys::replorigin_session_origin = pg_sys::InvalidRepOriginId as pg_sys::RepOriginId;
        } else {
            pg_sys::replorigin_session_origin_lsn = 0;
            pg_sys::replorigin_session_origin_timestamp = if commit { ts } else { crate::backend::now() };
        }
    }
    // SAFETY: main thread, outside a transaction; `gid_c` outlives the call. An error is caught
    // below, where the transaction is aborted.
    let done = PgTryBuilder::new(|| unsafe {
        pg_sys::StartTransactionCommand();
        twophase::finish_prepared(&gid_c, commit);
        pg_sys::CommitTransactionCommand();
        true
    })
    .catch_others(|_| {
        // Finished meanwhile (by the stream or another receiver).
        unsafe { pg_sys::AbortCurrentTransaction() };
        false
    })
    .execute();
    // SAFETY: plain globals of this session, on its main thread.
    unsafe {
        (
            pg_sys::replorigin_session_origin,
            pg_sys::replorigin_session_origin_lsn,
            pg_sys::replorigin_session_origin_timestamp,
        ) = saved;
    }
    twophase::settled(origin, xid, outcome);
    if !own {
        twophase::unregister_applied(origin.0, Some(xid));
        twophase::emit(&Signal::Resolved { origin, xid, outcome }, false);
        if commit {
            // Every node must have applied this far before it writes again.
            twophase::committed_without(0, me, unsafe { pg_sys::GetXLogInsertRecPtr() });
        }
    }
    if done {
        log(format!(
            "mmts: {} transaction {xid} of node {origin} ({gid}) as settled with the other nodes",
            if commit { "committed" } else { "rolled back" }
        ));
    }
}
