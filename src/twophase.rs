//! Shared state of synchronous commit on this node: the hybrid logical clock, and one entry per
//! transaction in two-phase commit here — local ones whose backend coordinates (and collects
//! votes delivered by the receivers), and peers' ones applied and prepared by a receiver. The
//! entries also give the [`Key`] of a lock holder when a receiver's apply conflicts with it.
//!
//! Signals to a peer (votes, "finished" for its transactions) go straight to it: the receiver
//! calls [`deliver_signals`] over a plain connection there. Without that connection they are
//! logical decoding messages written to this node's WAL ([`emit`]): the walsender that serves
//! the peer decodes them and the peer's receiver delivers them.
//!
//! A local transaction not yet in two-phase commit that holds a lock a peer's transaction
//! needs is *wounded*: it is doomed anyway (the peer's transaction is prepared on its origin,
//! and holds the row there), so it is canceled at once with 40001 rather than after its own
//! PREPARE loses; see [`classify_holder`].

use std::ffi::CStr;

use mmts_core::config::Mode;
use mmts_core::coordinator::{Delivery, Wake};
use mmts_core::indoubt::{self, Acceptor, Answer, Memory, Outcome, Request, CLOCK_MARGIN_US};
use mmts_core::participant::Holder;
use mmts_core::records::{self, Record, Records};
use mmts_core::twopc::{decode_batch, encode_batch, hlc_next, hlc_observe, Key, Signal, Vote, SIGNAL_PREFIX};
use mmts_core::NodeId;
use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};

use crate::gucs::MAX_NODES;

/// Transactions in two-phase commit at once on one node.
const SLOTS: usize = 1024;
const REASON_LEN: usize = 240;

#[derive(Clone, Copy)]
struct Entry {
    used: bool,
    /// This node's xid of the transaction.
    xid: u32,
    key: Key,
    /// Backend coordinating it (its PGPROC number), or -1 for a peer's transaction.
    procno: i32,
    /// For a peer's transaction: that node and its xid there, and the members it is
    /// prepared on.
    origin: u32,
    origin_xid: u32,
    members: u64,
    /// For a local transaction: when its backend wants to be woken.
    wake: Wake,
    /// Peers that voted yes / accepted its precommit / said they finished (bit n-1 for node n).
    yes: u64,
    accepted: u64,
    finished: u64,
    max_proposal: i64,
    /// First no vote: its node (0: none), SQLSTATE and message.
    no_node: u32,
    no_sqlstate: [u8; 5],
    no_message: [u8; REASON_LEN],
}

impl Default for Entry {
    fn default() -> Self {
        Entry {
            used: false,
            xid: 0,
            key: Key { ts: 0, node: NodeId(0) },
            procno: -1,
            origin: 0,
            origin_xid: 0,
            members: 0,
            wake: Wake::default(),
            yes: 0,
            accepted: 0,
            finished: 0,
            max_proposal: 0,
            no_node: 0,
            no_sqlstate: [0; 5],
            no_message: [0; REASON_LEN],
        }
    }
}

/// A receiver applying a peer's transaction (`procno` -1: none).
#[derive(Clone, Copy)]
struct Applying {
    procno: i32,
    key: Key,
}

/// A local transaction canceled in favour of a peer's transaction (`xid` 0: free).
#[derive(Clone, Copy, Default)]
struct Wound {
    xid: u32,
    procno: i32,
    by: u32,
    /// When it was dealt (the cancel may reach the backend a little later).
    at: i64,
}

const WOUNDS: usize = 64;

/// About 40 s of transactions at 800 a second before their records are replaced. (The
/// shared state is built on the postmaster's stack once: keep it to a few megabytes.)
const RECORDS: usize = 32768;

#[derive(Clone, Copy)]
pub struct Shared {
    clock: i64,
    entries: [Entry; SLOTS],
    applying: [Applying; MAX_NODES as usize],
    wounds: [Wound; WOUNDS],
    /// This node's records of transactions being settled, kept a while after they are
    /// carried out so that late questions get the answer.
    records: Records<RECORDS>,
    /// When shared memory was set up: records from before are lost (see [`memory`]), but for
    /// those kept on disk, read back once (`loaded`) before any record is used.
    started_at: i64,
    loaded: bool,
    /// The log of records being written (`mmts_core::records`), and how many entries it has.
    log_generation: u64,
    log_entries: u32,
    /// [node q][node p] (ids - 1): the end, in p's stream, of the last transaction this node
    /// committed that q did not take part in.
    committed_without: [[u64; MAX_NODES as usize]; MAX_NODES as usize],
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            clock: 0,
            entries: [Entry::default(); SLOTS],
            applying: [Applying { procno: -1, key: Key { ts: 0, node: NodeId(0) } }; MAX_NODES as usize],
            wounds: [Wound::default(); WOUNDS],
            records: Records::default(),
            started_at: crate::backend::now(),
            loaded: false,
            log_generation: 0,
            log_entries: 0,
            committed_without: [[0; MAX_NODES as usize]; MAX_NODES as usize],
        }
    }
}

