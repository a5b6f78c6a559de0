-- Capture of INSERT and UPDATE on mapped tables: the contact table's
-- engine (src/capture/capture.c), fired by a map's triggers (src/capture/map_capture.c;
-- the statements are d365._map_capture_sql's, 11_table_maps.sql).
-- Neither function is executable by any role: only d365's owner names them
-- in CREATE TRIGGER (d365._map_capture_install), and each checks, when it
-- fires, that it is d365sync's own trigger.
-- ---------------------------------------------------------------------------

-- AFTER INSERT, and AFTER UPDATE behind the WHEN clause on the key and the
-- columns the map sends, per row: notes the key, as the writing user,
-- unless d365sync itself is writing the table.  Arguments: the key's
-- attribute number and name.
CREATE FUNCTION d365._map_capture_row()
RETURNS trigger
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_map_capture_row'
LANGUAGE C;

-- AFTER INSERT and AFTER UPDATE, per statement: writes the keys the
-- statement's rows noted to d365.map_change (as the extension's owner:
-- writers of the table need no rights in d365), once the table is found to
-- be a mapped one.
CREATE FUNCTION d365._map_capture_flush()
RETURNS trigger
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_map_capture_flush'
LANGUAGE C;

/*
 * The WHEN clause of a map's capture follows its column map: after a
 * change of d365.column_map, the capture triggers of each map concerned are
 * created again (d365._map_capture_install, which needs the caller to own
 * the table, as d365_map_column does).  Only where the map's table has its
 * capture triggers: in a restore they come after the data (the column map
 * is the one they were made for, not a change); an unmapped table has none.
 * The map "contact" is the contact table's (its field map's trigger,
 * d365._field_map_changed).
 */
CREATE FUNCTION d365._column_map_changed()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    maps text[];
    tbl regclass;
BEGIN
    IF TG_OP = 'INSERT' THEN
        maps := ARRAY(SELECT DISTINCT n.map FROM column_map_new n);
    ELSIF TG_OP = 'UPDATE' THEN
        maps := ARRAY(SELECT n.map FROM column_map_new n UNION SELECT o.map FROM column_map_old o);
    ELSE
        maps := ARRAY(SELECT DISTINCT o.map FROM column_map_old o);
    END IF;
    FOR tbl IN SELECT t.local_table FROM d365.table_map t
                WHERE t.name = ANY (maps) AND t.name <> 'contact'
                  AND EXISTS (SELECT FROM pg_trigger g
                               WHERE g.tgrelid = t.local_table AND g.tgname = 'd365_map_capture_update'
                                 AND g.tgfoid = 'd365._map_capture_row()'::regprocedure)
                ORDER BY t.name LOOP
        PERFORM d365._map_capture_install(tbl);
    END LOOP;
    RETURN NULL;
END;
$$;
CREATE TRIGGER column_map_inserted AFTER INSERT ON d365.column_map
    REFERENCING NEW TABLE AS column_map_new
    FOR EACH STATEMENT EXECUTE FUNCTION d365._column_map_changed();
CREATE TRIGGER column_map_updated AFTER UPDATE ON d365.column_map
    REFERENCING OLD TABLE AS column_map_old NEW TABLE AS column_map_new
    FOR EACH STATEMENT EXECUTE FUNCTION d365._column_map_changed();
CREATE TRIGGER column_map_deleted AFTER DELETE ON d365.column_map
    REFERENCING OLD TABLE AS column_map_old
    FOR EACH STATEMENT EXECUTE FUNCTION d365._column_map_changed();

REVOKE ALL ON FUNCTION d365._map_capture_row(), d365._map_capture_flush(),
       d365._column_map_changed() FROM PUBLIC;
