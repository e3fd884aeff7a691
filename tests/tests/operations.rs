//! Operations: schema changes replicated inside the synchronous commit, sequences that never
//! hand out the same value on two nodes.

use std::time::Duration;

use mmts_tests::{describe, wait_for, Cluster, ClusterBuilder, Node, StopOnDrop};

const WAIT: Duration = Duration::from_secs(60);

fn start(n: usize, mode: &str) -> Cluster {
    let cluster = ClusterBuilder::new(n).set("multimaster.mode", mode).start();
    for node in cluster.nodes() {
        node.execute_local("CREATE EXTENSION mmts");
    }
    cluster.wait_replicating(WAIT);
    cluster
}

/// Nodes 1-3 running with the extension, node 4 configured to join them later.
fn three_nodes_and_one_to_join(builder: ClusterBuilder) -> Cluster {
    let cluster = builder.joining(4).start();
    for node in &cluster.nodes()[..3] {
        node.execute_local("CREATE EXTENSION mmts");
    }
    cluster.wait_replicating(WAIT);
    cluster
}

fn value(node: &Node, sql: &str) -> String {
    node.query_value(sql).unwrap_or_default()
}

fn on_every_node(cluster: &Cluster, sql: &str, expected: &str) {
    for node in cluster.nodes() {
        assert_eq!(value(node, sql), expected, "node {}: {sql}", node.id);
    }
}

fn error(node: &Node, sql: &str) -> (String, String, String) {
    let e = node.connect().batch_execute(sql).expect_err(sql);
    let db = e.as_db_error().unwrap_or_else(|| panic!("{sql}: {}", describe(&e)));
    (db.code().code().to_string(), db.message().to_string(), db.hint().unwrap_or_default().to_string())
}

