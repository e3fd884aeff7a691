//! Histories of list-append transactions and a checker for them, after Elle (Kingsbury and
//! Alvaro, "Elle: Inferring Isolation Anomalies from Experimental Observations", VLDB 2020).
//!
//! Clients append unique values to a few keys and read whole lists, from every node, and
//! record each transaction's invocation, completion and outcome (ok, failed, or unknown when
//! the client could not tell). Because every value is appended once, a read of a key shows
//! exactly which transactions wrote it before and in what order, so the checker can infer:
//!
//! - the **version order** of each key: every read must be a prefix of the longest one
//!   (otherwise two nodes disagree on history: `incompatible order`);
//! - **dependencies** between committed transactions: write-write (`ww`: the next version of a
//!   key), write-read (`wr`: a read saw the value), read-write (`rw`: a read missed the next
//!   value), and real time (`rt`: one completed before the other began);
//! - **cycles** in that graph, found as strongly connected components (`petgraph`'s Kosaraju, which needs no deep recursion on a long history),
//!   named by the edges the shortest cycle needs: G0 (ww only), G1c (ww and wr), G-single
//!   (exactly one rw), G2-item (more), and their real-time variants;
//! - **stale reads**: a read in a transaction that began after an append to its key was
//!   acknowledged, which misses it (what a synchronous cluster promises not to do);
//! - anomalies of single operations: aborted reads (G1a: a value a failed transaction
//!   appended), intermediate reads (G1b), duplicates, values nobody appended, and lost
//!   appends (acknowledged, yet missing from the final reads).
//!
//! A finding names the operations with their node, client and times.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;

use petgraph::algo::kosaraju_scc;
use petgraph::graph::{DiGraph, NodeIndex};

/// What a client learned of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// It did not commit (an error the database reported before or at commit).
    Fail,
    /// The client cannot tell (the connection broke at commit, or 08007).
    Unknown,
}

/// One step of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mop {
    Append {
        key: u32,
        value: u64,
    },
    /// The list read (`None` until the read returned).
    Read {
        key: u32,
        list: Option<Vec<u64>>,
    },
}

/// One transaction of one client.
#[derive(Debug, Clone)]
pub struct Op {
    /// The client (a process, in Jepsen's terms).
    pub process: usize,
    /// The node it ran on.
    pub node: usize,
    /// Microseconds since the history began.
    pub invoke: u64,
    pub complete: u64,
    pub outcome: Outcome,
    pub mops: Vec<Mop>,
    /// What the client was told when it did not commit.
    pub error: Option<String>,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mops: Vec<String> = self
            .mops
            .iter()
            .map(|m| match m {
                Mop::Append { key, value } => format!("append({key}, {value})"),
                Mop::Read { key, list: Some(l) } if l.len() > 4 => {
                    format!("read({key}) = [… {} more, {:?}]", l.len() - 3, &l[l.len() - 3..])
                }
                Mop::Read { key, list: Some(l) } => format!("read({key}) = {l:?}"),
                Mop::Read { key, list: None } => format!("read({key}) = ?"),
            })
            .collect();
        write!(
            f,
            "client {} on node {}, {:.3}–{:.3} s, {:?}: {}",
            self.process,
            self.node,
            self.invoke as f64 / 1e6,
            self.complete as f64 / 1e6,
            self.outcome,
            mops.join(", ")
        )?;
        match &self.error {
            Some(e) => write!(f, " ({e})"),
            None => Ok(()),
        }
    }
}

/// Kinds of anomalies the checker reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    G0,
    G1a,
    G1b,
    G1c,
    GSingle,
    G2Item,
    /// A cycle that needs a real-time edge, with exactly one rw edge.
    GSingleRealtime,
    /// A cycle that needs a real-time edge otherwise.
    CycleRealtime,
    Duplicate,
    /// A value no transaction appended.
    Garbage,
    /// Two reads of a key that are not prefixes of one another.
    IncompatibleOrder,
    /// An acknowledged append missing from the final read of its key.
    LostAppend,
    /// A read in a transaction that began after an append to its key was acknowledged (on any
    /// node), which does not see it.
    StaleRead,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::G0 => "G0",
            Kind::G1a => "G1a (aborted read)",
            Kind::G1b => "G1b (intermediate read)",
            Kind::G1c => "G1c",
            Kind::GSingle => "G-single",
            Kind::G2Item => "G2-item",
            Kind::GSingleRealtime => "G-single-realtime",
            Kind::CycleRealtime => "cycle with real-time order",
            Kind::Duplicate => "duplicate element",
            Kind::Garbage => "element nobody appended",
            Kind::IncompatibleOrder => "incompatible order",
            Kind::LostAppend => "lost append",
            Kind::StaleRead => "stale read",
        }
    }
}

