//! Transactions of a node that a peer forwards (see `mmts_core::forward`, and the output
//! plugin's `filter_by_origin`).
//!
//! A receiver that prepares a peer's transaction whose coordinator left some node out marks it
//! (`Signal::Forwarded`, written first inside it, and the schema changes it runs written again).
//! Every receiver in synchronous mode asks its peer to forward (`mmts_forward`): the peer then
//! sends, at its commit there, each marked transaction that left this node out, as an ordinary
//! transaction of its stream that starts with the mark. While every node this one must catch
//! up with is in reach, the receiver asks for notices only (`mmts_forward_notices`: the mark
//! without the changes): the origin's own stream brings the transaction, and the receiver holds
//! the notice, confirming its peer's stream no further than where the notice began, until the
//! transaction ended here (`mmts_core::forward::Notices`). Once the origin of a notice held, or
//! a node a transaction waits for, is out of reach, the receiver reads its peer's stream again
//! from there with whole forwards (`mmts_own_from` keeps the peer from sending its own
//! transactions again). With whole forwards, this node applies each once
//! ([`Applier::handle_forwarded`]): it commits its own prepared copy, skips it when it ended
//! here already, or applies it and records it in `mtm.forwarded`, so that the origin's stream
//! does not prepare it again ([`Applier::left_out_prepare`]). A transaction of the peer then
//! need not wait for a node this node cannot reach: what the peer had ended of that node's
//! transactions came first in its stream.
//!
//! While the origin's receiver streams, a forwarded apply that has to wait for a lock gives
//! way: the stream is read again from before it, and by then the origin's stream has brought
//! the transaction (or the one holding the lock). The two receivers claim the transaction they
//! are at (`status::claim`), so that only one applies it.
//!
//! `mtm.forwarded` is read and written as the bootstrap superuser (`nodes::as_superuser`), with
//! fixed statements only: the receiver's own user (the one in this node's connection string)
//! need not have any right on it.

use mmts_core::forward::{at_prepare, forwarded_commit, waits_for, AtPrepare, OnForwardedCommit, OriginStream};

use super::locks::{lock_wait_timer, AWAITED};
use super::*;

/// How long the origin's stream may not move on before a forwarded transaction it has yet to
/// bring is applied from the forward (see `mmts_core::forward::OriginStream`).
const STALLED_AFTER: Duration = Duration::from_millis(500);

/// A `Signal::Forwarded` mark, as received.
#[derive(Clone)]
pub(super) struct Mark {
    pub origin: NodeId,
    pub xid: u32,
    pub prepared_at: u64,
    pub members: Mask,
    pub after: Vec<(NodeId, u64)>,
}

impl Mark {
    fn signal(&self) -> Signal {
        Signal::Forwarded {
            origin: self.origin,
            xid: self.xid,
            prepared_at: self.prepared_at,
            members: self.members,
            after: self.after.clone(),
        }
    }
}

impl Applier {
    /// The mark for the peer's transaction `xid` (its PREPARE ending at `prepared_at`), when
    /// its coordinator left a node of the cluster out.
    pub(super) fn mark_for(&self, xid: u32, prepared_at: u64, preparing: &Preparing) -> Option<Mark> {
        let Mode::Multimaster(config) = gucs::mode() else { return None };
        preparing.key?;
        let left_out = crate::status::configured(config) & !preparing.members;
        (left_out != 0).then(|| Mark {
            origin: NodeId(self.peer),
            xid,
            prepared_at,
            members: preparing.members,
            after: preparing.after.clone(),
        })
    }

    /// Writes `mark` first in the transaction being applied, and from now on the schema
    /// changes it runs (see `apply_change`).
    pub(super) fn write_mark(&mut self, mark: &Mark) {
        // SAFETY: the receiver's main thread, at the top level (the transaction being applied).
        unsafe { start_transaction() };
        twophase::emit(&mark.signal(), true);
        self.marking = true;
    }

