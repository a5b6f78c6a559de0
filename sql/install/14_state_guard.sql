-- ---------------------------------------------------------------------------
-- The Dynamics ids of the sync state are d365sync's (src/state_guard.c,
-- docs/security.md "The link columns"): a row of d365.contact_state or
-- d365.map_row gets an id, or keeps its id under another key, only while
-- d365sync records what Dynamics answered, as a superuser, or as a role
-- holding the admin set (hand links).  The roles that run the jobs may
-- write the rest of the state, and clear an id.
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
