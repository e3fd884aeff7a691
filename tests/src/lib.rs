//! Multi-node test harness for mmts: real PostgreSQL 15 servers on loopback, with fault
//! injection.
//!
//! - [`ClusterBuilder`] starts N servers with the mmts extension preloaded and configured
//!   (`multimaster.node_id`, `multimaster.conn_strings`), each in its own temp dir, on free
//!   ports, as the `postgres` OS user when running as root. `initdb` runs once per test binary;
//!   nodes start from a copy of that template.
//! - Every directed link between two nodes goes through a [`Proxy`], so tests can cut, heal and
//!   delay it; [`Node::kill9`] crashes a node and [`Node::start`] brings it back.
//! - On a panic the tail of every node's server log is printed; servers and temp dirs are
//!   removed however the test ends.
//! - A cluster that lives longer than `MMTS_TEST_TIMEOUT` seconds (default 600) is taken for
//!   a hung test: its [`Watchdog`] prints what every server is doing, stops them and ends the
//!   test process, so a hang fails the suite at once instead of stalling it.

pub mod history;
pub mod proxy;
pub mod register;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::OnceLock;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

pub use postgres;
pub use proxy::Proxy;

/// The OS user that runs servers when the harness runs as root.
const SERVER_USER: &str = "postgres";

/// Settings every test server gets. Small and fast; fsync off (a kill -9 of the server does
/// not lose data that the OS already has).
const BASE_CONF: &[(&str, &str)] = &[
    ("listen_addresses", "'127.0.0.1'"),
    ("shared_preload_libraries", "'mmts'"),
    ("wal_level", "logical"),
    ("max_prepared_transactions", "64"),
    ("track_commit_timestamp", "on"),
    ("max_connections", "64"),
    ("max_wal_senders", "16"),
    ("max_replication_slots", "16"),
    ("max_worker_processes", "24"),
    ("output_plugin_libraries", "'pgoutput, test_decoding, mmts'"),
    ("shared_buffers", "32MB"),
    ("fsync", "off"),
    ("log_line_prefix", "'%m [%p] %q%a '"),
];

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Runs `cmd` as the server user when we are root, as ourselves otherwise.
fn server_command(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", SERVER_USER, "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn run_ok(cmd: &mut Command) {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes `path` (and all below it) belong to the server user (when root), so servers can
/// write there, and read files that must be their own (e.g. a TLS key).
pub fn give_to_server_user(path: &Path) {
    if is_root() {
        run_ok(Command::new("chown").args(["-R", &format!("{SERVER_USER}:{SERVER_USER}")]).arg(path));
    }
}

/// PostgreSQL's binaries: `$MMTS_PG_CONFIG` or `pg_config` on PATH tells where.
pub fn bindir() -> &'static Path {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR.get_or_init(|| bindir_of(Path::new(&std::env::var("MMTS_PG_CONFIG").unwrap_or_else(|_| "pg_config".into()))))
}

/// Whether the server knows the setting `name` (`postgres --describe-config`):
/// `output_plugin_libraries`, for one, exists only in some versions.
pub fn server_has_setting(name: &str) -> bool {
    has_setting(bindir(), name)
}

/// Whether the server whose binaries are in `bin` knows the setting `name`.
fn has_setting(bin: &Path, name: &str) -> bool {
    static SETTINGS: Mutex<BTreeMap<PathBuf, Vec<String>>> = Mutex::new(BTreeMap::new());
    let mut settings = SETTINGS.lock();
    settings
        .entry(bin.to_path_buf())
        .or_insert_with(|| {
            let out = run(Command::new(bin.join("postgres")).arg("--describe-config"));
            assert!(out.status.success(), "postgres --describe-config failed");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.split('\t').next())
                .map(String::from)
                .collect()
        })
        .iter()
        .any(|s| s == name)
}

