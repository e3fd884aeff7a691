//! Errors raised under mmts's hooks reach the client as PostgreSQL gives them, whatever the
//! server's environment says about Rust backtraces; a runaway recursion fails as fast as on a
//! plain server, and cancel and terminate always work.

use std::time::{Duration, Instant};

use mmts_tests::{describe, Cluster, ClusterBuilder};

const WAIT: Duration = Duration::from_secs(60);

fn start(backtrace: Option<&str>) -> Cluster {
    let cluster = ClusterBuilder::new(3).server_env("RUST_BACKTRACE", backtrace).start();
    for node in cluster.nodes() {
        node.execute_local(
            "CREATE EXTENSION mmts;
             CREATE TABLE t (id int PRIMARY KEY);
             CREATE FUNCTION infinite_recurse() RETURNS int LANGUAGE sql AS 'SELECT infinite_recurse()';
             CREATE FUNCTION fail() RETURNS void LANGUAGE plpgsql AS $$
               BEGIN RAISE EXCEPTION 'custom failure' USING ERRCODE = 'P0042', DETAIL = 'the detail', HINT = 'the hint'; END $$",
        );
    }
    cluster.wait_replicating(WAIT);
    cluster
}

fn checks(cluster: &Cluster) {
    let mut c = cluster.node(1).connect();
    c.batch_execute("INSERT INTO t VALUES (1)").unwrap();
    let cases: [(&str, &str, &str, Option<&str>, Option<&str>); 4] = [
        (
            "INSERT INTO t VALUES (1)",
            "23505",
            "duplicate key value violates unique constraint \"t_pkey\"",
            Some("Key (id)=(1) already exists."),
            None,
        ),
        ("SELECT 1/0", "22012", "division by zero", None, None),
        ("CREATE TABLE t (id int)", "42P07", "relation \"t\" already exists", None, None),
        ("SELECT fail()", "P0042", "custom failure", Some("the detail"), Some("the hint")),
    ];
    for (sql, code, message, detail, hint) in cases {
        for explicit in [false, true] {
            let run = if explicit { format!("BEGIN; {sql}; COMMIT") } else { sql.to_string() };
            let e = c.batch_execute(&run).expect_err(sql);
            let db = e.as_db_error().unwrap_or_else(|| panic!("{sql}: {}", describe(&e)));
            assert_eq!(
                (db.code().code(), db.message(), db.detail(), db.hint()),
                (code, message, detail, hint),
                "{run}"
            );
            c.batch_execute("ROLLBACK").unwrap();
        }
    }
    // A runaway recursion: stack depth limit exceeded, as fast as on a plain server.
    let started = Instant::now();
    let e = c.batch_execute("SELECT infinite_recurse()").expect_err("recursion");
    assert_eq!(e.code().map(|c| c.code()), Some("54001"), "{}", describe(&e));
    assert!(e.as_db_error().unwrap().detail().is_none(), "{}", describe(&e));
    assert!(started.elapsed() < Duration::from_secs(10), "recursion failed after {:?}", started.elapsed());
    // Cancel and terminate reach a backend that waits inside a write transaction.
    for (call, code) in [("pg_cancel_backend", "57014"), ("pg_terminate_backend", "57P01")] {
        let mut victim = cluster.node(1).connect();
        let pid: i32 = victim.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
        let killer = std::thread::spawn({
            let mut other = cluster.node(1).connect();
            move || {
                std::thread::sleep(Duration::from_millis(500));
                other.query_one(&format!("SELECT {call}($1)"), &[&pid]).unwrap();
            }
        });
        let started = Instant::now();
        let e = victim.batch_execute("BEGIN; INSERT INTO t VALUES (2); SELECT pg_sleep(60); COMMIT").expect_err(call);
        killer.join().unwrap();
        // A terminated session may also just see its connection close.
        let closed = call == "pg_terminate_backend" && e.as_db_error().is_none();
        assert!(closed || e.code().map(|c| c.code()) == Some(code), "{call}: {}", describe(&e));
        assert!(started.elapsed() < Duration::from_secs(10), "{call} took {:?}", started.elapsed());
    }
    for node in cluster.nodes() {
        assert_eq!(node.query_value("SELECT count(*) FROM t").as_deref(), Some("1"), "node {}", node.id);
    }
}

#[test]
fn errors_are_postgresqls_with_rust_backtrace_set() {
    checks(&start(Some("1")));
}

#[test]
fn errors_are_postgresqls_with_rust_backtrace_unset() {
    checks(&start(None));
}

/// A receiver that cannot apply what a peer committed (asynchronous mode: a table missing
/// here) says why in mtm.get_nodes_state(), and stops saying it once it applies again.
#[test]
fn a_receiver_that_cannot_apply_says_why() {
    let cluster = ClusterBuilder::new(3).set("multimaster.mode", "async").start();
    for node in cluster.nodes() {
        node.execute_local("CREATE EXTENSION mmts");
    }
    cluster.wait_replicating(WAIT);
    cluster.node(1).execute_local("CREATE TABLE only_here (id int PRIMARY KEY)");
    cluster.node(1).execute("INSERT INTO only_here VALUES (1)");
    let error = |node: &mmts_tests::Node| {
        node.query_value("SELECT apply_error FROM mtm.get_nodes_state() WHERE node_id = 1").unwrap_or_default()
    };
    mmts_tests::wait_for("node 2 showing why it cannot apply node 1's stream", WAIT, || {
        error(cluster.node(2)).contains("only_here")
    });
    for node in &cluster.nodes()[1..] {
        node.execute_local("CREATE TABLE only_here (id int PRIMARY KEY)");
    }
    for node in &cluster.nodes()[1..] {
        mmts_tests::wait_for(&format!("node {} applying node 1's stream again", node.id), WAIT, || {
            node.query_value("SELECT count(*) FROM only_here").as_deref() == Some("1") && error(node).is_empty()
        });
    }
}