// SAFETY: plain old data, no pointers.
unsafe impl PGRXSharedMemory for Shared {}

// SAFETY: a static lock, initialized once by `init` (pg_shmem_init!) while preloading.
static SHARED: PgLwLock<Shared> = unsafe { PgLwLock::new(c"mmts two-phase commit") };

pub fn init() {
    pg_shmem_init!(SHARED);
}

/// The next timestamp of this node's hybrid logical clock.
pub fn clock_next() -> i64 {
    let mut s = SHARED.exclusive();
    s.clock = hlc_next(s.clock, crate::backend::now());
    s.clock
}

/// The clock has seen `ts` (a peer's timestamp).
pub fn clock_observe(ts: i64) {
    let mut s = SHARED.exclusive();
    s.clock = hlc_observe(s.clock, ts);
}

/// Runs `f` on this node's record of transaction `xid` of node `origin` (made if there is
/// none: `mmts_core::records::Records::make`).
pub fn with_acceptor<R>(origin: NodeId, xid: u32, f: impl FnOnce(&mut Acceptor) -> R) -> R {
    let mut s = records();
    record_mut(&mut s, origin, xid, |r| f(&mut r.acceptor))
}

/// Records that transaction `xid` of node `origin` ended here as the cluster settled it.
pub fn settled(origin: NodeId, xid: u32, outcome: Outcome) {
    let mut s = records();
    record_mut(&mut s, origin, xid, |r| {
        r.acceptor.decide(outcome);
        r.settled = true;
    })
}

/// Where records kept on disk live: one file per transaction in this directory of the data
/// directory (every mmts process runs there).
const RECORDS_DIR: &str = "mmts_records";

fn record_path(origin: NodeId, xid: u32) -> std::path::PathBuf {
    std::path::Path::new(RECORDS_DIR).join(format!("{}_{xid}", origin.0))
}

/// The log of records (`mmts_core::records::Logged`) is two files in [`RECORDS_DIR`], used in
/// turn: a generation holds this many entries, then the file of the one before it starts
/// again. What a restart reads back is therefore the last 64k to 128k changes, more than the
/// table holds.
const LOG_ENTRIES: u32 = 65536;

fn log_path(generation: u64) -> std::path::PathBuf {
    std::path::Path::new(RECORDS_DIR).join(format!("log.{}", generation % 2))
}

