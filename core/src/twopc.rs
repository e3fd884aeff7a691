//! Synchronous commit: the two-phase-commit coordinator, the hybrid logical clock that gives
//! commit timestamps, the signals peers send back, and the rule that settles lock conflicts
//! between transactions being committed on different nodes.
//!
//! The coordinator runs in the backend whose client commits. Its transaction is prepared
//! locally; every live peer applies and prepares it and votes; all yes: commit everywhere with
//! the largest proposed timestamp; any no, a lost majority or the deadline: roll back
//! everywhere. Nothing here does I/O: the shell feeds votes, lost peers and the clock in, and
//! carries out the [`Decision`].

use serde::{Deserialize, Serialize};

use crate::indoubt::{Answer, Ballot, Outcome};
use crate::membership::{Mask, Report};
use crate::wire::Timestamp;
use crate::NodeId;

/// Prefix of the logical decoding messages that carry [`Signal`]s.
pub const SIGNAL_PREFIX: &str = "mmts";
const SIGNAL_VERSION: u8 = 3;

/// The next reading of a hybrid logical clock that last gave (or saw) `last`, when the
/// physical clock says `physical`: never below the physical clock, always above `last`.
pub fn hlc_next(last: Timestamp, physical: Timestamp) -> Timestamp {
    physical.max(last + 1)
}

/// The clock after seeing `remote` from another node: it never goes back below what it saw.
pub fn hlc_observe(last: Timestamp, remote: Timestamp) -> Timestamp {
    last.max(remote)
}

/// Orders transactions being committed: older (smaller) first. The same on every node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Key {
    /// The coordinator's clock when it prepared.
    pub ts: Timestamp,
    pub node: NodeId,
}

/// What a node that applies a transaction `applying` does when a lock it needs is held by
/// another transaction (`holder`, when that one is being committed too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnConflict {
    /// Keep waiting: the holder finishes, or loses to us on the node where it waits for us.
    Wait,
    /// Vote no now: the holder is older and wins everywhere.
    Die,
}

/// Wait-die: a younger transaction never waits for an older one, so no cycle of waits can
/// form across nodes, and the oldest of any conflicting set always commits.
pub fn on_conflict(applying: Key, holder: Option<Key>) -> OnConflict {
    match holder {
        Some(h) if h < applying => OnConflict::Die,
        _ => OnConflict::Wait,
    }
}

/// Whether this node has applied, of the other nodes' streams, the transactions ended
/// (committed or rolled back) that the coordinator had when it prepared: `need` lists, per
/// node, the end LSN of the last one; `have` gives this node's. Streams for which `skip` says
/// so are left out: this node's own, the transaction's own (applied in order anyway), and those
/// of nodes out of reach (what they had committed is settled with their prepared transactions).
pub fn dependencies_met(
    need: &[(NodeId, u64)],
    mut have: impl FnMut(NodeId) -> u64,
    skip: impl Fn(NodeId) -> bool,
) -> bool {
    need.iter().filter(|(n, _)| !skip(*n)).all(|(n, lsn)| have(*n) >= *lsn)
}

/// A peer's answer after trying to prepare a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Vote {
    /// Prepared; proposes this commit timestamp.
    Yes { proposal: Timestamp },
    /// Could not prepare: the SQLSTATE and message of the error it got.
    No { sqlstate: String, message: String },
}

