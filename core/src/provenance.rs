//! Who may say what: the rules that keep anyone but the cluster's own nodes from steering it.
//!
//! Signals travel in two ways, and each has its own proof of origin:
//! - **In a node's WAL**, as logical decoding messages with prefix
//!   [`SIGNAL_PREFIX`](crate::twopc::SIGNAL_PREFIX). Any role may write such a message
//!   (`pg_logical_emit_message` is executable by PUBLIC), so mmts *seals* the ones it writes:
//!   it appends a tag, an HMAC-SHA256 (truncated to [`TAG_LEN`] bytes) of the message and of
//!   whether it is transactional, under a key only the server can read ([`SignalKey`]; the
//!   shell keeps it in a file of the data directory). The walsender that decodes the WAL — on
//!   the same node, with the same key — passes on only messages whose tag is right, without
//!   the tag; everything else with the prefix is dropped there. The key never leaves the node.
//! - **Over a direct connection** from a peer (votes, acknowledgements, resolvers' requests):
//!   only superusers may use that channel (the shell's `mtm.deliver_signals`).
//!
//! Whichever way a signal came, it is then *bound* to the node it came from ([`admit`]): a
//! signal about node N's vote, answer, heartbeat, coordination or precommit is taken only from
//! node N; every node that speaks or whose transaction it is about (sender, voter, origin,
//! ballot) must be a node of the cluster as this node knows it; node ids in lists must be
//! node ids at all (1 to 64; masks can hold no other). Lists and masks are not checked against
//! the cluster itself: a node learns that a node was added a moment after its peers do, and
//! their heartbeats and coordinations name the new node meanwhile. Anything else is dropped.
//!
//! Not covered by the tag: replaying a sealed message. Its bytes are in the WAL and the
//! decoded stream, which only roles trusted anyway can read (superusers, roles with
//! REPLICATION, `pg_read_server_files`).

use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

use crate::indoubt::Answer;
use crate::membership::{bit, Mask};
use crate::twopc::Signal;
use crate::NodeId;

/// Bytes of tag a sealed signal carries (128 bits of HMAC-SHA256).
pub const TAG_LEN: usize = 16;

/// Bytes of a signal key.
pub const KEY_LEN: usize = 32;

/// Node ids a signal may name: 1 to this.
const MAX_NODE_ID: u32 = 64;

/// The secret that proves a logical message in this node's WAL was written by mmts.
#[derive(Clone)]
pub struct SignalKey([u8; KEY_LEN]);

impl std::fmt::Debug for SignalKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignalKey(..)")
    }
}

impl SignalKey {
    pub fn new(bytes: [u8; KEY_LEN]) -> SignalKey {
        SignalKey(bytes)
    }

    fn mac(&self, transactional: bool, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(b"mmts signal\0");
        mac.update(&[transactional as u8]);
        mac.update(body);
        mac
    }

    /// `body` followed by its tag.
    pub fn seal(&self, transactional: bool, body: &[u8]) -> Vec<u8> {
        let tag = self.mac(transactional, body).finalize().into_bytes();
        let mut out = Vec::with_capacity(body.len() + TAG_LEN);
        out.extend_from_slice(body);
        out.extend_from_slice(&tag[..TAG_LEN]);
        out
    }

    /// The body of `sealed` if its tag is right (compared in constant time), else `None`.
    pub fn open<'a>(&self, transactional: bool, sealed: &'a [u8]) -> Option<&'a [u8]> {
        let split = sealed.len().checked_sub(TAG_LEN)?;
        let (body, tag) = sealed.split_at(split);
        self.mac(transactional, body).verify_truncated_left(tag).ok()?;
        Some(body)
    }
}

/// Why a signal was not taken from the node it came from.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Rejected {
    #[error("it names node {0}, which is not a node of this cluster")]
    UnknownNode(u32),
    #[error("it speaks for node {claimed} but came from node {sender}")]
    WrongSender { claimed: u32, sender: u32 },
    #[error("its ballot round 0 is the coordinator's own")]
    CoordinatorBallot,
    #[error("it lists {0} nodes")]
    TooLong(usize),
}

fn known_id(node: u32, known: Mask) -> Result<(), Rejected> {
    if (1..=MAX_NODE_ID).contains(&node) && known & bit(NodeId(node)) != 0 {
        Ok(())
    } else {
        Err(Rejected::UnknownNode(node))
    }
}

