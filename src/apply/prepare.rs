//! A peer's transaction prepared here, and this node's vote on it: the dependency wait, the
//! membership and staleness checks, wait-die on locks held here, set aside while it waits.

use super::locks::{lock_holders, lock_wait_timer, AWAITED};
use super::*;
use mmts_core::participant;

impl Applier {
    /// Why this node, a member, cannot vote yes on a transaction whose coordinator counted
    /// `members` and had applied `preparing.after` (see `mmts_core::participant`).
    pub(super) fn refusal(&self, preparing: &Preparing) -> Option<String> {
        let Mode::Multimaster(config) = gucs::mode() else { return None };
        let (me, peer) = (NodeId(self.me), NodeId(self.peer));
        let view = crate::status::current(config).view;
        participant::membership_refusal(me, &view, peer, preparing.members).or_else(|| {
            let need = twophase::must_have_applied(peer);
            participant::stale_refusal(me, peer, &need, &preparing.after, crate::status::dropped())
        })
    }

    /// Sets the peer's transaction `xid` aside, to be tried again from `recheck` on (or when one
    /// of the lock `holders` ends).
    fn set_aside(
        &mut self,
        xid: u32,
        end_lsn: u64,
        prepare_time: i64,
        preparing: Preparing,
        holders: Vec<u32>,
        recheck: Instant,
    ) {
        self.waiting.push(Waiting { xid, end_lsn, prepare_time, preparing, holders, recheck });
    }