thread_local! {
    /// This process's handle on the log file of a generation (opened to append).
    static LOG: std::cell::RefCell<Option<(u64, std::fs::File)>> = const { std::cell::RefCell::new(None) };
    /// This process's last append failed (and said so): the next failures are not logged.
    static LOG_FAILING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Appends `record` as it stands to the log, under the lock of the shared state (so entries
/// are written one at a time, in the order of the changes). Not synced here (see
/// `mmts_core::records`; [`sync_log`] does it now and then): an entry that fails to be
/// written leaves the node with less to read back after a restart, which is safe. Whether it
/// was written.
fn append_log(s: &mut Shared, record: &Record) -> bool {
    use std::io::Write;
    let fresh = s.log_generation == 0 || s.log_entries >= LOG_ENTRIES;
    if fresh {
        s.log_generation += 1;
        s.log_entries = 0;
    }
    let generation = s.log_generation;
    let written = LOG.with(|log| -> std::io::Result<()> {
        let mut log = log.borrow_mut();
        if fresh || log.as_ref().map(|(g, _)| *g) != Some(generation) {
            std::fs::create_dir_all(RECORDS_DIR)?;
            let file = std::fs::OpenOptions::new().append(true).create(true).open(log_path(generation))?;
            if fresh {
                file.set_len(0)?;
                (&file).write_all(&records::log_header(generation))?;
            }
            *log = Some((generation, file));
        }
        let (_, file) = log.as_mut().expect("opened above");
        file.write_all(&records::encode_logged(&record.logged()))
    });
    match written {
        Ok(()) => {
            s.log_entries += 1;
            LOG_FAILING.set(false);
            true
        }
        Err(e) => {
            LOG.with(|log| *log.borrow_mut() = None);
            if !LOG_FAILING.replace(true) {
                crate::logging::log(format!(
                    "mmts: cannot append to {} (after a restart this node may not answer about the transactions it could not log): {e}",
                    log_path(generation).display()
                ));
            }
            false
        }
    }
}

/// Syncs the log files to disk (the heartbeat worker calls it every heartbeat), so that after a
/// crash of the machine a node still knows all but the last moments' records. Skipped with
/// `fsync = off`, as PostgreSQL skips its own.
pub fn sync_log() {
    // SAFETY: a plain global setting, read on this process's main thread.
    if !unsafe { pg_sys::enableFsync } {
        return;
    }
    for generation in 0..2 {
        if let Ok(file) = std::fs::File::open(log_path(generation)) {
            let _ = file.sync_data();
        }
    }
}

/// The log files read back, older generation first.
fn read_log() -> Vec<records::LogFile> {
    let mut files: Vec<records::LogFile> =
        (0..2).filter_map(|g| records::decode_log(&std::fs::read(log_path(g)).ok()?)).collect();
    files.sort_by_key(|f| f.generation);
    files
}

/// The shared state, exclusively, with the records kept on disk read back (once after a
/// start, before any record is used).
fn records() -> pgrx::lwlock::PgLwLockExclusiveGuard<'static, Shared> {
    let mut s = SHARED.exclusive();
    if !s.loaded {
        s.loaded = true;
        let log = read_log();
        let logged: usize = log.iter().map(|f| f.entries.len()).sum();
        if let Some(newer) = log.last() {
            // Appending goes on in the newer file, from the end of what was read back.
            (s.log_generation, s.log_entries) = (newer.generation, newer.entries.len() as u32);
            let file = std::fs::OpenOptions::new().write(true).open(log_path(newer.generation));
            if let Err(e) = file.and_then(|f| f.set_len(newer.valid_len as u64)) {
                crate::logging::log(format!("mmts: cannot cut the damaged end off {RECORDS_DIR}: {e}"));
                s.log_entries = LOG_ENTRIES;
            }
        }
        s.records.replay(log.into_iter().flat_map(|f| f.entries));
        let mut read = 0;
        for entry in std::fs::read_dir(RECORDS_DIR).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("log.") {
                continue;
            }
            let parsed = name.split_once('_').and_then(|(o, x)| Some((o.parse::<u32>().ok()?, x.parse::<u32>().ok()?)));
            let record = std::fs::read(entry.path()).ok().and_then(|b| indoubt::decode_record(&b));
            match (parsed, record) {
                (Some((origin, xid)), Some(acceptor)) if origin != 0 => {
                    let r = s.records.make(NodeId(origin), xid, crate::backend::now());
                    r.acceptor.merge(&acceptor);
                    r.on_disk = true;
                    read += 1;
                }
                // Only a write cut short by a crash leaves one unreadable (the rename is
                // atomic): the temporary file of an answer that never left.
                _ => {
                    crate::logging::log(format!("mmts: ignoring {RECORDS_DIR}/{name}: not a record"));
                }
            }
        }
        if read > 0 || logged > 0 {
            crate::logging::log(format!(
                "mmts: read back {logged} logged changes of records and {read} records kept on disk for resolvers"
            ));
        }
    }
    s
}

/// Writes `record` of transaction `xid` of node `origin` to disk, durably (a new file synced,
/// renamed over the old one, the directory synced).
fn keep_on_disk(origin: NodeId, xid: u32, record: &Acceptor) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(RECORDS_DIR)?;
    let path = record_path(origin, xid);
    let temporary = path.with_extension("new");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(&indoubt::encode_record(record))?;
    file.sync_all()?;
    std::fs::rename(&temporary, &path)?;
    std::fs::File::open(RECORDS_DIR)?.sync_all()
}