/// DDL on any node is on every node when its COMMIT returns, and data written right after it
/// on any node replicates.
#[test]
fn schema_changes_run_on_every_node_in_the_same_commit() {
    let cluster = start(3, "sync");
    let (n1, n2, n3) = (cluster.node(1), cluster.node(2), cluster.node(3));

    n1.execute("CREATE TABLE t(id bigint PRIMARY KEY, v text)");
    n2.execute("INSERT INTO t VALUES (2, 'two')");
    n3.execute("ALTER TABLE t ADD COLUMN w int DEFAULT 7; CREATE INDEX t_v ON t(v)");
    n1.execute("INSERT INTO t VALUES (1, 'one', 1)");
    on_every_node(&cluster, "SELECT string_agg(id || ':' || v || ':' || w, ',' ORDER BY id) FROM t", "1:one:1,2:two:7");
    on_every_node(&cluster, "SELECT count(*) FROM pg_indexes WHERE indexname = 't_v'", "1");

    // Schema changes and rows in one transaction, a table changed between its rows, a
    // schema and the session's search_path, views, functions, comments.
    n2.execute(
        "BEGIN;
         CREATE SCHEMA app;
         SET LOCAL search_path = app, public;
         CREATE TABLE items(id int PRIMARY KEY);
         INSERT INTO items VALUES (1);
         ALTER TABLE items ADD COLUMN label text NOT NULL DEFAULT 'none';
         INSERT INTO items VALUES (2, 'b');
         CREATE VIEW labelled AS SELECT id, label FROM items WHERE label <> 'none';
         CREATE FUNCTION twice(x int) RETURNS int LANGUAGE sql AS 'SELECT 2 * x';
         COMMENT ON TABLE items IS 'made on node 2';
         COMMIT",
    );
    on_every_node(&cluster, "SELECT string_agg(id || label, ',' ORDER BY id) FROM app.items", "1none,2b");
    on_every_node(&cluster, "SELECT string_agg(label, ',') FROM app.labelled", "b");
    on_every_node(&cluster, "SELECT app.twice(21)", "42");
    on_every_node(&cluster, "SELECT obj_description('app.items'::regclass)", "made on node 2");

    // CREATE TABLE AS: the rows come once, from the node that ran it.
    n3.execute("CREATE TABLE t_copy AS SELECT id, v FROM t");
    on_every_node(&cluster, "SELECT count(*) FROM t_copy", "2");

    // Roles, privileges and ownership follow the role that ran the statement.
    n1.execute("CREATE ROLE alice LOGIN; GRANT CREATE, USAGE ON SCHEMA public TO alice");
    let mut alice = mmts_tests::postgres::Client::connect(
        &format!("host=127.0.0.1 port={} user=alice dbname=postgres", n3.port()),
        mmts_tests::postgres::NoTls,
    )
    .unwrap();
    alice.batch_execute("CREATE TABLE owned(id int PRIMARY KEY); INSERT INTO owned VALUES (1)").unwrap();
    on_every_node(&cluster, "SELECT tableowner || count(*) OVER () FROM pg_tables WHERE tablename = 'owned'", "alice1");
    n2.execute("GRANT SELECT ON t TO alice");
    on_every_node(&cluster, "SELECT has_table_privilege('alice', 't', 'SELECT')", "t");

    // Temporary objects stay on their node, and a transaction that only made one commits
    // without the peers.
    n1.execute("CREATE TEMP TABLE scratch(x int); INSERT INTO scratch VALUES (1); DROP TABLE scratch");
    n1.execute("BEGIN; CREATE TEMP TABLE scratch(x int) ON COMMIT DROP; COMMIT");

    // A statement that fails on a peer fails everywhere.
    n2.execute_local("CREATE TABLE clash(x int)");
    let (code, message, _) = error(n1, "CREATE TABLE clash(id int PRIMARY KEY)");
    assert_eq!(code, "42P07", "{message}");
    assert_eq!(value(n1, "SELECT to_regclass('clash') IS NULL"), "t");
    assert_eq!(value(n3, "SELECT to_regclass('clash') IS NULL"), "t");

    // What cannot run in a transaction on the peers is refused, unless run locally.
    let (code, message, hint) = error(n1, "CREATE INDEX CONCURRENTLY t_w ON t(w)");
    assert_eq!(code, "0A000");
    assert!(message.contains("CREATE INDEX CONCURRENTLY"), "{message}");
    assert!(hint.contains("multimaster.replicate_ddl"), "{hint}");
    for node in cluster.nodes() {
        node.execute_local("CREATE INDEX CONCURRENTLY t_w ON t(w)");
    }
    let (code, message, _) = error(n1, "EXPLAIN ANALYZE CREATE TABLE t_plan AS SELECT * FROM t");
    assert_eq!(code, "0A000", "{message}");
    assert_eq!(value(n1, "SELECT to_regclass('t_plan') IS NULL"), "t");
    on_every_node(&cluster, "SELECT count(*) FROM pg_indexes WHERE indexname = 't_w'", "1");
    // Only superusers keep schema changes local.
    let e = alice.batch_execute("SET multimaster.replicate_ddl = off").unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("42501"), "{}", describe(&e));
    // Maintenance runs where it is run.
    n1.execute("VACUUM ANALYZE t");
    n1.execute("CHECKPOINT");

    // Other databases are not replicated: their writes and schema changes stay here.
    n1.execute("CREATE DATABASE other");
    let mut other = mmts_tests::postgres::Client::connect(
        &format!("host=127.0.0.1 port={} user=postgres dbname=other", n1.port()),
        mmts_tests::postgres::NoTls,
    )
    .unwrap();
    other.batch_execute("CREATE TABLE here(id int PRIMARY KEY); INSERT INTO here VALUES (1)").unwrap();
    assert_eq!(value(n2, "SELECT count(*) FROM pg_database WHERE datname = 'other'"), "0");

    n2.execute("DROP TABLE t_copy; DROP SCHEMA app CASCADE");
    on_every_node(&cluster, "SELECT to_regclass('t_copy') IS NULL AND to_regnamespace('app') IS NULL", "t");
    on_every_node(&cluster, "SELECT count(*) FROM pg_prepared_xacts", "0");
}

