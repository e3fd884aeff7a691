//! Validation of the `multimaster.*` settings and of the server settings mmts depends on.
//!
//! The extension reads every setting once, at server start, into [`Settings`] and calls
//! [`validate`]. Anything wrong comes back as a [`ConfigError`] naming the setting to change;
//! the server then refuses to start with that message (never a crash loop).

use crate::conninfo::{split_conn_strings, ConnInfo};
use crate::NodeId;

/// Settings as read from the server, before validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `multimaster.node_id`; 0 when not set.
    pub node_id: i32,
    /// `multimaster.conn_strings`; empty when not set.
    pub conn_strings: String,
    pub workers: i32,
    pub queue_size: i32,
    pub heartbeat_send_timeout_ms: i32,
    pub heartbeat_recv_timeout_ms: i32,
    pub ignore_tables_without_pk: bool,
    pub twopc_min_timeout_ms: i32,
    pub use_raftable: bool,
    /// Server settings mmts needs, as `SHOW` prints them.
    pub wal_level: String,
    pub max_prepared_transactions: i32,
    /// Needed to resolve conflicting writes by commit time.
    pub track_commit_timestamp: bool,
    pub max_replication_slots: i32,
    pub max_wal_senders: i32,
    pub max_worker_processes: i32,
    /// `output_plugin_libraries`, or `None` on a server that predates that setting.
    pub output_plugin_libraries: Option<String>,
}

/// One node of the cluster as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub id: NodeId,
    pub conninfo: ConnInfo,
}

/// A validated multimaster configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    pub node_id: NodeId,
    pub nodes: Vec<NodeConfig>,
    pub workers: u32,
    pub queue_size: u32,
    pub heartbeat_send_timeout_ms: u32,
    pub heartbeat_recv_timeout_ms: u32,
    pub ignore_tables_without_pk: bool,
    pub twopc_min_timeout_ms: u32,
}

impl ClusterConfig {
    pub fn peers(&self) -> impl Iterator<Item = &NodeConfig> {
        self.nodes.iter().filter(move |n| n.id != self.node_id)
    }
}

/// What mmts does on this server.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// No `multimaster.node_id` / `multimaster.conn_strings`: only the output plugin and the
    /// SQL functions are available.
    Standalone,
    Multimaster(ClusterConfig),
}

/// Whether a setting has a bad value or a prerequisite is not met; decides the SQLSTATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// SQLSTATE 22023 invalid_parameter_value.
    InvalidValue,
    /// SQLSTATE 55000 object_not_in_prerequisite_state.
    Prerequisite,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    pub kind: ErrorKind,
    /// The setting to change.
    pub setting: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: String,
}

/// Something worth a line in the server log that does not stop the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub message: String,
    pub hint: Option<String>,
}

fn invalid(setting: &'static str, message: String, hint: String) -> ConfigError {
    ConfigError { kind: ErrorKind::InvalidValue, setting, message, detail: None, hint }
}

fn prerequisite(setting: &'static str, message: String, hint: String) -> ConfigError {
    ConfigError { kind: ErrorKind::Prerequisite, setting, message, detail: None, hint }
}

/// Background workers mmts needs besides the per-peer receivers (the heartbeat worker).
pub const EXTRA_WORKERS: i32 = 1;

/// Replication origins a node's coordinating backends commit under (each takes one of
/// `max_replication_slots`' origin states, besides one per peer for its receiver).
pub const COMMIT_ORIGINS: i32 = 4;

/// The library name as it must appear in `shared_preload_libraries` / `output_plugin_libraries`.
pub const LIBRARY: &str = "mmts";

