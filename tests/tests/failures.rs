//! Failures: a node cut off or killed, a link cut, a coordinator dying in the middle of a
//! commit. Nothing acknowledged is lost, nothing diverges, nothing stays in doubt.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mmts_tests::{describe, wait_for, Cluster, ClusterBuilder, Node, StopOnDrop};

const WAIT: Duration = Duration::from_secs(60);
/// How long a node that was out may take to be online again while the others keep writing at
/// full speed: it applies two streams while each member applies one, so on a machine that is
/// busy besides (CI) it catches up only as the load lets it.
const CATCH_UP: Duration = Duration::from_secs(150);
/// The cluster's heartbeat_recv_timeout in these tests.
const SILENCE: Duration = Duration::from_millis(1000);

fn start(schema: &str) -> Cluster {
    start_with(schema, &[])
}

/// `start` with more settings for every node.
fn start_with(schema: &str, settings: &[(&str, &str)]) -> Cluster {
    let mut builder = ClusterBuilder::new(3)
        .set("multimaster.heartbeat_send_timeout", "100")
        .set("multimaster.heartbeat_recv_timeout", &SILENCE.as_millis().to_string());
    for (name, value) in settings {
        builder = builder.set(name, value);
    }
    // To look at a run afterwards (stop it with mmts-cluster stop).
    if let Ok(dir) = std::env::var("MMTS_KEEP_CLUSTER") {
        builder = builder.keep_in(std::path::Path::new(&dir));
    }
    let cluster = builder.start();
    for node in cluster.nodes() {
        node.execute_local(&format!("CREATE EXTENSION mmts; {schema}"));
    }
    cluster.wait_replicating(WAIT);
    cluster
}