/// Sequences made on any node (serial, identity, plain) hand out values of their own on each
/// node: concurrent inserts on every node never collide.
#[test]
fn serial_inserts_from_all_nodes_never_collide() {
    let cluster = start(3, "sync");
    cluster.node(2).execute(
        "CREATE TABLE s(id serial PRIMARY KEY, node int);
         CREATE TABLE i(id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, node int);
         CREATE SEQUENCE plain START 100",
    );
    for node in cluster.nodes() {
        let id = node.id;
        assert_eq!(
            value(node, "SELECT string_agg(start_value || '/' || increment_by, ',' ORDER BY sequencename) FROM pg_sequences WHERE schemaname = 'public'"),
            format!("{id}/64,{}/64,{id}/64", 99 + id),
            "node {id}"
        );
    }
    const ROWS: usize = 150;
    std::thread::scope(|scope| {
        for node in cluster.nodes() {
            scope.spawn(move || {
                let mut c = node.connect();
                for _ in 0..ROWS {
                    c.batch_execute(&format!(
                        "INSERT INTO s(node) VALUES ({0}); INSERT INTO i(node) VALUES ({0})",
                        node.id
                    ))
                    .unwrap_or_else(|e| panic!("node {}: {}", node.id, describe(&e)));
                }
            });
        }
    });
    let total = (ROWS * cluster.nodes().len()).to_string();
    for table in ["s", "i"] {
        on_every_node(&cluster, &format!("SELECT count(DISTINCT id) FROM {table}"), &total);
        // Each node's values are its own residue.
        on_every_node(&cluster, &format!("SELECT count(*) FROM {table} WHERE (id - node) % 64 <> 0"), "0");
    }
    let plain: Vec<String> = cluster.nodes().iter().map(|n| value(n, "SELECT nextval('plain')")).collect();
    assert_eq!(plain, ["100", "101", "102"]);

    // Sequences loaded from a dump say INCREMENT BY 1 (left alone): the same values on every
    // node, until mtm.alter_sequences() on each node spreads them.
    for node in cluster.nodes() {
        node.execute_local("CREATE SEQUENCE dumped INCREMENT BY 1 START 1000");
    }
    assert_eq!(value(cluster.node(1), "SELECT nextval('dumped')"), "1000");
    assert_eq!(value(cluster.node(2), "SELECT nextval('dumped')"), "1000");
    for node in cluster.nodes() {
        assert_eq!(
            value(node, "SELECT next_value FROM mtm.alter_sequences() WHERE sequence = 'dumped'::regclass"),
            (1024 + node.id).to_string()
        );
    }
    let spread: Vec<String> =
        cluster.nodes().iter().map(|n| value(n, "SELECT nextval('dumped') || ',' || nextval('dumped')")).collect();
    assert_eq!(spread, ["1025,1089", "1026,1090", "1027,1091"]);
    // A sequence made by a function: its statement is a cached plan's, run again and again
    // in one session, and spread on every node each time.
    cluster.node(1).execute(
        "CREATE FUNCTION make_seq() RETURNS bigint LANGUAGE plpgsql AS $$
         DECLARE v bigint;
         BEGIN
           CREATE SEQUENCE made START 7;
           v := nextval('made');
           DROP SEQUENCE made;
           RETURN v;
         END $$",
    );
    let mut c = cluster.node(2).connect();
    for _ in 0..5 {
        let row = c.query_one("SELECT make_seq()", &[]).unwrap_or_else(|e| panic!("{}", describe(&e)));
        assert_eq!(row.get::<_, i64>(0), 7 + 1, "node 2's first value of a sequence spread by 64, made from 7");
    }
    // mmts's own sequences and the other nodes' are untouched by a node's call.
    assert_eq!(
        value(cluster.node(1), "SELECT count(*) FROM mtm.alter_sequences() WHERE sequence::text LIKE 'mtm.%'"),
        "0"
    );
}

/// In asynchronous mode schema changes follow the rows, in order.
#[test]
fn schema_changes_replicate_in_async_mode() {
    let cluster = start(2, "async");
    cluster.node(1).execute("CREATE TABLE a(id int PRIMARY KEY); INSERT INTO a VALUES (1)");
    cluster.node(1).execute("ALTER TABLE a ADD COLUMN v text; INSERT INTO a VALUES (2, 'two')");
    // The change is applied a little later: the query on the rows must wait for the column.
    wait_for("the new column on node 2", WAIT, || {
        value(cluster.node(2), "SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass('a') AND attname = 'v'")
            == "1"
    });
    wait_for("both rows on node 2", WAIT, || {
        value(cluster.node(2), "SELECT string_agg(id || coalesce(v, '-'), ',' ORDER BY id) FROM a") == "1-,2two"
    });
}

