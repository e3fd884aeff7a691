//! PostgreSQL's own regression suite on a cluster node: `parallel_schedule`, run by the server's
//! `pg_regress --use-existing` in the replicated database on node 1 of a 3-node synchronous
//! cluster, against the same suite on a standalone server in the same run.
//!
//! Every test that passes standalone must pass on the cluster node, except those listed with
//! their reason in `tests/regress/<major>/intended.txt`. After the suite every node must be an
//! online member, and every table mmts replicates must hold the same rows on all three nodes.
//! A major version without that file (16: Debian no longer has its source) is skipped, saying so.
//!
//! The suite (from Debian's source package of the server's major version, with `regress.so`
//! built for the installed server) is prepared by `scripts/regress-suite.sh` in
//! `target/pg-regress/<major>` (or `$MMTS_REGRESS_DIR`). Each run's output (`regression.diffs`, `results/`, pg_regress's own
//! output in `pg_regress.out`; the cluster's server logs) stays in `runs/standalone` and
//! `runs/cluster` there.
//!
//! Environment: `MMTS_REGRESS_TIMEOUT` (seconds per pg_regress run, default 1500),
//! `MMTS_REGRESS_MAX_CONCURRENT` (pg_regress `--max-concurrent-tests`), `MMTS_REGRESS_CONF`
//! (`key=value;key=value`: extra postgresql.conf settings for both servers).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mmts_tests::{bindir, describe, give_to_server_user, Cluster, ClusterBuilder, Node};

const NODES: usize = 3;
const WAIT: Duration = Duration::from_secs(120);

/// Writes straight to stderr, past the test harness's output capture: the summary shows in CI
/// logs whether the test passes or not.
fn say(text: &str) {
    let _ = std::io::stderr().write_all(text.as_bytes());
}

fn env_secs(key: &str, default: u64) -> u64 {
    std::env::var(key).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Where scripts/regress-suite.sh put the suite.
fn regress_dir() -> PathBuf {
    let dir = std::env::var_os("MMTS_REGRESS_DIR").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../target/pg-regress/{}", mmts_tests::server_major()))
    });
    fs::canonicalize(&dir).unwrap_or(dir)
}

fn pg_regress_binary() -> PathBuf {
    let pg_config = std::env::var("MMTS_PG_CONFIG").unwrap_or_else(|_| "pg_config".into());
    let out = Command::new(&pg_config).arg("--pkglibdir").output().expect("run pg_config --pkglibdir");
    assert!(out.status.success(), "{pg_config} --pkglibdir failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("pgxs/src/test/regress/pg_regress")
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    Pass,
    Fail,
}

/// One pg_regress run.
struct Run {
    /// Every test pg_regress reported, by name.
    results: BTreeMap<String, Outcome>,
    /// The `regression.diffs` hunk of each failed test.
    diffs: BTreeMap<String, String>,
    /// pg_regress's output directory.
    out: PathBuf,
    elapsed: Duration,
    /// Whether pg_regress had to be stopped after `MMTS_REGRESS_TIMEOUT`.
    timed_out: bool,
}

/// Test name and outcome from one line of pg_regress's progress output
/// (`test name ... ok 12 ms`, `     name ... FAILED 40 ms`, `     name ... failed (ignored)`).
fn parse_result_line(line: &str) -> Option<(String, Outcome)> {
    // PostgreSQL 16 and later print TAP: `ok 12 + name  40 ms`, `not ok 13 - name  40 ms`.
    let tap = line
        .strip_prefix("ok ")
        .map(|rest| (Outcome::Pass, rest))
        .or_else(|| line.strip_prefix("not ok ").map(|rest| (Outcome::Fail, rest)));
    if let Some((outcome, rest)) = tap {
        let mut words = rest.split_whitespace();
        words.next()?.parse::<u32>().ok()?;
        let name = words.find(|w| *w != "+" && *w != "-")?;
        return Some((name.to_string(), outcome));
    }
    let (left, right) = line.split_once(" ... ")?;
    let left = left.trim();
    let name = left.strip_prefix("test ").unwrap_or(left).trim();
    if name.is_empty() || name.contains(char::is_whitespace) {
        return None;
    }
    let word = right.split_whitespace().next()?;
    let outcome = match word {
        "ok" => Outcome::Pass,
        "FAILED" | "failed" => Outcome::Fail,
        _ => return None,
    };
    Some((name.to_string(), outcome))
}

/// `regression.diffs` split per test: each part starts with `diff … expected/X.out results/X.out`.
fn split_diffs(text: &str) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.starts_with("diff ") {
            current = line
                .split_whitespace()
                .last()
                .and_then(|p| Path::new(p).file_stem())
                .map(|s| s.to_string_lossy().into_owned());
        }
        if let Some(name) = &current {
            let part = out.entry(name.clone()).or_default();
            part.push_str(line);
            part.push('\n');
        }
    }
    out
}

