-- Incoming changes: Dynamics rows mapped back onto contacts (push payloads
-- and the change-tracking pull), without echo.
-- ---------------------------------------------------------------------------

/*
 * The mapped fields as Dynamics returns them on read: a plain attribute
 * under its logical name, a lookup as _<attribute>_value.
 */
CREATE FUNCTION d365._incoming_fields(
    OUT column_name name, OUT dynamics_field text, OUT read_name text,
    OUT typ regtype, OUT is_bind boolean)
RETURNS SETOF record
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT f.column_name, f.dynamics_field,
           CASE WHEN b.attribute IS NOT NULL THEN '_' || b.attribute || '_value'
                ELSE f.dynamics_field END,
           a.atttypid::regtype, b.attribute IS NOT NULL
      FROM d365.field_map f
      JOIN d365.contact_source s ON true
      JOIN pg_attribute a ON a.attrelid = s.contact_table AND a.attname = f.column_name
                         AND a.attnum > 0 AND NOT a.attisdropped
      LEFT JOIN d365._lookup_binds() b ON b.dynamics_field = f.dynamics_field
     ORDER BY f.column_name
$$;

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
 * A Dynamics JSON value converted to a column's type and back to jsonb, so
 * that values compare equal whatever their spelling ("2024-03-01T09:00:00Z"
 * and "2024-03-01T10:00:00+01:00", 5000000.0000 and 5000000).  Accepts the
 * webhook date form /Date(ms)/ and, for a lookup, a bind path.  Raises
 * 22P02 naming the field when the value does not fit.
 */
CREATE FUNCTION d365._typed_jsonb(val jsonb, typ regtype, field text, column_name name)
RETURNS jsonb
SET search_path = pg_catalog, pg_temp
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    txt text;
    result jsonb;
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
    txt := val #>> '{}';
    IF txt ~ '^/Date\(-?\d+([+-]\d{4})?\)/$' THEN
        txt := to_char(to_timestamp(substring(txt FROM '-?\d+')::numeric / 1000) AT TIME ZONE 'UTC',
                       'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"');
    END IF;
    IF txt ~ '^/[A-Za-z_]+\([0-9a-fA-F-]{36}\)$' THEN
        txt := substring(txt FROM '\(([0-9a-fA-F-]{36})\)');
    END IF;
    IF base = 'date'::regtype AND txt ~ '^\d{4}-\d\d-\d\dT' THEN
        txt := to_char(txt::timestamptz AT TIME ZONE 'UTC', 'YYYY-MM-DD');
    END IF;
    BEGIN
        EXECUTE format('SELECT to_jsonb(%L::%s)', txt, typ) INTO result;
    EXCEPTION WHEN data_exception THEN
        RAISE EXCEPTION 'value of Dynamics field "%" does not fit column "%" of type %', field, column_name, typ
            USING ERRCODE = 'invalid_text_representation',
                  DETAIL = format('The value was %s: %s.', val, SQLERRM),
                  HINT = 'Fix the value in Dynamics, or the mapping in d365.field_map.';
    END;
    RETURN result;
END;
$$;

