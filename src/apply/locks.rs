//! What a waiting apply waits for: a lock wait cut short by a timer (so that the receiver
//! goes on with its stream), and who holds the lock it waited for.

use super::*;

/// While a synchronous transaction is applied, every this often the timer looks whether it
/// waits for a lock; if so, the apply stops waiting and looks at the holder.
pub(super) const LOCK_WAIT_MS: i32 = 1;

/// The lock (and mode) the apply was waiting for when the timer stopped it.
pub(super) static AWAITED: Awaited = Awaited::new();

/// The id PostgreSQL gave the lock-wait timeout (-1: not registered yet in this process).
/// Only the main thread uses it; an atomic is simply the safe way to keep a global.
pub(super) static LOCK_WAIT_TIMEOUT: AtomicI32 = AtomicI32::new(-1);

/// A cell for [`AWAITED`]. The SIGALRM handler writes it ([`on_lock_wait_timer`]), so it is
/// made of std's atomics, which are lock-free and therefore async-signal-safe (a `Mutex` or a
/// lazily initialised `thread_local!` is not). The main thread reads and clears it only while
/// the timer is disarmed, so it never sees the handler's writes half done.
pub(super) struct Awaited {
    /// Set (Release) once the fields below are written; taken (Acquire) before they are read.
    set: AtomicBool,
    /// `locktag_field1` to `locktag_field3`.
    fields: [AtomicU32; 3],
    /// `locktag_field4`, `locktag_type` and `locktag_lockmethodid`, packed.
    rest: AtomicU32,
    mode: AtomicI32,
}

impl Awaited {
    const fn new() -> Awaited {
        Awaited {
            set: AtomicBool::new(false),
            fields: [AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0)],
            rest: AtomicU32::new(0),
            mode: AtomicI32::new(0),
        }
    }

    /// Records `tag` and `mode` (in the signal handler: atomics only).
    fn put(&self, tag: &pg_sys::LOCKTAG, mode: pg_sys::LOCKMODE) {
        self.set.store(false, Ordering::Relaxed);
        self.fields[0].store(tag.locktag_field1, Ordering::Relaxed);
        self.fields[1].store(tag.locktag_field2, Ordering::Relaxed);
        self.fields[2].store(tag.locktag_field3, Ordering::Relaxed);
        let rest = u32::from(tag.locktag_field4)
            | u32::from(tag.locktag_type) << 16
            | u32::from(tag.locktag_lockmethodid) << 24;
        self.rest.store(rest, Ordering::Relaxed);
        self.mode.store(mode, Ordering::Relaxed);
        self.set.store(true, Ordering::Release);
    }

    /// What was recorded since the last `take` or `clear`, if anything (timer disarmed).
    pub(super) fn take(&self) -> Option<(pg_sys::LOCKTAG, pg_sys::LOCKMODE)> {
        if !self.set.swap(false, Ordering::Acquire) {
            return None;
        }
        let rest = self.rest.load(Ordering::Relaxed);
        let tag = pg_sys::LOCKTAG {
            locktag_field1: self.fields[0].load(Ordering::Relaxed),
            locktag_field2: self.fields[1].load(Ordering::Relaxed),
            locktag_field3: self.fields[2].load(Ordering::Relaxed),
            locktag_field4: rest as u16,
            locktag_type: (rest >> 16) as u8,
            locktag_lockmethodid: (rest >> 24) as u8,
        };
        Some((tag, self.mode.load(Ordering::Relaxed)))
    }

    pub(super) fn clear(&self) {
        self.set.store(false, Ordering::Release);
    }
}

