//! Every bad multimaster configuration stops the server at start with a message and a hint
//! naming the setting to change (the postmaster exits: no crash loop). Good configurations
//! start, and `mtm.get_cluster_info()` shows the effective settings with passwords masked.

use mmts_tests::ClusterBuilder;

/// Starts a one-node cluster (a 3-node `conn_strings`, node 1) with `settings` added and
/// returns the server log of the failed start.
fn refused(settings: &[(&str, &str)]) -> String {
    let mut builder = ClusterBuilder::new(1).multimaster(false).set("multimaster.node_id", "1").set(
        "multimaster.conn_strings",
        "'host=127.0.0.1 port=1 dbname=postgres, host=127.0.0.1 port=2 dbname=postgres, host=127.0.0.1 port=3 dbname=postgres'",
    );
    for (k, v) in settings {
        builder = builder.set(k, v);
    }
    let mut cluster = builder.build();
    let log = cluster.node_mut(1).try_start().expect_err("the server must refuse this configuration");
    // The postmaster exited: nothing keeps restarting.
    assert!(!cluster.node(1).is_up());
    assert!(!cluster.node(1).data_dir().join("postmaster.pid").exists(), "a postmaster is still running");
    log
}

fn assert_refused(settings: &[(&str, &str)], message: &str, hint: &str) {
    let log = refused(settings);
    assert!(log.contains(&format!("FATAL:  {message}")), "expected FATAL {message:?} in:\n{log}");
    assert!(log.contains(&format!("HINT:  {hint}")), "expected HINT {hint:?} in:\n{log}");
}

#[test]
fn node_id_outside_conn_strings() {
    assert_refused(
        &[("multimaster.node_id", "4")],
        "multimaster.node_id 4 is outside multimaster.conn_strings, which lists 3 nodes",
        "Set multimaster.node_id to this node's position (1 to 3) in multimaster.conn_strings.",
    );
}

#[test]
fn node_id_without_conn_strings() {
    assert_refused(
        &[("multimaster.conn_strings", "''")],
        "multimaster.node_id is set but multimaster.conn_strings is empty",
        "Set multimaster.conn_strings",
    );
}

#[test]
fn conn_strings_without_node_id() {
    assert_refused(&[("multimaster.node_id", "0")], "multimaster.node_id 0 is outside", "Set multimaster.node_id");
}

#[test]
fn malformed_conn_string() {
    assert_refused(
        &[("multimaster.conn_strings", "'host=a dbname=x, hots=b dbname=x'")],
        "invalid connection string for node 2 in multimaster.conn_strings: invalid connection option \"hots\"",
        "Give one libpq connection string per node",
    );
    assert_refused(
        &[("multimaster.conn_strings", "'host=a, host=b port=x5432'")],
        "invalid connection string for node 2 in multimaster.conn_strings: invalid port \"x5432\"",
        "Give one libpq connection string per node",
    );
}

#[test]
fn values_postgres_cannot_parse() {
    let log = refused(&[("multimaster.node_id", "'two'")]);
    assert!(log.contains("FATAL:  invalid value for parameter \"multimaster.node_id\": \"two\""), "{log}");
    assert!(log.contains("HINT:  Correct multimaster.node_id in postgresql.conf"), "{log}");
    let log = refused(&[("multimaster.workers", "0")]);
    assert!(log.contains("0 is outside the valid range for parameter \"multimaster.workers\""), "{log}");
    assert!(log.contains("FATAL:  invalid value for parameter \"multimaster.workers\": \"0\""), "{log}");
    let log = refused(&[("multimaster.heartbeat_send_timeout", "'soon'")]);
    assert!(log.contains("FATAL:  invalid value for parameter \"multimaster.heartbeat_send_timeout\""), "{log}");
    let log = refused(&[("multimaster.ignore_tables_without_pk", "maybe")]);
    assert!(log.contains("FATAL:  invalid value for parameter \"multimaster.ignore_tables_without_pk\""), "{log}");
}

#[test]
fn heartbeat_recv_not_above_send() {
    assert_refused(
        &[("multimaster.heartbeat_send_timeout", "500"), ("multimaster.heartbeat_recv_timeout", "500ms")],
        "multimaster.heartbeat_recv_timeout (500 ms) must be greater than multimaster.heartbeat_send_timeout (500 ms)",
        "Make multimaster.heartbeat_recv_timeout several times multimaster.heartbeat_send_timeout",
    );
}

