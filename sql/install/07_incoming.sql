-- Incoming changes: Dynamics rows mapped back onto contacts (push payloads
-- and the change-tracking pull), without echo.
-- ---------------------------------------------------------------------------

/*
 * The mapped fields that incoming changes write (direction both or in; an
 * 'out' field is never written locally), as Dynamics returns them on read:
 * a plain attribute under its logical name, a lookup as _<attribute>_value.
 */
CREATE FUNCTION d365._incoming_fields(
    OUT column_name name, OUT dynamics_field text, OUT read_name text,
    OUT typ regtype, OUT is_bind boolean)
RETURNS SETOF record
-- PL/pgSQL, not SQL: its query is planned once per session, not at every call
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN QUERY
    SELECT f.column_name, f.dynamics_field,
           CASE WHEN b.attribute IS NOT NULL THEN '_' || b.attribute || '_value'
                ELSE f.dynamics_field END,
           a.atttypid::regtype, b.attribute IS NOT NULL
      FROM d365.field_map f
      JOIN d365.contact_source s ON true
      JOIN pg_attribute a ON a.attrelid = s.contact_table AND a.attname = f.column_name
                         AND a.attnum > 0 AND NOT a.attisdropped
      LEFT JOIN d365._lookup_binds() b ON b.dynamics_field = f.dynamics_field
     WHERE f.direction <> 'out'
     ORDER BY f.column_name;
END;
$$;

/*
 * The local values of the contact row "c" as incoming changes compare and
 * settle them: every mapped column, 'in' fields included (the outgoing map
 * stage, d365._contact_values_expr, leaves those out).
 */
CREATE FUNCTION d365._contact_incoming_values_expr()
RETURNS text
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT d365._values_expr('c', NULL) $$;

-- The columns mapped with direction 'out': incoming changes never write them.
CREATE FUNCTION d365._outgoing_only_columns()
RETURNS text[]
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT coalesce(array_agg(column_name::text), '{}') FROM d365.field_map WHERE direction = 'out' $$;

-- The incoming mapper of the settings (the caller cannot read the settings).
CREATE FUNCTION d365._incoming_mapper()
RETURNS regprocedure
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT incoming_mapper FROM d365.settings $$;

/*
 * The synced snapshot of one contact: returned when settle is NULL, else
 * settle's fields are recorded as synced.  A gate for callers without
 * rights on d365's tables: it requires the right to update the attached
 * contact table, then reads or writes d365.contact_state as its owner.
 */
CREATE FUNCTION d365._contact_snapshot(contact_key text, settle jsonb)
RETURNS jsonb
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_contact_snapshot'
LANGUAGE C VOLATILE;

/*
 * A Dynamics JSON value made ready for its column's input function: the
 * webhook date form /Date(ms)/ and a timestamp with a zone become UTC, a
 * lookup bind path its uuid, a date-time for a date column its UTC date.
 * No type conversion happens here (d365._contact_convert does it as the
 * table's owner); raises 22P02 naming the field for a JSON object or array.
 */
CREATE FUNCTION d365._incoming_value(val jsonb, typ regtype, field text, column_name name)
RETURNS jsonb
SET search_path = pg_catalog, pg_temp
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    txt text;
    base regtype := (SELECT coalesce(nullif(t.typbasetype, 0), t.oid)::regtype FROM pg_type t WHERE t.oid = typ);
BEGIN
    IF val IS NULL OR jsonb_typeof(val) = 'null' THEN
        RETURN 'null'::jsonb;
    END IF;
    IF jsonb_typeof(val) IN ('object', 'array') THEN
        RAISE EXCEPTION 'Dynamics field "%" holds a JSON %, not a value for column "%"',
                        field, jsonb_typeof(val), column_name
            USING ERRCODE = 'invalid_text_representation';
    END IF;
    IF jsonb_typeof(val) <> 'string' THEN
        RETURN val;
    END IF;
    txt := val #>> '{}';
    IF txt ~ '^/Date\(-?\d+([+-]\d{4})?\)/$' THEN
        txt := to_char(to_timestamp(substring(txt FROM '-?\d+')::numeric / 1000) AT TIME ZONE 'UTC',
                       'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"');
    END IF;
    IF d365._bind_guid(txt) IS NOT NULL THEN
        txt := d365._bind_guid(txt);
    END IF;
    IF base IN ('date'::regtype, 'timestamp without time zone'::regtype)
       AND txt ~ '^\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d(:?\d\d)?)$' THEN
        BEGIN
            txt := to_char(timezone('UTC', txt::timestamptz),
                           CASE WHEN base = 'date'::regtype THEN 'YYYY-MM-DD'
                                ELSE 'YYYY-MM-DD"T"HH24:MI:SS.US' END);
        EXCEPTION WHEN data_exception THEN
            NULL;           -- left as it is: the column's input function says why
        END;
    END IF;
    RETURN to_jsonb(txt);
END;
$$;

/*
 * Incoming values {column: JSON value} as their columns would hold them,
 * {dynamics_field: value} (d365._contact_convert, as the table's owner).
 * A value that does not fit fails with an error naming the Dynamics field
 * and the column, with the SQLSTATE of the conversion.  names holds
 * {column: [dynamics field, type]}.
 */
