//! A node catching up while another is down: the nodes that are up forward that node's
//! transactions (see README, "A node catching up while a peer is down"). A test binary of its
//! own, so that it does not run alongside the saturating load of `catch_up.rs`.

use std::time::{Duration, Instant};

use mmts_tests::{wait_for, Cluster, ClusterBuilder, Node};

const WAIT: Duration = Duration::from_secs(60);

fn state(cluster: &Cluster, id: usize) -> String {
    read(cluster.node(id), "SELECT state FROM mtm.get_cluster_state()").unwrap_or_default()
}

/// Runs `sql` until it commits: a member may refuse for a moment (55000: a heartbeat came late
/// on a busy machine; 40001: a conflict), which leaves no change.
fn write(client: &mut postgres::Client, sql: &str) {
    let started = Instant::now();
    while let Err(e) = client.batch_execute(sql) {
        let retry = matches!(e.code().map(|c| c.code()), Some("55000" | "40001"));
        assert!(retry && started.elapsed() < WAIT, "{sql}: {e:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `sql`'s one value on `node` once it answers.
fn answered(node: &Node, sql: &str) -> String {
    let mut value = None;
    wait_for(&format!("node {} to answer {sql}", node.id), WAIT, || {
        value = read(node, sql);
        value.is_some()
    });
    value.expect("an answer")
}

/// `sql`'s one value on `node`, `None` on any error (a node may refuse reads for a moment).
fn read(node: &Node, sql: &str) -> Option<String> {
    let mut c = node.try_connect(Duration::from_secs(2)).ok()?;
    c.query_one(&format!("SELECT ({sql})::text"), &[]).ok()?.get(0)
}

const DIGEST: &str = "SELECT md5(string_agg(format('%s %s %s %s', id, node, v, note), ',' ORDER BY id)) FROM t";

/// Nodes 1 and 2 write rows `rows` of their own (even and odd ids) and update each other's, so
/// that each node's transactions depend on the other's; with `alter`, node 2 adds the column
/// `note` half-way, and then sets it in its updates.
fn load(cluster: &Cluster, rows: std::ops::Range<i64>, alter: bool) {
    let (mut c1, mut c2) = (cluster.node(1).connect(), cluster.node(2).connect());
    let half = rows.start + (rows.end - rows.start) / 2;
    for i in rows.clone() {
        write(&mut c1, &format!("INSERT INTO t(id, node) VALUES ({}, 1)", 2 * i));
        write(&mut c2, &format!("INSERT INTO t(id, node) VALUES ({}, 2)", 2 * i + 1));
        if i > rows.start {
            write(&mut c1, &format!("UPDATE t SET v = v + 1 WHERE id = {}", 2 * i - 1));
            write(&mut c2, &format!("UPDATE t SET v = v + 10 WHERE id = {}", 2 * i - 2));
        }
        if alter && i == half {
            write(&mut c2, "ALTER TABLE t ADD COLUMN note text NOT NULL DEFAULT 'none'");
        }
        if !alter || i > half {
            write(&mut c2, &format!("UPDATE t SET note = 'node 2' WHERE id = {}", 2 * i + 1));
        }
    }
}

/// A node that comes back while another is down gets what the down node committed from the
/// node that is up (forwarded in its stream, see README "A node catching up while a peer is
/// down"): it is online, with every row and schema change, and takes writes, without waiting
/// for the down node. Once that node is back, all three are identical. Then the same when the
/// other node goes down only once the node is catching up.
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
    wait_for("nodes 1 and 2 online without node 3", WAIT, || {
        state(&cluster, 1) == "online" && state(&cluster, 2) == "online"
    });
    // Each node writes rows of its own and updates the other's, so that each node's
    // transactions depend on the other's; node 2 also changes the schema half-way.
    load(&cluster, 0..300, true);
    let expected = answered(cluster.node(1), DIGEST);
    cluster.node_mut(2).stop();
    cluster.node_mut(3).start();
    let back = Instant::now();
    wait_for("node 3 online while node 2 is down", WAIT, || state(&cluster, 3) == "online");
    let online_after = back.elapsed();
    assert_eq!(answered(cluster.node(3), DIGEST), expected, "node 3 has what nodes 1 and 2 committed");
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
    wait_for("every node to have every write", WAIT, || {
        cluster.nodes().iter().all(|n| read(n, "SELECT count(*) FROM t").as_deref() == Some("602"))
    });
    let digests: Vec<Option<String>> = cluster.nodes().iter().map(|n| read(n, DIGEST)).collect();
    assert!(digests.iter().all(|d| d.is_some() && *d == digests[0]), "the nodes differ: {digests:?}");
    for node in cluster.nodes() {
        wait_for(&format!("nothing prepared on node {}", node.id), WAIT, || {
            node.query_value("SELECT count(*) FROM pg_prepared_xacts").as_deref() == Some("0")
        });
    }

    // Node 3 comes back with both peers up, and node 2 crashes while node 3 catches up: what
    // node 2's stream had not brought yet, node 3 applies as node 1 forwards it.
    cluster.node_mut(3).stop();
    wait_for("nodes 1 and 2 online without node 3", WAIT, || {
        state(&cluster, 1) == "online" && state(&cluster, 2) == "online"
    });
    load(&cluster, 1000..2000, false);
    let expected = answered(cluster.node(1), DIGEST);
    let log_count =
        |log: &std::path::Path, text: &str| std::fs::read_to_string(log).unwrap_or_default().matches(text).count();
    let node_3_log = cluster.node(3).log_path();
    let streams = |n: usize| log_count(&node_3_log, &format!("mmts: streaming from node {n} from"));
    let (from_1, from_2) = (streams(1), streams(2));
    cluster.node_mut(3).start();
    wait_for("node 3 streaming from nodes 1 and 2", WAIT, || streams(1) > from_1 && streams(2) > from_2);
    cluster.node_mut(2).kill9();
    let stopped = Instant::now();
    wait_for("node 3 online after node 2 went down while it caught up", WAIT, || state(&cluster, 3) == "online");
    let online_after = stopped.elapsed();
    assert_eq!(answered(cluster.node(3), DIGEST), expected, "node 3 has what nodes 1 and 2 committed");
    let forwarded = cluster.node(3).query_value("SELECT count(*) FROM mtm.forwarded").unwrap_or_default();
    eprintln!(
        "node 3 online {:.2} s after node 2 went down while it caught up; {forwarded} transactions of node 2 applied here as node 1 forwarded them",
        online_after.as_secs_f64(),
    );
    cluster.node_mut(2).start();
    cluster.wait_replicating(WAIT);
    wait_for("every node to have every write", WAIT, || {
        cluster.nodes().iter().all(|n| read(n, DIGEST).is_some_and(|d| d == expected))
    });
    for node in cluster.nodes() {
        wait_for(&format!("nothing prepared on node {}", node.id), WAIT, || {
            node.query_value("SELECT count(*) FROM pg_prepared_xacts").as_deref() == Some("0")
        });
    }
    let problems = cluster.log_problems(Cluster::PEER_GONE);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Receivers that started before `CREATE EXTENSION mmts` read their streams again once
/// `mtm.forwarded` exists, to have what their peers forward: unnoticed by clients, whose writes
/// right after creating the extension commit at their first try on every node.
#[test]
fn creating_the_extension_interrupts_no_write() {
    let cluster = ClusterBuilder::new(3).start();
    cluster.wait_replicating(WAIT);
    for node in cluster.nodes() {
        node.execute_local("CREATE EXTENSION mmts; CREATE TABLE t(id bigint PRIMARY KEY, node int NOT NULL)");
    }
    let again = |n: &Node| {
        std::fs::read_to_string(n.log_path())
            .unwrap_or_default()
            .matches("mtm.forwarded was created: reading node")
            .count()
    };
    // A write that hangs fails the test (canceled) rather than stalling it.
    let mut clients: Vec<postgres::Client> = cluster
        .nodes()
        .iter()
        .map(|n| {
            let mut c = n.connect();
            c.batch_execute("SET statement_timeout = '30s'").unwrap();
            c
        })
        .collect();
    let started = Instant::now();
    let mut id = 0;
    // Until every receiver read its stream again, and a second more.
    let mut all_read_again: Option<Instant> = None;
    while all_read_again.is_none_or(|at| at.elapsed() < Duration::from_secs(1)) {
        assert!(started.elapsed() < WAIT, "the receivers did not read their streams again");
        for (i, client) in clients.iter_mut().enumerate() {
            id += 1;
            if let Err(e) = client.batch_execute(&format!("INSERT INTO t VALUES ({id}, {})", i + 1)) {
                panic!(
                    "node {}: write {id}, {:.2} s after CREATE EXTENSION: {}",
                    i + 1,
                    started.elapsed().as_secs_f64(),
                    mmts_tests::describe(&e)
                );
            }
        }
        if all_read_again.is_none() && cluster.nodes().iter().all(|n| again(n) >= 2) {
            all_read_again = Some(Instant::now());
        }
    }
    eprintln!("{id} writes, all committed, in {:.2} s after CREATE EXTENSION", started.elapsed().as_secs_f64());
    wait_for("every node to have every write", WAIT, || {
        cluster.nodes().iter().all(|n| read(n, "SELECT count(*) FROM t").as_deref() == Some(&id.to_string()))
    });
}
