//! Replication of schema changes, and sequences that never collide across nodes.
//!
//! A statement run by a client in the replicated database that changes the schema (CREATE /
//! ALTER / DROP of any object, GRANT / REVOKE, COMMENT, roles, …) is written into its
//! transaction as a [`Signal::Ddl`] carrying its text, the role that ran it and the session's
//! search_path. Peers run it at the same point of the same transaction, so it is prepared and
//! committed with the transaction's row changes (or fails it everywhere). The statement's own
//! inner statements (those of a CREATE TABLE, of an extension script) are not sent on their
//! own; statements inside functions and DO blocks are, since the peers do not run those.
//!
//! Statements about this node only (VACUUM, CHECKPOINT, ALTER SYSTEM, CREATE DATABASE, …) run
//! here only, statements on temporary objects are never sent, and statements that cannot run
//! inside a transaction on the peers are refused (see [`classify`]).
//! `SET multimaster.replicate_ddl = off` (superusers) keeps a session's statements local.
//!
//! New sequences get step [`gucs::MAX_NODES`] and a start offset by node id on each node
//! (unless the statement sets its own INCREMENT), so no two nodes hand out the same value.

use std::cell::Cell;
use std::ffi::{c_char, CStr, CString};

use mmts_core::config::Mode;
use mmts_core::twopc::{Signal, MAX_SIGNAL};
use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use crate::{gucs, twophase};

thread_local! {
    /// Replicated statements under way in this backend: what they run inside is not sent.
    static CAPTURING: Cell<u32> = const { Cell::new(0) };
    /// This backend (an applier) is running a peer's statement.
    static APPLYING: Cell<bool> = const { Cell::new(false) };
}

/// What happens to a utility statement run by a client.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    /// Runs on this node only.
    Local,
    /// Runs on every node.
    Replicated,
    /// Refused: it cannot be run the same way on the peers.
    Refused { what: &'static str, why: &'static str, hint: &'static str },
}

/// What [`before`] decided for a statement; [`Capture::finish`] completes it once the
/// statement has run.
pub struct Capture {
    /// The statement's text, to send once it has run (unless it touched temporary objects).
    pending: Option<String>,
    /// Counted in `CAPTURING`.
    counted: bool,
    /// Whether the transaction had touched temporary objects before the statement.
    temp_before: bool,
    /// The statement names objects that are not temporary: sent even when it also reached
    /// temporary ones (a DROP … CASCADE dropping a temporary table that depends on them).
    names_lasting: bool,
    /// The session's replication origin while the statement's own rows are kept from the
    /// peers (an extension's script: the peers run it too).
    origin: Option<pg_sys::RepOriginId>,
}

const TEMP_FLAG: i32 = pg_sys::XACT_FLAGS_ACCESSEDTEMPNAMESPACE as i32;

impl Capture {
    fn none() -> Capture {
        Capture { pending: None, counted: false, temp_before: false, names_lasting: false, origin: None }
    }

    /// After the statement ran: sends it unless it touched temporary objects.
    pub fn finish(mut self) {
        self.restore_origin();
        let Some(statement) = self.pending.take() else { return };
        // SAFETY: a plain global of this backend's transaction, on its main thread.
        let temp = unsafe { pg_sys::MyXactFlags } & TEMP_FLAG != 0;
        if !temp || self.names_lasting {
            send(statement);
        }
    }
}

