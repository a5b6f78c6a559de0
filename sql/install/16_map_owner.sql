-- Which table a map syncs, and how, is its table owner's choice.
-- d365_map_table() and d365_unmap_table() act only for the table's owner;
-- d365.table_map is also written directly (an admin writes every table of
-- d365; an operator may switch a map on and off), so a statement's write
-- of a map row is held to the same rule.
-- ---------------------------------------------------------------------------

/*
 * BEFORE INSERT OR UPDATE OR DELETE ON d365.table_map, each row: a new
 * map, a map removed, or any change but "enabled" (its table, key column,
 * entity set, direction, load, delete policies, conflict rule) only for a
 * role that owns, or is a member of the role owning, the table -- both
 * tables when a map moves.  Otherwise an admin could point a map of its
 * own at a table it may not read (the jobs would send that table's
 * columns, and the sync state show them), remove another owner's map (its
 * capture triggers, left on the table, would fail every write of it), or
 * widen what the jobs of other roles write into a table it may not write
 * (on_remote_delete = 'delete' and a record it deletes in Dynamics: the
 * pull deletes the row).  A map whose table was dropped is removed by
 * whoever may, as d365_unmap_table() does.  The map "contact": its row
 * follows the attachment (written from a trigger, d365._contact_map_refresh);
 * a statement may change only enabled and the delete policies of it
 * (d365._contact_map_guard), the policies only as the contact table's owner.
 */
CREATE FUNCTION d365._table_map_owner_check()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tbl regclass;
    tbls regclass[];
    what text;
BEGIN
    IF TG_OP = 'UPDATE' AND to_jsonb(NEW) - 'enabled' = to_jsonb(OLD) - 'enabled' THEN
        RETURN NEW;
    END IF;
    IF ((TG_OP <> 'INSERT' AND OLD.name = 'contact') OR (TG_OP <> 'DELETE' AND NEW.name = 'contact'))
       AND (TG_OP <> 'UPDATE' OR pg_trigger_depth() > 1) THEN
        RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    IF TG_OP = 'DELETE' THEN
        tbls := ARRAY(SELECT c.oid::regclass FROM pg_class c WHERE c.oid = OLD.local_table);
        what := 'unmap it';
    ELSIF TG_OP = 'INSERT' THEN
        tbls := ARRAY[NEW.local_table];
        what := 'map it';
    ELSE
        tbls := CASE WHEN NEW.local_table = OLD.local_table THEN ARRAY[NEW.local_table]
                     ELSE ARRAY[OLD.local_table, NEW.local_table] END;
        what := format('change map "%s"', OLD.name);
    END IF;
    FOREACH tbl IN ARRAY tbls LOOP
        IF pg_has_role((SELECT c.relowner FROM pg_class c WHERE c.oid = tbl), 'USAGE') IS NOT TRUE THEN
            RAISE EXCEPTION 'must be the owner of % to %', tbl, what
                USING ERRCODE = 'insufficient_privilege',
                      DETAIL = 'Which table a table map syncs, and how (its key column, entity set, direction, load, delete policies and conflict rule), is chosen by the table''s owner; anyone who may write d365.table_map may switch a map on and off (enabled).',
                      HINT = 'Do it as the table''s owner, or as a member of its owning role: d365_map_table() and d365_unmap_table() map and unmap a table, an UPDATE of d365.table_map changes a map''s settings.';
        END IF;
    END LOOP;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END;
$$;
CREATE TRIGGER table_map_owner_check BEFORE INSERT OR UPDATE OR DELETE ON d365.table_map
    FOR EACH ROW EXECUTE FUNCTION d365._table_map_owner_check();

REVOKE ALL ON FUNCTION d365._table_map_owner_check() FROM PUBLIC;