/*
 * The map stage of contacts, incoming, for one Dynamics row: finds the
 * linked contact, computes what to change and applies it.  A column changes
 * when the row has its field, the value differs from the local one, and
 * Dynamics changed it since the last sync (the value differs from the
 * synced snapshot) -- so a local edit not yet sent is not overwritten by the
 * old Dynamics value.  A null clears the column.  d365.settings.incoming_mapper
 * replaces the computation.  The new values are then recorded as synced, so
 * the next outgoing run does not send them back.
 *
 * Returns {column: new value}, '{}' when nothing differed, NULL when no
 * contact is linked to the row.  It runs with its caller's rights: reading
 * and changing the contact table, the type conversions and the mapper are
 * the caller's own doing; d365's tables are reached only through owner-run
 * helpers that run no user code (and the snapshot gate checks that the
 * caller may update contacts).  check_privileges: explain a missing right
 * before trying.
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
    local jsonb;
    snap jsonb;
    mapper regprocedure := d365._incoming_mapper();
    mapping jsonb := '{}';
    incoming jsonb := '{}';
    settled text[] := '{}';
    changes jsonb := '{}';
    f record;
    dval jsonb;
    col text;
    cur jsonb;
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
    BEGIN
        cid := payload ->> 'contactid';
    EXCEPTION WHEN invalid_text_representation THEN
        RAISE EXCEPTION 'contactid % is not a GUID', payload -> 'contactid'
            USING ERRCODE = 'invalid_parameter_value';
    END;
    src := d365._contact_source();

    IF check_privileges AND NOT (has_any_column_privilege(src.contact_table, 'UPDATE')
                                 AND has_any_column_privilege(src.contact_table, 'SELECT')) THEN
        RAISE EXCEPTION 'permission denied for table %', src.contact_table
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'd365_update_contact() reads and changes contacts with its caller''s rights.',
                  HINT = format('GRANT SELECT, UPDATE ON %s TO %I;', src.contact_table, current_user);
    END IF;

    EXECUTE format('SELECT c.%I::text, to_jsonb(c) FROM %s c WHERE c.dynamics365_related_id = $1',
                   src.key_column, src.contact_table)
       INTO k, local USING cid;
    IF k IS NULL THEN
        RETURN NULL;
    END IF;
    snap := d365._contact_snapshot(k, NULL);

    FOR f IN SELECT * FROM d365._incoming_fields() LOOP
        mapping := mapping || jsonb_build_object(f.column_name, f.dynamics_field);
        IF NOT payload ? f.read_name THEN
            CONTINUE;       -- not in the row: not changed, not cleared
        END IF;
        dval := d365._typed_jsonb(payload -> f.read_name, f.typ, f.read_name, f.column_name);
        incoming := incoming || jsonb_build_object(f.dynamics_field,
                                                   jsonb_build_array(f.column_name, dval));
        IF snap ? f.dynamics_field AND
           d365._typed_jsonb(snap -> f.dynamics_field, f.typ, f.dynamics_field, f.column_name) = dval THEN
            CONTINUE;       -- Dynamics still has what was last synced
        END IF;
        IF dval IS DISTINCT FROM coalesce(local -> f.column_name, 'null'::jsonb) THEN
            changes := changes || jsonb_build_object(f.column_name, dval);
        END IF;
    END LOOP;

    IF mapper IS NOT NULL THEN
        EXECUTE format('SELECT %s($1, $2, $3)', mapper::oid::regproc)
           INTO changes USING payload, local, mapping;
        IF changes IS NULL OR jsonb_typeof(changes) <> 'object' THEN
            changes := '{}';
        END IF;
        FOR col IN SELECT jsonb_object_keys(changes) LOOP
            IF NOT local ? col OR col IN (src.key_column, 'dynamics365_related_id', 'dynamics365_synchronized_on') THEN
                RAISE EXCEPTION 'incoming mapper % returned column "%", which cannot be updated', mapper, col
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'The mapper returns {column: value} for columns of the contact table other than its key and link columns.';
            END IF;
        END LOOP;
    END IF;

    IF changes <> '{}' THEN
        IF check_privileges THEN
            FOR col IN SELECT jsonb_object_keys(changes) LOOP
                IF NOT has_column_privilege(src.contact_table, col, 'UPDATE') THEN
                    RAISE EXCEPTION 'permission denied to update column "%" of %', col, src.contact_table
                        USING ERRCODE = 'insufficient_privilege',
                              DETAIL = 'd365_update_contact() changes contacts with its caller''s rights.',
                              HINT = format('GRANT UPDATE ON %s TO %I;', src.contact_table, current_user);
                END IF;
            END LOOP;
        END IF;
        EXECUTE format('UPDATE %1$s t SET (%2$s) = (SELECT %3$s FROM jsonb_populate_record(NULL::%1$s, $1) r)'
                       ' WHERE t.%4$I::text = $2',
                       src.contact_table,
                       (SELECT string_agg(format('%I', c), ', ') FROM jsonb_object_keys(changes) c),
                       (SELECT string_agg(format('r.%I', c), ', ') FROM jsonb_object_keys(changes) c),
                       src.key_column)
          USING changes, k;
    END IF;

    -- Echo suppression: a field whose local value is now the one Dynamics
    -- sent (or that the mapper set from it) is recorded as synced, so the
    -- next outgoing run does not send it back.  Other fields keep their
    -- snapshot: a local change not yet sent still goes out.
    IF incoming <> '{}' THEN
        EXECUTE format('SELECT to_jsonb(c), %s FROM %s c WHERE c.%I::text = $1',
                       d365._contact_values_expr(), src.contact_table, src.key_column)
           INTO local, cur USING k;
        SELECT coalesce(array_agg(e.key), '{}') INTO settled
          FROM jsonb_each(incoming) e
         WHERE (mapper IS NOT NULL AND changes ? (e.value ->> 0))
            OR coalesce(local -> (e.value ->> 0), 'null'::jsonb) = e.value -> 1;
        IF settled <> '{}' THEN
            PERFORM d365._contact_snapshot(k, (SELECT jsonb_object_agg(e.key, e.value)
                                                 FROM jsonb_each(cur) e
                                                WHERE e.key = ANY (settled)));
        END IF;
    END IF;
    RETURN changes;
END;
$$;

CREATE FUNCTION d365.d365_update_contact(payload jsonb)
RETURNS jsonb
SET search_path = pg_catalog, pg_temp
LANGUAGE sql
AS $$ SELECT d365._incoming_apply(payload, true) $$;
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
 * The record stage of a pull: one page of change-tracking rows.  Changed
 * rows of linked contacts are applied as d365_update_contact() would; a
 * $deletedEntity entry unlinks its contact (reported, re-created only if it
 * qualifies again).  A row whose values do not fit is skipped with a
 * WARNING and counted as failed; it does not stop the pull.
 */
