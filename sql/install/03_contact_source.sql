-- Contacts: the attached table, the field map, per-contact sync state
-- ---------------------------------------------------------------------------

CREATE TABLE d365.contact_source (
    singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    contact_table regclass NOT NULL,
    key_column    name NOT NULL,
    score_column  name NOT NULL
);
COMMENT ON TABLE d365.contact_source IS
    'The application''s contact table, registered by d365_attach_contacts()';
SELECT pg_catalog.pg_extension_config_dump('d365.contact_source', '');

CREATE TABLE d365.field_map (
    column_name    name PRIMARY KEY,
    dynamics_field text NOT NULL,
    match          boolean NOT NULL DEFAULT false,
    direction      text NOT NULL DEFAULT 'both'
                   CONSTRAINT field_map_direction_check CHECK (direction IN ('both', 'out', 'in'))
);
COMMENT ON TABLE d365.field_map IS
    'Contact column -> Dynamics attribute; unmapped columns are never sent. A lookup maps a uuid column to <navigation property>@odata.bind';
COMMENT ON COLUMN d365.field_map.match IS
    'Before an unlinked contact is created, Dynamics is searched for a contact whose match fields all equal its values; one hit is linked instead of creating a duplicate';
COMMENT ON COLUMN d365.field_map.direction IS
    'both: sent and received; out: only sent (incoming changes never write it); in: only received (never sent)';
SELECT pg_catalog.pg_extension_config_dump('d365.field_map', '');

/*
 * Per-contact sync state.  A row exists for every contact of the attached
 * table (the capture triggers keep it so).  change_seq counts local changes;
 * synced_seq is the change_seq the last successful sync saw, so a change
 * made while a run is in flight is never lost.  synced holds the mapped
 * values as Dynamics last had them (sent by us or received from it): the
 * next update sends exactly the fields that differ.
 */
CREATE TABLE d365.contact_state (
    contact_key       text PRIMARY KEY,
    change_seq        bigint NOT NULL DEFAULT 1,
    synced_seq        bigint NOT NULL DEFAULT 0,
    synced            jsonb,
    generation        integer NOT NULL DEFAULT 0,
    remote_deleted_at timestamptz,
    attempts          integer NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz,
    last_attempt_at   timestamptz,
    last_status       integer,
    last_error_code   text,
    last_error        text,
    dynamics_id       uuid,
    pending_since     timestamptz DEFAULT now()
);
CREATE INDEX contact_state_failing_idx ON d365.contact_state (next_attempt_at)
    WHERE attempts > 0;
-- dumped with the configuration: without it a restored database would send
-- every linked contact's mapped values once more
SELECT pg_catalog.pg_extension_config_dump('d365.contact_state', '');
COMMENT ON TABLE d365.contact_state IS
    'Sync state of each contact: pending changes, last synced values, failures and back-off';
COMMENT ON COLUMN d365.contact_state.generation IS
    'Identity of the key''s current person: raised whenever the key stops belonging to one (delete, truncate, key change, deleted in Dynamics)';
COMMENT ON COLUMN d365.contact_state.dynamics_id IS
    'The Dynamics contact this state (snapshot, failures) belongs to; NULL until linked';
COMMENT ON COLUMN d365.contact_state.pending_since IS
    'When the oldest change not yet sent was captured (meaningful while change_seq > synced_seq); d365_status() shows the lag from it';

/*
 * Contacts whose mapped columns changed, noted by the capture trigger and
 * not yet counted in d365.contact_state: one row per statement that changed
 * any, holding their keys.  Appending one row is what keeps the
 * application's UPDATEs cheap.  A contact sync folds the queue into
 * change_seq first (d365._contact_fold_changes).
 */
