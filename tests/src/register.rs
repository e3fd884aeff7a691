//! Histories of single-register operations (read, write, compare-and-set) and their check for
//! linearizability, with the Wing–Gong–Lowe search of the `todc-utils` crate, one key at a time
//! (linearizability is compositional).
//!
//! Each write and successful compare-and-set stores a value never stored before, so a read
//! names the write it saw. An operation whose client cannot tell whether it took effect
//! (`complete: None`) may have happened at any time after it began: it stays open until the end
//! of the history (placed last, it changes nothing anyone saw, as if it had not happened), and
//! a compare-and-set of unknown outcome may have found the value or not. A failed operation did
//! not happen and is dropped; so is a read that failed.

use std::fmt;

use todc_utils::linearizability::history::Action;
use todc_utils::{History, Specification, WGLChecker};

/// What one operation did, as its client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegOp {
    /// Read this value.
    Read(i64),
    /// Stored this value.
    Write(i64),
    /// Stored `to` if the register held `from` (`ok`), or found it did not (`!ok`).
    Cas { from: i64, to: i64, ok: bool },
    /// A compare-and-set whose result nobody saw (the check makes it from one of unknown
    /// outcome).
    CasUnseen { from: i64, to: i64 },
}

/// One operation on one register, by one client on one node.
#[derive(Debug, Clone)]
pub struct RegEvent {
    pub process: usize,
    pub node: usize,
    pub key: u32,
    /// Microseconds since the history began.
    pub invoke: u64,
    /// `None`: the client could not tell whether it took effect.
    pub complete: Option<u64>,
    pub op: RegOp,
}

impl fmt::Display for RegEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let end = self.complete.map_or("?".to_string(), |c| format!("{:.3}", c as f64 / 1e6));
        write!(
            f,
            "{:?} of key {} by client {} on node {}, {:.3}–{end} s",
            self.op,
            self.key,
            self.process,
            self.node,
            self.invoke as f64 / 1e6
        )
    }
}

/// A register holding an integer, 0 at first.
struct Register;

impl Specification for Register {
    type State = i64;
    type Operation = RegOp;

    fn init() -> i64 {
        0
    }

    fn apply(op: &RegOp, state: &i64) -> (bool, i64) {
        match *op {
            RegOp::Read(v) => (v == *state, *state),
            RegOp::Write(v) => (true, v),
            RegOp::Cas { from, to, ok: true } => (from == *state, to),
            RegOp::Cas { from, ok: false, .. } => (from != *state, *state),
            RegOp::CasUnseen { from, to } => (true, if from == *state { to } else { *state }),
        }
    }
}

/// The operations of one key that the check keeps (see the module's comment), with `None`
/// completions made the end of the history.
fn kept(events: &[&RegEvent]) -> Vec<RegEvent> {
    let end = events.iter().filter_map(|e| e.complete).max().unwrap_or(0) + 1;
    events
        .iter()
        .filter_map(|e| {
            let op = match (e.op, e.complete) {
                (op, Some(_)) => op,
                (RegOp::Read(_), None) => return None,
                (RegOp::Cas { from, to, .. } | RegOp::CasUnseen { from, to }, None) => RegOp::CasUnseen { from, to },
                (op @ RegOp::Write(_), None) => op,
            };
            Some(RegEvent { complete: Some(e.complete.unwrap_or(end)), op, ..(*e).clone() })
        })
        .collect()
}

fn linearizable(events: &[RegEvent]) -> bool {
    if events.is_empty() {
        return true;
    }
    // Calls and responses in time order (a response before a call at the same instant: the
    // operations did not overlap). Each operation is a process of its own to the checker, so
    // that an operation left open does not pair with its client's next one.
    let mut actions: Vec<(u64, bool, usize, RegOp)> = Vec::with_capacity(events.len() * 2);
    for (i, e) in events.iter().enumerate() {
        actions.push((e.invoke, true, i, e.op));
        actions.push((e.complete.expect("kept operations complete"), false, i, e.op));
    }
    actions.sort_by_key(|&(t, call, i, _)| (t, call, i));
    let history = History::from_actions(
        actions
            .into_iter()
            .map(|(_, call, i, op)| (i, if call { Action::Call(op) } else { Action::Response(op) }))
            .collect(),
    );
    WGLChecker::<Register>::is_linearizable(history)
}