/// Test names the schedule marks `ignore:` (pg_regress reports their failures as ignored).
fn ignored_tests(schedule: &Path) -> BTreeSet<String> {
    let text = fs::read_to_string(schedule).expect("read parallel_schedule");
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("ignore:"))
        .flat_map(|rest| rest.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

/// `tests/regress/<major>/`: what is recorded of the suite of the server's major version.
fn recorded() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("regress/{}", mmts_tests::server_major()))
}

/// `tests/regress/<major>/intended.txt`: `name  reason` per line, `#` comments.
fn intended() -> BTreeMap<String, String> {
    let path = recorded().join("intended.txt");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, reason) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        assert!(!reason.trim().is_empty(), "{}:{}: `{name}` needs a reason after its name", path.display(), i + 1);
        out.insert(name.to_string(), reason.trim().to_string());
    }
    out
}

/// The errors a test's diff adds to PostgreSQL's expected output: its `ERROR:` lines on the
/// cluster node, each once, sorted, node ids written as `N` (which peer answers first varies).
fn added_errors(diff: &str) -> Vec<String> {
    let mut errors: BTreeSet<String> = BTreeSet::new();
    for line in diff.lines() {
        let Some(error) = line.strip_prefix("+ERROR:") else { continue };
        let mut text = String::new();
        let mut rest = error.trim();
        while let Some(at) = rest.find("node ") {
            text.push_str(&rest[..at + 5]);
            rest = &rest[at + 5..];
            let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            if digits > 0 {
                text.push('N');
                rest = &rest[digits..];
            }
        }
        text.push_str(rest);
        errors.insert(text);
    }
    errors.into_iter().collect()
}

/// The errors an intended difference is expected to add (`tests/regress/<major>/errors/<name>.txt`,
/// one per line; none when the file is missing). `MMTS_REGRESS_BLESS=1` writes them from
/// the run instead.
fn expected_errors(name: &str, actual: &[String]) -> Vec<String> {
    let path = recorded().join("errors").join(format!("{name}.txt"));
    if std::env::var_os("MMTS_REGRESS_BLESS").is_some() {
        let _ = fs::create_dir_all(path.parent().expect("dir"));
        if actual.is_empty() {
            let _ = fs::remove_file(&path);
        } else {
            fs::write(&path, actual.join("\n") + "\n").expect("write expected errors");
        }
    }
    fs::read_to_string(&path).map(|t| t.lines().map(str::to_owned).collect()).unwrap_or_default()
}

