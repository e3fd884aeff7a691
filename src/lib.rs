//! mmts: synchronous multi-master replication for PostgreSQL.
//!
//! This crate is the PostgreSQL-facing shell: GUCs, SQL functions and (as they arrive) the
//! output plugin, background workers and hooks. Protocol logic lives in `mmts-core`.

use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

mod apply;
mod backend;
mod commit;
mod commit_origin;
mod functions;
mod gucs;
mod heartbeat;
mod indoubt;
mod libpq;
mod logging;
mod nodes;
mod outbox;
mod output_plugin;
mod pg_internals;
mod provenance;
mod receiver;
mod status;
mod tables;
mod twophase;
mod workers;

::pgrx::pg_module_magic!(name, version);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // A PostgreSQL error crosses mmts's Rust frames as a panic, and pgrx then captures a Rust
    // backtrace if the environment asks for one (RUST_BACKTRACE, set on many machines): it
    // would land in every error's DETAIL, and a deep recursion through mmts's hooks would
    // capture one per level, for minutes, deaf to cancel. Errors reach clients as PostgreSQL
    // gives them. Set while the process is single-threaded (postmaster or a new backend),
    // before any capture.
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
    // SAFETY (both reads): plain globals of PostgreSQL, read on the process's main thread.
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    if !preloading && unsafe { pg_sys::creating_extension } {
        // Checked before anything is defined, so a later retry after fixing the
        // configuration starts from a clean slate.
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "mmts must be loaded at server start",
            "mmts",
        )
        .set_hint("Add 'mmts' to shared_preload_libraries in postgresql.conf and restart the server.")
        .report(PgLogLevel::ERROR);
    }
    // Loaded later (as an output plugin, or by LOAD), mmts is the output plugin only: its
    // settings, all read at server start, are left undefined (PostgreSQL refuses new
    // server-start settings after startup).
    if preloading {
        gucs::define();
        gucs::check_at_startup();
        status::init();
        twophase::init();
        commit_origin::init();
        if let mmts_core::config::Mode::Multimaster(config) = gucs::mode() {
            provenance::init();
            workers::register_receivers(config);
            heartbeat::register();
            commit::install();
        }
    }
}
