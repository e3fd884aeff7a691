//! The participant's side of a synchronous commit: what a node does with a peer's transaction
//! it receives prepared, before and after applying its changes, up to its vote. The shell
//! (`apply`) gathers the facts (this node's view, what it has applied, who holds a lock) and
//! carries the step out; the rules are here.
//!
//! - A **member** of the transaction (counted by its coordinator) votes. It refuses at once
//!   what it cannot take: its view of the members differs from the coordinator's, or the
//!   coordinator had not applied all this node committed while it was catching up. It sets the
//!   transaction aside (its stream goes on) while what the coordinator had applied of the
//!   other streams is not applied here yet, or while a lock it needs is held by a younger
//!   transaction, for at most half the coordinator's shortest wait; then it votes no.
//!   Wait-die: a lock held by an *older* transaction being committed is a no at once.
//! - A node **catching up** (not counted) does not vote: the members decide. It waits in place
//!   for what the transaction depends on, and tries again until the outcome arrives.

use crate::membership::{bit, format_mask, Mask, State, View};
use crate::twopc::{on_conflict, Key, OnConflict, SERIALIZATION_FAILURE};
use crate::NodeId;

/// What is known of a peer's transaction before its changes are applied here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// This node.
    pub me: NodeId,
    /// Its coordinator asks for a vote (synchronous mode); otherwise it is simply applied.
    pub coordinated: bool,
    /// This node is one of the members it was prepared on.
    pub member: bool,
    /// Its rollback has arrived already (in the stream, or settled by the cluster).
    pub rolled_back: bool,
    /// Why this node cannot take part ([`membership_refusal`], [`stale_refusal`]), if it
    /// cannot.
    pub refusal: Option<String>,
    /// What the coordinator had applied of the other streams is applied here.
    pub dependencies_met: bool,
    /// How long it has been waiting since it first arrived, in milliseconds.
    pub waited_ms: i64,
    /// The coordinator's shortest wait for votes (`multimaster.twopc_min_timeout`), in ms.
    pub min_timeout_ms: i64,
}

/// Why member `me`, whose view is `view`, cannot vote yes on a transaction whose coordinator
/// counted `counted`: it is not online, or counts other members (two memberships never both
/// commit).
pub fn membership_refusal(me: NodeId, view: &View, coordinator: NodeId, counted: Mask) -> Option<String> {
    if view.state != State::Online {
        Some(format!("node {me} is {}, not online", view.state.name()))
    } else if view.members != counted {
        Some(format!(
            "node {me} counts members {}, node {coordinator} counted {}",
            format_mask(view.members),
            format_mask(counted)
        ))
    } else {
        None
    }
}

/// Why member `me` cannot vote yes on a transaction of `coordinator` that had applied `seen`
/// of the other streams: `need[p - 1]` is how far in node p's stream this node committed
/// transactions the coordinator did not take part in (it was catching up), so the coordinator
/// may have written over rows older than this node's. Dropped nodes' streams do not count.
pub fn stale_refusal(
    me: NodeId,
    coordinator: NodeId,
    need: &[u64],
    seen: &[(NodeId, u64)],
    dropped: Mask,
) -> Option<String> {
    let seen = |p: NodeId| seen.iter().find(|(n, _)| *n == p).map_or(0, |(_, lsn)| *lsn);
    let behind = (1..=need.len() as u32)
        .map(NodeId)
        .find(|&p| p != coordinator && dropped & bit(p) == 0 && seen(p) < need[p.0 as usize - 1])?;
    Some(format!(
        "node {coordinator} had not yet applied all of node {behind}'s transactions that node {me} committed while it was catching up"
    ))
}

/// What to do with it before applying its changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Before {
    /// Nothing: it is rolled back already.
    Drop,
    /// Vote no with this message (SQLSTATE 40001), without applying it.
    VoteNo(String),
    /// Set it aside and go on with the stream; look again later.
    SetAside,
    /// Wait here, in place, until what it depends on is applied (a node catching up).
    WaitInPlace,
    /// Apply its changes and prepare it.
    Apply,
}

/// The step before applying.
pub fn before_apply(r: &Received) -> Before {
    if r.rolled_back {
        return Before::Drop;
    }
    if !r.coordinated {
        return Before::Apply;
    }
    if r.member {
        if let Some(why) = &r.refusal {
            return Before::VoteNo(why.clone());
        }
    }
    match (r.dependencies_met, r.member) {
        (true, _) => Before::Apply,
        (false, false) => Before::WaitInPlace,
        (false, true) if r.waited_ms >= r.min_timeout_ms / 2 => {
            Before::VoteNo(format!("node {} has not yet applied what the transaction depends on", r.me))
        }
        (false, true) => Before::SetAside,
    }
}

/// Who holds a lock the transaction waited for, as far as the rules care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// A transaction in two-phase commit (prepared here, or being applied), with its key.
    Committing(Key),
    /// A local transaction not in two-phase commit yet: it was wounded (canceled).
    Wounded,
    /// Anything else (a worker, an application's prepared transaction).
    Other,
}

