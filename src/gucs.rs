//! The `multimaster.*` GUCs: definition at library load, and the start-up check that turns
//! a bad configuration into one clear FATAL message (the postmaster then exits; it does not
//! crash-loop).

use std::ffi::{CStr, CString};
use std::sync::OnceLock;

use mmts_core::config::{self, ConfigError, ErrorKind, Mode, Settings};
use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use crate::backend::cstring;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

pub static NODE_ID: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static CONN_STRINGS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// For tests: where a committing backend stops (see `commit::failpoint`).
pub static FAILPOINT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static WORKERS: GucSetting<i32> = GucSetting::<i32>::new(8);
pub static QUEUE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(256 << 20);
pub static HEARTBEAT_SEND_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(200);
pub static HEARTBEAT_RECV_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(2000);
pub static IGNORE_TABLES_WITHOUT_PK: GucSetting<bool> = GucSetting::<bool>::new(false);
/// On: this session reads replicated tables on a node that is not online, possibly missing
/// what the cluster committed (see `commit::hooks::refuse_stale_reads`).
pub static ALLOW_STALE_READS: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static TWOPC_MIN_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(5000);
pub static TWOPC_PREPARE_RATIO: GucSetting<i32> = GucSetting::<i32>::new(5000);
/// Off: this session's schema changes stay on this node (see `ddl`).
pub static REPLICATE_DDL: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static USE_RAFTABLE: GucSetting<bool> = GucSetting::<bool>::new(false);
/// A node catching up has its peers forward the transactions of nodes it cannot reach (see
/// `apply::forwarded`).
pub static FORWARDING: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Async mode: how long (ms) a walsender that has sent everything waits before it looks for
/// more (see `output_plugin::batch_delay`).
pub static ASYNC_BATCH_DELAY: GucSetting<i32> = GucSetting::<i32>::new(10);
/// The longest spacing (ms) of a member's write commits while a node catches up (see
/// `mmts_core::flow`); 0: none.
pub static CATCH_UP_THROTTLE: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static COMMIT_MODE: GucSetting<CommitMode> = GucSetting::<CommitMode>::new(CommitMode::Sync);

/// How write transactions commit across the cluster (`multimaster.mode`).
#[derive(pgrx::PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum CommitMode {
    /// Two-phase commit on every live node before COMMIT returns.
    #[name = c"sync"]
    Sync,
    /// Commit locally; peers apply afterwards, concurrent writes resolved by last writer wins.
    #[name = c"async"]
    Async,
}

/// Whether this server commits write transactions synchronously across the cluster.
pub fn synchronous() -> bool {
    matches!(mode(), Mode::Multimaster(_)) && COMMIT_MODE.get() == CommitMode::Sync
}

/// The database this node replicates: the one its own connection string names (libpq's
/// default, the user name, when it names none).
pub fn replicated_database(config: &config::ClusterConfig) -> &str {
    let me = config.nodes.iter().find(|n| n.id == config.node_id).expect("this node is configured");
    me.conninfo.get("dbname").or(me.conninfo.get("user")).unwrap_or("postgres")
}

/// Whether this backend's database is the one mmts replicates.
pub fn in_replicated_database() -> bool {
    thread_local! {
        static ANSWER: std::cell::OnceCell<bool> = const { std::cell::OnceCell::new() };
    }
    let Mode::Multimaster(config) = mode() else { return false };
    // SAFETY: a plain global, on the backend's main thread.
    if unsafe { pg_sys::MyDatabaseId } == pg_sys::InvalidOid {
        return false;
    }
    ANSWER.with(|a| {
        if let Some(answer) = a.get() {
            return *answer;
        }
        // Looked up in the catalog, so only inside a running transaction (this may be asked
        // while one aborts: then nothing was written through mmts, the hooks having asked
        // first).
        if unsafe { !pg_sys::IsTransactionState() } {
            return false;
        }
        // SAFETY: inside a transaction (checked above); the name is NULL-checked before it is
        // read, and palloc'd, NUL-terminated.
        let name = unsafe { pg_sys::get_database_name(pg_sys::MyDatabaseId) };
        let answer =
            !name.is_null() && unsafe { CStr::from_ptr(name) }.to_bytes() == replicated_database(config).as_bytes();
        *a.get_or_init(|| answer)
    })
}

