//! One handler per message of a peer's stream (`handle_begin`, `handle_prepare`,
//! `handle_commit_prepared`, ...), and the outcomes that reach this node as signals: settled by
//! the cluster (`carry_out`) or chosen on the coordinator's precommit (`commit_early`).

use super::*;
use crate::backend::nap;

impl Applier {
    // ---- one handler per message of the peer's stream --------------------------------------

    pub(super) fn handle_begin(&mut self, commit_time: i64) -> Option<Applied> {
        // The local transaction starts with the first change (an empty one costs nothing).
        self.in_transaction = true;
        self.remote_time = commit_time;
        self.seen.clear();
        None
    }

    pub(super) fn handle_begin_prepare(&mut self, prepare_time: i64) -> Option<Applied> {
        self.in_transaction = true;
        self.remote_time = prepare_time;
        self.preparing = Some(Preparing::default());
        None
    }

    pub(super) fn handle_stream_start(&mut self, xid: u32) -> Option<Applied> {
        // Each block starts with the transaction itself (the sender says when that changes).
        self.block = Some(xid);
        self.streamed.entry(xid).or_default().current = xid;
        None
    }

    pub(super) fn handle_stream_abort(&mut self, xid: u32, subxid: u32) -> Option<Applied> {
        if xid == subxid {
            self.streamed.remove(&xid);
        } else if let Some(streamed) = self.streamed.get_mut(&xid) {
            if let Some(at) = streamed.subtransactions.remove(&subxid) {
                streamed.messages.truncate(at);
                streamed.subtransactions.retain(|_, start| *start < at);
            }
        }
        None
    }

    /// The streamed transaction `xid` was prepared or committed by the peer: applied as if it
    /// had come whole, from `begin` to `end`.
    pub(super) fn handle_stream_end(
        &mut self,
        xid: u32,
        begin: Message,
        end: Message,
        keep_up: &mut dyn FnMut(),
    ) -> Option<Applied> {
        let Some(streamed) = self.streamed.remove(&xid) else {
            // Never an empty transaction: the stream is read again from where this node
            // confirmed it, which sends the whole transaction again.
            ereport!(
                PgLogLevel::ERROR,
                PgSqlErrorCode::ERRCODE_PROTOCOL_VIOLATION,
                format!(
                    "mmts: node {} ended streamed transaction {xid}, of which this node received nothing",
                    self.peer
                )
            );
            unreachable!()
        };
        let (started, count) = (Instant::now(), streamed.messages.len());
        self.apply(begin, keep_up);
        for message in streamed.messages {
            self.apply(message, keep_up);
        }
        let done = self.apply(end, keep_up);
        log(format!(
            "mmts: applied transaction {xid} of node {}, received while it ran ({count} messages), in {} ms",
            self.peer,
            started.elapsed().as_millis()
        ));
        done
    }

    pub(super) fn handle_relation(&mut self, r: &mmts_core::wire::Relation) -> Option<Applied> {
        self.describe(r);
        None
    }

    pub(super) fn handle_insert(&mut self, relation: u32, new: &[Value]) -> Option<Applied> {
        self.change(relation, Change::Insert, None, Some(new));
        None
    }

    pub(super) fn handle_update(&mut self, relation: u32, old: Option<&[Value]>, new: &[Value]) -> Option<Applied> {
        self.change(relation, Change::Update, old, Some(new));
        None
    }

    pub(super) fn handle_delete(&mut self, relation: u32, old: &[Value]) -> Option<Applied> {
        self.change(relation, Change::Delete, Some(old), None);
        None
    }

    pub(super) fn handle_truncate(
        &mut self,
        relations: &[u32],
        cascade: bool,
        restart_identity: bool,
    ) -> Option<Applied> {
        self.truncate(relations, cascade, restart_identity);
        None
    }

    pub(super) fn handle_commit(
        &mut self,
        end_lsn: u64,
        commit_time: i64,
        keep_up: &mut dyn FnMut(),
    ) -> Option<Applied> {
        if let Some(mut preparing) = self.preparing.take() {
            if let Some(mark) = preparing.forwarded.take() {
                return self.handle_forwarded(mark, preparing, end_lsn, commit_time, keep_up);
            }
        }
        self.ended(end_lsn);
        // SAFETY: the receiver's main thread, which set up its session's replication
        // origin at start (as replorigin_session_advance requires).
        unsafe {
            if pg_sys::IsTransactionState() {
                set_origin_position(end_lsn, commit_time);
                pg_sys::CommitTransactionCommand();
                // Local transactions that see its rows from now on say so (`Signal::Seen`).
                crate::status::update(self.peer, |p| p.applied_commit_time = commit_time);
            } else {
                // Nothing to apply (e.g. only catalog changes): applied as far as here
                // all the same, also after a restart (transactions of other nodes that
                // depend on this stream wait for that).
                pg_sys::replorigin_session_advance(end_lsn, pg_sys::InvalidXLogRecPtr as u64);
            }
        }
        twophase::clock_observe(commit_time);
        Some(self.finished(commit_time))
    }