/// Runs `f` on the record of transaction `xid` of node `origin` (made if there is none), and
/// logs what it changed.
fn record_mut<R>(s: &mut Shared, origin: NodeId, xid: u32, f: impl FnOnce(&mut Record) -> R) -> R {
    let record = s.records.make(origin, xid, crate::backend::now());
    let before = *record;
    let result = f(record);
    let after = *record;
    if (after.acceptor, after.settled) != (before.acceptor, before.settled) {
        let logged = append_log(s, &after);
        // A record kept on disk for a resolver goes once the transaction is carried out here,
        // after the log holds the outcome on disk: had the log lost it in a crash, the node
        // would read back less than it promised.
        if logged && after.on_disk && after.acceptor.decided.is_some() {
            sync_log();
            let _ = std::fs::remove_file(record_path(origin, xid));
            s.records.make(origin, xid, crate::backend::now()).on_disk = false;
        }
    }
    result
}

/// This node committed a transaction of `stream`'s (ending at `end` there) that the nodes
/// outside `members` did not take part in: before one of them coordinates a transaction, it
/// must have applied `stream` that far (see [`must_have_applied`]).
pub fn committed_without(members: mmts_core::membership::Mask, stream: NodeId, end: u64) {
    let mut s = SHARED.exclusive();
    for (q, row) in s.committed_without.iter_mut().enumerate() {
        if members & (1 << q) == 0 {
            let e = &mut row[stream.0 as usize - 1];
            *e = (*e).max(end);
        }
    }
}

/// How far node `node` must have applied each node's stream (index id - 1) to write (see
/// [`committed_without`]): otherwise it may not have seen some rows this node committed.
pub fn must_have_applied(node: NodeId) -> [u64; MAX_NODES as usize] {
    SHARED.share().committed_without[node.0 as usize - 1]
}

/// How transaction `xid` of node `origin` ended here, when this node knows.
pub fn decided(origin: NodeId, xid: u32) -> Option<Outcome> {
    {
        let s = SHARED.share();
        if s.loaded {
            return s.records.get(origin, xid).and_then(|r| r.acceptor.decided);
        }
    }
    // The first use after a start reads the records back.
    records().records.get(origin, xid).and_then(|r| r.acceptor.decided)
}

/// What has come in for a local transaction.
#[derive(Debug, Default)]
pub struct Votes {
    pub yes: Vec<NodeId>,
    /// Largest proposal among the yes votes.
    pub max_proposal: i64,
    pub no: Option<(NodeId, String, String)>,
    /// Nodes that accepted its precommit.
    pub accepted: Vec<NodeId>,
    pub finished: Vec<NodeId>,
}

/// Why a local transaction cannot enter two-phase commit.
pub enum Refused {
    /// Every slot is taken.
    Full,
    /// It was wounded by a transaction of this node.
    Wounded(u32),
}

/// Registers a local transaction entering two-phase commit, coordinated by the backend with
/// `procno`. Returns the slot.
pub fn register(xid: u32, key: Key, procno: i32, wake: Wake) -> Result<usize, Refused> {
    let mut s = SHARED.exclusive();
    if let Some(w) = s.wounds.iter().find(|w| w.xid == xid) {
        return Err(Refused::Wounded(w.by));
    }
    let slot = s.entries.iter().position(|e| !e.used).ok_or(Refused::Full)?;
    s.entries[slot] = Entry { used: true, xid, key, procno, wake, ..Entry::default() };
    Ok(slot)
}

/// This receiver (applying a transaction of `peer`) is applying the transaction `key` now,
/// or (`None`) no longer.
pub fn set_applying(peer: u32, key: Option<Key>) {
    let procno = crate::pg_internals::my_proc_number();
    let mut s = SHARED.exclusive();
    s.applying[peer as usize - 1] = match key {
        Some(key) => Applying { procno, key },
        None => Applying { procno: -1, key: Key { ts: 0, node: NodeId(0) } },
    };
}

/// A backend holding a lock that a peer's transaction being applied waits for.
pub struct LockHolder {
    /// Its top-level xid (0: none).
    pub xid: u32,
    /// `None` for a prepared transaction.
    pub proc_: Option<*mut pg_sys::PGPROC>,
}

// SAFETY: libc's kill(2), as declared in <signal.h>.
unsafe extern "C" {
    fn kill(pid: std::ffi::c_int, sig: std::ffi::c_int) -> std::ffi::c_int;
}
const SIGINT: std::ffi::c_int = 2;

