//! PostgreSQL's streaming replication messages inside the CopyBoth stream of
//! `START_REPLICATION` (server: `w` XLogData, `k` keepalive; client: `r` status update).
//! All integers are big-endian; times are microseconds since 2000-01-01 UTC.

use crate::wire::{Lsn, Timestamp};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage<'a> {
    /// `w`: WAL data; for logical replication, one output plugin write.
    XLogData { start: Lsn, end: Lsn, send_time: Timestamp, data: &'a [u8] },
    /// `k`: the server's WAL end; `reply_requested` asks for a status update now.
    Keepalive { end: Lsn, send_time: Timestamp, reply_requested: bool },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicationError {
    #[error("empty replication message")]
    Empty,
    #[error("replication message '{kind}' is {len} bytes, too short")]
    Short { kind: char, len: usize },
    #[error("unknown replication message type {0:#04x}")]
    Unknown(u8),
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

impl<'a> ServerMessage<'a> {
    pub fn parse(buf: &'a [u8]) -> Result<ServerMessage<'a>, ReplicationError> {
        let (&kind, rest) = buf.split_first().ok_or(ReplicationError::Empty)?;
        match kind {
            b'w' if rest.len() >= 24 => Ok(ServerMessage::XLogData {
                start: be_u64(rest),
                end: be_u64(&rest[8..]),
                send_time: be_u64(&rest[16..]) as i64,
                data: &rest[24..],
            }),
            b'k' if rest.len() >= 17 => Ok(ServerMessage::Keepalive {
                end: be_u64(rest),
                send_time: be_u64(&rest[8..]) as i64,
                reply_requested: rest[16] != 0,
            }),
            b'w' | b'k' => Err(ReplicationError::Short { kind: kind as char, len: buf.len() }),
            other => Err(ReplicationError::Unknown(other)),
        }
    }
}

/// The client's `r` standby status update: what it has received, flushed and applied.
/// The logical slot on a node that node `reader`'s receiver streams from: `mtm_slot_<reader>`.
pub fn slot_name(reader: u32) -> String {
    format!("mtm_slot_{reader}")
}

/// The replication origin under which a node applies node `origin`'s changes:
/// `mtm_node_<origin>`.
pub fn origin_name(origin: u32) -> String {
    format!("mtm_node_{origin}")
}

pub fn status_update(write: Lsn, flush: Lsn, apply: Lsn, now: Timestamp, reply_requested: bool) -> [u8; 34] {
    let mut out = [0u8; 34];
    out[0] = b'r';
    out[1..9].copy_from_slice(&write.to_be_bytes());
    out[9..17].copy_from_slice(&flush.to_be_bytes());
    out[17..25].copy_from_slice(&apply.to_be_bytes());
    out[25..33].copy_from_slice(&now.to_be_bytes());
    out[33] = reply_requested as u8;
    out
}

/// An LSN in PostgreSQL's text form (`16/B374D848`).
pub fn format_lsn(lsn: Lsn) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Reads an LSN as PostgreSQL prints it (`16/B374D848`).
pub fn parse_lsn(text: &str) -> Option<Lsn> {
    let (hi, lo) = text.trim().split_once('/')?;
    let (hi, lo) = (u32::from_str_radix(hi, 16).ok()?, u32::from_str_radix(lo, 16).ok()?);
    Some(((hi as u64) << 32) | lo as u64)
}

/// Where a receiver stands in its peer's WAL. Local commits of applied transactions are
/// asynchronous, so a position is reported as flushed only once the local commit that applied
/// it is on disk here; positions with nothing for this node (other origins, keepalives)
/// count as flushed once everything before them is.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    received: Lsn,
    applied: Lsn,
    flushed: Lsn,
    /// (peer position, local commit end) of applied transactions not yet known to be flushed.
    pending: std::collections::VecDeque<(Lsn, Lsn)>,
    /// Reported as flushed at most this far (see `forward::Notices::hold`).
    hold: Option<Lsn>,
}

impl Progress {
    pub fn new(start: Lsn) -> Progress {
        Progress { received: start, applied: start, flushed: start, pending: Default::default(), hold: None }
    }

    /// A stream (re)started at `start`, or earlier where the peer's slot confirmed it
    /// (`confirmed`): positions from there on are reported as they are received again, and
    /// only once this node's WAL is flushed up to `local_end` (the commits made before the
    /// stream restarted may not be yet).
    pub fn resumed(confirmed: Lsn, start: Lsn, local_end: Lsn) -> Progress {
        let from = confirmed.min(start);
        let mut p = Progress::new(from);
        p.pending.push_back((from, local_end));
        p
    }

    /// Something up to `end` of the peer's WAL arrived.
    pub fn received(&mut self, end: Lsn) {
        self.received = self.received.max(end);
    }

    /// No transaction is half-applied: everything received is applied.
    pub fn caught_up(&mut self) {
        self.applied = self.received;
    }

    /// A transaction ending at the current received position was committed here, its commit
    /// record ending at `local_end`.
    pub fn committed(&mut self, local_end: Lsn) {
        self.pending.push_back((self.received, local_end));
    }

    /// Given that this node's WAL is flushed up to `local_flushed`, the peer position that is
    /// durable here, as far as it may be reported (see [`Progress::hold`]).
    pub fn flushed(&mut self, local_flushed: Lsn) -> Lsn {
        while let Some(&(peer, local)) = self.pending.front() {
            if local > local_flushed {
                return self.flushed_so_far();
            }
            self.flushed = self.flushed.max(peer);
            self.pending.pop_front();
        }
        self.flushed = self.flushed.max(self.applied);
        self.flushed_so_far()
    }

    /// What [`Progress::flushed`] last reported.
    pub fn flushed_so_far(&self) -> Lsn {
        self.hold.map_or(self.flushed, |hold| self.flushed.min(hold))
    }

    /// Reports positions as flushed no further than `hold` (`None`: no limit), so that the
    /// peer's slot keeps what comes after it.
    pub fn hold(&mut self, hold: Option<Lsn>) {
        self.hold = hold;
    }

    pub fn received_lsn(&self) -> Lsn {
        self.received
    }

    pub fn applied_lsn(&self) -> Lsn {
        self.applied
    }
}

/// Where a receiver (re)starting its stream stands in the peer's WAL: as far as its replication
/// origin says (`origin`), or as far as the peer's slot says it confirmed (`confirmed`) if
/// that is further. The peer's walsender resumes there whatever the receiver asks (logical
/// decoding never sends again what a slot confirmed), and everything confirmed took effect
/// here (see [`Progress::flushed`]) although not all of it moved the origin on disk: a
/// position confirmed with nothing committed here for it (a transaction already ended, a
/// rollback of one never prepared here, other origins' records) moved the origin in memory
/// only, and a crash loses that. Counting such positions as not applied would let a
/// transaction that depends on them wait for what never comes again.
pub fn resume_point(origin: Lsn, confirmed: Option<Lsn>) -> Lsn {
    origin.max(confirmed.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_resumes_where_the_slot_confirmed() {
        assert_eq!(resume_point(100, None), 100);
        assert_eq!(resume_point(100, Some(50)), 100);
        assert_eq!(resume_point(100, Some(150)), 150);
    }

    #[test]
    fn flushed_waits_for_local_flush() {
        let mut p = Progress::new(100);
        p.received(150);
        assert_eq!(p.flushed(0), 100, "mid-transaction: nothing new is flushed");
        p.committed(1000);
        p.caught_up();
        assert_eq!(p.applied_lsn(), 150);
        assert_eq!(p.flushed(999), 100, "local commit not flushed yet");
        p.received(200); // a keepalive: nothing for us up to 200
        p.caught_up();
        assert_eq!(p.flushed(999), 100, "later positions wait for the earlier commit");
        assert_eq!(p.flushed(1000), 200);
        p.received(300);
        p.committed(1100);
        p.caught_up();
        assert_eq!(p.flushed(1050), 200);
        assert_eq!(p.flushed(1100), 300);
        assert_eq!(p.received_lsn(), 300);
        p.hold(Some(250));
        p.received(400);
        p.caught_up();
        assert_eq!(p.flushed(2000), 250, "held back");
        p.hold(None);
        assert_eq!(p.flushed_so_far(), 400);
    }

    #[test]
    fn a_resumed_stream_waits_for_the_local_commits_before_it() {
        let mut p = Progress::resumed(100, 150, 1000);
        assert_eq!((p.received_lsn(), p.applied_lsn()), (100, 100));
        p.received(160);
        p.caught_up();
        assert_eq!(p.flushed(999), 100, "the commits before the restart are not flushed here yet");
        assert_eq!(p.flushed(1000), 160);
        let mut p = Progress::resumed(200, 150, 1000);
        assert_eq!(p.flushed(2000), 150, "never more than the start");
    }

    #[test]
    fn xlogdata_and_keepalive() {
        let mut w = vec![b'w'];
        w.extend_from_slice(&1u64.to_be_bytes());
        w.extend_from_slice(&2u64.to_be_bytes());
        w.extend_from_slice(&3u64.to_be_bytes());
        w.extend_from_slice(b"frame");
        assert_eq!(
            ServerMessage::parse(&w),
            Ok(ServerMessage::XLogData { start: 1, end: 2, send_time: 3, data: b"frame" })
        );
        let mut k = vec![b'k'];
        k.extend_from_slice(&0x10u64.to_be_bytes());
        k.extend_from_slice(&7u64.to_be_bytes());
        k.push(1);
        assert_eq!(
            ServerMessage::parse(&k),
            Ok(ServerMessage::Keepalive { end: 16, send_time: 7, reply_requested: true })
        );
        assert_eq!(ServerMessage::parse(&k[..10]), Err(ReplicationError::Short { kind: 'k', len: 10 }));
        assert_eq!(ServerMessage::parse(b"x"), Err(ReplicationError::Unknown(b'x')));
        assert_eq!(ServerMessage::parse(b""), Err(ReplicationError::Empty));
    }

    #[test]
    fn status_update_layout() {
        let r = status_update(0x0102, 0x0304, 0x0506, 9, false);
        assert_eq!(r[0], b'r');
        assert_eq!(be_u64(&r[1..]), 0x0102);
        assert_eq!(be_u64(&r[9..]), 0x0304);
        assert_eq!(be_u64(&r[17..]), 0x0506);
        assert_eq!(be_u64(&r[25..]), 9);
        assert_eq!(r[33], 0);
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn(&format_lsn(u64::MAX)), Some(u64::MAX));
        for bad in ["", "16", "16/", "/1", "G/1", "1/100000000", "1/2/3"] {
            assert_eq!(parse_lsn(bad), None, "{bad}");
        }
    }
}