CREATE FUNCTION d365._incoming_convert(vals jsonb, names jsonb)
RETURNS jsonb
SET search_path = pg_catalog, pg_temp
LANGUAGE plpgsql
AS $$
DECLARE
    col text;
    code text;
    msg text;
BEGIN
    RETURN d365._contact_convert(vals);
EXCEPTION WHEN data_exception OR integrity_constraint_violation THEN
    -- find the value that does not fit
    FOR col IN SELECT jsonb_object_keys(vals) ORDER BY 1 LOOP
        BEGIN
            PERFORM d365._contact_convert(jsonb_build_object(col, vals -> col));
        EXCEPTION WHEN data_exception OR integrity_constraint_violation THEN
            GET STACKED DIAGNOSTICS code = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
            RAISE EXCEPTION 'value of Dynamics field "%" does not fit column "%" of type %',
                            names -> col ->> 0, col, names -> col ->> 1
                USING ERRCODE = code,
                      DETAIL = format('The value was %s: %s.', vals -> col, msg),
                      HINT = 'Fix the value in Dynamics, or the column or its mapping in d365.field_map.';
        END;
    END LOOP;
    RAISE;
END;
$$;

/*
 * The map stage of contacts, incoming, for one Dynamics row: finds the
 * linked contact, computes what to change and applies it.  A column changes
 * when the row has its field, the value (as the column would hold it)
 * differs from the local one, and Dynamics changed it since the last sync
 * (the value differs from the synced snapshot) -- so a local edit not yet
 * sent is not overwritten by the old Dynamics value.  A null clears the
 * column.  d365.settings.incoming_mapper replaces the computation.  The new
 * values are then recorded as synced, as the columns hold them (a value the
 * column rounded is not sent back).
 *
 * Returns {column: new value}, '{}' when nothing differed, NULL when no
 * contact is linked to the row (a link column holding the id counts only
 * when d365sync linked that contact to it).  It runs with its caller's rights and reads
 * the contact table with built-in conversions only; the conversions into the
 * columns' types, the incoming mapper and the update run as the table's
 * owner in a security-restricted operation (d365._contact_convert,
 * _contact_map, _contact_apply), which first check that the caller may
 * update the columns.  d365's tables are reached through owner-run helpers
 * that run no user code.  check_privileges: explain a missing right before
 * trying.
 */
CREATE FUNCTION d365._incoming_apply(payload jsonb, check_privileges boolean)
RETURNS jsonb
SET search_path = pg_catalog, pg_temp
LANGUAGE plpgsql
AS $$
DECLARE
    src d365.contact_source;
    cid uuid;
    k text;
    cur jsonb;
    snap jsonb;
    mapper regprocedure := d365._incoming_mapper();
    mapping jsonb := '{}';
    vals jsonb := '{}';
    names jsonb := '{}';
    fields jsonb := '{}';
    conv jsonb := '{}';
    settled text[] := '{}';
    changes jsonb := '{}';
    lookups jsonb;
    fkvals jsonb := '{}';
    fkwires jsonb := '{}';
    fkcmp jsonb := '{}';
    lk record;
    pkey text;
    f record;
    col text;
    code text;
    msg text;
