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
           AND NEW.load AND NOT OLD.load THEN
            RAISE EXCEPTION 'the table map "contact" cannot load: load = true is not supported for the contact table'
                USING ERRCODE = 'feature_not_supported',
                      DETAIL = 'The initial load that inserts every Dynamics record as a local row works for the other table maps; the contact engine''s pull updates linked contacts only.',
                      HINT = 'Mark match fields in d365.field_map and run d365_sync(''contact''): existing Dynamics contacts are linked instead of created.';
        END IF;
        IF TG_OP = 'UPDATE' AND OLD.name = 'contact' AND NEW.name = 'contact'
           AND (NEW.local_table, NEW.entity_set, NEW.key_column, NEW.direction, NEW.load, NEW.conflict)
               IS NOT DISTINCT FROM
               (OLD.local_table, OLD.entity_set, OLD.key_column, OLD.direction, OLD.load, OLD.conflict) THEN
            RETURN NEW;     -- enabled, on_local_delete, on_remote_delete (16_contact_policies.sql)
        END IF;
        IF (TG_OP <> 'INSERT' AND OLD.name = 'contact') OR (TG_OP <> 'DELETE' AND NEW.name = 'contact') THEN
            RAISE EXCEPTION 'the table map "contact" is the attached contact table'
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = 'It is made by d365_attach_contacts() and removed by d365_detach_contacts(); only its "enabled", "on_local_delete" and "on_remote_delete" can be changed here.',
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

-- ---------------------------------------------------------------------------
-- Lookups to and from the contact table.  A lookup's parent is the map its
-- column's foreign key points to (d365._map_fk_target); d365sync counts a
-- parent as linked to the record its sync state names: d365.map_row of a
-- map, d365.contact_state of the contact table.
-- ---------------------------------------------------------------------------

/*
 * The join of a parent row "p" of map parent with its sync state, only
 * where the row's link is the record d365sync linked it to: the state of
 * the contact engine for the map "contact", d365.map_row for the others.
 * Used by the table maps' lookups (d365._map_out_exprs, d365._map_incoming,
 * d365._map_owed_expr), once per row of a run.  The state is read by
 * d365._map_parent_link (its key, in a query of its own), never joined:
 * planned with statistics taken before the map had state rows -- a new
 * map's first sync, and the second pass of the same d365_sync() -- a join
 * read every state row of the map, or the whole parent table, for each
 * row while the run added them: quadratic.  The link is compared inside
 * coalesce: an equality would imply that p's link is not null and let the
 * planner read p by its partial link index, empty by such statistics,
 * instead of its key.
 */
CREATE FUNCTION d365._map_parent_join(parent text, key_column name)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format(' JOIN LATERAL (SELECT d365._map_parent_link(%L, p.%I::pg_catalog.text) AS dynamics_id) pr'
                  ' ON coalesce(pr.dynamics_id OPERATOR(pg_catalog.=) p.dynamics365_related_id, false)',
                  parent, key_column)
$$;

/*
 * The contact table's lookups to mapped tables: field map entries bound
 * with @odata.bind whose column has a foreign key to the key of a mapped
 * table (the parent), with the parent's entity set.  SECURITY DEFINER:
 * the contact engine's callers (the push of d365_update_contact among
 * them) need no rights on the map tables.
 */
CREATE FUNCTION d365._contact_lookups(
    OUT column_name name, OUT dynamics_field text, OUT parent text, OUT bind_set text)
RETURNS SETOF record
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT x.column_name, x.dynamics_field, x.parent, t.entity_set
      FROM (SELECT f.column_name, f.dynamics_field,
                   d365._map_fk_target(s.contact_table, f.column_name) AS parent
              FROM d365.field_map f, d365.contact_source s
             WHERE f.dynamics_field LIKE '%@odata.bind') x
      JOIN d365.table_map t ON t.name = x.parent
$$;

/*
 * The Dynamics id a lookup binds to: the record d365sync linked the parent
 * row with key parent_key to (its sync state), or NULL while it is not
 * linked.  Reads d365's sync state only, never the parent table.
 * SECURITY DEFINER, for the contact engine's callers.
 */
CREATE FUNCTION d365._map_parent_link(parent text, parent_key text)
RETURNS uuid
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN parent = 'contact'
                THEN (SELECT s.dynamics_id FROM d365.contact_state s WHERE s.contact_key = parent_key)
                ELSE (SELECT r.dynamics_id FROM d365.map_row r
                       WHERE r.map = parent AND r.row_key = parent_key) END
$$;

/*
 * The key of the parent row d365sync linked to Dynamics record id (its
 * sync state), or NULL when none is: an incoming lookup made local.
 */