CREATE TABLE d365.contact_change (
    keys     text[] NOT NULL,
    noted_at timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('d365.contact_change', '');
COMMENT ON TABLE d365.contact_change IS
    'Keys of contacts changed by one statement each, noted by the capture trigger and folded into contact_state by the next contact sync';
COMMENT ON COLUMN d365.contact_change.noted_at IS
    'When the change was noted (its transaction''s start); becomes contact_state.pending_since, the start of the queue lag d365_status() shows';


/*
 * The Dynamics id of a contact is chosen here, not by Dynamics: a name-based
 * UUID (version 3) of this installation, the contact key and the number of
 * times the contact was deleted in Dynamics.  Creating with an upsert on
 * that id makes creation idempotent: a retry after a lost commit, a crash or
 * a concurrent run reaches the same Dynamics record.
 */
CREATE FUNCTION d365._contact_guid(contact_key text, generation integer)
RETURNS uuid
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT overlay(overlay(h PLACING '3' FROM 13 FOR 1)
                   PLACING substr('89ab', (('x' || substr(h, 17, 1))::bit(4)::int & 3) + 1, 1)
                   FROM 17 FOR 1)::uuid
      FROM (SELECT md5(s.instance_id::text || '/' || contact_key || '/' || generation) AS h
              FROM d365.settings s) x
$$;

/*
 * Whether a type (not a domain: pass the base type) is text-like: text
 * itself, or a type with a binary-coercible cast to text, such as citext.
 * Only a superuser can declare a cast binary-coercible, so converting such
 * a value to text runs no function at all, whoever owns the type.
 */
CREATE FUNCTION d365._text_like(typ regtype)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT typ = 'text'::regtype OR EXISTS (
        SELECT FROM pg_cast c
         WHERE c.castsource = typ AND c.casttarget = 'text'::regtype AND c.castmethod = 'b')
$$;

/*
 * The JSON expression of one mapped column, as Dynamics takes the value;
 * NULL when the column's type cannot be converted.  bind_set turns a uuid
 * into a lookup bind path /<entity set>(<uuid>).
 *
 * The expression runs no code a user wrote, whoever evaluates it: built-in
 * types go through to_jsonb (which looks for a user's cast to json only for
 * types of the user's making), an enum through its output function
 * (enum_out, never a cast the application defined), a domain as its base
 * type.  A timestamp without time zone is read as UTC, whatever the
 * session's TimeZone.  Text-like types (citext; d365._text_like) go as
 * their text.
 */
CREATE FUNCTION d365._json_expr(expr text, typ regtype, bind_set text DEFAULT NULL)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN bind_set IS NOT NULL AND base IN ('uuid'::regtype, 'text'::regtype, 'character varying'::regtype)
            THEN format('pg_catalog.to_jsonb(%L OPERATOR(pg_catalog.||) (%s)::pg_catalog.text OPERATOR(pg_catalog.||) '')'')',
                        '/' || bind_set || '(', expr)
        WHEN bind_set IS NOT NULL THEN NULL
        WHEN base IN ('text'::regtype, 'character varying'::regtype, 'character'::regtype,
                      'name'::regtype, 'smallint'::regtype, 'integer'::regtype,
                      'bigint'::regtype, 'numeric'::regtype, 'real'::regtype,
                      'double precision'::regtype, 'boolean'::regtype)
            THEN format('pg_catalog.to_jsonb(%s)', expr)
        WHEN base = 'uuid'::regtype THEN format('pg_catalog.to_jsonb((%s)::pg_catalog.text)', expr)
        WHEN d365._text_like(base) THEN format('pg_catalog.to_jsonb((%s)::pg_catalog.text)', expr)
        WHEN base = 'date'::regtype
            THEN format('pg_catalog.to_jsonb(pg_catalog.to_char(%s, ''YYYY-MM-DD''))', expr)
        WHEN base = 'timestamp without time zone'::regtype
            THEN format('pg_catalog.to_jsonb(pg_catalog.to_char(%s, ''YYYY-MM-DD"T"HH24:MI:SS"Z"''))', expr)
        WHEN base = 'timestamp with time zone'::regtype
            THEN format('pg_catalog.to_jsonb(pg_catalog.to_char(pg_catalog.timezone(''UTC'', %s), ''YYYY-MM-DD"T"HH24:MI:SS"Z"''))', expr)
        WHEN typtype = 'e'
            THEN format('pg_catalog.to_jsonb(pg_catalog.textin(pg_catalog.enum_out(%s)))', expr)
        ELSE NULL
    END
    FROM (SELECT coalesce(nullif(t.typbasetype, 0), t.oid)::regtype AS base,
                 (SELECT b.typtype FROM pg_type b
                   WHERE b.oid = coalesce(nullif(t.typbasetype, 0), t.oid)) AS typtype
            FROM pg_type t WHERE t.oid = typ) b
$$;

/*
 * How a match field's value is written in a Dynamics query: 'text' (quoted,
 * compared case-insensitively), 'number', 'boolean', 'guid' or 'date'; NULL
 * for a type that cannot be a match field.  Domains count as their base
 * type, enums as text.
 */
CREATE FUNCTION d365._match_type(typ regtype)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN b.typtype = 'e' THEN 'text'
        WHEN b.oid IN ('text'::regtype, 'character varying'::regtype, 'character'::regtype,
                       'name'::regtype) THEN 'text'
        WHEN d365._text_like(b.oid::regtype) THEN 'text'
        WHEN b.oid IN ('smallint'::regtype, 'integer'::regtype, 'bigint'::regtype,
                       'numeric'::regtype) THEN 'number'
        WHEN b.oid = 'boolean'::regtype THEN 'boolean'
        WHEN b.oid = 'uuid'::regtype THEN 'guid'
        WHEN b.oid = 'date'::regtype THEN 'date'
    END
      FROM pg_type t
      JOIN pg_type b ON b.oid = coalesce(nullif(t.typbasetype, 0), t.oid)
     WHERE t.oid = typ
$$;

/*
 * The one list of contact key types: smallint, integer, bigint, text,
 * varchar and uuid.  Their text form is stable (no padding, no DateStyle)
 * and their conversions are built in, so code running as the extension
 * owner never runs a cast or an output function a user wrote.
 */
CREATE FUNCTION d365._key_types()
RETURNS regtype[]
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT ARRAY['smallint', 'integer', 'bigint', 'text', 'character varying', 'uuid']::regtype[] $$;

CREATE FUNCTION d365._check_key_type(tbl regclass, key_column name)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    typ regtype := (SELECT a.atttypid FROM pg_attribute a
                     WHERE a.attrelid = tbl AND a.attname = key_column
                       AND a.attnum > 0 AND NOT a.attisdropped);
BEGIN
    IF typ IS NULL OR typ <> ALL (d365._key_types()) THEN
        RAISE EXCEPTION 'key column "%" of % has type %, which d365sync does not support',
                        key_column, tbl, coalesce(typ::text, 'none')
            USING ERRCODE = 'datatype_mismatch',
                  HINT = 'Use a key of type ' || array_to_string(d365._key_types(), ', ') || '.';
    END IF;
END;
$$;

-- A contact key passed by the application, as text; only the key types
-- above are accepted.
CREATE FUNCTION d365._key_text(contact_key anyelement)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pg_typeof(contact_key) <> ALL (d365._key_types()) THEN
        RAISE EXCEPTION 'a contact key of type % is not supported', pg_typeof(contact_key)
            USING ERRCODE = 'datatype_mismatch',
                  HINT = 'Pass the key as ' || array_to_string(d365._key_types(), ', ') || '.';
    END IF;
    RETURN contact_key::text;
END;
$$;

-- The attached contact table, or a clear error when there is none.
CREATE FUNCTION d365._contact_source()
RETURNS d365.contact_source
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source;
    problem text;
BEGIN
    SELECT * INTO src FROM d365.contact_source;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no contact table is attached'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Call d365_attach_contacts(''your_contacts''::regclass) first.';
    END IF;
    -- (remembered while the catalog says nothing it reads changed:
    -- src/capture/attach_cache.c)
    problem := d365._attachment_problem_cached(src);
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'the attachment of the contact table is broken: %', problem
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Attach the table again with d365_attach_contacts(), or call d365_detach_contacts().';
    END IF;
    RETURN src;
END;
$$;

-- A column definition list for jsonb_to_record: the named columns of tbl
-- with their types and type modifiers ("kids" smallint, "city" varchar(5)).
CREATE FUNCTION d365._column_defs(tbl regclass, columns name[])
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT string_agg(format('%I %s', a.attname, format_type(a.atttypid, a.atttypmod)), ', '
                      ORDER BY a.attnum)
      FROM pg_attribute a
     WHERE a.attrelid = tbl AND a.attname = ANY (columns) AND a.attnum > 0 AND NOT a.attisdropped
$$;

/*
 * The statements that d365sync runs on the attached contact table as the
 * table's owner, in a security-restricted operation (see src/privilege/table_owner.c
 * and docs/security.md): the code the table's owner controls -- triggers,
 * index expressions, defaults, domain checks, casts, row security -- then
 * runs with the owner's rights, never with ours or a superuser caller's.  The statements take their data as parameters (the
 * table's owner has no rights on d365's tables) and name every object with
 * its schema.  columns: the columns the statement writes (or converts),
 * whose UPDATE right the caller must hold.
 *
 *   links    $1 text[] keys, $2 uuid[] ids, $3 uuid[] the ids the rows must
 *            still be linked to (NULL: still unlinked): sets the link
 *            columns (rows locked by another transaction, and ids another
 *            row holds, are skipped); returns the keys changed.  The only
 *            writes the link-column guard lets through (src/capture/link_guard.c)
 *   links_wait  the same, but a row another transaction holds locked is
 *            waited for (up to lock_timeout) instead of skipped: the write
 *            of d365_sync_contact(), whose caller wants the id now
 *   unlink   $1 uuid: unlinks the contact linked to that Dynamics id;
 *            returns its key
 *   convert  $1 jsonb {column: JSON value}: each value as its column holds
 *            it, as {dynamics_field: value} (d365._json_expr's form)
 *   apply    $1 jsonb {column: JSON value}, $2 text key: the update
 *   convert_set  $1 jsonb, an array of {column: JSON value}: convert for
 *            a page at once, the array of results in the same order
 *   apply_set    $1 jsonb, an array of {"k": text key, "v": {column: JSON
 *            value}}: apply for a page at once (each key at most once)
 *   row      $1 text key: the contact's row as jsonb, for the incoming
 *            mapper (which then runs as its own function's owner)
 */
CREATE FUNCTION d365._owner_sql(op text, only_columns name[],
    OUT sql text, OUT tbl regclass, OUT columns name[])
RETURNS record
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source := d365._contact_source();
    key_type text;
    col name;
BEGIN
    tbl := src.contact_table;
    SELECT format_type(a.atttypid, a.atttypmod) INTO key_type
      FROM pg_attribute a WHERE a.attrelid = tbl AND a.attname = src.key_column;
    IF op IN ('convert', 'apply', 'convert_set', 'apply_set') THEN
        columns := coalesce(only_columns, '{}');
        IF columns = '{}' THEN
            RAISE EXCEPTION 'no column to write'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        FOREACH col IN ARRAY columns LOOP
            IF col IS NULL OR col IN (src.key_column, 'dynamics365_related_id', 'dynamics365_synchronized_on')
               OR NOT EXISTS (SELECT FROM pg_attribute a
                               WHERE a.attrelid = tbl AND a.attname = col
                                 AND a.attnum > 0 AND NOT a.attisdropped) THEN
                RAISE EXCEPTION 'column "%" of % cannot be written by d365sync', col, tbl
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'Incoming changes write the columns of the contact table other than its key and link columns.';
            END IF;
        END LOOP;
    END IF;
    CASE op
    WHEN 'links', 'links_wait' THEN
        columns := '{dynamics365_related_id,dynamics365_synchronized_on}';
        sql := format('WITH u AS (UPDATE %1$s t'
                      '   SET dynamics365_related_id = u.id,'
                      '       dynamics365_synchronized_on = CASE WHEN u.id IS NULL THEN NULL'
                      '                                         ELSE pg_catalog.now() END'
                      '  FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]),'
                      '                  pg_catalog.unnest($2::pg_catalog.uuid[]),'
                      '                  pg_catalog.unnest($3::pg_catalog.uuid[])) u(k, id, expect)'
                      ' WHERE t.%2$I OPERATOR(pg_catalog.=) u.k::%3$s'
                      '   AND t.dynamics365_related_id IS NOT DISTINCT FROM u.expect'
                      -- a row another transaction holds locked is left for
                      -- the next run (its state stays pending), not waited
                      -- for; links_wait waits for it
                      '   AND t.ctid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT l.ctid FROM %1$s l'
                      '        WHERE l.%2$I OPERATOR(pg_catalog.=) ANY ($1::%3$s[]) FOR UPDATE%4$s))'
                      -- an id another row holds is not linked twice
                      '   AND (u.id IS NULL OR NOT EXISTS (SELECT FROM %1$s o'
                      '        WHERE o.dynamics365_related_id OPERATOR(pg_catalog.=) u.id'
                      '          AND o.%2$I OPERATOR(pg_catalog.<>) u.k::%3$s))'
                      ' RETURNING t.%2$I::pg_catalog.text AS k)'
                      ' SELECT pg_catalog.array_agg(k) FROM u',
                      tbl, src.key_column, key_type,
                      CASE op WHEN 'links' THEN ' SKIP LOCKED' ELSE '' END);
    WHEN 'unlink' THEN
        columns := '{dynamics365_related_id,dynamics365_synchronized_on}';
        sql := format('WITH u AS (UPDATE %1$s t'
                      '   SET dynamics365_related_id = NULL, dynamics365_synchronized_on = NULL'
                      ' WHERE t.dynamics365_related_id OPERATOR(pg_catalog.=) $1'
                      ' RETURNING t.%2$I::pg_catalog.text AS k)'
                      ' SELECT pg_catalog.min(k) FROM u',
                      tbl, src.key_column);
    WHEN 'convert' THEN
        -- only the columns named: the table's other columns (a NOT NULL
        -- domain among them) take no part in the conversion
        sql := format('SELECT %s FROM pg_catalog.jsonb_to_record($1) AS r(%s)',
                      d365._values_expr('r', columns), d365._column_defs(tbl, columns));
    WHEN 'apply' THEN
        sql := format('UPDATE %1$s t SET (%2$s) = (SELECT %3$s FROM pg_catalog.jsonb_to_record($1) AS r(%6$s))'
                      ' WHERE t.%4$I OPERATOR(pg_catalog.=) $2::%5$s',
                      tbl,
                      (SELECT string_agg(format('%I', c), ', ') FROM unnest(columns) c),
                      (SELECT string_agg(format('r.%I', c), ', ') FROM unnest(columns) c),
                      src.key_column, key_type, d365._column_defs(tbl, columns));
    WHEN 'convert_set' THEN
        sql := format('SELECT pg_catalog.jsonb_agg(%s ORDER BY e.n)'
                      '  FROM pg_catalog.jsonb_array_elements($1) WITH ORDINALITY AS e(v, n),'
                      '       LATERAL pg_catalog.jsonb_to_record(e.v) AS r(%s)',
                      d365._values_expr('r', columns), d365._column_defs(tbl, columns));
    WHEN 'apply_set' THEN
        sql := format('UPDATE %1$s t SET (%2$s) = (SELECT %3$s FROM pg_catalog.jsonb_to_record(e.v OPERATOR(pg_catalog.->) ''v'') AS r(%6$s))'
                      '  FROM pg_catalog.jsonb_array_elements($1) AS e(v)'
                      ' WHERE t.%4$I OPERATOR(pg_catalog.=) (e.v OPERATOR(pg_catalog.->>) ''k'')::%5$s',
                      tbl,
                      (SELECT string_agg(format('%I', c), ', ') FROM unnest(columns) c),
                      (SELECT string_agg(format('r.%I', c), ', ') FROM unnest(columns) c),
                      src.key_column, key_type, d365._column_defs(tbl, columns));
    WHEN 'row' THEN
        columns := NULL;
        sql := format('SELECT pg_catalog.to_jsonb(c) FROM %1$s c'
                      ' WHERE c.%2$I OPERATOR(pg_catalog.=) $1::%3$s',
                      tbl, src.key_column, key_type);
    ELSE
        RAISE EXCEPTION 'unknown table-owner operation "%"', op
            USING ERRCODE = 'invalid_parameter_value';
    END CASE;
