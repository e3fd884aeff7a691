//! mmts's background workers: registering them (one receiver per peer, see `receiver`; the
//! heartbeat worker, see `heartbeat`), and what each does as it starts and while it runs.

use std::time::Duration;

use mmts_core::config::{ClusterConfig, Mode};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::pg_sys;

use crate::gucs;

/// Registers one receiver per peer (in the postmaster, while preloading).
pub fn register_receivers(config: &ClusterConfig) {
    for peer in config.peers() {
        receiver(peer.id.0).load();
    }
}

/// Starts the receiver for a node added to the running cluster; false if no worker could be
/// started (see `max_worker_processes`).
pub fn start_receiver(peer_id: u32) -> bool {
    receiver(peer_id).load_dynamic().is_ok()
}

fn receiver(peer_id: u32) -> BackgroundWorkerBuilder {
    BackgroundWorkerBuilder::new(&format!("mmts receiver from node {peer_id}"))
        .set_type("mmts receiver")
        .set_library("mmts")
        .set_function("mmts_receiver_main")
        .set_argument(Some(pg_sys::Datum::from(peer_id as i64)))
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
}

/// The start of an mmts worker: signal handlers, and the cluster's configuration (`None`
/// when this server is not a multimaster node).
pub fn worker_start() -> Option<&'static ClusterConfig> {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    match gucs::mode() {
        Mode::Multimaster(config) => Some(config),
        Mode::Standalone => None,
    }
}

/// Connects a worker to the replicated database as the user of this node's connection string.
pub fn connect_to_database(config: &ClusterConfig) {
    let me = config.nodes.iter().find(|n| n.id == config.node_id).expect("own node configured");
    BackgroundWorker::connect_worker_to_spi(Some(gucs::replicated_database(config)), me.conninfo.get("user"));
}

/// Reads postgresql.conf again after a reload (`pg_reload_conf()`, SIGHUP): the heartbeat
/// and two-phase commit settings can change without a restart. Returns whether it did.
pub fn reload_if_asked() -> bool {
    let asked = BackgroundWorker::sighup_received();
    if asked {
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
    }
    asked
}
