//! The multimaster wire protocol: what the `mmts` output plugin sends to mmts receivers.
//!
//! A frame is one byte of protocol version followed, in version 1, by one bincode-encoded
//! [`Message`]; in version 2, by a message count and that many messages (a walsender sends one
//! frame per transaction instead of one per change). Decoding never panics: malformed,
//! truncated or oversized input and trailing bytes are errors.
//! Receivers announce the versions they speak in [`Message::Hello`]; [`negotiate`] picks the
//! highest version both sides speak.

use serde::{Deserialize, Serialize};

use crate::NodeId;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u8 = 2;
/// The oldest version this build still understands.
pub const MIN_PROTOCOL_VERSION: u8 = 1;
/// Largest frame accepted; a decoder allocates no more than this for one message.
pub const MAX_FRAME: usize = 1 << 30;

/// A log sequence number.
pub type Lsn = u64;
/// Microseconds since 2000-01-01 00:00:00 UTC, as PostgreSQL's `TimestampTz`.
pub type Timestamp = i64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message of a stream, both ways: who is speaking and which versions it speaks.
    Hello {
        node_id: NodeId,
        min_version: u8,
        max_version: u8,
    },
    Begin {
        origin: NodeId,
        xid: u32,
        final_lsn: Lsn,
        commit_time: Timestamp,
    },
    Commit {
        origin: NodeId,
        xid: u32,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: Timestamp,
    },
    BeginPrepare {
        origin: NodeId,
        xid: u32,
        gid: String,
        prepare_lsn: Lsn,
        end_lsn: Lsn,
        prepare_time: Timestamp,
    },
    Prepare {
        origin: NodeId,
        xid: u32,
        gid: String,
        prepare_lsn: Lsn,
        end_lsn: Lsn,
        prepare_time: Timestamp,
    },
    CommitPrepared {
        origin: NodeId,
        xid: u32,
        gid: String,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: Timestamp,
    },
    RollbackPrepared {
        origin: NodeId,
        xid: u32,
        gid: String,
        end_lsn: Lsn,
        prepare_time: Timestamp,
        rollback_time: Timestamp,
    },
    /// Describes a table before the first change to it in a stream (and again after it changes).
    Relation(Relation),
    Insert {
        relation: u32,
        new: Vec<Value>,
    },
    /// `old` carries the replica identity (key columns, or the whole row for FULL) when known.
    Update {
        relation: u32,
        old: Option<Vec<Value>>,
        new: Vec<Value>,
    },
    Delete {
        relation: u32,
        old: Vec<Value>,
    },
    Truncate {
        relations: Vec<u32>,
        cascade: bool,
        restart_identity: bool,
    },
    /// A logical decoding message (`pg_logical_emit_message`), used for DDL among others.
    LogicalMessage {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Vec<u8>,
    },
    Keepalive {
        wal_end: Lsn,
        send_time: Timestamp,
        reply_requested: bool,
    },
    /// A large transaction sent while it runs (the receiver asks for it with the option
    /// `mmts_streaming`): the messages from here to `StreamStop` belong to transaction `xid`,
    /// which the receiver keeps until its `StreamPrepare` or `StreamCommit` (or drops at its
    /// `StreamAbort`). Other transactions may come between two such blocks.
    StreamStart {
        xid: u32,
    },
    StreamStop,
    /// The messages that follow in the block belong to subtransaction `subxid` of the
    /// streamed transaction (or to the transaction itself when `subxid` is its `xid`).
    StreamSubtransaction {
        subxid: u32,
    },
    /// Subtransaction `subxid` of streamed transaction `xid` rolled back: what it sent is
    /// dropped (the whole transaction when `subxid` is `xid`).
    StreamAbort {
        xid: u32,
        subxid: u32,
    },
    /// The streamed transaction was prepared: what `BeginPrepare`, the messages sent in its
    /// blocks and `Prepare` would have said.
    StreamPrepare {
        origin: NodeId,
        xid: u32,
        gid: String,
        prepare_lsn: Lsn,
        end_lsn: Lsn,
        prepare_time: Timestamp,
    },
    /// The streamed transaction committed (without a PREPARE).
    StreamCommit {
        origin: NodeId,
        xid: u32,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time: Timestamp,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relation {
    /// The publisher's OID of the table; changes refer to it.
    pub id: u32,
    pub schema: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index, as `pg_class.relreplident`.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    /// The type's name, schema-qualified (OIDs differ between nodes for user types).
    pub type_name: String,
    pub type_modifier: i32,
    /// Part of the replica identity.
    pub key: bool,
}

/// One column value of a row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Value {
    Null,
    /// A TOASTed value that did not change; the receiver keeps the one it has.
    Unchanged,
    /// The type's text output.
    Text(String),
    /// The type's binary send output.
    Binary(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("empty frame")]
    Empty,
    #[error("unsupported protocol version {0} (this node speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION})")]
    Version(u8),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("a frame of {0} messages where one was expected")]
    NotOne(usize),
    #[error(
        "no common protocol version: peer speaks {0} to {1}, this node {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
    )]
    NoCommonVersion(u8, u8),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// Encodes `message` as a frame of its own.