END;
$$;

/*
 * The statements above, run as the contact table's owner (src/privilege/table_owner.c).
 * Each checks first that its caller holds the UPDATE right on the columns it
 * writes (the mapper: SELECT on the table), so that nobody does through them
 * what they could not do themselves.
 */
CREATE FUNCTION d365._contact_set_links(keys text[], ids uuid[], expect uuid[])
RETURNS text[]
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_contact_set_links'
LANGUAGE C VOLATILE;

CREATE FUNCTION d365._contact_unlink(dynamics_id uuid)
RETURNS text
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_contact_unlink'
LANGUAGE C VOLATILE;

CREATE FUNCTION d365._contact_convert(vals jsonb)
RETURNS jsonb
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_contact_convert'
LANGUAGE C VOLATILE;

CREATE FUNCTION d365._contact_apply(vals jsonb, contact_key text)
RETURNS void
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_contact_apply'
LANGUAGE C VOLATILE;

CREATE FUNCTION d365._contact_map(payload jsonb, mapping jsonb, contact_key text)
RETURNS jsonb
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_contact_map'
LANGUAGE C VOLATILE;

-- When a failed item is tried again: 5 minutes, 10, 20, ... at most a day.
CREATE FUNCTION d365._next_attempt(failures integer)
RETURNS timestamptz
SET search_path = pg_catalog, pg_temp
LANGUAGE sql STABLE
AS $$ SELECT now() + least(interval '5 minutes' * power(2, greatest(failures - 1, 0)), interval '1 day') $$;

