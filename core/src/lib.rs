//! The part of mmts that needs no PostgreSQL: configuration, connection strings, and (as they
//! arrive) the wire codec, the two-phase-commit coordinator, membership and clocks. Everything
//! here is plain Rust, advanced by inputs and tested with `cargo test -p mmts-core`.

pub mod config;
pub mod conflict;
pub mod conninfo;
pub mod coordinator;
pub mod flow;
pub mod forward;
pub mod indoubt;
pub mod lease;
pub mod membership;
pub mod participant;
pub mod provenance;
pub mod records;
pub mod replication;
pub mod twopc;
pub mod wire;

use std::fmt;

/// A node's id: its 1-based position in `multimaster.conn_strings`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct NodeId(pub u32);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
