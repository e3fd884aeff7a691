//! Nodes of one cluster on different PostgreSQL major versions: refused, with the reason in
//! the logs; the nodes of the majority version go on without the other one.
//!
//! The other version is the first PostgreSQL found (`$MMTS_OTHER_PG_CONFIG`, then
//! /usr/lib/postgresql/N and /opt/mmts-pg/N, as scripts/postgres.sh installs them) whose major
//! version differs from `$MMTS_PG_CONFIG`'s and that has mmts installed; without one the test
//! says so and passes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mmts_tests::{bindir_of, major_of, server_major, wait_for, ClusterBuilder};

const WAIT: Duration = Duration::from_secs(60);

/// The pg_config of another installed major version with mmts installed.
fn other_server() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> =
        std::env::var_os("MMTS_OTHER_PG_CONFIG").map(PathBuf::from).into_iter().collect();
    for n in [18, 17, 16, 15] {
        candidates.push(PathBuf::from(format!("/usr/lib/postgresql/{n}/bin/pg_config")));
        candidates.push(PathBuf::from(format!("/opt/mmts-pg/{n}/bin/pg_config")));
    }
    candidates.into_iter().find(|c| {
        c.exists() && major_of(&bindir_of(c)) != server_major() && {
            let out = Command::new(c).arg("--pkglibdir").output().expect("pg_config --pkglibdir");
            Path::new(String::from_utf8_lossy(&out.stdout).trim()).join("mmts.so").exists()
        }
    })
}

#[test]
fn a_node_on_another_major_version_is_refused() {
    let Some(other) = other_server() else {
        eprintln!("versions: skipped: no other PostgreSQL major version with mmts installed");
        return;
    };
    let other_major = major_of(&bindir_of(&other));
    let cluster = ClusterBuilder::new(3)
        .set("multimaster.heartbeat_send_timeout", "100")
        .set("multimaster.heartbeat_recv_timeout", "1000")
        .server_of_node(3, &other)
        .start();
    for node in cluster.nodes() {
        node.execute_local("CREATE EXTENSION mmts");
    }
    let (one, three) = (cluster.node(1), cluster.node(3));
    let version = |n: &mmts_tests::Node| {
        n.query_value("SELECT value FROM mtm.get_cluster_info() WHERE name = 'server_version'").unwrap_or_default()
    };
    assert!(version(one).starts_with(&format!("{}.", server_major())), "node 1: {}", version(one));
    assert!(version(three).starts_with(&format!("{other_major}.")), "node 3: {}", version(three));

    // Nodes 1 and 2 are the majority and take writes; node 3 is refused by both.
    wait_for("nodes 1 and 2 online without node 3", WAIT, || {
        one.query_value("SELECT state = 'online' AND members::text = '{1,2}' FROM mtm.get_cluster_state()").as_deref()
            == Some("t")
    });
    one.execute("CREATE TABLE t(id int PRIMARY KEY); INSERT INTO t VALUES (1)");
    assert_eq!(cluster.node(2).query_value("SELECT count(*) FROM t").as_deref(), Some("1"));
    let says = |node: &mmts_tests::Node, peer: usize, major: u32| {
        let what = format!("node {peer} runs PostgreSQL {major}.");
        wait_for(&format!("node {} to log {what:?}", node.id), WAIT, || {
            std::fs::read_to_string(node.log_path())
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains(&what) && l.contains("must run the same major version"))
        });
    };
    says(one, 3, other_major);
    says(three, 1, server_major());
    assert_ne!(three.query_value("SELECT state FROM mtm.get_cluster_state()").as_deref(), Some("online"));
}
