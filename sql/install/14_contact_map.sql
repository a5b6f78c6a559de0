-- The contact table as the table map "contact" (entity set contacts).
--
-- The contact engine keeps its own stores: d365.contact_source (the
-- attachment), d365.field_map (the columns) and d365.contact_state (the
-- sync state).  The map's row of d365.table_map and its rows of
-- d365.column_map show them, kept by triggers: attaching writes the row,
-- detaching deletes it (with its column maps), every change of the field
-- map is copied to the column maps.  Neither is written any other way (the
-- guard below), and neither is dumped: a restore makes them again from the
-- attachment and the field map.  d365_map_column('contact', ...) writes the
-- field map.  See docs/table-maps.md, "The contact table", and
-- docs/architecture.md.
-- ---------------------------------------------------------------------------

-- The contact map is not dumped: it is made from the attachment and the
-- field map when they are restored.
SELECT pg_catalog.pg_extension_config_dump('d365.table_map', 'WHERE name <> ''contact''');
SELECT pg_catalog.pg_extension_config_dump('d365.column_map', 'WHERE map <> ''contact''');

-- The column map of the contact table holds the field map's Dynamics fields
-- as they are written there: a lookup may be its bind property
-- (parentcustomerid_account@odata.bind).
ALTER TABLE d365.column_map DROP CONSTRAINT column_map_field_check;
ALTER TABLE d365.column_map ADD CONSTRAINT column_map_field_check
    CHECK (field ~ '^[a-z][a-z0-9_]*$'
           OR (map = 'contact' AND field ~ '^[a-z_][a-z0-9_]*(@odata\.bind)?$'));

/*
 * The map "contact" made again from the attachment and the field map: its
 * row of d365.table_map (the attached table, its key, entity set contacts;
 * "enabled" is kept), its rows of d365.column_map (one per field map
 * entry), or nothing when no table is attached.  A trigger function, on
 * d365.contact_source and d365.field_map.  SECURITY DEFINER: whoever may
 * attach the table or write the field map keeps the map in step, without
 * rights on the map tables; it reads d365's own tables only.
 */
CREATE FUNCTION d365._contact_map_refresh()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source;
    other text;
BEGIN
    SELECT * INTO src FROM d365.contact_source;
    IF NOT FOUND THEN
        DELETE FROM d365.table_map t WHERE t.name = 'contact';
        RETURN NULL;
    END IF;
    SELECT t.name INTO other FROM d365.table_map t
     WHERE t.local_table = src.contact_table AND t.name <> 'contact';
    IF other IS NOT NULL THEN
        RAISE EXCEPTION '% is the table of map "%"', src.contact_table, other
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'The attached contact table is the map "contact"; a table belongs to one map.',
                  HINT = format('SELECT d365_unmap_table(%L); first, then attach the table.', other);
    END IF;
    INSERT INTO d365.table_map AS t (name, local_table, entity_set, key_column)
    VALUES ('contact', src.contact_table, 'contacts', src.key_column)
    ON CONFLICT ON CONSTRAINT table_map_pkey DO UPDATE
       SET local_table = EXCLUDED.local_table, entity_set = EXCLUDED.entity_set,
           key_column = EXCLUDED.key_column
     WHERE (t.local_table, t.entity_set, t.key_column)
           IS DISTINCT FROM (EXCLUDED.local_table, EXCLUDED.entity_set, EXCLUDED.key_column);
    DELETE FROM d365.column_map c
     WHERE c.map = 'contact'
       AND NOT EXISTS (SELECT FROM d365.field_map f WHERE f.column_name = c."column");
    INSERT INTO d365.column_map AS c (map, "column", field, direction, match)
    SELECT 'contact', f.column_name, f.dynamics_field, f.direction, f.match FROM d365.field_map f
    ON CONFLICT ON CONSTRAINT column_map_pkey DO UPDATE
       SET field = EXCLUDED.field, direction = EXCLUDED.direction, match = EXCLUDED.match
     WHERE (c.field, c.direction, c.match)
           IS DISTINCT FROM (EXCLUDED.field, EXCLUDED.direction, EXCLUDED.match);
    RETURN NULL;
END;
$$;

CREATE TRIGGER contact_map_refresh
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON d365.contact_source
    FOR EACH STATEMENT EXECUTE FUNCTION d365._contact_map_refresh();
CREATE TRIGGER contact_map_refresh
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON d365.field_map
    FOR EACH STATEMENT EXECUTE FUNCTION d365._contact_map_refresh();

/*
 * The map "contact" is written by d365._contact_map_refresh() alone (a
 * write made from a trigger: trigger depth 2 or more, which also covers
 * the cascade from d365.table_map to d365.column_map).  A statement on
 * d365.table_map or d365.column_map itself may only switch the map on and
 * off (enabled).
 */