CREATE FUNCTION d365._map_parent_key(parent text, id uuid)
RETURNS text
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN parent = 'contact'
                THEN (SELECT min(s.contact_key) FROM d365.contact_state s WHERE s.dynamics_id = id)
                ELSE (SELECT min(r.row_key) FROM d365.map_row r
                       WHERE r.map = parent AND r.dynamics_id = id) END
$$;

/*
 * The condition over the contact row "c" under which a contact waits for
 * a parent: a lookup column holds a key whose row is not linked yet.  Such
 * a contact is not sent (pending, not failed) until its parent has a
 * record; d365_sync() sends the parents first.
 */
CREATE FUNCTION d365._contact_waiting_expr()
RETURNS text
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(string_agg(format('(c.%1$I IS NOT NULL AND d365._map_parent_link(%2$L, c.%1$I::pg_catalog.text) IS NULL)',
                                      l.column_name, l.parent), ' OR ' ORDER BY l.column_name), 'false')
      FROM d365._contact_lookups() l
      JOIN d365.field_map f ON f.column_name = l.column_name
     WHERE f.direction <> 'in'
$$;

/*
 * A lookup is mapped only by a role that may read what it binds to: the
 * key and link columns of the parent's table (a foreign key needs only the
 * REFERENCES right, and the sync would tell the mapper which record each
 * key of a table it cannot read is linked to).
 */
CREATE FUNCTION d365._map_lookup_readable(parent text, "column" name)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    pm d365.table_map;
BEGIN
    SELECT * INTO pm FROM d365.table_map t WHERE t.name = parent;
    IF FOUND AND EXISTS (SELECT FROM pg_class c WHERE c.oid = pm.local_table)
       AND NOT (has_column_privilege(d365._job_caller(), pm.local_table, pm.key_column, 'SELECT')
                AND has_column_privilege(d365._job_caller(), pm.local_table, 'dynamics365_related_id', 'SELECT')) THEN
        RAISE EXCEPTION 'permission denied to map column "%" to a lookup of %', "column", pm.local_table
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = format('Role %s cannot read the key and link columns of %s, the table of map "%s" the column''s foreign key refers to.',
                                  d365._job_caller()::regrole, pm.local_table, pm.name),
                  HINT = format('GRANT SELECT (%I, dynamics365_related_id) ON %s TO %s;', pm.key_column, pm.local_table, d365._job_caller()::regrole);
    END IF;
END;
$$;

/*
 * The check of a field map entry of the contact table that binds a column
 * with a foreign key (d365._field_map_check): the writer may read the
 * referenced table, and the lookup can refer to its Dataverse table (from
 * the metadata, while d365sync is configured).  A foreign key to a table
 * not mapped (yet) is judged when the contacts are sent.
 */
CREATE FUNCTION d365._contact_lookup_check(tbl regclass, "column" name, field text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    parent text := d365._map_fk_target(tbl, "column");
    pm d365.table_map;
    pent record;
    nav text := split_part(field, '@', 1);
    s d365.settings;
BEGIN
    IF parent IS NULL THEN
        RETURN;
    END IF;
    PERFORM d365._map_lookup_readable(parent, "column");
    SELECT * INTO s FROM d365.settings;
    IF s.org_url IS NULL OR s.tenant_id IS NULL OR s.client_id IS NULL OR s.client_secret IS NULL THEN
        RETURN;
    END IF;
    SELECT * INTO pm FROM d365.table_map t WHERE t.name = parent;
    pent := d365._map_entity(pm.entity_set);
    IF NOT EXISTS (SELECT FROM d365._map_attributes('contact') x
                    WHERE x.navs ->> pent.logical_name = nav) THEN
        RAISE EXCEPTION 'column "%" cannot be mapped to Dynamics field "%": its foreign key refers to map "%" (Dynamics table %), which % does not bind to',
                        "column", field, parent, pent.logical_name, nav
            USING ERRCODE = 'datatype_mismatch',
                  HINT = format('Map it with d365_map_column(''contact'', %L, <lookup attribute>): the binding to %s is found in the metadata.',
                                "column", pent.logical_name);
    END IF;
END;
$$;

REVOKE ALL ON FUNCTION d365._contact_map_refresh(), d365._contact_map_guard(),
       d365._contact_map_column(name, text, text, boolean), d365._map_parent_join(text, name),
       d365._contact_lookups(), d365._map_parent_link(text, text), d365._map_parent_key(text, uuid),
       d365._contact_waiting_expr(), d365._map_lookup_readable(text, name),
       d365._contact_lookup_check(regclass, name, text) FROM PUBLIC;

-- ---------------------------------------------------------------------------