-- Field map validation: the column must exist and be mappable.  Checks the
-- attached table, not its capture triggers: a restore (pg_restore, or psql
-- running a plain dump) loads the map in its data section and the
-- application table's triggers only after all data.
CREATE FUNCTION d365._field_map_check()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source;
    typ regtype;
    generated boolean;
    fk boolean;
BEGIN
    src := d365._contact_source_table();
    IF NEW.column_name IN (src.key_column, 'dynamics365_related_id', 'dynamics365_synchronized_on') THEN
        RAISE EXCEPTION 'column "%" cannot be mapped', NEW.column_name
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'The key column and the link columns are managed by d365sync.',
                  HINT = 'Map one of the columns d365_contact_fields() lists.';
    END IF;
    SELECT a.atttypid::regtype, a.attgenerated <> '' INTO typ, generated
      FROM pg_attribute a
     WHERE a.attrelid = src.contact_table AND a.attname = NEW.column_name
       AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'column "%" does not exist in %', NEW.column_name, src.contact_table
            USING ERRCODE = 'undefined_column',
                  HINT = 'd365_contact_fields() lists the columns that can be mapped.';
    END IF;
    IF generated AND NEW.direction <> 'out' THEN
        RAISE EXCEPTION 'generated column "%" can only be mapped with direction ''out''', NEW.column_name
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'PostgreSQL computes a generated column, so incoming changes cannot write it.',
                  HINT = format('INSERT INTO d365.field_map (column_name, dynamics_field, direction) VALUES (%L, %L, ''out'');',
                                NEW.column_name, NEW.dynamics_field);
    END IF;
    IF NEW.dynamics_field !~ '^[a-z_][a-z0-9_]*(@odata\.bind)?$' THEN
        RAISE EXCEPTION 'invalid Dynamics field name "%"', NEW.dynamics_field
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'Dynamics attributes are written by their lowercase logical name.',
                  HINT = 'Use a logical name such as emailaddress1, or <lookup>_<target>@odata.bind for a lookup; d365_dynamics_fields() lists them.';
    END IF;
    -- a lookup from a column with a foreign key: bound to the record of the
    -- referenced row of a mapped table (d365._contact_lookups), whatever
    -- the key's type.  While the attached table has no capture triggers (a
    -- restore loads the field map with the data, before the application's
    -- triggers and constraints) an integer column is taken for one before
    -- its foreign key exists; without a foreign key to a mapped table its
    -- contacts fail at sync time, and d365_validate_mapping() says so.
    fk := NEW.dynamics_field LIKE '%@odata.bind'
          AND (EXISTS (SELECT FROM pg_constraint k
                        WHERE k.contype = 'f' AND k.conrelid = src.contact_table
                          AND k.conkey = ARRAY[(SELECT a.attnum FROM pg_attribute a
                                                 WHERE a.attrelid = src.contact_table
                                                   AND a.attname = NEW.column_name)]::int2[])
               OR ((SELECT coalesce(nullif(t.typbasetype, 0), t.oid) FROM pg_type t WHERE t.oid = typ)
                   IN ('smallint'::regtype, 'integer'::regtype, 'bigint'::regtype)
                   AND d365._attachment_problem(src) IS NOT NULL));
    IF NOT fk AND d365._json_expr('x', typ, CASE WHEN NEW.dynamics_field LIKE '%@odata.bind' THEN 'set' END) IS NULL THEN
        RAISE EXCEPTION 'column "%" of type % cannot be sent to Dynamics', NEW.column_name, typ
            USING ERRCODE = 'datatype_mismatch',
                  DETAIL = CASE WHEN NEW.dynamics_field LIKE '%@odata.bind'
                                THEN 'A lookup (@odata.bind) is written from a uuid column.'
                                ELSE 'Supported types: text, varchar, char, citext, integers, numeric, real, double precision, boolean, date, timestamp, timestamptz, uuid, enums, and domains over them.' END,
                  HINT = 'Map a column of a supported type, or a generated column (direction ''out'') that converts this one.';
    END IF;
    IF NEW.match AND (NEW.dynamics_field LIKE '%@odata.bind' OR d365._match_type(typ) IS NULL) THEN
        RAISE EXCEPTION 'column "%" of type % cannot be a match field', NEW.column_name, typ
            USING ERRCODE = 'datatype_mismatch',
                  DETAIL = 'Match fields are compared in a Dynamics query: text, varchar, char, integers, numeric, boolean, uuid, date and enums can be, lookups and timestamps cannot.',
                  HINT = 'Mark a column such as the email address as the match field.';
    END IF;
    IF EXISTS (SELECT FROM d365.field_map f
                WHERE f.dynamics_field = NEW.dynamics_field
                  AND f.column_name <> NEW.column_name) THEN
        RAISE EXCEPTION 'Dynamics field "%" is already mapped', NEW.dynamics_field
            USING ERRCODE = 'unique_violation',
                  HINT = 'Each Dynamics field takes its value from one column.';
    END IF;
    -- against Dynamics metadata: the field exists and takes the column's type
    IF TG_OP = 'INSERT' OR (NEW.column_name, NEW.dynamics_field, NEW.direction)
                           IS DISTINCT FROM (OLD.column_name, OLD.dynamics_field, OLD.direction) THEN
        PERFORM d365._field_map_metadata_check(NEW.column_name, NEW.dynamics_field, NEW.direction,
            CASE WHEN fk THEN 'uuid'::regtype ELSE typ END,
            (SELECT a.atttypmod FROM pg_attribute a
              WHERE a.attrelid = src.contact_table AND a.attname = NEW.column_name));
        IF fk THEN
            PERFORM d365._contact_lookup_check(src.contact_table, NEW.column_name, NEW.dynamics_field);
        END IF;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER field_map_check
    BEFORE INSERT OR UPDATE ON d365.field_map
    FOR EACH ROW EXECUTE FUNCTION d365._field_map_check();