CREATE FUNCTION d365._pull_record(page jsonb,
    OUT updated integer, OUT unchanged integer, OUT failed integer, OUT unlinked integer)
RETURNS record
SET search_path = pg_catalog, pg_temp
LANGUAGE plpgsql
AS $$
DECLARE
    src d365.contact_source := (SELECT s FROM d365.contact_source s);
    r jsonb;
    changed jsonb;
    k text;
BEGIN
    updated := 0; unchanged := 0; failed := 0; unlinked := 0;
    FOR r IN SELECT jsonb_array_elements(page) LOOP
        IF r ->> '@odata.context' LIKE '%$deletedEntity' THEN
            EXECUTE format('UPDATE %s SET dynamics365_related_id = NULL, dynamics365_synchronized_on = NULL'
                           ' WHERE dynamics365_related_id = $1 RETURNING %I::text',
                           src.contact_table, src.key_column)
               INTO k USING (r ->> 'id')::uuid;
            IF k IS NOT NULL THEN
                UPDATE d365.contact_state
                   SET synced = NULL, generation = generation + 1, remote_deleted_at = now(),
                       synced_seq = change_seq, last_attempt_at = now(),
                       last_error = 'deleted in Dynamics 365 (change tracking), unlinked'
                 WHERE contact_key = k;
                unlinked := unlinked + 1;
            END IF;
            CONTINUE;
        END IF;
        BEGIN
            changed := d365._incoming_apply(r, false);
        EXCEPTION WHEN invalid_text_representation OR invalid_parameter_value THEN
            RAISE WARNING 'Dynamics contact % was not applied', r ->> 'contactid'
                USING ERRCODE = 'warning', DETAIL = SQLERRM;
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

-- ---------------------------------------------------------------------------
