//! A node catching up under a load that saturates the machine. A test binary of its own, so
//! that its load (sixteen clients) runs alone and slows no other test's heartbeats.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mmts_tests::{wait_for, ClusterBuilder, StopOnDrop};

const WAIT: Duration = Duration::from_secs(60);
/// How long the returning node may take to be online again.
const CATCH_UP: Duration = Duration::from_secs(150);

/// A node that was down comes back while the others write as fast as they can (eight
/// clients on each of the two, single-row updates that rarely conflict): it gets online again
/// within a bounded time, because the members slow their commits while it catches up
/// (`multimaster.catch_up_throttle`).
#[test]
fn a_node_returning_under_a_saturating_load_gets_online() {
    const ROWS: i64 = 10_000;
    let mut cluster = ClusterBuilder::new(3)
        .set("multimaster.heartbeat_send_timeout", "100")
        .set("multimaster.heartbeat_recv_timeout", "1000")
        .start();
    for node in cluster.nodes() {
        node.execute_local("CREATE EXTENSION mmts; CREATE TABLE t(id bigint PRIMARY KEY, v bigint NOT NULL DEFAULT 0)");
    }
    cluster.wait_replicating(WAIT);
    cluster.node(1).execute(&format!("INSERT INTO t(id) SELECT generate_series(1, {ROWS})"));
    let stop = AtomicBool::new(false);
    let commits = AtomicU64::new(0);
    let (online_after, rates) = std::thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        for node in &cluster.nodes()[..2] {
            for client in 0..8 {
                let (stop, commits, connstr) = (&stop, &commits, node.connstr());
                let mut next = mmts_tests::random(node.id as u64 * 131 + client);
                scope.spawn(move || {
                    let mut c = postgres::Client::connect(&connstr, postgres::NoTls).expect("a connection");
                    while !stop.load(Ordering::Relaxed) {
                        let id = 1 + next(ROWS as u64) as i64;
                        if c.execute("UPDATE t SET v = v + 1 WHERE id = $1", &[&id]).is_ok() {
                            commits.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        }
        let rate = |seconds: u64| {
            let before = commits.load(Ordering::Relaxed);
            std::thread::sleep(Duration::from_secs(seconds));
            (commits.load(Ordering::Relaxed) - before) / seconds
        };
        let all_three = rate(3);
        cluster.node_mut(3).stop();
        let without = rate(10);
        cluster.node_mut(3).start();
        let back = Instant::now();
        wait_for("node 3 to be online again under the load", CATCH_UP, || {
            cluster.node(3).query_value("SELECT state FROM mtm.get_cluster_state()").as_deref() == Some("online")
        });
        let online_after = back.elapsed();
        let after = rate(3);
        (online_after, [all_three, without, after])
    });
    eprintln!(
        "commits/s: {} with 3 nodes, {} with node 3 down, {} after it is back; node 3 online {:.1} s after its restart",
        rates[0],
        rates[1],
        rates[2],
        online_after.as_secs_f64()
    );
    cluster.wait_replicating(WAIT);
    let sums: Vec<String> = cluster.nodes().iter().map(|n| n.query_value("SELECT sum(v) FROM t").unwrap()).collect();
    assert!(sums.iter().all(|s| *s == sums[0]), "the nodes differ: {sums:?}");
}

/// A node that comes back while another is down gets what the down node committed from the
/// node that is up (forwarded in its stream, see README "A node catching up while a peer is
/// down"): it is online, with every row and schema change, and takes writes, without waiting
/// for the down node. Once that node is back, all three are identical.
#[test]
fn a_node_catches_up_while_another_is_down() {
    let mut cluster = ClusterBuilder::new(3)
        .set("multimaster.heartbeat_send_timeout", "100")
        .set("multimaster.heartbeat_recv_timeout", "1000")
        .start();
    for node in cluster.nodes() {
        node.execute_local(
            "CREATE EXTENSION mmts; CREATE TABLE t(id bigint PRIMARY KEY, node int NOT NULL, v int NOT NULL DEFAULT 0)",
        );
    }
    cluster.wait_replicating(WAIT);
    cluster.node_mut(3).stop();
    let state = |c: &mmts_tests::Cluster, id: usize| {
        c.node(id).query_value("SELECT state FROM mtm.get_cluster_state()").unwrap_or_default()
    };
    wait_for("nodes 1 and 2 online without node 3", WAIT, || {
        state(&cluster, 1) == "online" && state(&cluster, 2) == "online"
    });
    // Each node writes rows of its own and updates the other's, so that each node's
    // transactions depend on the other's; node 2 also changes the schema half-way.
    let (mut c1, mut c2) = (cluster.node(1).connect(), cluster.node(2).connect());
    for i in 0..300i64 {
        c1.execute("INSERT INTO t(id, node) VALUES ($1, 1)", &[&(2 * i)]).expect("insert on node 1");
        c2.execute("INSERT INTO t(id, node) VALUES ($1, 2)", &[&(2 * i + 1)]).expect("insert on node 2");
        if i > 0 {
            c1.execute("UPDATE t SET v = v + 1 WHERE id = $1", &[&(2 * i - 1)]).expect("update on node 1");
            c2.execute("UPDATE t SET v = v + 10 WHERE id = $1", &[&(2 * i - 2)]).expect("update on node 2");
        }
        if i == 150 {
            c2.batch_execute("ALTER TABLE t ADD COLUMN note text NOT NULL DEFAULT 'none'")
                .expect("schema change on node 2");
        }
        if i > 150 {
            c2.execute("UPDATE t SET note = 'node 2' WHERE id = $1", &[&(2 * i + 1)]).expect("note on node 2");
        }
    }
    drop((c1, c2));
    let digest = "SELECT md5(string_agg(format('%s %s %s %s', id, node, v, note), ',' ORDER BY id)) FROM t";
    let expected = cluster.node(1).query_value(digest).expect("a digest");
    cluster.node_mut(2).stop();
    cluster.node_mut(3).start();
    let back = Instant::now();
    wait_for("node 3 online while node 2 is down", WAIT, || state(&cluster, 3) == "online");
    let online_after = back.elapsed();
    assert_eq!(cluster.node(3).query_value(digest), Some(expected.clone()), "node 3 has what nodes 1 and 2 committed");
    let forwarded: i64 = cluster.node(3).query_value("SELECT count(*) FROM mtm.forwarded").unwrap().parse().unwrap();
    assert!(forwarded >= 300, "node 3 applied node 2's transactions as node 1 forwarded them ({forwarded})");
    // It takes writes: nodes 1 and 3 are a majority, and node 1 counts node 3 as having applied
    // what it committed of node 2's without it.
    let started = Instant::now();
    let write = loop {
        match cluster.node(3).connect().execute("INSERT INTO t(id, node) VALUES (1000, 3)", &[]) {
            Ok(_) => break started.elapsed(),
            Err(e) if started.elapsed() > Duration::from_secs(10) => panic!("node 3 refuses writes: {e:?}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    eprintln!(
        "node 3 online {:.2} s after its restart with node 2 down; {forwarded} transactions forwarded; its first write took {:.2} s",
        online_after.as_secs_f64(),
        write.as_secs_f64()
    );
    cluster.node_mut(2).start();
    cluster.wait_replicating(WAIT);
    cluster.node(1).execute("INSERT INTO t(id, node) VALUES (1001, 1)");
    let digests: Vec<Option<String>> = cluster.nodes().iter().map(|n| n.query_value(digest)).collect();
    wait_for("every node to have the last write", WAIT, || {
        cluster.nodes().iter().all(|n| n.query_value("SELECT count(*) FROM t").as_deref() == Some("602"))
    });
    let digests_now: Vec<Option<String>> = cluster.nodes().iter().map(|n| n.query_value(digest)).collect();
    assert!(
        digests_now.iter().all(|d| *d == digests_now[0]),
        "the nodes differ: {digests_now:?} (before: {digests:?})"
    );
    for node in cluster.nodes() {
        wait_for(&format!("nothing prepared on node {}", node.id), WAIT, || {
            node.query_value("SELECT count(*) FROM pg_prepared_xacts").as_deref() == Some("0")
        });
    }
    let problems = cluster.log_problems(&[]);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