-- A changed map applies to contacts already linked: the next run compares
-- every linked contact with its snapshot again, so a newly mapped field is
-- sent (once, where it has a value) and nothing else is.  The capture
-- trigger's WHEN clause follows the map.
CREATE FUNCTION d365._field_map_changed()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source;
BEGIN
    -- Only while the table is attached with its capture triggers.  In a
    -- restore they come after the data (the map is the one they were made
    -- for, not a change); a broken attachment is repaired by attaching again.
    SELECT * INTO src FROM d365.contact_source;
    IF NOT FOUND OR d365._attachment_problem(src) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    UPDATE d365.contact_state SET change_seq = change_seq + 1, pending_since = now()
     WHERE synced IS NOT NULL AND change_seq = synced_seq;
    PERFORM d365._contact_capture_install();
    PERFORM d365._worker_wake(false);
    RETURN NULL;
END;
$$;
-- (a change of match alone changes nothing that is sent)
CREATE TRIGGER field_map_changed
    AFTER INSERT OR UPDATE OF column_name, dynamics_field, direction OR DELETE ON d365.field_map
    FOR EACH STATEMENT EXECUTE FUNCTION d365._field_map_changed();

CREATE FUNCTION d365.d365_attach_contacts(
    contact_table regclass,
    key_column name DEFAULT 'id',
    score_column name DEFAULT 'score')
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    old d365.contact_source;
    col text;
    problem text;