/// Arms (or disarms) the lock-wait timer, periodic while the changes are applied.
pub(super) fn lock_wait_timer(on: bool) {
    use crate::pg_internals::{disable_timeout, enable_timeout_every, register_timeout, USER_TIMEOUT};
    let mut id = LOCK_WAIT_TIMEOUT.load(Ordering::Relaxed);
    // SAFETY: PostgreSQL's timeout functions, through pgrx's guard, on the main thread (they
    // are not thread-safe); `id` is the one RegisterTimeout gave.
    unsafe {
        if id < 0 {
            id = pg_sys::ffi::pg_guard_ffi_boundary(|| register_timeout(USER_TIMEOUT, Some(on_lock_wait_timer)));
            LOCK_WAIT_TIMEOUT.store(id, Ordering::Relaxed);
        }
        if on {
            let first = crate::backend::now() + LOCK_WAIT_MS as i64 * 1000;
            pg_sys::ffi::pg_guard_ffi_boundary(|| enable_timeout_every(id, first, LOCK_WAIT_MS));
        } else {
            pg_sys::ffi::pg_guard_ffi_boundary(|| disable_timeout(id, false));
        }
    }
}

/// Runs in the SIGALRM handler: only reads this process's lock wait and raises a cancel,
/// which the lock manager's wait loop turns into an ERROR the applier catches.
pub(super) unsafe extern "C-unwind" fn on_lock_wait_timer() {
    // SAFETY: in a signal handler of this single-threaded process, which it interrupts.
    // `MyProc` is this backend's PGPROC for its whole life; the LOCK its `waitLock` points to
    // stays in shared memory while this process waits on it or holds it (a wait that ends
    // meanwhile is harmless: see `prepare`). Only async-signal-safe things are done: atomics,
    // stores to PostgreSQL's `sig_atomic_t` flags, and SetLatch (made for signal handlers; pgrx's
    // guard around it only checks the thread and sets the error jump target, then restores it).
    unsafe {
        let lock = (*pg_sys::MyProc).waitLock;
        if lock.is_null() {
            return; // not waiting: look again next time
        }
        // Locks held for an instant inside an operation (extending a table, a page) are no
        // conflict between transactions: wait them out.
        let kind = (*lock).tag.locktag_type as u32;
        if kind == pg_sys::LockTagType::LOCKTAG_RELATION_EXTEND as u32
            || kind == pg_sys::LockTagType::LOCKTAG_PAGE as u32
        {
            return;
        }
        AWAITED.put(&(*lock).tag, (*pg_sys::MyProc).waitLockMode);
        pg_sys::InterruptPending = 1;
        pg_sys::QueryCancelPending = 1;
        pg_sys::SetLatch(pg_sys::MyLatch);
    }
}

/// The transactions holding `tag` in a mode that conflicts with `mode`.
pub(super) unsafe fn lock_holders(tag: &pg_sys::LOCKTAG, mode: pg_sys::LOCKMODE) -> Vec<LockHolder> {
    // SAFETY: main thread. GetLockConflicts returns `count` entries, palloc'd outside hot
    // standby (an applier never runs in recovery), so pfree'd here. `vxid_proc` gives a
    // PGPROC in shared memory (or NULL); its fields are read without a lock, as PostgreSQL
    // does, and checked against the vxid.
    unsafe {
        let mut count = 0;
        let vxids = pg_sys::GetLockConflicts(tag, mode, &mut count);
        let holders = (0..count as usize)
            .filter_map(|i| {
                let vxid = *vxids.add(i);
                let Some(proc_) = crate::pg_internals::vxid_proc(&vxid) else {
                    // A prepared transaction recovered at start-up: its "local" id is its xid.
                    return Some(LockHolder { xid: vxid.localTransactionId, proc_: None });
                };
                // A prepared transaction keeps the virtual id of the backend that prepared it.
                let mut more = false;
                let prepared = crate::pg_internals::two_phase_get_xid_by_virtual_xid(vxid, &mut more).into_inner();
                if prepared != 0 {
                    return Some(LockHolder { xid: prepared, proc_: None });
                }
                // Only while that backend still runs the same transaction.
                (!proc_.is_null() && crate::pg_internals::proc_local_xid(proc_) == vxid.localTransactionId)
                    .then(|| LockHolder { xid: (*proc_).xid.into_inner(), proc_: Some(proc_) })
            })
            .collect();
        pg_sys::pfree(vxids.cast());
        holders
    }
}
