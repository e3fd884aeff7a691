//! The multimaster mesh: with only `multimaster.*` settings, every node streams every peer's
//! writes and applies them under the peer's replication origin; nothing loops; nodes that
//! restart or crash catch up; the status functions follow peers going down and coming back.
//! These run in the asynchronous mode (`multimaster.mode = async`), where concurrent writes
//! of the same row are resolved by last writer wins; tests/sync.rs covers the default mode.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mmts_tests::{wait_for, Cluster, ClusterBuilder, Node, StopOnDrop};

const WAIT: Duration = Duration::from_secs(60);

fn count(node: &Node, sql: &str) -> i64 {
    node.query_value(sql).and_then(|v| v.parse().ok()).unwrap_or(-1)
}

/// A checksum of table `t`'s contents.
fn checksum(node: &Node) -> String {
    node.query_value("SELECT md5(coalesce(string_agg(id || ':' || v, ',' ORDER BY id), '')) FROM t").unwrap_or_default()
}

fn start(n: usize) -> Cluster {
    start_with(ClusterBuilder::new(n))
}

/// Starts an async cluster from `builder`, with the extension and table `t` on every node.
fn start_with(builder: ClusterBuilder) -> Cluster {
    let cluster = builder.set("multimaster.mode", "async").start();
    for node in cluster.nodes() {
        node.execute_local("CREATE EXTENSION mmts; CREATE TABLE t(id bigint PRIMARY KEY, v text)");
    }
    cluster.wait_replicating(WAIT);
    cluster
}

fn converged(cluster: &Cluster) {
    wait_for("identical contents on every node", WAIT, || {
        let sums: Vec<String> = cluster.nodes().iter().filter(|n| n.is_running()).map(checksum).collect();
        sums.windows(2).all(|w| w[0] == w[1])
    });
}

#[test]
fn writes_on_each_node_reach_the_others_without_loops() {
    let cluster = start(3);
    for node in cluster.nodes() {
        let mut c = node.connect();
        for k in 0..50 {
            let id = node.id as i64 * 1000 + k;
            c.execute("INSERT INTO t VALUES ($1, $2)", &[&id, &format!("from node {}", node.id)]).unwrap();
        }
        c.execute("UPDATE t SET v = v || ' (updated)' WHERE id % 2 = 0 AND id / 1000 = $1", &[&(node.id as i64)])
            .unwrap();
        c.execute("DELETE FROM t WHERE id % 5 = 0 AND id / 1000 = $1", &[&(node.id as i64)]).unwrap();
    }
    for node in cluster.nodes() {
        wait_for(&format!("node {} to have every row", node.id), WAIT, || count(node, "SELECT count(*) FROM t") == 120);
    }
    converged(&cluster);
    assert_eq!(count(cluster.node(2), "SELECT count(*) FROM t WHERE v LIKE '%(updated)'"), 3 * 20);
    // Nothing loops: a row applied from a peer is not sent on, so after a quiet second each
    // node still has each row once and each slot sent only its own node's transactions.
    std::thread::sleep(Duration::from_secs(1));
    for node in cluster.nodes() {
        assert_eq!(count(node, "SELECT count(*) FROM t"), 120);
        wait_for("slot statistics", WAIT, || {
            count(node, "SELECT min(total_txns) FROM pg_stat_replication_slots") >= 52
        });
        let most = count(node, "SELECT max(total_txns) FROM pg_stat_replication_slots");
        assert!(most < 52 + 20, "a slot on node {} sent {most} transactions for 52 local ones", node.id);
    }
    // Origins record what was applied from each peer.
    assert_eq!(count(cluster.node(1), "SELECT count(*) FROM pg_replication_origin_status WHERE remote_lsn > '0/0'"), 2);
}

