//! Partitioned tables are replicated tables like any other: every write to one is committed
//! on all nodes or none, a node out of the majority refuses it, and what PostgreSQL's logical
//! replication does with them (rows moving between partitions, TRUNCATE, ON CONFLICT, MERGE,
//! attach and detach, several levels) ends alike on every node.

use std::time::Duration;

use mmts_tests::{describe, wait_for, Cluster, ClusterBuilder, Node};

const WAIT: Duration = Duration::from_secs(60);

fn start() -> Cluster {
    let cluster = ClusterBuilder::new(3)
        .set("multimaster.heartbeat_send_timeout", "100")
        .set("multimaster.heartbeat_recv_timeout", "1000")
        .start();
    for node in cluster.nodes() {
        node.execute_local("CREATE EXTENSION mmts");
    }
    cluster.wait_replicating(WAIT);
    cluster
}

fn rows(node: &Node, sql: &str) -> Vec<String> {
    node.query_rows(sql)
}

/// Right after `sql` returns on node 1, every node shows the same `check` result.
fn everywhere(cluster: &Cluster, check: &str, expected: &[&str]) {
    for node in cluster.nodes() {
        assert_eq!(rows(node, check), expected, "node {}: {check}", node.id);
    }
}

fn all_online(cluster: &Cluster) {
    for node in cluster.nodes() {
        assert_eq!(
            node.query_value("SELECT state || ' ' || members::text FROM mtm.get_cluster_state()").as_deref(),
            Some("online {1,2,3}"),
            "node {}",
            node.id
        );
    }
}

#[test]
fn writes_to_partitioned_tables_commit_on_every_node() {
    let cluster = start();
    let n1 = cluster.node(1);
    n1.execute(
        "CREATE TABLE pt (a int PRIMARY KEY, v text) PARTITION BY RANGE (a);
         CREATE TABLE pt1 PARTITION OF pt FOR VALUES FROM (1) TO (100);
         CREATE TABLE pt2 PARTITION OF pt FOR VALUES FROM (100) TO (200) PARTITION BY RANGE (a);
         CREATE TABLE pt2a PARTITION OF pt2 FOR VALUES FROM (100) TO (150);
         CREATE TABLE pt2b PARTITION OF pt2 FOR VALUES FROM (150) TO (200)",
    );
    let all = "SELECT tableoid::regclass::text, a, v FROM pt ORDER BY a";
    n1.execute("INSERT INTO pt VALUES (1, 'one'), (2, 'two'), (120, 'deep')");
    everywhere(&cluster, all, &["pt1|1|one", "pt1|2|two", "pt2a|120|deep"]);
    // UPDATE within a partition, and across partitions and levels.
    cluster.node(2).execute("UPDATE pt SET v = 'uno' WHERE a = 1");
    cluster.node(3).execute("UPDATE pt SET a = 160 WHERE a = 2");
    n1.execute("UPDATE pt SET a = 3 WHERE a = 120");
    everywhere(&cluster, all, &["pt1|1|uno", "pt1|3|deep", "pt2b|160|two"]);
    // ON CONFLICT, MERGE, DELETE.
    cluster.node(2).execute("INSERT INTO pt VALUES (1, 'conflict') ON CONFLICT (a) DO UPDATE SET v = excluded.v");
    cluster.node(3).execute(
        "MERGE INTO pt USING (VALUES (3, 'merged'), (170, 'new')) s(a, v) ON pt.a = s.a
         WHEN MATCHED THEN UPDATE SET v = s.v WHEN NOT MATCHED THEN INSERT VALUES (s.a, s.v)",
    );
    n1.execute("DELETE FROM pt WHERE a = 160");
    everywhere(&cluster, all, &["pt1|1|conflict", "pt1|3|merged", "pt2b|170|new"]);
    // TRUNCATE of a partitioned table and of a partition.
    cluster.node(2).execute("TRUNCATE pt2");
    everywhere(&cluster, all, &["pt1|1|conflict", "pt1|3|merged"]);
    n1.execute("TRUNCATE pt");
    everywhere(&cluster, "SELECT count(*) FROM pt", &["0"]);
    // Detach and attach: the detached table is a plain replicated table.
    n1.execute("INSERT INTO pt VALUES (5, 'five'), (155, 'x')");
    n1.execute("ALTER TABLE pt DETACH PARTITION pt2");
    cluster.node(3).execute("INSERT INTO pt2 VALUES (156, 'detached')");
    everywhere(&cluster, "SELECT a FROM pt2 ORDER BY a", &["155", "156"]);
    everywhere(&cluster, "SELECT a FROM pt ORDER BY a", &["5"]);
    cluster.node(2).execute("ALTER TABLE pt ATTACH PARTITION pt2 FOR VALUES FROM (100) TO (200)");
    everywhere(&cluster, "SELECT a FROM pt ORDER BY a", &["5", "155", "156"]);
    all_online(&cluster);
    // Nothing left behind on any node.
    for node in cluster.nodes() {
        assert_eq!(node.query_value("SELECT count(*) FROM pg_prepared_xacts").as_deref(), Some("0"));
    }
}

/// A write to a partitioned table is refused where a write to a plain table is: on a node cut
/// off from the majority. It is voted on by the peers like any other.
#[test]
fn a_node_out_of_the_majority_refuses_writes_to_partitioned_tables() {
    let cluster = start();
    cluster.node(1).execute(
        "CREATE TABLE pt (a int PRIMARY KEY) PARTITION BY LIST (a);
         CREATE TABLE pt_small PARTITION OF pt FOR VALUES IN (1, 2, 3)",
    );
    cluster.isolate(1);
    wait_for("node 1 isolated", WAIT, || {
        cluster.node(1).query_value("SELECT state FROM mtm.get_cluster_state()").as_deref() == Some("isolated")
    });
    for sql in ["INSERT INTO pt VALUES (1)", "TRUNCATE pt", "COPY pt FROM PROGRAM 'echo 2'"] {
        let e = cluster.node(1).connect().batch_execute(sql).expect_err(sql);
        assert_eq!(e.code().map(|c| c.code()), Some("55000"), "{sql}: {}", describe(&e));
    }
    cluster.heal_all();
    cluster.wait_replicating(WAIT);
    everywhere(&cluster, "SELECT count(*) FROM pt", &["0"]);
    cluster.node(1).execute("INSERT INTO pt VALUES (2)");
    everywhere(&cluster, "SELECT a FROM pt", &["2"]);
}
