//! Starts or stops a local mmts cluster on loopback (used by the README's demo command).
//!
//!   mmts-cluster start [--nodes N] [--dir DIR] [--port BASE]
//!   mmts-cluster stop [--dir DIR]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use mmts_tests::{stop_kept, ClusterBuilder, Node};

struct Args {
    command: String,
    nodes: usize,
    dir: PathBuf,
    port: u16,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { command: String::new(), nodes: 3, dir: PathBuf::from("/tmp/mmts-demo"), port: 15432 };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--nodes" => args.nodes = value("--nodes")?.parse().map_err(|_| "--nodes takes a number")?,
            "--dir" => args.dir = PathBuf::from(value("--dir")?),
            "--port" => args.port = value("--port")?.parse().map_err(|_| "--port takes a port number")?,
            "start" | "stop" if args.command.is_empty() => args.command = arg,
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    if args.command.is_empty() {
        return Err("usage: mmts-cluster start|stop [--nodes N] [--dir DIR] [--port BASE]".into());
    }
    Ok(args)
}

fn show(node: &Node, sql: &str) {
    for row in node.query_rows(sql) {
        println!("    {}", row.replace('|', " | "));
    }
}

fn start(args: &Args) -> Result<(), String> {
    let stopped = stop_kept(&args.dir);
    if stopped > 0 {
        println!("==> stopped {stopped} server(s) left from an earlier run in {}", args.dir.display());
    }
    let t = Instant::now();
    println!(
        "==> starting {} nodes in {} (ports {}..{})",
        args.nodes,
        args.dir.display(),
        args.port,
        args.port as usize + args.nodes - 1
    );
    let mut cluster = ClusterBuilder::new(args.nodes).proxies(false).keep_in(&args.dir).base_port(args.port).build();
    for node in 1..=args.nodes {
        cluster.node_mut(node).try_start().map_err(|log| format!("node {node} did not start:\n{log}"))?;
        println!("    node {node} up on port {}", cluster.node(node).port());
    }
    println!("==> cluster started in {:.1} s", t.elapsed().as_secs_f64());
    for node in cluster.nodes() {
        node.execute_local("CREATE EXTENSION IF NOT EXISTS mmts");
    }
    // Slots are made as the receivers start: writes count from when every node streams.
    cluster.wait_replicating(std::time::Duration::from_secs(30));
    // Schema changes are replicated: the table is created once, on node 1.
    cluster.node(1).execute("CREATE TABLE IF NOT EXISTS demo(id int PRIMARY KEY, written_on text)");
    println!("==> node 1: CREATE TABLE demo (runs on every node in the same commit)");
    for node in cluster.nodes() {
        node.execute(&format!("INSERT INTO demo VALUES ({0}, 'node{0}') ON CONFLICT DO NOTHING", node.id));
        println!("==> node {}: wrote row {} into table demo", node.id, node.id);
    }
    let t = Instant::now();
    let n = args.nodes as i64;
    let complete =
        |node: &Node| node.query_value("SELECT count(*) FROM demo").and_then(|c| c.parse::<i64>().ok()) == Some(n);
    while !cluster.nodes().iter().all(complete) && t.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for node in cluster.nodes() {
        println!("==> node {}: SELECT * FROM demo", node.id);
        show(node, "SELECT id, written_on FROM demo ORDER BY id");
    }
    if cluster.nodes().iter().all(complete) {
        println!("    every write is on every node ({:.1} s after the last write)", t.elapsed().as_secs_f64());
    } else {
        return Err("the writes did not reach every node within 30 s: see the server logs".into());
    }
    println!("==> node 1: SELECT * FROM mtm.get_cluster_state()");
    show(cluster.node(1), "SELECT * FROM mtm.get_cluster_state()");
    println!("==> node 1: SELECT node_id, conn_string, state, receiver_connected, walsender_connected, lag_bytes FROM mtm.get_nodes_state()");
    show(cluster.node(1), "SELECT node_id, conn_string, state, receiver_connected, walsender_connected, lag_bytes FROM mtm.get_nodes_state()");
    println!("==> node 1: SELECT * FROM mtm.get_cluster_info()");
    show(cluster.node(1), "SELECT name, value FROM mtm.get_cluster_info()");
    println!();
    println!(
        "Connect:  psql -h 127.0.0.1 -p {} -U postgres   (nodes on ports {}..{})",
        args.port,
        args.port,
        args.port as usize + args.nodes - 1
    );
    println!("Logs:     {}/node*/server.log", args.dir.display());
    println!("Stop:     scripts/demo.sh stop");
    Ok(())
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|args| match args.command.as_str() {
        "start" => start(&args),
        _ => {
            let n = stop_kept(&args.dir);
            println!("==> stopped {n} server(s) in {}", args.dir.display());
            Ok(())
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mmts-cluster: {e}");
            ExitCode::FAILURE
        }
    }
}
