//! One client's commit latency when every link between the nodes is slow: a synchronous
//! 3-node mmts cluster whose links go through the harness's proxies, first as they are
//! (loopback), then delayed DELAY ms each way, against a standalone server of the same
//! PostgreSQL. The client runs autocommit single-row UPDATEs on node 1 (the standalone
//! server) and prints the average and percentiles of each, and what the cluster adds over
//! the standalone server in round trips between two nodes (2 × DELAY each). Run by
//! `bench/delay.sh`.
//!
//!   mmts-link-delay [--delay-ms 5] [--seconds 10]

use std::process::ExitCode;
use std::time::{Duration, Instant};

use mmts_tests::{random, ClusterBuilder, Node};

const ROWS: i32 = 1000;

struct Latencies {
    /// Each commit's latency, in microseconds, sorted.
    micros: Vec<u64>,
    errors: usize,
}

impl Latencies {
    fn average_ms(&self) -> f64 {
        self.micros.iter().sum::<u64>() as f64 / self.micros.len().max(1) as f64 / 1000.0
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        if self.micros.is_empty() {
            return 0.0;
        }
        let i = ((self.micros.len() as f64 * p).ceil() as usize).clamp(1, self.micros.len()) - 1;
        self.micros[i] as f64 / 1000.0
    }

    fn line(&self, what: &str) {
        println!(
            "  {what:<34} {:>7} commits  avg {:>7.2} ms  p50 {:>7.2} ms  p99 {:>7.2} ms  errors {}",
            self.micros.len(),
            self.average_ms(),
            self.percentile_ms(0.5),
            self.percentile_ms(0.99),
            self.errors
        );
    }
}

/// One client's autocommit single-row UPDATEs of random rows on `node` for `length`.
fn measure(node: &Node, length: Duration) -> Latencies {
    let mut client = node.connect();
    let update = client.prepare("UPDATE acc SET v = v + 1 WHERE id = $1").expect("prepare");
    let mut next = random(0x5eed);
    let (mut micros, mut errors) = (Vec::new(), 0);
    let end = Instant::now() + length;
    while Instant::now() < end {
        let id = 1 + next(ROWS as u64) as i32;
        let t = Instant::now();
        match client.execute(&update, &[&id]) {
            Ok(_) => micros.push(t.elapsed().as_micros() as u64),
            Err(_) => errors += 1,
        }
    }
    micros.sort_unstable();
    Latencies { micros, errors }
}

const SCHEMA: &str = "CREATE TABLE acc(id int PRIMARY KEY, v bigint NOT NULL)";

/// The rows the client updates.
fn fill() -> String {
    format!("INSERT INTO acc SELECT g, 0 FROM generate_series(1, {ROWS}) g")
}

fn run(delay: Duration, length: Duration) -> Result<(), String> {
    println!("==> standalone server");
    let standalone_cluster = ClusterBuilder::new(1).multimaster(false).proxies(false).start();
    let standalone = standalone_cluster.node(1);
    standalone.execute(&format!("{SCHEMA}; {}", fill()));
    let alone = measure(standalone, length);
    drop(standalone_cluster);

    println!("==> synchronous 3-node cluster, links through proxies");
    let cluster = ClusterBuilder::new(3).start();
    for node in cluster.nodes() {
        node.execute_local(&format!("CREATE EXTENSION mmts; {SCHEMA}"));
    }
    cluster.wait_replicating(Duration::from_secs(60));
    cluster.node(1).execute(&fill());
    let undelayed = measure(cluster.node(1), length);
    println!("==> every link delayed {} ms each way", delay.as_millis());
    for a in 1..=3 {
        for b in (1..=3).filter(|&b| b != a) {
            cluster.link(a, b).set_delay(delay);
        }
    }
    // Heartbeats and streams settle on the new delay.
    std::thread::sleep(Duration::from_secs(2));
    let delayed = measure(cluster.node(1), length);

    println!();
    println!("One client, autocommit single-row UPDATE, {} s each:", length.as_secs());
    alone.line("standalone");
    undelayed.line("cluster, links on loopback");
    delayed.line(&format!("cluster, links +{} ms each way", delay.as_millis()));
    let round_trip = 2.0 * delay.as_secs_f64() * 1000.0;
    let added = delayed.average_ms() - alone.average_ms();
    let added_loopback = undelayed.average_ms() - alone.average_ms();
    println!(
        "Added by the cluster over standalone: {added_loopback:.2} ms on loopback; {added:.2} ms with delayed links = {:.2} round trips of {round_trip:.0} ms ({:.2} beyond the loopback cost)",
        added / round_trip,
        (added - added_loopback) / round_trip
    );
    if delayed.micros.is_empty() {
        return Err("no commit succeeded over the delayed links".into());
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut delay_ms = 5u64;
    let mut seconds = 10u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().and_then(|v| v.parse::<u64>().ok());
        match (arg.as_str(), value) {
            ("--delay-ms", Some(v)) => delay_ms = v,
            ("--seconds", Some(v)) => seconds = v.max(1),
            _ => {
                eprintln!("usage: mmts-link-delay [--delay-ms N] [--seconds N]");
                return ExitCode::from(2);
            }
        }
    }
    match run(Duration::from_millis(delay_ms), Duration::from_secs(seconds)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mmts-link-delay: {e}");
            ExitCode::FAILURE
        }
    }
}
