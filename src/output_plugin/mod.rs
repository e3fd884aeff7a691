//! The `mmts` logical decoding output plugin.
//!
//! Its one defining property: a transaction (or logical message) that carries a replication
//! origin is never sent. Changes applied by a replication worker under an origin therefore do
//! not travel on, which is what makes loop-free multi-master replication possible.
//!
//! It speaks two protocols, chosen by the options the client starts decoding with:
//! - **pgoutput** (any options without `mmts_protocol`, e.g. those of a stock `CREATE
//!   SUBSCRIPTION`): at startup the session's callbacks become those of PostgreSQL's own
//!   `pgoutput` plugin, loaded from the server's library directory, so publications, row filters, column lists, binary
//!   mode, messages, streaming and two-phase behave exactly as with `pgoutput` — only the
//!   origin filter differs (PostgreSQL 15's `pgoutput` sends everything).
//! - **mmts** (option `mmts_protocol`, the highest protocol version the client speaks): frames
//!   of `mmts_core::wire`, for mmts's own receivers.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::rc::Rc;
use std::sync::OnceLock;

use mmts_core::config::Mode;
use mmts_core::twopc::{Signal, SIGNAL_PREFIX};
use mmts_core::wire::{self, Column, Message, Relation as WireRelation, Value};
use mmts_core::NodeId;
use pgrx::pg_sys;
use pgrx::pg_sys::ffi::pg_guard_ffi_boundary;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{PgList, PgTupleDesc};

use crate::gucs;

mod rows;

use rows::{row, send_relation};

/// The option that selects the mmts protocol; its value is the highest version the client speaks.
const MMTS_PROTOCOL_OPTION: &str = "mmts_protocol";

/// With the mmts protocol, `on` sends large transactions while they run (see
/// `Message::StreamStart`): PostgreSQL then streams a transaction whose changes outgrow
/// `logical_decoding_work_mem` instead of spilling them to disk and sending them at its end.
const MMTS_STREAMING_OPTION: &str = "mmts_streaming";

/// With the mmts protocol, the id of the reading node: this node also sends it the other
/// nodes' transactions it committed that left the reader out (see [`filter_by_origin`]).
const MMTS_FORWARD_OPTION: &str = "mmts_forward";

/// With `mmts_forward`, `on` sends each such transaction's mark only, without its changes: a
/// notice (see `mmts_core::forward::Notices`).
const MMTS_NOTICES_OPTION: &str = "mmts_forward_notices";

/// With the mmts protocol, a position in this node's WAL: its own transactions and signals
/// that begin before it are not sent (the reader has them), while forwards are. A reader that
/// holds notices reads the stream again from where its slot confirmed it, this far back.
const MMTS_OWN_FROM_OPTION: &str = "mmts_own_from";

/// `pgoutput`'s callbacks, loaded once per process.
struct Callbacks(pg_sys::OutputPluginCallbacks);
// SAFETY: only function pointers, called from the backend's main thread.
unsafe impl Send for Callbacks {}
// SAFETY: as for `Send`: nothing in it is mutated once stored.
unsafe impl Sync for Callbacks {}
static PGOUTPUT: OnceLock<Callbacks> = OnceLock::new();

/// The state of the decoding session this process runs (a process runs one at a time).
#[derive(Default)]
struct Session {
    /// `None`: the pgoutput protocol.
    mmts: Option<MmtsSession>,
}

struct MmtsSession {
    /// Relations described to the client in this session and not invalidated since, with the
    /// output function of each column sent (`None`: dropped or generated, not sent).
    relations: HashMap<pg_sys::Oid, OutputFunctions>,
    origin: u32,
    /// Where the output functions' state lives: the decoding context's memory.
    memory: pg_sys::MemoryContext,
    /// The transaction being decoded changes mtm.local_tables.
    local_tables_seen: bool,
    /// Messages not sent yet, in the protocol version negotiated (see [`send`]).
    frame: wire::Frame,
    /// The block of a streamed transaction being sent.
    block: Option<StreamBlock>,
    /// Forwarding to this node (`mmts_forward`), if asked.
    forward_to: Option<NodeId>,
    /// Forwarding marks only (`mmts_forward_notices`).
    notices: bool,
    /// Records of this node's own that begin before this position are not sent
    /// (`mmts_own_from`).
    own_from: u64,
    /// Transactions (and their subtransactions) of other origins that carry a mark naming the
    /// reader among the nodes left out: their records pass the origin filter.
    marked: HashSet<u32>,
    /// The prepared transaction whose COMMIT or ROLLBACK PREPARED is being decoded:
    /// PostgreSQL asks `filter_prepare` about it just before the origin filter.
    finishing: u32,
}

/// A block of a large transaction sent while it runs (`stream_start` to `stream_stop`).
struct StreamBlock {
    /// The (sub)transaction the messages sent last belong to.
    subxid: u32,
    /// Tables described in this block. A streamed transaction is applied only once it is
    /// prepared, after transactions that may come between its blocks: what it describes must
    /// not count as described for those, so each block describes its tables itself.
    described: HashMap<pg_sys::Oid, OutputFunctions>,
}

