-- The mtm schema holds mmts's SQL interface. Status functions are for every user; functions
-- that change the cluster check privileges themselves.
COMMENT ON SCHEMA mtm IS 'mmts: synchronous multi-master replication';
GRANT USAGE ON SCHEMA mtm TO PUBLIC;

-- Concurrent writes of the same row on different nodes, as this node resolved them (last
-- writer wins by commit time, then node id). Per node: never replicated. Superusers only.
CREATE TABLE mtm.conflicts (
    id bigserial PRIMARY KEY,
    logged_at timestamptz NOT NULL DEFAULT now(),
    relation text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('insert_exists', 'update_update', 'update_missing')),
    remote_node int NOT NULL,
    remote_commit_time timestamptz,
    local_node int,
    local_commit_time timestamptz,
    kept text NOT NULL CHECK (kept IN ('local', 'remote')),
    remote_row text
);
COMMENT ON TABLE mtm.conflicts IS 'mmts: write conflicts resolved on this node';

-- Tables mmts does not replicate (see mtm.make_table_local). This table is replicated itself,
-- so the choice reaches every node, and is a user catalog table so that the output plugin can
-- read it as of the change being decoded.
CREATE TABLE mtm.local_tables (
    schema_name text NOT NULL,
    table_name text NOT NULL,
    PRIMARY KEY (schema_name, table_name)
) WITH (user_catalog_table = true);
COMMENT ON TABLE mtm.local_tables IS 'mmts: tables kept local to each node';
GRANT SELECT ON mtm.local_tables TO PUBLIC;

-- Nodes removed from the cluster (see mtm.drop_node). Replicated, like mtm.local_tables.
CREATE TABLE mtm.dropped_nodes (
    node_id int PRIMARY KEY CHECK (node_id BETWEEN 1 AND 64),
    dropped_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE mtm.dropped_nodes IS 'mmts: nodes removed from the cluster';
GRANT SELECT ON mtm.dropped_nodes TO PUBLIC;

CREATE FUNCTION mtm.require_superuser(what text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        RAISE EXCEPTION 'permission denied for %', what
            USING ERRCODE = '42501', HINT = 'Only superusers may change what mmts replicates.';
    END IF;
END $$;

-- Stops replicating a table on every node: later writes to it stay on the node that makes them.
CREATE FUNCTION mtm.make_table_local(relation regclass) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM mtm.require_superuser('mtm.make_table_local');
    INSERT INTO mtm.local_tables
    SELECT n.nspname, c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = relation
       AND NOT EXISTS (SELECT FROM mtm.local_tables l WHERE l.schema_name = n.nspname AND l.table_name = c.relname);
END $$;

-- Replicates a table made local again (its contents may differ between nodes by then).
CREATE FUNCTION mtm.make_table_replicated(relation regclass) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM mtm.require_superuser('mtm.make_table_replicated');
    DELETE FROM mtm.local_tables l
     USING pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = relation AND l.schema_name = n.nspname AND l.table_name = c.relname;
END $$;

-- The commit timestamp of a transaction, by its xid on this node (e.g. a row's xmin). A
-- transaction committed synchronously has the same commit timestamp on every node.
CREATE FUNCTION mtm.get_commit_timestamp(xid) RETURNS timestamptz
    LANGUAGE sql STABLE STRICT
    AS 'SELECT pg_catalog.pg_xact_commit_timestamp($1)';