/// What nodes tell each other about transactions being committed, carried as logical
/// decoding messages (prefix [`SIGNAL_PREFIX`]) in the sender's WAL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Signal {
    /// Written by a coordinator inside its transaction: the members (see
    /// [`crate::membership`]) must vote on it. `after` is how far the coordinator had applied
    /// the other nodes' streams when it prepared: a node applies the transaction only once it
    /// has applied as much (see [`dependencies_met`]), so that it sees what the transaction saw.
    Coordinated {
        key: Key,
        members: Mask,
        after: Vec<(NodeId, u64)>,
    },
    /// A node's heartbeat to a peer: its report, its monotonic clock when it sent it, and the
    /// lease it grants the peer (see [`crate::lease`]: the peer's latest `sent_at` it had, 0 for
    /// none).
    Heartbeat {
        from: NodeId,
        report: Report,
        sent_at: Timestamp,
        echo: Timestamp,
    },
    /// A node shutting down cleanly gives back the read leases it held (it answers no more
    /// reads): its peers need not keep it among their members until their promises end.
    /// `sent_at` (its monotonic clock) tells a release read late, from WAL, from one that
    /// came after the node's newer heartbeats.
    LeaseReleased {
        from: NodeId,
        sent_at: Timestamp,
    },
    /// Written by a coordinator that has every member's yes: accept "commit at `ts`" under
    /// its ballot (see [`crate::indoubt`]); it commits once a majority has. `since`: when it
    /// prepared the transaction (a node that may have forgotten it since answers Unknown).
    Precommit {
        origin: NodeId,
        xid: u32,
        ts: Timestamp,
        since: Timestamp,
    },
    /// A resolver's requests about transaction `xid` of node `origin` (phases 1 and 2),
    /// prepared on the resolver at `since`.
    Promise {
        origin: NodeId,
        xid: u32,
        since: Timestamp,
        ballot: Ballot,
    },
    Accept {
        origin: NodeId,
        xid: u32,
        since: Timestamp,
        ballot: Ballot,
        outcome: Outcome,
    },
    /// `voter`'s answer to a precommit, a promise or an accept request.
    Answered {
        origin: NodeId,
        xid: u32,
        voter: NodeId,
        answer: Answer,
    },
    /// Written by a resolver that settled transaction `xid` of node `origin`: every node
    /// carries out `outcome`.
    Resolved {
        origin: NodeId,
        xid: u32,
        outcome: Outcome,
    },
    /// `voter`'s vote on transaction `xid` of node `origin`.
    Vote {
        origin: NodeId,
        xid: u32,
        voter: NodeId,
        vote: Vote,
    },
    /// `voter` has committed (or rolled back) transaction `xid` of node `origin`.
    Finished {
        origin: NodeId,
        xid: u32,
        voter: NodeId,
        committed: bool,
    },
    /// Written inside a transaction where a statement that changes the schema (or roles,
    /// privileges, comments) ran: every node runs `statement` at that point of the transaction,
    /// as `role`, with `search_path`.
    Ddl {
        role: String,
        search_path: String,
        statement: String,
    },
    /// Written at the first write of a transaction in asynchronous mode: per node, the commit
    /// time of the last of its transactions the writing node had applied (see
    /// [`crate::conflict::writer_had_seen`]).
    Seen {
        applied: Vec<(NodeId, Timestamp)>,
    },
    /// Written first inside a peer's transaction that a node applies when its coordinator left
    /// some node out of its `members`: transaction `xid` of node `origin`, whose PREPARE ends
    /// at `prepared_at` in the origin's stream, and how far its coordinator had applied the
    /// other streams (`after`). A node left out reads it back from this node's stream: the
    /// output plugin forwards such a transaction, at its commit here, to the nodes that were
    /// not among its members (see [`crate::forward`]).
    Forwarded {
        origin: NodeId,
        xid: u32,
        prepared_at: u64,
        members: Mask,
        after: Vec<(NodeId, u64)>,
    },
    /// Written by a receiver while some node is out of the members: this node has ended node
    /// `stream`'s transactions as far as `through` in its stream, and every one of them it
    /// committed is forwarded before this point to the nodes it left out. A node reading it in
    /// this node's stream has therefore ended them as far as that too (see [`crate::forward`]).
    Ended {
        stream: NodeId,
        through: u64,
    },
}

/// The largest encoded signal accepted (a DDL statement's text must fit).
pub const MAX_SIGNAL: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignalError {
    #[error("empty signal")]
    Empty,
    #[error("unsupported signal version {0}")]
    Version(u8),
    #[error("malformed signal: {0}")]
    Malformed(String),
}