/// A frame is sent once it holds this many bytes, even in the middle of a transaction.
const FRAME_FLUSH: usize = 64 * 1024;

/// The table listing the tables mmts keeps local (in schema mtm).
const LOCAL_TABLES: &str = "local_tables";

/// Whether `schema.name` is listed in mtm.local_tables, as of the change being decoded.
unsafe fn listed_local(schema: &str, name: &str) -> bool {
    // SAFETY: inside the decoding transaction (catalog access with its historic snapshot). The
    // table is open from table_open to table_close; each tuple systable_getnext returns is
    // valid until the next call, and is deformed with the table's own descriptor into arrays
    // of its two columns; text_to_cstring returns a palloc'd NUL-terminated copy.
    unsafe {
        let ns = pg_sys::get_namespace_oid(c"mtm".as_ptr(), true);
        if ns == pg_sys::InvalidOid {
            return false;
        }
        let relid = pg_sys::get_relname_relid(c"local_tables".as_ptr(), ns);
        if relid == pg_sys::InvalidOid {
            return false;
        }
        let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let scan = pg_sys::systable_beginscan(
            rel,
            pg_sys::InvalidOid,
            false,
            pg_sys::GetCatalogSnapshot(relid),
            0,
            std::ptr::null_mut(),
        );
        let mut found = false;
        let mut values = [pg_sys::Datum::from(0); 2];
        let mut nulls = [false; 2];
        loop {
            let tuple = pg_sys::systable_getnext(scan);
            if tuple.is_null() {
                break;
            }
            pg_sys::heap_deform_tuple(tuple, (*rel).rd_att, values.as_mut_ptr(), nulls.as_mut_ptr());
            let text = |d: pg_sys::Datum| {
                CStr::from_ptr(pg_sys::text_to_cstring(d.cast_mut_ptr())).to_string_lossy().into_owned()
            };
            if !nulls[0] && !nulls[1] && text(values[0]) == schema && text(values[1]) == name {
                found = true;
                break;
            }
        }
        pg_sys::systable_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        found
    }
}

/// After a transaction that changed mtm.local_tables, forgets what was decided per table.
fn end_of_transaction() {
    SESSION.with(|s| {
        if let Some(m) = s.borrow_mut().mmts.as_mut() {
            if m.local_tables_seen {
                m.local_tables_seen = false;
                m.relations.clear();
            }
        }
    });
}

/// Output function of each column sent (`None`: dropped or generated); `None` as a whole
/// for a table that is not replicated (mmts's own tables).
type OutputFunctions = Option<Rc<[Option<*mut pg_sys::FmgrInfo>]>>;

thread_local! {
    static SESSION: RefCell<Session> = RefCell::default();
}

fn pgoutput() -> &'static pg_sys::OutputPluginCallbacks {
    &PGOUTPUT.get().expect("pgoutput callbacks are loaded in _PG_output_plugin_init").0
}

#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn _PG_output_plugin_init(cb: *mut pg_sys::OutputPluginCallbacks) {
    if PGOUTPUT.get().is_none() {
        // SAFETY: the main thread, while PostgreSQL loads the plugin. The symbol loaded is
        // pgoutput's `_PG_output_plugin_init`, whose type is LogicalOutputPluginInit: the
        // transmute is between `Option`s of function pointers of one size. It fills `callbacks`,
        // a zeroed struct of `Option`s (all `None`), under pgrx's guard.
        let init = unsafe {
            pg_sys::load_external_function(
                c"pgoutput".as_ptr(),
                c"_PG_output_plugin_init".as_ptr(),
                true,
                std::ptr::null_mut(),
            )
        };
        // SAFETY: as above: pgoutput's init symbol, an `Option` of a function pointer either side.
        let init: pg_sys::LogicalOutputPluginInit = unsafe { std::mem::transmute(init) };
        let init = init.expect("load_external_function reports a missing symbol itself");
        // SAFETY: a struct of `Option`s of function pointers, for which all zeroes is `None`.
        let mut callbacks: pg_sys::OutputPluginCallbacks = unsafe { std::mem::zeroed() };
        // SAFETY: pgoutput's init fills the local `callbacks`; an ERROR in it is re-raised by the guard.
        unsafe { pg_guard_ffi_boundary(|| init(&mut callbacks)) };
        let _ = PGOUTPUT.set(Callbacks(callbacks));
        unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(relcache_invalidated), pg_sys::Datum::from(0)) };
    }
    let pgo = pgoutput();
    // SAFETY: PostgreSQL passes its callbacks struct to fill, valid and unaliased for the call.
    let cb = unsafe { &mut *cb };
    // These are the mmts protocol's callbacks; a pgoutput session replaces them at startup.
    // Which ones exist must match pgoutput, because that decides whether PostgreSQL offers
    // streaming and two-phase decoding.
    cb.startup_cb = Some(startup);
    cb.shutdown_cb = Some(shutdown);
    cb.filter_by_origin_cb = Some(filter_by_origin);
    cb.begin_cb = Some(begin);
    cb.commit_cb = Some(commit);
    cb.change_cb = Some(change);
    cb.truncate_cb = Some(truncate);
    cb.message_cb = Some(message);
    cb.begin_prepare_cb = pgo.begin_prepare_cb.and(Some(begin_prepare));
    cb.prepare_cb = pgo.prepare_cb.and(Some(prepare));
    cb.commit_prepared_cb = pgo.commit_prepared_cb.and(Some(commit_prepared));
    cb.rollback_prepared_cb = pgo.rollback_prepared_cb.and(Some(rollback_prepared));
    cb.filter_prepare_cb = pgo.filter_prepare_cb;
    // The mmts protocol streams only when the client asks (`mmts_streaming`).
    cb.stream_start_cb = pgo.stream_start_cb.and(Some(stream_start));
    cb.stream_stop_cb = pgo.stream_stop_cb.and(Some(stream_stop));
    cb.stream_abort_cb = pgo.stream_abort_cb.and(Some(stream_abort));
    cb.stream_prepare_cb = pgo.stream_prepare_cb.and(Some(stream_prepare));
    cb.stream_commit_cb = pgo.stream_commit_cb.and(Some(stream_commit));
    cb.stream_change_cb = pgo.stream_change_cb.and(Some(stream_change));
    cb.stream_message_cb = pgo.stream_message_cb.and(Some(stream_message));
    cb.stream_truncate_cb = pgo.stream_truncate_cb.and(Some(stream_truncate));
}

