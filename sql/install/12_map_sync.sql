-- The table-map engine: the select and record stages of the outgoing sync
-- (the send stage is the pipeline, src/pipeline/pipeline.c) and the record stage of
-- the pull (the reading is the pipeline's change-tracking reader,
-- src/pipeline/pipeline_pull.c); src/engines/table_maps.c runs them for each map.
-- ---------------------------------------------------------------------------

/*
 * The Dynamics id of a new row of a map: a name-based UUID of the
 * installation, the map, the key and the number of times the row's record
 * was deleted in Dynamics, so creating with an upsert on it is idempotent
 * (a retry after a lost commit reaches the same record).
 */
CREATE FUNCTION d365._map_guid(map text, row_key text, generation integer)
RETURNS uuid
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT overlay(overlay(h PLACING '3' FROM 13 FOR 1)
                   PLACING substr('89ab', (('x' || substr(h, 17, 1))::bit(4)::int & 3) + 1, 1)
                   FROM 17 FOR 1)::uuid
      FROM (SELECT md5(s.instance_id::text || '/map/' || map || '/' || row_key || '/' || generation) AS h
              FROM d365.settings s) x
$$;

/*
 * The maps in dependency order: a map after every map its lookups point to
 * (a lookup of a map to itself does not count; a cycle is broken by name).
 */
CREATE FUNCTION d365._map_order(OUT name text, OUT depth integer)
RETURNS SETOF record
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH RECURSIVE edge AS (
        SELECT DISTINCT t.name AS child, d365._map_fk_target(t.local_table, c."column") AS parent
          FROM d365.table_map t
          JOIN d365.column_map c ON c.map = t.name
         WHERE EXISTS (SELECT FROM pg_class r WHERE r.oid = t.local_table)),
    walk AS (
        SELECT t.name, 0 AS depth, ARRAY[t.name] AS path FROM d365.table_map t
        UNION ALL
        SELECT e.child, w.depth + 1, w.path || e.child
          FROM walk w JOIN edge e ON e.parent = w.name
         WHERE e.child <> e.parent AND e.child <> ALL (w.path))
    SELECT w.name, max(w.depth)::integer FROM walk w GROUP BY w.name ORDER BY 2, 1
$$;

-- The first changes noted since the last sync become change_seq increments.
CREATE FUNCTION d365._map_fold_changes(map text)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    WITH gone AS (
        DELETE FROM d365.map_change q
         WHERE q.ctid = ANY (ARRAY(SELECT x.ctid FROM d365.map_change x WHERE x.map = _map_fold_changes.map
                                    FOR UPDATE SKIP LOCKED))
        RETURNING q.keys)
    INSERT INTO d365.map_row AS r (map, row_key, change_seq)
    SELECT _map_fold_changes.map, k, 1 FROM (SELECT DISTINCT k FROM gone g, unnest(g.keys) k) x
    ON CONFLICT ON CONSTRAINT map_row_pkey DO UPDATE SET change_seq = r.change_seq + 1
$$;

/*
 * The outgoing expressions of a map over its row "c": the JSON body
 * ({wire property: value}), the problems that keep a row from being sent
 * (a label that is not an option of its choice), and whether the row waits
 * for a parent not linked yet.  Values are converted with built-in
 * functions only (d365._json_expr): no code of the application's making
 * runs.  match: the values of the match columns ({field: value}), or
 * NULL when the map has none.  Raises when a mapped column cannot be
 * synced.
 */
CREATE FUNCTION d365._map_out_exprs(map text, OUT body text, OUT problems text, OUT waiting text,
    OUT match text)
RETURNS record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    col record;
    pm d365.table_map;
    col_ref text;
    val text;
    parent_id text;
    labels text;
    wire_names text[] := '{}';
    wire_vals text[] := '{}';
    w integer;