BEGIN
    FOREACH col IN ARRAY ARRAY[key_column, score_column] LOOP
        IF NOT EXISTS (SELECT FROM pg_attribute a
                        WHERE a.attrelid = contact_table AND a.attname = col
                          AND a.attnum > 0 AND NOT a.attisdropped) THEN
            RAISE EXCEPTION 'column "%" does not exist in %', col, contact_table
                USING ERRCODE = 'undefined_column';
        END IF;
    END LOOP;
    IF NOT EXISTS (SELECT FROM pg_index i
                    WHERE i.indrelid = contact_table AND i.indisunique AND i.indnatts = 1
                      AND i.indkey[0] = (SELECT attnum FROM pg_attribute
                                          WHERE attrelid = contact_table AND attname = key_column)) THEN
        RAISE EXCEPTION 'column "%" of % is not a unique key', key_column, contact_table
            USING ERRCODE = 'invalid_table_definition',
                  HINT = 'The key column needs a PRIMARY KEY or UNIQUE constraint of its own.';
    END IF;
    PERFORM d365._check_key_type(contact_table, key_column);
    IF (SELECT format_type(atttypid, NULL) FROM pg_attribute
         WHERE attrelid = contact_table AND attname = score_column)
       NOT IN ('smallint', 'integer', 'bigint', 'numeric', 'real', 'double precision') THEN
        RAISE EXCEPTION 'score column "%" is not numeric', score_column
            USING ERRCODE = 'datatype_mismatch';
    END IF;

    SELECT * INTO old FROM d365.contact_source;
    IF FOUND AND old.contact_table <> contact_table
       AND EXISTS (SELECT FROM pg_class c WHERE c.oid = old.contact_table) THEN
        RAISE EXCEPTION 'contact table % is already attached', old.contact_table
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'A database syncs one contact table.',
                  HINT = 'Call d365_detach_contacts() first.';
    END IF;

    IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = contact_table
                      AND attname = 'dynamics365_related_id' AND NOT attisdropped) THEN
        EXECUTE format('ALTER TABLE %s ADD COLUMN dynamics365_related_id uuid', contact_table);
    END IF;
    IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = contact_table
                      AND attname = 'dynamics365_synchronized_on' AND NOT attisdropped) THEN
        EXECUTE format('ALTER TABLE %s ADD COLUMN dynamics365_synchronized_on timestamptz', contact_table);
    END IF;
    -- link columns that were there already are of the table owner's making
    problem := d365._contact_table_problem(contact_table, score_column);
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'cannot attach %: %', contact_table, problem
            USING ERRCODE = 'datatype_mismatch',
                  HINT = 'd365sync adds the link columns dynamics365_related_id uuid and dynamics365_synchronized_on timestamptz itself; drop or convert columns of other types.';
    END IF;
    -- no two rows linked to one Dynamics record; incoming changes find
    -- their contact through it
    PERFORM d365._link_index_create(contact_table);

    INSERT INTO d365.contact_source AS s (contact_table, key_column, score_column)
    VALUES (contact_table, key_column, score_column)
    ON CONFLICT (singleton) DO UPDATE
       SET contact_table = EXCLUDED.contact_table, key_column = EXCLUDED.key_column,
           score_column = EXCLUDED.score_column;
    PERFORM d365._contact_capture_drop(contact_table);
    PERFORM d365._contact_capture_install();

    -- keys deleted while the table was detached are tombstones: a row
    -- inserted under one of them later gets a Dynamics id of its own
    EXECUTE format('SELECT d365._contact_tombstone(ARRAY('
                   '  SELECT s.contact_key FROM d365.contact_state s'
                   '   WHERE NOT EXISTS (SELECT FROM %s c WHERE c.%I::text = s.contact_key)))',
                   contact_table, key_column);
