//! A peer's row changes applied at the executor level (as PostgreSQL's apply worker does:
//! constraints, indexes, replica triggers), conflicts between versions resolved and recorded,
//! and truncations.

use super::*;

impl Applier {
    pub(super) fn apply_change(&mut self, message: &Message) {
        if let Some(Signal::Ddl { role, search_path, statement }) = ddl_signal(self.peer, message) {
            // SAFETY: the receiver's main thread, at the top level (no transaction yet, or the peer's).
            unsafe { start_transaction() };
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

    pub(super) fn change(&mut self, relation: u32, kind: Change, old: Option<&[Value]>, new: Option<&[Value]>) {
        // SAFETY: main thread, inside the applied transaction. `rel` stays open and locked until
        // table_close below, and `desc` is its descriptor (attrs indexed below `natts`). The
        // executor state, range table entry, result relation and slots are palloc'd in the
        // transaction and made as ExecInitRangeTable/InitResultRelInfo expect (zeroed, tagged);
        // `epq` is zeroed, then initialised by EvalPlanQualInit and ended before it goes.
        unsafe {
            start_transaction();
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
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
            (*estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
            pg_sys::AfterTriggerBeginQuery();
            let tuple_memory = (*pg_sys::MakePerTupleExprContext(estate)).ecxt_per_tuple_memory;
            let remoteslot = pg_sys::ExecInitExtraTupleSlot(estate, desc, &pg_sys::TTSOpsVirtual);
            pg_sys::ExecOpenIndices(rri, false);

            // The row this change is about: the new row for an insert (to detect that the key
            // exists already), else the old key if the peer sent one, else the new row's key.
            let search = if kind == Change::Insert { new } else { old.or(new) }.expect("a change has a row");
            let previous = pg_sys::MemoryContextSwitchTo(tuple_memory);
            store_values(remoteslot, desc, &map, search, None);
            pg_sys::MemoryContextSwitchTo(previous);
            let localslot = pg_sys::table_slot_create(rel, &mut (*estate).es_tupleTable);
            let mut index = pg_sys::RelationGetReplicaIndex(rel);
            if index == pg_sys::InvalidOid {
                index = crate::pg_internals::primary_key_index(rel);
            }
            let found = if index != pg_sys::InvalidOid {
                pg_sys::RelationFindReplTupleByIndex(
                    rel,
                    index,
                    pg_sys::LockTupleMode::LockTupleExclusive,
                    remoteslot,
                    localslot,
                )
            } else if kind == Change::Insert {
                false // without a key, an insert never collides
            } else {
                pg_sys::RelationFindReplTupleSeq(rel, pg_sys::LockTupleMode::LockTupleExclusive, remoteslot, localslot)
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
                    let previous = pg_sys::MemoryContextSwitchTo(tuple_memory);
                    store_values(remoteslot, desc, &map, new.expect("a new row"), Some(localslot));
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
                        self.record_conflict(rel, what, remote, Some(local), wins, new.expect("a new row"));
                    }
                    if wins {
                        let previous = pg_sys::MemoryContextSwitchTo(tuple_memory);
                        store_values(remoteslot, desc, &map, new.expect("a new row"), Some(localslot));
                        pg_sys::MemoryContextSwitchTo(previous);
                        epq.origslot = remoteslot;
                        pg_sys::ExecSimpleRelationUpdate(rri, estate, &mut epq, localslot, remoteslot);
                    }
                }
                (Change::Update, false) => {
                    // Deleted here concurrently: the delete wins (it wins on every node).
                    self.record_conflict(rel, "update_missing", remote, None, false, new.expect("a new row"));
                }
                (Change::Delete, true) => {
                    epq.origslot = localslot;
                    pg_sys::ExecSimpleRelationDelete(rri, estate, &mut epq, localslot);
                }
                (Change::Delete, false) => {} // already gone here
            }
            pg_sys::EvalPlanQualEnd(&mut epq);
            if lists_local_tables {
                // Which tables are local changed: this node's walsenders must look again.
                invalidate_named_table(old.or(new).expect("a change has a row"));
            }
            pg_sys::ExecCloseIndices(rri);
            pg_sys::AfterTriggerEndQuery(estate);
            pg_sys::ExecResetTupleTable((*estate).es_tupleTable, false);
            pg_sys::FreeExecutorState(estate);
            pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
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

/// Fills `slot` with `values` (the peer's columns, mapped to local ones by `map`). With
/// `base`, columns the peer did not send, or sent as unchanged, keep `base`'s values.
pub(super) unsafe fn store_values(
    slot: *mut pg_sys::TupleTableSlot,
    desc: pg_sys::TupleDesc,
    map: &[Option<usize>],
    values: &[Value],
    base: Option<*mut pg_sys::TupleTableSlot>,
) {
    // SAFETY: `slot` (and `base`) were made for `desc` (the caller's part), so their value and
    // null arrays have `map.len()` entries, and they are distinct slots; `base` is deformed by
    // slot_getallattrs before it is read. `text` outlives the input function, which copies it.
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
                    let att = &*crate::pg_internals::tuple_desc_attr(desc, i);
                    let mut input = pg_sys::InvalidOid;
                    let mut ioparam = pg_sys::InvalidOid;
                    pg_sys::getTypeInputInfo(att.atttypid, &mut input, &mut ioparam);
                    let text = cstring(text);
                    datums[i] = pg_sys::OidInputFunctionCall(input, text.as_ptr().cast_mut(), ioparam, att.atttypmod);
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