#[test]
fn restarted_and_crashed_nodes_catch_up_under_load() {
    let mut cluster = start(3);
    let stop = AtomicBool::new(false);
    let acknowledged = std::thread::scope(|s| {
        // The writers stop however this ends (a node that does not restart panics here).
        let _stop = StopOnDrop(&stop);
        let writers: Vec<_> = (1..=3)
            .map(|id| {
                let node = cluster.node(id);
                let (port, stop) = (node.port(), &stop);
                s.spawn(move || {
                    let mut acked = Vec::new();
                    let mut k = 0i64;
                    while !stop.load(Ordering::SeqCst) {
                        let cfg = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2");
                        let Ok(mut c) = mmts_tests::postgres::Client::connect(&cfg, mmts_tests::postgres::NoTls) else {
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        };
                        while !stop.load(Ordering::SeqCst) {
                            let key = id as i64 * 1_000_000 + k;
                            k += 1;
                            match c.execute("INSERT INTO t VALUES ($1, 'load')", &[&key]) {
                                Ok(_) => acked.push(key),
                                Err(_) => break, // node down: reconnect
                            }
                        }
                    }
                    acked
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs(2));
        cluster.node_mut(3).stop();
        std::thread::sleep(Duration::from_secs(1));
        cluster.node_mut(3).start();
        std::thread::sleep(Duration::from_secs(1));
        cluster.node_mut(2).kill9();
        std::thread::sleep(Duration::from_secs(1));
        cluster.node_mut(2).start();
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::SeqCst);
        writers.into_iter().flat_map(|w| w.join().unwrap()).collect::<Vec<i64>>()
    });
    assert!(acknowledged.len() > 300, "the load ran: {} rows", acknowledged.len());
    let started = Instant::now();
    converged(&cluster);
    eprintln!("converged {:?} after the load stopped; {} acknowledged rows", started.elapsed(), acknowledged.len());
    for node in cluster.nodes() {
        let ids = node.query_rows("SELECT id FROM t");
        let present: std::collections::HashSet<i64> = ids.iter().map(|s| s.parse().unwrap()).collect();
        let missing = acknowledged.iter().filter(|k| !present.contains(k)).count();
        assert_eq!(missing, 0, "node {} lacks {missing} acknowledged rows", node.id);
    }
}

#[test]
fn status_functions_follow_a_peer_going_down_and_up() {
    let mut cluster = start(3);
    let state = |cluster: &Cluster, id: usize| {
        cluster.node(1).query_value(&format!("SELECT state FROM mtm.get_nodes_state() WHERE node_id = {id}")).unwrap()
    };
    assert_eq!(state(&cluster, 3), "online");
    let node1 = cluster.node(1);
    assert_eq!(
        node1
            .query_value(
                "SELECT nodes_connected || '/' || nodes_configured || ' ' || has_majority FROM mtm.get_cluster_state()"
            )
            .unwrap(),
        "3/3 true"
    );
    // Secrets never show; every user may call the status functions.
    node1.execute("CREATE ROLE watcher LOGIN");
    let mut watcher = mmts_tests::postgres::Client::connect(
        &format!("host=127.0.0.1 port={} user=watcher dbname=postgres", node1.port()),
        mmts_tests::postgres::NoTls,
    )
    .unwrap();
    let rows = watcher
        .query("SELECT node_id, receiver_connected, walsender_connected FROM mtm.get_nodes_state() ORDER BY 1", &[])
        .unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[1].get::<_, Option<bool>>(1), Some(true));
    assert_eq!(rows[1].get::<_, Option<bool>>(2), Some(true));

    cluster.node_mut(3).stop();
    let t = Instant::now();
    wait_for("node 3 reported down", Duration::from_secs(5), || state(&cluster, 3) == "unreachable");
    eprintln!("stopped peer reported down after {:?}", t.elapsed());
    let node1 = cluster.node(1);
    assert_eq!(node1.query_value("SELECT nodes_connected FROM mtm.get_cluster_state()").as_deref(), Some("2"));

    // A peer cut off by the network (no connection reset) is noticed by the heartbeat.
    cluster.isolate(2);
    let t = Instant::now();
    wait_for("node 2 reported down", Duration::from_secs(10), || state(&cluster, 2) == "unreachable");
    eprintln!("isolated peer reported down after {:?}", t.elapsed());
    cluster.heal_all();
    cluster.node_mut(3).start();
    let t = Instant::now();
    wait_for("all peers back", Duration::from_secs(30), || {
        cluster.node(1).query_value("SELECT count(*) FROM mtm.get_nodes_state() WHERE state = 'online'").as_deref()
            == Some("3")
    });
    eprintln!("peers back online after {:?}", t.elapsed());
}

#[test]
fn conflicting_updates_converge_and_are_recorded() {
    let cluster = start(3);
    cluster.node(1).execute("INSERT INTO t SELECT g, 'initial' FROM generate_series(1, 5) g");
    converged(&cluster);
    std::thread::scope(|s| {
        for node in cluster.nodes() {
            s.spawn(move || {
                let mut c = node.connect();
                for k in 0..300i64 {
                    let v = format!("node {} write {k}", node.id);
                    c.execute("UPDATE t SET v = $1 WHERE id = $2", &[&v, &(k % 5 + 1)]).unwrap();
                }
            });
        }
    });
    converged(&cluster);
    assert_eq!(count(cluster.node(1), "SELECT count(*) FROM t"), 5);
    let conflicts: i64 = cluster
        .nodes()
        .iter()
        .map(|n| count(n, "SELECT count(*) FROM mtm.conflicts WHERE kind = 'update_update'"))
        .sum();
    assert!(conflicts > 0, "concurrent updates of the same rows recorded no conflict");
    // Each node records what it resolved; the records themselves are not replicated.
    let n1 = cluster.node(1);
    assert_eq!(
        count(n1, "SELECT count(*) FROM mtm.conflicts WHERE kept NOT IN ('local', 'remote') OR remote_node = 1"),
        0
    );
    eprintln!("{conflicts} update/update conflicts resolved");
}

/// Updates of one row passed from node to node, each made after the previous one arrived:
/// every node overwrites versions the writer had seen, and records no conflict.
#[test]
fn causally_ordered_updates_are_not_conflicts() {
    let cluster = start(3);
    cluster.node(1).execute("INSERT INTO t VALUES (1, 'initial')");
    converged(&cluster);
    for k in 0..30 {
        let writer = cluster.node(k % 3 + 1);
        let v = format!("write {k} on node {}", writer.id);
        writer.connect().execute("UPDATE t SET v = $1 WHERE id = 1", &[&v]).unwrap();
        for node in cluster.nodes() {
            wait_for("the update everywhere", Duration::from_secs(30), || {
                node.query_value("SELECT v FROM t WHERE id = 1").as_deref() == Some(v.as_str())
            });
        }
    }
    for node in cluster.nodes() {
        assert_eq!(count(node, "SELECT count(*) FROM mtm.conflicts"), 0, "node {}", node.id);
    }
}

#[test]
fn tables_without_a_key_follow_the_setting() {
    // Off (the default): rows inserted into a table without a key replicate (INSERT, COPY);
    // an update or delete, which the other nodes could not find rows for, is refused.
    let cluster = start(2);
    for node in cluster.nodes() {
        node.execute_local("CREATE TABLE nokey(x int); CREATE TABLE nokey_unique(x int UNIQUE)");
    }
    let mut c1 = cluster.node(1).connect();
    c1.batch_execute("BEGIN; INSERT INTO nokey VALUES (1), (2); COMMIT").unwrap();
    c1.execute("INSERT INTO nokey VALUES ($1)", &[&3i32]).unwrap();
    c1.batch_execute("INSERT INTO nokey_unique VALUES (1) ON CONFLICT (x) DO NOTHING").unwrap();
    let mut c2 = cluster.node(2).connect();
    let mut copy = c2.copy_in("COPY nokey FROM STDIN").unwrap();
    std::io::Write::write_all(&mut copy, b"4\n5\n").unwrap();
    copy.finish().unwrap();
    // The cluster is asynchronous: the other node has the rows a little after the commits.
    for node in cluster.nodes() {
        wait_for(&format!("node {}: every inserted and copied row", node.id), WAIT, || {
            node.query_value("SELECT string_agg(x::text, ',' ORDER BY x) FROM nokey").as_deref() == Some("1,2,3,4,5")
                && count(node, "SELECT count(*) FROM nokey_unique") == 1
        });
    }
    for sql in [
        "UPDATE nokey SET x = 6 WHERE x = 1",
        "DELETE FROM nokey WHERE x = 1",
        "INSERT INTO nokey_unique VALUES (1) ON CONFLICT (x) DO UPDATE SET x = 2",
    ] {
        let err = c1.batch_execute(sql).unwrap_err();
        let db = err.as_db_error().unwrap_or_else(|| panic!("{sql}: {err}"));
        assert_eq!(db.code().code(), "55000", "{sql}");
        assert!(
            db.message()
                .contains("has no primary key or replica identity, so mmts cannot replicate updates or deletes"),
            "{sql}: {}",
            db.message()
        );
        assert!(db.hint().unwrap().contains("multimaster.ignore_tables_without_pk"));
    }
    for node in cluster.nodes() {
        assert_eq!(count(node, "SELECT count(*) FROM nokey"), 5);
        assert_eq!(count(node, "SELECT count(*) FROM nokey_unique WHERE x = 1"), 1);
    }
    cluster.node(1).execute("TRUNCATE nokey");
    wait_for("node 2 truncating nokey", WAIT, || count(cluster.node(2), "SELECT count(*) FROM nokey") == 0);
    // REPLICA IDENTITY FULL is enough.
    cluster.node(1).execute("ALTER TABLE nokey REPLICA IDENTITY FULL; INSERT INTO nokey VALUES (1), (1); DELETE FROM nokey WHERE ctid = (SELECT min(ctid) FROM nokey)");
    cluster.node(2).execute("ALTER TABLE nokey REPLICA IDENTITY FULL");
    drop(cluster);

    // On: such tables stay on the node that writes them.
    let cluster = ClusterBuilder::new(2)
        .set("multimaster.mode", "async")
        .set("multimaster.ignore_tables_without_pk", "on")
        .start();
    for node in cluster.nodes() {
        node.execute_local("CREATE TABLE nokey(x int); CREATE TABLE t(id bigint PRIMARY KEY, v text)");
    }
    cluster.wait_replicating(WAIT);
    cluster.node(1).execute("INSERT INTO nokey VALUES (1); INSERT INTO t VALUES (1, 'after')");
    wait_for("the keyed row", WAIT, || count(cluster.node(2), "SELECT count(*) FROM t") == 1);
    assert_eq!(count(cluster.node(2), "SELECT count(*) FROM nokey"), 0);
    assert_eq!(count(cluster.node(1), "SELECT count(*) FROM nokey"), 1);
    assert!(cluster
        .node(1)
        .log_tail(400)
        .contains("\"public\".\"nokey\" has no primary key or replica identity and stays local"));
}

#[test]
fn make_table_local_and_back() {
    let cluster = start(3);
    for node in cluster.nodes() {
        node.execute_local("CREATE TABLE marker(id bigint PRIMARY KEY)");
    }
    let (n1, n2, n3) = (cluster.node(1), cluster.node(2), cluster.node(3));
    // Only superusers change what is replicated.
    n1.execute("CREATE ROLE app LOGIN");
    let mut app = mmts_tests::postgres::Client::connect(
        &format!("host=127.0.0.1 port={} user=app dbname=postgres", n1.port()),
        mmts_tests::postgres::NoTls,
    )
    .unwrap();
    let err = app.batch_execute("SELECT mtm.make_table_local('t')").unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "42501");

    n1.execute("SELECT mtm.make_table_local('t')");
    for node in cluster.nodes() {
        wait_for("the local table listed everywhere", WAIT, || {
            count(node, "SELECT count(*) FROM mtm.local_tables") == 1
        });
    }
    n1.execute("INSERT INTO t VALUES (1, 'only on node 1'); INSERT INTO marker VALUES (1)");
    n2.execute("INSERT INTO t VALUES (2, 'only on node 2'); INSERT INTO marker VALUES (2)");
    for node in cluster.nodes() {
        wait_for("markers everywhere", WAIT, || count(node, "SELECT count(*) FROM marker") == 2);
    }
    assert_eq!(n1.query_rows("SELECT id FROM t"), ["1"]);
    assert_eq!(n2.query_rows("SELECT id FROM t"), ["2"]);
    assert_eq!(count(n3, "SELECT count(*) FROM t"), 0);

    n2.execute("SELECT mtm.make_table_replicated('t')");
    for node in cluster.nodes() {
        wait_for("the table unlisted everywhere", WAIT, || count(node, "SELECT count(*) FROM mtm.local_tables") == 0);
    }
    n3.execute("INSERT INTO t VALUES (3, 'replicated again')");
    for node in cluster.nodes() {
        wait_for("row 3 everywhere", WAIT, || count(node, "SELECT count(*) FROM t WHERE id = 3") == 1);
    }
}

