//! The mesh over TLS: with `sslmode=verify-full` in `multimaster.conn_strings`, every
//! connection a node opens to its peers (the receivers' replication connections and their
//! plain connections for votes and heartbeats) is encrypted and checks the peer's certificate;
//! peers whose certificate is not signed by the CA named there are never connected to.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use mmts_tests::{describe, give_to_server_user, wait_for, Cluster, ClusterBuilder, TempDir};

const WAIT: Duration = Duration::from_secs(30);

/// A directory of certificates made for one test with `openssl`: two unrelated CAs
/// (`ca.crt` and `other_ca.crt`) and one server certificate (`server.crt`, `server.key`)
/// signed by `ca.crt` for 127.0.0.1 and localhost, where every node listens. Everything
/// belongs to the server user, the server key is readable by it alone.
struct Certs {
    dir: TempDir,
}

impl Certs {
    fn new() -> Certs {
        let dir = TempDir::new("mmts-tls");
        let certs = Certs { dir };
        for (ca, name) in [("ca", "mmts test CA"), ("other_ca", "mmts other test CA")] {
            certs.openssl(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
                "-days",
                "2",
                "-subj",
                &format!("/CN={name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
        }
        certs.openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        fs::write(
            certs.path("server.ext"),
            "subjectAltName = IP:127.0.0.1, DNS:localhost\n\
             basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature\n\
             extendedKeyUsage = serverAuth\n",
        )
        .expect("write server.ext");
        certs.openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "2",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ]);
        give_to_server_user(certs.dir.path());
        // PostgreSQL refuses a key file others can read.
        fs::set_permissions(certs.path("server.key"), fs::Permissions::from_mode(0o600)).expect("chmod server.key");
        certs
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .current_dir(self.dir.path())
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run openssl: {e}"));
        assert!(out.status.success(), "openssl {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
}

/// A started 3-node cluster whose servers take TLS connections with the certificate of
/// `certs`, and whose `conn_strings` ask for TLS with the peer's certificate checked against
/// `root` (a file of `certs`); every node has the extension and an empty table `t`.
/// Whether the server can run these tests; says so when it cannot (a build without TLS, as
/// PyPI's PostgreSQL 16.2 and 18.6 builds are).
fn tls_supported() -> bool {
    let ok = mmts_tests::server_has_ssl();
    if !ok {
        eprintln!("tls: skipped: PostgreSQL {} here is built without TLS", mmts_tests::server_major());
    }
    ok
}

fn tls_cluster(certs: &Certs, root: &str) -> Cluster {
    let quoted = |name: &str| format!("'{}'", certs.path(name).display());
    let mut cluster = ClusterBuilder::new(3)
        .set("ssl", "on")
        .set("ssl_cert_file", &quoted("server.crt"))
        .set("ssl_key_file", &quoted("server.key"))
        .build();
    let root = certs.path(root).display().to_string();
    // Written unquoted into connection strings and postgresql.conf.
    assert!(!root.contains([' ', '\'', ',', '\\']), "temp dir path needs quoting: {root}");
    let tls = format!("sslmode=verify-full sslrootcert={root}");
    for node in cluster.nodes() {
        let conns: Vec<String> = cluster
            .nodes()
            .iter()
            .map(|peer| {
                let peer = if peer.id == node.id { node.connstr() } else { cluster.link_connstr(node.id, peer.id) };
                format!("{peer} {tls}")
            })
            .collect();
        node.append_conf(&[("multimaster.conn_strings".into(), format!("'{}'", conns.join(", ")))]);
    }
    cluster.start_all();
    for node in cluster.nodes() {
        node.execute_local("CREATE EXTENSION mmts; CREATE TABLE t(id int PRIMARY KEY, written_on text)");
    }
    cluster
}

fn peers(cluster: &Cluster, id: usize) -> Vec<usize> {
    cluster.nodes().iter().map(|n| n.id).filter(|&p| p != id).collect()
}

/// The three nodes form a cluster over verified TLS, replicate each other's writes, and every
/// connection from a peer is encrypted.
#[test]
fn the_mesh_runs_over_verified_tls() {
    if !tls_supported() {
        return;
    }
    let certs = Certs::new();
    let cluster = tls_cluster(&certs, "ca.crt");
    cluster.wait_replicating(WAIT);

    for node in cluster.nodes() {
        node.execute(&format!("INSERT INTO t VALUES ({0}, 'node {0}')", node.id));
    }
    for node in cluster.nodes() {
        assert_eq!(
            node.query_rows("SELECT id, written_on FROM t ORDER BY id"),
            ["1|node 1", "2|node 2", "3|node 3"],
            "node {}",
            node.id
        );
    }

    // What each node's peers have open to it, and whether it is TLS.
    for node in cluster.nodes() {
        let rows = node.query_rows(
            "SELECT a.application_name, a.backend_type, s.ssl, s.version \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name LIKE 'mmts\\_node\\_%' ORDER BY 1, 2",
        );
        for peer in peers(&cluster, node.id) {
            for (app, kind) in
                [(format!("mmts_node_{peer}"), "walsender"), (format!("mmts_node_{peer}_signals"), "client backend")]
            {
                assert!(
                    rows.iter().any(|r| r.starts_with(&format!("{app}|{kind}|"))),
                    "node {}: no {kind} for node {peer} ({app}) in {rows:#?}",
                    node.id
                );
            }
        }
        for row in &rows {
            let fields: Vec<&str> = row.split('|').collect();
            assert_eq!(fields[2], "t", "node {}: a peer's connection without TLS: {row}", node.id);
            assert!(fields[3].starts_with("TLSv1."), "node {}: unexpected protocol: {row}", node.id);
        }
    }
}

/// With a CA in `conn_strings` that did not sign the servers' certificate, no node connects
/// to any other: each logs why, none is online, writes are refused and nothing replicates.
#[test]
fn peers_whose_certificate_fails_verification_do_not_form_a_cluster() {
    if !tls_supported() {
        return;
    }
    let certs = Certs::new();
    let cluster = tls_cluster(&certs, "other_ca.crt");

    for node in cluster.nodes() {
        let peers = peers(&cluster, node.id);
        wait_for(&format!("node {} to log that its peers' certificates fail verification", node.id), WAIT, || {
            let log = fs::read_to_string(node.log_path()).unwrap_or_default();
            peers.iter().all(|p| {
                log.lines().any(|l| {
                    l.contains(&format!("replication from node {p} interrupted"))
                        && l.contains("certificate verify failed")
                })
            })
        });
    }
    // Longer than the heartbeat timeout (2 s): time enough for a cluster to form.
    std::thread::sleep(Duration::from_secs(3));

    for node in cluster.nodes() {
        assert_eq!(
            node.query_rows(
                "SELECT state, nodes_connected, has_majority, cardinality(members) FROM mtm.get_cluster_state()"
            ),
            ["isolated|1|f|0"],
            "node {}",
            node.id
        );
        let expected: Vec<String> = peers(&cluster, node.id).iter().map(|p| format!("{p}|unreachable|f|f")).collect();
        assert_eq!(
            node.query_rows(
                "SELECT node_id, state, receiver_connected, walsender_connected FROM mtm.get_nodes_state() \
                 WHERE NOT is_self ORDER BY node_id"
            ),
            expected,
            "node {}",
            node.id
        );
        assert_eq!(
            node.query_value("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'mmts\\_node\\_%'")
                .as_deref(),
            Some("0"),
            "node {}: a peer is connected",
            node.id
        );
        let err = node
            .connect()
            .batch_execute(&format!("INSERT INTO t VALUES ({0}, 'node {0}')", node.id))
            .expect_err("a node outside any cluster took a write");
        let err = describe(&err);
        assert!(err.starts_with("55000 ") && err.contains("does not accept writes"), "node {}: {err}", node.id);
    }
    // Nothing reached any node (read with the session's consent: none is online).
    for node in cluster.nodes() {
        let count = node.query_value("SET multimaster.allow_stale_reads = on; SELECT count(*) FROM t");
        assert_eq!(count.as_deref(), Some("0"), "node {}", node.id);
    }
}
