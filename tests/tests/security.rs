//! Only the cluster's own processes speak mmts's protocol: what any role can write or call —
//! logical decoding messages with any prefix, the vote channel, settings, rows of mmts's
//! tables, its functions — moves nothing on any node.

use std::time::Duration;

use mmts_core::indoubt::{Answer, Ballot, Outcome};
use mmts_core::membership::Report;
use mmts_core::twopc::{encode_batch, Key, Signal, Vote};
use mmts_core::NodeId;
use mmts_tests::{describe, wait_for, Cluster, ClusterBuilder, Node};

const WAIT: Duration = Duration::from_secs(60);

fn start() -> Cluster {
    let cluster = ClusterBuilder::new(3).start();
    for node in cluster.nodes() {
        node.execute_local(
            "CREATE EXTENSION mmts;
             CREATE TABLE t (id int PRIMARY KEY, v text);
             CREATE ROLE mallory LOGIN;
             CREATE ROLE builder LOGIN;
             CREATE SCHEMA b AUTHORIZATION builder;
             GRANT ALL ON t TO mallory, builder;",
        );
    }
    cluster.wait_replicating(WAIT);
    cluster
}

fn connect_as(node: &Node, role: &str) -> postgres::Client {
    let mut cfg: postgres::Config = node.connstr().parse().expect("connstr");
    cfg.user(role);
    cfg.connect(postgres::NoTls).unwrap_or_else(|e| panic!("cannot connect to node {} as {role}: {e}", node.id))
}