/// Classifies `holder` for a transaction of node `by` that needs its lock, wounding it when
/// it is a client's transaction not in two-phase commit yet: marked (so it cannot PREPARE,
/// and its next statement fails) and canceled (SIGINT, so a running statement fails), both
/// under the lock its registration takes, so it is either wounded or in two-phase commit.
pub fn classify_holder(holder: &LockHolder, by: NodeId) -> Holder {
    let mut s = SHARED.exclusive();
    if holder.xid != 0 {
        if let Some(e) = s.entries.iter().find(|e| e.used && e.xid == holder.xid) {
            return Holder::Committing(e.key);
        }
    }
    let Some(proc_) = holder.proc_ else { return Holder::Other };
    // SAFETY: `proc_` points into ProcGlobal->allProcs (from the lock manager's holder list),
    // which lives as long as the server; its fields are read as PostgreSQL's own lock code
    // reads another backend's, without its lock (a stale value is checked below).
    let (procno, pid, worker) =
        unsafe { (crate::pg_internals::proc_number(proc_), (*proc_).pid, crate::pg_internals::proc_is_worker(proc_)) };
    if let Some(a) = s.applying.iter().find(|a| a.procno == procno) {
        return Holder::Committing(a.key);
    }
    // Only while that backend still runs that transaction (a cancel must not hit its next one).
    // SAFETY: as above.
    let still = unsafe { (*proc_).xid.into_inner() == holder.xid }
        && unsafe { pg_sys::TransactionIdIsInProgress(pg_sys::TransactionId::from(holder.xid)) };
    if worker || holder.xid == 0 || pid <= 0 || !still {
        return Holder::Other;
    }
    if s.wounds.iter().any(|w| w.xid == holder.xid) {
        // Canceled once already: a repeated cancel could only reach its next transaction.
        return Holder::Wounded;
    }
    let free = s
        .wounds
        .iter()
        .position(|w| w.xid == 0 || unsafe { !pg_sys::TransactionIdIsInProgress(pg_sys::TransactionId::from(w.xid)) });
    let Some(free) = free else { return Holder::Other };
    s.wounds[free] = Wound { xid: holder.xid, procno, by: by.0, at: crate::backend::now() };
    // SAFETY: a signal to a backend of this server (pid > 0, checked above); SIGINT is
    // PostgreSQL's cancel, as pg_cancel_backend sends it.
    unsafe { kill(pid, SIGINT) };
    Holder::Wounded
}

/// The node whose transaction wounded local transaction `xid`, if one did.
pub fn wounded_by(xid: u32) -> Option<u32> {
    if xid == 0 {
        return None;
    }
    SHARED.share().wounds.iter().find(|w| w.xid == xid).map(|w| w.by)
}

/// Takes back the wound of local transaction `xid` by node `by` (its transaction gave up
/// waiting: the local one, idle all along, may go on).
pub fn heal(xid: u32, by: NodeId) {
    let mut s = SHARED.exclusive();
    for w in s.wounds.iter_mut().filter(|w| w.xid == xid && w.by == by.0) {
        *w = Wound::default();
    }
}

/// The node whose transaction wounded a transaction of backend `procno` less than a second
/// ago: a cancel arriving late, after that transaction ended, is that wound's too.
pub fn wounded_lately(procno: i32) -> Option<u32> {
    let since = crate::backend::now() - 1_000_000;
    SHARED.share().wounds.iter().find(|w| w.xid != 0 && w.procno == procno && w.at >= since).map(|w| w.by)
}

/// Registers a peer's transaction (`origin_xid` on node `origin`) prepared here as `xid`.
pub fn register_applied(xid: u32, key: Key, origin: u32, origin_xid: u32, members: u64) {
    let mut s = SHARED.exclusive();
    if let Some(e) = s.entries.iter_mut().find(|e| !e.used) {
        *e = Entry { used: true, xid, key, procno: -1, origin, origin_xid, members, ..Entry::default() };
    }
}

/// The members a peer's transaction prepared here is prepared on.
pub fn applied_members(origin: u32, origin_xid: u32) -> Option<u64> {
    let s = SHARED.share();
    s.entries
        .iter()
        .find(|e| e.used && e.procno < 0 && e.origin == origin && e.origin_xid == origin_xid)
        .map(|e| e.members)
}

/// The peer's transaction prepared here as local transaction `xid`: its node and its xid there.
pub fn applied_origin(xid: u32) -> Option<(u32, u32)> {
    let s = SHARED.share();
    s.entries.iter().find(|e| e.used && e.procno < 0 && e.xid == xid).map(|e| (e.origin, e.origin_xid))
}

