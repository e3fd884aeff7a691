//! The harness proves itself: nodes start and answer, a killed node is down and comes back,
//! a cut link blocks traffic between two nodes and heals, a delayed link is slow.

use std::time::{Duration, Instant};

use mmts_tests::{wait_for, ClusterBuilder};

#[test]
fn nodes_start_and_answer() {
    let started = Instant::now();
    let cluster = ClusterBuilder::new(3).start();
    eprintln!("3-node cluster started in {:?}", started.elapsed());
    for node in cluster.nodes() {
        assert_eq!(node.query_value("SHOW port").as_deref(), Some(node.port().to_string().as_str()));
        assert_eq!(node.query_value("SHOW multimaster.node_id").as_deref(), Some(node.id.to_string().as_str()));
        assert_eq!(node.query_value("SHOW cluster_name").unwrap(), format!("node{}", node.id));
    }
    // Each node is its own server: a table made on one is absent on the others.
    cluster.node(1).execute_local("CREATE TABLE only_here(x int)");
    assert_eq!(cluster.node(2).query_value("SELECT to_regclass('only_here')::text"), None);
}

#[test]
fn killed_node_is_down_and_restarts() {
    let mut cluster = ClusterBuilder::new(2).proxies(false).start();
    for node in cluster.nodes() {
        node.execute_local("CREATE EXTENSION mmts; CREATE TABLE t(x int PRIMARY KEY)");
    }
    // Writes need a majority (here: both nodes) online.
    cluster.wait_replicating(Duration::from_secs(60));
    cluster.node(1).execute("INSERT INTO t VALUES (1), (2)");
    let pid = cluster.node(1).query_value("SELECT pg_backend_pid()").unwrap();
    cluster.node_mut(1).kill9();
    assert!(!cluster.node(1).is_up(), "node 1 answers after kill -9");
    assert!(mmts_tests::is_dead(pid.parse().unwrap()), "backend {pid} survived kill -9 of its node");
    assert!(cluster.node(2).is_up(), "the other node is unaffected");
    cluster.node_mut(1).start();
    // Reads of replicated tables wait until it is a member again.
    cluster.wait_replicating(Duration::from_secs(60));
    assert_eq!(cluster.node(1).query_value("SELECT sum(x) FROM t").as_deref(), Some("3"));
    assert!(cluster.node(1).log_tail(200).contains("database system was interrupted"), "restart ran crash recovery");
}

/// Connects to node `to` the way node `from` does: with the connection string in `from`'s
/// `multimaster.conn_strings` (through the link's proxy), from the test process; gives up
/// after 4 s (a cut link takes connections and answers nothing).
fn peer_query(cluster: &mmts_tests::Cluster, from: usize, to: usize) -> Result<String, String> {
    let config: mmts_tests::postgres::Config = cluster.link_connstr(from, to).parse().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let answer = config.connect(mmts_tests::postgres::NoTls).and_then(|mut client| {
            client.query_one("SELECT current_setting('cluster_name')", &[]).map(|r| r.get::<_, String>(0))
        });
        let _ = tx.send(answer.map_err(|e| mmts_tests::describe(&e)));
    });
    rx.recv_timeout(Duration::from_secs(4)).unwrap_or_else(|_| Err("timeout: no answer in 4 s".into()))
}

#[test]
fn cut_link_blocks_traffic_and_heals() {
    let cluster = ClusterBuilder::new(3).start();
    assert_eq!(peer_query(&cluster, 1, 2).unwrap(), "node2");

    cluster.cut(1, 2);
    let err = peer_query(&cluster, 1, 2).expect_err("a cut link must not carry traffic");
    assert!(err.contains("timeout") || err.contains("timed out"), "unexpected error: {err}");
    let err = peer_query(&cluster, 2, 1).expect_err("a cut is both ways");
    assert!(!err.is_empty());
    // Other links are unaffected.
    assert_eq!(peer_query(&cluster, 1, 3).unwrap(), "node3");
    assert_eq!(peer_query(&cluster, 3, 2).unwrap(), "node2");

    cluster.heal(1, 2);
    assert_eq!(peer_query(&cluster, 1, 2).unwrap(), "node2");
    assert_eq!(peer_query(&cluster, 2, 1).unwrap(), "node1");
}

#[test]
fn established_connection_is_blackholed_then_closed_on_heal() {
    let cluster = ClusterBuilder::new(2).start();
    let link = cluster.link(1, 2);
    let mut cfg: mmts_tests::postgres::Config = cluster.link_connstr(1, 2).parse().unwrap();
    cfg.connect_timeout(Duration::from_secs(2));
    let mut client = cfg.connect(mmts_tests::postgres::NoTls).unwrap();
    client.simple_query("SELECT 1").unwrap();
    link.cut();
    // The query is sent into the black hole: no answer arrives.
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let r = client.simple_query("SELECT 1").map(|_| ());
        let _ = tx.send(r.is_ok());
    });
    assert!(rx.recv_timeout(Duration::from_millis(1500)).is_err(), "an answer crossed a cut link");
    link.heal();
    // Healing closes connections that lost bytes: the waiting client gets an error, not a hang.
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(false));
    waiter.join().unwrap();
}

#[test]
fn delayed_link_adds_latency() {
    let cluster = ClusterBuilder::new(2).start();
    let t = Instant::now();
    peer_query(&cluster, 1, 2).unwrap();
    let fast = t.elapsed();
    cluster.link(1, 2).set_delay(Duration::from_millis(150));
    let t = Instant::now();
    peer_query(&cluster, 1, 2).unwrap();
    let slow = t.elapsed();
    // A connection and a query take several round trips, each at least 150 ms slower.
    assert!(slow >= fast + Duration::from_millis(450), "fast {fast:?}, slow {slow:?}");
    cluster.link(1, 2).set_delay(Duration::ZERO);
    wait_for("link 1->2 fast again", Duration::from_secs(5), || {
        let t = Instant::now();
        peer_query(&cluster, 1, 2).is_ok() && t.elapsed() < Duration::from_millis(300)
    });
}