/// Highest node id mmts accepts.
pub const MAX_NODES: i32 = 64;

/// The mode chosen at server start; inherited by every backend and worker.
static MODE: OnceLock<Mode> = OnceLock::new();

/// The mode this server runs in (standalone when mmts was not preloaded).
pub fn mode() -> &'static Mode {
    MODE.get_or_init(|| Mode::Standalone)
}

/// One integer GUC: name, description, default, range, context, unit.
struct IntGuc {
    name: &'static CStr,
    short: &'static CStr,
    setting: &'static GucSetting<i32>,
    min: i32,
    max: i32,
    context: GucContext,
    flags: GucFlags,
}

/// How long a transaction that ran `duration_us` before its commit waits for votes, in µs.
pub fn vote_timeout_us(duration_us: i64) -> i64 {
    let ratio = duration_us.max(0).saturating_mul(TWOPC_PREPARE_RATIO.get() as i64) / 100;
    (TWOPC_MIN_TIMEOUT.get() as i64 * 1000).max(ratio)
}

/// Every mmts GUC name, for the start-up check and `mtm.get_cluster_info()`.
pub const NAMES: &[&str] = &[
    "multimaster.node_id",
    "multimaster.conn_strings",
    "multimaster.workers",
    "multimaster.queue_size",
    "multimaster.heartbeat_send_timeout",
    "multimaster.heartbeat_recv_timeout",
    "multimaster.ignore_tables_without_pk",
    "multimaster.twopc_min_timeout",
    "multimaster.twopc_prepare_ratio",
    "multimaster.use_raftable",
    "multimaster.mode",
    "multimaster.async_batch_delay",
];