#[test]
fn server_prerequisites() {
    assert_refused(
        &[("wal_level", "replica")],
        "mmts needs wal_level = logical, but it is replica",
        "Set wal_level = logical in postgresql.conf and restart.",
    );
    assert_refused(
        &[("max_prepared_transactions", "0")],
        "mmts needs prepared transactions, but max_prepared_transactions is 0",
        "Set max_prepared_transactions",
    );
    assert_refused(
        &[("track_commit_timestamp", "off")],
        "mmts needs track_commit_timestamp = on to resolve conflicting writes",
        "Set track_commit_timestamp = on in postgresql.conf and restart.",
    );
    if mmts_tests::server_has_setting("output_plugin_libraries") {
        assert_refused(
            &[("output_plugin_libraries", "'pgoutput, test_decoding'")],
            "\"mmts\" is not listed in output_plugin_libraries",
            "Set output_plugin_libraries = 'pgoutput, test_decoding, mmts' and restart.",
        );
    }
    assert_refused(
        &[("max_replication_slots", "1")],
        "max_replication_slots is 1, but a 3-node mmts cluster needs at least 6",
        "Set max_replication_slots to at least 6",
    );
    assert_refused(
        &[("max_wal_senders", "1")],
        "max_wal_senders is 1, but a 3-node mmts cluster needs at least 2",
        "Set max_wal_senders to at least 2",
    );
    assert_refused(
        &[("max_worker_processes", "2")],
        "max_worker_processes is 2, but a 3-node mmts cluster needs at least 3",
        "Set max_worker_processes to at least 3",
    );
}

#[test]
fn use_raftable_is_accepted_and_logged() {
    let cluster = ClusterBuilder::new(2).proxies(false).set("multimaster.use_raftable", "true").start();
    let log = cluster.node(1).log_tail(100);
    assert!(log.contains("multimaster.use_raftable is ignored: mmts has built-in consensus"), "{log}");
}

#[test]
fn standalone_without_node_id() {
    let cluster = ClusterBuilder::new(1).multimaster(false).set("wal_level", "replica").start();
    let node = cluster.node(1);
    assert!(node.log_tail(100).contains("mmts loaded without multimaster.node_id"));
    node.execute("CREATE EXTENSION mmts");
    assert_eq!(
        node.query_value("SELECT value FROM mtm.get_cluster_info() WHERE name = 'mode'").as_deref(),
        Some("standalone")
    );
}

#[test]
fn cluster_info_shows_settings_without_passwords() {
    let cluster = ClusterBuilder::new(3)
        .proxies(false)
        .multimaster(false)
        .set("multimaster.conn_strings", "'host=127.0.0.1 port=1 password=hunter2, host=127.0.0.1 port=2 password=hunter2, postgresql://u:hunter2@127.0.0.1:3/db'")
        .set_node(1, "multimaster.node_id", "1")
        .set_node(2, "multimaster.node_id", "2")
        .set_node(3, "multimaster.node_id", "3")
        .start();
    let node = cluster.node(2);
    node.execute("CREATE EXTENSION mmts");
    let info =
        |name: &str| node.query_value(&format!("SELECT value FROM mtm.get_cluster_info() WHERE name = '{name}'"));
    assert_eq!(info("mode").as_deref(), Some("multimaster"));
    assert_eq!(info("nodes").as_deref(), Some("3"));
    assert_eq!(info("multimaster.node_id").as_deref(), Some("2"));
    assert_eq!(info("multimaster.heartbeat_recv_timeout").as_deref(), Some("2s"));
    let major = mmts_tests::server_major();
    assert_eq!(info("server_version").map(|v| v.starts_with(&format!("{major}."))), Some(true));
    let conn = info("multimaster.conn_strings").unwrap();
    assert!(!conn.contains("hunter2") && conn.contains("password=********"), "{conn}");
    assert!(conn.contains("user=u"), "{conn}");
    // conn_strings itself is for superusers only; the function is for everybody.
    node.execute_local("CREATE ROLE alice LOGIN");
    let mut alice = mmts_tests::postgres::Config::new();
    alice.host("127.0.0.1").port(node.port()).user("alice").dbname("postgres");
    let mut alice = alice.connect(mmts_tests::postgres::NoTls).unwrap();
    let err = alice.simple_query("SHOW multimaster.conn_strings").unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "42501");
    let rows =
        alice.query("SELECT value FROM mtm.get_cluster_info() WHERE name = 'multimaster.conn_strings'", &[]).unwrap();
    let seen: Option<String> = rows[0].get(0);
    assert_eq!(seen, None, "a role that may not SHOW conn_strings reads it through mtm.get_cluster_info()");
}

#[test]
fn create_extension_needs_preload() {
    let cluster = ClusterBuilder::new(1).multimaster(false).set("shared_preload_libraries", "''").start();
    let mut client = cluster.node(1).connect();
    let err = client.batch_execute("CREATE EXTENSION mmts").unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "55000");
    assert_eq!(db.message(), "mmts must be loaded at server start");
    assert!(db.hint().unwrap().contains("shared_preload_libraries"));
    // The refusal leaves the session usable and can be repeated.
    let err = client.batch_execute("CREATE EXTENSION mmts").unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "55000");
}
