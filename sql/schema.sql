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

-- Nodes added to the running cluster (see mtm.add_node), with the connection string the
-- other nodes reach each of them by. Replicated. Not readable by every user: a connection
-- string may hold a password.
CREATE TABLE mtm.added_nodes (
    node_id int PRIMARY KEY CHECK (node_id BETWEEN 1 AND 64),
    conn_string text NOT NULL,
    added_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE mtm.added_nodes IS 'mmts: nodes added to the running cluster';

-- Transactions of other nodes this node applied as a peer forwarded them while their origin
-- was out of reach (see README, "A node catching up while a peer is down"): their origin's
-- stream does not prepare them again. Per node: never replicated. Superusers only.
CREATE TABLE mtm.forwarded (
    origin int NOT NULL,
    xid bigint NOT NULL,
    prepared_at bigint NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (origin, xid)
);
COMMENT ON TABLE mtm.forwarded IS 'mmts: transactions of other nodes applied here as a peer forwarded them';

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

-- Gives every sequence of this database (mmts's own aside) step 64 and this node's values
-- (those equal to the node id modulo 64), continuing above its last value; returns each
-- sequence and the next value it hands out here. Runs on this node only: call it on every node
-- after loading data made without mmts (a pg_dump's sequences say INCREMENT BY 1). The step
-- is the highest node id mmts accepts (see ddl.rs).
CREATE FUNCTION mtm.alter_sequences() RETURNS TABLE (sequence regclass, next_value bigint)
LANGUAGE plpgsql AS $$
DECLARE
    node int := nullif(current_setting('multimaster.node_id', true), '')::int;
    s record;
    base bigint;
BEGIN
    PERFORM mtm.require_superuser('mtm.alter_sequences');
    IF coalesce(node, 0) < 1 THEN
        RAISE EXCEPTION 'mmts: this server is not a multimaster node'
            USING ERRCODE = '55000', HINT = 'Set multimaster.node_id and multimaster.conn_strings.';
    END IF;
    PERFORM pg_catalog.set_config('multimaster.replicate_ddl', 'off', true);
    FOR s IN
        SELECT format('%I.%I', p.schemaname, p.sequencename)::regclass AS seq, p.last_value, p.start_value
          FROM pg_catalog.pg_sequences p
         WHERE p.schemaname NOT IN ('mtm', 'pg_catalog', 'information_schema')
           AND p.schemaname NOT LIKE 'pg\_temp\_%' AND p.increment_by > 0
         ORDER BY 1
    LOOP
        base := coalesce(s.last_value, s.start_value - 1);
        sequence := s.seq;
        next_value := base + 1 + ((node - (base + 1)) % 64 + 64) % 64;
        EXECUTE format('ALTER SEQUENCE %s INCREMENT BY 64 RESTART WITH %s', s.seq, next_value);
        RETURN NEXT;
    END LOOP;
END $$;

-- The commit timestamp of a transaction, by its xid on this node (e.g. a row's xmin). A
-- transaction committed synchronously has the same commit timestamp on every node.
CREATE FUNCTION mtm.get_commit_timestamp(xid) RETURNS timestamptz
    LANGUAGE sql STABLE STRICT
    AS 'SELECT pg_catalog.pg_xact_commit_timestamp($1)';
