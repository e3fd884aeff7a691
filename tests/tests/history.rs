//! Checked histories: list-append transactions from clients on every node, through every
//! client path, checked by `mmts_tests::history` (Elle's list-append checker). The checker is
//! first shown to find what it is for, on histories made bad on purpose.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mmts_tests::history::{check, Kind, Mop, Op, Outcome};
use mmts_tests::{wait_for, ClusterBuilder};

fn op(process: usize, invoke: u64, complete: u64, outcome: Outcome, mops: Vec<Mop>) -> Op {
    Op { process, node: process % 3 + 1, invoke, complete, outcome, mops }
}

fn append(key: u32, value: u64) -> Mop {
    Mop::Append { key, value }
}

fn read(key: u32, list: &[u64]) -> Mop {
    Mop::Read { key, list: Some(list.to_vec()) }
}

fn finals(entries: &[(u32, &[u64])]) -> BTreeMap<u32, Vec<u64>> {
    entries.iter().map(|(k, l)| (*k, l.to_vec())).collect()
}

/// The kinds the checker must call impossible on an mmts cluster (see the README's
/// "What a client can observe").
const IMPOSSIBLE: &[Kind] = &[
    Kind::G0,
    Kind::G1a,
    Kind::G1b,
    Kind::G1c,
    Kind::Duplicate,
    Kind::Garbage,
    Kind::IncompatibleOrder,
    Kind::LostAppend,
    Kind::StaleRead,
];

#[test]
fn a_clean_history_has_no_anomaly() {
    let ops = vec![
        op(0, 0, 10, Outcome::Ok, vec![append(1, 1)]),
        op(1, 20, 30, Outcome::Ok, vec![read(1, &[1]), append(1, 2)]),
        op(2, 40, 50, Outcome::Ok, vec![read(1, &[1, 2])]),
        op(0, 60, 70, Outcome::Fail, vec![append(1, 3)]),
        op(1, 65, 90, Outcome::Unknown, vec![append(2, 4)]),
    ];
    let report = check(&ops, &finals(&[(1, &[1, 2]), (2, &[])]));
    assert!(report.anomalies.is_empty(), "{}", report.describe(&IMPOSSIBLE, 3));
}

#[test]
fn a_lost_append_is_found() {
    let ops = vec![op(0, 0, 10, Outcome::Ok, vec![append(1, 1)]), op(1, 0, 10, Outcome::Ok, vec![append(1, 2)])];
    let report = check(&ops, &finals(&[(1, &[2])]));
    assert_eq!(report.count(Kind::LostAppend), 1, "{}", report.summary());
    assert!(report.describe(&[Kind::LostAppend], 1).contains("client 0 on node 1"));
}

#[test]
fn a_g2_cycle_is_found_with_its_transactions() {
    // Write skew across nodes: each missed the other's append.
    let ops = vec![
        op(0, 0, 10, Outcome::Ok, vec![read(2, &[]), append(1, 1)]),
        op(1, 0, 10, Outcome::Ok, vec![read(1, &[]), append(2, 2)]),
    ];
    let report = check(&ops, &finals(&[(1, &[1]), (2, &[2])]));
    assert_eq!(report.count(Kind::G2Item), 1, "{}", report.summary());
    let shown = report.describe(&[Kind::G2Item], 1);
    assert!(shown.contains("a cycle of 2 transactions") && shown.contains("Rw"), "{shown}");
}

#[test]
fn a_stale_read_is_found() {
    // Acknowledged at 10; a read that began at 20 does not see it.
    let ops = vec![op(0, 0, 10, Outcome::Ok, vec![append(1, 1)]), op(1, 20, 30, Outcome::Ok, vec![read(1, &[])])];
    let report = check(&ops, &finals(&[(1, &[1])]));
    assert_eq!(report.count(Kind::StaleRead), 1, "{}", report.summary());
    assert_eq!(report.count(Kind::GSingleRealtime), 1, "{}", report.summary());
    // Concurrent with the append, the same read is fine.
    let ops = vec![op(0, 0, 10, Outcome::Ok, vec![append(1, 1)]), op(1, 5, 30, Outcome::Ok, vec![read(1, &[])])];
    assert!(check(&ops, &finals(&[(1, &[1])])).anomalies.is_empty());
}