impl Capture {
    fn restore_origin(&mut self) {
        if let Some(origin) = self.origin.take() {
            // SAFETY: a plain global of this session, on its main thread.
            unsafe { pg_sys::replorigin_session_origin = origin };
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.restore_origin();
        if self.counted {
            CAPTURING.with(|c| c.set(c.get() - 1));
        }
        if self.temp_before {
            // SAFETY: a plain global of this backend's transaction, on its main thread.
            unsafe { pg_sys::MyXactFlags |= TEMP_FLAG };
        }
    }
}

/// Before a utility statement runs (any backend of a multimaster node): adjusts new
/// sequences and a peer's CREATE TABLE AS, refuses what cannot be replicated, and notes what
/// must be sent.
pub unsafe fn before(pstmt: *mut pg_sys::PlannedStmt, query_string: *const c_char) -> Capture {
    let Mode::Multimaster(config) = gucs::mode() else { return Capture::none() };
    if !gucs::in_replicated_database() {
        return Capture::none();
    }
    // SAFETY: `pstmt` is the utility statement's plan ProcessUtility got (the caller's part);
    // its node is read as the struct its tag names, and a peer's CREATE TABLE AS has `into`.
    let stmt = unsafe { (*pstmt).utilityStmt };
    unsafe {
        match (*stmt).type_ {
            pg_sys::NodeTag::T_CreateSeqStmt => spread_sequence(stmt.cast(), config.node_id.0),
            pg_sys::NodeTag::T_CreateTableAsStmt if APPLYING.with(Cell::get) => {
                // The rows come from the peer's stream, as inserts (kept local, and so
                // computed here, when tables without a key stay local).
                let ctas = stmt as *mut pg_sys::CreateTableAsStmt;
                if (*ctas).objtype == pg_sys::ObjectType::OBJECT_TABLE && !gucs::IGNORE_TABLES_WITHOUT_PK.get() {
                    (*(*ctas).into).skipData = true;
                }
            }
            _ => {}
        }
    }
    // SAFETY (with `creating_extension` below): plain globals, on the backend's main thread.
    let client = unsafe { pg_sys::MyBackendType == pg_sys::BackendType::B_BACKEND };
    if !client
        || APPLYING.with(Cell::get)
        || CAPTURING.with(Cell::get) > 0
        || unsafe { pg_sys::creating_extension }
        || !gucs::REPLICATE_DDL.get()
    {
        return Capture::none();
    }
    // SAFETY: `stmt` is the valid statement node read above.
    match unsafe { classify(stmt) } {
        Kind::Local => Capture::none(),
        Kind::Refused { what, why, hint } => {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("mmts cannot replicate {what}"),
                "mmts",
            )
            .set_detail(why)
            .set_hint(hint)
            .report(PgLogLevel::ERROR);
            unreachable!()
        }
        Kind::Replicated => {
            super::refuse_unless_writable();
            CAPTURING.with(|c| c.set(c.get() + 1));
            // SAFETY: `pstmt` and `query_string` as ProcessUtility got them (NULL-checked there).
            let text = unsafe { statement_text(pstmt, query_string) };
            // SAFETY: the tag says which struct `stmt` is; a CREATE TABLE AS has `into` and a rel.
            if unsafe { (*stmt).type_ } == pg_sys::NodeTag::T_CreateTableAsStmt {
                // Sent first: its rows follow in the stream, and the peers need the table.
                let into = unsafe { (*(stmt as *mut pg_sys::CreateTableAsStmt)).into };
                let temp = unsafe { (*(*into).rel).relpersistence } == pg_sys::RELPERSISTENCE_TEMP as c_char;
                if !temp {
                    send(text);
                }
                return Capture {
                    pending: None,
                    counted: true,
                    temp_before: false,
                    names_lasting: false,
                    origin: None,
                };
            }
            // Rows an extension's script writes are written by the script on every node:
            // marked as not to be replicated (the output plugin skips what has an origin).
            // SAFETY: `stmt` is valid; the session's origin is a plain global (main thread), put
            // back by `Capture`.
            let origin = matches!(
                unsafe { (*stmt).type_ },
                pg_sys::NodeTag::T_CreateExtensionStmt | pg_sys::NodeTag::T_AlterExtensionStmt
            )
            .then(|| unsafe {
                let saved = pg_sys::replorigin_session_origin;
                pg_sys::replorigin_session_origin = pg_sys::DoNotReplicateId as pg_sys::RepOriginId;
                saved
            });
            // Whether the statement itself touches temporary objects is seen after it ran.
            // SAFETY: a plain global of this backend's transaction (main thread); `stmt` is valid.
            let temp_before = unsafe { pg_sys::MyXactFlags } & TEMP_FLAG != 0;
            unsafe { pg_sys::MyXactFlags &= !TEMP_FLAG };
            let names_lasting = unsafe { drops_lasting_objects(stmt) };
            Capture { pending: Some(text), counted: true, temp_before, names_lasting, origin }
        }
    }
}

