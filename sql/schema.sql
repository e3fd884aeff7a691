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
