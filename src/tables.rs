//! Which tables mmts replicates, and whether their rows can be found on the peers.

use std::ffi::CStr;

use pgrx::pg_sys;

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