/// Checks every key's operations for linearizability. `Err`: for the first key that is not,
/// the operations around where its shortest non-linearizable prefix (by completion) ends.
pub fn check(events: &[RegEvent]) -> Result<(), String> {
    let mut keys: Vec<u32> = events.iter().map(|e| e.key).collect();
    keys.sort_unstable();
    keys.dedup();
    for key in keys {
        let of_key: Vec<&RegEvent> = events.iter().filter(|e| e.key == key).collect();
        let ops = kept(&of_key);
        if linearizable(&ops) {
            continue;
        }
        // Operations of known outcome by completion, and those of unknown outcome (open until
        // the end) by invocation: a prefix up to time t holds the known ones completed by t
        // and the unknown ones begun by then.
        let last_seen = of_key.iter().filter_map(|e| e.complete).max().unwrap_or(0);
        let (mut open, mut ops): (Vec<RegEvent>, Vec<RegEvent>) =
            ops.into_iter().partition(|e| e.complete.unwrap_or(0) > last_seen);
        ops.sort_by_key(|e| (e.complete, e.invoke));
        open.sort_by_key(|e| e.invoke);
        // An operation begun by then that completes later is still running at the end of the
        // prefix: it may have taken effect or not, as one of unknown outcome (a read, or a
        // compare-and-set that found another value, changed nothing and is left out). Without
        // it, a prefix could blame an operation that a concurrent one explains.
        let prefix = |n: usize| -> Vec<RegEvent> {
            let until = ops[n - 1].complete.unwrap_or(0);
            let running = ops[n..].iter().filter(|e| e.invoke <= until).filter_map(|e| {
                let op = match e.op {
                    RegOp::Write(v) => RegOp::Write(v),
                    RegOp::Cas { from, to, ok: true } | RegOp::CasUnseen { from, to } => RegOp::CasUnseen { from, to },
                    RegOp::Read(_) | RegOp::Cas { ok: false, .. } => return None,
                };
                Some(RegEvent { complete: Some(until + 1), op, ..e.clone() })
            });
            let open =
                open.iter().filter(|e| e.invoke <= until).map(|e| RegEvent { complete: Some(until + 1), ..e.clone() });
            ops[..n].iter().cloned().chain(running).chain(open).collect()
        };
        // The shortest prefix that is not linearizable: the operation that ends it is one
        // that no order explains.
        let (mut good, mut bad) = (0, ops.len());
        if linearizable(&prefix(bad)) {
            return Err(format!(
                "key {key}: not linearizable ({} operations), but every prefix is",
                ops.len() + open.len()
            ));
        }
        while bad - good > 1 {
            let mid = (good + bad) / 2;
            if linearizable(&prefix(mid)) {
                good = mid;
            } else {
                bad = mid;
            }
        }
        let last = &ops[bad - 1];
        // Everything on the key that overlaps the half second before it, including operations
        // of unknown outcome (shown ending at "?").
        let mut around: Vec<&RegEvent> = of_key
            .iter()
            .copied()
            .filter(|e| e.invoke <= last.complete.unwrap_or(0))
            .filter(|e| e.complete.is_none_or(|c| c + 500_000 >= last.invoke))
            .collect();
        around.sort_by_key(|e| std::cmp::Reverse(e.invoke));
        let around: Vec<String> = around.iter().take(24).map(|e| format!("  {e}")).collect();
        return Err(format!(
            "key {key}: not linearizable ({} operations); no order explains\n  {last}\nwith the operations on the key that overlap the 0.5 s before it (newest first):\n{}",
            ops.len() + open.len(),
            around.join("\n")
        ));
    }
    Ok(())
}