/// Whether the server was built with TLS support (`pg_config --configure`).
pub fn server_has_ssl() -> bool {
    let pg_config = std::env::var("MMTS_PG_CONFIG").unwrap_or_else(|_| "pg_config".into());
    let out = run(Command::new(&pg_config).arg("--configure"));
    let configure = String::from_utf8_lossy(&out.stdout);
    configure.contains("--with-openssl") || configure.contains("--with-ssl=openssl")
}

/// The server's major version (15, 16, ...).
pub fn server_major() -> u32 {
    static MAJOR: OnceLock<u32> = OnceLock::new();
    *MAJOR.get_or_init(|| major_of(bindir()))
}

/// A port nobody listens on now. Ports are handed out in increasing order per process, from a
/// base derived from the process id, so that parallel tests and test binaries rarely collide;
/// all below the kernel's ephemeral range, so that a stopped node's port is never taken by
/// some outgoing connection's local end before the node starts again.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    const LOW: u16 = 10000;
    let high = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|&h| h > LOW + 1000)
        .unwrap_or(32768);
    let blocks = ((high - LOW) / 100) as u32;
    let _ =
        NEXT.compare_exchange(0, LOW + (std::process::id() % blocks) as u16 * 100, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        if port >= high {
            NEXT.store(LOW, Ordering::SeqCst);
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// `pg_ctl -D data` of the server binaries in `bin`, run as the server user.
fn pg_ctl(bin: &Path, data: &Path) -> Command {
    let mut c = server_command(&bin.join("pg_ctl"));
    c.arg("-D").arg(data);
    c
}

/// The bin directory of the PostgreSQL that `pg_config` belongs to.
pub fn bindir_of(pg_config: &Path) -> PathBuf {
    let out = run(Command::new(pg_config).arg("--bindir"));
    assert!(out.status.success(), "{} --bindir failed", pg_config.display());
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The major version of the PostgreSQL server whose binaries are in `bin`.
pub fn major_of(bin: &Path) -> u32 {
    let out = run(Command::new(bin.join("postgres")).arg("--version"));
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split_whitespace().nth(2).unwrap_or_default();
    version.split('.').next().and_then(|m| m.parse().ok()).unwrap_or_else(|| panic!("server version in {text:?}"))
}

/// The last `lines` lines of a server log.
fn log_tail(log: &Path, lines: usize) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A small seeded random number generator (xorshift) for workloads and faults: `next(n)` is in
/// `0..n`. Reproducible from its seed; no statistical claims.
pub fn random(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut state = seed | 1;
    move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n.max(1)
    }
}

/// Sets a stop flag when dropped, also when a panic unwinds: load threads in a
/// `thread::scope` that run until the flag is set then end, instead of keeping the scope (and
/// the failing test) waiting for them forever.
pub struct StopOnDrop<'a>(pub &'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A directory removed on drop (unless kept), owned by the server user.
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        static SEQ: AtomicU16 = AtomicU16::new(0);
        let base = std::env::var_os("MMTS_TEST_TMPDIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        let path = base.join(format!("{prefix}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst)));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        give_to_server_user(&path);
        TempDir { path, keep: false }
    }

    /// A given directory, created if missing; kept on drop.
    pub fn at(path: &Path) -> TempDir {
        fs::create_dir_all(path).expect("create dir");
        give_to_server_user(path);
        TempDir { path: path.to_path_buf(), keep: true }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep && std::env::var_os("MMTS_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// An initdb'd data directory of the server binaries in `bin`, made once per machine and
/// PostgreSQL version (in the temp dir) and copied for every node.
fn template(bin: &Path) -> PathBuf {
    static TEMPLATES: Mutex<BTreeMap<PathBuf, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut templates = TEMPLATES.lock();
    templates
        .entry(bin.to_path_buf())
        .or_insert_with(|| {
            let version = run(Command::new(bin.join("postgres")).arg("--version"));
            let version: String =
                String::from_utf8_lossy(&version.stdout).chars().filter(|c| c.is_ascii_alphanumeric()).collect();
            let base = std::env::var_os("MMTS_TEST_TMPDIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
            let path = base.join(format!("mmts-template-v1-{version}"));
            if path.join("PG_VERSION").exists() {
                return path;
            }
            // initdb into a private name, then rename: concurrent test binaries never see half a template.
            let dir = TempDir::new("mmts-initdb");
            let data = dir.path().join("data");
            run_ok(
                server_command(&bin.join("initdb"))
                    .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C", "-D"])
                    .arg(&data),
            );
            if fs::rename(&data, &path).is_err() && !path.join("PG_VERSION").exists() {
                panic!("cannot create the data directory template {}", path.display());
            }
            path
        })
        .clone()
}

/// One PostgreSQL server.
pub struct Node {
    /// 1-based, as in `multimaster.node_id`.
    pub id: usize,
    port: u16,
    dir: PathBuf,
    running: bool,
    /// What the harness wrote into postgresql.conf.
    conf: Vec<(String, String)>,
    /// Joins a running cluster later (see [`ClusterBuilder::joining`]).
    joining: bool,
    /// Environment variables the server starts with, besides the test's own (`None`: unset).
    env: Vec<(String, Option<String>)>,
    /// The server's binaries.
    bin: PathBuf,
}

impl Node {
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// A libpq connection string that reaches this node directly.
    pub fn connstr(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Sets (or with `None`, unsets) an environment variable of the server from its next start.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.map(str::to_string)));
    }

    /// Appends `key = value` lines to postgresql.conf (later lines win).
    pub fn append_conf(&self, settings: &[(String, String)]) {
        let mut text = String::from("\n# mmts test harness\n");
        for (k, v) in settings {
            let _ = writeln!(text, "{k} = {v}");
        }
        let path = self.data_dir().join("postgresql.conf");
        let mut conf = fs::read_to_string(&path).expect("read postgresql.conf");
        conf.push_str(&text);
        fs::write(&path, conf).expect("write postgresql.conf");
    }

    fn pg_ctl(&self) -> Command {
        let mut c = pg_ctl(&self.bin, &self.data_dir());
        for (key, value) in &self.env {
            match value {
                Some(v) => c.env(key, v),
                None => c.env_remove(key),
            };
        }
        c
    }

    /// Starts the server and waits until it accepts connections; on failure returns the
    /// server log written during this attempt.
    pub fn try_start(&mut self) -> Result<(), String> {
        let log = self.log_path();
        let before = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let out = run(self.pg_ctl().arg("-l").arg(&log).args(["-w", "-t", "60", "start"]));
        if out.status.success() {
            self.running = true;
            return Ok(());
        }
        let text = fs::read(&log).unwrap_or_default();
        let new = String::from_utf8_lossy(&text[(before as usize).min(text.len())..]).into_owned();
        Err(format!("{}{}{new}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }

    /// Starts the server; panics with its log if it does not start. A port held by some other
    /// socket for a moment is waited for (up to 5 s).
    pub fn start(&mut self) {
        for attempt in 1.. {
            match self.try_start() {
                Ok(()) => return,
                Err(log) if attempt < 6 && log.contains("could not bind") => {
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(log) => panic!("node {} did not start:\n{log}", self.id),
            }
        }
    }

    /// Clean shutdown (`pg_ctl stop -m fast`).
    pub fn stop(&mut self) {
        if self.running {
            run_ok(self.pg_ctl().args(["-w", "-m", "fast", "stop"]));
            self.running = false;
        }
    }

    fn postmaster_pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Crashes the node like a power cut: SIGKILL to the postmaster and all its children.
    pub fn kill9(&mut self) {
        let Some(pid) = self.postmaster_pid() else {
            panic!("node {} has no postmaster.pid", self.id);
        };
        unsafe {
            // Frozen first, so it cannot fork while its children are collected.
            libc::kill(pid, libc::SIGSTOP);
        }
        let children = children_of(pid);
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            for child in &children {
                libc::kill(*child, libc::SIGKILL);
            }
        }
        let all: Vec<i32> = std::iter::once(pid).chain(children.iter().copied()).collect();
        wait_for(&format!("node {} processes to die", self.id), Duration::from_secs(10), || {
            all.iter().all(|p| is_dead(*p))
        });
        // A dead postmaster stays a zombie until its parent (init) reaps it, and PostgreSQL
        // takes a zombie's pid in postmaster.pid for a live server: wait for the reaping.
        let reaped = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists() && reaped.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.running = false;
    }

    /// Whether the server answers a connection attempt now.
    pub fn is_up(&self) -> bool {
        self.try_connect(Duration::from_secs(2)).is_ok()
    }

    pub fn try_connect(&self, timeout: Duration) -> Result<postgres::Client, postgres::Error> {
        let mut cfg: postgres::Config = self.connstr().parse().expect("valid connstr");
        cfg.connect_timeout(timeout);
        cfg.application_name("mmts-tests");
        cfg.connect(postgres::NoTls)
    }

    pub fn connect(&self) -> postgres::Client {
        self.try_connect(Duration::from_secs(10)).unwrap_or_else(|e| panic!("cannot connect to node {}: {e}", self.id))
    }

    /// Runs one or more statements; panics with the server's message on error.
    pub fn execute(&self, sql: &str) {
        self.connect().batch_execute(sql).unwrap_or_else(|e| panic!("node {}: {sql}: {}", self.id, describe(&e)));
    }

    /// Runs statements on this node only: schema changes are not replicated (setting up each
    /// node before the cluster forms).
    pub fn execute_local(&self, sql: &str) {
        let mut client = self.connect();
        for step in ["SET multimaster.replicate_ddl = off", sql] {
            client.batch_execute(step).unwrap_or_else(|e| panic!("node {}: {step}: {}", self.id, describe(&e)));
        }
    }

    /// The first column of the first row of `sql`, as text (NULL as `None`).
    pub fn query_value(&self, sql: &str) -> Option<String> {
        let rows =
            self.connect().simple_query(sql).unwrap_or_else(|e| panic!("node {}: {sql}: {}", self.id, describe(&e)));
        rows.into_iter().find_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)),
            _ => None,
        })?
    }

    /// Every row of `sql`, its columns as text joined with `|` (NULL as `NULL`).
    pub fn query_rows(&self, sql: &str) -> Vec<String> {
        let messages =
            self.connect().simple_query(sql).unwrap_or_else(|e| panic!("node {}: {sql}: {}", self.id, describe(&e)));
        messages
            .into_iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).unwrap_or("NULL")).collect::<Vec<_>>().join("|"))
                }
                _ => None,
            })
            .collect()
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path(), lines)
    }

    pub fn is_running(&self) -> bool {
        self.running
    }
}