impl Signal {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![SIGNAL_VERSION];
        bincode::serde::encode_into_std_write(self, &mut out, bincode::config::standard()).expect("Vec write");
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Signal, SignalError> {
        let (&version, body) = bytes.split_first().ok_or(SignalError::Empty)?;
        if version != SIGNAL_VERSION {
            return Err(SignalError::Version(version));
        }
        let config = bincode::config::standard().with_limit::<MAX_SIGNAL>();
        match bincode::serde::decode_from_slice::<Signal, _>(body, config) {
            Ok((signal, used)) if used == body.len() => Ok(signal),
            Ok((_, used)) => Err(SignalError::Malformed(format!("{} trailing bytes", body.len() - used))),
            Err(e) => Err(SignalError::Malformed(e.to_string())),
        }
    }
}

/// Several signals in one piece of text (hex of length-prefixed encodings), for a channel that
/// carries text.
pub fn encode_batch(signals: &[Signal]) -> String {
    let mut bytes = Vec::new();
    for s in signals {
        let one = s.encode();
        bytes.extend_from_slice(&(one.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&one);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The signals [`encode_batch`] put in `text`.
pub fn decode_batch(text: &str) -> Result<Vec<Signal>, SignalError> {
    let malformed = || SignalError::Malformed("bad batch".into());
    if text.len() % 2 != 0 {
        return Err(malformed());
    }
    let bytes = (0..text.len())
        .step_by(2)
        .map(|i| text.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(malformed)?;
    let mut rest = &bytes[..];
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(malformed)?;
        let len = u32::from_le_bytes(*len) as usize;
        let one = tail.get(..len).ok_or_else(malformed)?;
        out.push(Signal::decode(one)?);
        rest = &tail[len..];
    }
    Ok(out)
}

/// Prefix of the names of the prepared transactions mmts makes (see [`gid`]); reserved.
pub const GID_PREFIX: &str = "mtm_";

/// The name under which every node prepares transaction `xid` of node `origin`:
/// `mtm_<origin>_<xid>`.
pub fn gid(origin: NodeId, xid: u32) -> String {
    format!("{}{xid}", gid_prefix(origin))
}

/// What the [`gid`]s of `origin`'s transactions start with: `mtm_<origin>_`.
pub fn gid_prefix(origin: NodeId) -> String {
    format!("{GID_PREFIX}{}_", origin.0)
}

/// The node and transaction a [`gid`] names; `None` for any other name.
pub fn parse_gid(gid: &str) -> Option<(NodeId, u32)> {
    let (origin, xid) = gid.strip_prefix(GID_PREFIX)?.split_once('_')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(origin) && digits(xid)).then_some(())?;
    Some((NodeId(origin.parse().ok()?), xid.parse().ok()?))
}

/// SQLSTATE for a transaction that lost to a concurrent one or could not get its votes.
pub const SERIALIZATION_FAILURE: &str = "40001";
/// SQLSTATE for a node that does not see a majority of the cluster.
pub const NO_MAJORITY: &str = "55000";

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: u32) -> NodeId {
        NodeId(i)
    }

    fn yes(p: Timestamp) -> Vote {
        Vote::Yes { proposal: p }
    }

    #[test]
    fn gids_name_their_origin_and_transaction() {
        assert_eq!(gid(NodeId(2), 731), "mtm_2_731");
        assert_eq!(parse_gid("mtm_2_731"), Some((NodeId(2), 731)));
        for other in ["mtm_2_", "mtm__7", "mtm_2_7x", "mtm_join_4_from_1", "mtm_commit_1", "x_2_7", "mtm_+2_7"] {
            assert_eq!(parse_gid(other), None, "{other}");
        }
        assert_eq!(parse_gid(&gid(NodeId(64), u32::MAX)), Some((NodeId(64), u32::MAX)));
        assert!(gid(NodeId(10), 5).starts_with(&gid_prefix(NodeId(10))));
        assert!(!gid(NodeId(10), 5).starts_with(&gid_prefix(NodeId(1))));
    }

    #[test]
    fn hlc_is_monotonic_and_follows_what_it_sees() {
        assert_eq!(hlc_next(0, 100), 100);
        assert_eq!(hlc_next(100, 100), 101, "same physical reading: still increases");
        assert_eq!(hlc_next(500, 100), 501, "physical clock behind: logical part carries on");
        assert_eq!(hlc_observe(10, 20), 20);
        assert_eq!(hlc_observe(30, 20), 30);
        // Causality: whatever a node saw, its next timestamp is above it.
        assert!(hlc_next(hlc_observe(5, 900), 100) > 900);
    }

    #[test]
    fn dependencies_are_every_other_stream_applied_far_enough() {
        let need = [(n(2), 90), (n(3), 500)];
        assert!(!dependencies_met(&need, |_| 100, |_| false));
        assert!(dependencies_met(&need, |_| 100, |x| x == n(3)));
        assert!(dependencies_met(&need, |x| if x == n(2) { 90 } else { 500 }, |_| false));
    }

    #[test]
    fn wait_die_orders_every_pair_one_way() {
        let a = Key { ts: 10, node: n(1) };
        let b = Key { ts: 10, node: n(2) };
        let c = Key { ts: 11, node: n(1) };
        assert_eq!(on_conflict(b, Some(a)), OnConflict::Die);
        assert_eq!(on_conflict(a, Some(b)), OnConflict::Wait);
        assert_eq!(on_conflict(c, None), OnConflict::Wait, "holder not being committed: wait");
        for (x, y) in [(a, b), (a, c), (b, c)] {
            assert_ne!(on_conflict(x, Some(y)), on_conflict(y, Some(x)), "exactly one of two waits");
        }
    }

    #[test]
    fn signals_round_trip_and_bad_bytes_are_errors() {
        let signals = [
            Signal::Coordinated { key: Key { ts: 5, node: n(1) }, members: 0b111, after: vec![(n(2), 77)] },
            Signal::Heartbeat {
                from: n(2),
                report: Report { sees: 3, partition: 3, members: 3, ready: true, wal_end: 9, behind: 0, applied: 0 },
                sent_at: 0,
                echo: 0,
            },
            Signal::LeaseReleased { from: n(2), sent_at: 5 },
            Signal::Vote { origin: n(1), xid: 7, voter: n(2), vote: yes(9) },
            Signal::Vote {
                origin: n(1),
                xid: 7,
                voter: n(3),
                vote: Vote::No { sqlstate: "40001".into(), message: "conflict".into() },
            },
            Signal::Finished { origin: n(1), xid: 7, voter: n(2), committed: true },
            Signal::Ddl {
                role: "alice".into(),
                search_path: "\"$user\", public".into(),
                statement: "CREATE TABLE t (id serial PRIMARY KEY, note text DEFAULT 'é')".into(),
            },
            Signal::Seen { applied: vec![(n(1), 12_345), (n(3), 0)] },
            Signal::Forwarded { origin: n(2), xid: 77, prepared_at: 1 << 40, members: 0b11, after: vec![(n(1), 9)] },
            Signal::Ended { stream: n(2), through: 1 << 33 },
        ];
        for s in signals {
            let bytes = s.encode();
            assert_eq!(Signal::decode(&bytes), Ok(s.clone()));
            for len in 0..bytes.len() {
                assert!(Signal::decode(&bytes[..len]).is_err());
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(Signal::decode(&longer).is_err());
        }
        assert_eq!(Signal::decode(&[9, 0]), Err(SignalError::Version(9)));
    }

    #[test]
    fn batches_round_trip_and_bad_text_is_an_error() {
        let signals = vec![
            Signal::Vote { origin: n(1), xid: 7, voter: n(2), vote: yes(9) },
            Signal::Finished { origin: n(1), xid: 7, voter: n(2), committed: true },
        ];
        let text = encode_batch(&signals);
        assert_eq!(decode_batch(&text), Ok(signals));
        assert_eq!(decode_batch(""), Ok(vec![]));
        for bad in ["0", "zz", &text[..text.len() - 2], "ffffffff00"] {
            assert!(decode_batch(bad).is_err(), "{bad}");
        }
    }
}
