//! The replication origins a coordinating backend commits under (`mtm_commit_<k>`), so that
//! its COMMIT PREPARED records the cluster's commit timestamp rather than its own clock.
//!
//! PostgreSQL 15 records a commit's timestamp from the clock, unless the committing session
//! has a replication origin set up: then it records `replorigin_session_origin_timestamp`,
//! in the commit record too (so crash recovery, copies made from this node and logical
//! decoding all see the same value). Only one process may use an origin at a time, so a
//! coordinator takes one of [`POOL`] origins for the moment of its COMMIT PREPARED. With that,
//! a peer may commit a transaction at the agreed timestamp before the coordinator does (see
//! `Applier::commit_early`) and still record the same timestamp as the coordinator.
//!
//! The output plugin sends what is committed under these origins (this node's own
//! transactions), unlike what carries any other origin.

use std::cell::RefCell;
use std::ffi::{CStr, CString};

use mmts_core::config::Mode;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};

/// Origins in the pool: coordinators committing at the same moment (each holds one for the
/// length of one COMMIT PREPARED, a WAL flush). Each takes one of `max_replication_slots`'
/// replication origin states for good.
pub const POOL: usize = mmts_core::config::COMMIT_ORIGINS as usize;

fn name(k: usize) -> CString {
    crate::backend::cstring(&format!("mtm_commit_{}", k + 1))
}

/// Which backend (pid, 0: none) holds each origin of the pool.
#[derive(Clone, Copy, Default)]
pub struct Holders([i32; POOL]);

// SAFETY: plain old data, no pointers.
unsafe impl PGRXSharedMemory for Holders {}

// SAFETY: no other shared memory of this server is named so (the name is the lock's only
// condition); it is attached by `pg_shmem_init!` in `init`, while preloading.
static HOLDERS: PgLwLock<Holders> = unsafe { PgLwLock::new(c"mmts commit origins") };

pub fn init() {
    pg_shmem_init!(HOLDERS);
}

thread_local! {
    /// The pool's origin ids, as far as they are known to exist.
    static IDS: RefCell<Vec<pg_sys::RepOriginId>> = const { RefCell::new(Vec::new()) };
}

/// Makes the pool's origins that do not exist yet (inside a transaction).
pub fn create() {
    // SAFETY: inside a transaction (the caller's), main thread; each `name` outlives its calls.
    unsafe {
        // Held until the end of the transaction: two processes making them at once would both
        // find a name free.
        pg_sys::LockRelationOid(pg_sys::ReplicationOriginRelationId, pg_sys::ExclusiveLock as pg_sys::LOCKMODE);
        for k in 0..POOL {
            let name = name(k);
            if pg_sys::replorigin_by_name(name.as_ptr(), true) == pg_sys::InvalidRepOriginId as pg_sys::RepOriginId {
                pg_sys::replorigin_create(name.as_ptr());
            }
        }
    }
}

/// Runs `f` inside a transaction: the current one, or one of its own (leaving the memory
/// context and resource owner as they were: a walsender decoding WAL has no transaction).
fn in_transaction<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: main thread. The memory context and resource owner saved are the caller's, which
    // outlive the transaction; committing leaves them pointing into it, so they are put back.
    unsafe {
        if pg_sys::IsTransactionState() {
            return f();
        }
        let (context, owner) = (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner);
        pg_sys::StartTransactionCommand();
        let result = f();
        pg_sys::CommitTransactionCommand();
        pg_sys::CurrentMemoryContext = context;
        pg_sys::CurrentResourceOwner = owner;
        result
    }
}

/// The pool's ids found in the catalog.
fn look_up() -> Vec<pg_sys::RepOriginId> {
    in_transaction(|| {
        (0..POOL)
            // SAFETY: inside a transaction; the temporary CString lives until the call returns.
            .map(|k| unsafe { pg_sys::replorigin_by_name(name(k).as_ptr(), true) })
            .filter(|&id| id != pg_sys::InvalidRepOriginId as pg_sys::RepOriginId)
            .collect()
    })
}

