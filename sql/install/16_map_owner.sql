-- Which table a map syncs is its table owner's choice.  d365_map_table()
-- maps a table only for its owner; d365.table_map is also written directly
-- (an admin writes every table of d365: the switches and policies of a
-- map are set there), so the row's table and key column are held to the
-- same rule when a statement writes them.
-- ---------------------------------------------------------------------------

/*
 * BEFORE INSERT OR UPDATE OF local_table, key_column ON d365.table_map:
 * a new map, or a map moved to another table or key column, only for a
 * role that owns (or is a member of the role owning) its table -- both
 * tables when it moves.  Otherwise an admin could point its own map, with
 * the columns it chose, at a table it may not read or write: the jobs
 * (the worker's, the superuser's) would then send that table's columns
 * and write Dynamics values into it, and the sync state would show the
 * admin what they sent.  The map "contact" is d365._contact_map_guard's
 * (it follows the attachment).
 */
CREATE FUNCTION d365._table_map_owner_check()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tbl regclass;
BEGIN
    IF NEW.name = 'contact' OR (TG_OP = 'UPDATE' AND OLD.name = 'contact') THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.local_table = OLD.local_table AND NEW.key_column = OLD.key_column THEN
        RETURN NEW;
    END IF;
    FOREACH tbl IN ARRAY CASE WHEN TG_OP = 'UPDATE' THEN ARRAY[OLD.local_table, NEW.local_table]
                              ELSE ARRAY[NEW.local_table] END LOOP
        IF pg_has_role((SELECT c.relowner FROM pg_class c WHERE c.oid = tbl), 'USAGE') IS NOT TRUE THEN
            RAISE EXCEPTION 'must be the owner of % to map it', tbl
                USING ERRCODE = 'insufficient_privilege',
                      DETAIL = format('Map "%s" would sync %s (key column "%s"): the table and key column of a table map are chosen by the table''s owner.',
                                      NEW.name, NEW.local_table, NEW.key_column),
                      HINT = 'Map the table as its owner, or as a member of its owning role, with d365_map_table(); to move a map to another table, d365_unmap_table() it and map that table.';
        END IF;
    END LOOP;
    RETURN NEW;
END;
$$;
CREATE TRIGGER table_map_owner_check BEFORE INSERT OR UPDATE OF local_table, key_column ON d365.table_map
    FOR EACH ROW EXECUTE FUNCTION d365._table_map_owner_check();

REVOKE ALL ON FUNCTION d365._table_map_owner_check() FROM PUBLIC;