#[test]
fn prepared_transactions_travel_as_prepared() {
    let cluster = start(2);
    let (n1, n2) = (cluster.node(1), cluster.node(2));
    n1.execute("BEGIN; INSERT INTO t VALUES (1, 'prepared'); PREPARE TRANSACTION 'app-1'");
    wait_for("prepared on node 2", WAIT, || {
        count(n2, "SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE 'mtm_1_%'") == 1
    });
    assert_eq!(count(n2, "SELECT count(*) FROM t"), 0, "a prepared transaction is not visible");
    n1.execute("COMMIT PREPARED 'app-1'");
    wait_for("committed on node 2", WAIT, || count(n2, "SELECT count(*) FROM t") == 1);
    assert_eq!(count(n2, "SELECT count(*) FROM pg_prepared_xacts"), 0);

    n1.execute("BEGIN; INSERT INTO t VALUES (2, 'rolled back'); PREPARE TRANSACTION 'app-2'");
    wait_for("second prepared on node 2", WAIT, || count(n2, "SELECT count(*) FROM pg_prepared_xacts") == 1);
    n1.execute("ROLLBACK PREPARED 'app-2'");
    wait_for("rolled back on node 2", WAIT, || count(n2, "SELECT count(*) FROM pg_prepared_xacts") == 0);
    n1.execute("INSERT INTO t VALUES (3, 'after')");
    wait_for("later row on node 2", WAIT, || count(n2, "SELECT count(*) FROM t WHERE id = 3") == 1);
    assert_eq!(count(n2, "SELECT count(*) FROM t WHERE id = 2"), 0);
}