/// Forgets a peer's transaction once finished here; with `origin_xid` `None`, all of that
/// peer's (when its receiver starts again).
pub fn unregister_applied(origin: u32, origin_xid: Option<u32>) {
    let mut s = SHARED.exclusive();
    for e in s.entries.iter_mut() {
        if e.used && e.procno < 0 && e.origin == origin && origin_xid.is_none_or(|x| x == e.origin_xid) {
            e.used = false;
        }
    }
}

pub fn unregister(slot: usize, xid: u32) {
    let mut s = SHARED.exclusive();
    if s.entries[slot].used && s.entries[slot].xid == xid {
        s.entries[slot].used = false;
    }
}

/// Whether a transaction in two-phase commit here (coordinated here, or a peer's prepared
/// here) is prepared without `node` among its members: one that may yet commit, or be
/// acknowledged, without `node` having it.
pub fn in_flight_without(node: NodeId) -> bool {
    let me = match crate::gucs::mode() {
        mmts_core::config::Mode::Multimaster(config) => config.node_id,
        mmts_core::config::Mode::Standalone => return false,
    };
    let bit = mmts_core::membership::bit(node);
    SHARED.share().entries.iter().any(|e| {
        let members = if e.procno >= 0 { e.wake.participants | mmts_core::membership::bit(me) } else { e.members };
        e.used && members & bit == 0
    })
}

/// Whether a backend here coordinates local transaction `xid` (in two-phase commit).
pub fn is_coordinated(xid: u32) -> bool {
    SHARED.share().entries.iter().any(|e| e.used && e.procno >= 0 && e.xid == xid)
}

/// What arrived for the local transaction in `slot`.
pub fn votes(slot: usize, xid: u32) -> Votes {
    let s = SHARED.share();
    let e = &s.entries[slot];
    let mut v = Votes { max_proposal: e.max_proposal, ..Votes::default() };
    if !e.used || e.xid != xid {
        return v;
    }
    for n in 1..=MAX_NODES as u32 {
        let bit = 1u64 << (n - 1);
        if e.yes & bit != 0 {
            v.yes.push(NodeId(n));
        }
        if e.accepted & bit != 0 {
            v.accepted.push(NodeId(n));
        }
        if e.finished & bit != 0 {
            v.finished.push(NodeId(n));
        }
    }
    if e.no_node != 0 {
        let len = e.no_message.iter().position(|&b| b == 0).unwrap_or(REASON_LEN);
        v.no = Some((
            NodeId(e.no_node),
            String::from_utf8_lossy(&e.no_sqlstate).into_owned(),
            String::from_utf8_lossy(&e.no_message[..len]).into_owned(),
        ));
    }
    v
}

/// Delivers a peer's signal about local transaction `xid`, and wakes its backend when what it
/// waits for may be complete (see `mmts_core::coordinator::Wake`).
pub fn deliver(xid: u32, voter: NodeId, what: Delivery) {
    let procno = {
        let mut s = SHARED.exclusive();
        let Some(e) = s.entries.iter_mut().find(|e| e.used && e.xid == xid && e.procno >= 0) else { return };
        let before = (e.yes, e.accepted, e.finished);
        let bit = 1u64 << (voter.0 - 1);
        match &what {
            Delivery::Vote(Vote::Yes { proposal }) => {
                e.yes |= bit;
                e.max_proposal = e.max_proposal.max(*proposal);
            }
            Delivery::Vote(Vote::No { sqlstate, message }) => {
                if e.no_node == 0 {
                    e.no_node = voter.0;
                    let code = sqlstate.as_bytes();
                    e.no_sqlstate = [b'X'; 5];
                    e.no_sqlstate[..code.len().min(5)].copy_from_slice(&code[..code.len().min(5)]);
                    let mut end = message.len().min(REASON_LEN);
                    while !message.is_char_boundary(end) {
                        end -= 1;
                    }
                    e.no_message = [0; REASON_LEN];
                    e.no_message[..end].copy_from_slice(&message.as_bytes()[..end]);
                }
            }
            Delivery::Finished => e.finished |= bit,
            Delivery::Accepted => e.accepted |= bit,
        }
        if !e.wake.due(&what, before, (e.yes, e.accepted, e.finished)) {
            return;
        }
        e.procno
    };
    // SAFETY: `procno` is the registered coordinator's own PGPROC number (set from its MyProc), an
    // index into ProcGlobal->allProcs, which lives as long as the server; SetLatch on another
    // process's latch is how PostgreSQL wakes it.
    unsafe {
        let proc_ = (*pg_sys::ProcGlobal).allProcs.add(procno as usize);
        pg_sys::SetLatch(&mut (*proc_).procLatch);
    }
}