/// A database error with its SQLSTATE, message, detail and hint.
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{} {}{}{}",
            db.code().code(),
            db.message(),
            db.detail().map(|d| format!(" DETAIL: {d}")).unwrap_or_default(),
            db.hint().map(|h| format!(" HINT: {h}")).unwrap_or_default()
        ),
        None => e.to_string(),
    }
}

fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(stat) = fs::read_to_string(entry.path().join("stat")) {
            // pid (comm) state ppid ...: comm may contain spaces, so split after the last ')'.
            let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("").split_whitespace().collect();
            if fields.get(1).and_then(|p| p.parse::<i32>().ok()) == Some(pid) {
                out.push(child);
            }
        }
    }
    out
}

/// Gone, or a zombie.
pub fn is_dead(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().starts_with('Z')).unwrap_or(false))
        .unwrap_or(true)
}

/// Polls `cond` every 50 ms until it holds; panics after `timeout` naming `what`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    loop {
        if cond() {
            return;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Settings for a cluster before it starts.
pub struct ClusterBuilder {
    nodes: usize,
    multimaster: bool,
    proxies: bool,
    dir: Option<PathBuf>,
    base_port: Option<u16>,
    common: Vec<(String, String)>,
    per_node: BTreeMap<usize, Vec<(String, String)>>,
    joining: Vec<usize>,
    env: Vec<(String, Option<String>)>,
    /// Nodes that run other server binaries than `bindir()`.
    bin: BTreeMap<usize, PathBuf>,
    /// How long the test means to run its cluster (the watchdog waits that much longer).
    runs_for: Duration,
}

impl ClusterBuilder {
    /// Every node gets the settings of `$MMTS_TEST_SET` (`name=value;name=value`) first, so
    /// that a whole suite can run with a setting changed; a test's own [`ClusterBuilder::set`]
    /// comes later in postgresql.conf and wins.
    pub fn new(nodes: usize) -> ClusterBuilder {
        let common = std::env::var("MMTS_TEST_SET")
            .unwrap_or_default()
            .split(';')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        ClusterBuilder {
            nodes,
            multimaster: true,
            proxies: true,
            dir: None,
            base_port: None,
            common,
            per_node: BTreeMap::new(),
            joining: Vec::new(),
            env: Vec::new(),
            bin: BTreeMap::new(),
            runs_for: Duration::ZERO,
        }
    }

    /// Node `id` joins the running cluster later (see [`Cluster::copy_node`]): it is left out
    /// of the other nodes' `multimaster.conn_strings` (so ids above it must join too), and
    /// [`Cluster::start_all`] does not start it.
    pub fn joining(mut self, id: usize) -> Self {
        self.joining.push(id);
        self
    }

    /// Whether to set `multimaster.node_id` / `multimaster.conn_strings` (default yes).
    pub fn multimaster(mut self, on: bool) -> Self {
        self.multimaster = on;
        self
    }

    /// Whether links between nodes go through fault-injection proxies (default yes).
    pub fn proxies(mut self, on: bool) -> Self {
        self.proxies = on;
        self
    }

    /// Keep the cluster in `dir` (created if missing) instead of a temp dir removed on drop.
    pub fn keep_in(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_path_buf());
        self
    }

    /// Node `i` listens on `base + i - 1` instead of a free port.
    pub fn base_port(mut self, base: u16) -> Self {
        self.base_port = Some(base);
        self
    }

    /// An environment variable every server starts with (`None`: unset). Servers otherwise
    /// inherit the test's environment (in CI, `RUST_BACKTRACE=1`).
    pub fn server_env(mut self, key: &str, value: Option<&str>) -> Self {
        self.env.push((key.into(), value.map(Into::into)));
        self
    }

    /// A postgresql.conf setting for every node (the value as it is written in the file).
    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.common.push((key.into(), value.into()));
        self
    }

    /// A postgresql.conf setting for node `id` only (1-based); wins over [`ClusterBuilder::set`].
    pub fn set_node(mut self, id: usize, key: &str, value: &str) -> Self {
        self.per_node.entry(id).or_default().push((key.into(), value.into()));
        self
    }

    /// Node `id` runs the PostgreSQL that `pg_config` belongs to (default: `$MMTS_PG_CONFIG`'s).
    pub fn server_of_node(mut self, id: usize, pg_config: &Path) -> Self {
        self.bin.insert(id, bindir_of(pg_config));
        self
    }

    /// Creates the nodes' data directories and links, without starting anything.
    pub fn build(self) -> Cluster {
        let keep = self.dir.is_some();
        let dir = match &self.dir {
            Some(d) => TempDir::at(d),
            None => TempDir::new("mmts-cluster"),
        };
        let mut nodes = Vec::new();
        for id in 1..=self.nodes {
            let node_dir = dir.path().join(format!("node{id}"));
            let _ = fs::remove_dir_all(&node_dir);
            fs::create_dir_all(&node_dir).expect("create node dir");
            let bin = self.bin.get(&id).cloned().unwrap_or_else(|| bindir().to_path_buf());
            run_ok(Command::new("cp").arg("-a").arg(template(&bin)).arg(node_dir.join("data")));
            give_to_server_user(&node_dir);
            let port = self.base_port.map(|b| b + id as u16 - 1).unwrap_or_else(free_port);
            let joining = self.joining.contains(&id);
            nodes.push(Node {
                id,
                port,
                dir: node_dir,
                running: false,
                conf: Vec::new(),
                joining,
                env: self.env.clone(),
                bin,
            });
        }
        let mut links = BTreeMap::new();
        if self.proxies {
            for a in &nodes {
                for b in &nodes {
                    if a.id != b.id {
                        // free_port only saw the port free a moment ago: take the next if it is gone.
                        let proxy = (0..20)
                            .map(|_| Proxy::start(free_port(), b.addr()))
                            .find_map(Result::ok)
                            .expect("start proxy: no free port");
                        links.insert((a.id, b.id), proxy);
                    }
                }
            }
        }
        let ports: Vec<(usize, u16)> = nodes.iter().map(|n| (n.id, n.port)).collect();
        let ids: Vec<usize> = nodes.iter().map(|n| n.id).collect();
        for node in &mut nodes {
            let socket_dir = node.dir.display().to_string();
            let mut conf: Vec<(String, String)> = BASE_CONF
                .iter()
                .filter(|(k, _)| has_setting(&node.bin, k))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            conf.push(("port".into(), node.port.to_string()));
            conf.push(("unix_socket_directories".into(), format!("'{socket_dir}'")));
            conf.push(("cluster_name".into(), format!("'node{}'", node.id)));
            if self.multimaster {
                let conn_strings: Vec<String> = ids
                    .iter()
                    .filter(|&&peer| node.joining || !self.joining.contains(&peer))
                    .map(|&peer| {
                        let peer = &ports[peer - 1];
                        let port = links.get(&(node.id, peer.0)).map(Proxy::port).unwrap_or(peer.1);
                        format!("host=127.0.0.1 port={port} user=postgres dbname=postgres")
                    })
                    .collect();
                conf.push(("multimaster.node_id".into(), node.id.to_string()));
                conf.push(("multimaster.conn_strings".into(), format!("'{}'", conn_strings.join(", "))));
            }
            conf.extend(self.common.iter().cloned());
            conf.extend(self.per_node.get(&node.id).into_iter().flatten().cloned());
            node.append_conf(&conf);
            node.conf = conf;
        }
        // Kept clusters are for people (mmts-cluster, debugging): no time limit.
        let watchdog = (!keep).then(|| Watchdog::start(&nodes, self.runs_for));
        Cluster { nodes, links, dir, keep, _watchdog: watchdog }
    }

    /// The test means to run the cluster this long (a long run asked for by a setting): the
    /// watchdog takes it for hung only that much later than `MMTS_TEST_TIMEOUT`.
    pub fn runs_for(mut self, length: Duration) -> Self {
        self.runs_for = length;
        self
    }

    /// Builds and starts every node; panics (with server logs) if one does not start.
    pub fn start(self) -> Cluster {
        let mut cluster = self.build();
        cluster.start_all();
        cluster
    }
}