/// `multimaster.async_batch_delay`: a walsender that has sent everything waits before it sends
/// more. A lone write goes at once; one committed during the wait follows when the wait ends.
#[test]
fn async_batches_wait_after_sending() {
    let cluster = start_with(ClusterBuilder::new(3).set("multimaster.async_batch_delay", "'1s'"));
    let (node1, node2) = (cluster.node(1), cluster.node(2));
    assert_eq!(node1.query_value("SHOW multimaster.async_batch_delay").as_deref(), Some("1s"));
    // Whatever the walsenders sent last, their wait is over.
    std::thread::sleep(Duration::from_millis(1500));
    let t = Instant::now();
    node1.execute("INSERT INTO t VALUES (1, 'lone')");
    wait_for("the lone write on node 2", WAIT, || count(node2, "SELECT count(*) FROM t") == 1);
    let lone = t.elapsed();
    let t = Instant::now();
    node1.execute("INSERT INTO t VALUES (2, 'during the wait')");
    wait_for("the second write on node 2", WAIT, || count(node2, "SELECT count(*) FROM t") == 2);
    let batched = t.elapsed();
    eprintln!("lone write on node 2 after {lone:?}, the next after {batched:?}");
    assert!(lone < Duration::from_millis(700), "a lone write waited {lone:?}");
    assert!(batched > Duration::from_millis(250), "the write during the wait went at once ({batched:?})");
}