/// Writes `statement` into the transaction for the peers.
fn send(statement: String) {
    // SAFETY: inside the statement's transaction. GetUserNameFromId raises rather than return
    // NULL (noerr = false); GetConfigOption's result is checked and copied at once.
    let (role, search_path) = unsafe {
        let role = CStr::from_ptr(pg_sys::GetUserNameFromId(pg_sys::GetUserId(), false));
        let path = pg_sys::GetConfigOption(c"search_path".as_ptr(), false, false);
        let path = if path.is_null() { String::new() } else { CStr::from_ptr(path).to_string_lossy().into_owned() };
        (role.to_string_lossy().into_owned(), path)
    };
    let signal = Signal::Ddl { role, search_path, statement };
    let size = signal.encode().len();
    if size > MAX_SIGNAL {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("statement too long for mmts to replicate ({size} bytes encoded, at most {MAX_SIGNAL})"),
            "mmts",
        )
        .set_hint("Split it into smaller statements.")
        .report(PgLogLevel::ERROR);
    }
    twophase::emit(&signal, true);
    super::note_write();
}

/// The text of the statement `pstmt` within `query_string` (which may hold several).
unsafe fn statement_text(pstmt: *mut pg_sys::PlannedStmt, query_string: *const c_char) -> String {
    if query_string.is_null() {
        return String::new();
    }
    // SAFETY: the caller passes the statement's plan and its NUL-terminated source text, which
    // live until the statement ends.
    let all = unsafe { CStr::from_ptr(query_string) }.to_bytes();
    let (location, len) = unsafe { ((*pstmt).stmt_location, (*pstmt).stmt_len) };
    let start = (location.max(0) as usize).min(all.len());
    let end = if len > 0 { (start + len as usize).min(all.len()) } else { all.len() };
    String::from_utf8_lossy(&all[start..end]).trim().to_string()
}

const NOT_IN_A_TRANSACTION: &str = "It cannot run inside a transaction on the other nodes.";
const WITHOUT_CONCURRENTLY: &str = "Run it without CONCURRENTLY (replicated), or, as a superuser, SET multimaster.replicate_ddl = off and run it on every node.";

/// Objects each node has its own of: databases and tablespaces (made outside transactions, on
/// each node), publications and subscriptions (for PostgreSQL's logical replication from or to
/// that node), and large objects (their data is not replicated). Every statement about them
/// stays on the node it runs on.
fn per_node(kind: pg_sys::ObjectType::Type) -> bool {
    use pg_sys::ObjectType::*;
    matches!(kind, OBJECT_DATABASE | OBJECT_TABLESPACE | OBJECT_PUBLICATION | OBJECT_SUBSCRIPTION | OBJECT_LARGEOBJECT)
}

fn concurrently(what: &'static str) -> Kind {
    Kind::Refused { what, why: NOT_IN_A_TRANSACTION, hint: WITHOUT_CONCURRENTLY }
}