BEGIN
    body := '''{}''::pg_catalog.jsonb';
    problems := 'NULL::pg_catalog.text';
    waiting := 'false';
    FOR col IN SELECT * FROM d365._map_columns(map) x WHERE x.direction <> 'in' LOOP
        IF col.problem IS NOT NULL THEN
            RAISE EXCEPTION 'column "%" of map "%" cannot be synced: %', col."column", map, col.problem
                USING ERRCODE = 'datatype_mismatch',
                      HINT = format('Fix the column or the field, or DELETE FROM d365.column_map WHERE map = %L AND "column" = %L;',
                                    map, col."column");
        END IF;
        col_ref := format('c.%I', col."column");
        labels := format('%L', (SELECT string_agg(o ->> 'label', ', ' ORDER BY (o ->> 'value')::integer)
                                  FROM jsonb_array_elements(coalesce(col.options, '[]')) o));
        CASE col.kind
        WHEN 'lookup' THEN
            IF col.parent IS NOT NULL THEN
                SELECT * INTO pm FROM d365.table_map t WHERE t.name = col.parent;
                -- the parent's link only where d365sync linked it (its map_row
                -- names the same record): a forged link is no parent
                parent_id := format('(SELECT p.dynamics365_related_id FROM %s p%s'
                                    '  WHERE p.%I OPERATOR(pg_catalog.=) %s)',
                                    pm.local_table, d365._map_parent_join(pm.name, pm.key_column),
                                    pm.key_column, col_ref);
                -- a lookup closing a cycle of the maps' order does not wait:
                -- the row goes without it and owes it (d365._map_owed_expr)
                IF NOT d365._map_cycle_lookup(map, col.parent) THEN
                    waiting := waiting || format(' OR (%s IS NOT NULL AND %s IS NULL)', col_ref, parent_id);
                END IF;
            ELSE
                parent_id := col_ref;
            END IF;
            val := format('pg_catalog.to_jsonb(%L OPERATOR(pg_catalog.||) (%s)::pg_catalog.text OPERATOR(pg_catalog.||) '')'')',
                          '/' || col.bind_set || '(', parent_id);
        WHEN 'choice' THEN
            val := format('(SELECT pg_catalog.to_jsonb((o OPERATOR(pg_catalog.->>) ''value'')::pg_catalog.int4)'
                          '   FROM pg_catalog.jsonb_array_elements(%L::pg_catalog.jsonb) o'
                          '  WHERE o OPERATOR(pg_catalog.->>) ''label'' OPERATOR(pg_catalog.=) (%s)::pg_catalog.text LIMIT 1)',
                          col.options, col_ref);
            problems := format('NULLIF(pg_catalog.concat_ws(''; '', %s, CASE WHEN %s IS NOT NULL AND %s IS NULL'
                               ' THEN pg_catalog.format(''%%s is not an option of %s (column %s); allowed: %%s'','
                               ' pg_catalog.quote_literal((%s)::pg_catalog.text), %s) END), '''')',
                               problems, col_ref, val, col.field, col."column", col_ref, labels);
        WHEN 'choice_value' THEN
            val := format('pg_catalog.to_jsonb((%s)::pg_catalog.int4)', col_ref);
        WHEN 'multi' THEN
            val := format('(SELECT pg_catalog.to_jsonb(pg_catalog.string_agg(o OPERATOR(pg_catalog.->>) ''value'', '',''
                                   ORDER BY (o OPERATOR(pg_catalog.->>) ''value'')::pg_catalog.int4))'
                          '   FROM pg_catalog.jsonb_array_elements(%L::pg_catalog.jsonb) o'
                          '  WHERE o OPERATOR(pg_catalog.->>) ''label'' OPERATOR(pg_catalog.=) ANY ((%s)::pg_catalog.text[]))',
                          col.options, col_ref);
            problems := format('NULLIF(pg_catalog.concat_ws(''; '', %s, (SELECT pg_catalog.format(''%%s %%s not an option of %s (column %s); allowed: %%s'','
                               ' pg_catalog.string_agg(pg_catalog.quote_literal(l), '', ''),'
                               ' CASE WHEN pg_catalog.count(*) > 1 THEN ''are'' ELSE ''is'' END, %s)'
                               '   FROM pg_catalog.unnest((%s)::pg_catalog.text[]) l'
                               '  WHERE l IS NULL OR NOT EXISTS (SELECT FROM pg_catalog.jsonb_array_elements(%L::pg_catalog.jsonb) o'
                               '                   WHERE o OPERATOR(pg_catalog.->>) ''label'' OPERATOR(pg_catalog.=) l)'
                               ' HAVING pg_catalog.count(*) > 0)), '''')',
                               problems, col.field, col."column", labels, col_ref, col.options);
        WHEN 'multi_value' THEN
            val := format('(SELECT pg_catalog.to_jsonb(pg_catalog.string_agg(v::pg_catalog.text, '','' ORDER BY v))'
                          '   FROM pg_catalog.unnest((%s)::pg_catalog.int8[]) v)', col_ref);
        ELSE
            val := d365._json_expr(col_ref, col.typ);
        END CASE;
        -- a field sent from two columns takes the value of the last of
        -- them (by name) that has one, as a load reads it: a foreign key
        -- not set beside a uuid column does not clear the lookup
        w := array_position(wire_names, col.wire);
        IF w IS NULL THEN
            wire_names := wire_names || col.wire;
            wire_vals := wire_vals || val;
        ELSE
            wire_vals[w] := format('coalesce(%s, %s)', val, wire_vals[w]);
        END IF;
        IF col.match THEN
            match := coalesce(match || ' OPERATOR(pg_catalog.||) ', '')
                     || format('pg_catalog.jsonb_build_object(%L, %s)', col.wire, val);
        END IF;
    END LOOP;
    body := body || coalesce((SELECT string_agg(format(' OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object(%L, %s)',
                                                        wire_names[j], wire_vals[j]), '' ORDER BY j)
                                FROM generate_subscripts(wire_names, 1) j), '');
    problems := format('NULLIF(%s, '''')', problems);
END;
$$;

/*
 * The work query of one map's sync: one row per row to consider (unlinked,
 * or changed since it was last synced, past its back-off), with the request
 * to send -- a create is an upsert on the row's own id (PATCH without
 * If-Match), an update carries If-Match: * and only what differs from what
 * Dynamics holds -- and a context for d365._map_record().  A row whose
 * lookup points to a parent row not linked yet is left out: it waits,
 * pending, for a later run (d365_sync() sends parents first); a lookup
 * closing a cycle of that order is left out of the row instead, which
 * stays pending until it has sent it (17_map_cycles.sql).  The
 * records of rows deleted locally (d365.map_delete) are deactivated or
 * deleted by the same run (d365._map_delete_work_sql).
 */
