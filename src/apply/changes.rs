//! A peer's row changes applied at the executor level (as PostgreSQL's apply worker does:
//! constraints, indexes, replica triggers), conflicts between versions resolved and recorded,
//! and truncations.

use super::*;

impl Applier {
    pub(super) fn apply_change(&mut self, message: &Message) {
        if let Some(signal @ Signal::Ddl { .. }) = ddl_signal(self.peer, message) {
            // SAFETY: the receiver's main thread, at the top level (no transaction yet, or the peer's).
            unsafe { start_transaction() };
            if self.marking {
                // Forwarded with the transaction (see `forwarded`).
                twophase::emit(&signal, true);
            }
            let Signal::Ddl { role, search_path, statement } = signal else { unreachable!() };
            crate::commit::ddl::run(&role, &search_path, &statement);
            return;
        }
        match message {
            Message::Relation(r) => self.describe(r),
            Message::Insert { relation, new } => self.change(*relation, Change::Insert, None, Some(new)),
            Message::Update { relation, old, new } => self.change(*relation, Change::Update, old.as_deref(), Some(new)),
            Message::Delete { relation, old } => self.change(*relation, Change::Delete, Some(old), None),
            Message::Truncate { relations, cascade, restart_identity } => {
                self.truncate(relations, *cascade, *restart_identity)
            }
            _ => {}
        }
    }

    pub(super) fn describe(&mut self, r: &mmts_core::wire::Relation) {
        let columns = r.columns.iter().map(|c| c.name.clone()).collect();
        self.relations.insert(r.id, RemoteRelation { schema: r.schema.clone(), name: r.name.clone(), columns });
    }

    pub(super) fn remote(&self, relation: u32) -> &RemoteRelation {
        self.relations.get(&relation).unwrap_or_else(|| {
            ereport!(
                PgLogLevel::ERROR,
                PgSqlErrorCode::ERRCODE_PROTOCOL_VIOLATION,
                format!("mmts: node {} sent a change to relation {relation} before describing it", self.peer)
            );
            unreachable!()
        })
    }

    /// Opens the local table for the peer's relation (locked until the end of the transaction).
    pub(super) unsafe fn open(&self, relation: u32, lock: u32) -> pg_sys::Relation {
        let remote = self.remote(relation);
        let (schema, name) = (cstring(&remote.schema), cstring(&remote.name));
        // SAFETY: inside the applied transaction (the caller's). `rv` keeps pointers to
        // `schema` and `name`, which outlive it; table_open returns an open relation or raises.
        unsafe {
            let rv = pg_sys::makeRangeVar(schema.as_ptr().cast_mut(), name.as_ptr().cast_mut(), -1);
            let relid = pg_sys::RangeVarGetRelidExtended(
                rv,
                lock as pg_sys::LOCKMODE,
                pg_sys::RVROption::RVR_MISSING_OK,
                None,
                std::ptr::null_mut(),
            );
            if relid == pg_sys::InvalidOid {
                ErrorReport::new(
                    PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                    format!(
                        "mmts: table \"{}\".\"{}\" replicated from node {} does not exist here",
                        remote.schema, remote.name, self.peer
                    ),
                    "mmts",
                )
                .set_hint("Create the table on every node with the same definition.")
                .report(PgLogLevel::ERROR);
            }
            let rel = pg_sys::table_open(relid, pg_sys::NoLock as pg_sys::LOCKMODE);
            if (*(*rel).rd_rel).relkind != pg_sys::RELKIND_RELATION as c_char {
                ereport!(
                    PgLogLevel::ERROR,
                    PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
                    format!("mmts: \"{}\".\"{}\" is not a plain table here", remote.schema, remote.name)
                );
            }
            rel
        }
    }

    /// Applies one row change (a table opened for it alone).
    pub(super) fn change(&mut self, relation: u32, kind: Change, old: Option<&[Value]>, new: Option<&[Value]>) {
        let mut target = self.open_target(relation);
        self.apply_row(&mut target, kind, old, new);
        target.close();
    }