fn sqlstate(e: &postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

fn count(node: &Node, sql: &str) -> i64 {
    node.query_value(sql).and_then(|v| v.parse().ok()).unwrap_or(-1)
}

fn state(node: &Node) -> String {
    node.query_value("SELECT state FROM mtm.get_cluster_state()").unwrap_or_default()
}

/// Tries `sql` on `node` until it succeeds; returns how long that took.
fn until_it_works(node: &Node, sql: &str, timeout: Duration) -> Duration {
    let started = Instant::now();
    loop {
        match node.try_connect(Duration::from_secs(2)).and_then(|mut c| c.batch_execute(sql)) {
            Ok(()) => return started.elapsed(),
            Err(e) if started.elapsed() > timeout => panic!("node {}: {sql}: still failing: {e}", node.id),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Waits until `node` runs no prepared transaction any more; returns how long that took.
fn until_no_prepared(node: &Node, timeout: Duration) -> Duration {
    let started = Instant::now();
    wait_for(&format!("no prepared transactions on node {}", node.id), timeout, || {
        count(node, "SELECT count(*) FROM pg_prepared_xacts") == 0
    });
    started.elapsed()
}

/// A node cut off from the others refuses writes within about heartbeat_recv_timeout while
/// the other two go on; healed, it catches up and takes writes again.
#[test]
fn the_minority_refuses_writes_and_rejoins_when_healed() {
    let cluster = start("CREATE TABLE t(id bigint PRIMARY KEY, v text)");
    cluster.node(3).execute("INSERT INTO t VALUES (0, 'before')");
    let generation = |n: &Node| count(n, "SELECT generation FROM mtm.get_cluster_state()");
    let generation_before = generation(cluster.node(1));

    cluster.isolate(3);
    let cut = Instant::now();
    // Node 3 refuses writes, with the SQLSTATE and hint of a node out of the cluster.
    let mut c3 = cluster.node(3).connect();
    let refusal = loop {
        match c3.batch_execute("INSERT INTO t VALUES (-1, 'isolated')") {
            Err(e) if sqlstate(&e) == "55000" => break e,
            _ if cut.elapsed() > Duration::from_secs(10) => panic!("node 3 still takes writes 10 s after the cut"),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let detected = cut.elapsed();
    let db = refusal.as_db_error().expect("a server error");
    assert!(db.message().contains("does not accept writes"), "{}", db.message());
    assert!(db.hint().is_some_and(|h| h.contains("online node")), "{:?}", db.hint());
    assert_eq!(state(cluster.node(3)), "isolated");
    // Reads of replicated tables are refused there too, unless the session asks for what the
    // node has.
    let e = c3.query_one("SELECT count(*) FROM t", &[]).expect_err("a read on an isolated node");
    assert_eq!(sqlstate(&e), "55000", "{}", describe(&e));
    let db = e.as_db_error().expect("a server error");
    assert!(db.message().contains("does not answer reads"), "{}", db.message());
    assert!(db.hint().is_some_and(|h| h.contains("multimaster.allow_stale_reads")), "{:?}", db.hint());
    // COPY out reads the table without the executor: refused alike.
    let e = c3.copy_out("COPY t TO STDOUT").map(|_| ()).expect_err("COPY out on an isolated node");
    assert_eq!(sqlstate(&e), "55000", "{}", describe(&e));
    let stale: i64 = c3
        .simple_query("SET multimaster.allow_stale_reads = on; SELECT count(*) FROM t WHERE id = 0")
        .unwrap()
        .iter()
        .find_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
            _ => None,
        })
        .unwrap();
    assert_eq!(stale, 1);
    // What is not a replicated table still reads.
    assert_eq!(count(cluster.node(3), "SELECT count(*) FROM pg_class WHERE relname = 't'"), 1);
    // The majority goes on.
    let resumed = until_it_works(cluster.node(1), "INSERT INTO t VALUES (1, 'majority')", Duration::from_secs(10));
    for i in 2..=50 {
        // A member that has not heard from the other one lately (heartbeats late on a starved
        // machine) refuses for a moment, as a node unsure of the cluster must (55000): the
        // client tries again.
        until_it_works(cluster.node(1 + i % 2), &format!("INSERT INTO t VALUES ({i}, 'majority')"), WAIT);
    }
    assert_eq!(
        cluster.node(1).query_value("SELECT members::text FROM mtm.get_cluster_state()").as_deref(),
        Some("{1,2}")
    );
    assert!(generation(cluster.node(1)) > generation_before);

    cluster.heal_all();
    let healed = Instant::now();
    // Online among all three: with one link back before the other, node 3 may count itself
    // online with node 2 alone for a few milliseconds, then isolated again (see README,
    // "Limits").
    let members = |n: &Node| n.query_value("SELECT members::text FROM mtm.get_cluster_state()");
    wait_for("node 3 online again", WAIT, || {
        state(cluster.node(3)) == "online" && members(cluster.node(3)).as_deref() == Some("{1,2,3}")
    });
    let back = healed.elapsed();
    cluster.wait_replicating(WAIT);
    assert_eq!(count(cluster.node(3), "SELECT count(*) FROM t"), 51, "node 3 caught up");
    until_it_works(cluster.node(3), "INSERT INTO t VALUES (100, 'back')", Duration::from_secs(10));
    for node in cluster.nodes() {
        assert_eq!(count(node, "SELECT count(*) FROM t"), 52, "node {}", node.id);
        assert_eq!(count(node, "SELECT count(*) FROM t WHERE id = -1"), 0);
    }
    eprintln!(
        "minority: node 3 refused writes {} ms after the cut; the majority committed again after {} ms; node 3 online {} ms after healing",
        detected.as_millis(),
        resumed.as_millis(),
        back.as_millis()
    );
    assert!(detected < 5 * SILENCE, "detection took {detected:?}");
}

/// The coordinator dies after its peers prepared: the transaction ends the same way on every
/// node, committed if the coordinator had a majority's precommit, rolled back if not, with no
/// prepared transaction left, without waiting for the coordinator.
#[test]
fn a_dead_coordinators_transaction_ends_alike_everywhere() {
    let mut cluster = start("CREATE TABLE t(id bigint PRIMARY KEY, v text)");
    for (failpoint, id, committed) in [("before_commit", 1, true), ("before_precommit", 2, false)] {
        let node1 = cluster.node(1).connstr();
        let client = std::thread::spawn(move || {
            let mut c = postgres::Client::connect(&node1, postgres::NoTls).expect("connect");
            c.batch_execute(&format!("SET multimaster.failpoint = '{failpoint}'")).unwrap();
            // Ends when the node is killed.
            let _ = c.batch_execute(&format!("INSERT INTO t VALUES ({id}, '{failpoint}')"));
        });
        // (In a 3-node cluster a peer commits as soon as it accepts the precommit.)
        for node in &cluster.nodes()[1..] {
            wait_for(&format!("prepared on node {}", node.id), WAIT, || {
                count(node, "SELECT count(*) FROM pg_prepared_xacts") == 1
                    || count(node, &format!("SELECT count(*) FROM t WHERE id = {id}")) == 1
            });
        }
        // The failpoint is reached right after the votes (before_precommit) or the precommit.
        std::thread::sleep(Duration::from_millis(300));
        cluster.node_mut(1).kill9();
        let killed = Instant::now();
        let _ = client.join();
        for node in &cluster.nodes()[1..] {
            until_no_prepared(node, 10 * SILENCE);
        }
        let settled = killed.elapsed();
        let expected = i64::from(committed);
        for node in &cluster.nodes()[1..] {
            assert_eq!(
                count(node, &format!("SELECT count(*) FROM t WHERE id = {id}")),
                expected,
                "{failpoint}: node {}",
                node.id
            );
        }
        // The coordinator comes back and ends its own copy the same way.
        cluster.node_mut(1).start();
        cluster.wait_replicating(WAIT);
        until_no_prepared(cluster.node(1), WAIT);
        assert_eq!(
            count(cluster.node(1), &format!("SELECT count(*) FROM t WHERE id = {id}")),
            expected,
            "{failpoint}: node 1"
        );
        eprintln!(
            "coordinator killed at {failpoint}: {} on nodes 2 and 3 within {} ms",
            if committed { "committed" } else { "rolled back" },
            settled.as_millis()
        );
        assert!(settled < 2 * SILENCE + Duration::from_secs(3), "settling took {settled:?}");
    }
}

/// Every node restarts while a transaction is in doubt, as in a restart of the whole cluster:
/// the coordinator (node 1) stops right before its COMMIT PREPARED, after nodes 2 and 3 accepted
/// the precommit and committed (in a cluster of three a peer commits as soon as it accepts);
/// nodes 2 and 3 are killed and restarted, then node 1. Node 1 still holds the transaction
/// prepared, and nodes 2 and 3 restarted since it began: without the records they read back
/// from their log, none of the three would take part in settling it, and it would stay
/// prepared on node 1 for good. With them, nodes 2 and 3 answer that they committed it, and
/// node 1 commits it too.
#[test]
fn nodes_that_restarted_still_settle_a_transaction_in_doubt() {
    let mut cluster = start("CREATE TABLE t(id bigint PRIMARY KEY, v text)");
    let node1 = cluster.node(1).connstr();
    let client = std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&node1, postgres::NoTls).expect("connect");
        c.batch_execute("SET multimaster.failpoint = 'before_commit'").unwrap();
        // Ends when the node is killed.
        let _ = c.batch_execute("INSERT INTO t VALUES (1, 'in doubt')");
    });
    for node in &cluster.nodes()[1..] {
        wait_for(&format!("committed on node {}", node.id), WAIT, || {
            count(node, "SELECT count(*) FROM t WHERE id = 1") == 1
        });
    }
    // Nodes 2 and 3 confirmed node 1's stream past the precommit (and past a later commit:
    // a node confirms a message by where it starts): after their restart, it does not bring
    // them the precommit again.
    cluster.node(1).execute("INSERT INTO t VALUES (2, 'after it')");
    let lsn = cluster.node(1).query_value("SELECT pg_current_wal_lsn()").unwrap();
    let confirmed = format!(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_type = 'logical' AND confirmed_flush_lsn >= '{lsn}'"
    );
    wait_for("nodes 2 and 3 confirmed the precommit", WAIT, || count(cluster.node(1), &confirmed) == 2);
    // And node 1 keeps that in its slots through its own crash.
    cluster.node(1).execute_local("CHECKPOINT");
    for id in [2, 3] {
        cluster.node_mut(id).kill9();
        cluster.node_mut(id).start();
    }
    assert_eq!(count(cluster.node(1), "SELECT count(*) FROM pg_prepared_xacts"), 1, "prepared on node 1");
    cluster.node_mut(1).kill9();
    let _ = client.join();
    cluster.node_mut(1).start();
    let restarted = Instant::now();
    let settled = until_no_prepared(cluster.node(1), 10 * SILENCE + Duration::from_secs(10));
    cluster.wait_replicating(WAIT);
    for node in cluster.nodes() {
        assert_eq!(count(node, "SELECT count(*) FROM t WHERE id = 1"), 1, "node {}", node.id);
    }
    eprintln!("settled on node 1 {} ms after its restart", settled.as_millis());
    assert!(restarted.elapsed() < WAIT);
}

/// A node catching up holds a peer's transaction prepared that the cluster rolled back, and
/// cannot hear the rollback from that peer, while another peer's stream brings a commit of
/// the same row. Node 3, cut off, reads only node 2's stream. Node 1's transaction U (older)
/// and node 2's T (younger) update the same row, each held up on the other member by a table
/// lock there: U is prepared on node 1, T on node 2 and, taking no part, on node 3. Node 3's
/// link to node 2 is cut; the locks go, node 1 refuses T (U is older), node 2 rolls T back and
/// U commits. Node 3 then reads node 1's stream, where U waits for T's row lock: node 3 settles
/// T with node 1 (rolled back) instead of waiting for node 2's stream, which could take as long
/// as the cut, or for good when node 2's stream itself waits for node 1's (seen in the fault
/// history).
#[test]
fn a_node_catching_up_settles_a_transaction_it_waits_behind() {
    // Long enough that neither member gives up on the other's transaction while it waits for
    // the lock there (half of it).
    let cluster = start_with(
        "CREATE TABLE t(id bigint PRIMARY KEY, v text); CREATE TABLE t2(id bigint PRIMARY KEY); CREATE TABLE t3(id bigint PRIMARY KEY)",
        &[("multimaster.twopc_min_timeout", "30000")],
    );
    cluster.node(1).execute("INSERT INTO t VALUES (1, 'first')");
    let stale = |sql: &str| -> String {
        let rows = cluster
            .node(3)
            .connect()
            .simple_query(&format!("SET multimaster.allow_stale_reads = on; {sql}"))
            .unwrap_or_else(|e| panic!("node 3: {sql}: {}", describe(&e)));
        rows.iter()
            .find_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .unwrap_or_default()
    };
    let prepared = |id: usize| count(cluster.node(id), "SELECT count(*) FROM pg_prepared_xacts");
    wait_for("the row on node 3", WAIT, || stale("SELECT count(*) FROM t") == "1");
    cluster.isolate(3);
    wait_for("node 3 out", WAIT, || state(cluster.node(3)) != "online");
    until_it_works(cluster.node(2), "INSERT INTO t VALUES (2, 'majority')", WAIT);
    // Node 3 reads node 2's stream again, and nothing else.
    cluster.link(3, 2).heal();
    wait_for("node 2's stream on node 3", WAIT, || stale("SELECT count(*) FROM t") == "2");
    let lock = |id: usize, table: &str| {
        let mut c = cluster.node(id).connect();
        c.batch_execute(&format!("SET multimaster.replicate_ddl = off; BEGIN; LOCK TABLE {table} IN SHARE MODE"))
            .unwrap();
        c
    };
    let (mut lock1, mut lock2) = (lock(1, "t2"), lock(2, "t3"));
    let write = |id: usize, sql: &'static str| {
        let connstr = cluster.node(id).connstr();
        std::thread::spawn(move || {
            let mut c = postgres::Client::connect(&connstr, postgres::NoTls).expect("connect");
            c.batch_execute(sql)
        })
    };
    let u = write(1, "BEGIN; INSERT INTO t3 VALUES (1); UPDATE t SET v = 'U' WHERE id = 1; COMMIT");
    wait_for("U prepared on node 1", WAIT, || prepared(1) == 1);
    let t = write(2, "BEGIN; INSERT INTO t2 VALUES (1); UPDATE t SET v = 'T' WHERE id = 1; COMMIT");
    wait_for("T prepared on node 3", WAIT, || prepared(3) == 1);
    cluster.link(3, 2).cut();
    lock1.batch_execute("ROLLBACK").unwrap();
    let refused = t.join().unwrap().expect_err("T is refused by node 1");
    assert_eq!(sqlstate(&refused), "40001", "{}", describe(&refused));
    lock2.batch_execute("ROLLBACK").unwrap();
    u.join().unwrap().unwrap_or_else(|e| panic!("U: {}", describe(&e)));
    // Node 3 reads node 1's stream; node 2's stays cut.
    cluster.heal(1, 3);
    let healed = Instant::now();
    let mut v = String::new();
    while healed.elapsed() < Duration::from_secs(20) {
        v = stale("SELECT v FROM t WHERE id = 1");
        if v == "U" {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(v, "U", "node 3 still waits behind T, 20 s after it could read node 1's stream");
    let settled = healed.elapsed();
    assert_eq!(prepared(3), 0);
    cluster.heal_all();
    wait_for("node 3 online again", WAIT, || state(cluster.node(3)) == "online");
    until_it_works(cluster.node(3), "INSERT INTO t VALUES (3, 'back')", WAIT);
    for node in cluster.nodes() {
        assert_eq!(node.query_value("SELECT v FROM t WHERE id = 1").as_deref(), Some("U"), "node {}", node.id);
        assert_eq!(count(node, "SELECT count(*) FROM t"), 3, "node {}", node.id);
        assert_eq!(count(node, "SELECT count(*) FROM t2"), 0, "node {}", node.id);
        assert_eq!(count(node, "SELECT count(*) FROM t3"), 1, "node {}", node.id);
        until_no_prepared(node, WAIT);
    }
    eprintln!("node 3 applied node 1's update {} ms after it could read node 1's stream", settled.as_millis());
}

/// Transfers between accounts from every node while, every 10 s, a node is killed and
/// restarted, a node is cut off and healed, or one link is cut and healed (each kind hits each
/// node in turn). Every read on every node that answers sees the right total; the cut-off node
/// refuses writes; every fault ends with all nodes online again; at the end every acknowledged
/// transfer is on every node, no refused one is anywhere, the nodes are identical, and nothing
/// is left prepared.
///
/// 40 s by default (four faults); MMTS_FAULT_SECONDS sets the length, MMTS_FAULTS the kinds
/// (0 kill, 1 cut off, 2 link; e.g. `0,2`), MMTS_KEEP_CLUSTER=dir keeps the servers' files.
#[test]
fn bank_transfers_survive_crashes_and_partitions() {
    let seconds: u64 = std::env::var("MMTS_FAULT_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(40);
    // MMTS_FAULTS=0,1,2 picks the kinds of fault (all by default).
    let kinds: Vec<Fault> = std::env::var("MMTS_FAULTS")
        .ok()
        .map(|s| s.split(',').filter_map(|k| Fault::from_number(k.trim())).collect())
        .unwrap_or_else(|| vec![Fault::Kill9, Fault::Isolate, Fault::CutLink]);
    let started = Instant::now();
    bank_under_faults(
        |round| {
            (started.elapsed() < Duration::from_secs(seconds)).then(|| {
                // Every kind of fault hits every node in turn.
                (kinds[round % kinds.len()], 1 + (round + round / 3) % 3)
            })
        },
        Duration::from_secs(5),
    );
}

/// A node killed with -9 and restarted while all three take writes, 20 times (node 3 ten
/// times, then each node in turn): each time it is online again within [`CATCH_UP`] of its
/// restart, and nothing acknowledged is lost.
#[test]
fn a_node_killed_again_and_again_comes_back_every_time() {
    bank_under_faults(
        |round| (round < 20).then_some((Fault::Kill9, if round < 10 { 3 } else { 1 + round % 3 })),
        Duration::from_secs(2),
    );
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill9,
    Isolate,
    CutLink,
}

impl Fault {
    fn from_number(text: &str) -> Option<Fault> {
        [Fault::Kill9, Fault::Isolate, Fault::CutLink].get(text.parse::<usize>().ok()?).copied()
    }
}

/// Bank transfers from two writers and a reader on every node while `next(round)` gives the
/// next fault and its victim (`None`: stop), each fault after `pause` of load and lasting
/// `pause`; then checks totals, acknowledged and refused transfers, and identical nodes.
fn bank_under_faults(mut next: impl FnMut(usize) -> Option<(Fault, usize)>, pause: Duration) {
    const ACCOUNTS: i64 = 20;
    const TOTAL: i64 = ACCOUNTS * 1000;
    let mut cluster = start(
        "CREATE TABLE accounts(id bigint PRIMARY KEY, balance bigint NOT NULL);
         CREATE TABLE transfers(id bigint PRIMARY KEY, src bigint, dst bigint, amount bigint)",
    );
    cluster.node(1).execute(&format!("INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, {ACCOUNTS}) g"));
    let started = Instant::now();
    let ports: Vec<(usize, String)> = cluster.nodes().iter().map(|n| (n.id, n.connstr())).collect();
    let stop = AtomicBool::new(false);
    let acknowledged = Mutex::new(HashSet::new());
    let refused = Mutex::new(HashSet::new());
    let errors = Mutex::new(BTreeMap::<String, u64>::new());
    let bad_reads = Mutex::new(Vec::new());
    // Successful reads, per node.
    let reads = Mutex::new(BTreeMap::<usize, u64>::new());
    let next_id = AtomicU64::new(1);
    let mut log = Vec::new();
    std::thread::scope(|s| {
        // The clients stop however the fault schedule ends (a failed check panics in it).
        let _stop = StopOnDrop(&stop);
        for (node_id, connstr) in &ports {
            for writer in 0..2 {
                let (stop, acknowledged, refused, errors, next_id) =
                    (&stop, &acknowledged, &refused, &errors, &next_id);
                s.spawn(move || {
                    let mut next = mmts_tests::random((*node_id * 7 + writer + 1) as u64 * 0x9E37_79B9);
                    let mut rand = move |n: i64| next(n as u64) as i64;
                    let mut client: Option<postgres::Client> = None;
                    while !stop.load(Ordering::Relaxed) {
                        let Some(c) = client.as_mut().filter(|c| !c.is_closed()) else {
                            client = connect(connstr);
                            if client.is_none() {
                                std::thread::sleep(Duration::from_millis(200));
                            }
                            continue;
                        };
                        let id = next_id.fetch_add(1, Ordering::Relaxed) as i64;
                        let src = 1 + rand(ACCOUNTS);
                        let dst = 1 + (src + rand(ACCOUNTS - 1)) % ACCOUNTS;
                        let amount = 1 + rand(50);
                        let result = c.batch_execute(&format!(
                            "BEGIN;
                             UPDATE accounts SET balance = balance - {amount} WHERE id = {src};
                             UPDATE accounts SET balance = balance + {amount} WHERE id = {dst};
                             INSERT INTO transfers VALUES ({id}, {src}, {dst}, {amount});
                             COMMIT"
                        ));
                        match result {
                            Ok(()) => {
                                acknowledged.lock().unwrap().insert(id);
                            }
                            Err(e) => {
                                let code = sqlstate(&e);
                                // Refused for sure (the others may have any outcome).
                                if ["40001", "40P01", "55000"].contains(&code.as_str()) {
                                    refused.lock().unwrap().insert(id);
                                }
                                *errors
                                    .lock()
                                    .unwrap()
                                    .entry(if code.is_empty() { "connection".into() } else { code })
                                    .or_default() += 1;
                                let _ = c.batch_execute("ROLLBACK");
                                std::thread::sleep(Duration::from_millis(10));
                            }
                        }
                    }
                });
            }
            let (stop, bad_reads, reads) = (&stop, &bad_reads, &reads);
            s.spawn(move || {
                let mut client: Option<postgres::Client> = None;
                while !stop.load(Ordering::Relaxed) {
                    match client.as_mut().filter(|c| !c.is_closed()) {
                        Some(c) => {
                            if let Ok(row) = c.query_one("SELECT sum(balance)::bigint FROM accounts", &[]) {
                                *reads.lock().unwrap().entry(*node_id).or_default() += 1;
                                let total: i64 = row.get(0);
                                if total != TOTAL {
                                    bad_reads.lock().unwrap().push((*node_id, total));
                                }
                            }
                        }
                        None => client = connect(connstr),
                    }
                    std::thread::sleep(Duration::from_millis(25));
                }
            });
        }

        // The fault schedule: one fault after each `pause` of load, lasting `pause`.
        let mut round = 0;
        while let Some((fault, victim)) = next(round) {
            std::thread::sleep(pause);
            match fault {
                Fault::Kill9 => {
                    cluster.node_mut(victim).kill9();
                    std::thread::sleep(pause);
                    let restarted = Instant::now();
                    cluster.node_mut(victim).start();
                    wait_for("the restarted node online", CATCH_UP, || state(cluster.node(victim)) == "online");
                    log.push(format!(
                        "kill -9 node {victim}: online {} ms after restart",
                        restarted.elapsed().as_millis()
                    ));
                }
                Fault::Isolate => {
                    cluster.isolate(victim);
                    std::thread::sleep(pause.saturating_sub(Duration::from_secs(1)));
                    let node = cluster.node(victim);
                    let write = node
                        .try_connect(Duration::from_secs(2))
                        .and_then(|mut c| c.batch_execute("UPDATE accounts SET balance = balance WHERE id = 1"));
                    let code = write.as_ref().err().map(sqlstate).unwrap_or_default();
                    assert_eq!(code, "55000", "isolated node {victim} took a write: {write:?}");
                    std::thread::sleep(Duration::from_secs(1));
                    cluster.heal_all();
                    let healed = Instant::now();
                    wait_for("the healed node online", CATCH_UP, || state(cluster.node(victim)) == "online");
                    log.push(format!(
                        "node {victim} cut off: refused writes; online {} ms after healing",
                        healed.elapsed().as_millis()
                    ));
                }
                Fault::CutLink => {
                    let other = 1 + victim % 3;
                    cluster.cut(victim, other);
                    std::thread::sleep(pause);
                    cluster.heal_all();
                    let healed = Instant::now();
                    wait_for("all online after a link cut", CATCH_UP, || {
                        cluster.nodes().iter().all(|n| state(n) == "online")
                    });
                    log.push(format!(
                        "link {victim}-{other} cut: all online {} ms after healing",
                        healed.elapsed().as_millis()
                    ));
                }
            }
            round += 1;
        }
    });

    cluster.heal_all();
    cluster.wait_replicating(WAIT);
    for node in cluster.nodes() {
        until_no_prepared(node, WAIT);
    }
    let acknowledged = acknowledged.into_inner().unwrap();
    let refused = refused.into_inner().unwrap();
    eprintln!(
        "bank under faults: {} s, {} transfers acknowledged, errors {:?}",
        started.elapsed().as_secs(),
        acknowledged.len(),
        errors.lock().unwrap()
    );
    for line in &log {
        eprintln!("  {line}");
    }
    assert!(bad_reads.lock().unwrap().is_empty(), "reads with a wrong total: {:?}", bad_reads.lock().unwrap());
    assert!(acknowledged.len() > 100, "only {} transfers acknowledged", acknowledged.len());
    let mut snapshots = Vec::new();
    for node in cluster.nodes() {
        let mut c = node.connect();
        let ids: HashSet<i64> =
            c.query("SELECT id FROM transfers", &[]).unwrap().iter().map(|r| r.get::<_, i64>(0)).collect();
        let missing: Vec<_> = acknowledged.difference(&ids).take(10).collect();
        assert!(missing.is_empty(), "node {}: acknowledged transfers missing: {missing:?}", node.id);
        let present: Vec<_> = refused.intersection(&ids).take(10).collect();
        assert!(present.is_empty(), "node {}: refused transfers present: {present:?}", node.id);
        let accounts: Vec<(i64, i64)> = c
            .query("SELECT id, balance FROM accounts ORDER BY id", &[])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        assert_eq!(accounts.iter().map(|a| a.1).sum::<i64>(), TOTAL, "node {}", node.id);
        let mut ids: Vec<i64> = ids.into_iter().collect();
        ids.sort();
        snapshots.push((node.id, accounts, ids));
    }
    for (id, accounts, transfers) in &snapshots[1..] {
        assert_eq!(accounts, &snapshots[0].1, "accounts on node {id} differ from node 1");
        let (mine, first): (HashSet<&i64>, HashSet<&i64>) =
            (transfers.iter().collect(), snapshots[0].2.iter().collect());
        let only_here: Vec<_> = mine.difference(&first).take(10).collect();
        let only_first: Vec<_> = first.difference(&mine).take(10).collect();
        assert!(
            only_here.is_empty() && only_first.is_empty(),
            "transfers only on node {id}: {only_here:?}; only on node 1: {only_first:?}"
        );
    }
    // Final checks: every reader read, nothing is left for an operator to repair, and nothing
    // in the logs that the faults and the workload do not explain.
    let reads = reads.into_inner().unwrap();
    for node in cluster.nodes() {
        assert!(reads.get(&node.id).is_some_and(|&n| n > 0), "the reader on node {} never read: {reads:?}", node.id);
        assert_eq!(count(node, "SELECT count(*) FROM mtm.conflicts"), 0, "node {}", node.id);
    }
    let caused: Vec<&str> =
        ["could not serialize access"].into_iter().chain(Cluster::PEER_GONE.iter().copied()).collect();
    let problems = cluster.log_problems(&caused);
    assert!(problems.is_empty(), "log lines no fault explains:\n{}", problems.join("\n"));
}

fn connect(connstr: &str) -> Option<postgres::Client> {
    let mut config: postgres::Config = connstr.parse().ok()?;
    config.connect_timeout(Duration::from_secs(2));
    config.connect(postgres::NoTls).ok()
}

/// The heartbeat settings are reloadable, in the receivers too: after `pg_reload_conf()` a
/// receiver waits the new `heartbeat_recv_timeout` for a silent peer before it reconnects.
#[test]
fn a_configuration_reload_reaches_the_receivers() {
    let cluster = start("CREATE TABLE t(id bigint PRIMARY KEY)");
    let node1 = cluster.node(1);
    node1.execute("ALTER SYSTEM SET multimaster.heartbeat_recv_timeout = 1700");
    node1.execute("SELECT pg_reload_conf()");
    // The receivers look for a reload every heartbeat (100 ms).
    std::thread::sleep(Duration::from_millis(500));
    cluster.cut(1, 2);
    wait_for("node 1's receiver to give up on silent node 2", WAIT, || {
        node1.log_tail(300).contains("no message from node 2 for")
    });
    let log = node1.log_tail(300);
    assert!(log.contains("no message from node 2 for 1700 ms"), "{log}");
    cluster.heal_all();
}

/// A replicated statement that runs for several heartbeat_recv_timeouts on every node (an index
/// built over a slow expression) keeps the peers busy applying it, not gone: no node changes
/// its members, the statement commits everywhere, and writes go on meanwhile.
#[test]
fn a_long_replicated_statement_changes_no_membership() {
    let cluster = start(
        "CREATE TABLE t(id bigint PRIMARY KEY); CREATE TABLE u(id bigint PRIMARY KEY);
         CREATE FUNCTION slow(bigint) RETURNS bigint IMMUTABLE LANGUAGE sql AS 'SELECT $1 FROM pg_sleep(0.5)'",
    );
    let generation = |n: &Node| count(n, "SELECT generation FROM mtm.get_cluster_state()");
    let before: Vec<i64> = cluster.nodes().iter().map(generation).collect();
    // 8 rows: the index takes 4 s to build on each node, 4 heartbeat_recv_timeouts.
    cluster.node(1).execute("INSERT INTO t SELECT generate_series(1, 8)");
    let builder = {
        let connstr = cluster.node(1).connstr();
        std::thread::spawn(move || {
            let mut c = postgres::Client::connect(&connstr, postgres::NoTls).expect("connect node 1");
            c.batch_execute("CREATE INDEX t_slow ON t (slow(id))")
        })
    };
    let started = Instant::now();
    let mut i = 0i64;
    while !builder.is_finished() && started.elapsed() < Duration::from_secs(60) {
        i += 1;
        cluster.node(if i % 2 == 0 { 2 } else { 3 }).execute(&format!("INSERT INTO u VALUES ({i})"));
        std::thread::sleep(Duration::from_millis(100));
    }
    builder.join().unwrap().expect("the index is made");
    for (node, before) in cluster.nodes().iter().zip(before) {
        assert_eq!(generation(node), before, "node {}: members changed: {}", node.id, node.log_tail(40));
        assert_eq!(count(node, "SELECT count(*) FROM pg_indexes WHERE indexname = 't_slow'"), 1, "node {}", node.id);
        assert_eq!(count(node, "SELECT count(*) FROM u"), i, "node {}", node.id);
    }
}

/// Unmounts a tmpfs the test mounted, however the test ends.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A node whose `pg_wal` fills up (a 96 MB tmpfs, filled to the last byte) is stopped by
/// PostgreSQL (PANIC: no space left for WAL), while the other two go on taking writes. Once
/// space is freed and the node runs again, it catches up: every acknowledged write is on
/// every node, the nodes hold the same rows, nothing stays prepared. Mounting needs root; as
/// another user the test says so and passes.
#[test]
fn a_node_whose_wal_disk_fills_up_comes_back_once_space_is_freed() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("failures: skipped: mounting a tmpfs for pg_wal needs root");
        return;
    }
    let mut cluster = start("CREATE TABLE t(id bigint PRIMARY KEY, node int)");
    let wal = cluster.dir().join("node3-wal");
    std::fs::create_dir_all(&wal).unwrap();
    let node = cluster.node_mut(3);
    node.stop();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=96m", "tmpfs"])
        .arg(&wal)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("failures: skipped: cannot mount a tmpfs here");
        return;
    }
    let _unmount = Mounted(wal.clone());
    let pg_wal = node.data_dir().join("pg_wal");
    let moved = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("cp -a '{0}'/. '{1}'/ && rm -rf '{0}' && ln -s '{1}' '{0}'", pg_wal.display(), wal.display()))
        .status()
        .unwrap();
    assert!(moved.success(), "moving pg_wal to the tmpfs");
    mmts_tests::give_to_server_user(&wal);
    node.start();
    cluster.wait_replicating(WAIT);

    let stop = AtomicBool::new(false);
    let next = AtomicU64::new(1);
    let acked: Mutex<Vec<(u64, usize)>> = Mutex::new(Vec::new());
    let full_at = std::thread::scope(|scope| {
        for node in cluster.nodes() {
            let (stop, next, acked, connstr, id) = (&stop, &next, &acked, node.connstr(), node.id);
            scope.spawn(move || {
                let mut client = None;
                while !stop.load(Ordering::Relaxed) {
                    let Some(c) = client.as_mut() else {
                        client = connect(&connstr);
                        if client.is_none() {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        continue;
                    };
                    let key = next.fetch_add(1, Ordering::Relaxed);
                    match c.execute("INSERT INTO t VALUES ($1, $2)", &[&(key as i64), &(id as i32)]) {
                        Ok(_) => acked.lock().unwrap().push((key, id)),
                        Err(e) if e.is_closed() => client = None,
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_secs(2));
        // Fill the WAL disk to the last byte, then make node 3 need a new WAL segment.
        let _ = std::process::Command::new("dd")
            .args(["if=/dev/zero", "bs=1M", "status=none"])
            .arg(format!("of={}", wal.join("filler").display()))
            .status();
        let node3 = cluster.node(3);
        let full = Instant::now();
        wait_for("node 3 to run out of WAL space", WAIT, || {
            if let Ok(mut c) = node3.try_connect(Duration::from_secs(1)) {
                let _ = c.batch_execute("SELECT pg_switch_wal()");
            }
            std::fs::read_to_string(node3.log_path()).unwrap_or_default().contains("No space left on device")
        });
        let full_at = full.elapsed();
        // The other two go on without it.
        let before = acked.lock().unwrap().iter().filter(|(_, n)| *n != 3).count();
        std::thread::sleep(Duration::from_secs(4));
        let during = acked.lock().unwrap().iter().filter(|(_, n)| *n != 3).count() - before;
        assert!(during > 0, "nodes 1 and 2 took no writes while node 3's WAL disk was full");
        // Space freed: node 3 runs again (PostgreSQL may have stopped it for good).
        std::fs::remove_file(wal.join("filler")).unwrap();
        stop.store(true, Ordering::Relaxed);
        eprintln!(
            "node 3 out of WAL space {full_at:?} after the disk filled; nodes 1 and 2 took {during} writes in 4 s"
        );
        full_at
    });
    let node3 = cluster.node_mut(3);
    if node3.try_connect(Duration::from_secs(15)).is_err() {
        let _ = node3.try_start();
    }
    let back = Instant::now();
    cluster.wait_replicating(CATCH_UP);
    eprintln!("node 3 online {:?} after space was freed (full after {full_at:?})", back.elapsed());
    let acked = acked.into_inner().unwrap();
    let rows = cluster.node(1).query_rows("SELECT id || ':' || node FROM t ORDER BY id");
    for node in cluster.nodes() {
        wait_for(&format!("node {} to hold node 1's rows", node.id), WAIT, || {
            node.query_rows("SELECT id || ':' || node FROM t ORDER BY id") == rows
        });
        until_no_prepared(node, WAIT);
    }
    let have: HashSet<String> = rows.into_iter().collect();
    let lost: Vec<&(u64, usize)> = acked.iter().filter(|(k, n)| !have.contains(&format!("{k}:{n}"))).collect();
    assert!(lost.is_empty(), "acknowledged writes missing: {lost:?}");
}