/// Whether `stmt` is about this node only, runs everywhere, or cannot be replicated.
unsafe fn classify(stmt: *mut pg_sys::Node) -> Kind {
    use pg_sys::NodeTag::*;
    // SAFETY: the caller passes a valid parse node; each cast is to the struct its tag names.
    unsafe {
        match (*stmt).type_ {
            T_ExplainStmt if explains_table_creation(stmt.cast()) => Kind::Refused {
                what: "EXPLAIN ANALYZE of CREATE TABLE AS",
                why: "It would make the table on this node only.",
                hint: "Run the CREATE TABLE AS itself (replicated), then EXPLAIN its query.",
            },
            // Transaction control, sessions, cursors, DML-like statements (their rows are
            // replicated), maintenance, and objects outside the replicated database.
            T_TransactionStmt
            | T_DoStmt
            | T_CallStmt
            | T_ExplainStmt
            | T_CopyStmt
            | T_TruncateStmt
            | T_PrepareStmt
            | T_ExecuteStmt
            | T_DeallocateStmt
            | T_VariableSetStmt
            | T_VariableShowStmt
            | T_DiscardStmt
            | T_ListenStmt
            | T_UnlistenStmt
            | T_NotifyStmt
            | T_LoadStmt
            | T_CheckPointStmt
            | T_VacuumStmt
            | T_ClusterStmt
            | T_ReindexStmt
            | T_LockStmt
            | T_ConstraintsSetStmt
            | T_FetchStmt
            | T_DeclareCursorStmt
            | T_ClosePortalStmt
            | T_AlterSystemStmt
            | T_CreatedbStmt
            | T_DropdbStmt
            | T_AlterDatabaseStmt
            | T_AlterDatabaseSetStmt
            | T_AlterDatabaseRefreshCollStmt
            | T_CreateTableSpaceStmt
            | T_DropTableSpaceStmt
            | T_AlterTableSpaceOptionsStmt
            | T_CreateSubscriptionStmt
            | T_AlterSubscriptionStmt
            | T_DropSubscriptionStmt
            | T_CreatePublicationStmt
            | T_AlterPublicationStmt => Kind::Local,
            // mmts itself is created on each node.
            T_CreateExtensionStmt => own_extension((*(stmt as *mut pg_sys::CreateExtensionStmt)).extname),
            T_AlterExtensionStmt => own_extension((*(stmt as *mut pg_sys::AlterExtensionStmt)).extname),
            T_AlterExtensionContentsStmt => own_extension((*(stmt as *mut pg_sys::AlterExtensionContentsStmt)).extname),
            T_IndexStmt if (*(stmt as *mut pg_sys::IndexStmt)).concurrent => concurrently("CREATE INDEX CONCURRENTLY"),
            T_AlterTableStmt if detaches_concurrently(stmt.cast()) => {
                concurrently("ALTER TABLE ... DETACH PARTITION ... CONCURRENTLY")
            }
            T_DropStmt => {
                let drop = stmt as *mut pg_sys::DropStmt;
                if (*drop).concurrent {
                    concurrently("DROP INDEX CONCURRENTLY")
                } else if per_node((*drop).removeType)
                    || (*drop).removeType == pg_sys::ObjectType::OBJECT_EXTENSION
                        && names((*drop).objects).iter().any(|n| n == "mmts")
                {
                    Kind::Local
                } else {
                    Kind::Replicated
                }
            }
            T_CommentStmt if per_node((*(stmt as *mut pg_sys::CommentStmt)).objtype) => Kind::Local,
            T_RenameStmt if per_node((*(stmt as *mut pg_sys::RenameStmt)).renameType) => Kind::Local,
            T_AlterOwnerStmt if per_node((*(stmt as *mut pg_sys::AlterOwnerStmt)).objectType) => Kind::Local,
            T_GrantStmt if per_node((*(stmt as *mut pg_sys::GrantStmt)).objtype) => Kind::Local,
            T_SecLabelStmt if per_node((*(stmt as *mut pg_sys::SecLabelStmt)).objtype) => Kind::Local,
            _ => Kind::Replicated,
        }
    }
}

/// Whether `stmt` drops a schema, or a relation that is not temporary (before it runs).
unsafe fn drops_lasting_objects(stmt: *mut pg_sys::Node) -> bool {
    use pg_sys::ObjectType::*;
    // SAFETY: the caller passes a valid parse node, read as a DropStmt once its tag says so;
    // its `objects` for relations are lists of name lists (list_nth stays below `length`).
    unsafe {
        if (*stmt).type_ != pg_sys::NodeTag::T_DropStmt {
            return false;
        }
        let drop = stmt as *mut pg_sys::DropStmt;
        match (*drop).removeType {
            OBJECT_SCHEMA => true,
            OBJECT_TABLE | OBJECT_VIEW | OBJECT_MATVIEW | OBJECT_SEQUENCE | OBJECT_INDEX | OBJECT_FOREIGN_TABLE => {
                let objects = (*drop).objects;
                (0..if objects.is_null() { 0 } else { (*objects).length }).any(|i| {
                    let name = pg_sys::list_nth(objects, i) as *mut pg_sys::List;
                    let relid = crate::tables::relation_id(pg_sys::makeRangeVarFromNameList(name));
                    relid != pg_sys::InvalidOid
                        && pg_sys::get_rel_persistence(relid) != pg_sys::RELPERSISTENCE_TEMP as c_char
                })
            }
            _ => false,
        }
    }
}