pub fn encode(message: &Message) -> Vec<u8> {
    let mut frame = Frame::new(PROTOCOL_VERSION);
    frame.push(message);
    frame.take()
}

/// A frame being built, in the version negotiated with the client.
#[derive(Debug)]
pub struct Frame {
    version: u8,
    messages: u32,
    body: Vec<u8>,
}

impl Frame {
    pub fn new(version: u8) -> Frame {
        Frame { version, messages: 0, body: Vec::new() }
    }

    /// Adds a message. A version 1 frame holds one: take it before the next.
    pub fn push(&mut self, message: &Message) {
        debug_assert!(self.version >= 2 || self.messages == 0, "version 1 frames hold one message");
        bincode::serde::encode_into_std_write(message, &mut self.body, config()).expect("writing to a Vec cannot fail");
        self.messages += 1;
    }

    pub fn version(&self) -> u8 {
        self.version
    }

    /// How many bytes of messages it holds.
    pub fn len(&self) -> usize {
        self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }

    /// The frame's bytes; the builder is empty again.
    pub fn take(&mut self) -> Vec<u8> {
        let mut frame = vec![self.version];
        if self.version >= 2 {
            bincode::serde::encode_into_std_write(self.messages, &mut frame, config()).expect("writing to a Vec");
        }
        frame.append(&mut self.body);
        self.messages = 0;
        frame
    }
}

/// Decodes a frame of one message.
pub fn decode(frame: &[u8]) -> Result<Message, WireError> {
    let mut messages = decode_frame(frame)?;
    match messages.len() {
        1 => Ok(messages.pop().expect("one")),
        n => Err(WireError::NotOne(n)),
    }
}

/// Decodes a frame: its messages, in order.
pub fn decode_frame(frame: &[u8]) -> Result<Vec<Message>, WireError> {
    let (&version, mut body) = frame.split_first().ok_or(WireError::Empty)?;
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
        return Err(WireError::Version(version));
    }
    let malformed = |e: bincode::error::DecodeError| WireError::Malformed(e.to_string());
    let count = if version >= 2 {
        let (count, used) = bincode::serde::decode_from_slice::<u32, _>(body, config()).map_err(malformed)?;
        body = &body[used..];
        count
    } else {
        1
    };
    // Every message takes at least a byte: a count beyond that is malformed (and allocates nothing).
    if count as usize > body.len() {
        return Err(WireError::Malformed(format!("{count} messages in {} bytes", body.len())));
    }
    let mut messages = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let (message, used) = bincode::serde::decode_from_slice::<Message, _>(body, config()).map_err(malformed)?;
        body = &body[used..];
        messages.push(message);
    }
    if !body.is_empty() {
        return Err(WireError::Trailing(body.len()));
    }
    Ok(messages)
}

