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