/// The never-forward rule: skip everything that carries a replication origin, except the
/// origins this node's own transactions commit under (see `commit_origin`).
///
/// One exception, for an mmts reader that asks for it (`mmts_forward`): another node's
/// transaction that a receiver here applied with a [`Signal::Forwarded`] mark leaving the
/// reader out. The mark is the transaction's first record, so its records pass from there on;
/// its PREPARE is not decoded ([`filter_prepare`]) and the whole transaction goes at its
/// COMMIT PREPARED here, as an ordinary one. What is forwarded depends on the marks in WAL
/// only, not on when the walsender reads it; a healthy cluster writes no marks, and the
/// filter then costs a set lookup per record of another origin.
#[pg_guard]
unsafe extern "C-unwind" fn filter_by_origin(
    ctx: *mut pg_sys::LogicalDecodingContext,
    origin_id: pg_sys::RepOriginId,
) -> bool {
    if origin_id == pg_sys::InvalidRepOriginId as pg_sys::RepOriginId
        || crate::commit_origin::is_commit_origin(origin_id)
    {
        // SAFETY: as below.
        return unsafe { before_own_from(ctx) };
    }
    // SAFETY: `ctx` is the decoding context PostgreSQL passes, within this callback.
    !unsafe { forwarded_record(ctx) }
}

/// Whether the record being decoded, one of this node's own, begins before `mmts_own_from`.
/// Its transaction is then skipped whole (PostgreSQL asks at its commit or PREPARE, as it skips
/// what begins before where a stream starts), as is a signal between transactions.
unsafe fn before_own_from(ctx: *mut pg_sys::LogicalDecodingContext) -> bool {
    let own_from = SESSION.with(|s| s.borrow().mmts.as_ref().map_or(0, |m| m.own_from));
    if own_from == 0 {
        return false;
    }
    // SAFETY: the caller's decoding context, in its callback.
    let Some(record) = (unsafe { crate::pg_internals::current_record(ctx) }) else { return false };
    if record.lsn >= own_from {
        // Records are decoded in WAL order: none of the later ones begins before it either.
        SESSION.with(|s| {
            if let Some(m) = s.borrow_mut().mmts.as_mut() {
                m.own_from = 0;
            }
        });
        return false;
    }
    // Only what ends a transaction (a commit, PREPARE, COMMIT or ROLLBACK PREPARED) or stands
    // alone (a message outside transactions): a transaction that began before and ends after
    // keeps its changes.
    let ends = record.rmid == pg_sys::RmgrIds::RM_XACT_ID as u8;
    let alone = record.rmid == pg_sys::RmgrIds::RM_LOGICALMSG_ID as u8
        && crate::pg_internals::logical_message(record.data).is_some_and(|(transactional, ..)| !transactional);
    ends || alone
}

/// Whether the record being decoded belongs to a transaction marked for forwarding to the
/// reader (and marks it when it is the mark). With notices, only the mark and the records
/// that end the transaction pass.
unsafe fn forwarded_record(ctx: *mut pg_sys::LogicalDecodingContext) -> bool {
    SESSION.with(|s| {
        let mut s = s.borrow_mut();
        let Some(m) = s.mmts.as_mut() else { return false };
        let Some(reader) = m.forward_to else { return false };
        // SAFETY: the caller's decoding context, in its callback; `record` is used within it.
        let Some(record) = (unsafe { crate::pg_internals::current_record(ctx) }) else { return false };
        let xact = record.rmid == pg_sys::RmgrIds::RM_XACT_ID as u8;
        let op = u32::from(record.info) & pg_sys::XLOG_XACT_OPMASK;
        let finishes = xact && matches!(op, pg_sys::XLOG_XACT_COMMIT_PREPARED | pg_sys::XLOG_XACT_ABORT_PREPARED);
        let xid = if finishes { m.finishing } else { record.xid };
        if xact && matches!(op, pg_sys::XLOG_XACT_ABORT | pg_sys::XLOG_XACT_ABORT_PREPARED) {
            // Rolled back: nothing of it is sent (its commit would have dropped the mark).
            m.marked.remove(&xid);
            return false;
        }
        if m.marked.contains(&xid) {
            return xact || !m.notices;
        }
        if record.top_xid != 0 && m.marked.contains(&record.top_xid) {
            m.marked.insert(xid);
            return !m.notices;
        }
        if record.rmid != pg_sys::RmgrIds::RM_LOGICALMSG_ID as u8 {
            return false;
        }
        let Some((true, prefix, content)) = crate::pg_internals::logical_message(record.data) else { return false };
        if prefix != SIGNAL_PREFIX.as_bytes() {
            return false;
        }
        let mark = crate::provenance::open(true, content, 0).and_then(|body| Signal::decode(body).ok());
        let Some(Signal::Forwarded { members, .. }) = mark else { return false };
        if members & mmts_core::membership::bit(reader) != 0 {
            return false;
        }
        m.marked.insert(xid);
        true
    })
}

