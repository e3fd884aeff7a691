//! A user's first bulk load on a synchronous cluster. A test binary of its own, so that its
//! load runs alone and slows no other test.

use std::time::Duration;

use mmts_tests::{bindir, wait_for, ClusterBuilder};

const WAIT: Duration = Duration::from_secs(60);

/// Plain `pgbench -i` on node 1 of a synchronous cluster with default settings: tables
/// without keys, half a million rows copied in one transaction (over 100 MB once decoded:
/// streamed to the peers while it runs), then the primary keys. It succeeds, and every node
/// has every row and the keys.
#[test]
fn pgbench_initializes_a_synchronous_cluster_with_default_settings() {
    const SCALE: i64 = 5;
    let cluster = ClusterBuilder::new(3).start();
    for node in cluster.nodes() {
        node.execute_local("CREATE EXTENSION mmts");
    }
    cluster.wait_replicating(WAIT);
    let node1 = cluster.node(1);
    let out = std::process::Command::new(bindir().join("pgbench"))
        .args(["-i", "-s", &SCALE.to_string(), "-h", "127.0.0.1", "-U", "postgres"])
        .arg("-p")
        .arg(node1.port().to_string())
        .arg("postgres")
        .output()
        .expect("run pgbench");
    assert!(out.status.success(), "pgbench -i failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let value = |node: &mmts_tests::Node, sql: &str| node.query_value(sql).unwrap_or_default();
    for node in cluster.nodes() {
        assert_eq!(
            value(node, "SELECT count(*) FROM pgbench_accounts"),
            (SCALE * 100_000).to_string(),
            "node {}",
            node.id
        );
        assert_eq!(
            value(node, "SELECT sum(bbalance) + count(*) FROM pgbench_branches"),
            SCALE.to_string(),
            "node {}",
            node.id
        );
        assert_eq!(
            value(
                node,
                "SELECT count(*) FROM pg_index WHERE indisprimary AND indrelid::regclass::text LIKE 'pgbench_%'"
            ),
            "3",
            "node {}: primary keys of pgbench_accounts, _branches and _tellers",
            node.id
        );
    }
    // (Slot statistics reach the view a little after the walsenders counted them.)
    wait_for("node 1 counting the load as streamed to both peers", WAIT, || {
        value(node1, "SELECT sum(stream_txns) FROM pg_stat_replication_slots").parse::<i64>().unwrap_or(0) >= 2
    });
    for node in cluster.nodes() {
        assert_eq!(value(node, "SELECT count(*) FROM pg_prepared_xacts"), "0", "node {}", node.id);
    }
}