/// Checks `settings`; on success returns the mode and the notices to log.
pub fn validate(settings: &Settings) -> Result<(Mode, Vec<Notice>), ConfigError> {
    let mut notices = Vec::new();
    if settings.use_raftable {
        notices.push(Notice {
            message: "multimaster.use_raftable is ignored: mmts has built-in consensus".into(),
            hint: Some("Remove multimaster.use_raftable from postgresql.conf.".into()),
        });
    }
    let plugin_allowed = settings
        .output_plugin_libraries
        .as_deref()
        .is_none_or(|list| list.split(',').any(|lib| lib.trim().trim_matches('"') == LIBRARY));

    let conn_strings = settings.conn_strings.trim();
    if settings.node_id == 0 && conn_strings.is_empty() {
        if !plugin_allowed {
            notices.push(Notice {
                message: "the mmts output plugin cannot be used: \"mmts\" is not listed in output_plugin_libraries"
                    .into(),
                hint: Some(plugin_hint(settings)),
            });
        }
        return Ok((Mode::Standalone, notices));
    }
    if conn_strings.is_empty() {
        return Err(invalid(
            "multimaster.conn_strings",
            "multimaster.node_id is set but multimaster.conn_strings is empty".into(),
            "Set multimaster.conn_strings to the comma-separated connection strings of all nodes, in node-id order."
                .into(),
        ));
    }
    let mut nodes = Vec::new();
    for (i, text) in split_conn_strings(conn_strings).into_iter().enumerate() {
        let id = NodeId(i as u32 + 1);
        let conninfo = ConnInfo::parse(text).map_err(|e| {
            invalid(
                "multimaster.conn_strings",
                format!("invalid connection string for node {id} in multimaster.conn_strings: {e}"),
                "Give one libpq connection string per node, separated by commas, e.g. 'host=node1 dbname=postgres, host=node2 dbname=postgres'.".into(),
            )
        })?;
        nodes.push(NodeConfig { id, conninfo });
    }
    let n = nodes.len() as i32;
    if settings.node_id < 1 || settings.node_id > n {
        return Err(invalid(
            "multimaster.node_id",
            format!(
                "multimaster.node_id {} is outside multimaster.conn_strings, which lists {n} node{}",
                settings.node_id,
                if n == 1 { "" } else { "s" }
            ),
            format!("Set multimaster.node_id to this node's position (1 to {n}) in multimaster.conn_strings."),
        ));
    }
    if settings.heartbeat_recv_timeout_ms <= settings.heartbeat_send_timeout_ms {
        return Err(invalid(
            "multimaster.heartbeat_recv_timeout",
            format!(
                "multimaster.heartbeat_recv_timeout ({} ms) must be greater than multimaster.heartbeat_send_timeout ({} ms)",
                settings.heartbeat_recv_timeout_ms, settings.heartbeat_send_timeout_ms
            ),
            "Make multimaster.heartbeat_recv_timeout several times multimaster.heartbeat_send_timeout, e.g. 2000 and 200.".into(),
        ));
    }
    if settings.wal_level != "logical" {
        return Err(prerequisite(
            "wal_level",
            format!("mmts needs wal_level = logical, but it is {}", settings.wal_level),
            "Set wal_level = logical in postgresql.conf and restart.".into(),
        ));
    }
    if settings.max_prepared_transactions < 1 {
        return Err(prerequisite(
            "max_prepared_transactions",
            "mmts needs prepared transactions, but max_prepared_transactions is 0".into(),
            "Set max_prepared_transactions to at least max_connections (e.g. 100) and restart.".into(),
        ));
    }
    if !settings.track_commit_timestamp {
        return Err(prerequisite(
            "track_commit_timestamp",
            "mmts needs track_commit_timestamp = on to resolve conflicting writes".into(),
            "Set track_commit_timestamp = on in postgresql.conf and restart.".into(),
        ));
    }
    if !plugin_allowed {
        return Err(prerequisite(
            "output_plugin_libraries",
            "\"mmts\" is not listed in output_plugin_libraries".into(),
            plugin_hint(settings),
        ));
    }
    let peers = n - 1;
    let needs: [(&'static str, i32, i32); 3] = [
        ("max_replication_slots", settings.max_replication_slots, peers + COMMIT_ORIGINS),
        ("max_wal_senders", settings.max_wal_senders, peers),
        ("max_worker_processes", settings.max_worker_processes, peers + EXTRA_WORKERS),
    ];
    for (setting, have, need) in needs {
        if have < need {
            return Err(prerequisite(
                setting,
                format!("{setting} is {have}, but a {n}-node mmts cluster needs at least {need}"),
                format!("Set {setting} to at least {need} (more if other features use it) and restart."),
            ));
        }
    }
    Ok((
        Mode::Multimaster(ClusterConfig {
            node_id: NodeId(settings.node_id as u32),
            nodes,
            workers: settings.workers as u32,
            queue_size: settings.queue_size as u32,
            heartbeat_send_timeout_ms: settings.heartbeat_send_timeout_ms as u32,
            heartbeat_recv_timeout_ms: settings.heartbeat_recv_timeout_ms as u32,
            ignore_tables_without_pk: settings.ignore_tables_without_pk,
            twopc_min_timeout_ms: settings.twopc_min_timeout_ms as u32,
        }),
        notices,
    ))
}

fn plugin_hint(settings: &Settings) -> String {
    let current = settings.output_plugin_libraries.as_deref().unwrap_or("");
    let list = if current.trim().is_empty() { LIBRARY.to_string() } else { format!("{current}, {LIBRARY}") };
    format!("Set output_plugin_libraries = '{list}' and restart.")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Settings {
        Settings {
            node_id: 2,
            conn_strings: "host=a dbname=x, host=b dbname=x, host=c dbname=x password=secret".into(),
            workers: 8,
            queue_size: 256 << 20,
            heartbeat_send_timeout_ms: 200,
            heartbeat_recv_timeout_ms: 2000,
            ignore_tables_without_pk: false,
            twopc_min_timeout_ms: 2000,
            use_raftable: false,
            wal_level: "logical".into(),
            max_prepared_transactions: 100,
            track_commit_timestamp: true,
            max_replication_slots: 10,
            max_wal_senders: 10,
            max_worker_processes: 8,
            output_plugin_libraries: Some("pgoutput, test_decoding, mmts".into()),
        }
    }

    fn error(s: Settings) -> ConfigError {
        validate(&s).unwrap_err()
    }

    #[test]
    fn valid_cluster() {
        let (mode, notices) = validate(&good()).unwrap();
        let Mode::Multimaster(c) = mode else { panic!("expected multimaster") };
        assert_eq!(c.node_id, NodeId(2));
        assert_eq!(c.nodes.len(), 3);
        assert_eq!(c.peers().map(|n| n.id.0).collect::<Vec<_>>(), vec![1, 3]);
        assert!(notices.is_empty());
    }

    #[test]
    fn standalone_when_unconfigured() {
        let s = Settings { node_id: 0, conn_strings: String::new(), wal_level: "replica".into(), ..good() };
        assert_eq!(validate(&s).unwrap().0, Mode::Standalone);
        let s = Settings { output_plugin_libraries: Some("pgoutput".into()), ..s };
        let (_, notices) = validate(&s).unwrap();
        assert_eq!(notices[0].hint.as_deref(), Some("Set output_plugin_libraries = 'pgoutput, mmts' and restart."));
    }

    #[test]
    fn bad_values() {
        let e = error(Settings { node_id: 4, ..good() });
        assert_eq!(e.setting, "multimaster.node_id");
        assert!(e.message.contains("lists 3 nodes"), "{}", e.message);
        assert_eq!(error(Settings { conn_strings: " ".into(), ..good() }).setting, "multimaster.conn_strings");
        let e = error(Settings { conn_strings: "host=a, hots=b".into(), ..good() });
        assert!(e.message.contains("node 2") && e.message.contains("\"hots\""), "{}", e.message);
        let e = error(Settings { node_id: 0, ..good() });
        assert_eq!(e.setting, "multimaster.node_id");
        let e = error(Settings { heartbeat_recv_timeout_ms: 200, ..good() });
        assert_eq!(e.setting, "multimaster.heartbeat_recv_timeout");
    }

    #[test]
    fn prerequisites() {
        for (s, setting) in [
            (Settings { wal_level: "replica".into(), ..good() }, "wal_level"),
            (Settings { max_prepared_transactions: 0, ..good() }, "max_prepared_transactions"),
            (Settings { track_commit_timestamp: false, ..good() }, "track_commit_timestamp"),
            (
                Settings { output_plugin_libraries: Some("pgoutput, test_decoding".into()), ..good() },
                "output_plugin_libraries",
            ),
            (Settings { max_replication_slots: 1, ..good() }, "max_replication_slots"),
            (Settings { max_wal_senders: 1, ..good() }, "max_wal_senders"),
            (Settings { max_worker_processes: 2, ..good() }, "max_worker_processes"),
        ] {
            let e = error(s);
            assert_eq!((e.setting, e.kind), (setting, ErrorKind::Prerequisite));
            assert!(e.hint.contains(setting), "hint names the setting: {}", e.hint);
        }
        // A server without output_plugin_libraries allows every plugin.
        assert!(validate(&Settings { output_plugin_libraries: None, ..good() }).is_ok());
    }

    #[test]
    fn raftable_is_noted() {
        let (_, notices) = validate(&Settings { use_raftable: true, ..good() }).unwrap();
        assert!(notices[0].message.contains("built-in consensus"));
    }
}