END;
$$;
COMMENT ON FUNCTION d365.d365_attach_contacts(regclass, name, name) IS
    'Registers the contact table: adds the link columns (with a unique index), the change-capture triggers, the guard of the link columns and the sync state';

CREATE FUNCTION d365.d365_detach_contacts()
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source;
BEGIN
    SELECT * INTO src FROM d365.contact_source;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- the source first: the field map's trigger then has no table to watch
    DELETE FROM d365.contact_source;
    DELETE FROM d365.field_map;
    IF EXISTS (SELECT FROM pg_class c WHERE c.oid = src.contact_table) THEN
        PERFORM d365._contact_capture_drop(src.contact_table);
    END IF;
END;
$$;
COMMENT ON FUNCTION d365.d365_detach_contacts() IS
    'Removes the capture triggers and the field map (also after the table was dropped); the link columns, their values and the sync state stay';

CREATE FUNCTION d365.d365_contact_fields(
    OUT column_name name, OUT data_type text, OUT dynamics_field text, OUT convertible boolean)
RETURNS SETOF record
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT a.attname, format_type(a.atttypid, a.atttypmod), f.dynamics_field,
           d365._json_expr('x', a.atttypid::regtype) IS NOT NULL
      FROM d365.contact_source s
      JOIN pg_attribute a ON a.attrelid = s.contact_table
      LEFT JOIN d365.field_map f ON f.column_name = a.attname
     WHERE a.attnum > 0 AND NOT a.attisdropped
       AND a.attname NOT IN (s.key_column, 'dynamics365_related_id', 'dynamics365_synchronized_on')
     ORDER BY a.attnum
$$;
COMMENT ON FUNCTION d365.d365_contact_fields() IS
    'Columns of the contact table that can be mapped, with their type and current mapping';

/*
 * The attached table for a check of the field map (whose writers hold
 * EXECUTE on d365's functions): as d365._contact_source()
 * but without requiring the capture triggers (d365._attachment_table_problem).
 * A restore loads the field map with the data, before the application
 * table's triggers; d365_status() and every sync still require them.
 */
CREATE FUNCTION d365._contact_source_table()
RETURNS d365.contact_source
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source;
    problem text;
BEGIN
    SELECT * INTO src FROM d365.contact_source;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no contact table is attached'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Call d365_attach_contacts(''your_contacts''::regclass) first.';
    END IF;
    problem := d365._attachment_table_problem(src);
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'the attachment of the contact table is broken: %', problem
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Attach the table again with d365_attach_contacts(), or call d365_detach_contacts().';
    END IF;
    RETURN src;
END;
$$;

-- ---------------------------------------------------------------------------
