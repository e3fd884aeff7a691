//! The `mtm.*` SQL functions.

use mmts_core::config::Mode;
use pgrx::prelude::*;

use crate::gucs;

/// Versions and effective settings, for debugging: one row per item.
#[pg_extern(stable, parallel_safe)]
fn get_cluster_info() -> TableIterator<'static, (name!(name, String), name!(value, Option<String>))> {
    let mut rows: Vec<(String, Option<String>)> = vec![
        ("mmts_version".into(), Some(env!("CARGO_PKG_VERSION").into())),
        ("server_version".into(), gucs::show_option("server_version")),
    ];
    match gucs::mode() {
        Mode::Standalone => rows.push(("mode".into(), Some("standalone".into()))),
        Mode::Multimaster(c) => {
            rows.push(("mode".into(), Some("multimaster".into())));
            rows.push(("nodes".into(), Some(crate::status::configured(c).count_ones().to_string())));
        }
    }
    for name in gucs::NAMES {
        let value = if *name == "multimaster.conn_strings" { masked_conn_strings() } else { gucs::show_option(name) };
        rows.push((name.to_string(), value));
    }
    for name in [
        "wal_level",
        "track_commit_timestamp",
        "max_prepared_transactions",
        "max_replication_slots",
        "max_wal_senders",
        "max_worker_processes",
        "output_plugin_libraries",
    ] {
        // Read without the SHOW privilege check: output_plugin_libraries is superuser-only.
        rows.push((name.to_string(), gucs::config_option(name)));
    }
    TableIterator::new(rows)
}

/// `multimaster.conn_strings` as this server started with it, passwords masked; NULL for a
/// role that may not read it.
fn masked_conn_strings() -> Option<String> {
    if !gucs::may_read_conn_strings() {
        return None;
    }
    match gucs::mode() {
        Mode::Standalone => None,
        Mode::Multimaster(c) => Some(c.nodes.iter().map(|n| n.conninfo.masked()).collect::<Vec<_>>().join(", ")),
    }
}

pgrx::extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