    pub(super) fn handle_prepare(
        &mut self,
        xid: u32,
        end_lsn: u64,
        prepare_time: i64,
        keep_up: &mut dyn FnMut(),
    ) -> Option<Applied> {
        self.received.insert(xid);
        let preparing = self.preparing.take().unwrap_or_default();
        self.in_transaction = false;
        if preparing.key.is_none() && gucs::synchronous() {
            // In synchronous mode every prepared transaction carries its coordination, written
            // just before its PREPARE. One without it was rolled back while the peer's walsender
            // decoded it: PostgreSQL then stops decoding its changes and still sends the
            // PREPARE ("concurrent abort"), and its ROLLBACK PREPARED follows. Applying what
            // came would run part of a transaction that never committed, outside the
            // synchronous commit (an error there would stop this receiver, again at each
            // restart).
            log(format!(
                "mmts: transaction {xid} of node {} arrived without its coordination (rolled back while it was decoded); skipped",
                self.peer
            ));
            return Some(self.finished(prepare_time));
        }
        let catching_up = preparing.key.is_some() && preparing.members & bit(NodeId(self.me)) == 0;
        if catching_up && self.left_out_prepare(xid, keep_up) {
            self.received.remove(&xid);
            return Some(self.finished(prepare_time));
        }
        let done = self.prepare(xid, end_lsn, prepare_time, preparing, keep_up);
        if done.is_none() && catching_up {
            // Not set aside for long: see `Applier::prepare`.
            self.prepare_set_aside(xid, keep_up);
        }
        if catching_up {
            self.prepared_left_out(xid);
            if done.is_none() {
                return Some(self.finished(prepare_time));
            }
        }
        done
    }

    pub(super) fn handle_commit_prepared(
        &mut self,
        xid: u32,
        end_lsn: u64,
        commit_time: i64,
        keep_up: &mut dyn FnMut(),
    ) -> Option<Applied> {
        self.prepare_set_aside(xid, keep_up);
        self.ended(end_lsn);
        let received = self.received.remove(&xid);
        let early = self.committed_early.remove(&xid);
        let members = twophase::applied_members(self.peer, xid);
        let found = !early && finish_at(&self.gid(xid), true, end_lsn, commit_time);
        if let (true, Some(members)) = (found || early, members) {
            twophase::committed_without(members, NodeId(self.peer), end_lsn);
        }
        if found {
            twophase::with_acceptor(NodeId(self.peer), xid, |a| a.decide(Outcome::Commit { ts: commit_time }));
        } else {
            // Applied as far as here all the same.
            unsafe { pg_sys::replorigin_session_advance(end_lsn, pg_sys::InvalidXLogRecPtr as u64) };
            if received && twophase::decided(NodeId(self.peer), xid).is_none() {
                // Committed without this node's yes: it was not asked (it was out of
                // reach when the transaction was prepared) and could not prepare it
                // when it came. (Settled here already, or committed on its precommit,
                // it is decided.)
                ereport!(
                    PgLogLevel::WARNING,
                    PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                    format!(
                        "mmts: node {} committed its transaction {xid}, which this node did not prepare; this node lacks its changes",
                        self.peer
                    )
                );
            }
        }
        twophase::unregister_applied(self.peer, Some(xid));
        twophase::clock_observe(commit_time);
        if early {
            // Said "finished" when it committed.
            return None;
        }
        // The coordinator returns COMMIT to its client once every peer said this.
        self.signal_finished(xid, true);
        Some(self.finished(commit_time))
    }

