//! Read leases: a member answers reads of replicated tables only while no majority can commit
//! without it.
//!
//! Every heartbeat carries the sender's reading of its own monotonic clock (`sent_at`). A node
//! that counts the receiver as a member also sends back the latest `sent_at` it had from it
//! (`echo`, 0 when it does not count it): that is a lease. The holder measures it on its own
//! clock, from the moment it sent the heartbeat that came back, for [`Lease::length`]; the
//! grantor keeps the holder among its members (so neither it nor any transaction it votes on
//! commits without it) until [`Lease::promised_until`], measured on its clock from the moment
//! it *received* that heartbeat, which was later. Only durations measured on one clock are
//! compared, so the offset between clocks does not matter; their rates may differ by up to
//! [`DRIFT_PERCENT`].
//!
//! A member is readable while it holds a running lease from every other member it counts and
//! has applied each of those members' streams as far as their WAL reached when its lease began
//! ([`Held::bar`]): what they committed without it before they counted it again.

use crate::membership::{bit, nodes, State, View};
use crate::wire::Timestamp;
use crate::NodeId;

/// How much two nodes' clock rates may differ, in percent, for the leases to hold.
pub const DRIFT_PERCENT: i64 = 1;

/// The lease rules for leases `length` microseconds long.
#[derive(Debug, Clone, Copy)]
pub struct Lease {
    pub length: Timestamp,
}

impl Lease {
    /// Until when the grantor keeps the holder among its members, having echoed a heartbeat it
    /// received at `received` (its clock): the lease's length, stretched by a little more
    /// than twice the drift bound.
    pub fn promised_until(self, received: Timestamp) -> Timestamp {
        received + self.length + self.length * (2 * DRIFT_PERCENT + 1) / 100
    }

    /// The lease a holder has from one grantor after that grantor's heartbeat came with `echo`
    /// (0: none) and reported its WAL flushed to `wal_end`, at `now` (the holder's clock).
    pub fn renew(self, held: Held, echo: Timestamp, wal_end: u64, now: Timestamp) -> Held {
        if echo == 0 {
            return Held::default();
        }
        let until = echo + self.length;
        // A lease that had lapsed begins again: the grantor may have committed without this
        // node meanwhile, up to where its WAL reaches now.
        let bar = if held.until <= now { wal_end } else { held.bar };
        Held { until: until.max(held.until), bar }
    }
}

/// A lease one node holds from one grantor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// Runs until then (the holder's clock; 0: none).
    pub until: Timestamp,
    /// The grantor's WAL end when the lease began: the holder answers reads once it has
    /// applied the grantor's stream this far.
    pub bar: u64,
}

/// Why a node does not answer reads now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unreadable {
    /// Not a member (see [`crate::membership::View`]).
    NotOnline(State),
    /// No running lease from this member.
    NoLease(NodeId),
    /// This member's writes from before its lease began are not all applied yet.
    Behind { node: NodeId, applied: u64, bar: u64 },
    /// Shutting down: it gave its leases back.
    Released,
}

/// Whether node `me`, with view `view`, may answer reads at `now`: `held[n - 1]` is its lease
/// from node n and `applied[n - 1]` how far it applied node n's stream.
pub fn readable(me: NodeId, view: &View, held: &[Held], applied: &[u64], now: Timestamp) -> Result<(), Unreadable> {
    if view.state != State::Online {
        return Err(Unreadable::NotOnline(view.state));
    }
    for node in nodes(view.members & !bit(me)) {
        let i = node.0 as usize - 1;
        let lease = held.get(i).copied().unwrap_or_default();
        if lease.until <= now {
            return Err(Unreadable::NoLease(node));
        }
        let applied = applied.get(i).copied().unwrap_or(0);
        if applied < lease.bar {
            return Err(Unreadable::Behind { node, applied, bar: lease.bar });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Lease = Lease { length: 2_000_000 };

    fn online(members: u64) -> View {
        View { partition: members, members, state: State::Online, excluded_by: None }
    }

    #[test]
    fn the_grantor_keeps_its_promise_longer_than_the_holder_believes_it() {
        // The holder sent at 100 (its clock) and believes the lease until 100 + L. The grantor
        // received it later; even if the holder's clock runs 1% slow and the grantor's 1% fast,
        // the promise outlasts the belief in real time.
        let sent = 100;
        let received = 5_000; // the grantor's clock, any offset
        let belief_real = (L.length as f64) / 0.99;
        let promise_real = (L.promised_until(received) - received) as f64 / 1.01;
        assert!(promise_real > belief_real);
        assert_eq!(L.renew(Held::default(), sent, 7, 0).until, sent + L.length);
    }

    #[test]
    fn a_lapsed_lease_sets_a_new_bar_a_running_one_keeps_it() {
        let first = L.renew(Held::default(), 1_000, 50, 1_000);
        assert_eq!(first, Held { until: 1_000 + L.length, bar: 50 });
        // Renewed while running: the bar stays (the grantor counted this node all along).
        let renewed = L.renew(first, 200_000, 90, 300_000);
        assert_eq!(renewed, Held { until: 200_000 + L.length, bar: 50 });
        // Renewed after it ran out: the grantor may have committed without it up to 120.
        let again = L.renew(renewed, 5_000_000, 120, 5_000_000);
        assert_eq!(again.bar, 120);
        // No echo: the grantor does not count this node.
        assert_eq!(L.renew(again, 0, 130, 5_000_001), Held::default());
    }

    #[test]
    fn readable_needs_online_a_lease_from_every_other_member_and_their_writes() {
        let view = online(0b111);
        let held = [Held::default(), Held { until: 500, bar: 10 }, Held { until: 500, bar: 20 }];
        assert_eq!(readable(NodeId(1), &view, &held, &[0, 10, 20], 100), Ok(()));
        assert_eq!(readable(NodeId(1), &view, &held, &[0, 10, 20], 500), Err(Unreadable::NoLease(NodeId(2))));
        assert_eq!(
            readable(NodeId(1), &view, &held, &[0, 10, 19], 100),
            Err(Unreadable::Behind { node: NodeId(3), applied: 19, bar: 20 })
        );
        // A member it does not count needs no lease.
        assert_eq!(readable(NodeId(1), &online(0b011), &held, &[0, 10, 0], 100), Ok(()));
        let recovering = View { state: State::Recovery, ..online(0) };
        assert_eq!(
            readable(NodeId(1), &recovering, &held, &[0, 10, 20], 100),
            Err(Unreadable::NotOnline(State::Recovery))
        );
    }
}
