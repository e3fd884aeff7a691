//! One node's records of transactions being settled ([`Acceptor`]s), in a table of fixed size
//! (mmts keeps it in shared memory): a record is made when a transaction first needs one and
//! replaced when its place is needed for another. What a node forgets by replacing a record
//! decides when it may still answer about a transaction it has no record of
//! ([`Records::memory`], `indoubt::forgotten`).
//!
//! Every change of a record is also appended to a log ([`Logged`]) that a restarted node reads
//! back ([`Records::replay`]), so that it still answers about the transactions it accepted or
//! carried out before. The log need not be synced before an answer leaves: each entry is a true
//! fact about this node (a ballot it accepted, an outcome it carried out), and whatever a lost
//! entry would have added is on disk elsewhere (a promise or acceptance given to a resolver,
//! synced first: `indoubt::durable`) or leaves the node with no record of the transaction, so
//! that it takes no part (`indoubt::forgotten`).

use serde::{Deserialize, Serialize};

use crate::indoubt::{Acceptor, Memory};
use crate::wire::Timestamp;
use crate::NodeId;

/// One transaction's record, in its slot of a [`Records`] table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Record {
    /// The transaction's coordinator (0: the slot is free) and its xid there.
    pub origin: u32,
    pub xid: u32,
    pub acceptor: Acceptor,
    /// Ended as the cluster settled it, not by its coordinator: the coordinator, when it
    /// returns, asks for the outcome. Replaced only after records its coordinator ended.
    pub settled: bool,
    /// Also kept on disk (by the caller).
    pub on_disk: bool,
    /// When it was made, by this node's clock; the oldest is replaced first.
    made_at: Timestamp,
    /// Of the slot, not of the record in it: the latest `made_at` of a record this slot gave
    /// up while it held anything (a promise, an acceptance, an outcome). See [`Records::memory`].
    gave_up_made_at: Timestamp,
}

impl Record {
    /// The log entry of this record as it stands.
    pub fn logged(&self) -> Logged {
        Logged {
            origin: self.origin,
            xid: self.xid,
            made_at: self.made_at,
            settled: self.settled,
            acceptor: self.acceptor,
        }
    }
}

/// How many slots, from a place its key decides, may hold a transaction's record: a few
/// lookups per transaction on every node stay cheap.
const WINDOW: usize = 32;

/// A table of `N` records.
#[derive(Debug, Clone, Copy)]
pub struct Records<const N: usize> {
    slots: [Record; N],
}

impl<const N: usize> Default for Records<N> {
    fn default() -> Self {
        Records { slots: [Record::default(); N] }
    }
}

impl<const N: usize> Records<N> {
    fn window(origin: NodeId, xid: u32) -> impl Iterator<Item = usize> {
        let start = (xid as usize).wrapping_mul(31).wrapping_add(origin.0 as usize * 0x9E37) % N;
        (0..WINDOW.min(N)).map(move |k| (start + k) % N)
    }

    fn find(&self, origin: NodeId, xid: u32) -> Option<usize> {
        Self::window(origin, xid).find(|&i| self.slots[i].origin == origin.0 && self.slots[i].xid == xid)
    }

    /// The record of transaction `xid` of node `origin`, if there is one.
    pub fn get(&self, origin: NodeId, xid: u32) -> Option<&Record> {
        self.find(origin, xid).map(|i| &self.slots[i])
    }

    /// The record of transaction `xid` of node `origin`, made at `now` if there is none: in a
    /// free slot of its window, or else in place of the oldest record there that its
    /// coordinator ended, or else of the oldest.
    pub fn make(&mut self, origin: NodeId, xid: u32, now: Timestamp) -> &mut Record {
        if let Some(i) = self.find(origin, xid) {
            return &mut self.slots[i];
        }
        let replaceable = |r: &Record| r.acceptor.decided.is_some() && !r.settled;
        let oldest = |only: &dyn Fn(&Record) -> bool| {
            Self::window(origin, xid).filter(|&i| only(&self.slots[i])).min_by_key(|&i| self.slots[i].made_at)
        };
        let i = Self::window(origin, xid)
            .find(|&i| self.slots[i].origin == 0)
            .or_else(|| oldest(&replaceable))
            .or_else(|| oldest(&|_| true))
            .expect("a window has slots");
        let old = self.slots[i];
        // Whatever the old record held, an outcome included, this node no longer knows.
        let held = old.origin != 0 && old.acceptor != Acceptor::default();
        let gave_up_made_at = if held { old.gave_up_made_at.max(old.made_at) } else { old.gave_up_made_at };
        self.slots[i] = Record { origin: origin.0, xid, made_at: now, gave_up_made_at, ..Record::default() };
        &mut self.slots[i]
    }