/// Whether `stmt` is an EXPLAIN ANALYZE of CREATE TABLE AS / SELECT INTO (which makes the table).
unsafe fn explains_table_creation(stmt: *mut pg_sys::ExplainStmt) -> bool {
    // SAFETY: the caller passes a valid ExplainStmt; nodes are cast as their tags say, and its
    // options are DefElems with a NUL-terminated name (list_nth stays below `length`).
    unsafe {
        let query = (*stmt).query;
        if query.is_null() || (*query).type_ != pg_sys::NodeTag::T_Query {
            return false;
        }
        let utility = (*(query as *mut pg_sys::Query)).utilityStmt;
        if utility.is_null() || (*utility).type_ != pg_sys::NodeTag::T_CreateTableAsStmt {
            return false;
        }
        let options = (*stmt).options;
        let n = if options.is_null() { 0 } else { (*options).length };
        (0..n).any(|i| {
            let def = pg_sys::list_nth(options, i) as *mut pg_sys::DefElem;
            CStr::from_ptr((*def).defname).to_bytes() == b"analyze" && pg_sys::defGetBoolean(def)
        })
    }
}

unsafe fn detaches_concurrently(stmt: *mut pg_sys::AlterTableStmt) -> bool {
    // SAFETY: the caller passes a valid AlterTableStmt; its cmds are AlterTableCmds, and a
    // DETACH PARTITION's `def` is a PartitionCmd (list_nth stays below `length`).
    let cmds = unsafe { (*stmt).cmds };
    let n = if cmds.is_null() { 0 } else { unsafe { (*cmds).length } };
    (0..n).any(|i| unsafe {
        let cmd = pg_sys::list_nth(cmds, i) as *mut pg_sys::AlterTableCmd;
        (*cmd).subtype == pg_sys::AlterTableType::AT_DetachPartition
            && !(*cmd).def.is_null()
            && (*((*cmd).def as *mut pg_sys::PartitionCmd)).concurrent
    })
}

fn own_extension(name: *mut c_char) -> Kind {
    // SAFETY: a non-NULL extension name of a parse node is a NUL-terminated string.
    if !name.is_null() && unsafe { CStr::from_ptr(name) }.to_bytes() == b"mmts" {
        Kind::Local
    } else {
        Kind::Replicated
    }
}

/// The names in a list of `String` nodes (other nodes are skipped).
unsafe fn names(list: *mut pg_sys::List) -> Vec<String> {
    // SAFETY: the caller passes a valid List (or NULL); entries are read as String nodes only
    // when tagged so, and their `sval` is NUL-terminated.
    let n = if list.is_null() { 0 } else { unsafe { (*list).length } };
    (0..n)
        .filter_map(|i| unsafe {
            let node = pg_sys::list_nth(list, i) as *mut pg_sys::Node;
            (!node.is_null() && (*node).type_ == pg_sys::NodeTag::T_String)
                .then(|| CStr::from_ptr((*(node as *mut pg_sys::String)).sval).to_string_lossy().into_owned())
        })
        .collect()
}

/// Gives a new sequence step [`gucs::MAX_NODES`] and a start shifted by `node - 1` (from its
/// START, else its MINVALUE, else 1), unless it sets its own INCREMENT.
unsafe fn spread_sequence(stmt: *mut pg_sys::CreateSeqStmt, node: u32) {
    // SAFETY: the caller passes a valid CreateSeqStmt that it may modify; its options are
    // DefElems with a NUL-terminated name. The new nodes are palloc'd in the current memory
    // context, so the tree must not outlive it: a read-only tree (ProcessUtility's
    // `readOnlyTree`, a cached plan's) must be copied by the caller first.
    unsafe {
        let options = (*stmt).options;
        let n = if options.is_null() { 0 } else { (*options).length };
        let mut start = None;
        let mut minvalue = None;
        for i in 0..n {
            let def = pg_sys::list_nth(options, i) as *mut pg_sys::DefElem;
            match CStr::from_ptr((*def).defname).to_bytes() {
                b"increment" => return,
                b"start" => start = Some(def),
                b"minvalue" if !(*def).arg.is_null() => minvalue = Some(pg_sys::defGetInt64(def)),
                _ => {}
            }
        }
        let shift = node as i64 - 1;
        let first = match start {
            Some(def) => pg_sys::defGetInt64(def),
            None => minvalue.unwrap_or(1),
        }
        .saturating_add(shift);
        let value = integer_node(first);
        match start {
            Some(def) => (*def).arg = value,
            None => (*stmt).options = pg_sys::lappend((*stmt).options, def_elem(c"start", value).cast()),
        }
        let step = integer_node(gucs::MAX_NODES as i64);
        (*stmt).options = pg_sys::lappend((*stmt).options, def_elem(c"increment", step).cast());
    }
}