    /// A transaction the peer forwards, whose changes are in `preparing`: committed by the
    /// peer at `end_lsn` of its stream at `commit_time`, the cluster's commit timestamp.
    pub(super) fn handle_forwarded(
        &mut self,
        mark: Mark,
        preparing: Preparing,
        end_lsn: u64,
        commit_time: i64,
        keep_up: &mut dyn FnMut(),
    ) -> Option<Applied> {
        self.in_transaction = false;
        if self.noticing {
            // A notice: the origin's stream here brings the transaction (see
            // `mmts_core::forward::Notices`).
            self.notices.push((mark.origin, mark.xid, mark.prepared_at));
            return Some(self.forward_done(end_lsn, commit_time, false));
        }
        let (origin, xid) = (mark.origin, mark.xid);
        let gid = cstring(&mmts_core::twopc::gid(origin, xid));
        self.wait_for_forwarded_dependencies(&mark, keep_up);
        let origin_id = origin_id(origin);
        // SAFETY: reads the origin's progress from shared memory, under its lock.
        let progress = || origin_id.map_or(0, |id| unsafe { pg_sys::replorigin_get_progress(id, false) });
        let passed = || progress() >= mark.prepared_at;
        let stream_peer = self.peer;
        let claimed = || crate::status::claimed_by(origin.0, xid).is_some_and(|by| by != stream_peer);
        let is_prepared = || {
            crate::nodes::in_transaction(|| {
                Spi::get_one_with_args::<bool>(
                    "SELECT EXISTS (SELECT FROM pg_catalog.pg_prepared_xacts WHERE gid = $1)",
                    &[gid.to_str().unwrap_or_default().into()],
                )
            })
            .ok()
            .flatten()
            .unwrap_or(false)
        };
        let mut stalled = false;
        loop {
            // Looked at before whether it is prepared here: once the origin's stream passed its
            // PREPARE, it is either prepared here or ended.
            let passed_before = passed();
            let prepared = is_prepared();
            let ended = passed_before || recorded(origin, xid);
            let stream = match (crate::status::connected(origin.0), stalled) {
                (false, _) => OriginStream::Cut,
                (true, false) => OriginStream::Moving,
                (true, true) => OriginStream::Stalled,
            };
            match forwarded_commit(prepared, ended, claimed(), stream) {
                OnForwardedCommit::Finish => {
                    if finish_at(&gid, true, end_lsn, commit_time) {
                        let commit = Outcome::Commit { ts: commit_time };
                        twophase::with_acceptor(origin, xid, |a| a.decide(commit));
                        twophase::unregister_applied(origin.0, Some(xid));
                        return Some(self.forward_done(end_lsn, commit_time, true));
                    }
                    // Finished meanwhile by the origin's receiver or a resolver.
                    return Some(self.forward_done(end_lsn, commit_time, false));
                }
                OnForwardedCommit::Skip => return Some(self.forward_done(end_lsn, commit_time, false)),
                OnForwardedCommit::Wait => {
                    // Until the origin's receiver passes its PREPARE, claims it, stops, or
                    // stops moving on.
                    let (mut seen, mut since) = (progress(), Instant::now());
                    while claimed() || (crate::status::connected(origin.0) && !passed() && !stalled) {
                        self.stop_if_asked();
                        self.pause(keep_up);
                        let now = progress();
                        if now != seen {
                            (seen, since) = (now, Instant::now());
                        } else if since.elapsed() >= STALLED_AFTER && !claimed() {
                            stalled = true;
                        }
                    }
                    continue;
                }
                OnForwardedCommit::Apply => {}
            }
            if crate::status::claim(origin.0, xid, self.peer).is_err() {
                continue;
            }
            // Held now: the origin's receiver does not prepare it, nor another receiver apply
            // it, while this one does. Either may have done so between the look above and the
            // claim: looked at again, as at the top.
            if passed() || is_prepared() || recorded(origin, xid) {
                crate::status::release(self.peer, Some((origin.0, xid)));
                continue;
            }
            match self.apply_forwarded(&mark, &preparing, end_lsn, commit_time, keep_up) {
                Ok(()) => {
                    crate::status::release(self.peer, Some((origin.0, xid)));
                    return Some(self.forward_done(end_lsn, commit_time, true));
                }
                Err(()) => {
                    crate::status::release(self.peer, Some((origin.0, xid)));
                    if crate::status::connected(origin.0) {
                        // Give way to the origin's stream: read this one again from before here.
                        self.give_way = Some(format!(
                            "transaction {xid} of node {origin}, forwarded by node {}, waits for a lock while node {origin}'s own stream is read: read again",
                            self.peer
                        ));
                        return None;
                    }
                    self.pause(keep_up);
                }
            }
        }
    }