/// What to do when applying stopped on a lock held by `holders`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnLock {
    /// Vote no: an older transaction being committed holds it and wins everywhere
    /// (`older`: its key).
    Die { older: Key },
    /// Set it aside and try again when a holder ends (or, not a member, until its outcome).
    SetAside,
    /// Waited as long as a member may: vote no.
    GiveUp,
}

/// Wait-die for the transaction `key` (see [`on_conflict`]), which has waited `waited_ms`.
pub fn on_lock(key: Key, holders: &[Holder], member: bool, waited_ms: i64, min_timeout_ms: i64) -> OnLock {
    let older = holders.iter().find_map(|h| match *h {
        Holder::Committing(h) if on_conflict(key, Some(h)) == OnConflict::Die => Some(h),
        _ => None,
    });
    match older {
        Some(older) if member => OnLock::Die { older },
        _ if !member || waited_ms < min_timeout_ms / 2 => OnLock::SetAside,
        _ => OnLock::GiveUp,
    }
}

/// SQLSTATE of every no these rules give.
pub const NO: &str = SERIALIZATION_FAILURE;

#[cfg(test)]
mod tests {
    use super::*;

    fn received() -> Received {
        Received {
            me: NodeId(2),
            coordinated: true,
            member: true,
            rolled_back: false,
            refusal: None,
            dependencies_met: true,
            waited_ms: 0,
            min_timeout_ms: 2000,
        }
    }

    #[test]
    fn a_member_refuses_sets_aside_then_gives_up() {
        assert_eq!(before_apply(&received()), Before::Apply);
        let refused = Received { refusal: Some("counts other members".into()), ..received() };
        assert_eq!(before_apply(&refused), Before::VoteNo("counts other members".into()));
        let behind = Received { dependencies_met: false, ..received() };
        assert_eq!(before_apply(&behind), Before::SetAside);
        assert_eq!(before_apply(&Received { waited_ms: 999, ..behind.clone() }), Before::SetAside);
        assert!(matches!(before_apply(&Received { waited_ms: 1000, ..behind }), Before::VoteNo(_)));
    }

    #[test]
    fn a_node_catching_up_never_votes_and_waits_in_place() {
        let catching_up = Received { member: false, refusal: Some("not online".into()), ..received() };
        assert_eq!(before_apply(&catching_up), Before::Apply, "a refusal is for members");
        let behind = Received { dependencies_met: false, waited_ms: 1_000_000, ..catching_up };
        assert_eq!(before_apply(&behind), Before::WaitInPlace);
        assert_eq!(before_apply(&Received { rolled_back: true, ..behind }), Before::Drop);
        let uncoordinated = Received { coordinated: false, dependencies_met: false, ..received() };
        assert_eq!(before_apply(&uncoordinated), Before::Apply);
    }

    #[test]
    fn refusals_name_what_differs() {
        let view = |state, members| View { partition: 0b111, members, state, excluded_by: None };
        let (me, c) = (NodeId(2), NodeId(1));
        assert_eq!(membership_refusal(me, &view(State::Online, 0b111), c, 0b111), None);
        assert_eq!(
            membership_refusal(me, &view(State::Online, 0b111), c, 0b101).as_deref(),
            Some("node 2 counts members {1,2,3}, node 1 counted {1,3}")
        );
        assert_eq!(
            membership_refusal(me, &view(State::Recovery, 0b101), c, 0b101).as_deref(),
            Some("node 2 is recovery, not online")
        );
        // Node 2 committed node 3's stream as far as 500 without node 1.
        let need = [0, 0, 500];
        assert_eq!(stale_refusal(me, c, &need, &[(NodeId(3), 500)], 0), None);
        assert!(stale_refusal(me, c, &need, &[(NodeId(3), 499)], 0).is_some_and(|m| m.contains("node 3's")));
        assert_eq!(stale_refusal(me, c, &need, &[], bit(NodeId(3))), None, "node 3 was dropped");
    }

    #[test]
    fn wait_die_on_locks() {
        let key = |ts| Key { ts, node: NodeId(1) };
        let me = key(100);
        // An older holder being committed: a member dies at once.
        assert_eq!(on_lock(me, &[Holder::Committing(key(50))], true, 0, 2000), OnLock::Die { older: key(50) });
        // A younger one, a local transaction, anything else: wait (set aside) for a while.
        for h in [Holder::Committing(key(150)), Holder::Wounded, Holder::Other] {
            assert_eq!(on_lock(me, &[h], true, 999, 2000), OnLock::SetAside);
            assert_eq!(on_lock(me, &[h], true, 1000, 2000), OnLock::GiveUp);
        }
        // A node catching up never votes: it waits whoever holds the lock.
        assert_eq!(on_lock(me, &[Holder::Committing(key(50))], false, 1_000_000, 2000), OnLock::SetAside);
    }
}