    /// Applies a prepared transaction's changes in order. Consecutive row changes to one table
    /// share the table opened for them, its indexes, slots and input functions (a bulk load
    /// is a long run of inserts into one table).
    pub(super) fn apply_changes(&mut self, changes: &[Message], keep_up: &mut dyn FnMut()) {
        let mut target: Option<Target> = None;
        let (mut i, mut since_keep_up) = (0, 0);
        while i < changes.len() {
            if since_keep_up >= KEEP_UP_EVERY {
                keep_up();
                since_keep_up = 0;
            }
            let change = &changes[i];
            i += 1;
            since_keep_up += 1;
            // A run of inserts into a table that takes them in bulk (see `Target::bulk`).
            if let (Message::Insert { relation, .. }, Some(t)) = (change, &mut target) {
                if t.relation == *relation && t.bulk {
                    let run = changes[i - 1..]
                        .iter()
                        .take(BULK_INSERT_ROWS)
                        .map_while(|c| match c {
                            Message::Insert { relation: r, new } if r == relation => Some(&new[..]),
                            _ => None,
                        })
                        .collect::<Vec<_>>();
                    if run.len() > 1 {
                        t.insert_many(&run);
                        i += run.len() - 1;
                        since_keep_up += run.len() - 1;
                        continue;
                    }
                }
            }
            let row = match change {
                Message::Insert { relation, new } => Some((*relation, Change::Insert, None, Some(&new[..]))),
                Message::Update { relation, old, new } => {
                    Some((*relation, Change::Update, old.as_deref(), Some(&new[..])))
                }
                Message::Delete { relation, old } => Some((*relation, Change::Delete, Some(&old[..]), None)),
                _ => None,
            };
            let Some((relation, kind, old, new)) = row else {
                if let Some(t) = target.take() {
                    t.close();
                }
                self.apply_change(change);
                continue;
            };
            if target.as_ref().is_some_and(|t| t.relation != relation) {
                target.take().expect("a target").close();
            }
            let t = match &mut target {
                Some(t) => t,
                None => target.insert(self.open_target(relation)),
            };
            self.apply_row(t, kind, old, new);
        }
        if let Some(t) = target.take() {
            t.close();
        }
    }