/// Defines the GUCs, while shared_preload_libraries load. A value in postgresql.conf that
/// PostgreSQL could not accept (it would otherwise log a WARNING and silently keep the
/// default) stops the server.
pub fn define() {
    // What the configuration file said, read before the definitions replace the placeholders.
    let raw: Vec<(&str, Option<String>)> = NAMES.iter().map(|n| (*n, config_option(n))).collect();

    let ints = [
        IntGuc {
            name: c"multimaster.node_id",
            short: c"This node's id: its 1-based position in multimaster.conn_strings (0: not a multimaster node).",
            setting: &NODE_ID,
            min: 0,
            max: MAX_NODES,
            context: GucContext::Postmaster,
            flags: GucFlags::default(),
        },
        IntGuc {
            name: c"multimaster.workers",
            short: c"Number of workers applying replicated transactions.",
            setting: &WORKERS,
            min: 1,
            max: 1024,
            context: GucContext::Postmaster,
            flags: GucFlags::default(),
        },
        IntGuc {
            name: c"multimaster.queue_size",
            short: c"Size of the queue of replicated changes waiting to be applied.",
            setting: &QUEUE_SIZE,
            min: 1 << 20,
            max: i32::MAX,
            context: GucContext::Postmaster,
            flags: GucFlags::UNIT_BYTE,
        },
        IntGuc {
            name: c"multimaster.heartbeat_send_timeout",
            short: c"Interval between heartbeats sent to every peer.",
            setting: &HEARTBEAT_SEND_TIMEOUT,
            min: 1,
            max: i32::MAX,
            context: GucContext::Sighup,
            flags: GucFlags::UNIT_MS,
        },
        IntGuc {
            name: c"multimaster.catch_up_throttle",
            short: c"The longest spacing between two write commits that a member imposes while a node catches up without gaining on the members; 0 turns this flow control off.",
            setting: &CATCH_UP_THROTTLE,
            min: 0,
            max: 10_000,
            context: GucContext::Sighup,
            flags: GucFlags::UNIT_MS,
        },
        IntGuc {
            name: c"multimaster.async_batch_delay",
            short: c"In async mode, how long a walsender that has sent every committed transaction waits before sending more, so that what commits meanwhile goes to the peer at once.",
            setting: &ASYNC_BATCH_DELAY,
            min: 0,
            max: 1000,
            context: GucContext::Sighup,
            flags: GucFlags::UNIT_MS,
        },
        IntGuc {
            name: c"multimaster.heartbeat_recv_timeout",
            short: c"A peer silent for this long is considered unreachable.",
            setting: &HEARTBEAT_RECV_TIMEOUT,
            min: 1,
            max: i32::MAX,
            context: GucContext::Sighup,
            flags: GucFlags::UNIT_MS,
        },
        IntGuc {
            name: c"multimaster.twopc_min_timeout",
            short: c"Shortest wait for the votes of a two-phase commit before it is aborted.",
            setting: &TWOPC_MIN_TIMEOUT,
            min: 1,
            max: i32::MAX,
            context: GucContext::Sighup,
            flags: GucFlags::UNIT_MS,
        },
        IntGuc {
            name: c"multimaster.twopc_prepare_ratio",
            short: c"Wait for the votes of a two-phase commit at least this percentage of the time the transaction ran before its commit.",
            setting: &TWOPC_PREPARE_RATIO,
            min: 0,
            max: i32::MAX,
            context: GucContext::Sighup,
            flags: GucFlags::default(),
        },
    ];
    for g in ints {
        GucRegistry::define_int_guc(g.name, g.short, c"", g.setting, g.min, g.max, g.context, g.flags);
    }
    GucRegistry::define_string_guc(
        c"multimaster.conn_strings",
        c"Comma-separated libpq connection strings of all nodes, in node-id order.",
        c"",
        &CONN_STRINGS,
        GucContext::Postmaster,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_bool_guc(
        c"multimaster.ignore_tables_without_pk",
        c"Keep tables without a primary key or replica identity local instead of refusing writes to them.",
        c"",
        &IGNORE_TABLES_WITHOUT_PK,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"multimaster.allow_stale_reads",
        c"Let this session read replicated tables on a node that is not online, where reads may miss commits of the cluster.",
        c"",
        &ALLOW_STALE_READS,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"multimaster.replicate_ddl",
        c"Run this session's schema changes (DDL, GRANT, COMMENT, roles) on every node; off: on this node only.",
        c"",
        &REPLICATE_DDL,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"multimaster.forwarding",
        c"Synchronous mode: this node's receivers have their peers forward what other nodes committed without this node, so that it catches up while one of them is down.",
        c"Its peers mark and forward such transactions whatever this setting; set it alike on every node.",
        &FORWARDING,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"multimaster.use_raftable",
        c"Accepted for configurations of the original multimaster; mmts has built-in consensus.",
        c"",
        &USE_RAFTABLE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"multimaster.mode",
        c"sync: every write transaction commits on all live nodes or none (two-phase commit); async: commits locally and replicates afterwards.",
        c"",
        &COMMIT_MODE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"multimaster.failpoint",
        c"For tests only: a point of the commit where the backend stops (before_precommit, before_commit).",
        c"",
        &FAILPOINT,
        GucContext::Suset,
        GucFlags::NO_SHOW_ALL,
    );
    // SAFETY: from _PG_init, on the main thread; the prefix is a NUL-terminated static string.
    unsafe {
        pg_sys::MarkGUCPrefixReserved(c"multimaster".as_ptr());
    }

    for (name, value) in raw {
        if let Some(value) = value {
            refuse_unless_accepted(name, &value);
        }
    }
}

/// Stops the server when PostgreSQL would not accept `value` for `name`.
fn refuse_unless_accepted(name: &str, value: &str) {
    let (cname, cvalue) = (cstring(name), cstring(value));
    // SAFETY: from _PG_init while shared_preload_libraries load, on the main thread; a check only
    // (changeVal false), and `cname` and `cvalue` outlive the call.
    let accepted = unsafe {
        pg_sys::set_config_option(
            cname.as_ptr(),
            cvalue.as_ptr(),
            pg_sys::GucContext::PGC_POSTMASTER,
            pg_sys::GucSource::PGC_S_FILE,
            pg_sys::GucAction::GUC_ACTION_SET,
            false, // check only
            pg_sys::DEBUG1 as i32,
            false,
        )
    };
    if accepted == 0 {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid value for parameter \"{name}\": \"{value}\""),
            "mmts",
        )
        .set_hint(format!("Correct {name} in postgresql.conf; the WARNING above says what it accepts."))
        .report(PgLogLevel::FATAL);
    }
}