/// In a forwarding session: the PREPARE of another node's transaction is not decoded (a
/// transaction marked for the reader goes whole at its COMMIT PREPARED, the others not at
/// all). Also records which transaction a COMMIT or ROLLBACK PREPARED finishes, for the
/// origin filter that PostgreSQL asks next.
#[pg_guard]
unsafe extern "C-unwind" fn filter_prepare(
    _ctx: *mut pg_sys::LogicalDecodingContext,
    xid: pg_sys::TransactionId,
    gid: *const std::ffi::c_char,
) -> bool {
    // SAFETY: PostgreSQL passes the transaction's NUL-terminated gid, valid for the call.
    let gid = unsafe { CStr::from_ptr(gid) }.to_string_lossy();
    let me = origin();
    SESSION.with(|s| {
        if let Some(m) = s.borrow_mut().mmts.as_mut() {
            m.finishing = xid.into_inner();
        }
    });
    mmts_core::twopc::parse_gid(&gid).is_some_and(|(node, _)| node != me)
}

/// The value of option `name` given to this decoding session, if any.
unsafe fn option(ctx: *mut pg_sys::LogicalDecodingContext, name: &str) -> Option<String> {
    // SAFETY: the caller passes the decoding context; its options are a List of DefElems
    // (NUL-terminated names), and defGetString returns a NUL-terminated string.
    let options = unsafe { PgList::<pg_sys::DefElem>::from_pg((*ctx).output_plugin_options) };
    let found = options.iter_ptr().find_map(|def| unsafe {
        let defname = CStr::from_ptr((*def).defname).to_str().ok()?;
        (defname == name).then(|| {
            if (*def).arg.is_null() {
                String::new()
            } else {
                CStr::from_ptr(pg_sys::defGetString(def)).to_string_lossy().into_owned()
            }
        })
    });
    found
}

/// Option `name` given `on` or `off` (off when not given).
unsafe fn on_off_option(ctx: *mut pg_sys::LogicalDecodingContext, name: &str) -> bool {
    // SAFETY: the caller passes the decoding context.
    match unsafe { option(ctx, name) }.as_deref().map(str::trim) {
        None | Some("off") => false,
        Some("on") => true,
        Some(other) => bad_option(name, other, "Use on or off."),
    }
}

/// Reports an option given a value it does not take.
fn bad_option(name: &str, value: &str, hint: &str) -> ! {
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        format!("invalid value for option \"{name}\": \"{value}\""),
        "mmts",
    )
    .set_hint(hint)
    .report(PgLogLevel::ERROR);
    unreachable!()
}

