//! Flow control while a node catches up.
//!
//! A node coming back applies, one transaction after another, what every member committed
//! while it was away and what they commit meanwhile. Under a load that commits faster than
//! that, it never catches up. So each member spaces its write commits while a node of the
//! partition catches up without gaining on the members: it reports in its heartbeats how many
//! bytes of the members' WAL it has yet to apply ([`crate::membership::Report::behind`]), and
//! each member, about once a second, compares that with the figure of a second before. Not
//! down by a fifth or more: the spacing between two write commits on the member doubles (from
//! [`FIRST_INTERVAL`], up to the configured maximum); down by that much: it halves, and under
//! [`FIRST_INTERVAL`] it is gone; nearly caught up ([`NEARLY_CAUGHT_UP`]) and still gaining:
//! it stays. Once no node catches up, it is gone at once; and while the node applies nothing
//! at all (it waits for a peer that is down, say) it is gone too: spacing cannot help then.
//!
//! At the maximum spacing `m` a member commits at most `1/m` write transactions a second,
//! however many clients it has; a node that applies faster than the members then commit gains
//! on them, so it gets online within a time bounded by its lag and that difference.

use crate::wire::Timestamp;

/// How often (µs) the spacing is reconsidered.
pub const PERIOD: Timestamp = 1_000_000;
/// The smallest spacing (µs) between two write commits; below it there is none.
pub const FIRST_INTERVAL: u64 = 100;
/// A lag this small (bytes) counts as gaining: the node is about to be caught up.
pub const NEARLY_CAUGHT_UP: u64 = 64 * 1024;

/// A member's spacing of its write commits.
#[derive(Debug, Clone, Default)]
pub struct Throttle {
    /// µs between two write commits (0: none).
    interval: u64,
    /// The node's lag and what it had applied when last compared, and when.
    last: Option<(Timestamp, Lag)>,
}

/// What a node catching up reports of itself (see [`crate::membership::Report`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lag {
    /// Bytes of its peers' WAL it has yet to apply.
    pub behind: u64,
    /// Bytes of its peers' WAL it has applied (a sum of positions): it moves while it applies.
    pub applied: u64,
}

impl Throttle {
    /// Takes the lag of the node catching up that is furthest behind (`None`: no node catches
    /// up) at `now`; `max`: the longest spacing (µs; 0: never space commits). Returns the
    /// spacing.
    pub fn observe(&mut self, now: Timestamp, lag: Option<Lag>, max: u64) -> u64 {
        let Some(lag) = lag.filter(|_| max > 0) else {
            *self = Throttle::default();
            return 0;
        };
        let behind = lag.behind;
        match self.last {
            None => self.last = Some((now, lag)),
            Some((then, before)) if now - then >= PERIOD => {
                let (stalled, before) = (lag.applied == before.applied, before.behind);
                self.interval = if stalled {
                    0
                } else if behind > NEARLY_CAUGHT_UP && behind * 5 <= before * 4 {
                    let half = self.interval / 2;
                    if half < FIRST_INTERVAL {
                        0
                    } else {
                        half
                    }
                } else if behind <= NEARLY_CAUGHT_UP && behind < before {
                    // Nearly there and still gaining: the spacing stays.
                    self.interval
                } else {
                    (self.interval * 2).clamp(FIRST_INTERVAL, max)
                };
                self.last = Some((now, lag));
            }
            Some(_) => {}
        }
        self.interval = self.interval.min(max);
        self.interval
    }
}