    /// One attempt at applying a forwarded transaction and committing it; `Err` when it had
    /// to wait for a lock. Any other error stops the receiver, as for the peer's own.
    fn apply_forwarded(
        &mut self,
        mark: &Mark,
        preparing: &Preparing,
        end_lsn: u64,
        commit_time: i64,
        keep_up: &mut dyn FnMut(),
    ) -> Result<(), ()> {
        let latest = (!preparing.described.is_empty()).then(|| self.relations.clone());
        for (id, before) in &preparing.described {
            match before {
                Some(r) => self.relations.insert(*id, r.clone()),
                None => self.relations.remove(id),
            };
        }
        self.synchronous = true;
        let outcome = PgTryBuilder::new(AssertUnwindSafe(|| {
            // Marked again: a node left out may read it from this node in turn.
            self.write_mark(mark);
            lock_wait_timer(true);
            self.apply_changes(&preparing.changes, keep_up);
            lock_wait_timer(false);
            record(mark.origin, mark.xid, mark.prepared_at);
            // SAFETY: main thread, inside the transaction the changes were applied in.
            unsafe {
                set_origin_position(end_lsn, commit_time);
                pg_sys::CommitTransactionCommand();
            }
            Ok(())
        }))
        .catch_others(|e| {
            lock_wait_timer(false);
            let awaited = AWAITED.take();
            unsafe { pg_sys::AbortCurrentTransaction() };
            let code = match &e {
                pgrx::pg_sys::panic::CaughtError::PostgresError(r)
                | pgrx::pg_sys::panic::CaughtError::ErrorReport(r)
                | pgrx::pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => r.sql_error_code(),
            };
            if code == PgSqlErrorCode::ERRCODE_QUERY_CANCELED && awaited.is_some() {
                Err(())
            } else {
                e.rethrow()
            }
        })
        .execute();
        self.marking = false;
        self.synchronous = false;
        AWAITED.clear();
        // SAFETY: main thread, timer disarmed; a `sig_atomic_t` PostgreSQL's handlers only set.
        unsafe { pg_sys::QueryCancelPending = 0 };
        if let Some(latest) = latest {
            self.relations = latest;
        }
        outcome
    }

    /// Waits until this node has applied what the forwarded transaction's coordinator had
    /// applied of the streams that did not bring it (see `mmts_core::forward::waits_for`).
    fn wait_for_forwarded_dependencies(&mut self, mark: &Mark, keep_up: &mut dyn FnMut()) {
        let (me, stream) = (NodeId(self.me), NodeId(self.peer));
        let unmet = |reachable: Mask| {
            mark.after.iter().any(|&(n, lsn)| {
                waits_for(n, me, mark.origin, stream, true, reachable, None)
                    && crate::status::applied_through(n.0) < lsn
            })
        };
        while unmet(crate::status::connected_mask()) {
            self.stop_if_asked();
            self.pause(keep_up);
        }
    }

    /// Ends the receiver, waiting in place, when it is asked to stop.
    fn stop_if_asked(&self) {
        if pgrx::bgworkers::BackgroundWorker::sigterm_received() {
            ereport!(
                PgLogLevel::FATAL,
                PgSqlErrorCode::ERRCODE_ADMIN_SHUTDOWN,
                format!("mmts: replication from node {} stopped while catching up", self.peer)
            );
        }
    }

    /// A forwarded transaction ended here (`applied`: by this stream just now): the stream has
    /// taken effect as far as `end_lsn`. That position does not count as ended (see
    /// [`Applier::ended`]): the nodes compare their ended positions of a stream, and the peer's
    /// other readers never see this commit, so none of them would ever end that far.
    fn forward_done(&mut self, end_lsn: u64, commit_time: i64, applied: bool) -> Applied {
        if !applied {
            // SAFETY: the receiver's main thread, its replication origin set up.
            unsafe { pg_sys::replorigin_session_advance(end_lsn, pg_sys::InvalidXLogRecPtr as u64) };
        }
        twophase::clock_observe(commit_time);
        self.finished(commit_time)
    }

    /// Before the peer's transaction `xid`, which left this node out, is prepared here: waits
    /// while a receiver that it was forwarded to applies it; `true` when one did (it is not
    /// prepared again). Otherwise this receiver claims it until [`Applier::prepared_left_out`].
    pub(super) fn left_out_prepare(&mut self, xid: u32, keep_up: &mut dyn FnMut()) -> bool {
        // Whatever this stream asks for: another receiver may apply forwards whole.
        if !self.forwarding && !self.noticing {
            return false;
        }
        let origin = NodeId(self.peer);
        loop {
            let claimed = crate::status::claimed_by(origin.0, xid).is_some_and(|by| by != self.peer);
            let applied = !claimed && crate::status::forwards_recorded(origin.0) && recorded(origin, xid);
            match at_prepare(claimed, applied) {
                AtPrepare::Wait => {
                    self.stop_if_asked();
                    self.pause(keep_up);
                }
                AtPrepare::Skip => return true,
                AtPrepare::Prepare => {
                    if crate::status::claim(origin.0, xid, self.peer).is_ok() {
                        // Held now: no forward of it is applied while this receiver prepares
                        // it. One applied and committed between the look above and the claim
                        // is seen now.
                        if crate::status::forwards_recorded(origin.0) && recorded(origin, xid) {
                            crate::status::release(self.peer, Some((origin.0, xid)));
                            return true;
                        }
                        return false;
                    }
                }
            }
        }
    }