/// Stops every server found in a directory made with [`ClusterBuilder::keep_in`]; returns
/// how many were running.
pub fn stop_kept(dir: &Path) -> usize {
    let mut stopped = 0;
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let data = entry.path().join("data");
        if data.join("postmaster.pid").exists() {
            let out = run(pg_ctl(bindir(), &data).args(["-w", "-m", "fast", "stop"]));
            if out.status.success() {
                stopped += 1;
            }
        }
    }
    stopped
}

/// Running (or built) nodes and the links between them.
pub struct Cluster {
    nodes: Vec<Node>,
    links: BTreeMap<(usize, usize), Proxy>,
    dir: TempDir,
    keep: bool,
    _watchdog: Option<Watchdog>,
}

/// Ends the test process if its cluster outlives the test timeout: prints each server's
/// activity, prepared transactions and log tail, stops the servers and exits with status 1.
/// Dropping it (with the cluster) ends its thread.
struct Watchdog {
    _alive: std::sync::mpsc::Sender<()>,
}

impl Watchdog {
    fn start(nodes: &[Node], runs_for: Duration) -> Watchdog {
        let timeout =
            std::env::var("MMTS_TEST_TIMEOUT").ok().and_then(|s| s.parse().ok()).unwrap_or(600u64) + runs_for.as_secs();
        let (alive, dropped) = std::sync::mpsc::channel::<()>();
        let servers: Vec<(usize, u16, PathBuf, PathBuf)> =
            nodes.iter().map(|n| (n.id, n.port, n.data_dir(), n.log_path())).collect();
        let test = std::thread::current().name().unwrap_or("?").to_owned();
        std::thread::spawn(move || {
            if dropped.recv_timeout(Duration::from_secs(timeout)) != Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                return;
            }
            // Straight to stderr: the test harness's output capture would swallow eprintln!.
            let mut report =
                format!("===== {test}: still running after {timeout} s (MMTS_TEST_TIMEOUT): taken as hung =====\n");
            for (id, port, _, log) in &servers {
                let _ = write!(
                    report,
                    "----- node {id}: activity -----\n{}\n----- node {id} server log (tail) -----\n{}\n",
                    Watchdog::activity(*port),
                    log_tail(log, 60)
                );
            }
            let _ = std::io::Write::write_all(&mut std::io::stderr(), report.as_bytes());
            for (_, _, data, _) in &servers {
                if data.join("postmaster.pid").exists() {
                    let _ = run(pg_ctl(bindir(), data).args(["-w", "-m", "immediate", "stop"]));
                }
            }
            std::process::exit(1);
        });
        Watchdog { _alive: alive }
    }

    fn activity(port: u16) -> String {
        let cfg = format!(
            "host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2 options='-c statement_timeout=2000'"
        );
        let sql = "SELECT format('%s %s %s %s/%s %s', pid, backend_type, state, wait_event_type, wait_event, \
                   left(regexp_replace(query, '\\s+', ' ', 'g'), 100)) FROM pg_stat_activity \
                   UNION ALL SELECT format('prepared %s %s', gid, prepared) FROM pg_prepared_xacts";
        match postgres::Client::connect(&cfg, postgres::NoTls).and_then(|mut c| c.simple_query(sql)) {
            Ok(rows) => rows
                .into_iter()
                .filter_map(|m| match m {
                    postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join("\n"),
            Err(e) => format!("(cannot ask: {e})"),
        }
    }
}

impl Cluster {
    /// Starts every node but those joining later.
    pub fn start_all(&mut self) {
        for node in self.nodes.iter_mut().filter(|n| !n.joining) {
            node.start();
        }
    }

    /// Makes node `id` a copy of running node `from` (`pg_basebackup -R`: a standby of it),
    /// with its own settings and then `extra` in postgresql.conf; does not start it.
    pub fn copy_node(&mut self, id: usize, from: usize, extra: &[(&str, &str)]) {
        let port = self.node(from).port;
        let node = self.node_mut(id);
        node.stop();
        let data = node.data_dir();
        let _ = fs::remove_dir_all(&data);
        run_ok(
            server_command(&node.bin.join("pg_basebackup"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-U",
                    "postgres",
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                    "-R",
                    "-D",
                ])
                .arg(&data),
        );
        let mut conf = node.conf.clone();
        conf.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        node.append_conf(&conf);
        node.joining = false;
    }

    /// Node `id` (1-based).
    pub fn node(&self, id: usize) -> &Node {
        &self.nodes[id - 1]
    }

    pub fn node_mut(&mut self, id: usize) -> &mut Node {
        &mut self.nodes[id - 1]
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The proxy that node `from` uses to reach node `to`.
    pub fn link(&self, from: usize, to: usize) -> &Proxy {
        self.links.get(&(from, to)).unwrap_or_else(|| panic!("no link {from}->{to} (cluster built without proxies?)"))
    }

    /// The connection string node `from` has for node `to` in its `multimaster.conn_strings`.
    pub fn link_connstr(&self, from: usize, to: usize) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.link(from, to).port())
    }

    /// Cuts both directions between `a` and `b`.
    pub fn cut(&self, a: usize, b: usize) {
        self.link(a, b).cut();
        self.link(b, a).cut();
    }

    pub fn heal(&self, a: usize, b: usize) {
        self.link(a, b).heal();
        self.link(b, a).heal();
    }

    /// Cuts node `id` off from every other node.
    pub fn isolate(&self, id: usize) {
        for other in self.nodes.iter().filter(|n| n.id != id) {
            self.cut(id, other.id);
        }
    }

    pub fn heal_all(&self) {
        for proxy in self.links.values() {
            proxy.heal();
        }
    }

    /// Waits until every running node streams to every other running node (one mmts
    /// walsender per peer) and, where `CREATE EXTENSION mmts` was run, counts every running
    /// node as a member: from then on, every write reaches every node.
    pub fn wait_replicating(&self, timeout: Duration) {
        let running: Vec<&Node> = self.nodes.iter().filter(|n| n.running).collect();
        let peers = running.len() - 1;
        for node in &running {
            wait_for(&format!("node {} streaming to its {peers} peers", node.id), timeout, || {
                node.try_connect(Duration::from_secs(2))
                    .and_then(|mut c| {
                        c.query_one(
                            "SELECT count(*) FROM pg_stat_replication WHERE application_name LIKE 'mmts_node_%' AND state = 'streaming'",
                            &[],
                        )
                    })
                    .map(|r| r.get::<_, i64>(0) as usize >= peers)
                    .unwrap_or(false)
            });
        }
        // With the extension created, also until every node counts all of them as members,
        // and still does a second later (while nodes join, membership changes for a heartbeat
        // or two).
        let all_online = || {
            running.iter().all(|node| {
                let Ok(mut c) = node.try_connect(Duration::from_secs(2)) else { return false };
                match c.query_one(
                    "SELECT state = 'online' AND cardinality(members) > $1 FROM mtm.get_cluster_state()",
                    &[&(peers as i32)],
                ) {
                    Ok(row) => row.get::<_, bool>(0),
                    Err(e) => {
                        e.code() == Some(&postgres::error::SqlState::UNDEFINED_FUNCTION)
                            || e.code() == Some(&postgres::error::SqlState::INVALID_SCHEMA_NAME)
                    }
                }
            })
        };
        wait_for(&format!("all {} nodes online members, twice a second apart", peers + 1), timeout, || {
            all_online() && {
                std::thread::sleep(Duration::from_secs(1));
                all_online()
            }
        });
    }

    /// Log lines that a node killed or cut off (and healed: the proxy closes every connection
    /// that lived through the cut) causes on its peers, for [`Cluster::log_problems`]: a
    /// backend serving its signals (`mtm.deliver_signals`, several calls pipelined) or its
    /// heartbeats finds the client gone as it sends a result.
    pub const PEER_GONE: &'static [&'static str] =
        &["_signals LOG:  could not send data to client", "_heartbeat LOG:  could not send data to client"];

    /// Lines of the nodes' logs that no test should cause: a PANIC, a process killed by a
    /// signal, a "could not" — except those containing one of `caused` (what the test's own
    /// faults make happen). Each is prefixed with its node.
    pub fn log_problems(&self, caused: &[&str]) -> Vec<String> {
        let mut problems = Vec::new();
        for node in &self.nodes {
            let text = fs::read_to_string(node.log_path()).unwrap_or_default();
            for line in text.lines() {
                let bad =
                    line.contains("PANIC:") || line.contains("terminated by signal") || line.contains("could not");
                if bad && !caused.iter().any(|c| line.contains(c)) {
                    problems.push(format!("node {}: {line}", node.id));
                }
            }
        }
        problems
    }

    /// Stops every node cleanly.
    pub fn stop_all(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if std::thread::panicking() {
            for node in &self.nodes {
                eprintln!("----- node {} server log (tail) -----\n{}", node.id, node.log_tail(100));
            }
        }
        for node in &mut self.nodes {
            if node.running {
                let _ = run(node.pg_ctl().args(["-w", "-m", "immediate", "stop"]));
                node.running = false;
            }
        }
        self.links.clear();
    }
}