    /// Opens the local table for the peer's `relation` with what applying its rows needs.
    fn open_target(&mut self, relation: u32) -> Target {
        // SAFETY: main thread, inside the applied transaction. `rel` stays open and locked until
        // `Target::close` (or the transaction's end), and `desc` is its descriptor (attrs
        // indexed below `natts`). The executor state, range table entry and result relation are
        // palloc'd in the transaction and made as ExecInitRangeTable/InitResultRelInfo expect
        // (zeroed, tagged); the input functions' FmgrInfo live in the target, their memory in
        // the executor state's.
        unsafe {
            start_transaction();
            let rel = self.open(relation, pg_sys::RowExclusiveLock);
            let remote = self.remote(relation);
            let lists_local_tables = remote.schema == "mtm" && remote.name == "local_tables";
            let desc = (*rel).rd_att;
            let natts = (*desc).natts as usize;
            // For each local column, the position of the peer's column of the same name.
            let map: Vec<Option<usize>> = (0..natts)
                .map(|i| {
                    let att = &*crate::pg_internals::tuple_desc_attr(desc, i);
                    if att.attisdropped || att.attgenerated != 0 {
                        return None;
                    }
                    let name = std::ffi::CStr::from_ptr(att.attname.data.as_ptr()).to_string_lossy();
                    remote.columns.iter().position(|c| *c == name)
                })
                .collect();

            let estate = pg_sys::CreateExecutorState();
            let rte = pg_sys::palloc0(std::mem::size_of::<pg_sys::RangeTblEntry>()) as *mut pg_sys::RangeTblEntry;
            (*rte).type_ = pg_sys::NodeTag::T_RangeTblEntry;
            (*rte).rtekind = pg_sys::RTEKind::RTE_RELATION;
            (*rte).relid = (*rel).rd_id;
            (*rte).relkind = (*(*rel).rd_rel).relkind;
            (*rte).rellockmode = pg_sys::AccessShareLock as i32;
            crate::pg_internals::init_range_table(estate, rte);
            let rri = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>()) as *mut pg_sys::ResultRelInfo;
            (*rri).type_ = pg_sys::NodeTag::T_ResultRelInfo;
            pg_sys::InitResultRelInfo(rri, rel, 1, std::ptr::null_mut(), 0);
            (*estate).es_opened_result_relations = pg_sys::lappend((*estate).es_opened_result_relations, rri.cast());
            let tuple_memory = (*pg_sys::MakePerTupleExprContext(estate)).ecxt_per_tuple_memory;
            let remoteslot = pg_sys::ExecInitExtraTupleSlot(estate, desc, &pg_sys::TTSOpsVirtual);
            let localslot = pg_sys::table_slot_create(rel, &mut (*estate).es_tupleTable);
            pg_sys::ExecOpenIndices(rri, false);
            let mut index = pg_sys::RelationGetReplicaIndex(rel);
            if index == pg_sys::InvalidOid {
                index = crate::pg_internals::primary_key_index(rel);
            }
            let generated = (0..natts).any(|i| (*crate::pg_internals::tuple_desc_attr(desc, i)).attgenerated != 0);
            let bulk = (*rri).ri_TrigDesc.is_null()
                && (*rri).ri_NumIndices == 0
                && !(*(*rel).rd_rel).relispartition
                && !generated
                && !lists_local_tables;
            let inputs = (0..natts)
                .map(|i| {
                    let att = &*crate::pg_internals::tuple_desc_attr(desc, i);
                    let mut input =
                        Input { function: std::mem::zeroed(), ioparam: pg_sys::InvalidOid, typmod: att.atttypmod };
                    if map[i].is_some() {
                        let mut oid = pg_sys::InvalidOid;
                        pg_sys::getTypeInputInfo(att.atttypid, &mut oid, &mut input.ioparam);
                        pg_sys::fmgr_info_cxt(oid, &mut input.function, (*estate).es_query_cxt);
                    }
                    input
                })
                .collect::<Vec<_>>()
                .into_boxed_slice();
            Target {
                relation,
                rel,
                estate,
                rri,
                tuple_memory,
                remoteslot,
                localslot,
                map,
                inputs,
                index,
                lists_local_tables,
                bulk,
                bulk_slots: Vec::new(),
            }
        }
    }

    fn apply_row(&mut self, t: &mut Target, kind: Change, old: Option<&[Value]>, new: Option<&[Value]>) {
        // SAFETY: main thread, inside the applied transaction that opened `t` (see
        // `open_target`); its slots were made for the table's descriptor. `epq` is zeroed, then
        // initialised by EvalPlanQualInit and ended before it goes. What one row allocates in
        // the per-tuple memory is freed once the row is applied.
        unsafe {
            let (rri, estate, remoteslot, localslot) = (t.rri, t.estate, t.remoteslot, t.localslot);
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
            (*estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
            pg_sys::AfterTriggerBeginQuery();
            // The row this change is about: the new row for an insert (to detect that the key
            // exists already), else the old key if the peer sent one, else the new row's key.
            let search = if kind == Change::Insert { new } else { old.or(new) }.expect("a change has a row");
            let previous = pg_sys::MemoryContextSwitchTo(t.tuple_memory);
            t.store(remoteslot, search, None);
            pg_sys::MemoryContextSwitchTo(previous);
            pg_sys::ExecClearTuple(localslot);
            let found = if t.index != pg_sys::InvalidOid {
                pg_sys::RelationFindReplTupleByIndex(
                    t.rel,
                    t.index,
                    pg_sys::LockTupleMode::LockTupleExclusive,
                    remoteslot,
                    localslot,
                )
            } else if kind == Change::Insert {
                false // without a key, an insert never collides
            } else {
                pg_sys::RelationFindReplTupleSeq(
                    t.rel,
                    pg_sys::LockTupleMode::LockTupleExclusive,
                    remoteslot,
                    localslot,
                )
            };
            let remote = Version { commit_time: self.remote_time, node: NodeId(self.peer) };
            let mut epq: pg_sys::EPQState = std::mem::zeroed();
            crate::pg_internals::eval_plan_qual_init(&mut epq, estate);
            // A synchronously committed change was made over exactly the version this node has
            // (the two-phase commit holds the rows everywhere): apply it as it is; a row that
            // exists or is missing here is a real disagreement, and this node votes no.
            let synchronous = self.synchronous;
            match (kind, found) {
                (Change::Insert, false) => pg_sys::ExecSimpleRelationInsert(rri, estate, remoteslot),
                (Change::Insert, true) if synchronous => {
                    ereport!(
                        PgLogLevel::ERROR,
                        PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION,
                        format!("duplicate key: the row inserted on node {} already exists here", self.peer)
                    );
                }
                (Change::Update, true) if synchronous => {
                    let previous = pg_sys::MemoryContextSwitchTo(t.tuple_memory);
                    t.store(remoteslot, new.expect("a new row"), Some(localslot));
                    pg_sys::MemoryContextSwitchTo(previous);
                    epq.origslot = remoteslot;
                    pg_sys::ExecSimpleRelationUpdate(rri, estate, &mut epq, localslot, remoteslot);
                }
                (Change::Update, false) if synchronous => {
                    ereport!(
                        PgLogLevel::ERROR,
                        PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                        format!("the row updated on node {} does not exist here", self.peer)
                    );
                }
                (Change::Insert | Change::Update, true) => {
                    let local = self.version(localslot);
                    // Over a version written by the same peer this is the normal course of
                    // events; over another node's version, last writer wins.
                    let wins = local.node.0 == self.peer || remote_wins(remote, local);
                    // A version the writer had seen is simply overwritten; one it had not is
                    // a conflict, and so is every write that loses.
                    if !wins || !writer_had_seen(local, NodeId(self.peer), &self.seen) {
                        let what = if kind == Change::Insert { "insert_exists" } else { "update_update" };
                        self.record_conflict(t.rel, what, remote, Some(local), wins, new.expect("a new row"));
                    }
                    if wins {
                        let previous = pg_sys::MemoryContextSwitchTo(t.tuple_memory);
                        t.store(remoteslot, new.expect("a new row"), Some(localslot));
                        pg_sys::MemoryContextSwitchTo(previous);
                        epq.origslot = remoteslot;
                        pg_sys::ExecSimpleRelationUpdate(rri, estate, &mut epq, localslot, remoteslot);
                    }
                }
                (Change::Update, false) => {
                    // Deleted here concurrently: the delete wins (it wins on every node).
                    self.record_conflict(t.rel, "update_missing", remote, None, false, new.expect("a new row"));
                }
                (Change::Delete, true) => {
                    epq.origslot = localslot;
                    pg_sys::ExecSimpleRelationDelete(rri, estate, &mut epq, localslot);
                }
                (Change::Delete, false) => {} // already gone here
            }
            pg_sys::EvalPlanQualEnd(&mut epq);
            if t.lists_local_tables {
                // Which tables are local changed: this node's walsenders must look again.
                invalidate_named_table(old.or(new).expect("a change has a row"));
            }
            pg_sys::AfterTriggerEndQuery(estate);
            pg_sys::ExecClearTuple(remoteslot);
            pg_sys::ExecClearTuple(localslot);
            pg_sys::MemoryContextReset(t.tuple_memory);
            pg_sys::PopActiveSnapshot();
            pg_sys::CommandCounterIncrement();
        }
    }

    /// When and where the local version in `slot` was committed.
    pub(super) unsafe fn version(&mut self, slot: *mut pg_sys::TupleTableSlot) -> Version {
        // SAFETY: `slot` holds the local row just found (the caller's part); the heap tuple
        // fetched from it has a valid header.
        unsafe {
            let mut should_free = false;
            let tuple = pg_sys::ExecFetchSlotHeapTuple(slot, false, &mut should_free);
            let xmin = (*(*tuple).t_data).t_choice.t_heap.t_xmin;
            let mut time: pg_sys::TimestampTz = 0;
            let mut origin: pg_sys::RepOriginId = 0;
            let known = xmin.into_inner() >= pg_sys::FirstNormalTransactionId.into_inner()
                && pg_sys::TransactionIdGetCommitTsData(xmin, &mut time, &mut origin);
            if !known {
                return Version { commit_time: 0, node: NodeId(self.me) };
            }
            Version { commit_time: time, node: NodeId(self.node_of_origin(origin)) }
        }
    }

    /// The node whose changes carry replication origin `origin` here (0 for unknown origins).
    pub(super) fn node_of_origin(&mut self, origin: pg_sys::RepOriginId) -> u32 {
        if origin == pg_sys::InvalidRepOriginId as pg_sys::RepOriginId || crate::commit_origin::is_commit_origin(origin)
        {
            return self.me;
        }
        if let Some(node) = self.origins.get(&origin) {
            return *node;
        }
        let Mode::Multimaster(config) = gucs::mode() else { return 0 };
        let node = crate::status::known(config)
            .into_iter()
            .find(|n| {
                let name = cstring(&mmts_core::replication::origin_name(n.id.0));
                unsafe { pg_sys::replorigin_by_name(name.as_ptr(), true) == origin }
            })
            .map(|n| n.id.0);
        if let Some(node) = node {
            self.origins.insert(origin, node); // origins are never renumbered
        }
        node.unwrap_or(0)
    }

    /// Writes a conflict to `mtm.conflicts`, or to the log when the extension is not created here.
    pub(super) fn record_conflict(
        &mut self,
        rel: pg_sys::Relation,
        kind: &str,
        remote: Version,
        local: Option<Version>,
        remote_won: bool,
        row: &[Value],
    ) {
        // SAFETY: `rel` is open (see `change`); its schema exists while it is, so
        // get_namespace_name does not return NULL; relname is a NUL-terminated NameData.
        let table = unsafe {
            let r = &*(*rel).rd_rel;
            let schema = std::ffi::CStr::from_ptr(pg_sys::get_namespace_name(r.relnamespace)).to_string_lossy();
            let name = std::ffi::CStr::from_ptr(r.relname.data.as_ptr()).to_string_lossy();
            format!("{schema}.{name}")
        };
        let row_text = row
            .iter()
            .map(|v| match v {
                Value::Null => "NULL".to_string(),
                Value::Unchanged => "(unchanged)".to_string(),
                Value::Text(t) => t.clone(),
                Value::Binary(b) => format!("({} bytes)", b.len()),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let kept = if remote_won { "remote" } else { "local" };
        // SAFETY: catalog lookups with static C strings, inside the applied transaction.
        let exists = unsafe {
            let ns = pg_sys::get_namespace_oid(c"mtm".as_ptr(), true);
            ns != pg_sys::InvalidOid && pg_sys::get_relname_relid(c"conflicts".as_ptr(), ns) != pg_sys::InvalidOid
        };
        if !exists {
            // Without the extension here, the server log is the record.
            ereport!(
                PgLogLevel::LOG,
                PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                format!(
                    "mmts: {kind} conflict on {table}: kept the {kept} version (remote from node {}, row ({row_text}))",
                    remote.node
                )
            );
        } else {
            let to_ts = |t: i64| {
                // SAFETY: a timestamptz is passed by value: the datum is the i64, no pointer.
                (t != 0)
                    .then(|| unsafe { pgrx::datum::TimestampWithTimeZone::from_datum(pg_sys::Datum::from(t), false) })
                    .flatten()
            };
            let local_node = local.map(|l| l.node.0 as i32);
            let local_time = local.and_then(|l| to_ts(l.commit_time));
            let args = [
                table.as_str().into(),
                kind.into(),
                (remote.node.0 as i32).into(),
                to_ts(remote.commit_time).into(),
                local_node.into(),
                local_time.into(),
                kept.into(),
                row_text.as_str().into(),
            ];
            // Planned once per receiver: conflicts can come with every applied transaction.
            let plan = self.conflict_insert.get_or_insert_with(|| {
                use pgrx::pg_sys::BuiltinOid::{INT4OID, TEXTOID, TIMESTAMPTZOID};
                let types = [TEXTOID, TEXTOID, INT4OID, TIMESTAMPTZOID, INT4OID, TIMESTAMPTZOID, TEXTOID, TEXTOID]
                    .map(pgrx::PgOid::BuiltIn);
                Spi::connect(|client| {
                    client
                        .prepare_mut(
                            "INSERT INTO mtm.conflicts(relation, kind, remote_node, remote_commit_time, local_node, local_commit_time, kept, remote_row)
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                            &types,
                        )
                        .map(|p| p.keep())
                })
                .expect("plan the conflict record")
            });
            Spi::connect_mut(|client| client.update(&*plan, None, &args).map(|_| ())).expect("record the conflict");
        }
    }

    pub(super) fn truncate(&mut self, relations: &[u32], cascade: bool, restart_identity: bool) {
        // SAFETY: main thread, inside the applied transaction; each relation opened is in `rels`
        // (one per entry of `relations`, so list_nth stays in bounds) and is closed below.
        unsafe {
            start_transaction();
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
            let mut rels: *mut pg_sys::List = std::ptr::null_mut();
            let mut relids: *mut pg_sys::List = std::ptr::null_mut();
            for r in relations {
                let rel = self.open(*r, pg_sys::AccessExclusiveLock);
                rels = pg_sys::lappend(rels, rel.cast());
                relids = pg_sys::lappend_oid(relids, (*rel).rd_id);
            }
            let behavior =
                if cascade { pg_sys::DropBehavior::DROP_CASCADE } else { pg_sys::DropBehavior::DROP_RESTRICT };
            crate::pg_internals::execute_truncate_guts(rels, relids, behavior, restart_identity);
            for i in 0..relations.len() {
                let rel = pg_sys::list_nth(rels, i as i32) as pg_sys::Relation;
                pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
            }
            pg_sys::PopActiveSnapshot();
            pg_sys::CommandCounterIncrement();
        }
    }
}

/// Invalidates the relcache entry of the table a row of mtm.local_tables names, if it exists.
pub(super) unsafe fn invalidate_named_table(row: &[Value]) {
    let (Some(Value::Text(schema)), Some(Value::Text(name))) = (row.first(), row.get(1)) else { return };
    let (schema, name) = (cstring(schema), cstring(name));
    // SAFETY: inside the applied transaction; `rv` points into `schema` and `name`, which
    // outlive it.
    unsafe {
        let rv = pg_sys::makeRangeVar(schema.as_ptr().cast_mut(), name.as_ptr().cast_mut(), -1);
        let relid = crate::tables::relation_id(rv);
        if relid != pg_sys::InvalidOid {
            pg_sys::CacheInvalidateRelcacheByRelid(relid);
        }
    }
}

/// Fills `slot` with `values` (the peer's columns, mapped to local ones by `map`, read by the
/// columns' `inputs`). With `base`, columns the peer did not send, or sent as unchanged, keep
/// `base`'s values.
pub(super) unsafe fn store_values(
    slot: *mut pg_sys::TupleTableSlot,
    map: &[Option<usize>],
    inputs: &mut [Input],
    values: &[Value],
    base: Option<*mut pg_sys::TupleTableSlot>,
) {
    // SAFETY: `slot` (and `base`) were made for the descriptor `map` and `inputs` describe (the
    // caller's part), so their value and null arrays have `map.len()` entries, and they are
    // distinct slots; `base` is deformed by slot_getallattrs before it is read. `text`
    // outlives the input function, which copies it.
    unsafe {
        pg_sys::ExecClearTuple(slot);
        let natts = map.len();
        let datums = std::slice::from_raw_parts_mut((*slot).tts_values, natts);
        let nulls = std::slice::from_raw_parts_mut((*slot).tts_isnull, natts);
        if let Some(base) = base {
            pg_sys::slot_getallattrs(base);
            datums.copy_from_slice(std::slice::from_raw_parts((*base).tts_values, natts));
            nulls.copy_from_slice(std::slice::from_raw_parts((*base).tts_isnull, natts));
        } else {
            nulls.fill(true);
        }
        for (i, remote) in map.iter().enumerate() {
            let Some(value) = remote.and_then(|r| values.get(r)) else { continue };
            match value {
                Value::Null => {
                    datums[i] = pg_sys::Datum::from(0);
                    nulls[i] = true;
                }
                Value::Text(text) => {
                    let input = &mut inputs[i];
                    let text = cstring(text);
                    datums[i] = pg_sys::InputFunctionCall(
                        &mut input.function,
                        text.as_ptr().cast_mut(),
                        input.ioparam,
                        input.typmod,
                    );
                    nulls[i] = false;
                }
                Value::Binary(_) => {
                    ereport!(
                        PgLogLevel::ERROR,
                        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                        "mmts: binary column values are not supported by this node"
                    );
                }
                Value::Unchanged => {} // keeps the base value (or NULL without one)
            }
        }
        pg_sys::ExecStoreVirtualTuple(slot);
    }
}

/// A local table opened for the peer's row changes, with what applying a row needs: kept while
/// consecutive changes go to the same table.
pub(super) struct Target {
    /// The peer's relation id.
    relation: u32,
    rel: pg_sys::Relation,
    estate: *mut pg_sys::EState,
    rri: *mut pg_sys::ResultRelInfo,
    tuple_memory: pg_sys::MemoryContext,
    /// The row as the peer sent it (virtual), and the local row found for it.
    remoteslot: *mut pg_sys::TupleTableSlot,
    localslot: *mut pg_sys::TupleTableSlot,
    /// For each local column, the position of the peer's column of the same name.
    map: Vec<Option<usize>>,
    /// For each local column the peer sends, its type's input function.
    inputs: Box<[Input]>,
    /// The index rows are found by (replica identity, else primary key), or InvalidOid.
    index: pg_sys::Oid,
    lists_local_tables: bool,
    /// Inserts may go in bulk (`table_multi_insert`, as COPY does): nothing but the row itself
    /// is written or checked for an insert into this table (no index, hence no key to find,
    /// no trigger, no generated column, not a partition), save its constraints.
    bulk: bool,
    /// Slots for inserts in bulk, made on first use.
    bulk_slots: Vec<*mut pg_sys::TupleTableSlot>,
}

/// Rows inserted in one `table_multi_insert` at most (COPY's `MAX_BUFFERED_TUPLES`).
const BULK_INSERT_ROWS: usize = 1000;

pub(super) struct Input {
    function: pg_sys::FmgrInfo,
    ioparam: pg_sys::Oid,
    typmod: i32,
}

impl Target {
    /// Fills `slot` with `values`; see [`store_values`].
    unsafe fn store(
        &mut self,
        slot: *mut pg_sys::TupleTableSlot,
        values: &[Value],
        base: Option<*mut pg_sys::TupleTableSlot>,
    ) {
        // SAFETY: as the caller promises (`slot` and `base` are this target's slots).
        unsafe { store_values(slot, &self.map, &mut self.inputs, values, base) }
    }

    /// Inserts `rows` (a run of the peer's inserts into this table) in one go; see `bulk`.
    fn insert_many(&mut self, rows: &[&[Value]]) {
        // SAFETY: main thread, inside the applied transaction that opened the target; the
        // slots are made for the table (table_slot_create) and live in the executor state's
        // tuple table until `close`. Each row is materialized in its slot before the
        // per-tuple memory that held its values is reset; table_multi_insert gets `rows.len()`
        // filled slots of the open table.
        unsafe {
            while self.bulk_slots.len() < rows.len() {
                self.bulk_slots.push(pg_sys::table_slot_create(self.rel, &mut (*self.estate).es_tupleTable));
            }
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
            (*self.estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
            let checked = !(*(*self.rel).rd_att).constr.is_null();
            for (row, slot) in rows.iter().zip(self.bulk_slots.clone()) {
                let previous = pg_sys::MemoryContextSwitchTo(self.tuple_memory);
                self.store(slot, row, None);
                pg_sys::ExecMaterializeSlot(slot);
                if checked {
                    pg_sys::ExecConstraints(self.rri, slot, self.estate);
                }
                pg_sys::MemoryContextSwitchTo(previous);
                pg_sys::MemoryContextReset(self.tuple_memory);
            }
            let bulk = pg_sys::GetBulkInsertState();
            pg_sys::table_multi_insert(
                self.rel,
                self.bulk_slots.as_mut_ptr(),
                rows.len() as i32,
                (*self.estate).es_output_cid,
                0,
                bulk,
            );
            pg_sys::FreeBulkInsertState(bulk);
            for slot in &self.bulk_slots[..rows.len()] {
                pg_sys::ExecClearTuple(*slot);
            }
            pg_sys::PopActiveSnapshot();
            pg_sys::CommandCounterIncrement();
        }
    }

    fn close(self) {
        // SAFETY: main thread, in the transaction that opened the target (see `open_target`):
        // everything released here was made there and is released once.
        unsafe {
            pg_sys::ExecCloseIndices(self.rri);
            pg_sys::ExecResetTupleTable((*self.estate).es_tupleTable, false);
            pg_sys::FreeExecutorState(self.estate);
            pg_sys::table_close(self.rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        }
    }
}