    /// Gives back the claim [`Applier::left_out_prepare`] took.
    pub(super) fn prepared_left_out(&self, xid: u32) {
        crate::status::release(self.peer, Some((self.peer, xid)));
    }
}

/// The nodes other than `peer` that this node has not streamed from for
/// `heartbeat_recv_timeout` (counted from when this receiver started, for a node not heard
/// from since: the server may have spent a while in crash recovery before): a stream from
/// `peer` that asks for notices is read again with whole forwards once one of them is what it
/// waits for, or what a notice it holds is of.
pub fn out_of_reach(config: &mmts_core::config::ClusterConfig, peer: u32) -> Mask {
    let after = Duration::from_millis(gucs::HEARTBEAT_RECV_TIMEOUT.get() as u64);
    crate::status::out_of_reach_for(config, bit(NodeId(peer)), after, crate::receiver::started())
}

/// The replication origin of node `node`'s stream here, if there is one yet.
fn origin_id(node: NodeId) -> Option<pg_sys::RepOriginId> {
    let name = cstring(&mmts_core::replication::origin_name(node.0));
    // SAFETY: main thread; `name` outlives the call; a catalog lookup inside the transaction
    // `nodes::in_transaction` starts.
    let id = crate::nodes::in_transaction(|| unsafe { pg_sys::replorigin_by_name(name.as_ptr(), true) });
    (id != pg_sys::InvalidRepOriginId as pg_sys::RepOriginId).then_some(id)
}

/// Forgets the forwards of node `origin`'s transactions that its stream, read again from
/// `from` on, cannot bring again; notes whether any are left (see `status::forwards_recorded`).
/// At the start of the origin's stream, outside a transaction.
pub fn forget_forwards_before(origin: NodeId, from: u64) {
    let before = crate::status::forwards_in_flight(origin.0);
    let left = crate::nodes::in_transaction(|| {
        crate::nodes::as_superuser(|| {
            Spi::run_with_args(
                "DELETE FROM mtm.forwarded WHERE origin = $1 AND prepared_at < $2",
                &[(origin.0 as i32).into(), (from as i64).into()],
            )?;
            Spi::get_one_with_args::<bool>(
                "SELECT EXISTS (SELECT FROM mtm.forwarded WHERE origin = $1)",
                &[(origin.0 as i32).into()],
            )
        })
    });
    let left = left.ok().flatten().unwrap_or(true);
    crate::status::note_forwards_left(origin.0, left, before);
}

/// Whether `mtm.forwarded` exists here (the extension is created in the replicated database).
pub fn table_exists() -> bool {
    // SAFETY: catalog lookups by name, inside a transaction.
    crate::nodes::in_transaction(|| unsafe {
        let ns = pg_sys::get_namespace_oid(c"mtm".as_ptr(), true);
        ns != pg_sys::InvalidOid && pg_sys::get_relname_relid(c"forwarded".as_ptr(), ns) != pg_sys::InvalidOid
    })
}

/// Whether a forward of transaction `xid` of node `origin` was applied here.
fn recorded(origin: NodeId, xid: u32) -> bool {
    crate::nodes::in_transaction(|| {
        crate::nodes::as_superuser(|| {
            Spi::get_one_with_args::<bool>(
                "SELECT EXISTS (SELECT FROM mtm.forwarded WHERE origin = $1 AND xid = $2)",
                &[(origin.0 as i32).into(), (xid as i64).into()],
            )
        })
    })
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// Records, in the transaction being applied, that the forward of transaction `xid` of node
/// `origin` is applied here.
fn record(origin: NodeId, xid: u32, prepared_at: u64) {
    crate::status::update(origin.0, |p| {
        p.forwards_recorded = true;
        p.forwards_recorded_count += 1;
    });
    // SAFETY: main thread, inside the transaction being applied; the snapshot pushed is
    // popped below (an error ends the transaction, which drops it).
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    crate::nodes::as_superuser(|| {
        Spi::run_with_args(
            "INSERT INTO mtm.forwarded(origin, xid, prepared_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            &[(origin.0 as i32).into(), (xid as i64).into(), (prepared_at as i64).into()],
        )
    })
    .unwrap_or_else(|e| error!("mmts: cannot record a forwarded transaction: {e}"));
    // SAFETY: the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
}