/// An extension whose script writes rows: every node runs the script, and the rows are not
/// replicated on top of that.
#[test]
fn extensions_are_created_on_every_node_once() {
    let pg_config = std::env::var("MMTS_PG_CONFIG").unwrap_or_else(|_| "pg_config".into());
    let out = std::process::Command::new(&pg_config).arg("--sharedir").output().expect("pg_config");
    let dir = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("extension");
    let files = [
        ("mmts_test_rows.control", "default_version = '1.0'\nrelocatable = true\n"),
        (
            "mmts_test_rows--1.0.sql",
            "CREATE TABLE ext_settings(k text PRIMARY KEY, v text);\nINSERT INTO ext_settings VALUES ('mode', 'on');\n",
        ),
    ];
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("writing {name} into {}: {e}", dir.display()));
    }
    let cluster = start(3, "sync");
    cluster.node(1).execute("CREATE EXTENSION mmts_test_rows");
    on_every_node(&cluster, "SELECT string_agg(k || '=' || v, ',') FROM ext_settings", "mode=on");
    cluster.node(3).execute("INSERT INTO ext_settings VALUES ('later', 'x')");
    on_every_node(&cluster, "SELECT count(*) FROM ext_settings", "2");
    cluster.node(2).execute("DROP EXTENSION mmts_test_rows");
    on_every_node(&cluster, "SELECT to_regclass('ext_settings') IS NULL", "t");
}

/// `mtm.drop_node`: a dead node dropped, then a live one; the others keep writing with a
/// majority of the nodes left, and forget what they kept for the dropped ones.
#[test]
fn dropped_nodes_leave_the_cluster_for_good() {
    let mut cluster = start(4, "sync");
    cluster.node(1).execute("CREATE TABLE t(id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'before')");
    let (code, _, hint) = error(cluster.node(1), "SELECT mtm.drop_node(1)");
    assert_eq!(code, "22023");
    assert!(hint.contains("another node"), "{hint}");
    assert_eq!(error(cluster.node(1), "SELECT mtm.drop_node(7)").0, "22023");
    cluster.node(1).execute("CREATE ROLE bob LOGIN");
    let mut bob = mmts_tests::postgres::Client::connect(
        &format!("host=127.0.0.1 port={} user=bob dbname=postgres", cluster.node(1).port()),
        mmts_tests::postgres::NoTls,
    )
    .unwrap();
    let e = bob.batch_execute("SELECT mtm.drop_node(4)").unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("42501"), "{}", describe(&e));

    // Node 4 is gone for good: 3 of 4 nodes still write; after the drop, 2 of the 3 left do.
    cluster.node_mut(4).stop();
    cluster.node(1).execute("SELECT mtm.drop_node(4)");
    let gone = |node: &Node, id: usize| {
        wait_for(&format!("node {} forgetting node {id}", node.id), WAIT, || {
            value(node, &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'mtm_slot_{id}'")) == "0"
                && value(node, &format!("SELECT count(*) FROM pg_replication_origin WHERE roname = 'mtm_node_{id}'"))
                    == "0"
        });
    };
    for node in &cluster.nodes()[..3] {
        gone(node, 4);
        wait_for("three nodes configured", WAIT, || {
            value(node, "SELECT nodes_configured || ' ' || members::text FROM mtm.get_cluster_state()") == "3 {1,2,3}"
        });
        assert_eq!(value(node, "SELECT state FROM mtm.get_nodes_state() WHERE node_id = 4"), "dropped");
    }
    cluster.node_mut(3).stop();
    cluster.node(2).execute("INSERT INTO t VALUES (2, 'two of three')");
    assert_eq!(value(cluster.node(1), "SELECT v FROM t WHERE id = 2"), "two of three");
    cluster.node_mut(3).start();
    // Back online as every node counts it (a membership change the nodes disagree on is
    // voted down: 40001).
    wait_for("node 3 back online on every node", WAIT, || {
        cluster.nodes()[..3]
            .iter()
            .all(|n| value(n, "SELECT state || ' ' || members::text FROM mtm.get_cluster_state()") == "online {1,2,3}")
    });

    // A live node dropped: it learns it and refuses writes; the others go on without it.
    cluster.node(2).execute("SELECT mtm.drop_node(3)");
    wait_for("node 3 knowing it is dropped", WAIT, || {
        value(cluster.node(3), "SELECT state FROM mtm.get_cluster_state()") == "dropped"
    });
    let (code, message, _) = error(cluster.node(3), "INSERT INTO t VALUES (3, 'from a dropped node')");
    assert_eq!(code, "55000");
    assert!(message.contains("dropped"), "{message}");
    for node in &cluster.nodes()[..2] {
        gone(node, 3);
    }
    cluster.node(1).execute("INSERT INTO t VALUES (4, 'two of two')");
    assert_eq!(value(cluster.node(2), "SELECT count(*) FROM t"), "3");
    // A restart remembers the drops.
    cluster.node_mut(1).stop();
    cluster.node_mut(1).start();
    let both_online = || {
        cluster.nodes()[..2]
            .iter()
            .all(|n| value(n, "SELECT state || ' ' || nodes_configured FROM mtm.get_cluster_state()") == "online 2")
    };
    wait_for("nodes 1 and 2 online again", WAIT, || {
        both_online() && {
            std::thread::sleep(Duration::from_secs(1));
            both_online()
        }
    });
    cluster.node(1).execute("INSERT INTO t VALUES (5, 'after restart')");
    assert_eq!(value(cluster.node(2), "SELECT count(*) FROM t"), "4");
    assert_eq!(value(cluster.node(3), "SET multimaster.allow_stale_reads = on; SELECT count(*) FROM t"), "2");
}