CREATE FUNCTION d365._contact_map_guard()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pg_trigger_depth() > 1 THEN
        RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    IF TG_TABLE_NAME = 'table_map' THEN
        IF TG_OP = 'UPDATE' AND OLD.name = 'contact' AND NEW.name = 'contact'
           AND (NEW.local_table, NEW.entity_set, NEW.key_column, NEW.direction, NEW.load,
                NEW.on_local_delete, NEW.on_remote_delete, NEW.conflict)
               IS NOT DISTINCT FROM
               (OLD.local_table, OLD.entity_set, OLD.key_column, OLD.direction, OLD.load,
                OLD.on_local_delete, OLD.on_remote_delete, OLD.conflict) THEN
            RETURN NEW;     -- enabled
        END IF;
        IF (TG_OP <> 'INSERT' AND OLD.name = 'contact') OR (TG_OP <> 'DELETE' AND NEW.name = 'contact') THEN
            RAISE EXCEPTION 'the table map "contact" is the attached contact table'
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = 'It is made by d365_attach_contacts() and removed by d365_detach_contacts(); only its "enabled" can be changed here.',
                      HINT = 'Attach the contact table with d365_attach_contacts(); name other maps otherwise.';
        END IF;
    ELSIF (TG_OP <> 'INSERT' AND OLD.map = 'contact') OR (TG_OP <> 'DELETE' AND NEW.map = 'contact') THEN
        RAISE EXCEPTION 'the column map of map "contact" is the field map of the contact table'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Map a contact column with d365_map_column(''contact'', column, field), or write d365.field_map.';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END;
$$;

CREATE TRIGGER contact_map_guard
    BEFORE INSERT OR UPDATE OR DELETE ON d365.table_map
    FOR EACH ROW EXECUTE FUNCTION d365._contact_map_guard();
CREATE TRIGGER contact_map_guard
    BEFORE INSERT OR UPDATE OR DELETE ON d365.column_map
    FOR EACH ROW EXECUTE FUNCTION d365._contact_map_guard();

/*
 * d365_map_column('contact', ...): a field map entry of the contact table
 * (the column map follows it).  The caller is the table's owner
 * (d365_map_column checked it).  A column with a foreign key to the key of
 * another mapped table maps to a lookup field by its logical name
 * (parentcustomerid): the entry holds the lookup's bind property for that
 * table (parentcustomerid_account@odata.bind), from the contact table's
 * metadata.  The field map's own checks (d365._field_map_check) judge the
 * entry.
 */
CREATE FUNCTION d365._contact_map_column("column" name, field text, direction text, match boolean)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source := d365._contact_source_table();
    parent text := d365._map_fk_target(src.contact_table, "column");
    wire text := field;
    pm d365.table_map;
    pent record;
    a record;
BEGIN
    IF parent IS NOT NULL AND parent <> 'contact' AND field ~ '^[a-z][a-z0-9_]*$' THEN
        SELECT * INTO pm FROM d365.table_map t WHERE t.name = parent;
        pent := d365._map_entity(pm.entity_set);
        SELECT * INTO a FROM d365._map_attributes('contact') x WHERE x.logical_name = field;
        IF a.logical_name IS NULL THEN
            PERFORM d365._map_metadata_refresh('contact');
            SELECT * INTO a FROM d365._map_attributes('contact') x WHERE x.logical_name = field;
        END IF;
        IF a.attribute_type IN ('Lookup', 'Customer', 'Owner') THEN
            IF a.navs ->> pent.logical_name IS NULL THEN
                RAISE EXCEPTION 'cannot map column "%" to %: attribute % of contact cannot refer to % (it refers to %)',
                                "column", field, field, pent.logical_name,
                                coalesce((SELECT string_agg(k, ', ' ORDER BY k) FROM jsonb_object_keys(a.navs) k), 'nothing')
                    USING ERRCODE = 'datatype_mismatch',
                          HINT = 'd365_describe(''contact'') lists the attributes of contact.';
            END IF;
            wire := (a.navs ->> pent.logical_name) || '@odata.bind';
        END IF;
    END IF;
    INSERT INTO d365.field_map AS f (column_name, dynamics_field, direction, match)
    VALUES ("column", wire, direction, coalesce(match, false))
    ON CONFLICT ON CONSTRAINT field_map_pkey DO UPDATE
       SET dynamics_field = EXCLUDED.dynamics_field, direction = EXCLUDED.direction,
           match = EXCLUDED.match;
END;
$$;

REVOKE ALL ON FUNCTION d365._contact_map_refresh(), d365._contact_map_guard(),
       d365._contact_map_column(name, text, text, boolean) FROM PUBLIC;

-- ---------------------------------------------------------------------------