/// Runs the whole schedule against `node`, database `postgres`, output into `out` (made afresh).
fn pg_regress(node: &Node, suite: &Path, out: &Path) -> Run {
    let _ = fs::remove_dir_all(out);
    fs::create_dir_all(out).expect("create pg_regress output dir");
    give_to_server_user(out);
    let binary = pg_regress_binary();
    let as_root = unsafe { libc::geteuid() } == 0;
    // As root, as the server user: the servers write COPY output into the output directory.
    let mut cmd = if as_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&binary);
        c
    } else {
        Command::new(&binary)
    };
    cmd.arg("--use-existing")
        .arg("--host=127.0.0.1")
        .arg(format!("--port={}", node.port()))
        .arg("--user=postgres")
        .arg("--dbname=postgres")
        .arg(format!("--bindir={}", bindir().display()))
        .arg(format!("--schedule={}", suite.join("parallel_schedule").display()))
        .arg(format!("--inputdir={}", suite.display()))
        .arg(format!("--outputdir={}", out.display()))
        .arg(format!("--dlpath={}", suite.display()));
    if let Ok(n) = std::env::var("MMTS_REGRESS_MAX_CONCURRENT") {
        cmd.arg(format!("--max-concurrent-tests={n}"));
    }
    let log_path = out.join("pg_regress.out");
    let log = fs::File::create(&log_path).expect("create pg_regress.out");
    cmd.stdout(log.try_clone().unwrap()).stderr(log).stdin(Stdio::null()).process_group(0);

    let timeout = Duration::from_secs(env_secs("MMTS_REGRESS_TIMEOUT", 1500));
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
    let mut timed_out = false;
    loop {
        if child.try_wait().expect("wait for pg_regress").is_some() {
            break;
        }
        if started.elapsed() > timeout {
            say(&format!(
                "pg_regress on port {} still running after {timeout:?} (MMTS_REGRESS_TIMEOUT); what the server does:\n{}\n",
                node.port(),
                activity(node)
            ));
            // pg_regress and the psql it started share the process group it leads.
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.wait();
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let elapsed = started.elapsed();
    let output = fs::read_to_string(&log_path).unwrap_or_default();
    let results: BTreeMap<String, Outcome> = output.lines().filter_map(parse_result_line).collect();
    assert!(!results.is_empty(), "pg_regress reported no test results; its output ({}):\n{output}", log_path.display());
    let diffs = split_diffs(&fs::read_to_string(out.join("regression.diffs")).unwrap_or_default());
    Run { results, diffs, out: out.to_path_buf(), elapsed, timed_out }
}

/// What every backend of `node` is doing, one line each.
fn activity(node: &Node) -> String {
    match node.try_connect(Duration::from_secs(5)).and_then(|mut c| {
        c.simple_query(
            "SELECT format('%s %s %s %s/%s %s', pid, backend_type, state, wait_event_type, wait_event,
                    left(regexp_replace(query, '\\s+', ' ', 'g'), 120))
               FROM pg_stat_activity WHERE pid <> pg_backend_pid()",
        )
    }) {
        Ok(rows) => rows
            .into_iter()
            .filter_map(|m| match m {
                mmts_tests::postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => format!("(cannot ask: {})", describe(&e)),
    }
}

/// The first `n` lines of `text`, with a note of how many were left out.
fn head(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = lines[..lines.len().min(n)].join("\n");
    if lines.len() > n {
        let _ = write!(out, "\n    … {} more lines", lines.len() - n);
    }
    out
}

/// `nodes` servers with the harness's settings and `MMTS_REGRESS_CONF`.
///
/// Most of the suite's tables have no primary key, and the tests update and delete their rows:
/// with `multimaster.ignore_tables_without_pk = off` every such update or delete is refused and
/// much of the suite fails for that one reason. So such tables are kept local to each node here
/// (and left out of the comparison of the nodes' rows).
fn builder(nodes: usize) -> ClusterBuilder {
    let mut b = ClusterBuilder::new(nodes).set("multimaster.ignore_tables_without_pk", "on");
    if let Ok(conf) = std::env::var("MMTS_REGRESS_CONF") {
        for kv in conf.split(';').filter(|s| !s.trim().is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("MMTS_REGRESS_CONF: `{kv}` is not key=value"));
            b = b.set(k.trim(), v.trim());
        }
    }
    b
}

/// Replicated tables (plain tables and partitions, permanent, outside the system schemas and
/// mtm, not made local; without a key only when such tables are replicated, i.e. when
/// `multimaster.ignore_tables_without_pk` is off), each with its row count and a digest of its
/// rows (`FROM ONLY`: inherited rows are counted in their own table). A table that cannot be
/// read has its error instead.
fn table_digests(node: &Node, only: Option<&BTreeSet<String>>) -> BTreeMap<String, String> {
    let mut c = node.connect();
    c.batch_execute("SET statement_timeout = '120s'").unwrap();
    let list = c
        .simple_query(
            "SELECT format('%I.%I', n.nspname, c.relname)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind = 'r' AND c.relpersistence = 'p'
                AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'mtm')
                AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
                AND NOT EXISTS (SELECT FROM mtm.local_tables l
                                 WHERE l.schema_name = n.nspname AND l.table_name = c.relname)
                AND (NOT current_setting('multimaster.ignore_tables_without_pk')::bool
                     OR c.relreplident = 'f'
                     OR EXISTS (SELECT FROM pg_index i WHERE i.indrelid = c.oid
                                   AND ((c.relreplident = 'd' AND i.indisprimary)
                                        OR (c.relreplident = 'i' AND i.indisreplident))))",
        )
        .unwrap_or_else(|e| panic!("node {}: list tables: {}", node.id, describe(&e)));
    let tables: Vec<String> = list
        .into_iter()
        .filter_map(|m| match m {
            mmts_tests::postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .filter(|t| only.is_none_or(|o| o.contains(t)))
        .collect();
    let mut out = BTreeMap::new();
    for table in tables {
        let sql = format!(
            "SELECT count(*)::text || ' rows, ' || coalesce(md5(string_agg(t::text, ',' ORDER BY t::text)), '-') FROM ONLY {table} t"
        );
        let value = match c.simple_query(&sql) {
            Ok(rows) => rows
                .into_iter()
                .find_map(|m| match m {
                    mmts_tests::postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                    _ => None,
                })
                .unwrap_or_default(),
            Err(e) => format!("error: {}", describe(&e)),
        };
        out.insert(table, value);
    }
    out
}

/// Tables whose digests differ between nodes (or that some node lacks), with each node's view.
fn differing(per_node: &[BTreeMap<String, String>]) -> BTreeMap<String, Vec<String>> {
    let names: BTreeSet<&String> = per_node.iter().flat_map(|m| m.keys()).collect();
    let mut out = BTreeMap::new();
    for name in names {
        let values: Vec<String> =
            per_node.iter().map(|m| m.get(name).cloned().unwrap_or_else(|| "absent".into())).collect();
        if values.iter().any(|v| v != &values[0]) {
            out.insert(name.clone(), values);
        }
    }
    out
}

/// Every node's `state members`, e.g. `online {1,2,3}`.
fn cluster_states(cluster: &Cluster) -> Vec<String> {
    cluster
        .nodes()
        .iter()
        .map(|node| {
            match node
                .try_connect(Duration::from_secs(5))
                .and_then(|mut c| c.query_one("SELECT state || ' ' || members::text FROM mtm.get_cluster_state()", &[]))
            {
                Ok(row) => row.get::<_, String>(0),
                Err(e) => format!("unreachable: {}", describe(&e)),
            }
        })
        .collect()
}

#[test]
fn regression_suite_on_a_cluster_node() {
    if let Ok(why) = std::env::var("MMTS_REGRESS_SKIP") {
        say(&format!("regress: skipped: {why}\n"));
        return;
    }
    if !recorded().join("intended.txt").exists() {
        say(&format!(
            "regress: skipped on PostgreSQL {}: no suite recorded for it ({} is missing)\n",
            mmts_tests::server_major(),
            recorded().join("intended.txt").display()
        ));
        return;
    }
    let whole = Instant::now();
    let root = regress_dir();
    let suite = root.join("suite");
    assert!(
        suite.join("regress.so").exists() && suite.join("parallel_schedule").exists(),
        "PostgreSQL's regression suite is not prepared in {}: run scripts/regress-suite.sh",
        suite.display()
    );
    let version = fs::read_to_string(root.join("VERSION")).unwrap_or_default();
    let intended = intended();
    let ignored = ignored_tests(&suite.join("parallel_schedule"));
    // The harness's watchdog stops a cluster that outlives MMTS_TEST_TIMEOUT: give it the
    // pg_regress run plus the checks.
    if std::env::var_os("MMTS_TEST_TIMEOUT").is_none() {
        let limit = env_secs("MMTS_REGRESS_TIMEOUT", 1500) + 600;
        std::env::set_var("MMTS_TEST_TIMEOUT", limit.to_string());
    }
    say(&format!("regress: PostgreSQL regression suite {} from {}\n", version.trim(), suite.display()));

    // Baseline: the same server and settings, without multimaster.
    let standalone = {
        let server = builder(1).multimaster(false).start();
        let run = pg_regress(server.node(1), &suite, &root.join("runs/standalone"));
        say(&format!(
            "regress: standalone: {} of {} tests pass, in {:.0} s\n",
            run.results.values().filter(|o| **o == Outcome::Pass).count(),
            run.results.len(),
            run.elapsed.as_secs_f64()
        ));
        run
    };

    // Node 1 of a synchronous cluster; no fault injection, so no proxies between the nodes.
    let cluster = builder(NODES).proxies(false).start();
    for node in cluster.nodes() {
        node.execute_local("CREATE EXTENSION mmts");
    }
    cluster.wait_replicating(WAIT);
    let run = pg_regress(cluster.node(1), &suite, &root.join("runs/cluster"));
    say(&format!(
        "regress: cluster node 1: {} of {} tests pass, in {:.0} s\n",
        run.results.values().filter(|o| **o == Outcome::Pass).count(),
        run.results.len(),
        run.elapsed.as_secs_f64()
    ));

    let mut problems: Vec<String> = Vec::new();
    let mut report = String::new();

    // 1. Tests passing standalone must pass on the cluster node, unless intended.
    let baseline: Vec<&String> = standalone
        .results
        .iter()
        .filter(|(name, o)| **o == Outcome::Pass && !ignored.contains(*name))
        .map(|(name, _)| name)
        .collect();
    let mut unexpected = Vec::new();
    let mut intended_failing = Vec::new();
    let mut intended_passing = Vec::new();
    for name in &baseline {
        match (run.results.get(*name), intended.get(*name)) {
            (Some(Outcome::Pass), None) => {}
            (Some(Outcome::Pass), Some(_)) => intended_passing.push(name.as_str()),
            (_, Some(reason)) => {
                intended_failing.push(format!("{name} ({reason})"));
                // It must fail the way it is listed: exactly the errors recorded for it.
                let actual = added_errors(run.diffs.get(*name).map(String::as_str).unwrap_or(""));
                let expected = expected_errors(name, &actual);
                if actual != expected {
                    let new: Vec<&String> = actual.iter().filter(|e| !expected.contains(e)).collect();
                    let gone: Vec<&String> = expected.iter().filter(|e| !actual.contains(e)).collect();
                    problems.push(format!(
                        "{name} differs other than intended: errors not expected: {new:?}; expected errors missing: {gone:?}"
                    ));
                }
            }
            (_, None) => unexpected.push(name.as_str()),
        }
    }
    let passing = baseline.iter().filter(|n| run.results.get(**n) == Some(&Outcome::Pass)).count();
    let _ = writeln!(report, "cluster: {passing} of {} tests that pass standalone pass", baseline.len());
    let failing_standalone: Vec<&str> =
        standalone.results.iter().filter(|(_, o)| **o == Outcome::Fail).map(|(n, _)| n.as_str()).collect();
    if !failing_standalone.is_empty() {
        let _ = writeln!(
            report,
            "failing standalone already (not compared): {} — see {}/regression.diffs",
            failing_standalone.join(" "),
            standalone.out.display()
        );
    }
    if !intended_failing.is_empty() {
        let _ = writeln!(report, "intended differences: {}", intended_failing.join(", "));
    }
    if !intended_passing.is_empty() {
        let _ = writeln!(
            report,
            "listed in tests/regress/<major>/intended.txt but passing now (remove them): {}",
            intended_passing.join(" ")
        );
    }
    let unknown: Vec<&str> = intended
        .keys()
        .filter(|n| !n.starts_with("table:"))
        .filter(|n| !standalone.results.contains_key(*n) && !run.results.contains_key(*n))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        problems.push(format!(
            "tests/regress/<major>/intended.txt names tests the suite does not have: {}",
            unknown.join(" ")
        ));
    }
    if run.timed_out {
        problems.push("pg_regress on the cluster node did not finish in MMTS_REGRESS_TIMEOUT".into());
    }
    if standalone.timed_out {
        problems.push("pg_regress on the standalone server did not finish in MMTS_REGRESS_TIMEOUT".into());
    }
    if !unexpected.is_empty() {
        let _ = writeln!(
            report,
            "passing standalone, failing on the cluster node ({}): {}",
            unexpected.len(),
            unexpected.join(" ")
        );
        for name in &unexpected {
            let hunk = match run.diffs.get(*name) {
                Some(d) => head(d, 30),
                None if !run.results.contains_key(*name) => "    (not run)".into(),
                None => "    (no diff)".into(),
            };
            let _ = writeln!(report, "----- {name} -----\n{hunk}");
        }
        problems.push(format!(
            "{} tests pass standalone but fail on the cluster node: {} (diffs in {}/regression.diffs)",
            unexpected.len(),
            unexpected.join(" "),
            run.out.display()
        ));
    }

    // 2. Every node an online member.
    let all_online = || cluster_states(&cluster).iter().all(|s| s == "online {1,2,3}");
    let settle = Instant::now();
    while !all_online() && settle.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_secs(1));
    }
    let states = cluster_states(&cluster);
    let _ = writeln!(
        report,
        "node states after the suite: {}",
        states.iter().enumerate().map(|(i, s)| format!("node {}: {s}", i + 1)).collect::<Vec<_>>().join(", ")
    );
    if !states.iter().all(|s| s == "online {1,2,3}") {
        problems.push(format!("not every node is an online member after the suite: {states:?}"));
    }

    // 3. Every replicated table alike on every node (what still differs is looked at again for
    // up to 30 s, in case a peer is still applying).
    let mut per_node: Vec<BTreeMap<String, String>> = cluster.nodes().iter().map(|n| table_digests(n, None)).collect();
    let compared = per_node[0].len();
    let mut diff = differing(&per_node);
    let recheck = Instant::now();
    while !diff.is_empty() && recheck.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_secs(5));
        let names: BTreeSet<String> = diff.keys().cloned().collect();
        per_node = cluster.nodes().iter().map(|n| table_digests(n, Some(&names))).collect();
        diff = differing(&per_node);
    }
    let _ = writeln!(report, "tables compared: {compared}, differing: {}", diff.len());
    for (table, values) in &diff {
        let _ = writeln!(
            report,
            "  {table}: {}",
            values.iter().enumerate().map(|(i, v)| format!("node {}: {v}", i + 1)).collect::<Vec<_>>().join("; ")
        );
    }
    // A table listed as `table:<schema>.<name>` in intended.txt may differ, for its reason.
    let unexpected: Vec<String> =
        diff.keys().filter(|t| !intended.contains_key(&format!("table:{t}"))).cloned().collect();
    if !unexpected.is_empty() {
        problems.push(format!("{} tables differ between nodes: {}", unexpected.len(), unexpected.join(" ")));
    }

    // The nodes' logs stay with the run's output, for reading after the cluster is gone.
    for node in cluster.nodes() {
        let copy = run.out.join(format!("node{}.log", node.id));
        if fs::copy(node.log_path(), &copy).is_ok() {
            let _ = fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o644));
        }
    }
    let _ = writeln!(
        report,
        "times: standalone {:.0} s, cluster {:.0} s, whole test {:.0} s",
        standalone.elapsed.as_secs_f64(),
        run.elapsed.as_secs_f64(),
        whole.elapsed().as_secs_f64()
    );
    say(&format!("===== regress report =====\n{report}===== end of regress report =====\n"));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
