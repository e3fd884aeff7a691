//! A table's description and its rows in the mmts protocol: which tables are sent, their
//! columns, and each row's values as text (unchanged TOASTed values left out).

use super::*;

/// Describes `rel` to the client unless this session already did (and nothing changed since);
/// returns the output functions of its columns, or `None` if the table is not replicated.
pub(super) unsafe fn send_relation(ctx: *mut pg_sys::LogicalDecodingContext, rel: pg_sys::Relation) -> OutputFunctions {
    // SAFETY (the whole function): the caller passes the decoding context and a relation
    // PostgreSQL has open for the callback; decoding runs in a transaction, so the catalog
    // lookups work (get_namespace_name finds the open relation's schema, never NULL). The
    // FmgrInfos live in the decoding context's memory, as long as the session caching them (a
    // session an error left behind is replaced at the next startup, before any use).
    let relid = unsafe { (*rel).rd_id };
    let (known, memory) = SESSION.with(|s| {
        let s = s.borrow();
        let m = s.mmts.as_ref().expect("an mmts protocol session");
        let known = match &m.block {
            // In a streamed block, a table not replicated is known as such; the others are
            // described in each block (see `StreamBlock`).
            Some(block) => block
                .described
                .get(&relid)
                .cloned()
                .or_else(|| m.relations.get(&relid).filter(|o| o.is_none()).cloned()),
            None => m.relations.get(&relid).cloned(),
        };
        (known, m.memory)
    });
    if let Some(known) = known {
        return known;
    }
    // SAFETY: `rel` is the relation PostgreSQL has open for the callback, with its pg_class row.
    let r = unsafe { &*rel };
    let class = unsafe { &*r.rd_rel };
    // Only plain tables' rows travel. A partitioned table (listed in a TRUNCATE with its
    // partitions) holds none of its own; a materialized view is refreshed on every node by
    // the replicated REFRESH statement.
    if class.relkind as u8 != pg_sys::RELKIND_RELATION {
        SESSION.with(|s| {
            if let Some(m) = s.borrow_mut().mmts.as_mut() {
                m.relations.insert(relid, None);
            }
        });
        return None;
    }
    // SAFETY: inside the decoding transaction: the open relation's schema exists, so its name is
    // a palloc'd NUL-terminated string; `relname` is a NUL-terminated NameData; `rel` is open.
    let schema =
        unsafe { CStr::from_ptr(pg_sys::get_namespace_name(class.relnamespace)) }.to_string_lossy().into_owned();
    let name = unsafe { CStr::from_ptr(class.relname.data.as_ptr()) }.to_string_lossy().into_owned();
    let keyless = unsafe { !crate::tables::has_replica_identity(rel) };
    // Which tables are local and which nodes are dropped or added is the same on every node.
    let own = schema == "mtm" && ![LOCAL_TABLES, "dropped_nodes", "added_nodes"].contains(&name.as_str());
    // SAFETY: inside the decoding transaction, on the main thread (as `listed_local` needs).
    if own || (keyless && gucs::IGNORE_TABLES_WITHOUT_PK.get()) || unsafe { listed_local(&schema, &name) } {
        // mmts's own bookkeeping (e.g. mtm.conflicts) is per node, and so are tables without
        // a key when multimaster.ignore_tables_without_pk is on.
        if keyless && !own {
            crate::logging::log(format!(
                "mmts: table \"{schema}\".\"{name}\" has no primary key or replica identity and stays local"
            ));
        }
        SESSION.with(|s| {
            if let Some(m) = s.borrow_mut().mmts.as_mut() {
                m.relations.insert(relid, None);
            }
        });
        return None;
    }
    let identity = class.relreplident as u8;
    // SAFETY: `rel` is open for the callback, inside the decoding transaction; its descriptor
    // lives as long as the relation and is only borrowed (from_pg_unchecked does not free it).
    let key_attrs =
        if identity == b'f' { std::ptr::null_mut() } else { unsafe { pg_sys::RelationGetIdentityKeyBitmap(rel) } };
    let desc = unsafe { PgTupleDesc::from_pg_unchecked(r.rd_att) };
    let mut columns = Vec::new();
    let mut outputs = Vec::with_capacity(desc.len());
    for (i, att) in desc.iter().enumerate() {
        if att.is_dropped() || att.attgenerated != 0 {
            outputs.push(None);
            continue;
        }
        let mut output_fn = pg_sys::InvalidOid;
        let mut varlena = false;
        unsafe { pg_sys::getTypeOutputInfo(att.atttypid, &mut output_fn, &mut varlena) };
        let finfo = unsafe { pg_sys::MemoryContextAllocZero(memory, std::mem::size_of::<pg_sys::FmgrInfo>()) }.cast();
        unsafe { pg_sys::fmgr_info_cxt(output_fn, finfo, memory) };
        outputs.push(Some(finfo));
        let attnum = i as i32 + 1;
        let key = identity == b'f'
            || unsafe { pg_sys::bms_is_member(attnum - pg_sys::FirstLowInvalidHeapAttributeNumber, key_attrs) };
        // SAFETY: format_type_be_qualified returns a palloc'd NUL-terminated string, copied at once.
        let type_name =
            unsafe { CStr::from_ptr(pg_sys::format_type_be_qualified(att.atttypid)) }.to_string_lossy().into_owned();
        columns.push(Column { name: att.name().to_string(), type_name, type_modifier: att.atttypmod, key });
    }
    if schema == "mtm" {
        // A change to mtm.local_tables: once its transaction is decoded, every table must be
        // checked again.
        SESSION.with(|s| {
            if let Some(m) = s.borrow_mut().mmts.as_mut() {
                m.local_tables_seen = true;
            }
        });
    }
    let msg = Message::Relation(WireRelation { id: relid.to_u32(), schema, name, replica_identity: identity, columns });
    let outputs: OutputFunctions = Some(outputs.into());
    SESSION.with(|s| {
        if let Some(m) = s.borrow_mut().mmts.as_mut() {
            match m.block.as_mut() {
                Some(block) => block.described.insert(relid, outputs.clone()),
                None => m.relations.insert(relid, outputs.clone()),
            };
        }
    });
    // SAFETY: the caller passes the decoding context of its callback.
    unsafe { send(ctx, &msg) };
    outputs
}