    /// Records read back after a start: the entries of the log, oldest first (a transaction's
    /// later entries add to its earlier ones; the newest transactions are kept when there are
    /// more than the table holds).
    pub fn replay(&mut self, entries: impl IntoIterator<Item = Logged>) {
        for e in entries.into_iter().filter(|e| e.origin != 0) {
            let r = self.make(NodeId(e.origin), e.xid, e.made_at);
            r.acceptor.merge(&e.acceptor);
            r.settled |= e.settled;
        }
    }

    /// What this node remembers of transaction `xid` of node `origin` besides its record, for
    /// `indoubt::forgotten`: whether it has one, whether it holds the transaction prepared
    /// since it started (`prepared_here`, asked only when there is no record), when it started
    /// (`started_at`: the table lives in memory), and the latest time at which a record was
    /// made that its window has given up since.
    ///
    /// A record given up may have been this transaction's, whatever it held, an outcome too: a
    /// node that carried out a commit and then forgot it would otherwise answer a resolver as
    /// one that never accepted anything, and a majority of such answers settles the
    /// transaction the other way. A record is made after its transaction began (up to the
    /// clocks' margin), so one that began after every record its window gave up was made
    /// cannot have been among them.
    pub fn memory(
        &self,
        origin: NodeId,
        xid: u32,
        prepared_here: impl FnOnce() -> bool,
        started_at: Timestamp,
    ) -> Memory {
        let has_record = self.find(origin, xid).is_some();
        Memory {
            has_record,
            prepared_here: !has_record && prepared_here(),
            started_at,
            evicted_at: Self::window(origin, xid).map(|i| self.slots[i].gave_up_made_at).filter(|&t| t != 0).max(),
        }
    }
}

/// One entry of the log of records: a record as it stood after a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logged {
    pub origin: u32,
    pub xid: u32,
    pub made_at: Timestamp,
    pub settled: bool,
    pub acceptor: Acceptor,
}

/// The start of a log file: what it is, and its generation (files are reused in turn, and
/// the entries of the older one come first).
const LOG_MAGIC: &[u8; 8] = b"mmtslog1";
const LOG_HEADER_LEN: usize = 16;

pub fn log_header(generation: u64) -> [u8; LOG_HEADER_LEN] {
    let mut h = [0; LOG_HEADER_LEN];
    h[..8].copy_from_slice(LOG_MAGIC);
    h[8..].copy_from_slice(&generation.to_le_bytes());
    h
}

