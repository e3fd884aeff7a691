//! Proof that a signal comes from the cluster's own nodes (see `mmts_core::provenance`).
//!
//! This node's signal key lives in `mmts_signal.key` in the data directory: 32 random bytes,
//! made at the first start with mmts preloaded, readable by the server's OS user only (and by
//! superusers through `pg_read_binary_file`; superusers are trusted). The postmaster reads it
//! before it forks, so every process of the server has it. A copy made by `pg_basebackup`
//! takes the file along; that is harmless, as a key only ever checks its own node's WAL.
//!
//! [`seal`] tags what `twophase::emit` writes; the output plugin passes on a message with
//! mmts's prefix only if [`open`] finds its tag right. [`admit`] is the one place a signal
//! received from a peer is decoded: it takes the signal only if the peer may say it.

use std::ffi::CStr;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use mmts_core::config::Mode;
use mmts_core::provenance::{SignalKey, KEY_LEN};
use mmts_core::twopc::Signal;
use mmts_core::NodeId;
use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use crate::gucs;
use crate::logging::log_limited;

const KEY_FILE: &str = "mmts_signal.key";

static KEY: OnceLock<SignalKey> = OnceLock::new();

/// Reads this node's signal key, making it first if there is none (postmaster, at start). A
/// key that cannot be read or made stops the server with the reason.
pub fn init() {
    // SAFETY: DataDir is set (an absolute path) before shared_preload_libraries are loaded.
    let dir = unsafe { CStr::from_ptr(pg_sys::DataDir) }.to_string_lossy().into_owned();
    let path = PathBuf::from(dir).join(KEY_FILE);
    match read_or_make(&path) {
        Ok(key) => {
            let _ = KEY.set(SignalKey::new(key));
        }
        Err(e) => ErrorReport::new(
            PgSqlErrorCode::ERRCODE_IO_ERROR,
            format!("mmts: cannot read or make the signal key {}: {e}", path.display()),
            "mmts",
        )
        .set_hint("The file must be a regular file of 32 bytes readable by the server's OS user; remove it to make a new one (the node's undecoded signals are then dropped).")
        .report(PgLogLevel::FATAL),
    }
}

fn read_or_make(path: &std::path::Path) -> std::io::Result<[u8; KEY_LEN]> {
    let mut key = [0u8; KEY_LEN];
    match std::fs::File::open(path) {
        Ok(mut f) => {
            let mut all = Vec::new();
            f.read_to_end(&mut all)?;
            if all.len() != KEY_LEN {
                return Err(std::io::Error::other(format!("{} bytes, not {KEY_LEN}", all.len())));
            }
            key.copy_from_slice(&all);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
            f.write_all(&key)?;
            f.sync_all()?;
        }
        Err(e) => return Err(e),
    }
    Ok(key)
}

/// `body` with this node's tag. Only a server that preloaded mmts writes signals.
pub fn seal(transactional: bool, body: &[u8]) -> Vec<u8> {
    match KEY.get() {
        Some(key) => key.seal(transactional, body),
        None => error!("mmts: signals are written only by a server that preloads mmts"),
    }
}

/// The body of a message with mmts's prefix from this node's WAL, if mmts wrote it; logs
/// (rate-limited) a message it did not write. A server without mmts preloaded has no key and
/// passes on no such message.
pub fn open(transactional: bool, sealed: &[u8], lsn: u64) -> Option<&[u8]> {
    let body = KEY.get().and_then(|key| key.open(transactional, sealed));
    if body.is_none() {
        log_limited(format!(
            "mmts: dropped a logical message with prefix \"mmts\" at {} that mmts did not write (written with pg_logical_emit_message?)",
            mmts_core::replication::format_lsn(lsn)
        ));
    }
    body
}

/// The signal in `content`, received from node `sender` (its stream, or its direct
/// connection), if that node may say it; `None` (logged, rate-limited) otherwise.
pub fn admit(sender: u32, content: &[u8]) -> Option<Signal> {
    match Signal::decode(content) {
        Ok(signal) => admit_signal(sender, signal),
        Err(e) => {
            log_limited(format!("mmts: ignored a malformed signal from node {sender}: {e}"));
            None
        }
    }
}

/// [`admit`] for a signal decoded already.
pub fn admit_signal(sender: u32, signal: Signal) -> Option<Signal> {
    let Mode::Multimaster(config) = gucs::mode() else { return None };
    match mmts_core::provenance::admit(&signal, NodeId(sender), crate::status::known_mask(config)) {
        Ok(()) => Some(signal),
        Err(why) => {
            log_limited(format!("mmts: ignored a signal from node {sender}: {why}"));
            None
        }
    }
}
