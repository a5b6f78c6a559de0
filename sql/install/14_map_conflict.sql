-- Conflicts of table maps.  d365sync remembers each record's ETag (from
-- the pull's pages) and sends an update with If-Match: <ETag>.  When the
-- ETag is not known (after d365sync's own update, before the next pull) or
-- Dynamics answered 412 (the record changed since), the sync reads the
-- record first (the pipeline's look-up stage: one GET per group of rows,
-- d365._map_lookup_path) and merges field by field against the values
-- last synced (d365._map_merge): a field changed on one side only flows to
-- the other; a field changed on both sides to different values is resolved
-- by the map's conflict policy (dynamics_wins, local_wins) and recorded in
-- d365.conflict.  See docs/table-maps.md.
-- ---------------------------------------------------------------------------

-- the ETag of the record as d365sync last saw it (NULL: not known)
ALTER TABLE d365.map_row ADD COLUMN etag text;

CREATE TABLE d365.conflict (
    id             bigserial PRIMARY KEY,
    map            text NOT NULL REFERENCES d365.table_map ON DELETE CASCADE,
    row_key        text NOT NULL,
    dynamics_id    uuid NOT NULL,
    "column"       name NOT NULL,
    field          text NOT NULL,
    local_value    jsonb,
    dynamics_value jsonb,
    base_value     jsonb,
    resolution     text NOT NULL
                   CONSTRAINT conflict_resolution_check CHECK (resolution IN ('dynamics_wins', 'local_wins')),
    at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX conflict_map_idx ON d365.conflict (map, at);
COMMENT ON TABLE d365.conflict IS
    'Fields of mapped rows changed both here and in Dynamics since the last sync: both values, the value before, how it was resolved';
SELECT pg_catalog.pg_extension_config_dump('d365.conflict', '');
SELECT pg_catalog.pg_extension_config_dump('d365.conflict_id_seq', '');

/*
 * An ETag from Dynamics as d365sync keeps and sends it (If-Match): a
 * quoted string of visible characters, weak or strong; anything else
 * (a line break that would add a header of its own, say) is not an ETag:
 * NULL.
 */
CREATE FUNCTION d365._etag(v text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN v ~ '^(W/)?"[!#-~]{1,255}"$' THEN v END
$$;

/*
 * The merge of one row whose record changed in Dynamics since the last
 * sync (rec: the record as read now; ctx: the row's context from
 * d365._map_work_sql, with 'values' the local values and 'synced' those
 * last synced, both as sent).  Returns the request (an update of the fields
 * to send, If-Match: the ETag just read; none when nothing is to be sent)
 * and the context d365._map_record needs: what to apply locally, the
 * record's values to remember as synced, the conflicts.
 */
CREATE FUNCTION d365._map_merge(ctx jsonb, rec jsonb, OUT requests text, OUT context text)
RETURNS record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map := d365._table_map(ctx ->> 'map');
    base jsonb := coalesce(ctx -> 'synced', '{}');
    cur jsonb := coalesce(ctx -> 'values', '{}');
    etag text := d365._etag(rec ->> '@odata.etag');
    inc record;
    col record;
    send jsonb := '{}';
    apply jsonb := '{}';
    conflicts jsonb := '[]';
    local_changed boolean;
BEGIN
    inc := d365._map_incoming(m.name, rec, base);
    FOR col IN SELECT * FROM d365._map_columns(m.name) x WHERE x.problem IS NULL LOOP
        local_changed := col.direction <> 'in' AND cur ? col.wire
                         AND (cur -> col.wire) IS DISTINCT FROM coalesce(base -> col.wire, 'null'::jsonb);
        IF col.direction = 'both' AND local_changed AND inc.wires ? col.wire THEN
            IF (cur -> col.wire) IS DISTINCT FROM (inc.wires -> col.wire) THEN
                conflicts := conflicts || jsonb_build_array(jsonb_build_object(
                    'column', col."column", 'field', col.field,
                    'local', cur -> col.wire, 'dynamics', inc.wires -> col.wire,
                    'base', base -> col.wire, 'resolution', m.conflict));
                IF m.conflict = 'local_wins' THEN
                    send := send || jsonb_build_object(col.wire, cur -> col.wire);
                ELSE
                    apply := apply || jsonb_build_object(col."column", inc.vals -> col."column");
                END IF;
            END IF;
        ELSIF local_changed THEN
            send := send || jsonb_build_object(col.wire, cur -> col.wire);
        ELSIF col.direction <> 'out' AND inc.vals ? col."column" THEN
            apply := apply || jsonb_build_object(col."column", inc.vals -> col."column");
        END IF;
    END LOOP;
    requests := CASE WHEN send = '{}' THEN '[]'
                     ELSE jsonb_build_array(jsonb_build_object(
                              'method', 'PATCH',
                              'path', m.entity_set || '(' || (ctx ->> 'id') || ')',
                              'body', send::text,
                              'headers', jsonb_build_array('If-Match: ' || coalesce(etag, '*'))))::text END;
    context := (ctx || jsonb_build_object(
                   'action', CASE WHEN send = '{}' THEN 'merged' ELSE 'update' END,
                   'sent', CASE WHEN send = '{}' THEN NULL ELSE send END,
                   'merge', true, 'apply', apply, 'remote', inc.wires,
                   'conflicts', conflicts, 'etag', etag))::text;
END;
$$;

/*
 * The look-up stage's part of a merge (d365._map_lookup_resolve, for a
 * look-up {"map", "id"}): the row's record in its group's answer (read by
 * d365._map_lookup_path with the records of the group's other rows),
 * merged (d365._map_merge).  A record not in the answer (deleted in
 * Dynamics) keeps the planned update, whose 404 unlinks the row; a record
 * that cannot be merged (a lookup to a record linked to no row here) too,
 * with a WARNING.  An answer that could not be read, or whose record may
 * be on a page not read, fails the row (tried again after its back-off).
 */
CREATE FUNCTION d365._map_preread_item(item_key text, ctx jsonb, answer jsonb, OUT requests text, OUT context text)
RETURNS record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ent record := d365._map_entity((d365._table_map(ctx ->> 'map')).entity_set);
    rec jsonb;
    mg record;
    msg text;
BEGIN
    requests := NULL;
    context := ctx::text;
    SELECT v INTO rec
      FROM jsonb_array_elements(CASE WHEN jsonb_typeof(answer -> 'value') = 'array'
                                     THEN answer -> 'value' ELSE '[]' END) v
     WHERE v ->> ent.primary_id = ctx ->> 'id'
     LIMIT 1;
    IF rec IS NULL THEN
        IF answer ? '@d365sync.unreadable' OR answer ? '@odata.nextLink'
           OR jsonb_typeof(answer -> 'value') IS DISTINCT FROM 'array' THEN
            requests := '[]';
            context := (ctx || jsonb_build_object('sent', NULL, 'error',
                           'its record could not be read before the update: '
                           || coalesce(answer ->> '@d365sync.unreadable',
                                       'the answer held more than one page')))::text;
        END IF;
        RETURN;
    END IF;
    BEGIN
        mg := d365._map_merge(ctx, rec);
        requests := mg.requests;
        context := mg.context;
    EXCEPTION WHEN data_exception OR integrity_constraint_violation OR raise_exception
                   OR invalid_parameter_value THEN
        GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT;
        RAISE WARNING 'row % of map "%" could not be merged with its record: %; sent as it is',
                      item_key, ctx ->> 'map', msg
            USING ERRCODE = '01000';
    END;
END;
$$;

/*
 * The record stage's part of a merge (d365._map_record): for the merged
 * rows that went through, apply what Dynamics changed locally (as the
 * table's owner), remember the record's values and ETag as synced, and
 * record the conflicts.  A local apply that fails, for whatever reason (a
 * value that does not fit the column, the owner's trigger refusing it),
 * fails that row alone: a WARNING, its error and a back-off, no conflict
 * recorded yet (the values stay unsynced, so the next pull or sync tries
 * again).  Returns the keys of those rows.
 */
CREATE FUNCTION d365._map_record_merges(mname text, item_keys text[], contexts text[],
                                        statuses integer[], error_messages text[])
RETURNS text[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    x record;
    msg text;
    code text;
    failed text[] := '{}';
BEGIN
    FOR x IN SELECT o.k, o.ctx::jsonb AS c
               FROM unnest(item_keys, contexts, statuses, error_messages) AS o(k, ctx, st, msg)
              WHERE o.ctx::jsonb ? 'merge' AND o.msg IS NULL
                AND (o.st IS NULL OR o.st BETWEEN 200 AND 299) LOOP
        BEGIN
            IF x.c -> 'apply' <> '{}' THEN
                PERFORM d365._map_apply(mname, x.c -> 'apply', x.k);
            END IF;
            INSERT INTO d365.conflict (map, row_key, dynamics_id, "column", field,
                                       local_value, dynamics_value, base_value, resolution)
            SELECT mname, x.k, (x.c ->> 'id')::uuid, (f ->> 'column')::name, f ->> 'field',
                   f -> 'local', f -> 'dynamics', f -> 'base', f ->> 'resolution'
              FROM jsonb_array_elements(x.c -> 'conflicts') f;
            UPDATE d365.map_row r
               SET synced = coalesce(r.synced, '{}') || coalesce(x.c -> 'remote', '{}')
                            || coalesce(nullif(x.c -> 'sent', 'null'), '{}'),
                   dynamics_id = (x.c ->> 'id')::uuid,
                   synced_seq = (x.c ->> 'seq')::bigint,
                   etag = CASE WHEN x.c ->> 'action' = 'merged' THEN x.c ->> 'etag' END,
                   attempts = 0, next_attempt_at = NULL, last_attempt_at = now(),
                   last_error_code = NULL, last_error = NULL
             WHERE r.map = mname AND r.row_key = x.k;
        EXCEPTION WHEN OTHERS THEN
            -- OTHERS leaves out query_canceled: a cancel still ends the run
            GET STACKED DIAGNOSTICS code = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
            RAISE WARNING 'the Dynamics changes of row % of map "%" were not applied: %', x.k, mname, msg
                USING ERRCODE = '01000';
            UPDATE d365.map_row r
               SET attempts = r.attempts + 1, next_attempt_at = d365._next_attempt(r.attempts + 1),
                   last_attempt_at = now(), last_error_code = code, etag = NULL,
                   last_error = left('Dynamics changes not applied: ' || msg, 2000)
             WHERE r.map = mname AND r.row_key = x.k;
            failed := failed || x.k;
        END;
    END LOOP;
    RETURN failed;
END;
$$;

REVOKE ALL ON d365.conflict FROM PUBLIC;
REVOKE ALL ON FUNCTION d365._map_own_write(regclass), d365._etag(text), d365._map_merge(jsonb, jsonb),
       d365._map_preread_item(text, jsonb, jsonb),
       d365._map_record_merges(text, text[], text[], integer[], text[])
    FROM PUBLIC;