/// Schema changes while the other nodes write to the same table: the change goes through
/// (retried on 40001, as any conflicting transaction), writers see only 40001 at worst, and
/// every node ends with the same rows and columns.
#[test]
fn schema_changes_under_a_write_load() {
    let cluster = start(3, "sync");
    cluster.node(1).execute("CREATE TABLE load(id bigint PRIMARY KEY, node int, v int NOT NULL DEFAULT 0)");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let written = std::sync::atomic::AtomicU64::new(0);
    let started = std::time::Instant::now();
    let mut ddl_retries = 0;
    std::thread::scope(|scope| {
        for node in &cluster.nodes()[1..] {
            let (stop, written) = (&stop, &written);
            scope.spawn(move || {
                let mut c = node.connect();
                let mut i = 0i64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    let id = i * 10 + node.id as i64;
                    match c.batch_execute(&format!("INSERT INTO load(id, node) VALUES ({id}, {})", node.id)) {
                        Ok(()) => {
                            written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(e) if e.code().map(|c| c.code()) == Some("40001") => {}
                        Err(e) => panic!("node {}: {}", node.id, describe(&e)),
                    }
                }
            });
        }
        // Writers stop however this ends (a failed assertion too).
        let _stop = StopOnDrop(&stop);
        std::thread::sleep(Duration::from_millis(500));
        for ddl in [
            "ALTER TABLE load ADD COLUMN note text",
            "CREATE INDEX load_node ON load(node)",
            "ALTER TABLE load ALTER COLUMN v SET DEFAULT 7",
        ] {
            let mut c = cluster.node(1).connect();
            loop {
                match c.batch_execute(ddl) {
                    Ok(()) => break,
                    Err(e) if e.code().map(|c| c.code()) == Some("40001") => {
                        if ddl_retries < 5 {
                            eprintln!("{ddl}: {}", describe(&e));
                        }
                        ddl_retries += 1;
                        assert!(
                            started.elapsed() < Duration::from_secs(60),
                            "{ddl}: still refused after {ddl_retries} tries: {}",
                            describe(&e)
                        );
                    }
                    Err(e) => panic!("{ddl}: {}", describe(&e)),
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    });
    eprintln!(
        "3 schema changes under load: {ddl_retries} retries, {} rows written, {:?}",
        written.load(std::sync::atomic::Ordering::Relaxed),
        started.elapsed()
    );
    let rows = written.load(std::sync::atomic::Ordering::Relaxed).to_string();
    let summary = "SELECT count(*) || ' ' || count(*) FILTER (WHERE v = 7) || ' ' || \
                   (SELECT count(*) FROM pg_indexes WHERE indexname = 'load_node') || ' ' || \
                   (SELECT count(*) FROM information_schema.columns WHERE table_name = 'load' AND column_name = 'note') \
                   FROM load";
    let first = value(cluster.node(1), summary);
    assert!(first.starts_with(&format!("{rows} ")), "{first}: {rows} rows acknowledged");
    on_every_node(&cluster, summary, &first);
}

/// A fourth node joins a running 3-node cluster while all three take writes: added on node 1,
/// copied from it with pg_basebackup, let go at a join point; it ends with every row any node
/// acknowledged, as every other node does, and takes writes itself. Then a node is dropped
/// and the three left go on.
#[test]
fn a_node_joins_under_a_write_load() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut cluster = three_nodes_and_one_to_join(ClusterBuilder::new(4));
    let seed_rows: i64 = std::env::var("MMTS_JOIN_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    cluster.node(1).execute(&format!(
        "CREATE TABLE load(id bigint PRIMARY KEY, node int NOT NULL, v text NOT NULL);
         INSERT INTO load SELECT -g, 0, md5(g::text) FROM generate_series(1, {seed_rows}) g;
         CREATE TABLE hot(id int PRIMARY KEY, v bigint NOT NULL);
         INSERT INTO hot SELECT g, 0 FROM generate_series(1, 5) g;
         CREATE TABLE s(id serial PRIMARY KEY, node int NOT NULL);
         INSERT INTO s(node) SELECT 1 FROM generate_series(1, 5)"
    ));
    let seed_size = value(cluster.node(1), "SELECT pg_size_pretty(pg_database_size('postgres'))");
    cluster.node(1).execute("CREATE ROLE carol LOGIN");
    let mut carol = mmts_tests::postgres::Client::connect(
        &format!("host=127.0.0.1 port={} user=carol dbname=postgres", cluster.node(1).port()),
        mmts_tests::postgres::NoTls,
    )
    .unwrap();
    for sql in ["SELECT mtm.add_node('host=127.0.0.1')", "SELECT mtm.join_node(4)"] {
        let e = carol.batch_execute(sql).unwrap_err();
        assert_eq!(e.code().map(|c| c.code()), Some("42501"), "{sql}: {}", describe(&e));
    }
    assert_eq!(error(cluster.node(1), "SELECT mtm.add_node('hots=node4')").0, "22023");
    assert_eq!(error(cluster.node(1), "SELECT mtm.join_node(3)").0, "55000");

    let stop = AtomicBool::new(false);
    let acknowledged = std::sync::Mutex::new(Vec::<i64>::new());
    // Updates of a few rows from every node: conflicts, and transactions set aside for locks.
    let increments = std::sync::atomic::AtomicI64::new(0);
    let joined = std::thread::scope(|scope| {
        let writer = |node: &Node| {
            let (stop, acknowledged) = (&stop, &acknowledged);
            let id = node.id as i64;
            let mut c = node.connect();
            move || {
                let mut i = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let key = id * 1_000_000_000 + i;
                    match c.batch_execute(&format!("INSERT INTO load VALUES ({key}, {id}, 'x')")) {
                        Ok(()) => acknowledged.lock().unwrap().push(key),
                        // A conflict, or the node not online for a moment while the new one joins.
                        Err(e) if matches!(e.code().map(|c| c.code()), Some("40001" | "55000")) => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => panic!("node {id}: {}", describe(&e)),
                    }
                }
            }
        };
        let _stop = StopOnDrop(&stop);
        let updater = |node: &Node| {
            let (stop, increments) = (&stop, &increments);
            let id = node.id;
            let mut c = node.connect();
            move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    match c.batch_execute(&format!("UPDATE hot SET v = v + 1 WHERE id = {}", (i + id) % 5 + 1)) {
                        Ok(()) => {
                            increments.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if matches!(e.code().map(|c| c.code()), Some("40001" | "40P01" | "55000")) => {}
                        Err(e) => panic!("node {id}: {}", describe(&e)),
                    }
                }
            }
        };
        for node in &cluster.nodes()[..3] {
            scope.spawn(writer(node));
            scope.spawn(updater(node));
        }
        std::thread::sleep(Duration::from_millis(500));
        let started = std::time::Instant::now();
        let conn4 = cluster.node(4).connstr();
        assert_eq!(value(cluster.node(1), &format!("SELECT mtm.add_node('{conn4}')")), "4");
        cluster.copy_node(
            4,
            1,
            &[("recovery_target_name", "'mtm_join_4_from_1'"), ("recovery_target_action", "'promote'")],
        );
        cluster.node_mut(4).start();
        let copied = started.elapsed();
        let at = value(cluster.node(1), "SELECT mtm.join_node(4)");
        assert!(at.contains('/'), "join point {at}");
        let all_four = || {
            cluster.nodes().iter().all(|n| {
                value(n, "SELECT state || ' ' || members::text FROM mtm.get_cluster_state()") == "online {1,2,3,4}"
            })
        };
        wait_for("all four nodes online members", WAIT, all_four);
        let joined = started.elapsed();
        eprintln!(
            "node 4 joined a {seed_size} database under load: copied and started after {copied:?}, online on all nodes after {joined:?}"
        );
        scope.spawn(writer(cluster.node(4)));
        std::thread::sleep(Duration::from_secs(2));
        joined
    });
    let acknowledged = acknowledged.into_inner().unwrap();
    assert!(acknowledged.iter().any(|k| k / 1_000_000_000 == 4), "node 4 wrote nothing");
    let summary = "SELECT count(*) || ' ' || sum(id) || ' ' || md5(string_agg(id || v, ',' ORDER BY id)) FROM load";
    let first = value(cluster.node(1), summary);
    wait_for("every node with the same rows", WAIT, || cluster.nodes().iter().all(|n| value(n, summary) == first));
    let expected: i64 = seed_rows + acknowledged.len() as i64;
    let rows: i64 = value(cluster.node(4), "SELECT count(*) FROM load").parse().unwrap();
    let keys = acknowledged.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(",");
    let present = value(cluster.node(4), &format!("SELECT count(*) FROM load WHERE id IN ({keys})"));
    assert_eq!(present, acknowledged.len().to_string(), "acknowledged rows on node 4");
    assert_eq!(rows, expected, "rows on node 4: seed + acknowledged, nothing else");
    let increments = increments.into_inner().to_string();
    wait_for("every node with the same updates", WAIT, || {
        cluster.nodes().iter().all(|n| value(n, "SELECT sum(v) FROM hot") == increments)
    });
    on_every_node(&cluster, "SELECT count(*) FROM pg_prepared_xacts", "0");
    eprintln!(
        "{} rows and {increments} updates of 5 rows written under load; join took {joined:?}",
        acknowledged.len()
    );
    // The copy's sequences hand out node 4's values, not node 1's.
    for id in [1, 4] {
        for _ in 0..20 {
            cluster.node(id).execute(&format!("INSERT INTO s(node) VALUES ({id})"));
        }
    }
    on_every_node(&cluster, "SELECT count(DISTINCT id) FROM s", "45");
    on_every_node(&cluster, "SELECT count(*) FROM s WHERE id % 64 <> node", "0");

    // Node 2 stops for good and is dropped: the three left write and replicate.
    cluster.node_mut(2).stop();
    cluster.node(4).execute("SELECT mtm.drop_node(2)");
    for id in [1, 3, 4] {
        wait_for("three nodes configured", WAIT, || {
            value(cluster.node(id), "SELECT nodes_configured || ' ' || members::text FROM mtm.get_cluster_state()")
                == "3 {1,3,4}"
        });
    }
    for id in [1, 3, 4] {
        cluster
            .node(id)
            .execute(&format!("INSERT INTO load VALUES ({}, {id}, 'after the drop')", -10_000_000_000 - id as i64));
    }
    for id in [1, 3, 4] {
        assert_eq!(value(cluster.node(id), "SELECT count(*) FROM load WHERE v = 'after the drop'"), "3", "node {id}");
    }
    // A restarted node remembers the added node (not in its conn_strings) and streams from it.
    cluster.node_mut(1).stop();
    cluster.node_mut(1).start();
    wait_for("node 1 online again with nodes 3 and 4", WAIT, || {
        [1, 3, 4].iter().all(|&id| {
            value(cluster.node(id), "SELECT state || ' ' || members::text FROM mtm.get_cluster_state()")
                == "online {1,3,4}"
        })
    });
    cluster.node(4).execute("INSERT INTO load VALUES (-20000000000, 4, 'after the restart')");
    assert_eq!(value(cluster.node(1), "SELECT node FROM load WHERE id = -20000000000"), "4");
    assert_eq!(value(cluster.node(1), "SELECT state FROM mtm.get_nodes_state() WHERE node_id = 4"), "online");
}