/// When a write commit asked for at `now` may go ahead, given the earliest time the next one
/// may (`next`) and the spacing: `(start, next after it)`.
pub fn next_commit(now: Timestamp, next: Timestamp, interval: u64) -> (Timestamp, Timestamp) {
    if interval == 0 {
        return (now, now);
    }
    let start = now.max(next);
    (start, start + interval as Timestamp)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 100_000;

    /// A lag of `behind` bytes, with `applied` moving (a node that applies).
    fn lag(behind: u64, applied: u64) -> Option<Lag> {
        Some(Lag { behind, applied })
    }

    #[test]
    fn no_node_catching_up_means_no_spacing() {
        let mut t = Throttle::default();
        assert_eq!(t.observe(0, None, MAX), 0);
        assert_eq!(t.observe(0, lag(10 << 20, 0), MAX), 0, "nothing to compare with yet");
        assert_eq!(t.observe(PERIOD, lag(10 << 20, 1), MAX), FIRST_INTERVAL);
        assert_eq!(t.observe(2 * PERIOD, None, MAX), 0, "gone once nobody catches up");
    }

    #[test]
    fn spacing_doubles_while_the_lag_holds_and_halves_while_it_shrinks() {
        let mut t = Throttle::default();
        t.observe(0, lag(10 << 20, 0), MAX);
        let mut at = 0;
        let mut step = |behind: u64| {
            at += PERIOD;
            t.observe(at, lag(behind, at as u64), MAX)
        };
        assert_eq!(step(10 << 20), 100);
        assert_eq!(step(11 << 20), 200);
        assert_eq!(step(9 << 20), 400, "down by less than a fifth");
        assert_eq!(step(7 << 20), 200, "down by more than a fifth");
        assert_eq!(step(7 << 20), 400);
        let mut last = 0;
        for _ in 0..20 {
            last = step(7 << 20);
        }
        assert_eq!(last, MAX, "never past the maximum");
        assert_eq!(step(NEARLY_CAUGHT_UP), MAX, "nearly caught up and gaining: it stays");
        assert_eq!(step(NEARLY_CAUGHT_UP), MAX, "not gaining, at the maximum");
        assert_eq!(step(1 << 20), MAX);
        assert_eq!(step(1 << 19), MAX / 2, "halved");
    }

    #[test]
    fn a_period_passes_between_two_changes() {
        let mut t = Throttle::default();
        t.observe(0, lag(1 << 30, 0), MAX);
        assert_eq!(t.observe(PERIOD, lag(1 << 30, 1), MAX), 100);
        assert_eq!(t.observe(PERIOD + PERIOD / 2, lag(1 << 30, 2), MAX), 100);
        assert_eq!(t.observe(2 * PERIOD, lag(1 << 30, 3), MAX), 200);
    }

    #[test]
    fn off_when_the_maximum_is_zero() {
        let mut t = Throttle::default();
        t.observe(0, lag(1 << 30, 0), MAX);
        t.observe(PERIOD, lag(1 << 30, 1), MAX);
        assert_eq!(t.observe(2 * PERIOD, lag(1 << 30, 2), 0), 0);
    }

    /// A node that applies nothing (it waits for a peer that is down) gains nothing from
    /// spacing: there is none while it stays so.
    #[test]
    fn none_while_the_node_applies_nothing() {
        let mut t = Throttle::default();
        t.observe(0, lag(1 << 30, 0), MAX);
        assert_eq!(t.observe(PERIOD, lag(1 << 30, 1), MAX), 100);
        assert_eq!(t.observe(2 * PERIOD, lag(1 << 30, 1), MAX), 0, "stalled");
        assert_eq!(t.observe(3 * PERIOD, lag(1 << 30, 1), MAX), 0, "still stalled");
        assert_eq!(t.observe(4 * PERIOD, lag(1 << 30, 2), MAX), 100, "applying again");
    }

    #[test]
    fn commits_are_spaced_whatever_the_number_of_clients() {
        // Ten commits asked for at once: one every interval.
        let mut next = 0;
        let starts: Vec<Timestamp> = (0..10)
            .map(|_| {
                let (start, after) = next_commit(1000, next, 50);
                next = after;
                start
            })
            .collect();
        assert_eq!(starts, (0..10).map(|i| 1000 + 50 * i).collect::<Vec<_>>());
        assert_eq!(next_commit(5000, next, 0), (5000, 5000));
    }

    /// The members commit what their clients ask for, at most one write every interval; the
    /// node catching up applies a fixed number a second. Whatever the load, it catches up, in
    /// at most the time the spacing takes to reach the maximum (what the lag grows to then)
    /// plus that lag over what it gains a second at the maximum spacing.
    #[test]
    fn a_node_that_applies_slower_than_the_load_catches_up() {
        const BYTES: u64 = 400;
        const MISSED: u64 = 50 << 20;
        let tick: Timestamp = 100_000;
        for (offered, applies) in [(2_000u64, 1_000u64), (20_000, 1_000), (5_000, 4_000), (100_000, 300)] {
            let mut t = Throttle::default();
            let (mut behind, mut applied_total) = (MISSED, 0);
            let mut caught_up_at = None;
            for step in 0..100_000i64 {
                let now = step * tick;
                let interval = t.observe(now, lag(behind, applied_total), MAX);
                let rate = if interval == 0 { offered } else { offered.min(1_000_000 / interval) };
                let committed = rate * tick as u64 / 1_000_000 * BYTES;
                let applied = applies * tick as u64 / 1_000_000 * BYTES;
                behind = (behind + committed).saturating_sub(applied);
                applied_total += applied;
                if behind == 0 {
                    caught_up_at = Some(now);
                    break;
                }
            }
            let at =
                caught_up_at.unwrap_or_else(|| panic!("{offered}/s offered, {applies}/s applied: never caught up"));
            let ramp = (MAX / FIRST_INTERVAL).ilog2() as u64 + 2;
            let worst = MISSED + (offered - applies.min(offered)) * BYTES * ramp;
            let gain = (applies - 1_000_000 / MAX) * BYTES;
            let bound = ramp + worst / gain + 1;
            assert!(
                (at / PERIOD) as u64 <= bound,
                "{offered}/s offered, {applies}/s applied: {} s, bound {bound} s",
                at / PERIOD
            );
        }
    }
}
