//! `ExecutorStart_hook`: refuses writes that mmts could not replicate faithfully. A table
//! without a primary key or replica identity cannot have its updates and deletes found on the
//! peers, so with `multimaster.ignore_tables_without_pk = off` (the default) any write to one
//! is an error instead of a silent divergence; with it on, such tables stay local (the output
//! plugin does not send them).

use std::ffi::CStr;
use std::sync::OnceLock;

use mmts_core::config::Mode;
use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use crate::gucs;

/// The hook that was installed before ours (`None` inside: PostgreSQL's standard function).
/// Set once, in `_PG_init`, before any statement runs; read by every backend after that.
static PREVIOUS: OnceLock<pg_sys::ExecutorStart_hook_type> = OnceLock::new();

pub fn install() {
    // SAFETY: `_PG_init` in the postmaster, single-threaded, before any backend runs a query.
    // `_PG_init` runs once per process, so ours is installed once, over the previous hook.
    unsafe {
        if PREVIOUS.set(pg_sys::ExecutorStart_hook).is_ok() {
            pg_sys::ExecutorStart_hook = Some(executor_start);
        }
    }
}

/// The table `rv` names, without locking it (`InvalidOid` when there is none).
pub unsafe fn relation_id(rv: *mut pg_sys::RangeVar) -> pg_sys::Oid {
    // SAFETY: the caller passes a valid RangeVar, inside a transaction (catalog lookup).
    unsafe {
        pg_sys::RangeVarGetRelidExtended(
            rv,
            pg_sys::NoLock as pg_sys::LOCKMODE,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        )
    }
}

/// Whether mmts replicates writes to `rel` (a permanent table, partitioned or not, outside
/// schema mtm). The rows of a partitioned table live in its partitions, which are replicated
/// tables themselves; a write to the partitioned table is a write to them.
pub unsafe fn replicated_table(rel: pg_sys::Relation) -> bool {
    // SAFETY: the caller passes an open relation, whose rd_rel is valid and whose schema
    // exists while it is open (so get_namespace_name does not return NULL).
    unsafe {
        let class = &*(*rel).rd_rel;
        [pg_sys::RELKIND_RELATION, pg_sys::RELKIND_PARTITIONED_TABLE].contains(&(class.relkind as u8))
            && class.relpersistence == pg_sys::RELPERSISTENCE_PERMANENT as std::ffi::c_char
            && (*rel).rd_id.to_u32() >= pg_sys::FirstNormalObjectId
            && CStr::from_ptr(pg_sys::get_namespace_name(class.relnamespace)).to_bytes() != b"mtm"
    }
}

/// Whether updates and deletes of `rel` can be found on the peers.
pub unsafe fn has_replica_identity(rel: pg_sys::Relation) -> bool {
    // SAFETY: the caller passes an open relation.
    unsafe {
        (*(*rel).rd_rel).relreplident == pg_sys::REPLICA_IDENTITY_FULL as std::ffi::c_char
            || pg_sys::RelationGetReplicaIndex(rel) != pg_sys::InvalidOid
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_start(query: *mut pg_sys::QueryDesc, eflags: i32) {
    // SAFETY: PostgreSQL calls the hook on the main thread, inside a transaction, with a valid
    // QueryDesc and plan.
    unsafe {
        if matches!(gucs::mode(), Mode::Multimaster(_)) {
            crate::commit::refuse_if_wounded();
            check_result_relations((*query).plannedstmt);
        }
        // SAFETY: nothing here needs dropping; errors leave as raised (see `pg_internals`).
        crate::pg_internals::keeping_errors(
            || match PREVIOUS.get().copied().flatten() {
                Some(previous) => previous(query, eflags),
                None => crate::pg_internals::standard_executor_start(query, eflags),
            },
            || {},
        );
    }
}

/// Refuses writes to tables without a key (unless they are kept local), and tells the
/// synchronous commit that the transaction writes a replicated table.
unsafe fn check_result_relations(stmt: *mut pg_sys::PlannedStmt) {
    // SAFETY: `stmt` is the plan ExecutorStart got, inside its transaction: resultRelations
    // holds 1-based indexes into its range table (list_nth stays in bounds). Each relation
    // RelationIdGetRelation opens is read (relname is NUL-terminated) and closed before any
    // error is raised.
    unsafe {
        let results = (*stmt).resultRelations;
        let n = if results.is_null() { 0 } else { (*results).length };
        for i in 0..n {
            let rti = pg_sys::list_nth_int(results, i);
            let rte = pg_sys::list_nth((*stmt).rtable, rti - 1) as *mut pg_sys::RangeTblEntry;
            if (*rte).rtekind != pg_sys::RTEKind::RTE_RELATION {
                continue;
            }
            let rel = pg_sys::RelationIdGetRelation((*rte).relid);
            if rel.is_null() {
                continue;
            }
            let replicated = replicated_table(rel);
            let keyless = replicated && !has_replica_identity(rel);
            let name = CStr::from_ptr((*(*rel).rd_rel).relname.data.as_ptr()).to_string_lossy().into_owned();
            pg_sys::RelationClose(rel);
            if keyless && !gucs::IGNORE_TABLES_WITHOUT_PK.get() {
                ErrorReport::new(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!("table \"{name}\" has no primary key or replica identity, so mmts cannot replicate writes to it"),
                    "mmts",
                )
                .set_hint(
                    "Add a primary key, or ALTER TABLE ... REPLICA IDENTITY FULL, or set multimaster.ignore_tables_without_pk = on to keep such tables local to each node.",
                )
                .report(PgLogLevel::ERROR);
            }
            if replicated && !keyless {
                crate::commit::note_write();
            }
        }
    }
}