#[test]
fn duplicates_aborted_reads_garbage_and_g0_are_found() {
    let ops = vec![
        op(0, 0, 10, Outcome::Ok, vec![append(1, 1)]),
        op(1, 20, 30, Outcome::Ok, vec![read(1, &[1, 1])]),
        op(2, 0, 10, Outcome::Fail, vec![append(2, 5)]),
        op(0, 20, 30, Outcome::Ok, vec![read(2, &[5]), read(3, &[9])]),
    ];
    let report = check(&ops, &finals(&[(1, &[1])]));
    for kind in [Kind::Duplicate, Kind::G1a, Kind::Garbage] {
        assert_eq!(report.count(kind), 1, "{}: {}", kind.name(), report.summary());
    }
    // Two transactions each written over the other: x = [1, 3], y = [4, 2].
    let ops = vec![
        op(0, 0, 10, Outcome::Ok, vec![append(1, 1), append(2, 2)]),
        op(1, 0, 10, Outcome::Ok, vec![append(1, 3), append(2, 4)]),
    ];
    let report = check(&ops, &finals(&[(1, &[1, 3]), (2, &[4, 2])]));
    assert_eq!(report.count(Kind::G0), 1, "{}", report.summary());
}

/// Keys the workload appends to: few, so that transactions collide.
const KEYS: u32 = 4;

/// A client path: how a transaction reaches the server.
#[derive(Clone, Copy, Debug)]
enum Path {
    /// BEGIN; …; COMMIT in one simple-protocol batch.
    Explicit,
    /// Each statement on its own (a transaction of one statement).
    Autocommit,
    /// The extended protocol, statement by statement, in a transaction.
    Extended,
    /// Several statements in one simple query (one implicit transaction).
    MultiStatement,
}

fn sql(m: &Mop) -> String {
    match m {
        Mop::Append { key, value } => format!("UPDATE lists SET v = v || '{{{value}}}'::bigint[] WHERE k = {key}"),
        Mop::Read { key, .. } => format!("SELECT coalesce(array_to_string(v, ','), '') FROM lists WHERE k = {key}"),
    }
}

fn parse(text: &str) -> Vec<u64> {
    text.split(',').filter(|s| !s.is_empty()).map(|s| s.parse().expect("a bigint")).collect()
}

/// Runs `mops` as one transaction through `path`; fills in the reads. `Err`: the outcome of a
/// transaction that did not commit for sure.
fn run(client: &mut postgres::Client, path: Path, mops: &mut [Mop]) -> Result<(), Outcome> {
    let judge = |e: postgres::Error| match e.code().map(|c| c.code()) {
        // The outcome is unknown: the commit was not confirmed, or the connection is gone.
        Some("08007") | None => Outcome::Unknown,
        Some(_) => Outcome::Fail,
    };
    let reads_of = |messages: Vec<postgres::SimpleQueryMessage>| -> Vec<Vec<u64>> {
        messages
            .into_iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => Some(parse(r.get(0).unwrap_or(""))),
                _ => None,
            })
            .collect()
    };
    let fill = |mops: &mut [Mop], mut lists: Vec<Vec<u64>>| {
        lists.reverse();
        for m in mops.iter_mut() {
            if let Mop::Read { list, .. } = m {
                *list = lists.pop();
            }
        }
    };
    match path {
        Path::Explicit | Path::MultiStatement => {
            let body: Vec<String> = mops.iter().map(sql).collect();
            let text = match path {
                Path::Explicit => format!("BEGIN; {}; COMMIT", body.join("; ")),
                _ => body.join("; "),
            };
            let messages = client.simple_query(&text).map_err(judge)?;
            fill(mops, reads_of(messages));
            Ok(())
        }
        Path::Autocommit => {
            assert_eq!(mops.len(), 1, "one statement per autocommit transaction");
            let messages = client.simple_query(&sql(&mops[0])).map_err(judge)?;
            fill(mops, reads_of(messages));
            Ok(())
        }
        Path::Extended => {
            let mut tx = client.transaction().map_err(judge)?;
            let mut lists = Vec::new();
            for m in mops.iter() {
                match m {
                    Mop::Append { key, value } => {
                        tx.execute(
                            "UPDATE lists SET v = v || ARRAY[$1::bigint] WHERE k = $2",
                            &[&(*value as i64), &(*key as i32)],
                        )
                        .map_err(judge)?;
                    }
                    Mop::Read { key, .. } => {
                        let row = tx
                            .query_one(
                                "SELECT coalesce(array_to_string(v, ','), '') FROM lists WHERE k = $1",
                                &[&(*key as i32)],
                            )
                            .map_err(judge)?;
                        lists.push(parse(row.get(0)));
                    }
                }
            }
            tx.commit().map_err(judge)?;
            fill(mops, lists);
            Ok(())
        }
    }
}