    pub(super) fn handle_rollback_prepared(
        &mut self,
        xid: u32,
        end_lsn: u64,
        prepare_time: i64,
        rollback_time: i64,
    ) -> Option<Applied> {
        // Decided without this node's vote (a no from another node, or its deadline).
        self.received.remove(&xid);
        self.waiting.retain(|w| w.xid != xid);
        ROLLED_BACK_AHEAD.with(|r| r.borrow_mut().remove(&xid));
        self.ended(end_lsn);
        let gid = self.gid(xid);
        // SAFETY: the receiver's main thread, its replication origin set up; `gid`
        // outlives the block.
        unsafe {
            start_transaction();
            // The prepare may have been skipped (e.g. it touched nothing replicated).
            if twophase::lookup_prepared(&gid, end_lsn, prepare_time) {
                set_origin_position(end_lsn, rollback_time);
                twophase::finish_prepared(&gid, false);
            } else {
                // Applied as far as here all the same (transactions that depend on
                // the peer's stream wait for that: see `wait_for_dependencies`).
                pg_sys::replorigin_session_advance(end_lsn, pg_sys::InvalidXLogRecPtr as u64);
            }
            pg_sys::CommitTransactionCommand();
        }
        twophase::unregister_applied(self.peer, Some(xid));
        twophase::with_acceptor(NodeId(self.peer), xid, |a| a.decide(Outcome::Abort));
        if gucs::synchronous() {
            // The coordinator reports the rollback once no node holds the rows any more
            // (a retry at once would otherwise lose to the leftover).
            self.signal_finished(xid, false);
        }
        Some(self.finished(rollback_time))
    }

    /// A signal in the transaction (what it depends on, a schema change, what its writer saw).
    pub(super) fn handle_transactional_signal(&mut self, content: &[u8]) -> Option<Applied> {
        match (crate::provenance::admit(self.peer, content), &mut self.preparing) {
            (Some(Signal::Coordinated { key, members, after }), Some(p)) => {
                twophase::clock_observe(key.ts);
                p.key = Some(key);
                p.members = members;
                p.after = after;
            }
            (Some(Signal::Ddl { role, search_path, statement }), None) => {
                // SAFETY: the receiver's main thread, at the top level (no transaction yet, or the peer's).
                unsafe { start_transaction() };
                crate::commit::ddl::run(&role, &search_path, &statement);
            }
            (Some(Signal::Seen { applied }), None) => self.seen = applied,
            (Some(Signal::Forwarded { origin, xid, prepared_at, members, after }), None)
                if (self.forwarding || self.noticing) && self.in_transaction && origin.0 != self.me =>
            {
                let mark = super::forwarded::Mark { origin, xid, prepared_at, members, after };
                self.preparing = Some(Preparing { forwarded: Some(mark), ..Preparing::default() });
            }
            _ => {}
        }
        None
    }

    /// A signal between transactions (a settled outcome, a precommit).
    pub(super) fn handle_signal(&mut self, content: &[u8], lsn: u64, keep_up: &mut dyn FnMut()) -> Option<Applied> {
        match crate::provenance::admit(self.peer, content) {
            Some(Signal::Resolved { origin, xid, outcome }) => {
                self.carry_out(origin, xid, outcome, lsn, keep_up);
                None
            }
            Some(Signal::Precommit { xid, ts, .. }) => self.commit_early(xid, ts, lsn, keep_up),
            Some(Signal::Ended { stream, through })
                if self.forwarding && stream.0 != self.me && stream.0 != self.peer =>
            {
                // Everything of `stream` the peer had ended here came before in its stream.
                crate::status::update(stream.0, |p| p.forwarded_through = p.forwarded_through.max(through));
                None
            }
            _ => None,
        }
    }

    /// Prepares the peer's transaction `xid` now if it is set aside: its outcome has come (or
    /// this node is catching up). Dropped instead if its rollback is further on in the stream.
    pub(super) fn prepare_set_aside(&mut self, xid: u32, keep_up: &mut dyn FnMut()) {
        while let Some(i) = self.waiting.iter().position(|w| w.xid == xid) {
            let w = self.waiting.swap_remove(i);
            if doomed(xid) {
                break;
            }
            if self.prepare(w.xid, w.end_lsn, w.prepare_time, w.preparing, keep_up).is_none() {
                self.pause(keep_up);
            }
        }
    }

    /// A pause while the stream waits: reads what arrives, and rolls back the transactions
    /// prepared here whose rollback is further on in the stream. A node catching up prepares
    /// every transaction that comes, including those the members then roll back (for a
    /// conflict, say): one of those may hold rows the awaited transaction needs, while its
    /// rollback waits behind it in the stream.
    pub(super) fn pause(&mut self, keep_up: &mut dyn FnMut()) {
        keep_up();
        let due: Vec<u32> = ROLLED_BACK_AHEAD.with(|r| {
            r.borrow_mut()
                .iter_mut()
                .filter(|(_, done)| !**done)
                .map(|(xid, done)| {
                    *done = true;
                    *xid
                })
                .collect()
        });
        for xid in due {
            // Not moving the stream's position: the rollback is applied again in its turn.
            finish_at(&self.gid(xid), false, 0, crate::backend::now());
        }
        nap(1);
    }