fn speaks_for(claimed: NodeId, sender: NodeId) -> Result<(), Rejected> {
    if claimed == sender {
        Ok(())
    } else {
        Err(Rejected::WrongSender { claimed: claimed.0, sender: sender.0 })
    }
}

/// A list of node ids: at most one per node, each a node id at all.
fn node_list<'a>(nodes: impl ExactSizeIterator<Item = &'a NodeId>) -> Result<(), Rejected> {
    if nodes.len() > MAX_NODE_ID as usize {
        return Err(Rejected::TooLong(nodes.len()));
    }
    nodes.into_iter().try_for_each(|n| known_id(n.0, Mask::MAX))
}

/// Whether this node takes `signal` from node `sender`, given the nodes of the cluster
/// (`known`: configured and added ones).
pub fn admit(signal: &Signal, sender: NodeId, known: Mask) -> Result<(), Rejected> {
    known_id(sender.0, known)?;
    match signal {
        Signal::Coordinated { key, after, .. } => {
            speaks_for(key.node, sender)?;
            node_list(after.iter().map(|(n, _)| n))
        }
        Signal::Heartbeat { from, .. } | Signal::LeaseReleased { from, .. } => speaks_for(*from, sender),
        Signal::Precommit { origin, .. } => speaks_for(*origin, sender),
        Signal::Promise { origin, ballot, .. } | Signal::Accept { origin, ballot, .. } => {
            known_id(origin.0, known)?;
            speaks_for(NodeId(ballot.node), sender)?;
            if ballot.round == 0 {
                return Err(Rejected::CoordinatorBallot);
            }
            Ok(())
        }
        Signal::Answered { origin, voter, answer, .. } => {
            known_id(origin.0, known)?;
            speaks_for(*voter, sender)?;
            match answer {
                Answer::Promised(Some((b, _))) | Answer::Refused(b) => known_id(b.node, known),
                _ => Ok(()),
            }
        }
        Signal::Vote { origin, voter, .. } | Signal::Finished { origin, voter, .. } => {
            known_id(origin.0, known)?;
            speaks_for(*voter, sender)
        }
        Signal::Resolved { origin, .. } => known_id(origin.0, known),
        Signal::Ddl { .. } => Ok(()),
        Signal::Seen { applied } => node_list(applied.iter().map(|(n, _)| n)),
        Signal::Forwarded { origin, after, .. } => {
            known_id(origin.0, known)?;
            node_list(after.iter().map(|(n, _)| n))
        }
        Signal::Ended { stream, .. } => known_id(stream.0, known),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::indoubt::{Ballot, Outcome};
    use crate::membership::Report;
    use crate::twopc::{Key, Vote};

    const KNOWN: Mask = 0b111;

    #[test]
    fn sealed_signals_open_and_nothing_else_does() {
        let key = SignalKey::new([7; KEY_LEN]);
        let sealed = key.seal(true, b"hello");
        assert_eq!(key.open(true, &sealed), Some(&b"hello"[..]));
        assert_eq!(key.open(false, &sealed), None, "transactional flag is covered");
        assert_eq!(SignalKey::new([8; KEY_LEN]).open(true, &sealed), None, "another key");
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert_eq!(key.open(true, &bad), None, "byte {i} flipped");
        }
        assert_eq!(key.open(true, &sealed[..sealed.len() - 1]), None);
        assert_eq!(key.open(true, b"short"), None);
        assert_eq!(key.open(true, b""), None);
        let empty = key.seal(false, b"");
        assert_eq!(key.open(false, &empty), Some(&b""[..]));
    }

    fn vote(origin: u32, voter: u32) -> Signal {
        Signal::Vote { origin: NodeId(origin), xid: 5, voter: NodeId(voter), vote: Vote::Yes { proposal: 1 } }
    }

    #[test]
    fn a_node_speaks_only_for_itself() {
        let n = NodeId;
        assert_eq!(admit(&vote(1, 2), n(2), KNOWN), Ok(()));
        assert_eq!(admit(&vote(1, 3), n(2), KNOWN), Err(Rejected::WrongSender { claimed: 3, sender: 2 }));
        let hb = Signal::Heartbeat { from: n(3), report: Report::default(), sent_at: 0, echo: 0 };
        assert!(admit(&hb, n(3), KNOWN).is_ok());
        assert!(admit(&hb, n(2), KNOWN).is_err());
        let coordinated =
            Signal::Coordinated { key: Key { ts: 1, node: n(1) }, members: 0b111, after: vec![(n(2), 9)] };
        assert!(admit(&coordinated, n(1), KNOWN).is_ok());
        assert!(admit(&coordinated, n(2), KNOWN).is_err());
        let precommit = Signal::Precommit { origin: n(2), xid: 1, ts: 3, since: 2 };
        assert!(admit(&precommit, n(2), KNOWN).is_ok());
        assert!(admit(&precommit, n(1), KNOWN).is_err());
        let promise = |round, node| Signal::Promise { origin: n(1), xid: 1, since: 0, ballot: Ballot { round, node } };
        assert!(admit(&promise(1, 3), n(3), KNOWN).is_ok());
        assert!(admit(&promise(1, 2), n(3), KNOWN).is_err());
        assert_eq!(admit(&promise(0, 3), n(3), KNOWN), Err(Rejected::CoordinatorBallot));
        let resolved = Signal::Resolved { origin: n(1), xid: 1, outcome: Outcome::Abort };
        assert!(admit(&resolved, n(3), KNOWN).is_ok(), "any node may settle a transaction");
        let finished = Signal::Finished { origin: n(1), xid: 1, voter: n(3), committed: true };
        assert!(admit(&finished, n(2), KNOWN).is_err());
    }

    #[test]
    fn node_ids_are_range_checked() {
        let n = NodeId;
        assert_eq!(admit(&vote(0, 2), n(2), KNOWN), Err(Rejected::UnknownNode(0)));
        assert_eq!(admit(&vote(65, 2), n(2), KNOWN), Err(Rejected::UnknownNode(65)));
        assert_eq!(admit(&vote(4, 2), n(2), KNOWN), Err(Rejected::UnknownNode(4)));
        assert_eq!(admit(&vote(1, 0), n(0), KNOWN), Err(Rejected::UnknownNode(0)));
        assert_eq!(admit(&vote(1, 64), n(64), KNOWN), Err(Rejected::UnknownNode(64)));
        assert!(admit(&vote(1, 64), n(64), KNOWN | 1 << 63).is_ok());
        // A node added a moment ago may be named by peers that know of it already.
        let hb = Signal::Heartbeat {
            from: n(2),
            report: Report { members: 0b1011, ..Report::default() },
            sent_at: 0,
            echo: 0,
        };
        assert_eq!(admit(&hb, n(2), KNOWN), Ok(()));
        let seen = Signal::Seen { applied: vec![(n(1), 0), (n(9), 0)] };
        assert_eq!(admit(&seen, n(2), KNOWN), Ok(()));
        let seen = Signal::Seen { applied: (0..100).map(|_| (n(1), 0)).collect() };
        assert_eq!(admit(&seen, n(2), KNOWN), Err(Rejected::TooLong(100)));
        let seen = Signal::Seen { applied: vec![(n(1), 0), (n(65), 0)] };
        assert_eq!(admit(&seen, n(2), KNOWN), Err(Rejected::UnknownNode(65)));
        let coordinated =
            Signal::Coordinated { key: Key { ts: 1, node: n(1) }, members: 0b1111, after: vec![(n(0), 1)] };
        assert_eq!(admit(&coordinated, n(1), KNOWN), Err(Rejected::UnknownNode(0)));
        // A node forwards other nodes' transactions and says how far it ended their streams.
        let forwarded =
            |origin| Signal::Forwarded { origin: n(origin), xid: 1, prepared_at: 1, members: 0b11, after: vec![] };
        assert_eq!(admit(&forwarded(2), n(1), KNOWN), Ok(()));
        assert_eq!(admit(&forwarded(4), n(1), KNOWN), Err(Rejected::UnknownNode(4)));
        assert_eq!(admit(&Signal::Ended { stream: n(2), through: 5 }, n(1), KNOWN), Ok(()));
        assert_eq!(admit(&Signal::Ended { stream: n(9), through: 5 }, n(1), KNOWN), Err(Rejected::UnknownNode(9)));
    }

    fn every_kind() -> Vec<Signal> {
        let n = NodeId;
        let b = |round, node| Ballot { round, node };
        vec![
            Signal::Coordinated { key: Key { ts: 5, node: n(1) }, members: 0b111, after: vec![(n(2), 77), (n(3), 1)] },
            Signal::Heartbeat {
                from: n(2),
                report: Report { sees: 3, partition: 3, members: 3, ready: true, wal_end: 9, behind: 0, applied: 0 },
                sent_at: 0,
                echo: 0,
            },
            Signal::LeaseReleased { from: n(2), sent_at: 5 },
            Signal::Precommit { origin: n(1), xid: 7, ts: 11, since: 10 },
            Signal::Promise { origin: n(1), xid: 7, since: 3, ballot: b(2, 3) },
            Signal::Accept { origin: n(1), xid: 7, since: 3, ballot: b(2, 3), outcome: Outcome::Commit { ts: 4 } },
            Signal::Answered {
                origin: n(1),
                xid: 7,
                voter: n(2),
                answer: Answer::Promised(Some((b(1, 3), Outcome::Abort))),
            },
            Signal::Answered { origin: n(1), xid: 7, voter: n(2), answer: Answer::Refused(b(4, 2)) },
            Signal::Resolved { origin: n(1), xid: 7, outcome: Outcome::Abort },
            vote(1, 2),
            Signal::Vote {
                origin: n(1),
                xid: 7,
                voter: n(3),
                vote: Vote::No { sqlstate: "40001".into(), message: "x".into() },
            },
            Signal::Finished { origin: n(1), xid: 7, voter: n(2), committed: true },
            Signal::Ddl { role: "alice".into(), search_path: "public".into(), statement: "CREATE TABLE t ()".into() },
            Signal::Seen { applied: vec![(n(1), 12_345), (n(3), 0)] },
            Signal::Forwarded { origin: n(2), xid: 7, prepared_at: 99, members: 0b11, after: vec![(n(1), 5)] },
            Signal::Ended { stream: n(2), through: 99 },
        ]
    }

    /// Deterministic fuzzing of what a hostile peer or a forged message could carry: random
    /// mutations of every kind of signal and random bytes never panic the decoder or the
    /// admission check, whatever decodes re-encodes to the same bytes, and a tag survives no
    /// mutation.
    #[test]
    fn fuzz_signals() {
        let key = SignalKey::new([3; KEY_LEN]);
        let seeds: Vec<Vec<u8>> = every_kind().iter().map(Signal::encode).collect();
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (mut decoded, mut admitted) = (0, 0);
        for _ in 0..100_000 {
            let r = next();
            let original = if r % 8 == 0 {
                (0..(r >> 8) % 64).map(|_| next() as u8).collect()
            } else {
                seeds[(r >> 3) as usize % seeds.len()].clone()
            };
            let mut bytes = original.clone();
            for _ in 0..1 + next() % 4 {
                if bytes.is_empty() {
                    break;
                }
                let at = next() as usize % bytes.len();
                match next() % 4 {
                    0 => bytes[at] = next() as u8,
                    1 => bytes[at] ^= 1 << (next() % 8),
                    2 => bytes.truncate(at),
                    _ => bytes.insert(at, next() as u8),
                }
            }
            if bytes != original {
                let tag = &key.seal(false, &original)[original.len()..];
                assert_eq!(key.open(false, &[&bytes[..], tag].concat()), None, "a tag fits one body");
            }
            if let Ok(signal) = Signal::decode(&bytes) {
                decoded += 1;
                assert_eq!(Signal::decode(&signal.encode()), Ok(signal.clone()));
                let sender = NodeId((next() % 70) as u32);
                if admit(&signal, sender, next()).is_ok() {
                    admitted += 1;
                }
            }
        }
        assert!(
            decoded > 1_000 && admitted > 0,
            "the fuzzer reaches the checks: {decoded} decoded, {admitted} admitted"
        );
    }

    /// A length prefix that claims a huge list is an error, not an allocation.
    #[test]
    fn huge_lists_are_errors() {
        let seen = Signal::Seen { applied: vec![(NodeId(1), 1)] }.encode();
        // version, variant, then the list's length (varint): claim 2^60 entries.
        let mut bytes = seen[..2].to_vec();
        bytes.push(253);
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        bytes.extend_from_slice(&seen[3..]);
        assert!(Signal::decode(&bytes).is_err());
        let ddl = Signal::Ddl { role: "r".repeat(2 << 20), search_path: String::new(), statement: String::new() };
        assert!(Signal::decode(&ddl.encode()).is_err(), "over the size limit");
    }
}