#[pg_guard]
unsafe extern "C-unwind" fn startup(
    ctx: *mut pg_sys::LogicalDecodingContext,
    opt: *mut pg_sys::OutputPluginOptions,
    is_init: bool,
) {
    // SAFETY: `ctx` is the decoding context PostgreSQL passes.
    let requested = if is_init { None } else { unsafe { option(ctx, MMTS_PROTOCOL_OPTION) } };
    let Some(requested) = requested else {
        // A pgoutput session: from now on PostgreSQL calls pgoutput directly (no cost per
        // change), except for the origin filter, which stays ours.
        SESSION.with(|s| s.borrow_mut().mmts = None);
        // SAFETY: `ctx` is the decoding context PostgreSQL passes to the startup callback;
        // pgoutput's startup gets the same arguments, under pgrx's guard.
        unsafe {
            (*ctx).callbacks = *pgoutput();
            (*ctx).callbacks.filter_by_origin_cb = Some(filter_by_origin);
        }
        let pgoutput_startup = pgoutput().startup_cb.expect("pgoutput has a startup callback");
        // An ERROR inside pgoutput is re-raised as ours.
        // SAFETY: pgoutput's startup callback, given the arguments PostgreSQL passed to ours.
        return unsafe { pg_guard_ffi_boundary(|| pgoutput_startup(ctx, opt, is_init)) };
    };
    let max: u8 = requested.trim().parse().unwrap_or_else(|_| {
        let hint =
            format!("Give the highest mmts protocol version the client speaks, e.g. {}.", wire::PROTOCOL_VERSION);
        bad_option(MMTS_PROTOCOL_OPTION, &requested, &hint)
    });
    let version = wire::negotiate(wire::MIN_PROTOCOL_VERSION, max).unwrap_or_else(|e| {
        ErrorReport::new(PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED, e.to_string(), "mmts")
            .report(PgLogLevel::ERROR);
        unreachable!()
    });
    let origin = match gucs::mode() {
        Mode::Multimaster(c) => c.node_id.0,
        Mode::Standalone => 0,
    };
    // SAFETY: `ctx` and `opt` are the decoding context and options PostgreSQL passes.
    let memory = unsafe { (*ctx).context };
    // SAFETY (these four): `ctx` is the decoding context PostgreSQL passes.
    let streaming = unsafe { on_off_option(ctx, MMTS_STREAMING_OPTION) };
    let forward_to = unsafe { option(ctx, MMTS_FORWARD_OPTION) }.map(|value| match value.trim().parse::<u32>() {
        Ok(id) if (1..=crate::gucs::MAX_NODES as u32).contains(&id) => NodeId(id),
        _ => bad_option(
            MMTS_FORWARD_OPTION,
            &value,
            &format!("Give the reading node's id, 1 to {}.", crate::gucs::MAX_NODES),
        ),
    });
    let notices = unsafe { on_off_option(ctx, MMTS_NOTICES_OPTION) };
    let own_from = unsafe { option(ctx, MMTS_OWN_FROM_OPTION) }.map_or(0, |value| {
        mmts_core::replication::parse_lsn(&value)
            .unwrap_or_else(|| bad_option(MMTS_OWN_FROM_OPTION, &value, "Give a WAL position, such as 0/16B3748."))
    });
    SESSION.with(|s| {
        s.borrow_mut().mmts = Some(MmtsSession {
            relations: HashMap::new(),
            origin,
            memory,
            local_tables_seen: false,
            frame: wire::Frame::new(version),
            block: None,
            forward_to,
            notices,
            own_from,
            marked: HashSet::new(),
            finishing: 0,
        })
    });
    // SAFETY: `ctx` and `opt` are the decoding context and options of this startup callback.
    // PostgreSQL offers streaming only where the stream callbacks are set (`streaming` stays
    // false otherwise).
    unsafe {
        (*opt).output_type = pg_sys::OutputPluginOutputType::OUTPUT_PLUGIN_BINARY_OUTPUT;
        (*ctx).streaming &= streaming;
        if forward_to.is_some() {
            (*ctx).callbacks.filter_prepare_cb = Some(filter_prepare);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shutdown(_ctx: *mut pg_sys::LogicalDecodingContext) {
    SESSION.with(|s| s.borrow_mut().mmts = None);
}

#[pg_guard]
unsafe extern "C-unwind" fn relcache_invalidated(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    SESSION.with(|s| {
        if let Some(m) = s.borrow_mut().mmts.as_mut() {
            if relid == pg_sys::InvalidOid {
                m.relations.clear();
                if let Some(b) = m.block.as_mut() {
                    b.described.clear();
                }
            } else {
                m.relations.remove(&relid);
                if let Some(b) = m.block.as_mut() {
                    b.described.remove(&relid);
                }
            }
        }
    });
}

fn origin() -> NodeId {
    NodeId(SESSION.with(|s| s.borrow().mmts.as_ref().map(|m| m.origin).unwrap_or(0)))
}

/// Sends one mmts message. From protocol version 2 on, a transaction's messages go as one
/// frame when it ends (one write, so one send by the walsender, instead of one per change),
/// or in pieces of [`FRAME_FLUSH`] bytes; a message outside transactions goes at once.
unsafe fn send(ctx: *mut pg_sys::LogicalDecodingContext, message: &Message) {
    let frame = SESSION.with(|s| {
        let mut s = s.borrow_mut();
        let m = s.mmts.as_mut().expect("an mmts protocol session");
        m.frame.push(message);
        let ends = matches!(
            message,
            Message::Commit { .. }
                | Message::Prepare { .. }
                | Message::CommitPrepared { .. }
                | Message::RollbackPrepared { .. }
                | Message::LogicalMessage { transactional: false, .. }
                | Message::StreamStop
                | Message::StreamAbort { .. }
                | Message::StreamPrepare { .. }
                | Message::StreamCommit { .. }
        );
        (ends || m.frame.version() < 2 || m.frame.len() >= FRAME_FLUSH).then(|| m.frame.take())
    });
    if let Some(frame) = frame {
        // SAFETY: `ctx` is the decoding context of the callback calling this (the caller's
        // part); `frame` is borrowed for the copy into its output buffer.
        unsafe {
            pg_sys::OutputPluginPrepareWrite(ctx, true);
            pg_sys::appendBinaryStringInfo((*ctx).out, frame.as_ptr().cast(), frame.len() as i32);
            pg_sys::OutputPluginWrite(ctx, true);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn begin(ctx: *mut pg_sys::LogicalDecodingContext, txn: *mut pg_sys::ReorderBufferTXN) {
    // SAFETY: PostgreSQL passes a valid decoding context and transaction for the call; both
    // members of the `xact_time` union are a TimestampTz, so either may be read.
    let t = unsafe { &*txn };
    let msg = Message::Begin {
        origin: origin(),
        xid: t.xid.into_inner(),
        final_lsn: t.final_lsn,
        // SAFETY: `t` is the ReorderBufferTXN of this callback; `commit_time` is the union
        // member set for a committed transaction (both members are a TimestampTz).
        commit_time: unsafe { t.xact_time.commit_time },
    };
    // SAFETY: `ctx` is the decoding context of this callback.
    unsafe { send(ctx, &msg) };
}

#[pg_guard]
unsafe extern "C-unwind" fn commit(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    commit_lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: the arguments of this callback.
    unsafe { send_commit(ctx, txn, commit_lsn, false) };
}

/// Sends the commit of `txn` (`streamed`: one sent while it ran).
unsafe fn send_commit(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    commit_lsn: pg_sys::XLogRecPtr,
    streamed: bool,
) {
    // SAFETY: the caller passes its callback's arguments: as in `begin`.
    let t = unsafe { &*txn };
    let (origin, xid, end_lsn) = (origin(), t.xid.into_inner(), t.end_lsn);
    // SAFETY: as in `begin`: `commit_time` is the member set for a committed transaction.
    let commit_time = unsafe { t.xact_time.commit_time };
    let msg = if streamed {
        Message::StreamCommit { origin, xid, commit_lsn, end_lsn, commit_time }
    } else {
        Message::Commit { origin, xid, commit_lsn, end_lsn, commit_time }
    };
    // SAFETY: `ctx` is the decoding context of the caller's callback (for both calls).
    unsafe { send(ctx, &msg) };
    SESSION.with(|s| {
        if let Some(m) = s.borrow_mut().mmts.as_mut() {
            m.marked.remove(&xid);
        }
    });
    end_of_transaction();
    unsafe { batch_delay(ctx) };
}

/// In async mode, a walsender streaming to a peer's receiver that has sent every transaction
/// committed so far sleeps `multimaster.async_batch_delay` before it looks for more: what
/// commits meanwhile is then decoded and sent in one go, so a busy node wakes its walsenders
/// and the peers' receivers once per batch instead of once per transaction (bench/cluster.sh
/// on two cores: a quarter more throughput at 10 ms), for that much more replication lag. A
/// walsender that is behind never sleeps. (The latch is not waited on: every commit sets it.)
unsafe fn batch_delay(ctx: *mut pg_sys::LogicalDecodingContext) {
    let delay = crate::gucs::ASYNC_BATCH_DELAY.get();
    // SAFETY: a plain global, on the main thread.
    let walsender = unsafe { pg_sys::am_walsender };
    if delay == 0 || !walsender || crate::gucs::synchronous() || SESSION.with(|s| s.borrow().mmts.is_none()) {
        return;
    }
    // SAFETY: the caller passes the decoding context, whose WAL reader is set.
    unsafe {
        if (*(*ctx).reader).EndRecPtr >= pg_sys::GetFlushRecPtr(std::ptr::null_mut()) {
            pg_sys::pg_usleep(delay as std::ffi::c_long * 1000);
        }
    }
}

fn gid(txn: &pg_sys::ReorderBufferTXN) -> String {
    if txn.gid.is_null() {
        String::new()
    } else {
        // SAFETY: a prepared transaction's gid is a NUL-terminated string owned by `txn`.
        unsafe { CStr::from_ptr(txn.gid) }.to_string_lossy().into_owned()
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn begin_prepare(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
) {
    // SAFETY: as in `begin`.
    let t = unsafe { &*txn };
    let msg = Message::BeginPrepare {
        origin: origin(),
        xid: t.xid.into_inner(),
        gid: gid(t),
        prepare_lsn: t.final_lsn,
        end_lsn: t.end_lsn,
        // SAFETY: `t` is the ReorderBufferTXN of this callback; `prepare_time` is the union
        // member set for a prepared transaction (both members are a TimestampTz).
        prepare_time: unsafe { t.xact_time.prepare_time },
    };
    // SAFETY: `ctx` is the decoding context of this callback.
    unsafe { send(ctx, &msg) };
}

#[pg_guard]
unsafe extern "C-unwind" fn prepare(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    prepare_lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: the arguments of this callback.
    unsafe { send_prepare(ctx, txn, prepare_lsn, false) };
}

/// Sends the PREPARE of `txn` (`streamed`: one sent while it ran).
unsafe fn send_prepare(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    prepare_lsn: pg_sys::XLogRecPtr,
    streamed: bool,
) {
    // SAFETY: the caller passes its callback's arguments: as in `begin`.
    let t = unsafe { &*txn };
    let (origin, xid, gid, end_lsn) = (origin(), t.xid.into_inner(), gid(t), t.end_lsn);
    // SAFETY: as in `begin_prepare`: the member set for a prepared transaction.
    let prepare_time = unsafe { t.xact_time.prepare_time };
    let msg = if streamed {
        Message::StreamPrepare { origin, xid, gid, prepare_lsn, end_lsn, prepare_time }
    } else {
        Message::Prepare { origin, xid, gid, prepare_lsn, end_lsn, prepare_time }
    };
    // SAFETY: `ctx` is the decoding context of the caller's callback.
    unsafe { send(ctx, &msg) };
    end_of_transaction();
}

#[pg_guard]
unsafe extern "C-unwind" fn commit_prepared(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    commit_lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: as in `begin`.
    let t = unsafe { &*txn };
    let msg = Message::CommitPrepared {
        origin: origin(),
        xid: t.xid.into_inner(),
        gid: gid(t),
        commit_lsn,
        end_lsn: t.end_lsn,
        // SAFETY: `t` is the ReorderBufferTXN of this callback; ReorderBufferFinishPrepared sets
        // the `commit_time` member before calling it.
        commit_time: unsafe { t.xact_time.commit_time },
    };
    // SAFETY: `ctx` is the decoding context of this callback.
    unsafe { send(ctx, &msg) };
    end_of_transaction();
}

#[pg_guard]
unsafe extern "C-unwind" fn rollback_prepared(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    prepare_end_lsn: pg_sys::XLogRecPtr,
    prepare_time: pg_sys::TimestampTz,
) {
    // SAFETY: as in `begin`.
    let t = unsafe { &*txn };
    let msg = Message::RollbackPrepared {
        origin: origin(),
        xid: t.xid.into_inner(),
        gid: gid(t),
        end_lsn: prepare_end_lsn,
        prepare_time,
        // SAFETY: `t` is the ReorderBufferTXN of this callback; ReorderBufferFinishPrepared sets
        // the `commit_time` member (here the rollback's time) before calling it.
        rollback_time: unsafe { t.xact_time.commit_time },
    };
    // SAFETY: `ctx` is the decoding context of this callback.
    unsafe { send(ctx, &msg) };
    end_of_transaction();
}

#[pg_guard]
unsafe extern "C-unwind" fn message(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
    message_lsn: pg_sys::XLogRecPtr,
    transactional: bool,
    prefix: *const std::ffi::c_char,
    message_size: pg_sys::Size,
    message: *const std::ffi::c_char,
) {
    let content = if message_size == 0 {
        &[][..]
    } else {
        // SAFETY: decoding hands over `message_size` bytes at `message`, valid for the call.
        unsafe { std::slice::from_raw_parts(message.cast::<u8>(), message_size) }
    };
    // SAFETY: decoding passes the message's NUL-terminated prefix, valid for the call.
    let prefix = unsafe { CStr::from_ptr(prefix) }.to_string_lossy().into_owned();
    // A message with mmts's prefix goes on only if mmts wrote it (see `provenance`): any role
    // may write one with pg_logical_emit_message.
    let content = if prefix == SIGNAL_PREFIX {
        let Some(body) = crate::provenance::open(transactional, content, message_lsn) else { return };
        body
    } else {
        content
    };
    let msg = Message::LogicalMessage { transactional, lsn: message_lsn, prefix, content: content.to_vec() };
    // SAFETY: `ctx` is the decoding context of this callback.
    unsafe { send(ctx, &msg) };
}

#[pg_guard]
unsafe extern "C-unwind" fn change(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
    rel: pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY (this function): PostgreSQL passes the decoding context, the relation open for
    // the change and the change itself, whose `tp` member is the one for insert, update and
    // delete (the only kinds read); old/new tuples are NULL-checked where they may be absent.
    // Held for the whole change: an output function may process invalidations, which
    // update the session.
    let Some(outputs) = (unsafe { send_relation(ctx, rel) }) else { return };
    let relation = unsafe { (*rel).rd_id }.to_u32();
    // SAFETY: `change` is the change of this callback; PostgreSQL calls change_cb only for
    // inserts, updates and deletes, whose union member is `tp`.
    let c = unsafe { &*change };
    let tp = unsafe { c.data.tp };
    let msg = match c.action {
        pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_INSERT => {
            // SAFETY: an insert has a new tuple of the open `rel`, and `outputs` are its columns'.
            Message::Insert { relation, new: unsafe { row(rel, &outputs, tp.newtuple) } }
        }
        // SAFETY: an update has a new tuple, and an old one when not NULL, of the open `rel`.
        pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_UPDATE => Message::Update {
            relation,
            old: (!tp.oldtuple.is_null()).then(|| unsafe { row(rel, &outputs, tp.oldtuple) }),
            new: unsafe { row(rel, &outputs, tp.newtuple) },
        },
        pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_DELETE => {
            if tp.oldtuple.is_null() {
                // A table without replica identity: PostgreSQL logs no old key to send.
                return;
            }
            // SAFETY: the old tuple, checked non-NULL above, of the open `rel`.
            Message::Delete { relation, old: unsafe { row(rel, &outputs, tp.oldtuple) } }
        }
        _ => return,
    };
    // SAFETY: `ctx` is the decoding context of this callback.
    unsafe { send(ctx, &msg) };
}

#[pg_guard]
unsafe extern "C-unwind" fn truncate(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
    nrelations: i32,
    relations: *mut pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY: decoding passes `nrelations` (at least one) open relations at `relations`, and a
    // TRUNCATE change whose `truncate` member is set, all valid for the call.
    let all = unsafe { std::slice::from_raw_parts(relations, nrelations.max(0) as usize) };
    let rels: Vec<pg_sys::Relation> =
        all.iter().copied().filter(|rel| unsafe { send_relation(ctx, *rel) }.is_some()).collect();
    if rels.is_empty() {
        return;
    }
    // SAFETY: `change` is this callback's TRUNCATE change, whose union member is `truncate`;
    // `rels` are relations PostgreSQL has open for the call; `ctx` is its decoding context.
    let t = unsafe { (*change).data.truncate };
    let msg = Message::Truncate {
        relations: rels.iter().map(|r| unsafe { (**r).rd_id }.to_u32()).collect(),
        cascade: t.cascade,
        restart_identity: t.restart_seqs,
    };
    // SAFETY: `ctx` is the decoding context of this callback.
    unsafe { send(ctx, &msg) };
}

// ---- large transactions sent while they run (`mmts_streaming`) ------------------------------

#[pg_guard]
unsafe extern "C-unwind" fn stream_start(ctx: *mut pg_sys::LogicalDecodingContext, txn: *mut pg_sys::ReorderBufferTXN) {
    // SAFETY: PostgreSQL passes the top-level transaction being streamed, valid for the call.
    let xid = unsafe { (*txn).xid }.into_inner();
    SESSION.with(|s| {
        if let Some(m) = s.borrow_mut().mmts.as_mut() {
            m.block = Some(StreamBlock { subxid: xid, described: HashMap::new() });
        }
    });
    // SAFETY: `ctx` is the decoding context of this callback.
    unsafe { send(ctx, &Message::StreamStart { xid }) };
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_stop(ctx: *mut pg_sys::LogicalDecodingContext, _txn: *mut pg_sys::ReorderBufferTXN) {
    // SAFETY: `ctx` is the decoding context of this callback.
    unsafe { send(ctx, &Message::StreamStop) };
    SESSION.with(|s| {
        if let Some(m) = s.borrow_mut().mmts.as_mut() {
            m.block = None;
        }
    });
}

/// Announces that the messages that follow belong to (sub)transaction `subxid`, if the last
/// ones sent in this block did not.
unsafe fn stream_subtransaction(ctx: *mut pg_sys::LogicalDecodingContext, subxid: u32) {
    let changed = SESSION.with(|s| {
        let mut s = s.borrow_mut();
        let block = s.mmts.as_mut().and_then(|m| m.block.as_mut())?;
        (block.subxid != subxid).then(|| block.subxid = subxid)
    });
    if changed.is_some() {
        // SAFETY: `ctx` is the decoding context of the caller's callback.
        unsafe { send(ctx, &Message::StreamSubtransaction { subxid }) };
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_change(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    rel: pg_sys::Relation,
    change_: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY: PostgreSQL passes the change with the (sub)transaction it belongs to; the rest
    // as in `change`.
    unsafe {
        stream_subtransaction(ctx, (*(*change_).txn).xid.into_inner());
        change(ctx, txn, rel, change_);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_truncate(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    nrelations: i32,
    relations: *mut pg_sys::Relation,
    change_: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY: as in `stream_change`, and `truncate` for the relations.
    unsafe {
        stream_subtransaction(ctx, (*(*change_).txn).xid.into_inner());
        truncate(ctx, txn, nrelations, relations, change_);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_message(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    message_lsn: pg_sys::XLogRecPtr,
    transactional: bool,
    prefix: *const std::ffi::c_char,
    message_size: pg_sys::Size,
    content: *const std::ffi::c_char,
) {
    // PostgreSQL passes the top-level transaction here, not the subtransaction that wrote the
    // message (a schema change inside a savepoint, say). While it streams, it sets
    // `CheckXidAlive` to the xid of the change being decoded, as long as that is not committed
    // (reorderbuffer.c's `SetupCheckXidLive`); once it is, no subtransaction can roll back
    // any more, and the top-level xid will do.
    // SAFETY: a plain global of this process, on its main thread; `txn` is valid for the call.
    let subxid = unsafe {
        let alive = pg_sys::CheckXidAlive;
        if alive == pg_sys::InvalidTransactionId {
            (*txn).xid
        } else {
            alive
        }
    };
    // SAFETY: as in `message`.
    unsafe {
        stream_subtransaction(ctx, subxid.into_inner());
        message(ctx, txn, message_lsn, transactional, prefix, message_size, content);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_abort(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    _abort_lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: PostgreSQL passes the (sub)transaction that rolled back; a subtransaction's
    // `toptxn` is its top-level transaction.
    let (xid, subxid) = unsafe {
        let t = &*txn;
        let top = if t.toptxn.is_null() { t } else { &*t.toptxn };
        (top.xid.into_inner(), t.xid.into_inner())
    };
    // SAFETY: `ctx` is the decoding context of this callback.
    unsafe { send(ctx, &Message::StreamAbort { xid, subxid }) };
    if xid == subxid {
        end_of_transaction();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_prepare(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    prepare_lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: the arguments of this callback.
    unsafe { send_prepare(ctx, txn, prepare_lsn, true) };
}

#[pg_guard]
unsafe extern "C-unwind" fn stream_commit(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    commit_lsn: pg_sys::XLogRecPtr,
) {
    // SAFETY: the arguments of this callback.
    unsafe { send_commit(ctx, txn, commit_lsn, true) };
}