unsafe fn def_elem(name: &CStr, value: *mut pg_sys::Node) -> *mut pg_sys::DefElem {
    // SAFETY: the name is copied (pstrdup) into the current memory context, like the node.
    unsafe { pg_sys::makeDefElem(pg_sys::pstrdup(name.as_ptr()), value, -1) }
}

/// An Integer node, or a Float one (as the parser makes) beyond 32 bits.
unsafe fn integer_node(v: i64) -> *mut pg_sys::Node {
    // SAFETY: makeFloat keeps its string, so it gets a palloc'd copy rather than `text`.
    unsafe {
        match i32::try_from(v) {
            Ok(small) => pg_sys::makeInteger(small).cast(),
            Err(_) => {
                let text = CString::new(v.to_string()).expect("digits");
                pg_sys::makeFloat(pg_sys::pstrdup(text.as_ptr())).cast()
            }
        }
    }
}

/// Runs a peer's statement (an applier, inside the transaction being applied) as `role`
/// with `search_path`.
pub fn run(role: &str, search_path: &str, statement: &str) {
    struct Applying;
    impl Drop for Applying {
        fn drop(&mut self) {
            APPLYING.with(|a| a.set(false));
        }
    }
    let role_c = CString::new(role).unwrap_or_default();
    let path_c = CString::new(search_path).unwrap_or_default();
    // SAFETY: the applier's main thread, inside the transaction being applied (an error ends
    // it, which puts the user, settings and snapshot back). GetConfigOption's search_path is
    // never NULL and is copied at once; `role_c` and `path_c` outlive the calls.
    unsafe {
        // An unknown role is an error here, as it would be for the statement.
        let role_id = pg_sys::get_role_oid(role_c.as_ptr(), false);
        let (mut user, mut context) = (pg_sys::InvalidOid, 0);
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        let old_path = CStr::from_ptr(pg_sys::GetConfigOption(c"search_path".as_ptr(), false, false)).to_owned();
        set_search_path(&path_c);
        // The origin checked function bodies (a body may use its temporary objects, which the
        // peers do not have), as a restore of pg_dump's output does not check them again.
        set_local(c"check_function_bodies", c"off");
        // As the role itself, like its session on the origin (no security-definer context:
        // a CREATE FUNCTION … SET role = … validates there, and must here).
        pg_sys::SetUserIdAndSecContext(role_id, context);
        APPLYING.with(|a| a.set(true));
        let _applying = Applying;
        // An error ends the transaction, which puts the user, the setting and the snapshot back.
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        Spi::run(statement).unwrap_or_else(|e| {
            ereport!(PgLogLevel::ERROR, PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("mmts: {e}"));
        });
        pg_sys::PopActiveSnapshot();
        pg_sys::SetUserIdAndSecContext(user, context);
        set_search_path(&old_path);
    }
}

/// The applier's search_path is set with the highest priority (see `receiver`): so is this.
unsafe fn set_search_path(value: &CStr) {
    // SAFETY: the caller's (`run`): main thread, inside the applier's transaction.
    unsafe { set_local(c"search_path", value) }
}

/// Sets `name` for the rest of the applier's transaction, with the highest priority.
unsafe fn set_local(name: &CStr, value: &CStr) {
    // SAFETY: the caller's (`run`): main thread, inside the applier's transaction (a LOCAL
    // setting needs one); `name` and `value` are NUL-terminated and outlive the call.
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_OVERRIDE,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            0,
            false,
        );
    }
}