/// The join point waits while the copied node holds a peer's transaction set aside: here node
/// 2's update waits on node 1 for a row a local transaction holds, while node 2's later
/// transactions are applied on node 1. Had the copy been taken then, its position in node 2's
/// stream would be past the update, which the cluster commits once the local transaction
/// rolls back: the new node would never get it.
#[test]
fn the_join_point_waits_for_transactions_set_aside() {
    let mut cluster = three_nodes_and_one_to_join(ClusterBuilder::new(4).set("multimaster.twopc_min_timeout", "20000"));
    cluster.node(1).execute(
        "CREATE TABLE hot(id int PRIMARY KEY, v int NOT NULL); INSERT INTO hot VALUES (1, 0);
         CREATE TABLE other(id int PRIMARY KEY)",
    );
    let conn4 = cluster.node(4).connstr();
    assert_eq!(value(cluster.node(1), &format!("SELECT mtm.add_node('{conn4}')")), "4");
    cluster.copy_node(
        4,
        1,
        &[("recovery_target_name", "'mtm_join_4_from_1'"), ("recovery_target_action", "'promote'")],
    );
    cluster.node_mut(4).start();
    // Node 1's slot for node 4 and the others' are made within a second or so.
    for id in 1..=3 {
        wait_for("the slots for node 4", WAIT, || {
            value(cluster.node(id), "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'mtm_slot_4' AND confirmed_flush_lsn IS NOT NULL") == "1"
        });
    }
    let mut holder = cluster.node(1).connect();
    holder.batch_execute("BEGIN; UPDATE hot SET v = v WHERE id = 1").unwrap();
    let (node1, node2) = (cluster.node(1), cluster.node(2));
    let (joined_at, waited) = std::thread::scope(|scope| {
        let update = scope.spawn(|| node2.connect().batch_execute("UPDATE hot SET v = v + 1 WHERE id = 1"));
        std::thread::sleep(Duration::from_millis(500));
        // Node 2's later transactions, applied on node 1 past the one set aside.
        node2.execute("INSERT INTO other VALUES (1)");
        node2.execute("INSERT INTO other VALUES (2)");
        let join = scope.spawn(|| {
            let started = std::time::Instant::now();
            (value(node1, "SELECT mtm.join_node(4)"), started.elapsed())
        });
        // The row is free again before the new node could be a member: the update commits on
        // nodes 1-3 alone, and the new node must have it from the copy or the stream.
        std::thread::sleep(Duration::from_millis(300));
        holder.batch_execute("ROLLBACK").unwrap();
        update.join().unwrap().expect("node 2's update commits once the row is free on node 1");
        join.join().unwrap()
    });
    assert!(joined_at.contains('/'), "{joined_at}");
    wait_for("node 4 online with the others", WAIT, || {
        cluster.nodes().iter().all(|n| value(n, "SELECT members::text FROM mtm.get_cluster_state()") == "{1,2,3,4}")
    });
    on_every_node(&cluster, "SELECT v || ' ' || (SELECT count(*) FROM other) FROM hot", "1 2");
    assert!(
        waited >= Duration::from_millis(250),
        "the join point was taken after {waited:?}, while the update was set aside"
    );
}

