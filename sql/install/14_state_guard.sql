-- ---------------------------------------------------------------------------
-- What Dynamics answered is d365sync's to write (src/capture/state_guard.c,
-- docs/security.md "The link columns"): a row of d365.contact_state or
-- d365.map_row gets a Dynamics id, or keeps its id under another key, a
-- pull's delta link (d365.pull_state) or a cached metadata body
-- (d365.metadata_cache) is written, only while d365sync records what
-- Dynamics answered, as a superuser, or as a role holding the admin set
-- (hand links).  The roles that run the jobs may write the rest of the
-- state, clear an id or a delta link, and delete.
-- ---------------------------------------------------------------------------

CREATE FUNCTION d365._state_guard()
RETURNS trigger
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_state_guard'
LANGUAGE C;
REVOKE ALL ON FUNCTION d365._state_guard() FROM PUBLIC;

CREATE TRIGGER state_guard BEFORE INSERT OR UPDATE ON d365.contact_state
    FOR EACH ROW WHEN (NEW.dynamics_id IS NOT NULL)
    EXECUTE FUNCTION d365._state_guard('dynamics_id', 'contact_key');
CREATE TRIGGER state_guard BEFORE INSERT OR UPDATE ON d365.map_row
    FOR EACH ROW WHEN (NEW.dynamics_id IS NOT NULL)
    EXECUTE FUNCTION d365._state_guard('dynamics_id', 'map', 'row_key');
CREATE TRIGGER state_guard BEFORE INSERT OR UPDATE ON d365.pull_state
    FOR EACH ROW WHEN (NEW.delta_link IS NOT NULL)
    EXECUTE FUNCTION d365._state_guard('delta_link', 'entity');
CREATE TRIGGER state_guard BEFORE INSERT OR UPDATE ON d365.metadata_cache
    FOR EACH ROW EXECUTE FUNCTION d365._state_guard('body', 'path');

-- A GET of metadata (d365._get_all), kept in d365.metadata_cache by
-- d365sync's own write; d365._get_cached() reads the cache first.
CREATE FUNCTION d365._metadata_store(path text)
RETURNS jsonb
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_metadata_store'
LANGUAGE C VOLATILE STRICT;
REVOKE ALL ON FUNCTION d365._metadata_store(text) FROM PUBLIC;

-- A waiting lookup (d365.map_lookup_pending) names the record a loaded
-- row's lookup pointed to: the next pull, whoever runs it, writes the key
-- of the row linked to it into that row.  A load's delta and next links
-- (d365.load_state) say what the load and the pull after it read.  Both
-- are what Dynamics answered (16_map_guard.sql and docs/security.md).
CREATE TRIGGER state_guard BEFORE INSERT OR UPDATE ON d365.map_lookup_pending
    FOR EACH ROW EXECUTE FUNCTION d365._state_guard('dynamics_id', 'map', 'row_key', 'column');
CREATE TRIGGER state_guard BEFORE INSERT OR UPDATE ON d365.load_state
    FOR EACH ROW WHEN (NEW.delta_link IS NOT NULL)
    EXECUTE FUNCTION d365._state_guard('delta_link', 'entity');
CREATE TRIGGER state_guard_next BEFORE INSERT OR UPDATE ON d365.load_state
    FOR EACH ROW WHEN (NEW.next_link IS NOT NULL)
    EXECUTE FUNCTION d365._state_guard('next_link', 'entity');