/// One entry as appended: its length, a CRC-32 of it, then the entry.
pub fn encode_logged(entry: &Logged) -> Vec<u8> {
    let body = bincode::serde::encode_to_vec(entry, bincode::config::standard()).expect("an entry encodes");
    let mut out = Vec::with_capacity(body.len() + 6);
    out.extend_from_slice(&(body.len() as u16).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// A log file as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFile {
    pub generation: u64,
    /// Its entries, up to the first one that is cut short or damaged (a crash may leave the
    /// end of the file unwritten).
    pub entries: Vec<Logged>,
    /// How many bytes of the file those are: appending goes on from there, not after the
    /// damage, where a later read would not find it.
    pub valid_len: usize,
}

/// A log file read back; `None` if it is no log.
pub fn decode_log(bytes: &[u8]) -> Option<LogFile> {
    if bytes.len() < LOG_HEADER_LEN || &bytes[..8] != LOG_MAGIC {
        return None;
    }
    let generation = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let mut entries = Vec::new();
    let mut rest = &bytes[LOG_HEADER_LEN..];
    while rest.len() >= 6 {
        let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        let crc = u32::from_le_bytes([rest[2], rest[3], rest[4], rest[5]]);
        let Some(body) = rest.get(6..6 + len) else { break };
        if len == 0 || crc32fast::hash(body) != crc {
            break;
        }
        match bincode::serde::decode_from_slice::<Logged, _>(body, bincode::config::standard()) {
            Ok((entry, read)) if read == len => entries.push(entry),
            _ => break,
        }
        rest = &rest[6 + len..];
    }
    Some(LogFile { generation, entries, valid_len: bytes.len() - rest.len() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::indoubt::{forgotten, Ballot, Outcome};

    const MARGIN: Timestamp = 5;

    #[test]
    fn a_record_given_up_is_forgotten_even_when_it_held_an_outcome() {
        let mut records = Records::<4>::default();
        // Transaction 1 of node 1, begun at 100, committed here at 110.
        records.make(NodeId(1), 1, 110).acceptor.decide(Outcome::Commit { ts: 7 });
        for xid in 2..=4 {
            records.make(NodeId(1), xid, 110 + xid as Timestamp);
        }
        assert!(records.get(NodeId(1), 1).is_some());
        // A fifth record takes the place of the oldest one its coordinator ended: the first.
        records.make(NodeId(1), 5, 200);
        assert!(records.get(NodeId(1), 1).is_none());
        let memory = records.memory(NodeId(1), 1, || false, 0);
        assert_eq!(memory.evicted_at, Some(110));
        assert!(forgotten(memory, 100, MARGIN), "the commit it forgot must make it take no part");
        // A transaction begun after that record was made was not among those given up.
        assert!(!forgotten(records.memory(NodeId(1), 9, || false, 0), 200, MARGIN));
    }

    #[test]
    fn records_that_held_nothing_are_replaced_without_forgetting() {
        let mut records = Records::<2>::default();
        records.make(NodeId(2), 1, 10);
        records.make(NodeId(2), 2, 11);
        records.make(NodeId(2), 3, 12);
        assert_eq!(records.memory(NodeId(2), 1, || false, 0).evicted_at, None);
    }

    #[test]
    fn undecided_records_are_kept_over_ended_ones() {
        let mut records = Records::<2>::default();
        records.make(NodeId(3), 1, 10).acceptor.promise(Ballot { round: 1, node: 2 });
        records.make(NodeId(3), 2, 11).acceptor.decide(Outcome::Abort);
        records.make(NodeId(3), 3, 12);
        assert!(records.get(NodeId(3), 1).is_some());
        assert!(records.get(NodeId(3), 2).is_none());
    }

    #[test]
    fn a_restart_reads_back_what_the_log_kept_up_to_a_damaged_end() {
        let mut records = Records::<8>::default();
        records.make(NodeId(1), 1, 10).acceptor.accept(Ballot::coordinator(NodeId(1)), Outcome::Commit { ts: 5 });
        let first = records.get(NodeId(1), 1).unwrap().logged();
        records.make(NodeId(1), 1, 10).acceptor.decide(Outcome::Commit { ts: 5 });
        let second = records.get(NodeId(1), 1).unwrap().logged();
        let third = records.make(NodeId(2), 7, 20).logged();
        let mut file = log_header(3).to_vec();
        for e in [first, second, third] {
            file.extend(encode_logged(&e));
        }
        let read = decode_log(&file).unwrap();
        assert_eq!((read.generation, read.entries.len(), read.valid_len), (3, 3, file.len()));
        // A crash cut the last entry short, or left garbage in its place.
        let mut cut = file.clone();
        cut.truncate(file.len() - 2);
        let read_cut = decode_log(&cut).unwrap();
        assert_eq!(read_cut.entries, vec![first, second]);
        assert_eq!(read_cut.valid_len, file.len() - encode_logged(&third).len());
        let mut damaged = file.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 0xff;
        assert_eq!(decode_log(&damaged).unwrap().entries, vec![first, second]);
        assert!(decode_log(b"not a log at all").is_none());
        let mut restarted = Records::<8>::default();
        restarted.replay(read.entries);
        let r = restarted.get(NodeId(1), 1).unwrap();
        assert_eq!(r.acceptor.decided, Some(Outcome::Commit { ts: 5 }));
        assert_eq!(r.acceptor.accepted, Some((Ballot::coordinator(NodeId(1)), Outcome::Commit { ts: 5 })));
        assert_eq!(r.made_at, 10);
    }
}