    /// Carries out the outcome a resolver settled for transaction `xid` of node `origin` (this
    /// receiver's peer or another node), at position `lsn` of this peer's stream.
    pub(super) fn carry_out(
        &mut self,
        origin: NodeId,
        xid: u32,
        outcome: Outcome,
        lsn: u64,
        keep_up: &mut dyn FnMut(),
    ) {
        if origin.0 == self.me && twophase::is_coordinated(xid) {
            // Its backend still runs, and ends it the way it was settled.
            return;
        }
        if origin.0 == self.peer {
            self.prepare_set_aside(xid, keep_up);
        }
        self.ended(lsn);
        let gid = cstring(&mmts_core::twopc::gid(origin, xid));
        let (commit, time) = match outcome {
            Outcome::Commit { ts } => (true, ts),
            Outcome::Abort => (false, crate::backend::now()),
        };
        // The commit records the settled timestamp, as on every node.
        let done = finish_at(&gid, commit, lsn, time);
        twophase::settled(origin, xid, outcome);
        if done {
            if commit {
                // Announced in the peer's stream: everyone must have applied that far to write.
                twophase::committed_without(0, NodeId(self.peer), lsn);
            }
            twophase::unregister_applied(origin.0, Some(xid));
            log(format!(
                "mmts: {} transaction {xid} of node {origin} as the cluster settled it",
                if commit { "committed" } else { "rolled back" }
            ));
        }
    }

    /// A node catching up, whose transaction waits for node `origin`'s stream to have ended
    /// as far as `lsn`, where that stream has a precommit this node passed without
    /// committing (it had not accepted it): commits that transaction at its timestamp. Its
    /// commit is the outcome: the member that coordinated the waiting transaction ended that
    /// stream exactly there, and a member ends a transaction at its precommit only once the
    /// precommit is chosen (see `commit_early`). Otherwise the two streams could wait for each
    /// other for good: the precommit's own COMMIT PREPARED may come after a transaction that
    /// waits for the other stream. True when there is such a precommit: that stream then counts
    /// as ended there (committed here now, or earlier by that stream's own receiver).
    pub(super) fn commit_passed_precommit(&mut self, origin: NodeId, lsn: u64) -> bool {
        let Some(p) = crate::status::passed_precommit(origin.0, lsn) else { return false };
        let gid = cstring(&mmts_core::twopc::gid(origin, p.xid));
        let commit = Outcome::Commit { ts: p.ts };
        // Not moving any stream's position: the COMMIT PREPARED further on in that stream does.
        let done = finish_at(&gid, true, 0, p.ts);
        twophase::with_acceptor(origin, p.xid, |a| a.decide(commit));
        crate::status::update(origin.0, |s| s.ended_lsn = s.ended_lsn.max(lsn));
        if done {
            twophase::clock_observe(p.ts);
            log(format!(
                "mmts: committed transaction {} of node {origin} at its precommit: a transaction of node {} depends on it",
                p.xid, self.peer
            ));
        }
        true
    }

    /// Commits the peer's transaction `xid` at `ts` on its precommit (at `lsn` in the stream)
    /// when that is already the outcome: this node accepted the precommit (see
    /// `twophase::answer`), its coordinator accepted it before sending it, and the two are a
    /// majority of the cluster (three nodes or fewer). The coordinator commits meanwhile, at
    /// the same timestamp (see `commit_origin`), and hears "finished" one step sooner.
    pub(super) fn commit_early(&mut self, xid: u32, ts: i64, lsn: u64, keep_up: &mut dyn FnMut()) -> Option<Applied> {
        let Mode::Multimaster(config) = gucs::mode() else { return None };
        let commit = Outcome::Commit { ts };
        let peer = NodeId(self.peer);
        let size = crate::status::configured(config).count_ones() as usize;
        let chosen = twophase::with_acceptor(peer, xid, |a| mmts_core::indoubt::chosen_on_precommit(a, peer, ts, size));
        if !chosen {
            crate::status::pass_precommit(self.peer, crate::status::Passed { lsn, xid, ts });
            return None;
        }
        self.prepare_set_aside(xid, keep_up);
        self.ended(lsn);
        // Not moving the stream's position: it moves with the COMMIT PREPARED further on.
        let done = finish_at(&self.gid(xid), true, 0, ts);
        // The outcome, also when it is not prepared here (received again after a restart).
        twophase::with_acceptor(peer, xid, |a| a.decide(commit));
        if !done {
            return None;
        }
        self.committed_early.insert(xid);
        twophase::clock_observe(ts);
        self.signal_finished(xid, true);
        Some(self.finished(ts))
    }
}