/// The version to speak with a peer that announced `min..=max`.
pub fn negotiate(min: u8, max: u8) -> Result<u8, WireError> {
    let version = max.min(PROTOCOL_VERSION);
    if version < min.max(MIN_PROTOCOL_VERSION) {
        return Err(WireError::NoCommonVersion(min, max));
    }
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn every_kind() -> Vec<Message> {
        let row = vec![Value::Null, Value::Unchanged, Value::Text("héllo".into()), Value::Binary(vec![0, 255, 7])];
        vec![
            Message::Hello { node_id: NodeId(3), min_version: 1, max_version: 1 },
            Message::Begin { origin: NodeId(1), xid: 742, final_lsn: 0x1_6B37_4D48, commit_time: 817_000_000_000_123 },
            Message::Commit { origin: NodeId(1), xid: 742, commit_lsn: 10, end_lsn: 20, commit_time: -5 },
            Message::BeginPrepare {
                origin: NodeId(2),
                xid: 9,
                gid: "mtm-2-9".into(),
                prepare_lsn: 30,
                end_lsn: 40,
                prepare_time: 1,
            },
            Message::Prepare {
                origin: NodeId(2),
                xid: 9,
                gid: "mtm-2-9".into(),
                prepare_lsn: 30,
                end_lsn: 40,
                prepare_time: 1,
            },
            Message::CommitPrepared {
                origin: NodeId(2),
                xid: 9,
                gid: "mtm-2-9".into(),
                commit_lsn: 50,
                end_lsn: 60,
                commit_time: 2,
            },
            Message::RollbackPrepared {
                origin: NodeId(2),
                xid: 9,
                gid: "mtm-2-9".into(),
                end_lsn: 70,
                prepare_time: 1,
                rollback_time: 3,
            },
            Message::Relation(Relation {
                id: 16384,
                schema: "public".into(),
                name: "accounts".into(),
                replica_identity: b'd',
                columns: vec![
                    Column { name: "id".into(), type_name: "pg_catalog.int4".into(), type_modifier: -1, key: true },
                    Column {
                        name: "note".into(),
                        type_name: "pg_catalog.varchar".into(),
                        type_modifier: 84,
                        key: false,
                    },
                ],
            }),
            Message::Insert { relation: 16384, new: row.clone() },
            Message::Update { relation: 16384, old: Some(vec![Value::Text("1".into())]), new: row.clone() },
            Message::Update { relation: 16384, old: None, new: row.clone() },
            Message::Delete { relation: 16384, old: row },
            Message::Truncate { relations: vec![16384, 16390], cascade: true, restart_identity: false },
            Message::LogicalMessage {
                transactional: true,
                lsn: 99,
                prefix: "mtm.ddl".into(),
                content: b"CREATE TABLE t()".to_vec(),
            },
            Message::Keepalive { wal_end: 123, send_time: 456, reply_requested: true },
            Message::StreamStart { xid: 9 },
            Message::StreamSubtransaction { subxid: 10 },
            Message::StreamStop,
            Message::StreamAbort { xid: 9, subxid: 10 },
            Message::StreamPrepare {
                origin: NodeId(2),
                xid: 9,
                gid: "mtm-2-9".into(),
                prepare_lsn: 40,
                end_lsn: 48,
                prepare_time: 1,
            },
            Message::StreamCommit { origin: NodeId(2), xid: 9, commit_lsn: 50, end_lsn: 60, commit_time: 2 },
        ]
    }

    #[test]
    fn every_kind_round_trips() {
        for message in every_kind() {
            let frame = encode(&message);
            assert_eq!(frame[0], PROTOCOL_VERSION);
            assert_eq!(decode(&frame), Ok(message));
        }
    }

    #[test]
    fn a_frame_holds_many_messages() {
        let all = every_kind();
        let mut frame = Frame::new(PROTOCOL_VERSION);
        for m in &all {
            frame.push(m);
        }
        let bytes = frame.take();
        assert!(frame.is_empty());
        assert_eq!(decode_frame(&bytes), Ok(all.clone()));
        assert_eq!(decode(&bytes), Err(WireError::NotOne(all.len())));
        for len in 0..bytes.len() {
            assert!(decode_frame(&bytes[..len]).is_err(), "truncated to {len} bytes decoded");
        }
        // Version 1: one message, no count.
        let mut v1 = Frame::new(1);
        v1.push(&all[0]);
        let bytes = v1.take();
        assert_eq!(bytes[0], 1);
        assert_eq!(decode_frame(&bytes), Ok(vec![all[0].clone()]));
        // A count far beyond the bytes that follow.
        assert!(matches!(decode_frame(&[2, 0xFC, 0xFF, 0xFF, 0xFF, 0x7F]), Err(WireError::Malformed(_))));
    }

    #[test]
    fn truncated_frames_are_errors() {
        for message in every_kind() {
            let frame = encode(&message);
            for len in 0..frame.len() {
                assert!(decode(&frame[..len]).is_err(), "{message:?} truncated to {len} bytes decoded");
            }
        }
    }

    #[test]
    fn bad_version_and_trailing_bytes() {
        let mut frame = encode(&Message::Keepalive { wal_end: 1, send_time: 2, reply_requested: false });
        frame[0] = 9;
        assert_eq!(decode(&frame), Err(WireError::Version(9)));
        frame[0] = PROTOCOL_VERSION;
        frame.push(0);
        assert_eq!(decode(&frame), Err(WireError::Trailing(1)));
        assert_eq!(decode(&[]), Err(WireError::Empty));
    }

    #[test]
    fn huge_length_prefix_does_not_allocate() {
        // Variant 13 (LogicalMessage) with a string length of 2^62: must fail, not abort.
        let frame = [PROTOCOL_VERSION, 1, 13, 1, 99, 0xFF, 0, 0, 0, 0, 0, 0, 0, 0x40];
        assert!(matches!(decode(&frame), Err(WireError::Malformed(_))));
    }

    #[test]
    fn negotiation() {
        assert_eq!(negotiate(1, 1), Ok(1));
        assert_eq!(negotiate(1, 7), Ok(PROTOCOL_VERSION));
        assert_eq!(negotiate(5, 7), Err(WireError::NoCommonVersion(5, 7)));
    }

    /// Deterministic fuzzing: random mutations of valid frames and random bytes never panic,
    /// and whatever decodes re-encodes to the same frame.
    #[test]
    fn fuzz_decoder() {
        let mut seeds: Vec<Vec<u8>> = every_kind().iter().map(encode).collect();
        let mut batch = Frame::new(PROTOCOL_VERSION);
        every_kind().iter().take(4).for_each(|m| batch.push(m));
        seeds.push(batch.take());
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..200_000 {
            let r = next();
            let mut frame = if r % 8 == 0 {
                (0..(r >> 8) % 64).map(|_| next() as u8).collect()
            } else {
                seeds[(r >> 3) as usize % seeds.len()].clone()
            };
            for _ in 0..1 + next() % 4 {
                if frame.is_empty() {
                    break;
                }
                let at = next() as usize % frame.len();
                match next() % 4 {
                    0 => frame[at] = next() as u8,
                    1 => frame[at] ^= 1 << (next() % 8),
                    2 => frame.truncate(at),
                    _ => frame.insert(at, next() as u8),
                }
            }
            if let Ok(message) = decode(&frame) {
                assert_eq!(decode(&encode(&message)), Ok(message));
            }
            if let Ok(messages) = decode_frame(&frame) {
                let mut again = Frame::new(PROTOCOL_VERSION);
                messages.iter().for_each(|m| again.push(m));
                assert_eq!(decode_frame(&again.take()), Ok(messages));
            }
        }
    }
}
