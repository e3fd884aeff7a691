//! Signals to one peer: straight to it over a plain connection (calling
//! `mtm.deliver_signals` there, see `twophase::delivery_query`), in batches sent without
//! waiting for the peer's results of those before (libpq's pipeline mode, a few at a time: a
//! "finished" does not wait a round trip behind the answer to the same precommit); in this
//! node's WAL when that connection is not there or fails (the peer's receiver then delivers
//! them). Delivering twice is harmless, so a batch whose fate is unknown goes to WAL as well.
//! A batch the peer refuses because it has no `mtm` schema yet (`CREATE EXTENSION` not run
//! there) goes to WAL, and so do those of the next few seconds; then the same connection is
//! tried again.
//!
//! A receiver has one for its peer (votes, answers, "finished"); the heartbeat worker has one
//! per peer (see `heartbeat`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use mmts_core::twopc::Signal;
use mmts_core::NodeId;
use pgrx::pg_sys;

use crate::libpq::{Connection, PqError};
use crate::logging::{log, log_limited};
use crate::{gucs, twophase};

pub struct Outbox {
    conn: Option<Connection>,
    /// Batches sent, results not in yet, oldest first, with when they were sent (a batch
    /// already handed to WAL after a failure is kept, empty, until its result comes).
    in_flight: VecDeque<(Instant, Vec<Signal>)>,
    queued: Vec<Signal>,
    peer_id: u32,
    me: NodeId,
    /// The peer has no `mtm.deliver_signals` yet: signals go through WAL until then.
    not_before: Option<Instant>,
    /// Connecting without waiting (see [`Outbox::start`]) since then.
    connecting: Option<Instant>,
    /// The heartbeat worker's (made by [`Outbox::start`]): failures are logged rate-limited,
    /// and what cannot go straight to an unreachable peer is dropped, not written to WAL: a
    /// heartbeat delivered late, from WAL, would claim a position of this node's WAL as recent
    /// that is not (the peer counts itself caught up on it).
    heartbeats: bool,
}

/// How many batches may await their results at once.
const MAX_IN_FLIGHT: usize = 4;

/// How long signals go through WAL after the peer lacked `mtm.deliver_signals`.
const NO_EXTENSION_PAUSE: Duration = Duration::from_secs(5);

/// How long [`Outbox::start`] waits for its connection (libpq's `connect_timeout` as mmts
/// sets it for [`Outbox::new`]).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

impl Outbox {
    /// Connects to the peer (synchronous mode only: in async mode nothing waits for signals,
    /// and they go through WAL).
    pub fn new(conninfo: &str, application_name: &str, peer_id: u32, me: NodeId) -> Outbox {
        let conn = if gucs::synchronous() {
            Connection::connect(conninfo, application_name, false)
                .map_err(|e| log(format!("mmts: signals to node {peer_id} go through WAL: cannot connect: {e}")))
                .ok()
        } else {
            None
        };
        Outbox::with(conn, peer_id, me, None, false)
    }

    /// Like [`Outbox::new`], without waiting for the connection: signals pushed meanwhile
    /// wait for it (or go through WAL if it fails or takes longer than libpq's default
    /// `connect_timeout`).
    pub fn start(conninfo: &str, application_name: &str, peer_id: u32, me: NodeId) -> Outbox {
        let conn = if gucs::synchronous() {
            Connection::start(conninfo, application_name)
                .map_err(|e| {
                    log_limited(format!("mmts: signals to node {peer_id} go through WAL: cannot connect: {e}"))
                })
                .ok()
        } else {
            None
        };
        let connecting = conn.as_ref().map(|_| Instant::now());
        Outbox::with(conn, peer_id, me, connecting, true)
    }

    fn with(
        conn: Option<Connection>,
        peer_id: u32,
        me: NodeId,
        connecting: Option<Instant>,
        heartbeats: bool,
    ) -> Outbox {
        Outbox {
            conn,
            in_flight: VecDeque::new(),
            queued: Vec::new(),
            peer_id,
            me,
            not_before: None,
            heartbeats,
            connecting,
        }
    }

    pub fn socket(&self) -> Option<pg_sys::pgsocket> {
        self.conn.as_ref().map(|c| c.socket())
    }