/// Reads every setting mmts depends on and validates them; a bad configuration is FATAL.
/// Runs in the postmaster, once, while `shared_preload_libraries` is processed.
pub fn check_at_startup() {
    let settings = Settings {
        node_id: NODE_ID.get(),
        conn_strings: CONN_STRINGS.get().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        workers: WORKERS.get(),
        queue_size: QUEUE_SIZE.get(),
        heartbeat_send_timeout_ms: HEARTBEAT_SEND_TIMEOUT.get(),
        heartbeat_recv_timeout_ms: HEARTBEAT_RECV_TIMEOUT.get(),
        ignore_tables_without_pk: IGNORE_TABLES_WITHOUT_PK.get(),
        twopc_min_timeout_ms: TWOPC_MIN_TIMEOUT.get(),
        use_raftable: USE_RAFTABLE.get(),
        wal_level: config_option("wal_level").unwrap_or_default(),
        max_prepared_transactions: int_option("max_prepared_transactions"),
        track_commit_timestamp: config_option("track_commit_timestamp").as_deref() == Some("on"),
        max_replication_slots: int_option("max_replication_slots"),
        max_wal_senders: int_option("max_wal_senders"),
        max_worker_processes: int_option("max_worker_processes"),
        output_plugin_libraries: config_option("output_plugin_libraries"),
    };
    match config::validate(&settings) {
        Ok((mode, notices)) => {
            for notice in notices {
                let report = ErrorReport::new(PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION, notice.message, "mmts");
                match notice.hint {
                    Some(hint) => report.set_hint(hint),
                    None => report,
                }
                .report(PgLogLevel::LOG);
            }
            let summary = match &mode {
                Mode::Standalone => {
                    "mmts loaded without multimaster.node_id: output plugin and SQL functions only".to_string()
                }
                Mode::Multimaster(c) => {
                    format!("mmts starting as node {} of a {}-node cluster", c.node_id, c.nodes.len())
                }
            };
            ErrorReport::new(PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION, summary, "mmts").report(PgLogLevel::LOG);
            let _ = MODE.set(mode);
        }
        Err(e) => refuse_to_start(e),
    }
}

fn refuse_to_start(e: ConfigError) -> ! {
    let code = match e.kind {
        ErrorKind::InvalidValue => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        ErrorKind::Prerequisite => PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
    };
    let report = ErrorReport::new(code, e.message, "mmts").set_hint(e.hint);
    match e.detail {
        Some(detail) => report.set_detail(detail),
        None => report,
    }
    .report(PgLogLevel::FATAL);
    unreachable!("FATAL does not return")
}

/// The current value of any GUC, without units; `None` if the server has no such GUC.
pub fn config_option(name: &str) -> Option<String> {
    let cname = cstring(name);
    // SAFETY: `cname` outlives the call; the value is NULL-checked and copied at once.
    unsafe {
        let value = pg_sys::GetConfigOption(cname.as_ptr(), true, false);
        (!value.is_null()).then(|| CStr::from_ptr(value).to_string_lossy().into_owned())
    }
}

/// A GUC as `SHOW` prints it (with units); `None` if the server has no such GUC.
pub fn show_option(name: &str) -> Option<String> {
    let cname = cstring(name);
    // SAFETY: `cname` outlives the call; the value is NULL-checked and copied at once.
    unsafe {
        let value = pg_sys::GetConfigOptionByName(cname.as_ptr(), std::ptr::null_mut(), true);
        (!value.is_null()).then(|| CStr::from_ptr(value).to_string_lossy().into_owned())
    }
}

fn int_option(name: &str) -> i32 {
    config_option(name).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Whether the current role may see connection strings (`multimaster.conn_strings`, the
/// nodes'): superusers only, as for the setting itself.
pub fn may_read_conn_strings() -> bool {
    // SAFETY: a catalog lookup of the current user; callers run inside a transaction.
    unsafe { pg_sys::superuser() }
}
