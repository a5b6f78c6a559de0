-- Lookups that close a cycle of the maps' dependency order: an account
-- whose primary contact is a contact whose company is that account, an
-- account whose parent account is a row of the same map.  Such a lookup
-- does not make its row wait for its parent: the row is sent without it
-- and owes it.  Owing is kept in the row's own state: its synced_seq stays
-- one below its change_seq, so the row stays pending (d365_status()),
-- survives a crash, and is sent again -- only what differs from what
-- Dynamics holds, the lookup once its parent is linked -- by a later pass
-- (d365_sync() runs a second pass over the maps that owe lookups) or run.
-- ---------------------------------------------------------------------------

/*
 * Whether a lookup of map to the map parent closes a cycle of the order
 * d365_sync() runs the maps in: parent is map itself, or comes at or after
 * it (by d365._map_order(), ties as d365_sync() breaks them).
 */
CREATE FUNCTION d365._map_cycle_lookup(map text, parent text)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT parent = map
           OR coalesce((SELECT max(o.pos) FILTER (WHERE o.name = parent) >= max(o.pos) FILTER (WHERE o.name = map)
                          FROM (SELECT x.name, row_number() OVER (ORDER BY x.depth, x.name = 'contact', x.name) AS pos
                                  FROM d365._map_order() x) o), false)
$$;

/*
 * The lookups a row "c" of a map owes: an SQL expression (text[]) of the
 * wire properties of its cycle-closing lookups (d365._map_cycle_lookup)
 * whose column is set but whose parent row is not linked yet.  The work
 * query (d365._map_work_sql) leaves them out of the row's values.
 */
CREATE FUNCTION d365._map_owed_expr(map text)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    col record;
    pm d365.table_map;
    col_ref text;
    items text := '';
BEGIN
    FOR col IN SELECT * FROM d365._map_columns(map) x
                WHERE x.direction <> 'in' AND x.kind = 'lookup' AND x.parent IS NOT NULL
                  AND x.problem IS NULL LOOP
        IF NOT d365._map_cycle_lookup(map, col.parent) THEN
            CONTINUE;
        END IF;
        SELECT * INTO pm FROM d365.table_map t WHERE t.name = col.parent;
        col_ref := format('c.%I', col."column");
        -- linked: the parent's state names its link (d365._map_parent_join)
        items := items || format(', CASE WHEN %s IS NOT NULL AND NOT EXISTS (SELECT FROM %s p%s'
                                 '  WHERE p.%I OPERATOR(pg_catalog.=) %s) THEN %L END',
                                 col_ref, pm.local_table, d365._map_parent_join(pm.name, pm.key_column),
                                 pm.key_column, col_ref, col.wire);
    END LOOP;
    RETURN format('pg_catalog.array_remove(ARRAY[NULL::pg_catalog.text%s], NULL)', items);
END;
$$;

/*
 * Whether d365_sync() runs a second pass of a map: a column of the map
 * sent out has a foreign key to a map that makes it a lookup closing a
 * cycle (d365._map_fk_target, then d365._map_cycle_lookup for the columns
 * with such a key only: the catalog and d365's tables, no Dynamics
 * metadata), and a linked row of the map may owe one (pending, its
 * synced_seq one below its change_seq, not backing off).  The cheap column
 * check goes first: a map without such a column never scans its rows.
 * Nothing here raises for a map whose run went through (its table is
 * locked, its row of d365.table_map too); the pass's work query sends what
 * can go now and leaves out the rows whose parents are still not linked.
 */
CREATE FUNCTION d365._map_owes_lookups(map text)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT FROM (SELECT d365._map_fk_target(t.local_table, c."column") AS parent
                                  FROM d365.table_map t
                                  JOIN d365.column_map c ON c.map = t.name
                                 WHERE t.name = _map_owes_lookups.map AND c.direction <> 'in'
                                OFFSET 0) l
                    WHERE l.parent IS NOT NULL AND d365._map_cycle_lookup(_map_owes_lookups.map, l.parent))
       AND EXISTS (SELECT FROM d365.map_row r
                    WHERE r.map = _map_owes_lookups.map AND r.change_seq = r.synced_seq + 1
                      AND r.dynamics_id IS NOT NULL
                      AND (r.next_attempt_at IS NULL OR r.next_attempt_at <= now()))
$$;

REVOKE ALL ON FUNCTION d365._map_cycle_lookup(text, text), d365._map_owed_expr(text),
       d365._map_owes_lookups(text) FROM PUBLIC;

-- ---------------------------------------------------------------------------