CREATE FUNCTION d365._map_work_sql(map text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map := d365._table_map(map);
    e record;
    merge boolean := EXISTS (SELECT FROM d365.column_map c WHERE c.map = m.name AND c.direction = 'both');
BEGIN
    -- row security is the table owner's code: never run as the role running
    -- the job (d365sync refuses such a role; docs/security.md)
    IF row_security_active(m.local_table) THEN
        RAISE EXCEPTION 'row-level security of % applies to role "%"', m.local_table, current_user
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'Its policies are code of the table''s owner: d365sync does not read the table as a role they bind.',
                  HINT = 'Run the sync as the table''s owner, or as a role with BYPASSRLS.';
    END IF;
    -- the job reads the table as the job role: for a caller that may read it
    PERFORM d365._caller_reads(m.local_table);
    PERFORM d365._map_fold_changes(m.name);
    e := d365._map_out_exprs(m.name);
    RETURN format($q$
        SELECT w.item_key,
               CASE WHEN w.problem IS NOT NULL OR w.body IS NULL THEN '[]'
                    ELSE jsonb_build_array(jsonb_build_object(
                             'method', 'PATCH',
                             'path', %2$L || '(' || w.dynamics_id || ')',
                             'body', w.body::text,
                             'headers', CASE WHEN NOT w.linked THEN '[]'::jsonb
                                             WHEN w.etag IS NOT NULL AND %10$L
                                             THEN jsonb_build_array('If-Match: ' || w.etag)
                                             ELSE '["If-Match: *"]'::jsonb END))::text
               END AS requests,
               (jsonb_build_object('map', %1$L,
                                  'action', CASE WHEN w.problem IS NOT NULL THEN 'invalid'
                                                 WHEN NOT w.linked THEN 'create'
                                                 WHEN w.body IS NULL THEN 'unchanged'
                                                 ELSE 'update' END,
                                  'id', w.dynamics_id,
                                  -- a row owing a lookup stays pending
                                  'seq', CASE WHEN cardinality(w.owed) > 0 AND w.problem IS NULL
                                              THEN w.change_seq - 1 ELSE w.change_seq END,
                                  'generation', w.generation,
                                  'values', w.cur, 'sent', w.body, 'error', w.problem)
               || CASE WHEN w.preread THEN jsonb_build_object('synced', w.synced) ELSE '{}' END)
               ::text AS context,
               CASE WHEN w.preread THEN jsonb_build_object('map', %1$L, 'id', w.dynamics_id)::text
                    WHEN NOT w.linked AND w.problem IS NULL AND w.match_values IS NOT NULL
                         AND NOT EXISTS (SELECT FROM jsonb_each(w.match_values) x
                                          WHERE x.value IN ('null'::jsonb, '""'::jsonb))
                    THEN jsonb_build_object('map', %1$L, 'values', w.match_values)::text END AS lookup
          FROM (SELECT b.*,
                       %10$L AND b.linked AND b.problem IS NULL AND b.body IS NOT NULL
                       AND b.synced IS NOT NULL AND b.etag IS NULL AS preread
                  FROM (SELECT v.*,
                       CASE WHEN NOT v.linked THEN jsonb_strip_nulls(v.cur)
                            ELSE (SELECT jsonb_object_agg(x.key, x.value)
                                    FROM jsonb_each(v.cur) x
                                   WHERE (v.synced IS NULL AND x.value <> 'null'::jsonb)
                                      OR (v.synced IS NOT NULL
                                          AND x.value IS DISTINCT FROM coalesce(v.synced -> x.key, 'null'::jsonb)))
                       END AS body
                  FROM (SELECT c.%4$I::text AS item_key,
                               c.dynamics365_related_id IS NOT NULL AS linked,
                               coalesce(c.dynamics365_related_id,
                                        d365._map_guid(%1$L, c.%4$I::text, coalesce(r.generation, 0))) AS dynamics_id,
                               coalesce(r.change_seq, 0) AS change_seq,
                               coalesce(r.generation, 0) AS generation,
                               CASE WHEN r.dynamics_id IS DISTINCT FROM c.dynamics365_related_id
                                    THEN NULL ELSE r.synced END AS synced,
                               CASE WHEN r.dynamics_id IS DISTINCT FROM c.dynamics365_related_id
                                    THEN NULL ELSE d365._etag(r.etag) END AS etag,
                               (%5$s) - (%11$s) AS cur, %11$s AS owed,
                               -- a link d365sync did not write (the state names
                               -- another record, or none) is never used
                               coalesce(CASE WHEN c.dynamics365_related_id IS NOT NULL
                                              AND r.dynamics_id IS DISTINCT FROM c.dynamics365_related_id
                                             THEN 'the link column holds Dynamics 365 id '
                                                  || c.dynamics365_related_id
                                                  || ', which d365sync did not link this row to: nothing sent; clear the link column (the row then gets a record of its own)'
                                        END, %6$s) AS problem,
                               (%7$s) AS waiting, %8$s AS match_values
                          FROM %3$s c
                          LEFT JOIN d365.map_row r ON r.map = %1$L AND r.row_key = c.%4$I::text
                         WHERE c.%4$I IS NOT NULL
                           AND ((c.dynamics365_related_id IS NULL
                                 AND (r.row_key IS NULL OR r.remote_deleted_at IS NULL
                                      OR r.change_seq > r.synced_seq))
                                OR (c.dynamics365_related_id IS NOT NULL
                                    AND (r.row_key IS NULL OR r.synced IS NULL
                                         OR r.change_seq > r.synced_seq
                                         OR r.dynamics_id IS DISTINCT FROM c.dynamics365_related_id)))
                           AND (r.next_attempt_at IS NULL OR r.next_attempt_at <= now())
                        OFFSET 0) v
                 WHERE NOT v.waiting) b
                 -- nothing to send but a lookup still owed: it waits
                 WHERE NOT (b.linked AND b.body IS NULL AND cardinality(b.owed) > 0)) w
        UNION ALL
        SELECT d.*, NULL::text FROM (%9$s) d
    $q$, m.name, m.entity_set, m.local_table, m.key_column, e.body, e.problems, e.waiting,
         coalesce(e.match, 'NULL::pg_catalog.jsonb'), d365._map_delete_work_sql(m.name, m.entity_set),
         merge, d365._map_owed_expr(m.name));
END;
$$;

/*
 * The record stage of a map's sync: link columns (as the table's owner,
 * d365._map_set_links: a create links only a row still unlinked, an update
 * only a row still linked to that record), the synced values, failures and
 * back-off; a 404 on an update (deleted in Dynamics) unlinks the row, which
 * is created anew only after it changes.  Returns the chunk's counts.
 */
CREATE TYPE d365._map_outcome AS (
    item_key text, action text, dynamics_id uuid, seq bigint, generation integer,
    vals jsonb, sent jsonb, status integer, error_code text, error_message text,
    ok boolean, gone boolean, matched boolean
);

CREATE FUNCTION d365._map_record(
    item_keys text[], contexts text[], statuses integer[],
    error_codes text[], error_messages text[],
    OUT created integer, OUT updated integer, OUT unchanged integer,
    OUT failed integer, OUT unlinked integer)
RETURNS record
LANGUAGE plpgsql
-- a chunk against the whole table: always by index
SET enable_hashjoin = off
SET enable_mergejoin = off
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    mname text := (contexts[1])::jsonb ->> 'map';
    done text[];
    outcomes d365._map_outcome[];
    remote_done integer;
    remote_failed integer;
    merge_failed text[];
    k text;
BEGIN
    SELECT array_agg(ROW(
               o.k, x.c ->> 'action', (x.c ->> 'id')::uuid, (x.c ->> 'seq')::bigint,
               (x.c ->> 'generation')::integer, x.c -> 'values', nullif(x.c -> 'sent', 'null'),
               o.st, o.code, coalesce(o.msg, x.c ->> 'error'),
               coalesce((x.c ->> 'action') IN ('unchanged', 'link')
                        OR ((x.c ->> 'action') IN ('create', 'update') AND o.st BETWEEN 200 AND 299
                            AND o.msg IS NULL)
                        OR ((x.c ->> 'action') = 'merged' AND o.st IS NULL AND o.msg IS NULL)
                        OR ((x.c ->> 'action') IN ('remote_delete', 'remote_deactivate')
                            AND (o.st BETWEEN 200 AND 299 OR o.st = 404) AND o.msg IS NULL), false),
               coalesce((x.c ->> 'action') = 'update' AND o.st = 404 AND x.c -> 'matched' IS NULL, false),
               x.c -> 'matched' IS NOT NULL
           )::d365._map_outcome)
      INTO outcomes
      FROM unnest(item_keys, contexts, statuses, error_codes, error_messages) AS o(k, ctx, st, code, msg),
           LATERAL (SELECT o.ctx::jsonb AS c) x;

    -- the records of rows deleted locally: done (deleted, deactivated, or
    -- gone already), or kept pending with a back-off
    SELECT count(*) FILTER (WHERE o.ok), count(*) FILTER (WHERE NOT o.ok)
      INTO remote_done, remote_failed
      FROM unnest(outcomes) o WHERE o.action IN ('remote_delete', 'remote_deactivate');
    DELETE FROM d365.map_delete d
     USING unnest(outcomes) o
     WHERE o.action IN ('remote_delete', 'remote_deactivate') AND o.ok
       AND d.map = mname AND d.dynamics_id = o.dynamics_id;
    UPDATE d365.map_delete d
       SET attempts = d.attempts + 1, next_attempt_at = d365._next_attempt(d.attempts + 1),
           last_attempt_at = now(), last_status = nullif(o.status, 0),
           last_error_code = o.error_code, last_error = left(o.error_message, 2000)
      FROM unnest(outcomes) o
     WHERE o.action IN ('remote_delete', 'remote_deactivate') AND NOT o.ok
       AND d.map = mname AND d.dynamics_id = o.dynamics_id;
    outcomes := ARRAY(SELECT o FROM unnest(outcomes) o
                       WHERE o.action NOT IN ('remote_delete', 'remote_deactivate'));

    INSERT INTO d365.map_row (map, row_key)
    SELECT mname, o.item_key FROM unnest(outcomes) o
    ON CONFLICT ON CONSTRAINT map_row_pkey DO NOTHING;

    -- a create or a match links a row still unlinked, an update a row still
    -- linked to that record
    SELECT d365._map_set_links(mname, array_agg(o.item_key), array_agg(o.dynamics_id),
                               array_agg(CASE WHEN o.action = 'update' AND NOT o.matched
                                              THEN o.dynamics_id END))
      INTO done
      FROM unnest(outcomes) o WHERE o.ok AND o.action IN ('create', 'update', 'link');

    UPDATE d365.map_row r
       SET synced = CASE WHEN o.action = 'create' OR o.matched OR r.synced IS NULL
                              OR r.dynamics_id IS DISTINCT FROM o.dynamics_id
                         THEN o.vals ELSE r.synced || coalesce(o.sent, '{}') END,
           dynamics_id = o.dynamics_id, synced_seq = o.seq, generation = o.generation,
           attempts = 0, next_attempt_at = NULL, last_attempt_at = now(),
           last_status = coalesce(o.status, r.last_status),
           last_error_code = NULL, last_error = NULL, remote_deleted_at = NULL, etag = NULL
      FROM unnest(outcomes) o
     WHERE o.ok AND r.map = mname AND r.row_key = o.item_key
       AND (o.item_key = ANY (coalesce(done, '{}')) OR o.action = 'unchanged');

    -- deleted in Dynamics: unlink; created anew only after it changes
    SELECT d365._map_set_links(mname, array_agg(o.item_key), array_agg(NULL::uuid), array_agg(o.dynamics_id))
      INTO done
      FROM unnest(outcomes) o WHERE o.gone;
    UPDATE d365.map_row r
       SET dynamics_id = NULL, synced = NULL, synced_seq = r.change_seq, generation = r.generation + 1,
           remote_deleted_at = now(), last_attempt_at = now(), last_status = o.status,
           last_error_code = o.error_code,
           last_error = 'deleted in Dynamics 365, unlinked: ' || coalesce(o.error_message, '')
      FROM unnest(outcomes) o
     WHERE o.gone AND r.map = mname AND r.row_key = o.item_key AND o.item_key = ANY (coalesce(done, '{}'));
    -- on_remote_delete 'delete': the unlinked rows go too
    IF (SELECT t.on_remote_delete FROM d365.table_map t WHERE t.name = mname) = 'delete' THEN
        FOREACH k IN ARRAY coalesce(done, '{}') LOOP
            PERFORM d365._map_remove_row(mname, k);
        END LOOP;
    END IF;

    -- 412: the record changed in Dynamics since its ETag was read: read
    -- it and merge, at once (a second pass of d365_sync) without back-off
    UPDATE d365.map_row r
       SET etag = NULL, last_attempt_at = now(), last_status = 412,
           last_error_code = o.error_code,
           last_error = 'changed in Dynamics 365 since the last sync (412): merged at the next pass'
      FROM unnest(outcomes) o
     WHERE o.action = 'update' AND o.status = 412 AND r.map = mname AND r.row_key = o.item_key;
    outcomes := ARRAY(SELECT o FROM unnest(outcomes) o
                       WHERE NOT (o.action = 'update' AND o.status IS NOT DISTINCT FROM 412));

    -- other failures stay pending: back off 5 min, 10, ... up to a day (a
    -- row refused before sending is tried again as soon as it changes)
    UPDATE d365.map_row r
       SET attempts = r.attempts + 1,
           next_attempt_at = CASE WHEN o.action = 'invalid' THEN NULL ELSE d365._next_attempt(r.attempts + 1) END,
           synced_seq = CASE WHEN o.action = 'invalid' THEN o.seq ELSE r.synced_seq END,
           last_attempt_at = now(), last_status = nullif(o.status, 0),
           last_error_code = o.error_code, last_error = left(o.error_message, 2000)
      FROM unnest(outcomes) o
     WHERE NOT o.ok AND NOT o.gone AND r.map = mname AND r.row_key = o.item_key;

    -- rows merged with their record: local changes, conflicts, ETag
    -- (a row whose Dynamics changes could not be applied counts as failed)
    merge_failed := d365._map_record_merges(mname, item_keys, contexts, statuses, error_messages);

    SELECT count(*) FILTER (WHERE o.ok AND o.action = 'create'),
           count(*) FILTER (WHERE o.ok AND o.action = 'update' AND NOT o.item_key = ANY (merge_failed)),
           count(*) FILTER (WHERE o.action IN ('unchanged', 'link', 'merged') AND NOT o.item_key = ANY (merge_failed)),
           count(*) FILTER (WHERE (NOT o.ok AND NOT o.gone) OR o.item_key = ANY (merge_failed)),
           count(*) FILTER (WHERE o.gone)
      INTO created, updated, unchanged, failed, unlinked
      FROM unnest(outcomes) o;
    failed := failed + remote_failed;
    unlinked := unlinked + remote_done;
END;
$$;

/*
 * Matching: the look-up stage of the pipeline for unlinked rows of a map
 * with match columns (d365.column_map.match).  The look-up of a group of
 * rows is one GET of the records whose match fields equal one row's values
 * (an "or" chain of "and" groups), with every mapped field selected.  The
 * same stage reads the records of linked rows to merge before their update
 * (look-ups {"map", "id"}, 14_map_conflict.sql): their ids join the chain.
 */
CREATE FUNCTION d365._map_lookup_path(lookups text[])
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map;
    ent record;
    cond text;
    sel text;
BEGIN
    IF lookups IS NULL OR cardinality(lookups) = 0 THEN
        RETURN NULL;
    END IF;
    m := d365._table_map((lookups[1])::jsonb ->> 'map');
    ent := d365._map_entity(m.entity_set);
    SELECT string_agg(DISTINCT g, ' or ') INTO cond
      FROM (SELECT '(' || string_agg(format('%s eq %s', x.field,
                                            d365._odata_literal(l::jsonb -> 'values' -> x.field,
                                                                d365._match_type(x.typ))),
                                     ' and ' ORDER BY x.field) || ')' AS g
              FROM unnest(lookups) WITH ORDINALITY u(l, i)
              CROSS JOIN d365._map_columns(m.name) x
             WHERE l IS NOT NULL AND l::jsonb ? 'values' AND x.match
             GROUP BY i
            UNION ALL
            -- the records of linked rows to merge (14_map_conflict.sql)
            SELECT format('%s eq %s', ent.primary_id, (l::jsonb ->> 'id')::uuid)
              FROM unnest(lookups) l
             WHERE l IS NOT NULL AND l::jsonb ? 'id') y;
    IF cond IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT string_agg(DISTINCT x.read, ',') INTO sel
      FROM d365._map_columns(m.name) x WHERE x.problem IS NULL;
    RETURN m.entity_set || '?$select=' || ent.primary_id || coalesce(',' || sel, '')
           || '&$filter=' || d365._uri_escape(cond);
END;
$$;

/*
 * The judge of a map's look-ups (as d365._contact_lookup_resolve for
 * contacts): one hit links the row to it and sends only the fields whose
 * local value is set and differs (action 'update', or 'link' with nothing
 * to send); several hits, or a hit linked to another row already, fail the
 * row naming the records; none keeps the create.
 */
CREATE FUNCTION d365._map_lookup_resolve(item_keys text[], lookups text[],
    contexts text[], groups integer[], answers text[],
    OUT item_key text, OUT requests text, OUT context text)
RETURNS SETOF record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map := d365._table_map((lookups[1])::jsonb ->> 'map');
    ent record := d365._map_entity(m.entity_set);
    fields text[];
    reads jsonb;
    i integer;
    look jsonb;
    ctx jsonb;
    answer jsonb;
    hits jsonb[];
    hit jsonb;
    id text;
    other text;
    body jsonb;
BEGIN
    SELECT array_agg(x.field ORDER BY x.field) FILTER (WHERE x.match),
           coalesce(jsonb_object_agg(x.wire, x.read) FILTER (WHERE x.problem IS NULL), '{}')
      INTO fields, reads
      FROM d365._map_columns(m.name) x;
    FOR i IN 1 .. cardinality(item_keys) LOOP
        item_key := item_keys[i];
        look := lookups[i]::jsonb;
        ctx := contexts[i]::jsonb;
        requests := NULL; context := NULL;
        IF look IS NULL THEN
            RETURN NEXT;
            CONTINUE;
        END IF;
        answer := d365._lookup_answer(answers[groups[i]]);
        IF look ? 'id' THEN
            -- a linked row to merge with its record (14_map_conflict.sql)
            SELECT * INTO requests, context FROM d365._map_preread_item(item_key, ctx, answer);
            RETURN NEXT;
            CONTINUE;
        END IF;
        hits := ARRAY(SELECT v FROM jsonb_array_elements(CASE WHEN jsonb_typeof(answer -> 'value') = 'array'
                                                               THEN answer -> 'value' ELSE '[]' END) v
                       WHERE d365._match_key(v, fields) = d365._match_key(look -> 'values', fields));
        IF answer ? '@d365sync.unreadable' OR answer ? '@odata.nextLink' OR cardinality(hits) > 1 THEN
            requests := '[]';
            context := (ctx || jsonb_build_object('action', 'invalid', 'sent', NULL, 'error',
                           CASE WHEN answer ? '@d365sync.unreadable' THEN 'could not be matched: ' || (answer ->> '@d365sync.unreadable')
                                WHEN cardinality(hits) > 1
                                    THEN format('matches %s Dynamics 365 records (%s); not created', cardinality(hits),
                                                (SELECT string_agg(h ->> ent.primary_id, ', ') FROM unnest(hits[1:10]) h))
                                ELSE 'could not be matched: its look-up found more than one page of records' END))::text;
            RETURN NEXT;
            CONTINUE;
        ELSIF cardinality(hits) = 0 THEN
            RETURN NEXT;        -- no record has these values: created
            CONTINUE;
        END IF;
        hit := hits[1];
        id := hit ->> ent.primary_id;
        other := NULL;
        IF d365._is_guid(id) THEN
            EXECUTE format('SELECT %I::text FROM %s WHERE dynamics365_related_id OPERATOR(pg_catalog.=) $1',
                           m.key_column, m.local_table) INTO other USING id::uuid;
        END IF;
        IF NOT d365._is_guid(id) OR other IS NOT NULL THEN
            requests := '[]';
            context := (ctx || jsonb_build_object('action', 'invalid', 'sent', NULL, 'error',
                           format('matches Dynamics 365 record %s, which row %s is linked to; not created', id, other)))::text;
            RETURN NEXT;
            CONTINUE;
        END IF;
        SELECT jsonb_object_agg(e.key, e.value) INTO body
          FROM jsonb_each(ctx -> 'values') e
         WHERE e.value <> 'null'::jsonb
           AND NOT d365._same_value(e.value, hit -> coalesce(reads ->> e.key, e.key),
                                    e.key = ANY (fields));
        requests := CASE WHEN body IS NULL THEN '[]'
                         ELSE jsonb_build_array(jsonb_build_object(
                                  'method', 'PATCH', 'path', m.entity_set || '(' || id || ')',
                                  'body', body::text, 'headers', '["If-Match: *"]'::jsonb))::text END;
        context := (ctx || jsonb_build_object('id', id, 'matched', true, 'sent', body,
                                              'action', CASE WHEN body IS NULL THEN 'link' ELSE 'update' END))::text;
        RETURN NEXT;
    END LOOP;
END;
$$;

-- The first request of a full read of a map's Dataverse table with change
-- tracking: its id and every field mapped for incoming changes.
CREATE FUNCTION d365._map_pull_start_path(map text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map := d365._table_map(map);
    ent record := d365._map_entity(m.entity_set);
    fields text;
BEGIN
    SELECT string_agg(DISTINCT x.read, ',') INTO fields
      FROM d365._map_columns(m.name) x WHERE x.direction <> 'out' AND x.problem IS NULL;
    IF fields IS NULL THEN
        RETURN NULL;
    END IF;
    RETURN m.entity_set || '?$select=' || fields || ',' || ent.primary_id;
END;
$$;

/*
 * One incoming row of a map: {column: local value as JSON} for what changed
 * in Dynamics since the last sync, and {wire property: value} to remember
 * as synced.  A lookup becomes the key of the local row linked to that
 * record (an error when none is); a choice its label (text) or value, a
 * multi-select its labels or values as an array.
 */
CREATE FUNCTION d365._map_incoming(map text, rec jsonb, synced jsonb,
    OUT vals jsonb, OUT wires jsonb)
RETURNS record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    col record;
    pm d365.table_map;
    v jsonb;
    wire jsonb;
    loc jsonb;
    ids integer[];
BEGIN
    vals := '{}'; wires := '{}';
    FOR col IN SELECT * FROM d365._map_columns(map) x WHERE x.direction <> 'out' AND x.problem IS NULL LOOP
        IF NOT rec ? col.read THEN
            CONTINUE;
        END IF;
        v := rec -> col.read;
        IF v = 'null'::jsonb THEN
            wire := 'null'; loc := 'null';
        ELSIF col.kind = 'lookup' THEN
            IF NOT d365._is_guid(v #>> '{}') THEN
                RAISE EXCEPTION 'field %: % is not a GUID', col.read, v USING ERRCODE = 'invalid_text_representation';
            END IF;
            wire := to_jsonb('/' || col.bind_set || '(' || (v #>> '{}') || ')');
            IF col.parent IS NULL THEN
                loc := v;
            ELSE
                SELECT * INTO pm FROM d365.table_map t WHERE t.name = col.parent;
                EXECUTE format('SELECT pg_catalog.to_jsonb(p.%I) FROM %s p%s'
                               ' WHERE p.dynamics365_related_id OPERATOR(pg_catalog.=) $1',
                               pm.key_column, pm.local_table, d365._map_parent_join(pm.name, pm.key_column))
                   INTO loc USING (v #>> '{}')::uuid;
                IF loc IS NULL THEN
                    RAISE EXCEPTION 'field %: record % is linked to no row of map "%"', col.field, v #>> '{}', col.parent
                        USING ERRCODE = 'foreign_key_violation',
                              HINT = format('Sync map %s first, or link the row by its dynamics365_related_id.', col.parent);
                END IF;
            END IF;
        ELSIF col.kind IN ('choice', 'choice_value') THEN
            wire := v;
            IF col.kind = 'choice_value' THEN
                loc := v;
            ELSE
                SELECT to_jsonb(o ->> 'label') INTO loc FROM jsonb_array_elements(col.options) o
                 WHERE o -> 'value' = v;
                IF loc IS NULL THEN
                    RAISE EXCEPTION 'field %: % is not an option of the choice', col.field, v
                        USING ERRCODE = 'invalid_parameter_value';
                END IF;
            END IF;
        ELSIF col.kind IN ('multi', 'multi_value') THEN
            ids := ARRAY(SELECT DISTINCT trim(x)::integer FROM unnest(string_to_array(v #>> '{}', ',')) x
                          WHERE trim(x) <> '' ORDER BY 1);
            wire := to_jsonb(array_to_string(ids, ','));
            IF col.kind = 'multi_value' THEN
                loc := to_jsonb(ids);
            ELSE
                loc := (SELECT jsonb_agg(o -> 'label' ORDER BY (o ->> 'value')::integer)
                          FROM jsonb_array_elements(col.options) o
                         WHERE (o ->> 'value')::integer = ANY (ids));
                IF jsonb_array_length(coalesce(loc, '[]')) <> cardinality(ids) THEN
                    RAISE EXCEPTION 'field %: % holds a value that is not an option of the choice', col.field, v
                        USING ERRCODE = 'invalid_parameter_value';
                END IF;
            END IF;
        ELSE
            wire := v; loc := v;
        END IF;
        IF wire IS DISTINCT FROM coalesce(synced -> col.wire, 'null'::jsonb) THEN
            vals := vals || jsonb_build_object(col."column", loc);
            wires := wires || jsonb_build_object(col.wire, wire);
        END IF;
    END LOOP;
END;
$$;

/*
 * The record stage of a map's pull: one page of change-tracking rows.  A
 * changed row linked to a local row updates the columns whose field
 * changed in Dynamics since the last sync (as the table's owner,
 * d365._map_apply), and remembers the values as synced, so the next sync
 * sends nothing back.  A deleted record unlinks its row (on_remote_delete
 * 'unlink').  A row that does not fit fails alone (WARNING, last_error).
 */
CREATE FUNCTION d365._map_pull_record(page json, map text,
    OUT updated integer, OUT unchanged integer, OUT failed integer, OUT unlinked integer)
RETURNS record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map := d365._table_map(map);
    ent record := d365._map_entity(m.entity_set);
    e json;
    r jsonb;
    id uuid;
    k text;
    st d365.map_row;
    inc record;
    msg text;
    code text;
    merge boolean := EXISTS (SELECT FROM d365.column_map c WHERE c.map = m.name AND c.direction = 'both');
BEGIN
    updated := 0; unchanged := 0; failed := 0; unlinked := 0;
    -- row security is the table owner's code: never run as the role running
    -- the job (d365sync refuses such a role; docs/security.md)
    IF row_security_active(m.local_table) THEN
        RAISE EXCEPTION 'row-level security of % applies to role "%"', m.local_table, current_user
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'Its policies are code of the table''s owner: d365sync does not read the table as a role they bind.',
                  HINT = 'Run the sync as the table''s owner, or as a role with BYPASSRLS.';
    END IF;
    -- the job reads the table as the job role: for a caller that may read it
    PERFORM d365._caller_reads(m.local_table);
    PERFORM d365._map_fold_changes(m.name);
    IF page IS NULL OR json_typeof(page) <> 'array' THEN
        RAISE EXCEPTION 'a change-tracking page is not a JSON array'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR e IN SELECT json_array_elements(page) LOOP
        -- a row holding U+0000 (which jsonb cannot) fails alone
        BEGIN
            r := e::jsonb;
        EXCEPTION WHEN untranslatable_character OR invalid_text_representation THEN
            GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT;
            RAISE WARNING 'an incoming change of map "%" was not applied: %', m.name, msg
                USING ERRCODE = '01000';
            failed := failed + 1;
            CONTINUE;
        END;
        IF jsonb_typeof(r) <> 'object' THEN
            CONTINUE;
        END IF;
        IF r ->> '@odata.context' LIKE '%$deletedEntity' THEN
            IF NOT d365._is_guid(r ->> 'id') THEN
                CONTINUE;
            END IF;
            id := (r ->> 'id')::uuid;
            EXECUTE format('SELECT %I::text FROM %s WHERE dynamics365_related_id OPERATOR(pg_catalog.=) $1',
                           m.key_column, m.local_table) INTO k USING id;
            IF k IS NOT NULL AND d365._map_set_links(m.name, ARRAY[k], ARRAY[NULL::uuid], ARRAY[id]) IS NOT NULL THEN
                INSERT INTO d365.map_row AS s (map, row_key) VALUES (m.name, k)
                ON CONFLICT ON CONSTRAINT map_row_pkey DO NOTHING;
                UPDATE d365.map_row s
                   SET dynamics_id = NULL, synced = NULL, synced_seq = s.change_seq,
                       generation = s.generation + 1, remote_deleted_at = now(),
                       last_error = 'deleted in Dynamics 365 (change tracking), unlinked'
                 WHERE s.map = m.name AND s.row_key = k;
                unlinked := unlinked + 1;
                IF m.on_remote_delete = 'delete' AND NOT d365._map_remove_row(m.name, k) THEN
                    failed := failed + 1;
                END IF;
            END IF;
            CONTINUE;
        END IF;
        IF NOT d365._is_guid(r ->> ent.primary_id) THEN
            CONTINUE;
        END IF;
        id := (r ->> ent.primary_id)::uuid;
        k := NULL;
        EXECUTE format('SELECT %I::text FROM %s WHERE dynamics365_related_id OPERATOR(pg_catalog.=) $1',
                       m.key_column, m.local_table) INTO k USING id;
        IF k IS NULL THEN
            CONTINUE;       -- not linked here
        END IF;
        SELECT * INTO st FROM d365.map_row s WHERE s.map = m.name AND s.row_key = k;
        -- a link d365sync did not write is no link: nothing is copied into
        -- that row (its state names another record, or none)
        IF st.dynamics_id IS DISTINCT FROM id THEN
            CONTINUE;
        END IF;
        -- a row with local changes not sent yet is merged by the next
        -- sync, field by field (14_map_conflict.sql): its ETag stays old
        IF merge AND st.change_seq > st.synced_seq AND st.synced IS NOT NULL THEN
            unchanged := unchanged + 1;
            CONTINUE;
        END IF;
        BEGIN
            inc := d365._map_incoming(m.name, r,
                                      CASE WHEN st.dynamics_id = id THEN st.synced END);
            IF inc.vals = '{}' THEN
                UPDATE d365.map_row s SET etag = d365._etag(r ->> '@odata.etag')
                 WHERE s.map = m.name AND s.row_key = k AND s.dynamics_id = id;
                unchanged := unchanged + 1;
                CONTINUE;
            END IF;
            PERFORM d365._map_apply(m.name, inc.vals, k);
        EXCEPTION WHEN data_exception OR integrity_constraint_violation OR raise_exception
                       OR invalid_parameter_value OR with_check_option_violation THEN
            GET STACKED DIAGNOSTICS code = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
            RAISE WARNING 'incoming change of row % of map "%" was not applied: %', k, m.name, msg
                USING ERRCODE = '01000';
            UPDATE d365.map_row s
               SET last_attempt_at = now(), last_error_code = code,
                   last_error = left('incoming change not applied: ' || msg, 2000)
             WHERE s.map = m.name AND s.row_key = k;
            failed := failed + 1;
            CONTINUE;
        END;
        UPDATE d365.map_row s
           SET synced = CASE WHEN s.dynamics_id = id THEN coalesce(s.synced, '{}') ELSE '{}' END || inc.wires,
               dynamics_id = id, etag = d365._etag(r ->> '@odata.etag')
         WHERE s.map = m.name AND s.row_key = k;
        updated := updated + 1;
    END LOOP;
END;
$$;

CREATE FUNCTION d365.d365_sync(
    map text DEFAULT NULL,
    OUT map text, OUT created integer, OUT updated integer, OUT unchanged integer,
    OUT failed integer, OUT deleted integer, OUT requests integer)
RETURNS SETOF record
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_sync'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION d365.d365_sync(text) IS
    'Sends the pending local changes of one table map or of every enabled map (parents first), one row per map; the contact table is the map "contact"';

CREATE FUNCTION d365.d365_pull(
    map text DEFAULT NULL,
    OUT map text, OUT created integer, OUT updated integer, OUT unchanged integer,
    OUT failed integer, OUT deleted integer, OUT requests integer)
RETURNS SETOF record
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_pull'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION d365.d365_pull(text) IS
    'Applies the Dynamics changes (change tracking) of one table map or of every enabled map, one row per map; the contact table is the map "contact"';

-- Privileges of the table maps: nothing for PUBLIC.
REVOKE ALL ON d365.table_map, d365.column_map, d365.map_row, d365.map_change FROM PUBLIC;
REVOKE ALL ON FUNCTION d365._table_map(text), d365._map_entity(text),
       d365._map_metadata_refresh(text), d365._map_attributes(text),
       d365._map_fk_target(regclass, name), d365._map_columns(text),
       d365._map_capture(), d365._map_capture_install(regclass),
       d365.d365_map_table(text, regclass, text, name), d365.d365_unmap_table(text),
       d365.d365_map_column(text, name, text, text, boolean),
       d365._map_owner_sql(text, text, name[]), d365._map_set_links(text, text[], uuid[], uuid[]),
       d365._map_apply(text, jsonb, text), d365._map_guid(text, text, integer),
       d365._map_order(), d365._map_fold_changes(text), d365._map_out_exprs(text),
       d365._map_work_sql(text),
       d365._map_record(text[], text[], integer[], text[], text[]),
       d365._map_lookup_path(text[]),
       d365._map_lookup_resolve(text[], text[], text[], integer[], text[]),
       d365._map_pull_start_path(text), d365._map_incoming(text, jsonb, jsonb),
       d365._map_pull_record(json, text), d365.d365_sync(text), d365.d365_pull(text)
    FROM PUBLIC;

-- ---------------------------------------------------------------------------
