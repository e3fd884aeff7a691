-- The mtm schema holds mmts's SQL interface. Status functions are for every user; functions
-- that change the cluster check privileges themselves.
COMMENT ON SCHEMA mtm IS 'mmts: synchronous multi-master replication';
GRANT USAGE ON SCHEMA mtm TO PUBLIC;