    /// Whether signals go straight to the peer, or will once connected (not through WAL).
    pub fn connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Whether a connection is under way or a batch's result awaited ([`Outbox::pump`] moves
    /// them on).
    pub fn pending(&self) -> bool {
        self.conn.is_some() && (self.connecting.is_some() || !self.in_flight.is_empty())
    }

    /// How long the oldest batch sent has waited for the peer's result.
    pub fn waiting_for(&self) -> Duration {
        self.in_flight.front().map_or(Duration::ZERO, |(sent, _)| sent.elapsed())
    }

    pub fn push(&mut self, signals: Vec<Signal>) {
        let paused = self.not_before.is_some_and(|t| Instant::now() < t);
        if self.conn.is_some() && !paused {
            self.queued.extend(signals);
        } else if paused || !self.heartbeats {
            for s in &signals {
                twophase::emit(s, false);
            }
        }
        self.pump();
    }

    /// Collects the results that came in and sends what is queued as one batch.
    pub fn pump(&mut self) {
        let Some(conn) = &mut self.conn else { return };
        // The batches whose results came with an error among them: one of them failed, and
        // which one is not known (they go to WAL below, before the later ones).
        let mut failed_among = Vec::new();
        let result = if let Some(since) = self.connecting {
            match conn.poll_connect() {
                Ok(true) => {
                    self.connecting = None;
                    Ok(true)
                }
                Ok(false) if since.elapsed() < CONNECT_TIMEOUT => return,
                Ok(false) => Err(PqError { message: "timeout expired".into(), sqlstate: None }),
                Err(e) => Err(e),
            }
        } else {
            let (ended, failed) = conn.poll_pipeline(self.in_flight.len());
            let ended = self.in_flight.drain(..ended).flat_map(|(_, b)| b);
            match failed {
                None => Ok(true),
                Some(e) => {
                    failed_among.extend(ended);
                    Err(e)
                }
            }
        };
        let result = result.and_then(|ready| {
            if ready && !self.queued.is_empty() && self.in_flight.len() < MAX_IN_FLIGHT {
                let batch = std::mem::take(&mut self.queued);
                conn.send_pipelined(&twophase::delivery_query(self.me, &batch))?;
                self.in_flight.push_back((Instant::now(), batch));
            }
            Ok(())
        });
        // The function is not there yet (or this node's user may not call it): this batch,
        // and those of the next few seconds, go through WAL; then the connection is tried
        // again.
        let refused = |e: &PqError| matches!(e.sqlstate.as_deref(), Some("3F000" | "42883" | "42501"));
        if let Err(e) = &result {
            if refused(e) {
                if e.sqlstate.as_deref() == Some("42501") {
                    log_limited(format!("mmts: signals to node {} go through WAL: {e}", self.peer_id));
                }
                self.not_before = Some(Instant::now() + NO_EXTENSION_PAUSE);
                // The connection stays: the batches still in flight keep their places (empty)
                // until their results come.
                let in_flight = self.in_flight.iter_mut().flat_map(|(_, b)| b.drain(..));
                for s in failed_among.into_iter().chain(in_flight).chain(self.queued.drain(..)) {
                    twophase::emit(&s, false);
                }
                return;
            }
        }
        if let Err(e) = result {
            if self.heartbeats {
                log_limited(format!("mmts: no connection to node {} for heartbeats: {e}", self.peer_id));
                self.conn = None;
                self.in_flight.clear();
                self.queued.clear();
                return;
            }
            log(format!("mmts: signals to node {} go through WAL from now on: {e}", self.peer_id));
            self.conn = None;
            let in_flight = self.in_flight.drain(..).flat_map(|(_, b)| b);
            for s in failed_among.into_iter().chain(in_flight).chain(self.queued.drain(..)) {
                twophase::emit(&s, false);
            }
        }
    }
}

/// What was not delivered yet goes through WAL when a receiver's outbox is dropped (its stream
/// ended): a vote or "finished" that the peer's coordinator waits for is not lost while the
/// receiver reads its stream again without counting the peer out. Not while unwinding from an
/// error, when WAL may not be written: the receiver then counts the peer out, and the peer's
/// coordinators stop waiting for this node once it is no longer a member.
impl Drop for Outbox {
    fn drop(&mut self) {
        if self.heartbeats || std::thread::panicking() {
            return;
        }
        for s in self.in_flight.drain(..).flat_map(|(_, b)| b).chain(self.queued.drain(..)) {
            twophase::emit(&s, false);
        }
    }
}