/// List-append from six clients on three nodes (two per node, every client path) for
/// `MMTS_HISTORY_SECONDS` (default 20), checked as a whole: none of the anomalies mmts rules
/// out, and how many of the others there were.
#[test]
fn list_append_from_every_node_has_no_impossible_anomaly() {
    let seconds: u64 = std::env::var("MMTS_HISTORY_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    list_append(seconds, None);
}

/// The same while nodes are killed (kill -9) and restarted, one at a time, every
/// `MMTS_HISTORY_FAULT_SECONDS / 5`: transactions whose client lost its connection have an
/// unknown outcome; a client runs transactions only on a node that says it is online.
///
/// Stale reads are counted, not failed: right after a restarted node is counted online again
/// it can answer reads that miss transactions the others committed just before (see the
/// README, "What a client can observe"). Everything else mmts rules out must not happen.
#[test]
fn list_append_under_kill_9_has_no_impossible_anomaly() {
    let seconds: u64 = std::env::var("MMTS_HISTORY_FAULT_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(40);
    let report = list_append(seconds, Some(Duration::from_secs(seconds) / 5));
    eprintln!("stale reads after a rejoin (a known hole): {}", report.count(Kind::StaleRead));
}

fn list_append(seconds: u64, kill_every: Option<Duration>) -> mmts_tests::history::Report {
    let mut cluster = ClusterBuilder::new(3).proxies(false).start();
    for node in cluster.nodes() {
        node.execute_local(&format!(
            "CREATE EXTENSION mmts; CREATE TABLE lists(k int PRIMARY KEY, v bigint[] NOT NULL DEFAULT '{{}}')"
        ));
    }
    cluster.wait_replicating(Duration::from_secs(60));
    cluster.node(1).execute(&format!("INSERT INTO lists(k) SELECT generate_series(1, {KEYS})"));
    let nodes: Vec<(usize, String)> = cluster.nodes().iter().map(|n| (n.id, n.connstr())).collect();

    let started = Instant::now();
    let stop = AtomicBool::new(false);
    let history: Mutex<Vec<Op>> = Mutex::new(Vec::new());
    let paths = [Path::Explicit, Path::Autocommit, Path::Extended, Path::MultiStatement];
    let mut faults = Vec::new();
    std::thread::scope(|scope| {
        let _stop = mmts_tests::StopOnDrop(&stop);
        for process in 0..6 {
            let (node, connstr) = nodes[process % 3].clone();
            let (stop, history) = (&stop, &history);
            scope.spawn(move || {
                let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (process as u64 + 1);
                let mut next = move |n: u64| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed % n
                };
                let mut value = process as u64 * 1_000_000;
                let mut client: Option<postgres::Client> = None;
                while !stop.load(Ordering::Relaxed) {
                    let Some(c) = client.as_mut().filter(|c| !c.is_closed()) else {
                        client = postgres::Client::connect(&connstr, postgres::NoTls).ok();
                        if client.is_none() {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        continue;
                    };
                    let online = c
                        .query_one("SELECT state = 'online' FROM mtm.get_cluster_state()", &[])
                        .map(|r| r.get::<_, bool>(0))
                        .unwrap_or(false);
                    if !online {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    let path = paths[next(4) as usize];
                    let count = if matches!(path, Path::Autocommit) { 1 } else { 1 + next(3) as usize };
                    let mut mops: Vec<Mop> = (0..count)
                        .map(|_| {
                            let key = 1 + next(KEYS as u64) as u32;
                            if next(2) == 0 {
                                value += 1;
                                Mop::Append { key, value }
                            } else {
                                Mop::Read { key, list: None }
                            }
                        })
                        .collect();
                    let invoke = started.elapsed().as_micros() as u64;
                    let outcome = match run(c, path, &mut mops) {
                        Ok(()) => Outcome::Ok,
                        Err(o) => o,
                    };
                    let complete = started.elapsed().as_micros() as u64;
                    history.lock().unwrap().push(Op { process, node, invoke, complete, outcome, mops });
                }
            });
        }
        let deadline = started + Duration::from_secs(seconds);
        let mut victim = 0;
        while Instant::now() < deadline {
            let Some(every) = kill_every else {
                std::thread::sleep(deadline - Instant::now());
                break;
            };
            std::thread::sleep(every.saturating_sub(Duration::from_secs(2)).min(deadline - Instant::now()));
            if Instant::now() >= deadline {
                break;
            }
            victim = victim % 3 + 1;
            cluster.node_mut(victim).kill9();
            std::thread::sleep(Duration::from_secs(2));
            cluster.node_mut(victim).start();
            faults.push((started.elapsed().as_secs_f64(), victim));
        }
        stop.store(true, Ordering::Relaxed);
    });

    // Every node online again and holding the same lists: the final reads.
    cluster.wait_replicating(Duration::from_secs(120));
    let lists = |node: &mmts_tests::Node| -> BTreeMap<u32, Vec<u64>> {
        node.query_rows("SELECT k || ':' || coalesce(array_to_string(v, ','), '') FROM lists ORDER BY k")
            .iter()
            .map(|row| {
                let (k, v) = row.split_once(':').expect("k:v");
                (k.parse().expect("a key"), parse(v))
            })
            .collect()
    };
    let finals = lists(cluster.node(1));
    wait_for("every node to hold node 1's lists", Duration::from_secs(60), || {
        cluster.nodes().iter().all(|n| lists(n) == finals)
    });

    let ops = history.into_inner().unwrap();
    let report = check(&ops, &finals);
    eprintln!("history: {seconds} s, node killed (s, node): {faults:?}; {}", report.summary());
    // Under kill -9, stale reads right after a rejoin are a known hole (see the test above).
    let ruled_out: Vec<Kind> =
        IMPOSSIBLE.iter().copied().filter(|&k| kill_every.is_none() || k != Kind::StaleRead).collect();
    let impossible: usize = ruled_out.iter().map(|&k| report.count(k)).sum();
    assert_eq!(impossible, 0, "anomalies mmts rules out:\n{}", report.describe(&ruled_out, 3));
    assert!(report.ok > 100, "too few transactions committed: {}", report.summary());
    let reads = ops
        .iter()
        .filter(|o| o.outcome == Outcome::Ok)
        .flat_map(|o| &o.mops)
        .filter(|m| matches!(m, Mop::Read { list: Some(_), .. }))
        .count();
    assert!(reads > 100, "too few successful reads ({reads})");
    for node in 1..=3 {
        let served = ops.iter().filter(|o| o.node == node && o.outcome == Outcome::Ok).count();
        assert!(served > 0, "no transaction committed through node {node}");
    }
    report
}
