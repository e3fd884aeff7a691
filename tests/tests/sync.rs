//! Synchronous commit (`multimaster.mode = sync`, the default).

use std::time::Duration;

use mmts_tests::{Cluster, ClusterBuilder, Node};

const WAIT: Duration = Duration::from_secs(60);

fn start(n: usize) -> Cluster {
    let cluster = ClusterBuilder::new(n).start();
    for node in cluster.nodes() {
        node.execute("CREATE EXTENSION mmts; CREATE TABLE t(id bigint PRIMARY KEY, v text)");
    }
    cluster.wait_replicating(WAIT);
    cluster
}

fn count(node: &Node, sql: &str) -> i64 {
    node.query_value(sql).and_then(|v| v.parse().ok()).unwrap_or(-1)
}

#[test]
fn smoke() {
    let cluster = start(3);
    let mut c1 = cluster.node(1).connect();
    let mut c2 = cluster.node(2).connect();
    let t = std::time::Instant::now();
    c1.execute("INSERT INTO t VALUES (1, 'a')", &[]).unwrap();
    eprintln!("insert took {:?}", t.elapsed());
    let n: i64 = c2.query_one("SELECT count(*) FROM t", &[]).unwrap().get(0);
    assert_eq!(n, 1);
    c1.batch_execute("INSERT INTO t VALUES (2, 'b')").unwrap();
    c1.batch_execute("BEGIN; INSERT INTO t VALUES (3, 'c'); COMMIT").unwrap();
    c1.batch_execute("INSERT INTO t VALUES (4, 'c'); INSERT INTO t VALUES (5, 'c')").unwrap();
    assert_eq!(count(cluster.node(3), "SELECT count(*) FROM t"), 5);
    // duplicate on node 2 only
    cluster.node(2).execute("SET session_replication_role = replica; INSERT INTO t VALUES (6, 'x')");
    let e = c1.execute("INSERT INTO t VALUES (6, 'y')", &[]).unwrap_err();
    eprintln!("{}", mmts_tests::describe(&e));
    assert_eq!(count(cluster.node(1), "SELECT count(*) FROM pg_prepared_xacts"), 0);
    for n in cluster.nodes() {
        eprintln!("{}", n.log_tail(20));
    }
}
