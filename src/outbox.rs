//! Signals to one peer: straight to it over a plain connection (calling
//! `mtm.deliver_signals` there, see `twophase::delivery_query`), one batch at a time; in this
//! node's WAL when that connection is not there or fails (the peer's receiver then delivers
//! them). Delivering twice is harmless, so a batch whose fate is unknown goes to WAL as well.
//! A batch the peer refuses because it has no `mtm` schema yet (`CREATE EXTENSION` not run
//! there) goes to WAL, and so do those of the next few seconds; then the same connection is
//! tried again.
//!
//! A receiver has one for its peer (votes, answers, "finished"); the heartbeat worker has one
//! per peer (see `heartbeat`).

use std::time::{Duration, Instant};

use mmts_core::twopc::Signal;
use mmts_core::NodeId;
use pgrx::pg_sys;

use crate::libpq::{Connection, PqError};
use crate::logging::{log, log_limited};
use crate::{gucs, twophase};

pub struct Outbox {
    conn: Option<Connection>,
    /// Sent, result not in yet, since when.
    in_flight: Vec<Signal>,
    sent_at: Option<Instant>,
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
            in_flight: Vec::new(),
            sent_at: None,
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

    /// How long the batch sent last has waited for the peer's result.
    pub fn waiting_for(&self) -> Duration {
        self.sent_at.filter(|_| !self.in_flight.is_empty()).map_or(Duration::ZERO, |t| t.elapsed())
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

    /// Collects the last batch's result and sends the next one.
    pub fn pump(&mut self) {
        let Some(conn) = &mut self.conn else { return };
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
        } else if self.in_flight.is_empty() {
            Ok(true)
        } else {
            conn.poll_result().map(|done| {
                if done {
                    self.in_flight.clear();
                }
                done
            })
        };
        let result = result.and_then(|ready| {
            if ready && !self.queued.is_empty() {
                self.in_flight = std::mem::take(&mut self.queued);
                self.sent_at = Some(Instant::now());
                conn.send(&twophase::delivery_query(self.me, &self.in_flight))?;
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
                for s in self.in_flight.drain(..).chain(self.queued.drain(..)) {
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
            for s in self.in_flight.drain(..).chain(self.queued.drain(..)) {
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
        for s in self.in_flight.drain(..).chain(self.queued.drain(..)) {
            twophase::emit(&s, false);
        }
    }
}