/// Hands a peer's vote or "finished" about one of this node's (`me`) transactions to its
/// backend, and records a peer's heartbeat; other signals are not for this node.
pub fn deliver_signal(signal: Signal, me: u32) {
    match signal {
        Signal::Vote { origin, xid, voter, vote } if origin == NodeId(me) => deliver(xid, voter, Delivery::Vote(vote)),
        Signal::Finished { origin, xid, voter, .. } if origin == NodeId(me) => deliver(xid, voter, Delivery::Finished),
        Signal::Heartbeat { from, report, sent_at, echo } => {
            crate::status::record_report(from.0, report, sent_at, echo)
        }
        Signal::LeaseReleased { from, sent_at } => crate::status::lease_released(from.0, sent_at),
        Signal::Answered { origin, xid, voter, answer: Answer::Accepted } if origin == NodeId(me) => {
            deliver(xid, voter, Delivery::Accepted)
        }
        _ => {}
    }
}

/// This node's answer to a resolver's request, or to a coordinator's precommit; `None` for
/// other signals. The rules are `mmts_core::indoubt::answer`'s; this node's records and what it
/// remembers are read and changed under one lock.
pub fn answer(signal: &Signal, me: NodeId) -> Option<Signal> {
    let (origin, xid, since, request) = match *signal {
        Signal::Precommit { origin, xid, ts, since } => {
            (origin, xid, since, Request::Precommit { coordinator: origin, ts })
        }
        Signal::Promise { origin, xid, since, ballot } => (origin, xid, since, Request::Promise(ballot)),
        Signal::Accept { origin, xid, since, ballot, outcome } => {
            (origin, xid, since, Request::Accept(ballot, outcome))
        }
        _ => return None,
    };
    let mut s = records();
    let memory = memory(&s, origin, xid);
    // A node that takes no part makes no record of it either.
    let answer = if indoubt::takes_no_part(memory, request, since, CLOCK_MARGIN_US) {
        Answer::Unknown
    } else {
        record_mut(&mut s, origin, xid, |r| {
            let mut changed = r.acceptor;
            let answer = indoubt::answer(&mut changed, memory, request, since, CLOCK_MARGIN_US);
            // A promise or acceptance for a resolver is on disk before it is given.
            if changed != r.acceptor && indoubt::durable(request) && changed.decided.is_none() {
                if let Err(e) = keep_on_disk(origin, xid, &changed) {
                    crate::logging::log(format!(
                        "mmts: cannot keep the record of transaction {xid} of node {origin} on disk, so no answer: {e}"
                    ));
                    return Answer::Unknown;
                }
                r.on_disk = true;
            }
            r.acceptor = changed;
            answer
        })
    };
    Some(Signal::Answered { origin, xid, voter: me, answer })
}

/// What this node remembers of transaction `xid` of node `origin` besides its record
/// (`mmts_core::records::Records::memory`). Assumes the nodes' clocks agree within
/// `CLOCK_MARGIN_US`, as NTP keeps them.
fn memory(s: &Shared, origin: NodeId, xid: u32) -> Memory {
    // The scan of every entry is only made for a transaction this node has no record of.
    let prepared_here =
        || s.entries.iter().any(|e| e.used && e.procno < 0 && e.origin == origin.0 && e.origin_xid == xid);
    s.records.memory(origin, xid, prepared_here, s.started_at)
}

/// Votes, "finished" and acceptances for this node's transactions, heartbeats, and
/// resolvers' requests, handed over by peer `sender` over a plain connection (a batch from
/// `encode_batch`) rather than through its WAL: no flush, no decoding, and no waiting behind
/// the peer's large transactions. Returns this node's answers to the requests (a batch).
/// Superusers only (EXECUTE is revoked from PUBLIC too): the peers connect as a superuser.
/// Every signal is bound to `sender` like one from its stream (see `provenance`); delivering
/// a batch twice changes nothing.
#[pg_extern(volatile, parallel_unsafe)]
fn deliver_signals(sender: i32, signals: &str) -> String {
    // SAFETY: a plain catalog lookup of the current user, in a transaction.
    if !unsafe { pg_sys::superuser() } {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "permission denied for function mtm.deliver_signals",
            "mmts",
        )
        .set_detail("Only the cluster's nodes hand over signals, connected as a superuser.")
        .report(PgLogLevel::ERROR);
    }
    let Mode::Multimaster(config) = crate::gucs::mode() else { error!("mmts: this server is not a multimaster node") };
    let signals = decode_batch(signals).unwrap_or_else(|e| {
        ErrorReport::new(PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION, format!("mmts: {e}"), "mmts")
            .report(PgLogLevel::ERROR);
        unreachable!()
    });
    let sender = u32::try_from(sender).unwrap_or(0);
    let mut answers = Vec::new();
    for signal in signals.into_iter().filter_map(|s| crate::provenance::admit_signal(sender, s)) {
        answers.extend(answer(&signal, config.node_id));
        deliver_signal(signal, config.node_id.0);
    }
    encode_batch(&answers)
}

