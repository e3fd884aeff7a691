//! Checked histories: list-append transactions from clients on every node, through every
//! client path, checked by `mmts_tests::history` (Elle's list-append checker). The checker is
//! first shown to find what it is for, on histories made bad on purpose.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mmts_tests::history::{check, Kind, Mop, Op, Outcome};
use mmts_tests::register::{self, RegEvent, RegOp};
use mmts_tests::{describe, wait_for, ClusterBuilder};

fn op(process: usize, invoke: u64, complete: u64, outcome: Outcome, mops: Vec<Mop>) -> Op {
    Op { process, node: process % 3 + 1, invoke, complete, outcome, mops, error: None }
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

fn reg(process: usize, invoke: u64, complete: Option<u64>, op: RegOp) -> RegEvent {
    RegEvent { process, node: process % 3 + 1, key: 1, invoke, complete, op }
}

#[test]
fn the_register_checker_finds_what_no_order_explains() {
    use RegOp::*;
    // A write, then a read of it; a compare-and-set that found the value; one that did not.
    let good = vec![
        reg(0, 0, Some(10), Write(1)),
        reg(1, 20, Some(30), Read(1)),
        reg(2, 40, Some(50), Cas { from: 1, to: 2, ok: true }),
        reg(0, 60, Some(70), Cas { from: 1, to: 3, ok: false }),
        reg(1, 80, Some(90), Read(2)),
    ];
    assert_eq!(register::check(&good), Ok(()));
    // A stale read: it began after the write returned and saw the value before it.
    let stale = vec![reg(0, 0, Some(10), Write(1)), reg(1, 20, Some(30), Read(0))];
    let e = register::check(&stale).expect_err("a stale read");
    assert!(e.contains("Read(0)"), "{e}");
    // Two reads in real-time order see two writes in opposite orders.
    let flip = vec![
        reg(0, 0, Some(100), Write(1)),
        reg(1, 0, Some(100), Write(2)),
        reg(2, 10, Some(20), Read(1)),
        reg(2, 30, Some(40), Read(2)),
        reg(2, 50, Some(60), Read(1)),
    ];
    assert!(register::check(&flip).is_err());
    // A write of unknown outcome that a read saw happened; one nobody saw may not have.
    let unknown = vec![
        reg(0, 0, None, Write(5)),
        reg(1, 0, None, Write(6)),
        reg(2, 50, Some(60), Read(5)),
        reg(2, 70, Some(80), Read(5)),
    ];
    assert_eq!(register::check(&unknown), Ok(()));
    // Reported is the read no order explains, not an earlier read of a write of unknown
    // outcome (open until the end of the history).
    let later = vec![
        reg(0, 0, None, Write(5)),
        reg(2, 50_000, Some(60_000), Read(5)),
        reg(1, 70_000, Some(80_000), Write(6)),
        reg(2, 90_000, Some(100_000), Read(5)),
    ];
    let e = register::check(&later).expect_err("a stale read after a write of unknown outcome");
    assert!(e.contains("no order explains\n  Read(5) of key 1 by client 2 on node 3, 0.090"), "{e}");
    // One nobody read may still explain a compare-and-set that failed: it may have happened.
    let unseen = vec![
        reg(0, 0, Some(10), Write(1)),
        reg(1, 20, Some(30), Read(1)),
        reg(2, 25, None, Write(7)),
        reg(1, 40, Some(50), Cas { from: 1, to: 2, ok: false }),
    ];
    assert_eq!(register::check(&unseen), Ok(()));
    // Reported is the stale read, not a compare-and-set that failed because of a write that
    // was still running when it ended (and that returned later).
    let running = vec![
        reg(0, 0, Some(10_000), Write(1)),
        reg(1, 20_000, Some(900_000), Write(2)),
        reg(2, 30_000, Some(40_000), Cas { from: 1, to: 3, ok: false }),
        reg(0, 950_000, Some(960_000), Read(1)),
    ];
    let e = register::check(&running).expect_err("a stale read after the write returned");
    assert!(e.contains("no order explains\n  Read(1) of key 1 by client 0 on node 1, 0.950"), "{e}");
    // A compare-and-set that failed though the register held what it compared with.
    let lost = vec![reg(0, 0, Some(10), Cas { from: 0, to: 1, ok: false })];
    assert!(register::check(&lost).is_err());
}

/// A write still committing is seen on one node before another: a compare-and-set on node 2
/// finds it, a later read on node 1 does not yet. Each node's view is linearizable; the whole
/// history is not, which is possible (see `check_registers`).
#[test]
fn nodes_may_see_a_committing_write_at_different_times() {
    use RegOp::*;
    let on = |node: usize, invoke: u64, complete: u64, op: RegOp| RegEvent {
        process: node,
        node,
        key: 1,
        invoke,
        complete: Some(complete),
        op,
    };
    let events = vec![
        on(3, 0, 1_000_000, Write(7)),
        on(2, 100_000, 200_000, Cas { from: 0, to: 8, ok: false }),
        on(1, 300_000, 400_000, Read(0)),
    ];
    assert!(register::check(&events).is_err());
    check_registers(&events, &[]);
}

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

/// Every this long the workload moves on to `KEYS` new keys (as Elle's list-append does), so
/// that lists stay short: each read returns a whole list, and checking reads of ever longer
/// lists grows with the square of the run's length.
const KEY_GENERATION: Duration = Duration::from_secs(10);

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

/// Whether a transaction that ended in error `e` may have committed all the same: the commit
/// was not confirmed (08007), or the connection is gone. A server that terminates the
/// connection (57P01: its postmaster died under a kill -9; 57P02: another of its processes
/// crashed) may do so while COMMIT waits for the other nodes, which can commit the
/// transaction without it.
fn outcome_unknown(e: &postgres::Error) -> bool {
    matches!(e.code().map(|c| c.code()), Some("08007" | "57P01" | "57P02") | None)
}

/// Runs `mops` as one transaction through `path`; fills in the reads. `Err`: the outcome of a
/// transaction that did not commit for sure, and the error the client got.
fn run(client: &mut postgres::Client, path: Path, mops: &mut [Mop]) -> Result<(), (Outcome, String)> {
    let judge = |e: postgres::Error| match outcome_unknown(&e) {
        true => (Outcome::Unknown, describe(&e)),
        false => (Outcome::Fail, describe(&e)),
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
/// `MMTS_HISTORY_SECONDS` (default 15), checked as a whole: none of the anomalies mmts rules
/// out, and how many of the others there were.
#[test]
fn list_append_from_every_node_has_no_impossible_anomaly() {
    let seconds: u64 = std::env::var("MMTS_HISTORY_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    list_append(seconds, &[], false);
}

/// The same under a schedule of faults for `MMTS_FAULT_SECONDS` (default 90), one at a time,
/// each on the next node: kill -9 and restart, isolation, a one-way cut (the node cannot
/// reach the others, or they cannot reach it), and delay with jitter on every link.
/// Transactions whose client lost its connection have an unknown outcome. Clients do not ask
/// whether their node is online: a node that may miss commits refuses reads and writes itself,
/// and no read may be stale.
#[test]
fn list_append_under_faults_has_no_impossible_anomaly() {
    let seconds: u64 = std::env::var("MMTS_FAULT_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(90);
    list_append(seconds, &FAULTS, false);
}

/// The checker catches a rule broken on purpose: with `multimaster.allow_stale_reads` on in
/// every client's session, a node cut off from the others answers reads, and the checker must
/// report stale reads (and still nothing else that is impossible).
#[test]
fn reads_allowed_to_be_stale_are_caught_as_stale() {
    let report = list_append(20, &[Fault::Isolate], true);
    assert!(report.count(Kind::StaleRead) > 0, "no stale read found: {}", report.summary());
}

/// A fault of the schedule, on one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Kill9,
    Isolate,
    /// The node cannot reach the others (its connections to them are black-holed).
    CutFrom,
    /// The others cannot reach the node.
    CutTo,
    /// Every link delayed 20 ms, plus up to 30 ms of jitter.
    Delay,
    /// The node restarted with its clock 500 ms ahead (libfaketime), five times the margin the
    /// settling rule allows for; restarted with the right time to heal.
    Skew,
    /// A backend coordinating a write on the node killed with kill -9 after the votes, before
    /// the precommit (`multimaster.failpoint`): PostgreSQL then restarts the whole node.
    KillBeforePrecommit,
    /// The same after the precommit, before COMMIT PREPARED.
    KillBeforeCommit,
}

const FAULTS: [Fault; 8] = [
    Fault::Kill9,
    Fault::KillBeforePrecommit,
    Fault::Isolate,
    Fault::CutFrom,
    Fault::KillBeforeCommit,
    Fault::CutTo,
    Fault::Delay,
    Fault::Skew,
];

const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// How long a fault lasts.
const FAULT_LENGTH: Duration = Duration::from_secs(4);

/// Kills, with kill -9, a backend of `node` stopped at `failpoint` in the commit of an insert
/// of `key` into `coordinated` (retrying with the next keys while the insert fails before
/// it, e.g. refused); returns its pid.
fn kill_coordinator(node: &mmts_tests::Node, failpoint: &str, key: &mut i32) -> i32 {
    for _ in 0..20 {
        *key += 1;
        let mut client = node.connect();
        let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
        client.batch_execute(&format!("SET multimaster.failpoint = '{failpoint}'")).unwrap();
        let (done, ended) = std::sync::mpsc::channel();
        let sql = format!("INSERT INTO coordinated VALUES ({key})");
        std::thread::spawn(move || {
            let _ = done.send(client.batch_execute(&sql));
        });
        let reached = format!("[{pid}] ");
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            let log = std::fs::read_to_string(node.log_path()).unwrap_or_default();
            if log.lines().any(|l| l.contains(&reached) && l.contains(&format!("failpoint {failpoint} reached"))) {
                // SAFETY: kill(2) of a server process of this test (same user, or root).
                assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill -9 {pid}");
                return pid;
            }
            if ended.try_recv().is_ok() {
                break; // the insert ended before the failpoint: try again
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("no write on node {} reached failpoint {failpoint}", node.id);
}

fn inject(cluster: &mut mmts_tests::Cluster, fault: Fault, victim: usize, key: &mut i32) -> Option<i32> {
    let others: Vec<usize> = (1..=3).filter(|&n| n != victim).collect();
    match fault {
        Fault::KillBeforePrecommit => return Some(kill_coordinator(cluster.node(victim), "before_precommit", key)),
        Fault::KillBeforeCommit => return Some(kill_coordinator(cluster.node(victim), "before_commit", key)),
        Fault::Kill9 => cluster.node_mut(victim).kill9(),
        Fault::Isolate => cluster.isolate(victim),
        Fault::CutFrom => others.iter().for_each(|&o| cluster.link(victim, o).cut()),
        Fault::CutTo => others.iter().for_each(|&o| cluster.link(o, victim).cut()),
        Fault::Delay => {
            for a in 1..=3 {
                for b in (1..=3).filter(|&b| b != a) {
                    cluster.link(a, b).set_delay_jitter(Duration::from_millis(20), Duration::from_millis(30));
                }
            }
        }
        Fault::Skew => {
            let node = cluster.node_mut(victim);
            node.kill9();
            node.set_env("LD_PRELOAD", Some(FAKETIME));
            node.set_env("FAKETIME", Some("+0.5s"));
            node.start();
        }
    }
    None
}

fn heal(cluster: &mut mmts_tests::Cluster, fault: Fault, victim: usize) {
    match fault {
        Fault::Kill9 => cluster.node_mut(victim).start(),
        Fault::Skew => {
            let node = cluster.node_mut(victim);
            node.kill9();
            node.set_env("LD_PRELOAD", None);
            node.set_env("FAKETIME", None);
            node.start();
        }
        Fault::Delay => {
            for a in 1..=3 {
                for b in (1..=3).filter(|&b| b != a) {
                    cluster.link(a, b).set_delay(Duration::ZERO);
                }
            }
        }
        _ => cluster.heal_all(),
    }
}

/// Whether every node is online and counts all three as members.
fn all_online(cluster: &mmts_tests::Cluster) -> bool {
    cluster.nodes().iter().all(|n| {
        n.try_connect(Duration::from_secs(1))
            .and_then(|mut c| {
                c.query_one("SELECT state = 'online' AND cardinality(members) = 3 FROM mtm.get_cluster_state()", &[])
            })
            .is_ok_and(|r| r.get::<_, bool>(0))
    })
}

/// Registers the register workload reads, writes and compares-and-sets. Enough of them, and
/// paced (`REGISTER_PAUSE` between operations), for each key's history to stay a few thousand
/// operations long in a 10-minute run: the linearizability search keeps a set of visited states
/// that grows with the square of a key's operations.
const REGISTERS: u32 = 24;
const REGISTER_PAUSE: Duration = Duration::from_millis(5);

/// One client on `node` runs single-statement operations on the registers until `stop`: reads,
/// writes and compare-and-sets (from the value it last read), each storing a value never
/// stored before.
fn registers(
    node: usize,
    connstr: &str,
    started: Instant,
    stop: &AtomicBool,
    out: &Mutex<Vec<RegEvent>>,
    refused: &Mutex<Vec<(RegEvent, String)>>,
) {
    let process = 100 + node;
    let mut next = mmts_tests::random(0x2545_F491_4F6C_DD1Du64 ^ node as u64);
    let mut value = node as i64 * 1_000_000_000;
    let mut last_read = [0i64; REGISTERS as usize + 1];
    let mut client: Option<postgres::Client> = None;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = client.as_mut().filter(|c| !c.is_closed()) else {
            client = postgres::Client::connect(connstr, postgres::NoTls).ok();
            if client.is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        };
        let key = 1 + next(REGISTERS as u64) as u32;
        let k = key as i32;
        let invoke = started.elapsed().as_micros() as u64;
        let (op, result) = match next(4) {
            0 | 1 => match c.query_one("SELECT v FROM registers WHERE k = $1", &[&k]) {
                Ok(row) => {
                    let v: i64 = row.get(0);
                    last_read[key as usize] = v;
                    (RegOp::Read(v), Ok(()))
                }
                Err(e) => (RegOp::Read(0), Err(e)),
            },
            2 => {
                value += 1;
                let r = c.execute("UPDATE registers SET v = $2 WHERE k = $1", &[&k, &value]);
                (RegOp::Write(value), r.map(|_| ()))
            }
            _ => {
                value += 1;
                let from = last_read[key as usize];
                match c.execute("UPDATE registers SET v = $3 WHERE k = $1 AND v = $2", &[&k, &from, &value]) {
                    Ok(n) => (RegOp::Cas { from, to: value, ok: n == 1 }, Ok(())),
                    Err(e) => (RegOp::Cas { from, to: value, ok: true }, Err(e)),
                }
            }
        };
        let complete = started.elapsed().as_micros() as u64;
        let complete = match result {
            Ok(()) => Some(complete),
            Err(e) if outcome_unknown(&e) => None,
            Err(e) => {
                // Refused: it did not happen. Kept aside, to check that nobody read its value.
                let event = RegEvent { process, node, key, invoke, complete: Some(complete), op };
                refused.lock().unwrap().push((
                    event,
                    e.as_db_error().map_or(e.to_string(), |d| format!("{}: {}", d.code().code(), d.message())),
                ));
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        out.lock().unwrap().push(RegEvent { process, node, key, invoke, complete, op });
        std::thread::sleep(REGISTER_PAUSE);
    }
}

/// Each register, as seen by the readers of each node, is linearizable: every write and
/// compare-and-set that stored its value, from any node, and one node's reads and the
/// compares-and-sets there that found another value (those read what their own node had
/// committed). Across nodes it need not be (a commit becomes visible on each node as that node
/// commits it, before COMMIT returns): how often the whole history is not is counted.
fn check_registers(events: &[RegEvent], refused: &[(RegEvent, String)]) {
    // A value stored by an operation its client was told had failed is read by nobody.
    for (failed, error) in refused {
        let stored = match failed.op {
            RegOp::Write(v) | RegOp::Cas { to: v, .. } => v,
            _ => continue,
        };
        if let Some(read) = events.iter().find(|e| e.key == failed.key && e.op == RegOp::Read(stored)) {
            panic!("registers: {read}\nread the value of an operation refused with an error:\n  {failed}: {error}");
        }
    }
    let counted = |node: usize| events.iter().filter(|e| e.node == node && e.complete.is_some()).count();
    for node in 1..=3 {
        assert!(counted(node) > 0, "no register operation completed on node {node}");
        let seen: Vec<RegEvent> = events
            .iter()
            .filter(|e| e.node == node || !matches!(e.op, RegOp::Read(_) | RegOp::Cas { ok: false, .. }))
            .cloned()
            .collect();
        if let Err(e) = register::check(&seen) {
            panic!("registers as read on node {node}: {e}");
        }
    }
    let whole = match register::check(events) {
        Ok(()) => "linearizable".to_string(),
        Err(e) => format!("not linearizable across nodes (possible): {}", e.lines().next().unwrap_or("")),
    };
    eprintln!(
        "registers: {} operations ({} completed); per node: linearizable; whole history: {whole}",
        events.len(),
        events.iter().filter(|e| e.complete.is_some()).count()
    );
}

/// Log lines the workload causes: its transactions conflict, and one of two is rolled back
/// (40001). Everything else the checks look for (a PANIC, a process killed by a signal, any
/// other "could not") fails the test, with or without faults, but what the faults themselves
/// cause (the kills, `Cluster::PEER_GONE`).
const CAUSED_BY_WORKLOAD: &[&str] = &["could not serialize access"];

/// Runs the list-append and register workloads for `seconds`, with `faults` one after another
/// (none: no faults), and checks what they saw. `stale_reads`: clients allow stale reads
/// (`multimaster.allow_stale_reads`), and the stale reads found are returned, not failed.
fn list_append(seconds: u64, faults: &[Fault], stale_reads: bool) -> mmts_tests::history::Report {
    // Under faults, with fsync on: a kill -9 still keeps the page cache (it is no power cut),
    // but every commit and prepare reaches the disk as it would in production.
    let fsync = if faults.is_empty() { "off" } else { "on" };
    let mut cluster = ClusterBuilder::new(3)
        .proxies(!faults.is_empty())
        .set("fsync", fsync)
        .runs_for(Duration::from_secs(seconds))
        .start();
    for node in cluster.nodes() {
        node.execute_local(&format!(
            "CREATE EXTENSION mmts; CREATE TABLE lists(k int PRIMARY KEY, v bigint[] NOT NULL DEFAULT '{{}}');
             CREATE TABLE registers(k int PRIMARY KEY, v bigint NOT NULL DEFAULT 0);
             CREATE TABLE coordinated(k int PRIMARY KEY)"
        ));
    }
    cluster.wait_replicating(Duration::from_secs(60));
    let generations = seconds / KEY_GENERATION.as_secs() + 2;
    cluster.node(1).execute(&format!("INSERT INTO lists(k) SELECT generate_series(1, {})", KEYS as u64 * generations));
    cluster.node(1).execute(&format!("INSERT INTO registers(k) SELECT generate_series(1, {REGISTERS})"));
    let options = if stale_reads { " options='-c multimaster.allow_stale_reads=on'" } else { "" };
    let nodes: Vec<(usize, String)> =
        cluster.nodes().iter().map(|n| (n.id, format!("{}{options}", n.connstr()))).collect();

    let started = Instant::now();
    let stop = AtomicBool::new(false);
    let history: Mutex<Vec<Op>> = Mutex::new(Vec::new());
    let register_history: Mutex<Vec<RegEvent>> = Mutex::new(Vec::new());
    let refused_registers: Mutex<Vec<(RegEvent, String)>> = Mutex::new(Vec::new());
    let paths = [Path::Explicit, Path::Autocommit, Path::Extended, Path::MultiStatement];
    let mut fault_log = Vec::new();
    // Backends the schedule killed: their end is in the logs.
    let mut killed: Vec<String> = Vec::new();
    let mut key = 0;
    std::thread::scope(|scope| {
        let _stop = mmts_tests::StopOnDrop(&stop);
        for process in 0..6 {
            let (node, connstr) = nodes[process % 3].clone();
            let (stop, history) = (&stop, &history);
            scope.spawn(move || {
                let mut next = mmts_tests::random(0x9E37_79B9_7F4A_7C15u64 ^ (process as u64 + 1));
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
                    let path = paths[next(4) as usize];
                    let count = if matches!(path, Path::Autocommit) { 1 } else { 1 + next(3) as usize };
                    let mut mops: Vec<Mop> = (0..count)
                        .map(|_| {
                            let generation =
                                (started.elapsed().as_secs() / KEY_GENERATION.as_secs()).min(generations - 1) as u32;
                            let key = 1 + generation * KEYS + next(KEYS as u64) as u32;
                            if next(2) == 0 {
                                value += 1;
                                Mop::Append { key, value }
                            } else {
                                Mop::Read { key, list: None }
                            }
                        })
                        .collect();
                    let invoke = started.elapsed().as_micros() as u64;
                    let (outcome, error) = match run(c, path, &mut mops) {
                        Ok(()) => (Outcome::Ok, None),
                        Err((o, e)) => (o, Some(e)),
                    };
                    let complete = started.elapsed().as_micros() as u64;
                    history.lock().unwrap().push(Op { process, node, invoke, complete, outcome, mops, error });
                    if outcome != Outcome::Ok {
                        // A node that refuses (not online) is asked again a little later.
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            });
        }
        for node in 1..=3 {
            let connstr = nodes[node - 1].1.clone();
            let (stop, register_history, refused) = (&stop, &register_history, &refused_registers);
            scope.spawn(move || registers(node, &connstr, started, stop, register_history, refused));
        }
        let deadline = started + Duration::from_secs(seconds);
        let mut round = 0;
        while !faults.is_empty() && Instant::now() + FAULT_LENGTH < deadline {
            std::thread::sleep(Duration::from_secs(1));
            let (fault, victim) = (faults[round % faults.len()], round % 3 + 1);
            round += 1;
            let at = started.elapsed().as_secs_f64();
            if let Some(pid) = inject(&mut cluster, fault, victim, &mut key) {
                killed.push(format!("(PID {pid}) was terminated by signal 9"));
            }
            std::thread::sleep(FAULT_LENGTH);
            heal(&mut cluster, fault, victim);
            let healed = Instant::now();
            wait_for(&format!("every node online after {fault:?} of node {victim}"), Duration::from_secs(60), || {
                all_online(&cluster)
            });
            fault_log.push((at, fault, victim, healed.elapsed()));
        }
        if let Some(rest) = deadline.checked_duration_since(Instant::now()) {
            std::thread::sleep(rest);
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

    eprintln!("history: {seconds} s; {}", report.summary());
    let mut online_after: BTreeMap<Fault, Vec<u128>> = BTreeMap::new();
    for (at, fault, victim, back) in &fault_log {
        eprintln!(
            "  at {at:.1} s: {fault:?} of node {victim} for {FAULT_LENGTH:?}; all online {} ms after healing",
            back.as_millis()
        );
        online_after.entry(*fault).or_default().push(back.as_millis());
    }
    for (fault, ms) in &online_after {
        eprintln!("  {fault:?}: {} times, online again after {} ms at most", ms.len(), ms.iter().max().unwrap());
    }
    let register_ops = register_history.into_inner().unwrap();
    if !stale_reads {
        check_registers(&register_ops, &refused_registers.into_inner().unwrap());
    }
    let ruled_out: Vec<Kind> = IMPOSSIBLE.iter().copied().filter(|&k| !stale_reads || k != Kind::StaleRead).collect();
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
    for process in 0..6 {
        let read = ops
            .iter()
            .filter(|o| o.process == process && o.outcome == Outcome::Ok)
            .any(|o| o.mops.iter().any(|m| matches!(m, Mop::Read { list: Some(_), .. })));
        assert!(read, "client {process} never read successfully");
    }
    for node in 1..=3 {
        let served = ops.iter().filter(|o| o.node == node && o.outcome == Outcome::Ok).count();
        assert!(served > 0, "no transaction committed through node {node}");
    }
    // Final checks: nothing left for an operator to repair, nothing in the logs the workload
    // does not explain.
    for node in cluster.nodes() {
        assert_eq!(node.query_value("SELECT count(*) FROM mtm.conflicts").as_deref(), Some("0"), "node {}", node.id);
    }
    // A write whose coordinator was killed ended alike on every node, and nothing stays prepared.
    let coordinated = cluster.node(1).query_rows("SELECT k FROM coordinated ORDER BY k");
    for node in cluster.nodes() {
        assert_eq!(node.query_rows("SELECT k FROM coordinated ORDER BY k"), coordinated, "node {}", node.id);
        wait_for(&format!("nothing prepared on node {}", node.id), Duration::from_secs(30), || {
            node.query_value("SELECT count(*) FROM pg_prepared_xacts").as_deref() == Some("0")
        });
    }
    eprintln!("  writes whose coordinator was killed: {} committed of {} tried", coordinated.len(), key);
    let by_faults = if faults.is_empty() { &[][..] } else { mmts_tests::Cluster::PEER_GONE };
    let caused: Vec<&str> =
        CAUSED_BY_WORKLOAD.iter().chain(by_faults).copied().chain(killed.iter().map(String::as_str)).collect();
    let problems = cluster.log_problems(&caused);
    assert!(problems.is_empty(), "log lines no fault explains:\n{}", problems.join("\n"));
    report
}