/// A copy of a node started without the join point (here: not as a standby) has that node's
/// data but not the positions that go with it: its receivers refuse to replicate, and say why.
#[test]
fn a_copy_not_made_through_a_join_point_does_not_replicate() {
    let mut cluster = three_nodes_and_one_to_join(ClusterBuilder::new(4));
    cluster.node(1).execute("CREATE TABLE t(id int PRIMARY KEY)");
    let conn4 = cluster.node(4).connstr();
    assert_eq!(value(cluster.node(1), &format!("SELECT mtm.add_node('{conn4}')")), "4");
    cluster.copy_node(4, 1, &[]);
    std::fs::remove_file(cluster.node(4).data_dir().join("standby.signal")).expect("a standby copy");
    cluster.node_mut(4).start();
    let log = cluster.node(4).log_path();
    wait_for("node 4 refusing to replicate", WAIT, || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("was not made through a join point")
    });
    cluster.node(1).execute("INSERT INTO t VALUES (1)");
    std::thread::sleep(Duration::from_secs(1));
    // What it has (it is not online, so reads of replicated tables need the session's consent).
    assert_eq!(value(cluster.node(4), "SET multimaster.allow_stale_reads = on; SELECT count(*) FROM t"), "0");
    assert_ne!(value(cluster.node(4), "SELECT state FROM mtm.get_cluster_state()"), "online");
    for id in 1..=3 {
        assert_eq!(
            value(cluster.node(id), "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'mmts_node_4'"),
            "0",
            "node 4 streams from node {id}"
        );
    }
}
