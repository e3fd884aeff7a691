//! The `mmts` output plugin on servers that do not preload mmts: stock subscriptions on slots made with
//! `pg_create_logical_replication_slot(.., 'mmts')` replicate like pgoutput, and nothing that
//! carries a replication origin is sent on, so bidirectional meshes do not loop. The mmts
//! protocol (option `mmts_protocol`) carries every kind of change in `mmts_core::wire` frames.

use std::time::{Duration, Instant};

use mmts_core::wire::{self, Message, Value};
use mmts_tests::{wait_for, Cluster, ClusterBuilder, Node};

const WAIT: Duration = Duration::from_secs(60);

fn count(node: &Node, sql: &str) -> i64 {
    node.query_value(sql).and_then(|v| v.parse().ok()).unwrap_or(-1)
}

/// Plain servers that load mmts only as an output plugin (not in shared_preload_libraries).
fn servers(n: usize) -> Cluster {
    ClusterBuilder::new(n)
        .multimaster(false)
        .proxies(false)
        .set("shared_preload_libraries", "''")
        .set("logical_decoding_work_mem", "64kB")
        .start()
}

/// Node `sub` subscribes to publication `publication` of node `publ` through a slot made on
/// `publ` with `plugin`. `options` are extra subscription options.
fn subscribe(cluster: &Cluster, publ: usize, sub: usize, plugin: &str, publication: &str, options: &str) -> String {
    let slot = format!("sub_{sub}_from_{publ}");
    let two_phase = options.contains("two_phase = true");
    cluster
        .node(publ)
        .execute(&format!("SELECT pg_create_logical_replication_slot('{slot}', '{plugin}', false, {two_phase})"));
    cluster.node(sub).execute(&format!(
        "CREATE SUBSCRIPTION {slot} CONNECTION '{}' PUBLICATION {publication} \
         WITH (create_slot = false, slot_name = '{slot}', copy_data = false{options})",
        cluster.node(publ).connstr()
    ));
    slot
}

/// Every node publishes table `t` and subscribes to every other node.
fn mesh(cluster: &Cluster, plugin: &str) {
    for node in cluster.nodes() {
        node.execute("CREATE TABLE t(node int, k int, payload text); CREATE PUBLICATION pub FOR TABLE t");
    }
    for a in cluster.nodes() {
        for b in cluster.nodes() {
            if a.id != b.id {
                subscribe(cluster, a.id, b.id, plugin, "pub", "");
            }
        }
    }
}