/// The values of a row, in the order of the columns sent in the relation's description.
pub(super) unsafe fn row(
    rel: pg_sys::Relation,
    outputs: &[Option<*mut pg_sys::FmgrInfo>],
    tuple: crate::pg_internals::ChangeTuple,
) -> Vec<Value> {
    // SAFETY: the caller passes the relation open for the change and one of its tuples, and
    // `outputs` made for its descriptor; `values` and `nulls` have one entry per attribute.
    // Output functions return palloc'd NUL-terminated text, freed once copied.
    let desc_ptr = unsafe { (*rel).rd_att };
    let desc = unsafe { PgTupleDesc::from_pg_unchecked(desc_ptr) };
    let natts = desc.len();
    let mut values = vec![pg_sys::Datum::from(0); natts];
    let mut nulls = vec![false; natts];
    unsafe {
        pg_sys::heap_deform_tuple(
            crate::pg_internals::change_heap_tuple(tuple),
            desc_ptr,
            values.as_mut_ptr(),
            nulls.as_mut_ptr(),
        )
    };
    let mut out = Vec::with_capacity(natts);
    for (i, att) in desc.iter().enumerate() {
        let Some(output) = outputs.get(i).copied().flatten() else { continue };
        if nulls[i] {
            out.push(Value::Null);
            continue;
        }
        let datum = values[i];
        // SAFETY: an attribute of length -1, not null: a varlena datum of the deformed tuple.
        if att.attlen == -1 && unsafe { varatt_is_external_ondisk(datum) } {
            out.push(Value::Unchanged);
            continue;
        }
        let text = unsafe { pg_sys::OutputFunctionCall(output, datum) };
        // SAFETY: an output function returns a palloc'd NUL-terminated string, freed below.
        out.push(Value::Text(unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned()));
        unsafe { pg_sys::pfree(text.cast()) };
    }
    out
}

/// `VARATT_IS_EXTERNAL_ONDISK`: a TOAST pointer to a value stored out of line (an unchanged
/// TOASTed column of an UPDATE arrives like this).
pub(super) unsafe fn varatt_is_external_ondisk(datum: pg_sys::Datum) -> bool {
    let ptr = datum.cast_mut_ptr::<u8>();
    // SAFETY: the caller passes a varlena datum (attlen -1, not null), which has at least a
    // 1-byte header; an external one (first byte 0x01) has its tag byte next.
    // 1-byte header 0x01 marks an external datum; the next byte is its tag.
    unsafe { *ptr == 0x01 && *ptr.add(1) == pg_sys::vartag_external::VARTAG_ONDISK as u8 }
}