BEGIN
    IF payload IS NULL OR jsonb_typeof(payload) <> 'object' THEN
        RAISE EXCEPTION 'the payload is not a JSON object'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass the Dynamics contact row, e.g. the body of Power Automate''s "When a row is added, modified or deleted" trigger.';
    END IF;
    IF NOT payload ? 'contactid' OR jsonb_typeof(payload -> 'contactid') <> 'string' THEN
        RAISE EXCEPTION 'the payload has no contactid'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'A Dynamics contact row always carries its contactid.',
                  HINT = 'Pass the whole contact row as Dynamics sends it.';
    END IF;
    IF NOT d365._is_guid(payload ->> 'contactid') THEN
        RAISE EXCEPTION 'contactid % is not a GUID', payload -> 'contactid'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    cid := payload ->> 'contactid';
    src := d365._contact_source();

    IF check_privileges AND NOT (has_any_column_privilege(d365._job_caller(), src.contact_table, 'UPDATE')
                                 AND has_any_column_privilege(d365._job_caller(), src.contact_table, 'SELECT')) THEN
        RAISE EXCEPTION 'permission denied for table %', src.contact_table
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'd365_update_contact() reads and changes contacts with its caller''s rights.',
                  HINT = format('GRANT SELECT, UPDATE ON %s TO %s;', src.contact_table, d365._job_caller()::regrole);
    END IF;
    -- the table is read as the job role: for a caller that may read every
    -- row of it (no row-level security binds it) and the columns mapped
    IF check_privileges THEN
        PERFORM d365._caller_reads(src.contact_table);
    END IF;

    EXECUTE format('SELECT c.%I::text, %s FROM %s c WHERE c.dynamics365_related_id = $1',
                   src.key_column, d365._contact_incoming_values_expr(), src.contact_table)
       INTO k, cur USING cid;
    -- a link d365sync did not write is no link: nothing is copied into
    -- that row (see d365._contact_untrusted_sql)
    IF k IS NULL OR NOT d365._contact_link_trusted(k, cid) THEN
        RETURN NULL;
    END IF;
    snap := d365._contact_snapshot(k, NULL);

    FOR f IN SELECT i.*, a.attgenerated <> '' AS generated,
                    format_type(a.atttypid, a.atttypmod) AS type_name
               FROM d365._incoming_fields() i
               JOIN pg_attribute a ON a.attrelid = src.contact_table AND a.attname = i.column_name LOOP
        mapping := mapping || jsonb_build_object(f.column_name, f.dynamics_field);
        IF NOT payload ? f.read_name THEN
            CONTINUE;       -- not in the row: not changed, not cleared
        END IF;
        -- lookups to mapped tables (a foreign key to the parent's key): their
        -- record becomes the key of the parent row linked to it, compared
        -- with what the contact binds as the bind path (d365._values_expr)
        IF f.is_bind AND lookups IS NULL THEN
            SELECT coalesce(jsonb_object_agg(l.column_name, jsonb_build_array(l.parent, l.bind_set)), '{}')
              INTO lookups FROM d365._contact_lookups() l;
        END IF;
        IF f.is_bind AND lookups ? f.column_name THEN
            pkey := NULL;
            IF jsonb_typeof(payload -> f.read_name) IS DISTINCT FROM 'null' THEN
                IF NOT d365._is_guid(payload ->> f.read_name) THEN
                    RAISE EXCEPTION 'Dynamics field "%" holds %, not a GUID', f.read_name, payload -> f.read_name
                        USING ERRCODE = 'invalid_text_representation';
                END IF;
                pkey := d365._map_parent_key(lookups -> f.column_name ->> 0, (payload ->> f.read_name)::uuid);
                fkwires := fkwires || jsonb_build_object(f.dynamics_field,
                               '/' || (lookups -> f.column_name ->> 1) || '(' || lower(payload ->> f.read_name) || ')');
            ELSE
                fkwires := fkwires || jsonb_build_object(f.dynamics_field, 'null'::jsonb);
            END IF;
            -- the parent's key, or {"record": id} while no row is linked to it
            fkvals := fkvals || jsonb_build_object(f.column_name,
                          CASE WHEN pkey IS NOT NULL AND f.typ IN ('smallint'::regtype, 'integer'::regtype, 'bigint'::regtype)
                               THEN to_jsonb(pkey::bigint)
                               WHEN pkey IS NOT NULL OR jsonb_typeof(payload -> f.read_name) = 'null'
                               THEN to_jsonb(pkey)
                               ELSE jsonb_build_object('record', payload -> f.read_name) END);
            fkcmp := fkcmp || jsonb_build_object(f.column_name, fkwires -> f.dynamics_field);
            names := names || jsonb_build_object(f.column_name,
                        jsonb_build_array(f.read_name, f.type_name, f.generated));
            fields := fields || jsonb_build_object(f.dynamics_field, f.column_name);
            CONTINUE;
        END IF;
        vals := vals || jsonb_build_object(f.column_name,
                    d365._incoming_value(payload -> f.read_name, f.typ, f.read_name, f.column_name));
        names := names || jsonb_build_object(f.column_name,
                    jsonb_build_array(f.read_name, f.type_name, f.generated));
        fields := fields || jsonb_build_object(f.dynamics_field, f.column_name);
    END LOOP;
    -- nothing differs: every value Dynamics sent is, as sent, what the
    -- column holds and what was last synced (most rows of a pull); no
    -- conversion, no update, nothing to settle
    IF mapper IS NULL AND snap IS NOT NULL
       AND NOT EXISTS (SELECT FROM jsonb_each(fields) e
                        WHERE ((CASE WHEN fkcmp = '{}' THEN vals ELSE vals || fkcmp END) -> (e.value #>> '{}'))
                              IS DISTINCT FROM (cur -> e.key)
                           OR (snap -> e.key) IS DISTINCT FROM (cur -> e.key)) THEN
        RETURN '{}';
    END IF;
    IF vals <> '{}' THEN
        conv := d365._incoming_convert(vals, names);
    END IF;
    -- a lookup as the column would bind it: the record Dynamics sent
    conv := conv || fkwires;
    vals := vals || fkvals;

    IF mapper IS NULL THEN
        FOR f IN SELECT e.key AS field, e.value #>> '{}' AS col FROM jsonb_each(fields) e LOOP
            IF snap ? f.field AND snap -> f.field = conv -> f.field THEN
                CONTINUE;   -- Dynamics still has what was last synced
            END IF;
            IF (conv -> f.field) IS DISTINCT FROM coalesce(cur -> f.field, 'null'::jsonb) THEN
                IF (names -> f.col ->> 2)::boolean THEN
                    RAISE EXCEPTION 'Dynamics field "%" cannot be written to column "%"',
                                    names -> f.col ->> 0, f.col
                        USING ERRCODE = 'generated_always',
                              DETAIL = format('Column "%s" is a generated column.', f.col),
                              HINT = 'A generated column can only be sent to Dynamics, never written from it.';
                END IF;
                IF jsonb_typeof(vals -> f.col) = 'object' THEN
                    RAISE EXCEPTION 'Dynamics field "%": record % is linked to no row of map "%"',
                                    names -> f.col ->> 0, vals -> f.col ->> 'record', lookups -> f.col ->> 0
                        USING ERRCODE = 'foreign_key_violation',
                              DETAIL = 'The lookup names a Dynamics 365 record that d365sync has not linked to a local row.',
                              HINT = format('Sync map %s first (d365_sync() sends the parents first), or link the row by its dynamics365_related_id.',
                                            lookups -> f.col ->> 0);
                END IF;
                changes := changes || jsonb_build_object(f.col, vals -> f.col);
            END IF;
        END LOOP;
    ELSE
        changes := d365._contact_map(payload, mapping, k);
        IF changes IS NULL OR jsonb_typeof(changes) <> 'object' THEN
            changes := '{}';
        END IF;
        FOR col IN SELECT jsonb_object_keys(changes) LOOP
            IF col IN (src.key_column, 'dynamics365_related_id', 'dynamics365_synchronized_on')
               OR NOT EXISTS (SELECT FROM pg_attribute a
                               WHERE a.attrelid = src.contact_table AND a.attname = col
                                 AND a.attnum > 0 AND NOT a.attisdropped) THEN
                RAISE EXCEPTION 'incoming mapper % returned column "%", which cannot be updated', mapper, col
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'The mapper returns {column: value} for columns of the contact table other than its key and link columns.';
            END IF;
        END LOOP;
        -- a column mapped 'out' is never written by incoming changes
        changes := changes - d365._outgoing_only_columns();
    END IF;

    IF changes <> '{}' THEN
        IF check_privileges THEN
            FOR col IN SELECT jsonb_object_keys(changes) LOOP
                IF NOT has_column_privilege(d365._job_caller(), src.contact_table, col, 'UPDATE') THEN
                    RAISE EXCEPTION 'permission denied to update column "%" of %', col, src.contact_table
                        USING ERRCODE = 'insufficient_privilege',
                              DETAIL = 'd365_update_contact() changes contacts only where its caller may.',
                              HINT = format('GRANT UPDATE ON %s TO %s;', src.contact_table, d365._job_caller()::regrole);
                END IF;
            END LOOP;
        END IF;
        BEGIN
            PERFORM d365._contact_apply(changes, k);
        EXCEPTION WHEN lock_not_available THEN
            RAISE EXCEPTION 'contact % is locked by another transaction: its incoming change was not applied', k
                USING ERRCODE = 'lock_not_available',
                      DETAIL = 'An incoming change waits at most 10 seconds (or the session''s lock_timeout) for a row another transaction holds.',
                      HINT = 'A pull that fails so starts again from the same changes next time; a push can be sent again.';
        WHEN data_exception OR integrity_constraint_violation OR generated_always THEN
            GET STACKED DIAGNOSTICS code = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
            RAISE EXCEPTION 'contact % refused the change of column(s) %', k,
                            (SELECT string_agg(format('"%s"', c), ', ' ORDER BY c) FROM jsonb_object_keys(changes) c)
                USING ERRCODE = code,
                      DETAIL = format('%s.', msg),
                      HINT = 'A constraint, trigger or generated column of the contact table refused the value.';
        END;
    END IF;

    -- Echo suppression: a field whose column now holds the value Dynamics
    -- sent (as the column holds it) or that the mapper set is recorded as
    -- synced with the column's value, so the next outgoing run does not
    -- send it back.  Other fields keep their snapshot: a local change not
    -- yet sent still goes out.
    IF fields <> '{}' THEN
        -- the row found above, by its link (the link column's unique index;
        -- the key as text would read the whole table)
        EXECUTE format('SELECT %s FROM %s c WHERE c.dynamics365_related_id = $1',
                       d365._contact_incoming_values_expr(), src.contact_table)
           INTO cur USING cid;
        SELECT coalesce(array_agg(e.key), '{}') INTO settled
          FROM jsonb_each(fields) e
         WHERE (mapper IS NOT NULL AND changes ? (e.value #>> '{}'))
            OR coalesce(cur -> e.key, 'null'::jsonb) = coalesce(conv -> e.key, 'null'::jsonb);
        IF settled <> '{}' THEN
            PERFORM d365._contact_snapshot(k, (SELECT jsonb_object_agg(e.key, e.value)
                                                 FROM jsonb_each(cur) e
                                                WHERE e.key = ANY (settled)));
        END IF;
    END IF;
    RETURN changes;
END;
$$;

-- d365._incoming_apply(payload, true) as the job role (src/common/job_role.c)
CREATE FUNCTION d365.d365_update_contact(payload jsonb)
RETURNS jsonb
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_update_contact'
LANGUAGE C;
COMMENT ON FUNCTION d365.d365_update_contact(jsonb) IS
    'Applies a Dynamics contact row (a Power Automate payload) to the linked local contact; returns {column: new value}';

-- Change tracking state of the pull (one row per entity).
CREATE TABLE d365.pull_state (
    entity       text PRIMARY KEY,
    delta_link   text,
    baseline_at  timestamptz,
    last_pull_at timestamptz
);
COMMENT ON TABLE d365.pull_state IS
    'Dataverse change tracking: the delta link the next d365_pull_changes() continues from';
SELECT pg_catalog.pg_extension_config_dump('d365.pull_state', '');

-- The first request of a full read with change tracking.
CREATE FUNCTION d365._pull_start_path()
RETURNS text
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT 'contacts?$select=' ||
           string_agg(DISTINCT read_name, ',' ORDER BY read_name) FILTER (WHERE read_name IS NOT NULL) ||
           CASE WHEN count(read_name) > 0 THEN ',' ELSE '' END || 'contactid'
      FROM d365._incoming_fields()
$$;

/*
 * The record stage of a pull: one page of change-tracking rows, as json (a
 * row may hold what jsonb cannot: U+0000).  Changed rows of linked contacts
 * are applied as d365_update_contact() would; a $deletedEntity entry
 * unlinks its contact (reported, re-created only if it qualifies again).
 * A row that does not fit -- a string holding U+0000, a value its column
 * cannot hold, a constraint, trigger or generated column of the contact
 * table refusing it -- fails alone: a WARNING names the field and column,
 * the contact's d365.contact_state.last_error keeps the reason, it is
 * counted as failed, and the rest of the page (and the pull) goes on.
 * Other errors (rights, a missing table) stop the pull.
 */
CREATE FUNCTION d365._pull_record(page json,
    OUT updated integer, OUT unchanged integer, OUT failed integer, OUT unlinked integer)
RETURNS record
SET search_path = pg_catalog, pg_temp
LANGUAGE plpgsql
AS $$
DECLARE
    src d365.contact_source := d365._contact_source();
    e json;
    r jsonb;
    cid text;
    changed jsonb;
    k text;
    code text;
    msg text;
    detail text;
    fast_handled bigint[];
    fast_updated integer;
    fast_unchanged integer;
BEGIN
    updated := 0; unchanged := 0; failed := 0; unlinked := 0;
    -- row security is the table owner's code: never run as the role running
    -- the job (d365sync refuses such a role; docs/security.md)
    IF row_security_active(src.contact_table) THEN
        RAISE EXCEPTION 'row-level security of % applies to role "%"', src.contact_table, current_user
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'Its policies are code of the table''s owner: d365sync does not read the table as a role they bind.',
                  HINT = 'Run the sync as the table''s owner, or as a role with BYPASSRLS.';
    END IF;
    -- the job reads the table as the job role: for a caller that may read it
    PERFORM d365._caller_reads(src.contact_table);
    IF page IS NULL OR json_typeof(page) <> 'array' THEN
        RAISE EXCEPTION 'a change-tracking page is not a JSON array'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- the changed rows as a set (d365._incoming_apply_page); should any
    -- of them fail, the page is applied row by row below, where a row
    -- fails alone
    BEGIN
        SELECT p.handled, p.updated, p.unchanged INTO fast_handled, fast_updated, fast_unchanged
          FROM d365._incoming_apply_page(page) p;
    EXCEPTION WHEN data_exception OR integrity_constraint_violation OR generated_always
                   OR raise_exception OR with_check_option_violation OR lock_not_available THEN
        fast_handled := NULL;
    END;
    IF fast_handled IS NOT NULL THEN
        updated := fast_updated;
        unchanged := fast_unchanged;
    END IF;
    FOR e IN SELECT x.v FROM json_array_elements(page) WITH ORDINALITY x(v, n)
              WHERE fast_handled IS NULL OR x.n <> ALL (fast_handled) LOOP
        -- the contactid as sent, read from the text (json's operators would
        -- unescape every string of the row, U+0000 included, and fail)
        cid := CASE WHEN json_typeof(e) = 'object'
                    THEN substring(e::text FROM '"contactid"\s*:\s*"([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"') END;
        r := NULL;
        BEGIN
            r := e::jsonb;
            IF jsonb_typeof(r) = 'object' AND r ->> '@odata.context' LIKE '%$deletedEntity' THEN
                k := NULL;
                IF d365._is_guid(r ->> 'id') THEN
                    k := d365._contact_unlink((r ->> 'id')::uuid);
                END IF;
                -- (a link d365sync did not write is cleared, and that is all)
                IF k IS NOT NULL AND d365._contact_link_trusted(k, (r ->> 'id')::uuid) THEN
                    PERFORM d365._contact_remote_deleted(ARRAY[k], ARRAY[NULL::integer], ARRAY[NULL::text],
                                ARRAY['deleted in Dynamics 365 (change tracking), unlinked']);
                    unlinked := unlinked + 1;
                END IF;
                CONTINUE;
            END IF;
            changed := d365._incoming_apply(r, false);
        EXCEPTION WHEN data_exception OR integrity_constraint_violation OR generated_always
                       OR raise_exception OR with_check_option_violation THEN
            GET STACKED DIAGNOSTICS code = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, detail = PG_EXCEPTION_DETAIL;
            IF r IS NULL THEN
                -- jsonb holds no U+0000 (nor does any text column)
                msg := 'a value of the Dynamics 365 row holds a character PostgreSQL cannot store';
                detail := CASE WHEN code = '22P05'
                               THEN 'A string holds U+0000 (a NUL character); the row was refused as a whole.'
                               ELSE detail END;
            END IF;
            k := NULL;
            IF cid IS NOT NULL THEN
                EXECUTE format('SELECT %I::text FROM %s WHERE dynamics365_related_id = $1',
                               src.key_column, src.contact_table)
                   INTO k USING cid::uuid;
                IF k IS NOT NULL AND NOT d365._contact_link_trusted(k, cid::uuid) THEN
                    k := NULL;
                END IF;
            END IF;
            RAISE WARNING 'incoming change of contact % was not applied: %',
                          coalesce(k, format('(Dynamics id %s)', coalesce(cid, 'unknown'))), msg
                USING ERRCODE = '01000', DETAIL = coalesce(detail, '');
            IF k IS NOT NULL THEN
                UPDATE d365.contact_state
                   SET last_attempt_at = now(), last_error_code = code,
                       last_error = left('incoming change not applied: ' || msg
                                         || coalesce('. ' || nullif(detail, ''), ''), 2000)
                 WHERE contact_key = k;
            END IF;
            failed := failed + 1;
            CONTINUE;
        END;
        IF changed IS NULL THEN
            CONTINUE;       -- not linked here
        ELSIF changed = '{}' THEN
            unchanged := unchanged + 1;
        ELSE
            updated := updated + 1;
        END IF;
    END LOOP;
END;
$$;

CREATE FUNCTION d365.d365_pull_changes(
    OUT updated integer, OUT unchanged integer, OUT failed integer,
    OUT unlinked integer, OUT requests integer)
RETURNS record
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_pull_changes'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION d365.d365_pull_changes() IS
    'Pulls contact changes from Dynamics with change tracking (delta links) and applies them; needs no inbound port';

/*
 * The set form of d365._contact_convert and d365._contact_apply, for a
 * page of the pull (src/privilege/table_owner.c, d365._owner_sql's convert_set and
 * apply_set): one conversion and one UPDATE per set of columns written,
 * as the table's owner in a security-restricted operation, with the same
 * checks of the caller's rights.
 */
CREATE FUNCTION d365._contact_convert_set(columns name[], vals jsonb)
RETURNS jsonb
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_contact_convert_set'
LANGUAGE C VOLATILE;

CREATE FUNCTION d365._contact_apply_set(columns name[], changes jsonb)
RETURNS void
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_contact_apply_set'
LANGUAGE C VOLATILE;

/*
 * A page of the pull applied as a set: what d365._incoming_apply does for
 * each changed row (no incoming mapper), in a few statements for the page
 * -- one read of the linked contacts, one conversion, one UPDATE per set
 * of columns written, one re-read and one write of the snapshots.  Every
 * outcome is the one the rows would have one by one.  handled: the
 * ordinals (1-based) of the page's rows it applied (changed rows, linked
 * or not); it leaves to the caller the deletions and the rows that are no
 * object with a GUID contactid, hold U+0000 or share their id with
 * another row of the page (each touches other contacts than those it
 * applies).  handled is NULL, and nothing was done, when an incoming
 * mapper is set or a field is a lookup (bound with @odata.bind).  Any error of a row (a value that does not fit, U+0000, a generated
 * column, a constraint or trigger) raises: the caller rolls the page back
 * and applies it row by row, so that the row fails alone.  Its caller
 * reads and writes d365.contact_state itself (the pull's runner);
 * the rights d365._contact_snapshot would check are checked here.
 */
CREATE FUNCTION d365._incoming_apply_page(page json,
    OUT handled bigint[], OUT updated integer, OUT unchanged integer)
RETURNS record
SET search_path = pg_catalog, pg_temp
LANGUAGE plpgsql
AS $$
DECLARE
    src d365.contact_source := d365._contact_source();
    rows jsonb;
    flds jsonb;
    work jsonb;
    pend jsonb;
    cols name[];
    conv jsonb;
    grp record;
    cur jsonb;
    n_gen integer;
BEGIN
    updated := 0; unchanged := 0;
    -- an incoming mapper, and a lookup (a bound field: d365._incoming_apply
    -- resolves it per row), keep the row-by-row way
    IF d365._incoming_mapper() IS NOT NULL
       OR EXISTS (SELECT FROM d365._incoming_fields() i WHERE i.is_bind) THEN
        RETURN;
    END IF;
    -- the rows it takes: objects with a GUID contactid, no deletion, whose
    -- id comes once in the page (the deletions' ids and those of rows it
    -- leaves counted too) and that hold no U+0000 (the escape \u0000 in
    -- the text: jsonb cannot hold it); the others are left to the caller
    SELECT coalesce(jsonb_agg(jsonb_build_object('n', x.n, 'cid', x.id, 'r', x.r)) FILTER (WHERE x.take), '[]'),
           coalesce(array_agg(x.n) FILTER (WHERE x.take), '{}')
      INTO rows, handled
      FROM (SELECT y.*, y.r IS NOT NULL AND NOT y.del AND y.id IS NOT NULL
                        AND count(*) OVER (PARTITION BY y.id) = 1 AS take
              FROM (SELECT z.n, z.r, z.del,
                           CASE WHEN z.r IS NULL
                                THEN substring(z.t FROM '"contactid"\s*:\s*"([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"')::uuid
                                -- (d365._is_guid's test, written out: a call per row costs)
                                WHEN z.del AND (z.r ->> 'id') ~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'
                                THEN (z.r ->> 'id')::uuid
                                WHEN NOT z.del AND jsonb_typeof(z.r -> 'contactid') = 'string'
                                     AND (z.r ->> 'contactid') ~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'
                                THEN (z.r ->> 'contactid')::uuid END AS id
                      FROM (SELECT e.n, e.v::text AS t, j.r,
                                   coalesce(j.r ->> '@odata.context' LIKE '%$deletedEntity', false) AS del
                              FROM json_array_elements(page) WITH ORDINALITY e(v, n),
                                   LATERAL (SELECT CASE WHEN json_typeof(e.v) = 'object'
                                                         AND strpos(e.v::text, '\u0000') = 0
                                                        THEN e.v::jsonb END AS r) j) z) y) x;
    IF rows = '[]' THEN
        RETURN;
    END IF;

    -- the incoming fields, once for the page
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'col', i.column_name, 'field', i.dynamics_field, 'read', i.read_name,
               'typ', i.typ::oid, 'gen', a.attgenerated <> '',
               -- a value d365._incoming_value returns as it is: a number or
               -- boolean, or a string not starting with / for a column
               -- that is no date or timestamp
               'plain', coalesce(nullif(t.typbasetype, 0), t.oid)
                        NOT IN ('date'::regtype, 'timestamp without time zone'::regtype))), '[]')
      INTO flds
      FROM d365._incoming_fields() i
      JOIN pg_attribute a ON a.attrelid = src.contact_table AND a.attname = i.column_name
      JOIN pg_type t ON t.oid = a.atttypid;

    -- the linked contacts (a link d365sync did not write is no link), with
    -- their local values and snapshots; the rights of the snapshot's gate
    IF NOT (has_column_privilege(d365._job_caller(), src.contact_table, src.key_column, 'SELECT')
            AND NOT EXISTS (SELECT FROM d365.field_map f
                             WHERE NOT has_column_privilege(d365._job_caller(), src.contact_table, f.column_name, 'SELECT'))) THEN
        RAISE EXCEPTION 'the snapshot''s rights are checked row by row' USING ERRCODE = 'P0001';
    END IF;
    EXECUTE format($q$
        SELECT jsonb_agg(jsonb_build_object('n', x.n, 'cid', x.cid, 'k', c.%1$I::text,
                                            'cur', %2$s, 'snap', s.synced, 'r', x.r))
          FROM pg_catalog.jsonb_to_recordset($1) AS x(n bigint, cid uuid, r jsonb)
          JOIN %3$s c ON c.dynamics365_related_id = x.cid
          JOIN d365.contact_state s ON s.contact_key = c.%1$I::text AND s.dynamics_id = x.cid
    $q$, src.key_column, d365._contact_incoming_values_expr(), src.contact_table)
       INTO work USING rows;
    IF work IS NULL THEN
        RETURN;
    END IF;

    -- each row's values as d365._incoming_value makes them ready, and
    -- whether any differs from the local or the synced value
    WITH w AS (
        SELECT (e ->> 'n')::bigint AS n, e ->> 'k' AS k, (e ->> 'cid')::uuid AS cid,
               e -> 'cur' AS cur, e -> 'snap' AS snap, e -> 'r' AS r
          FROM jsonb_array_elements(work) e),
    f AS (
        SELECT * FROM jsonb_to_recordset(flds) AS f(col text, field text, read text, typ oid, gen boolean, plain boolean)),
    v AS (
        SELECT w.n, f.col, f.field, f.gen,
               CASE jsonb_typeof(w.r -> f.read)
                    WHEN 'null' THEN 'null'::jsonb
                    WHEN 'number' THEN w.r -> f.read
                    WHEN 'boolean' THEN w.r -> f.read
                    WHEN 'string' THEN CASE WHEN f.plain AND left(w.r ->> f.read, 1) <> '/' THEN w.r -> f.read
                                            ELSE d365._incoming_value(w.r -> f.read, f.typ::regtype, f.read, f.col::name) END
                    ELSE d365._incoming_value(w.r -> f.read, f.typ::regtype, f.read, f.col::name) END AS val
          FROM w JOIN f ON w.r ? f.read),
    r AS (
        SELECT w.n, w.k, w.cid, w.cur, w.snap,
               coalesce(jsonb_object_agg(v.col, v.val) FILTER (WHERE v.col IS NOT NULL), '{}') AS vals,
               coalesce(jsonb_object_agg(v.field, v.col) FILTER (WHERE v.col IS NOT NULL), '{}') AS fields,
               coalesce(jsonb_object_agg(v.col, v.gen) FILTER (WHERE v.col IS NOT NULL), '{}') AS gen,
               w.snap IS NOT NULL
               AND NOT coalesce(bool_or(v.val IS DISTINCT FROM (w.cur -> v.field)
                                        OR (w.snap -> v.field) IS DISTINCT FROM (w.cur -> v.field)), false) AS same
          FROM w LEFT JOIN v ON v.n = w.n
         GROUP BY w.n, w.k, w.cid, w.cur, w.snap)
    SELECT count(*) FILTER (WHERE r.same),
           jsonb_agg(jsonb_build_object('n', r.n, 'k', r.k, 'cid', r.cid, 'cur', r.cur, 'snap', r.snap,
                                        'vals', r.vals, 'fields', r.fields, 'gen', r.gen) ORDER BY r.n)
               FILTER (WHERE NOT r.same)
      INTO unchanged, pend
      FROM r;
    IF pend IS NULL THEN
        RETURN;
    END IF;

    -- the values as their columns would hold them, as the table's owner
    SELECT coalesce(array_agg(DISTINCT c::name ORDER BY c::name), '{}') INTO cols
      FROM jsonb_array_elements(pend) e, jsonb_object_keys(e -> 'vals') c;
    IF cols <> '{}' THEN
        conv := d365._contact_convert_set(cols, (SELECT jsonb_agg(e -> 'vals' ORDER BY o)
                                                   FROM jsonb_array_elements(pend) WITH ORDINALITY x(e, o)));
    END IF;
    -- what changes: a field Dynamics changed since the last sync whose
    -- value differs from the local one
    SELECT jsonb_agg(p.e || jsonb_build_object('conv', p.conv, 'changes', coalesce(
               (SELECT jsonb_object_agg(fe.value #>> '{}', p.e -> 'vals' -> (fe.value #>> '{}'))
                  FROM jsonb_each(p.e -> 'fields') fe
                 WHERE NOT (p.e -> 'snap' ? fe.key AND p.e -> 'snap' -> fe.key = p.conv -> fe.key)
                   AND (p.conv -> fe.key) IS DISTINCT FROM coalesce(p.e -> 'cur' -> fe.key, 'null'::jsonb)), '{}'))
           ORDER BY p.o)
      INTO pend
      FROM (SELECT x.e, x.o, coalesce(cv.conv, '{}') AS conv
              FROM jsonb_array_elements(pend) WITH ORDINALITY x(e, o)
              -- (joined, not looked up by position: each look-up into the
              -- page's variable would read all of it)
              LEFT JOIN jsonb_array_elements(conv) WITH ORDINALITY cv(conv, o) ON cv.o = x.o) p;
    -- a generated column refuses its value: that row fails alone
    SELECT count(*) INTO n_gen
      FROM jsonb_array_elements(pend) e, jsonb_object_keys(e -> 'changes') c
     WHERE (e -> 'gen' ->> c)::boolean;
    IF n_gen > 0 THEN
        RAISE EXCEPTION 'a generated column is written: row by row' USING ERRCODE = 'P0001';
    END IF;

    -- one UPDATE per set of columns written
    FOR grp IN SELECT g.cols, jsonb_agg(jsonb_build_object('k', g.e ->> 'k', 'v', g.e -> 'changes')) AS changes
                 FROM (SELECT e, ARRAY(SELECT c::name FROM jsonb_object_keys(e -> 'changes') c ORDER BY 1) AS cols
                         FROM jsonb_array_elements(pend) e) g
                WHERE g.cols <> '{}'
                GROUP BY g.cols LOOP
        PERFORM d365._contact_apply_set(grp.cols, grp.changes);
        updated := updated + jsonb_array_length(grp.changes);
    END LOOP;
    unchanged := unchanged + jsonb_array_length(pend) - updated;

    -- echo suppression: a field whose column now holds the value Dynamics
    -- sent (as the column holds it) is recorded as synced, with the
    -- column's value (read again: the table's triggers may have changed it)
    EXECUTE format('SELECT jsonb_object_agg(c.dynamics365_related_id::text, %s) FROM %s c'
                   ' WHERE c.dynamics365_related_id = ANY ($1)',
                   d365._contact_incoming_values_expr(), src.contact_table)
       INTO cur
      USING ARRAY(SELECT (e ->> 'cid')::uuid FROM jsonb_array_elements(pend) e WHERE e -> 'fields' <> '{}');
    WITH s AS (
        SELECT e ->> 'k' AS k,
               (SELECT jsonb_object_agg(fe.key, c.now -> fe.key)
                  FROM jsonb_each(e -> 'fields') fe
                 WHERE coalesce(c.now -> fe.key, 'null'::jsonb) = coalesce(e -> 'conv' -> fe.key, 'null'::jsonb)
                   AND c.now ? fe.key) AS settle
          FROM jsonb_array_elements(pend) e
          LEFT JOIN jsonb_each(cur) c(cid, now) ON c.cid = e ->> 'cid')
    SELECT jsonb_agg(jsonb_build_object('k', s.k, 'settle', s.settle)) INTO pend
      FROM s WHERE s.settle IS NOT NULL;
    IF pend IS NOT NULL THEN
        IF EXISTS (SELECT FROM jsonb_array_elements(pend) e, jsonb_object_keys(e -> 'settle') fld
                     JOIN d365.field_map f ON f.dynamics_field = fld
                    WHERE NOT has_column_privilege(d365._job_caller(), src.contact_table, f.column_name, 'UPDATE')) THEN
            RAISE EXCEPTION 'the snapshot''s rights are checked row by row' USING ERRCODE = 'P0001';
        END IF;
        UPDATE d365.contact_state s
           SET synced = coalesce(s.synced, '{}') || (e -> 'settle')
          FROM jsonb_array_elements(pend) e
         WHERE s.contact_key = e ->> 'k';
    END IF;
END;
$$;

-- ---------------------------------------------------------------------------