/// One finding: its kind, and what shows it.
#[derive(Debug, Clone)]
pub struct Anomaly {
    pub kind: Kind,
    pub explanation: String,
}

/// The checker's findings, and how many of each kind.
#[derive(Debug, Default)]
pub struct Report {
    pub anomalies: Vec<Anomaly>,
    pub ops: usize,
    pub ok: usize,
    pub failed: usize,
    pub unknown: usize,
}

impl Report {
    pub fn count(&self, kind: Kind) -> usize {
        self.anomalies.iter().filter(|a| a.kind == kind).count()
    }

    pub fn counts(&self) -> BTreeMap<Kind, usize> {
        let mut counts = BTreeMap::new();
        for a in &self.anomalies {
            *counts.entry(a.kind).or_insert(0) += 1;
        }
        counts
    }

    /// The findings of the given kinds, at most `limit` of each, for a failure message.
    pub fn describe(&self, kinds: &[Kind], limit: usize) -> String {
        let mut out = String::new();
        for &kind in kinds {
            for a in self.anomalies.iter().filter(|a| a.kind == kind).take(limit) {
                out.push_str(&format!("{}: {}\n", kind.name(), a.explanation));
            }
        }
        out
    }

    pub fn summary(&self) -> String {
        let counts: Vec<String> = self.counts().iter().map(|(k, n)| format!("{}: {n}", k.name())).collect();
        format!(
            "{} transactions ({} ok, {} failed, {} unknown); anomalies: {}",
            self.ops,
            self.ok,
            self.failed,
            self.unknown,
            if counts.is_empty() { "none".into() } else { counts.join(", ") }
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Edge {
    Ww,
    Wr,
    Rw,
    Rt,
}

/// Checks `ops`. `final_reads`: the lists read from every node once the workload stopped and
/// the nodes caught up (the version order's last word, and what lost appends are missing
/// from).
pub fn check(ops: &[Op], final_reads: &BTreeMap<u32, Vec<u64>>) -> Report {
    let mut report = Report {
        ops: ops.len(),
        ok: ops.iter().filter(|o| o.outcome == Outcome::Ok).count(),
        failed: ops.iter().filter(|o| o.outcome == Outcome::Fail).count(),
        unknown: ops.iter().filter(|o| o.outcome == Outcome::Unknown).count(),
        ..Report::default()
    };
    let mut found = |kind: Kind, explanation: String| report.anomalies.push(Anomaly { kind, explanation });

    // Who appended what (values are unique).
    let mut writer: HashMap<(u32, u64), usize> = HashMap::new();
    // A transaction's appends to a key, in order (the last is the one others should see).
    let mut appends: HashMap<(usize, u32), Vec<u64>> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        for m in &op.mops {
            if let Mop::Append { key, value } = *m {
                writer.insert((key, value), i);
                appends.entry((i, key)).or_default().push(value);
            }
        }
    }

    // Reads: single-operation anomalies, and the longest read of each key.
    let mut longest: BTreeMap<u32, Vec<u64>> = final_reads.clone();
    let reads = || {
        ops.iter().enumerate().filter(|(_, o)| o.outcome == Outcome::Ok).flat_map(|(i, o)| {
            o.mops.iter().filter_map(move |m| match m {
                Mop::Read { key, list: Some(l) } => Some((i, *key, l)),
                _ => None,
            })
        })
    };
    for (i, key, list) in reads() {
        let mut seen = HashSet::new();
        for &v in list {
            if !seen.insert(v) {
                found(Kind::Duplicate, format!("{v} twice in key {key}: {}", ops[i]));
            }
            match writer.get(&(key, v)) {
                None => found(Kind::Garbage, format!("{v} in key {key}: {}", ops[i])),
                Some(&w) if ops[w].outcome == Outcome::Fail => found(
                    Kind::G1a,
                    format!("read {v} of key {key}, appended by a failed transaction\n  {}\n  {}", ops[w], ops[i]),
                ),
                Some(&w) if w != i => {
                    let theirs = &appends[&(w, key)];
                    if list.last() == Some(&v) && theirs.last() != Some(&v) {
                        found(
                            Kind::G1b,
                            format!(
                                "read ends at {v} of key {key}, not its writer's last append\n  {}\n  {}",
                                ops[w], ops[i]
                            ),
                        );
                    }
                }
                Some(_) => {}
            }
        }
        let l = longest.entry(key).or_default();
        if list.len() > l.len() {
            *l = list.clone();
        }
    }
    // Every read is a prefix of the longest one of its key.
    for (i, key, list) in reads() {
        let l = &longest[&key];
        if list.len() > l.len() || l[..list.len()] != list[..] {
            let at = list.iter().zip(l.iter()).position(|(a, b)| a != b).unwrap_or(list.len().min(l.len()));
            found(
                Kind::IncompatibleOrder,
                format!("key {key}: a read differs from the longest one at element {at}\n  {}", ops[i]),
            );
        }
    }
    for (key, l) in final_reads {
        if longest[key].len() > l.len() {
            found(
                Kind::IncompatibleOrder,
                format!("key {key}: the final read has {} elements, a read saw {}", l.len(), longest[key].len()),
            );
        }
    }
    // Acknowledged appends missing from the final reads.
    for (i, op) in ops.iter().enumerate().filter(|(_, o)| o.outcome == Outcome::Ok) {
        for m in &op.mops {
            if let Mop::Append { key, value } = *m {
                if let Some(l) = final_reads.get(&key) {
                    if !l.contains(&value) {
                        found(
                            Kind::LostAppend,
                            format!("{value} of key {key} is missing from the final read\n  {}", ops[i]),
                        );
                    }
                }
            }
        }
    }

    // Stale reads: a read must see every append to its key acknowledged before its
    // transaction began. A read is a prefix of the version order, so it sees an append when
    // the append's position is within it.
    let position: HashMap<(u32, u64), usize> =
        longest.iter().flat_map(|(k, l)| l.iter().enumerate().map(move |(p, v)| ((*k, *v), p))).collect();
    // Per key: acknowledged appends by completion time, with the furthest position so far.
    let mut acked: HashMap<u32, Vec<(u64, usize, usize)>> = HashMap::new();
    for (i, op) in ops.iter().enumerate().filter(|(_, o)| o.outcome == Outcome::Ok) {
        for m in &op.mops {
            if let Mop::Append { key, value } = *m {
                if let Some(&p) = position.get(&(key, value)) {
                    acked.entry(key).or_default().push((op.complete, p, i));
                }
            }
        }
    }
    for list in acked.values_mut() {
        list.sort_unstable();
        let mut furthest: Option<(usize, usize)> = None;
        for e in list.iter_mut() {
            if furthest.is_none_or(|(p, _)| e.1 > p) {
                furthest = Some((e.1, e.2));
            }
            (e.1, e.2) = furthest.expect("set above");
        }
    }
    for (i, key, list) in reads() {
        let Some(appends) = acked.get(&key) else { continue };
        let before = appends.partition_point(|&(complete, _, _)| complete < ops[i].invoke);
        if before == 0 {
            continue;
        }
        let (_, furthest, w) = appends[before - 1];
        if furthest >= list.len() {
            found(
                Kind::StaleRead,
                format!(
                    "key {key}: a read misses an append acknowledged before its transaction began\n  {}\n  {}",
                    ops[w], ops[i]
                ),
            );
        }
    }

    // The dependency graph over committed transactions: acknowledged ones, and unknown ones
    // whose appends were seen.
    let observed: HashSet<usize> =
        longest.iter().flat_map(|(k, l)| l.iter().filter_map(|v| writer.get(&(*k, *v)).copied())).collect();
    let committed: Vec<usize> = (0..ops.len())
        .filter(|&i| ops[i].outcome == Outcome::Ok || (ops[i].outcome == Outcome::Unknown && observed.contains(&i)))
        .collect();
    let mut graph: DiGraph<usize, Edge> = DiGraph::new();
    let index: HashMap<usize, NodeIndex> = committed.iter().map(|&i| (i, graph.add_node(i))).collect();
    let mut edges: HashSet<(usize, usize, Edge)> = HashSet::new();
    let mut add = |from: usize, to: usize, kind: Edge| {
        if from != to && index.contains_key(&from) && index.contains_key(&to) {
            edges.insert((from, to, kind));
        }
    };
    for (key, l) in &longest {
        let writers: Vec<usize> = l.iter().filter_map(|v| writer.get(&(*key, *v)).copied()).collect();
        for pair in writers.windows(2) {
            add(pair[0], pair[1], Edge::Ww);
        }
    }
    for (i, key, list) in reads() {
        let l = &longest[&key];
        if let Some(&w) = list.last().and_then(|v| writer.get(&(key, *v))) {
            add(w, i, Edge::Wr);
        }
        if let Some(next) = l.get(list.len()).and_then(|v| writer.get(&(key, *v))) {
            add(i, *next, Edge::Rw);
        }
    }
    // Real time: A precedes B when A completed before B began. Only the edges of its
    // transitive reduction are added: B gets an edge from each transaction completed before
    // it began that no other such one follows (Elle's "frontier").
    let mut events: Vec<(u64, bool, usize)> = Vec::new();
    for &i in &committed {
        events.push((ops[i].invoke, false, i));
        events.push((ops[i].complete, true, i));
    }
    // At equal times, completions after invocations: both happened "at once", no order.
    events.sort_by_key(|&(t, completion, i)| (t, completion, i));
    let mut frontier: HashSet<usize> = HashSet::new();
    let mut preds: HashMap<usize, Vec<usize>> = HashMap::new();
    for (_, completion, i) in events {
        if completion {
            for p in preds.get(&i).into_iter().flatten() {
                frontier.remove(p);
            }
            frontier.insert(i);
        } else {
            let before: Vec<usize> = frontier.iter().copied().collect();
            for &a in &before {
                add(a, i, Edge::Rt);
            }
            preds.insert(i, before);
        }
    }
    let mut kinds_between: HashMap<(usize, usize), Vec<Edge>> = HashMap::new();
    for &(a, b, k) in &edges {
        kinds_between.entry((a, b)).or_default().push(k);
        graph.update_edge(index[&a], index[&b], k);
    }
    // Each transaction's successors, with the kinds of edge to each: built once, so that
    // looking for a cycle in a component costs only the component's own edges.
    let mut successors: HashMap<usize, Vec<(usize, Vec<Edge>)>> = HashMap::new();
    for (&(a, b), ks) in &kinds_between {
        successors.entry(a).or_default().push((b, ks.clone()));
    }

    for scc in kosaraju_scc(&graph) {
        if scc.len() < 2 {
            continue;
        }
        let members: HashSet<usize> = scc.iter().map(|n| graph[*n]).collect();
        // The shortest cycle through the component's first node, preferring cycles without
        // real-time edges, then with fewer rw edges.
        let cycle = [false, true]
            .iter()
            .find_map(|&realtime| shortest_cycle(&members, &successors, realtime))
            .expect("a strongly connected component has a cycle");
        let kinds: Vec<Edge> = cycle.iter().map(|&(_, _, k)| k).collect();
        let rw = kinds.iter().filter(|k| **k == Edge::Rw).count();
        let rt = kinds.contains(&Edge::Rt);
        let kind = match (rt, rw, kinds.contains(&Edge::Wr)) {
            (true, 1, _) => Kind::GSingleRealtime,
            (true, _, _) => Kind::CycleRealtime,
            (false, 0, false) => Kind::G0,
            (false, 0, true) => Kind::G1c,
            (false, 1, _) => Kind::GSingle,
            (false, _, _) => Kind::G2Item,
        };
        let steps: Vec<String> = cycle.iter().map(|&(a, _, k)| format!("  {}\n    --{:?}->", ops[a], k)).collect();
        found(kind, format!("a cycle of {} transactions:\n{}\n  (back to the first)", cycle.len(), steps.join("\n")));
    }
    report
}

/// The shortest cycle among `members`, by breadth-first search from each member, using
/// real-time edges only if `realtime`; among equally short ones, the first found. Each step:
/// (from, to, the edge kind used: the most telling one between them).
fn shortest_cycle(
    members: &HashSet<usize>,
    successors: &HashMap<usize, Vec<(usize, Vec<Edge>)>>,
    realtime: bool,
) -> Option<Vec<(usize, usize, Edge)>> {
    let mut out: HashMap<usize, Vec<(usize, Edge)>> = HashMap::new();
    for &a in members {
        for (b, ks) in successors.get(&a).into_iter().flatten() {
            if !members.contains(b) {
                continue;
            }
            // Prefer ww, then wr, then rw, then rt.
            let best = ks.iter().copied().filter(|k| realtime || *k != Edge::Rt).min();
            if let Some(k) = best {
                out.entry(a).or_default().push((*b, k));
            }
        }
    }
    let mut best: Option<Vec<(usize, usize, Edge)>> = None;
    let mut starts: Vec<usize> = members.iter().copied().collect();
    starts.sort_unstable();
    // From a few members: enough for a short cycle, and cheap on a large component.
    for &start in starts.iter().take(32) {
        let mut prev: HashMap<usize, (usize, Edge)> = HashMap::new();
        let mut queue = VecDeque::from([start]);
        let mut found = None;
        'search: while let Some(n) = queue.pop_front() {
            for &(m, k) in out.get(&n).map(|v| v.as_slice()).unwrap_or(&[]) {
                if m == start {
                    found = Some((n, k));
                    break 'search;
                }
                if let std::collections::hash_map::Entry::Vacant(e) = prev.entry(m) {
                    e.insert((n, k));
                    queue.push_back(m);
                }
            }
        }
        if let Some((last, k)) = found {
            let mut cycle = vec![(last, start, k)];
            let mut at = last;
            while at != start {
                let (p, pk) = prev[&at];
                cycle.push((p, at, pk));
                at = p;
            }
            cycle.reverse();
            if best.as_ref().is_none_or(|b| cycle.len() < b.len()) {
                best = Some(cycle);
            }
        }
    }
    best
}