/// Bytes and transactions each logical slot has decoded and sent, as PostgreSQL counts them.
fn slot_stats(node: &Node) -> Vec<(String, i64)> {
    let mut client = node.connect();
    client
        .query("SELECT slot_name::text, total_txns FROM pg_stat_replication_slots ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn mesh_under_load(n: usize) {
    const ROWS: i64 = 10_000;
    const TXNS: i64 = 100;
    let cluster = servers(n);
    mesh(&cluster, "mmts");
    let started = Instant::now();
    std::thread::scope(|s| {
        for node in cluster.nodes() {
            s.spawn(move || {
                let mut client = node.connect();
                for t in 0..TXNS {
                    let per = ROWS / TXNS;
                    client
                        .execute(
                            "INSERT INTO t SELECT $1, g, md5(g::text) FROM generate_series($2::int, $3::int) g",
                            &[&(node.id as i32), &((t * per) as i32), &((t * per + per - 1) as i32)],
                        )
                        .unwrap();
                }
            });
        }
    });
    let total = ROWS * n as i64;
    for node in cluster.nodes() {
        wait_for(&format!("all {total} rows on node {}", node.id), WAIT, || {
            count(node, "SELECT count(*) FROM t") >= total
        });
    }
    eprintln!("{n} nodes: {total} rows everywhere after {:?}", started.elapsed());
    // Give a loop, if there were one, time to show: every slot caught up, then counts again.
    for node in cluster.nodes() {
        wait_for("slots caught up", WAIT, || {
            count(
                node,
                "SELECT count(*) FROM pg_replication_slots WHERE confirmed_flush_lsn < pg_current_wal_lsn() - 0",
            ) == 0
        });
    }
    std::thread::sleep(Duration::from_secs(1));
    for node in cluster.nodes() {
        assert_eq!(count(node, "SELECT count(*) FROM t"), total, "node {} has duplicates: a loop", node.id);
        assert_eq!(count(node, "SELECT count(DISTINCT (node, k)) FROM t"), total);
        for origin in cluster.nodes() {
            assert_eq!(count(node, &format!("SELECT count(*) FROM t WHERE node = {}", origin.id)), ROWS);
        }
    }
    // Each walsender sent its own node's transactions only: the ones a node received from
    // its peers (applied under a replication origin) were filtered out. Statistics are
    // flushed lazily, so wait for them.
    for node in cluster.nodes() {
        wait_for(&format!("slot statistics on node {}", node.id), WAIT, || {
            let stats = slot_stats(node);
            stats.len() == n - 1 && stats.iter().all(|(_, txns)| *txns >= TXNS)
        });
        for (slot, txns) in slot_stats(node) {
            // TXNS writes plus a handful of unrelated transactions (statistics, catalog).
            assert!(txns < TXNS + 20, "slot {slot} on node {} sent {txns} transactions", node.id);
        }
    }
}

#[test]
fn two_node_mesh_loop_free_under_load() {
    mesh_under_load(2);
}

#[test]
fn three_node_mesh_loop_free_under_load() {
    mesh_under_load(3);
}

/// The control experiment: the same mesh on pgoutput slots loops (which is why mmts exists).
#[test]
fn pgoutput_mesh_loops() {
    let cluster = servers(2);
    mesh(&cluster, "pgoutput");
    cluster.node(1).execute("INSERT INTO t VALUES (1, 1, 'ping')");
    wait_for("the row to come back again and again", WAIT, || count(cluster.node(1), "SELECT count(*) FROM t") > 3);
}

/// Waits until `sql` gives the same rows on both nodes and returns them.
fn converge(a: &Node, b: &Node, sql: &str) -> Vec<String> {
    let want = a.query_rows(sql);
    wait_for(&format!("node {} to match node {} on {sql}", b.id, a.id), WAIT, || b.query_rows(sql) == want);
    want
}

#[test]
fn native_subscription_features() {
    let cluster = servers(2);
    let (p, s) = (cluster.node(1), cluster.node(2));
    let ddl = "CREATE TABLE pk(id int PRIMARY KEY, v text);
               CREATE TABLE full_ri(a int, b text); ALTER TABLE full_ri REPLICA IDENTITY FULL;
               CREATE TABLE typed(id int PRIMARY KEY, n numeric, ts timestamptz, arr int[], j jsonb, by bytea);
               CREATE TABLE later(id int PRIMARY KEY);
               CREATE TABLE filtered(id int PRIMARY KEY, v text);
               CREATE TABLE cols(id int PRIMARY KEY, shown text, secret text);";
    p.execute(ddl);
    s.execute(ddl);
    p.execute("CREATE PUBLICATION pub FOR TABLE pk, full_ri, typed; CREATE PUBLICATION pub_filtered FOR TABLE filtered WHERE (id > 10), cols (id, shown)");
    subscribe(&cluster, 1, 2, "mmts", "pub", ", binary = true");
    cluster.node(1).execute("SELECT pg_create_logical_replication_slot('sub_filtered', 'mmts')");
    s.execute(&format!(
        "CREATE SUBSCRIPTION sub_filtered CONNECTION '{}' PUBLICATION pub_filtered \
         WITH (create_slot = false, slot_name = 'sub_filtered', copy_data = false)",
        p.connstr()
    ));

    // Updates and deletes by primary key.
    p.execute("INSERT INTO pk SELECT g, 'v' || g FROM generate_series(1, 100) g");
    p.execute("UPDATE pk SET v = 'updated' WHERE id % 10 = 0; DELETE FROM pk WHERE id % 7 = 0; UPDATE pk SET id = id + 1000 WHERE id = 1");
    let got = converge(p, s, "SELECT id, v FROM pk ORDER BY id");
    assert_eq!(got.len(), 100 - 14);
    assert!(got.contains(&"1001|v1".to_string()));

    // Updates and deletes by replica identity FULL (no key at all).
    p.execute("INSERT INTO full_ri SELECT g % 5, 'b' || g FROM generate_series(1, 50) g");
    p.execute("UPDATE full_ri SET b = 'changed' WHERE a = 1; DELETE FROM full_ri WHERE a = 2");
    assert_eq!(converge(p, s, "SELECT a, b FROM full_ri ORDER BY a, b").len(), 40);

    // Binary mode with types whose binary form is not their text form.
    p.execute(
        "INSERT INTO typed VALUES (1, 12345.6789, '2026-01-02 03:04:05.678+00', '{1,2,NULL}', '{\"a\": [1, 2]}', '\\x00ff'),
                                  (2, NULL, NULL, NULL, NULL, NULL)",
    );
    assert_eq!(converge(p, s, "SELECT * FROM typed ORDER BY id").len(), 2);

    // TRUNCATE.
    p.execute("TRUNCATE pk");
    converge(p, s, "SELECT count(*) FROM pk");
    assert_eq!(count(s, "SELECT count(*) FROM pk"), 0);

    // Row filters (PostgreSQL 15) are honoured.
    p.execute("INSERT INTO filtered SELECT g, 'x' FROM generate_series(1, 20) g");
    wait_for("filtered rows", WAIT, || count(s, "SELECT count(*) FROM filtered") == 10);
    assert_eq!(count(s, "SELECT min(id) FROM filtered"), 11);
    // Column lists too: the unpublished column never leaves the publisher.
    p.execute("INSERT INTO cols VALUES (1, 'public', 'private')");
    wait_for("column-listed row", WAIT, || count(s, "SELECT count(*) FROM cols") == 1);
    assert_eq!(s.query_rows("SELECT id, shown, secret FROM cols"), ["1|public|NULL"]);

    // A publication change is picked up by the running walsender.
    p.execute("ALTER PUBLICATION pub ADD TABLE later");
    s.execute("ALTER SUBSCRIPTION sub_2_from_1 REFRESH PUBLICATION WITH (copy_data = false)");
    // The subscriber starts following `later` once its sync worker marks it ready.
    wait_for("table later ready", WAIT, || {
        count(s, "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'") == 0
    });
    p.execute("INSERT INTO later VALUES (1), (2)");
    wait_for("rows of the newly published table", WAIT, || count(s, "SELECT count(*) FROM later") == 2);
    p.execute("ALTER PUBLICATION pub SET (publish = 'insert')");
    p.execute("INSERT INTO pk VALUES (5000, 'kept'); UPDATE pk SET v = 'not sent' WHERE id = 5000; INSERT INTO later VALUES (3)");
    wait_for("insert after publish change", WAIT, || count(s, "SELECT count(*) FROM later") == 3);
    assert_eq!(s.query_value("SELECT v FROM pk WHERE id = 5000").as_deref(), Some("kept"));
}

#[test]
fn native_subscription_streaming_large_transaction() {
    let cluster = servers(2);
    let (p, s) = (cluster.node(1), cluster.node(2));
    for n in [p, s] {
        n.execute("CREATE TABLE big(id int PRIMARY KEY, pad text)");
    }
    p.execute("CREATE PUBLICATION pub FOR TABLE big");
    let slot = subscribe(&cluster, 1, 2, "mmts", "pub", ", streaming = on");
    // Far beyond logical_decoding_work_mem (64kB): decoded in streamed chunks.
    p.execute("INSERT INTO big SELECT g, repeat('x', 100) FROM generate_series(1, 50000) g");
    wait_for("the large transaction", WAIT, || count(s, "SELECT count(*) FROM big") == 50_000);
    wait_for("streaming statistics", WAIT, || {
        count(p, &format!("SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = '{slot}'")) > 0
    });
    // A streamed transaction that aborts leaves nothing behind.
    p.execute("BEGIN; INSERT INTO big SELECT g, 'y' FROM generate_series(50001, 90000) g; ROLLBACK");
    p.execute("INSERT INTO big VALUES (0, 'after')");
    wait_for("row after the aborted one", WAIT, || count(s, "SELECT count(*) FROM big WHERE id = 0") == 1);
    assert_eq!(count(s, "SELECT count(*) FROM big"), 50_001);
}

#[test]
fn native_subscription_two_phase() {
    let cluster = servers(2);
    let (p, s) = (cluster.node(1), cluster.node(2));
    for n in [p, s] {
        n.execute("CREATE TABLE acct(id int PRIMARY KEY, balance int)");
    }
    p.execute("CREATE PUBLICATION pub FOR TABLE acct");
    subscribe(&cluster, 1, 2, "mmts", "pub", ", two_phase = true");
    wait_for("two_phase enabled", WAIT, || {
        s.query_value("SELECT subtwophasestate FROM pg_subscription").as_deref() == Some("e")
    });

    p.execute("BEGIN; INSERT INTO acct VALUES (1, 100); PREPARE TRANSACTION 'transfer-1'");
    wait_for("prepared on the subscriber", WAIT, || count(s, "SELECT count(*) FROM pg_prepared_xacts") == 1);
    assert_eq!(count(s, "SELECT count(*) FROM acct"), 0, "a prepared transaction is not visible");
    p.execute("COMMIT PREPARED 'transfer-1'");
    wait_for("committed on the subscriber", WAIT, || count(s, "SELECT count(*) FROM acct") == 1);
    assert_eq!(count(s, "SELECT count(*) FROM pg_prepared_xacts"), 0);

    p.execute("BEGIN; INSERT INTO acct VALUES (2, 5); PREPARE TRANSACTION 'transfer-2'");
    wait_for("second prepared", WAIT, || count(s, "SELECT count(*) FROM pg_prepared_xacts") == 1);
    p.execute("ROLLBACK PREPARED 'transfer-2'");
    wait_for("rolled back on the subscriber", WAIT, || count(s, "SELECT count(*) FROM pg_prepared_xacts") == 0);
    p.execute("INSERT INTO acct VALUES (3, 1)");
    wait_for("later row", WAIT, || count(s, "SELECT count(*) FROM acct WHERE id = 3") == 1);
    assert_eq!(count(s, "SELECT count(*) FROM acct WHERE id = 2"), 0);
}

/// Decodes what slot `slot` holds in the mmts protocol (and consumes it): the same messages
/// in version 1 (a frame per message) and in this build's version (a frame per transaction).
fn mmts_changes(node: &Node, slot: &str) -> Vec<Message> {
    let mut client = node.connect();
    let mut frames = |function: &str, version: u8| -> Vec<Vec<Message>> {
        client
            .query(&format!("SELECT data FROM {function}('{slot}', NULL, NULL, 'mmts_protocol', '{version}')"), &[])
            .unwrap()
            .iter()
            .map(|r| {
                let frame = r.get::<_, &[u8]>(0);
                assert_eq!(frame[0], version, "a frame in the version negotiated");
                wire::decode_frame(frame).expect("valid frame")
            })
            .collect()
    };
    let one_each = frames("pg_logical_slot_peek_binary_changes", 1);
    let batched = frames("pg_logical_slot_get_binary_changes", wire::PROTOCOL_VERSION);
    assert!(one_each.iter().all(|f| f.len() == 1));
    let messages: Vec<Message> = one_each.into_iter().flatten().collect();
    let transactions =
        messages.iter().filter(|m| matches!(m, Message::Begin { .. } | Message::BeginPrepare { .. })).count();
    assert!(batched.len() <= messages.len() - transactions, "{} frames for {} messages", batched.len(), messages.len());
    assert_eq!(batched.into_iter().flatten().collect::<Vec<_>>(), messages);
    messages
}

#[test]
fn mmts_protocol_carries_every_change_and_filters_origins() {
    let cluster = servers(1);
    let node = cluster.node(1);
    node.execute(
        "CREATE TABLE acct(id int PRIMARY KEY, owner text, big text, gen int GENERATED ALWAYS AS (id * 2) STORED)",
    );
    node.execute("SELECT pg_create_logical_replication_slot('m', 'mmts', false, true)");
    // `big` is stored out of line (TOAST): too large and too random to compress inline.
    node.execute(
        "INSERT INTO acct VALUES (1, 'ann', (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 5000) g)),
                                (2, NULL, 'small')",
    );
    node.execute("UPDATE acct SET owner = 'bob' WHERE id = 1");
    node.execute("DELETE FROM acct WHERE id = 2");
    node.execute("SELECT pg_logical_emit_message(true, 'mtm.test', 'hello')");
    node.execute("BEGIN; INSERT INTO acct VALUES (3, 'cy', ''); PREPARE TRANSACTION 'g1'");
    node.execute("COMMIT PREPARED 'g1'");
    node.execute("TRUNCATE acct");
    // A transaction applied under a replication origin is never sent.
    node.execute(
        "SELECT pg_replication_origin_create('peer');
         SELECT pg_replication_origin_session_setup('peer');
         INSERT INTO acct VALUES (99, 'replicated', '');",
    );

    let msgs = mmts_changes(node, "m");
    let kinds: Vec<&str> = msgs
        .iter()
        .map(|m| match m {
            Message::Begin { .. } => "begin",
            Message::Commit { .. } => "commit",
            Message::Relation(_) => "relation",
            Message::Insert { .. } => "insert",
            Message::Update { .. } => "update",
            Message::Delete { .. } => "delete",
            Message::LogicalMessage { .. } => "message",
            Message::BeginPrepare { .. } => "begin_prepare",
            Message::Prepare { .. } => "prepare",
            Message::CommitPrepared { .. } => "commit_prepared",
            Message::Truncate { .. } => "truncate",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "begin",
            "relation",
            "insert",
            "insert",
            "commit", // two inserts
            "begin",
            "update",
            "commit", //
            "begin",
            "delete",
            "commit", //
            "begin",
            "message",
            "commit", //
            "begin_prepare",
            "insert",
            "prepare",
            "commit_prepared", //
            "begin",
            "relation",
            "truncate",
            "commit", // TRUNCATE invalidates the relation: described again
        ],
        "{msgs:#?}"
    );
    let Message::Relation(rel) = &msgs[1] else { unreachable!() };
    assert_eq!((rel.schema.as_str(), rel.name.as_str(), rel.replica_identity), ("public", "acct", b'd'));
    let cols: Vec<(&str, &str, bool)> =
        rel.columns.iter().map(|c| (c.name.as_str(), c.type_name.as_str(), c.key)).collect();
    assert_eq!(
        cols,
        [("id", "integer", true), ("owner", "pg_catalog.text", false), ("big", "pg_catalog.text", false)],
        "generated columns are not sent"
    );
    let Message::Insert { new, .. } = &msgs[3] else { unreachable!() };
    assert_eq!(new, &[Value::Text("2".into()), Value::Null, Value::Text("small".into())]);
    // The unchanged TOASTed column of the update is marked, not resent.
    let Message::Update { new, old, .. } = &msgs[6] else { unreachable!() };
    assert_eq!(old, &None);
    assert_eq!(new[..2], [Value::Text("1".into()), Value::Text("bob".into())]);
    assert!(matches!(new[2], Value::Unchanged), "the TOASTed column was resent");
    let Message::Delete { old, .. } = &msgs[9] else { unreachable!() };
    assert_eq!(old[0], Value::Text("2".into()));
    let Message::LogicalMessage { prefix, content, transactional, .. } = &msgs[12] else { unreachable!() };
    assert_eq!((prefix.as_str(), content.as_slice(), *transactional), ("mtm.test", &b"hello"[..], true));
    let Message::BeginPrepare { gid, .. } = &msgs[14] else { unreachable!() };
    assert_eq!(gid, "g1");
    let Message::Begin { commit_time, xid, .. } = &msgs[0] else { unreachable!() };
    assert!(*commit_time > 0 && *xid > 0);

    // Option errors are reported, not crashed on.
    let mut client = node.connect();
    let err = client
        .query("SELECT data FROM pg_logical_slot_peek_binary_changes('m', NULL, NULL, 'mmts_protocol', 'x')", &[])
        .unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "22023");
    let err = client
        .query("SELECT data FROM pg_logical_slot_peek_binary_changes('m', NULL, NULL, 'mmts_protocol', '0')", &[])
        .unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "0A000");
    for (option, value) in [("mmts_forward_notices", "maybe"), ("mmts_own_from", "x")] {
        let err = client
            .query(
                &format!("SELECT data FROM pg_logical_slot_peek_binary_changes('m', NULL, NULL, 'mmts_protocol', '2', '{option}', '{value}')"),
                &[],
            )
            .unwrap_err();
        assert_eq!(err.as_db_error().unwrap().code().code(), "22023", "{option} = {value}");
    }

    // `mmts_own_from`: this node's own transactions that end before it are left out, those
    // after it are sent whole.
    let mut spanning = node.connect();
    spanning.batch_execute("BEGIN; INSERT INTO acct VALUES (5, 'spans', '')").unwrap();
    node.execute("INSERT INTO acct VALUES (4, 'before', '')");
    let from: String = client.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).unwrap().get(0);
    spanning.batch_execute("INSERT INTO acct VALUES (6, 'spans', ''); COMMIT").unwrap();
    let mut inserted = |own_from: &str| -> Vec<String> {
        let sql = format!(
            "SELECT data FROM pg_logical_slot_peek_binary_changes('m', NULL, NULL, 'mmts_protocol', '1'{own_from})"
        );
        let frames = client.query(&sql, &[]).unwrap();
        let messages = frames.iter().flat_map(|r| wire::decode_frame(r.get::<_, &[u8]>(0)).expect("valid frame"));
        messages
            .filter_map(|m| match m {
                Message::Insert { new, .. } => Some(format!("{:?}", new[0])),
                _ => None,
            })
            .collect()
    };
    assert_eq!(inserted("").len(), 3);
    let after = inserted(&format!(", 'mmts_own_from', '{from}'"));
    assert_eq!(after.len(), 2, "only the transaction that ends after the position, whole: {after:?}");
}