/// Whether `id` is one of the pool's origins. Looks in the catalog only until the whole pool
/// is known (the receivers make it when they start).
pub fn is_commit_origin(id: pg_sys::RepOriginId) -> bool {
    if id == pg_sys::InvalidRepOriginId as pg_sys::RepOriginId || !matches!(crate::gucs::mode(), Mode::Multimaster(_)) {
        return false;
    }
    IDS.with(|ids| {
        if ids.borrow().contains(&id) {
            return true;
        }
        if ids.borrow().len() == POOL {
            return false;
        }
        let found = look_up();
        let yes = found.contains(&id);
        *ids.borrow_mut() = found;
        yes
    })
}

/// The id of the pool's origin `k`, the pool made first if need be.
fn id(k: usize) -> Option<pg_sys::RepOriginId> {
    IDS.with(|ids| {
        if ids.borrow().len() < POOL {
            let mut found = look_up();
            if found.len() < POOL {
                in_transaction(create);
                found = look_up();
            }
            *ids.borrow_mut() = found;
        }
        ids.borrow().get(k).copied()
    })
}

// <signal.h>
unsafe extern "C" {
    fn kill(pid: std::ffi::c_int, sig: std::ffi::c_int) -> std::ffi::c_int;
}

/// An origin of the pool held by this backend, given back when dropped (on an ERROR too).
struct Held {
    k: usize,
    set_up: bool,
}

impl Held {
    /// Takes a free origin of the pool, waiting for one if all are in use.
    fn take() -> Held {
        // SAFETY: a plain global, set at process start; main thread.
        let me = unsafe { pg_sys::MyProcPid };
        loop {
            {
                let mut h = HOLDERS.exclusive();
                // A holder that exited without giving its origin back (FATAL) holds nothing;
                // PostgreSQL released the origin itself when the process exited.
                // SAFETY: signal 0 only checks whether the process exists; nothing is sent.
                let free = (0..POOL).find(|&k| h.0[k] == 0 || unsafe { kill(h.0[k], 0) } != 0);
                if let Some(k) = free {
                    h.0[k] = me;
                    return Held { k, set_up: false };
                }
            }
            unsafe { pg_sys::pg_usleep(20) };
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: main thread; plain globals of this session, and the origin `set_up` says this
        // session set up.
        unsafe {
            pg_sys::replorigin_session_origin = pg_sys::InvalidRepOriginId as pg_sys::RepOriginId;
            pg_sys::replorigin_session_origin_lsn = pg_sys::InvalidXLogRecPtr as u64;
            pg_sys::replorigin_session_origin_timestamp = 0;
            if self.set_up {
                pg_sys::replorigin_session_reset();
            }
        }
        HOLDERS.exclusive().0[self.k] = 0;
    }
}

/// COMMIT PREPARED `gid` recording commit timestamp `ts` (outside a transaction).
pub fn commit_prepared_at(gid: &CStr, ts: pg_sys::TimestampTz) {
    let mut held = Held::take();
    // SAFETY: main thread, outside a transaction; origin `id` is this backend's to use (`held`)
    // until `held` is dropped, which resets it; `gid` is borrowed for the call.
    unsafe {
        if let Some(id) = id(held.k) {
            crate::pg_internals::replorigin_session_setup(id);
            held.set_up = true;
            pg_sys::replorigin_session_origin = id;
            // No progress of a peer's stream to record.
            pg_sys::replorigin_session_origin_lsn = pg_sys::InvalidXLogRecPtr as u64;
            pg_sys::replorigin_session_origin_timestamp = ts;
        }
        pg_sys::StartTransactionCommand();
        crate::twophase::finish_prepared(gid, true);
        pg_sys::CommitTransactionCommand();
    }
    drop(held);
}