    /// Applies and prepares the peer's transaction `xid`; when the peer coordinates it, votes.
    /// `None` when it is set aside for a lock.
    pub(super) fn prepare(
        &mut self,
        xid: u32,
        end_lsn: u64,
        prepare_time: i64,
        mut preparing: Preparing,
        keep_up: &mut dyn FnMut(),
    ) -> Option<Applied> {
        let first_attempt = *preparing.first_attempt.get_or_insert_with(Instant::now);
        let key = preparing.key;
        let settled = twophase::decided(NodeId(self.peer), xid);
        // A member votes; a node that is not (catching up) must apply it whatever it takes.
        let member = preparing.members & bit(NodeId(self.me)) != 0;
        // What the coordinator had applied of the other streams must be applied here first,
        // so that the transaction's changes land over the rows it saw. A member need not wait
        // for nodes out of its partition: it prepared every transaction they committed, which
        // holds its rows until it ends. A node catching up waits for every stream: it may not
        // have received those transactions at all, and one set aside would be lost in a crash
        // once the stream's position moved past it (the members commit it without this node).
        let partition = match gucs::mode() {
            Mode::Multimaster(config) => crate::status::current(config).view.partition,
            Mode::Standalone => 0,
        };
        // A node catching up need not wait for a node it cannot reach when the peer forwards:
        // what the peer had ended of that node's transactions came before in its stream.
        let (me, peer, forwarding) = (self.me, self.peer, self.forwarding);
        let skip = |n: NodeId| {
            let (me, peer, reachable) = (NodeId(me), NodeId(peer), crate::status::connected_mask());
            !mmts_core::forward::waits_for(n, me, peer, peer, forwarding, reachable, member.then_some(partition))
        };
        let met = || dependencies_met(&preparing.after, |n| crate::status::applied_through(n.0), skip);
        let unmet = || -> Vec<(NodeId, u64)> {
            let after = preparing.after.iter().copied();
            after.filter(|(n, lsn)| !skip(*n) && crate::status::applied_through(n.0) < *lsn).collect()
        };
        let received = participant::Received {
            me: NodeId(self.me),
            coordinated: key.is_some(),
            member,
            rolled_back: (key.is_some() && doomed(xid)) || settled == Some(Outcome::Abort),
            refusal: if key.is_some() && member { self.refusal(&preparing) } else { None },
            dependencies_met: met(),
            waited_ms: first_attempt.elapsed().as_millis() as i64,
            min_timeout_ms: gucs::TWOPC_MIN_TIMEOUT.get() as i64,
        };
        match participant::before_apply(&received) {
            participant::Before::Drop => return Some(self.finished(prepare_time)),
            participant::Before::VoteNo(message) => {
                let vote = Vote::No { sqlstate: participant::NO.into(), message };
                self.signal(Signal::Vote { origin: NodeId(self.peer), xid, voter: NodeId(self.me), vote });
                return Some(self.finished(prepare_time));
            }
            participant::Before::SetAside => {
                let waited = first_attempt.elapsed();
                if waited >= Duration::from_secs(1) && !preparing.reported {
                    preparing.reported = true;
                    log(format!(
                        "mmts: transaction {xid} of node {} has waited {} ms for this node to apply what it depends on",
                        self.peer,
                        waited.as_millis()
                    ));
                }
                self.set_aside(xid, end_lsn, prepare_time, preparing, Vec::new(), Instant::now());
                return None;
            }
            participant::Before::WaitInPlace => {
                // Shown in mtm.get_nodes_state() and logged once it lasts a few heartbeats, then
                // logged again every WAIT_LOG_EVERY while it lasts.
                let shown = WaitShown(self.peer);
                let report_after = Duration::from_millis(5 * gucs::HEARTBEAT_SEND_TIMEOUT.get() as u64);
                let mut logged: Option<Instant> = None;
                while !met() {
                    if doomed(xid) {
                        return Some(self.finished(prepare_time));
                    }
                    let waited = first_attempt.elapsed();
                    if waited >= report_after && logged.is_none_or(|t| t.elapsed() >= WAIT_LOG_EVERY) {
                        logged = Some(Instant::now());
                        let unmet = unmet();
                        if let Some(&(node, lsn)) = unmet.first() {
                            let since = crate::backend::now() - waited.as_micros() as i64;
                            shown.set(crate::status::Wait { since, xid, node: node.0, lsn });
                        }
                        let unmet: Vec<String> = unmet
                            .iter()
                            .map(|(n, lsn)| {
                                format!(
                                    "node {n} as far as {} (applied here: {})",
                                    format_lsn(*lsn),
                                    format_lsn(crate::status::applied_through(n.0))
                                )
                            })
                            .collect();
                        log(format!(
                            "mmts: transaction {xid} of node {} has waited {:.1} s for this node to apply what it depends on: {}",
                            self.peer,
                            waited.as_secs_f64(),
                            unmet.join(", ")
                        ));
                    }
                    // A precommit of another stream that this node passed without committing
                    // may be what it waits for.
                    if unmet().iter().any(|&(n, lsn)| self.commit_passed_precommit(n, lsn)) {
                        continue;
                    }
                    // What it waits for may come only forwarded, whole.
                    if let (true, Mode::Multimaster(config)) = (self.noticing, gucs::mode()) {
                        let gone = super::forwarded::out_of_reach(config, self.peer);
                        if let Some(&(n, _)) = unmet().iter().find(|(n, _)| gone & bit(*n) != 0) {
                            self.reread = Some(format!(
                                "transaction {xid} of node {} waits for node {n}, out of reach: reading node {}'s stream again with what it forwards",
                                self.peer, self.peer
                            ));
                            return None;
                        }
                    }
                    if pgrx::bgworkers::BackgroundWorker::sigterm_received() {
                        ereport!(
                            PgLogLevel::FATAL,
                            PgSqlErrorCode::ERRCODE_ADMIN_SHUTDOWN,
                            format!("mmts: replication from node {} stopped while catching up", self.peer)
                        );
                    }
                    self.pause(keep_up);
                }
            }
            participant::Before::Apply => {}
        }
        let gid = self.gid(xid);
        let mark = self.mark_for(xid, end_lsn, &preparing);
        self.synchronous = key.is_some();
        if key.is_some() {
            twophase::set_applying(self.peer, key);
        }
        AWAITED.clear();
        // Tables described again inside the transaction start from their earlier description;
        // the latest ones are put back afterwards.
        let latest = (!preparing.described.is_empty()).then(|| self.relations.clone());
        for (id, before) in &preparing.described {
            match before {
                Some(r) => self.relations.insert(*id, r.clone()),
                None => self.relations.remove(id),
            };
        }
        let outcome = PgTryBuilder::new(AssertUnwindSafe(|| {
            // A synchronous transaction does not wait long for a lock without looking at who
            // holds it (see `on_lock_wait_timer`).
            if let Some(mark) = &mark {
                // First in the transaction: a node left out may have it forwarded.
                self.write_mark(mark);
            }
            lock_wait_timer(self.synchronous);
            self.apply_changes(&preparing.changes, keep_up);
            lock_wait_timer(false);
            // SAFETY: main thread, inside the transaction the changes were applied in; this is
            // xact.c's sequence for PREPARE TRANSACTION, and `gid` outlives the block.
            unsafe {
                start_transaction();
                let local_xid = pg_sys::GetTopTransactionId().into_inner();
                pg_sys::BeginTransactionBlock();
                pg_sys::CommitTransactionCommand();
                set_origin_position(end_lsn, prepare_time);
                pg_sys::PrepareTransactionBlock(gid.as_ptr());
                pg_sys::CommitTransactionCommand();
                Ok(local_xid)
            }
        }))
        .catch_others(|e| {
            lock_wait_timer(false);
            let awaited = AWAITED.take();
            unsafe { pg_sys::AbortCurrentTransaction() };
            let (code, message) = match &e {
                pgrx::pg_sys::panic::CaughtError::PostgresError(r)
                | pgrx::pg_sys::panic::CaughtError::ErrorReport(r)
                | pgrx::pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => {
                    (r.sql_error_code(), r.message().to_string())
                }
            };
            Err((code, message, awaited))
        })
        .execute();
        if let Some(latest) = latest {
            self.relations = latest;
        }
        self.synchronous = false;
        self.marking = false;
        // A cancel raised by the timer for a lock wait that ended before it was acted on (or
        // one raised again as the wait was being canceled) must not stop the receiver at its
        // next interrupt check: cancels only ever concern the apply attempt just made.
        AWAITED.clear();
        // SAFETY: main thread, timer disarmed; a `sig_atomic_t` PostgreSQL's handlers only set.
        unsafe { pg_sys::QueryCancelPending = 0 };
        let Some(key) = key else {
            // Not coordinated (asynchronous mode): an error stops the receiver, as for a commit.
            if let Err((code, message, _)) = outcome {
                ErrorReport::new(code, message, "mmts").report(PgLogLevel::ERROR);
            }
            return Some(self.finished(prepare_time));
        };
        twophase::set_applying(self.peer, None);
        let vote = match outcome {
            Ok(local_xid) => {
                twophase::register_applied(local_xid, key, self.peer, xid, preparing.members);
                Vote::Yes { proposal: twophase::clock_next() }
            }
            Err((code, _, Some((tag, mode)))) if code == PgSqlErrorCode::ERRCODE_QUERY_CANCELED => {
                let waited = first_attempt.elapsed().as_millis() as i64;
                // SAFETY: the receiver's main thread, the failed attempt aborted; `tag` and `mode`
                // are a copy of the lock the canceled wait was for.
                let holders = unsafe { lock_holders(&tag, mode) };
                let kinds: Vec<participant::Holder> =
                    holders.iter().map(|h| twophase::classify_holder(h, key.node)).collect();
                for (holder, kind) in holders.iter().zip(&kinds) {
                    if *kind == participant::Holder::Wounded && !preparing.wounded.contains(&holder.xid) {
                        preparing.wounded.push(holder.xid);
                    }
                }
                let described: Vec<String> = holders
                    .iter()
                    .zip(&kinds)
                    .map(|(holder, kind)| match kind {
                        participant::Holder::Committing(h) => {
                            format!("transaction {} of node {} being committed", holder.xid, h.node)
                        }
                        participant::Holder::Wounded => format!("local transaction {} of node {}", holder.xid, self.me),
                        participant::Holder::Other => format!("transaction {} of node {}", holder.xid, self.me),
                    })
                    .collect();
                let min_timeout = gucs::TWOPC_MIN_TIMEOUT.get() as i64;
                match participant::on_lock(key, &kinds, member, waited, min_timeout) {
                    participant::OnLock::Die { older } => Vote::No {
                        sqlstate: participant::NO.into(),
                        message: format!(
                            "could not serialize access due to a concurrent transaction of node {} being committed",
                            older.node
                        ),
                    },
                    // A member sets it aside for half the coordinator's shortest wait (the
                    // reason reaches it in time); a node catching up tries again in place
                    // until the holder ends, or its own rollback arrives (the members may have
                    // rolled it back for this very conflict).
                    participant::OnLock::SetAside => {
                        if waited >= 1000 && !preparing.reported {
                            preparing.reported = true;
                            log(format!(
                                "mmts: transaction {xid} of node {} ({key:?}) has waited {waited} ms for a lock held by {}",
                                self.peer,
                                described.join(", ")
                            ));
                        }
                        // Not a member, it may wait behind a peer's transaction that the
                        // cluster already ended while the end is still far off in that peer's
                        // stream, behind what waits for this very stream: settling it with
                        // the other nodes ends the wait (see `status::PeerStatus::held_up`).
                        let silence = gucs::HEARTBEAT_RECV_TIMEOUT.get() as i64;
                        if !member && waited >= silence {
                            for holder in holders.iter().filter(|h| h.xid != 0) {
                                if let Some((origin, origin_xid)) = twophase::applied_origin(holder.xid) {
                                    crate::status::update(origin, |s| s.held_up = origin_xid);
                                }
                            }
                        }
                        let holders = holders.iter().map(|h| h.xid).filter(|&x| x != 0).collect();
                        self.set_aside(xid, end_lsn, prepare_time, preparing, holders, Instant::now() + RECHECK);
                        return None;
                    }
                    participant::OnLock::GiveUp => {
                        // A wounded transaction that stayed idle all along keeps its rows.
                        for &x in &preparing.wounded {
                            twophase::heal(x, key.node);
                        }
                        Vote::No {
                            sqlstate: participant::NO.into(),
                            message: format!(
                                "could not serialize access: waited {waited} ms for a row lock held by {}",
                                described.join(", ")
                            ),
                        }
                    }
                }
            }
            Err((code, message, _)) if !member => {
                // Not this node's to refuse: the members decide. It tries again in place until
                // the outcome arrives: rolled back (the members refused it too, for this very
                // error, say), it is dropped; committed, this node must apply it, and it says
                // why it cannot (mtm.get_nodes_state().apply_error) while it keeps trying.
                let text = format!(
                    "cannot apply transaction {xid} of node {}: {message} (SQLSTATE {})",
                    self.peer,
                    twophase::sqlstate_text(code)
                );
                crate::status::set_apply_error(self.peer, &text);
                if !preparing.reported {
                    preparing.reported = true;
                    log(format!("mmts: {text}; trying again until its outcome arrives"));
                }
                let until = Instant::now() + Duration::from_secs(1);
                while Instant::now() < until && !doomed(xid) {
                    self.pause(keep_up);
                }
                self.set_aside(xid, end_lsn, prepare_time, preparing, Vec::new(), Instant::now());
                return None;
            }
            Err((code, message, _)) => Vote::No { sqlstate: twophase::sqlstate_text(code), message },
        };
        let prepared = matches!(vote, Vote::Yes { .. });
        self.signal(Signal::Vote { origin: NodeId(self.peer), xid, voter: NodeId(self.me), vote });
        if let (true, Some(outcome)) = (prepared, settled) {
            // Committed by the cluster before it reached this node.
            self.carry_out(NodeId(self.peer), xid, outcome, end_lsn, keep_up);
        }
        Some(self.finished(prepare_time))
    }
}

/// How often a receiver that cannot go on logs that it still waits.
pub(super) const WAIT_LOG_EVERY: Duration = Duration::from_secs(30);

/// A wait of the receiver from `self.0` shown in `mtm.get_nodes_state()` until it ends.
pub(super) struct WaitShown(u32);

impl WaitShown {
    fn set(&self, wait: crate::status::Wait) {
        crate::status::update(self.0, |p| p.wait = wait);
    }
}

impl Drop for WaitShown {
    fn drop(&mut self) {
        self.set(crate::status::Wait::default());
    }
}