pgrx::extension_sql!(
    "REVOKE EXECUTE ON FUNCTION mtm.deliver_signals(integer, text) FROM PUBLIC;",
    name = "deliver_signals_privileges",
    requires = [deliver_signals]
);

/// The query a node runs on a peer to hand it `signals` (see [`deliver_signals`]).
pub fn delivery_query(me: NodeId, signals: &[Signal]) -> String {
    format!("SELECT mtm.deliver_signals({me}, '{}')", encode_batch(signals))
}

/// COMMIT PREPARED (or ROLLBACK PREPARED) `gid`, inside the current transaction. A missing
/// gid is an ERROR (SQLSTATE 42704) that `PgTryBuilder` can catch.
pub fn finish_prepared(gid: &CStr, commit: bool) {
    // SAFETY: a guarded call of a PostgreSQL function with a NUL-terminated gid.
    unsafe {
        pgrx::pg_sys::ffi::pg_guard_ffi_boundary(|| {
            crate::pg_internals::finish_prepared_transaction(gid.as_ptr(), commit)
        })
    }
}

/// Whether `gid` is prepared here from the prepare at `lsn` / `time` (inside a transaction).
pub fn lookup_prepared(gid: &CStr, lsn: u64, time: pg_sys::TimestampTz) -> bool {
    // SAFETY: as in `finish_prepared`.
    unsafe { pgrx::pg_sys::ffi::pg_guard_ffi_boundary(|| crate::pg_internals::lookup_gxact(gid.as_ptr(), lsn, time)) }
}

/// Writes `signal` to this node's WAL for the peers. Transactional signals travel inside the
/// current transaction; others are sent at once (flushed, without this session's replication
/// origin, which would stop the walsenders from sending them).
pub fn emit(signal: &Signal, transactional: bool) {
    let bytes = crate::provenance::seal(transactional, &signal.encode());
    // SAFETY: main thread; the session's origin is a plain global, put back before the block
    // ends (an error in the guarded call ends the transaction, which resets it too); `prefix`
    // and `bytes` outlive the call.
    unsafe {
        let origin = pg_sys::replorigin_session_origin;
        if !transactional {
            pg_sys::replorigin_session_origin = pg_sys::InvalidRepOriginId as pg_sys::RepOriginId;
        }
        let prefix = c"mmts";
        debug_assert_eq!(prefix.to_bytes(), SIGNAL_PREFIX.as_bytes());
        let lsn = pgrx::pg_sys::ffi::pg_guard_ffi_boundary(|| {
            crate::pg_internals::log_logical_message(prefix.as_ptr(), bytes.as_ptr().cast(), bytes.len(), transactional)
        });
        pg_sys::replorigin_session_origin = origin;
        if !transactional {
            pg_sys::XLogFlush(lsn);
        }
    }
}

/// A SQLSTATE's five characters.
pub fn sqlstate_text(code: pgrx::PgSqlErrorCode) -> String {
    let mut v = code as i32;
    (0..5)
        .map(|_| {
            let c = ((v & 0x3F) as u8 + b'0') as char;
            v >>= 6;
            c
        })
        .collect()
}

/// The error code for a SQLSTATE's five characters (internal_error when malformed).
pub fn sqlstate_code(text: &str) -> pgrx::PgSqlErrorCode {
    let bytes = text.as_bytes();
    if bytes.len() != 5 || !bytes.iter().all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()) {
        return pgrx::PgSqlErrorCode::ERRCODE_INTERNAL_ERROR;
    }
    let packed = bytes.iter().rev().fold(0i32, |acc, b| (acc << 6) | ((*b as i32 - b'0' as i32) & 0x3F));
    pgrx::PgSqlErrorCode::from(packed)
}