fn sqlstate(e: &postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

fn log_of(node: &Node) -> String {
    std::fs::read_to_string(node.log_path()).unwrap_or_default()
}

/// One of every kind of signal, each saying something that would harm the cluster if taken:
/// node 1's client forges them in node 1's WAL, so most speak for other nodes or for node 1.
fn forged() -> Vec<Signal> {
    let n = NodeId;
    vec![
        Signal::Ddl {
            role: "postgres".into(),
            search_path: "public".into(),
            statement: "ALTER ROLE mallory SUPERUSER".into(),
        },
        Signal::Ddl { role: "postgres".into(), search_path: "public".into(), statement: "DELETE FROM t".into() },
        // Node 1 sees nobody: if taken, the peers would count it out of the majority.
        Signal::Heartbeat {
            from: n(1),
            report: Report { sees: 1, partition: 1, members: 1, ready: false, wal_end: 0, behind: 0, applied: 0 },
            sent_at: 0,
            echo: 0,
        },
        Signal::Heartbeat {
            from: n(2),
            report: Report { sees: 2, partition: 2, members: 2, ready: false, wal_end: 0, behind: 0, applied: 0 },
            sent_at: 0,
            echo: 0,
        },
        // Node 2 gives its read lease back: if taken, the others would go on without it while
        // it may still answer reads.
        Signal::LeaseReleased { from: n(2), sent_at: i64::MAX },
        Signal::LeaseReleased { from: n(1), sent_at: i64::MAX },
        Signal::Precommit { origin: n(1), xid: 1_000_000, ts: 1, since: 1 },
        Signal::Promise { origin: n(2), xid: 5, since: 0, ballot: Ballot { round: 9, node: 1 } },
        Signal::Accept {
            origin: n(2),
            xid: 5,
            since: 0,
            ballot: Ballot { round: 9, node: 1 },
            outcome: Outcome::Abort,
        },
        Signal::Resolved { origin: n(2), xid: 5, outcome: Outcome::Abort },
        Signal::Answered { origin: n(2), xid: 5, voter: n(1), answer: Answer::Accepted },
        Signal::Vote { origin: n(2), xid: 5, voter: n(1), vote: Vote::Yes { proposal: 1 } },
        Signal::Finished { origin: n(2), xid: 5, voter: n(3), committed: true },
        Signal::Coordinated { key: Key { ts: 1, node: n(2) }, members: 0b11, after: vec![] },
        Signal::Seen { applied: vec![(n(65), 1)] },
    ]
}

/// The cluster is whole: every node online with all three members, a write on each node
/// reaches every node, nothing is left prepared, and `mallory` is no superuser anywhere.
fn cluster_is_unharmed(cluster: &Cluster, round: i32) {
    for node in cluster.nodes() {
        wait_for(&format!("node {} online with every member", node.id), WAIT, || {
            node.query_value("SELECT state || ' ' || members::text FROM mtm.get_cluster_state()").as_deref()
                == Some("online {1,2,3}")
        });
    }
    for node in cluster.nodes() {
        node.execute(&format!("INSERT INTO t VALUES ({}, 'after forgery')", round * 10 + node.id as i32));
    }
    for node in cluster.nodes() {
        assert_eq!(
            node.query_value(&format!("SELECT count(*) FROM t WHERE id BETWEEN {0} AND {0} + 9", round * 10))
                .as_deref(),
            Some("3"),
            "node {} misses writes made after the forgeries",
            node.id
        );
        assert_eq!(
            node.query_value("SELECT rolsuper::text FROM pg_roles WHERE rolname = 'mallory'").as_deref(),
            Some("false"),
            "mallory became a superuser on node {}",
            node.id
        );
        assert_eq!(node.query_value("SELECT count(*) FROM pg_prepared_xacts").as_deref(), Some("0"));
    }
}

/// `pg_logical_emit_message` (PUBLIC may execute it) with mmts's prefix and variants of it,
/// transactional and not, alone and inside a replicated write: the walsender passes none of
/// it on, and says so in the log.
#[test]
fn forged_messages_in_the_wal_move_nothing() {
    let cluster = start();
    let mut mallory = connect_as(cluster.node(1), "mallory");
    let mut builder = connect_as(cluster.node(1), "builder");
    let mut id = 100;
    for signal in forged() {
        let bytes = signal.encode();
        // A guess at a tag does not help.
        let tagged: Vec<u8> = bytes.iter().copied().chain([0u8; 16]).collect();
        for (client, content) in [(&mut mallory, &bytes), (&mut builder, &tagged)] {
            for prefix in ["mmts", "mmts ", "MMTS", "mmts_signal"] {
                for transactional in [false, true] {
                    client
                        .query_one(
                            "SELECT pg_catalog.pg_logical_emit_message($1, $2, $3::bytea)::text",
                            &[&transactional, &prefix, content],
                        )
                        .unwrap_or_else(|e| panic!("emit: {}", describe(&e)));
                }
                id += 1;
                // Inside a replicated write: the transaction must commit on every node, the
                // message must not ride along.
                let mut tx = client.transaction().expect("begin");
                tx.execute("INSERT INTO t VALUES ($1, 'carrier')", &[&id]).expect("insert");
                tx.query_one(
                    "SELECT pg_catalog.pg_logical_emit_message(true, $1, $2::bytea)::text",
                    &[&prefix, content],
                )
                .expect("emit");
                tx.commit().unwrap_or_else(|e| panic!("commit of a write carrying a forged signal: {}", describe(&e)));
            }
        }
    }
    let carriers = (id - 100).to_string();
    for node in cluster.nodes() {
        wait_for(&format!("every carrier write on node {}", node.id), WAIT, || {
            node.query_value("SELECT count(*) FROM t WHERE v = 'carrier'").as_deref() == Some(carriers.as_str())
        });
    }
    cluster_is_unharmed(&cluster, 1);
    assert!(
        log_of(cluster.node(1)).contains("that mmts did not write"),
        "node 1's walsenders did not log the forged messages they dropped"
    );
}

/// The vote channel, `mtm.deliver_signals`, is closed to every role but superusers, and even a
/// superuser's call speaks only for the node it names: signals about other nodes, unknown
/// nodes or with huge lists are dropped with a LOG line.
#[test]
fn the_vote_channel_is_for_nodes_only() {
    let cluster = start();
    let batch = encode_batch(&forged());
    let mut mallory = connect_as(cluster.node(2), "mallory");
    let e = mallory.query_one("SELECT mtm.deliver_signals(1, $1)", &[&batch]).expect_err("mallory delivered signals");
    assert_eq!(sqlstate(&e), "42501", "{}", describe(&e));
    // The old channel, a setting, is gone; the prefix is reserved.
    let e = mallory.batch_execute(&format!("SET multimaster.deliver_signals = '{batch}'")).expect_err("SET");
    assert!(describe(&e).contains("multimaster.deliver_signals"), "{}", describe(&e));
    for setting in ["multimaster.replicate_ddl = off", "multimaster.failpoint = 'before_commit'"] {
        let e = mallory.batch_execute(&format!("SET {setting}")).expect_err(setting);
        assert_eq!(sqlstate(&e), "42501", "SET {setting}: {}", describe(&e));
    }
    // Node 2 hears, as if from node 1, signals that speak for nodes 2 and 3, name node 65 or
    // node 0, or carry 100 nodes.
    let hostile = vec![
        Signal::Heartbeat {
            from: NodeId(3),
            report: Report { sees: 4, partition: 4, members: 4, ready: true, wal_end: 0, behind: 0, applied: 0 },
            sent_at: 0,
            echo: 0,
        },
        Signal::Vote { origin: NodeId(2), xid: 1, voter: NodeId(3), vote: Vote::Yes { proposal: 1 } },
        Signal::Vote { origin: NodeId(65), xid: 1, voter: NodeId(1), vote: Vote::Yes { proposal: 1 } },
        Signal::Finished { origin: NodeId(0), xid: 1, voter: NodeId(1), committed: true },
        Signal::Seen { applied: (0..100).map(|_| (NodeId(1), 0)).collect() },
    ];
    // A fresh session each time: each logs its first rejection at once (then one per 10 s).
    for sender in [1, 0, 65, -1] {
        let answers: String = cluster
            .node(2)
            .connect()
            .query_one("SELECT mtm.deliver_signals($1, $2)", &[&sender, &encode_batch(&hostile)])
            .unwrap_or_else(|e| panic!("deliver: {}", describe(&e)))
            .get(0);
        assert_eq!(answers, "", "node 2 answered hostile signals");
    }
    let e = cluster.node(2).connect().query_one("SELECT mtm.deliver_signals(1, 'zz')", &[]).expect_err("malformed");
    assert_eq!(sqlstate(&e), "22P02", "{}", describe(&e));
    wait_for("node 2 logs the signals it dropped", WAIT, || {
        let log = log_of(cluster.node(2));
        log.contains("it speaks for node 3 but came from node 1") && log.contains("not a node of this cluster")
    });
    cluster_is_unharmed(&cluster, 1);
}

/// Rows of mmts's tables and its functions: a role without privileges changes nothing and
/// reads no connection string; a schema change runs on every node as the role that made it.
#[test]
fn mmts_tables_and_functions_keep_their_privileges() {
    let cluster = start();
    let mut mallory = connect_as(cluster.node(1), "mallory");
    for sql in [
        "INSERT INTO mtm.local_tables VALUES ('public', 't')",
        "INSERT INTO mtm.added_nodes(node_id, conn_string) VALUES (9, 'host=evil')",
        "INSERT INTO mtm.dropped_nodes(node_id) VALUES (2)",
        "DELETE FROM mtm.local_tables",
        "SELECT * FROM mtm.conflicts",
        "SELECT * FROM mtm.added_nodes",
        // A row here would make this node skip a peer's transaction when it comes.
        "INSERT INTO mtm.forwarded(origin, xid, prepared_at) VALUES (2, 1000, 0)",
        "SELECT * FROM mtm.forwarded",
        "SELECT mtm.make_table_local('t')",
        "SELECT mtm.make_table_replicated('t')",
        "SELECT mtm.add_node('host=evil')",
        "SELECT mtm.drop_node(2)",
        "SELECT mtm.join_node(2)",
        "SELECT * FROM mtm.alter_sequences()",
        "SELECT mtm.deliver_signals(2, '')",
        "SHOW multimaster.conn_strings",
    ] {
        let e = mallory.batch_execute(sql).expect_err(sql);
        assert_eq!(sqlstate(&e), "42501", "{sql}: {}", describe(&e));
    }
    // Status for everybody, but no connection strings.
    let strings: Vec<Option<String>> = mallory
        .query("SELECT conn_string FROM mtm.get_nodes_state()", &[])
        .expect("get_nodes_state")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(strings, vec![None, None, None], "mallory read connection strings");
    let info: Option<String> = mallory
        .query_one("SELECT value FROM mtm.get_cluster_info() WHERE name = 'multimaster.conn_strings'", &[])
        .expect("get_cluster_info")
        .get(0);
    assert_eq!(info, None, "mallory read multimaster.conn_strings");
    let state: String = mallory.query_one("SELECT state FROM mtm.get_cluster_state()", &[]).expect("state").get(0);
    assert_eq!(state, "online");

    // A role with CREATE on its schema: its table is its own on every node.
    let mut builder = connect_as(cluster.node(1), "builder");
    builder.batch_execute("CREATE TABLE b.mine (id int PRIMARY KEY)").expect("create");
    for node in cluster.nodes() {
        assert_eq!(
            node.query_value("SELECT tableowner FROM pg_tables WHERE schemaname = 'b' AND tablename = 'mine'")
                .as_deref(),
            Some("builder"),
            "node {}",
            node.id
        );
    }
    // Its attempt to borrow a superuser's rights on a peer fails on its own node first.
    let e = builder.batch_execute("ALTER ROLE builder SUPERUSER").expect_err("ALTER ROLE");
    assert_eq!(sqlstate(&e), "42501");
    cluster_is_unharmed(&cluster, 1);
}
