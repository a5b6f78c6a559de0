/*
 * d365sync install script (source of sql/d365sync--0.1.sql).
 *
 * Everything lives in schema d365, which CREATE EXTENSION creates.  Nothing
 * here is granted to PUBLIC: an application role gets exactly the GRANTs the
 * README lists.  Configuration tables are marked with
 * pg_extension_config_dump so pg_dump keeps what the user wrote.
 */
\echo Use "CREATE EXTENSION d365sync" to load this file. \quit

-- ---------------------------------------------------------------------------
-- Settings
-- ---------------------------------------------------------------------------

CREATE TABLE d365.settings (
    singleton             boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    org_url               text,
    tenant_id             text,
    client_id             uuid,
    client_secret         text,
    authority_url         text NOT NULL DEFAULT 'https://login.microsoftonline.com',
    api_version           text NOT NULL DEFAULT 'v9.2',
    contact_sync_enabled  boolean NOT NULL DEFAULT false,
    min_score             integer NOT NULL DEFAULT 0,
    activity_sync_enabled boolean NOT NULL DEFAULT false,
    default_owner         text,
    incoming_mapper       regprocedure,
    instance_id           uuid NOT NULL DEFAULT gen_random_uuid()
);

COMMENT ON TABLE d365.settings IS
    'd365sync settings: one row, changed with UPDATE; client_secret is readable only by the table owner';
COMMENT ON COLUMN d365.settings.org_url IS
    'Dynamics 365 organization URL, e.g. https://contoso.crm4.dynamics.com (http:// only for loopback hosts)';
COMMENT ON COLUMN d365.settings.tenant_id IS
    'Microsoft Entra tenant: directory (tenant) id or a verified domain name';
COMMENT ON COLUMN d365.settings.client_id IS
    'Application (client) id of the app registration';
COMMENT ON COLUMN d365.settings.client_secret IS
    'Client secret value of the app registration (never shown in messages)';
COMMENT ON COLUMN d365.settings.authority_url IS
    'Token authority; tokens come from {authority_url}/{tenant_id}/oauth2/v2.0/token';
COMMENT ON COLUMN d365.settings.api_version IS
    'Web API version, e.g. v9.2';
COMMENT ON COLUMN d365.settings.contact_sync_enabled IS
    'Scheduled contact sync runs only when this is true and min_score > 0';
COMMENT ON COLUMN d365.settings.min_score IS
    'Score an unlinked contact must reach to be created in Dynamics';
COMMENT ON COLUMN d365.settings.activity_sync_enabled IS
    'Whether activities are sent to Dynamics';
COMMENT ON COLUMN d365.settings.default_owner IS
    'Owner of created activities: /systemusers(<guid>) or /teams(<guid>), as d365_owners() returns it';
COMMENT ON COLUMN d365.settings.incoming_mapper IS
    'Optional function (dynamics jsonb, local jsonb, mapping jsonb) returning {column: value}; replaces the changed-column computation of incoming changes';
COMMENT ON COLUMN d365.settings.instance_id IS
    'Random id of this installation; Dynamics ids of new contacts are derived from it';

/*
 * Reports why a URL may not be used for Dynamics 365 requests, or NULL when
 * it may.  The HTTP layer applies the same rule to every request.
 */
CREATE FUNCTION d365._url_problem(url text)
RETURNS text
AS 'MODULE_PATHNAME', 'd365_url_problem'
LANGUAGE C STABLE STRICT;

CREATE FUNCTION d365._settings_check()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    problem text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'd365.settings must keep its row'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Change the settings with UPDATE; set a column to NULL to clear it.';
    END IF;

    IF NEW.org_url IS NOT NULL THEN
        NEW.org_url := rtrim(NEW.org_url, '/');
        problem := d365._url_problem(NEW.org_url);
        IF problem IS NOT NULL THEN
            RAISE EXCEPTION 'invalid value for setting "org_url": %', problem
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = format('The value was %L.', NEW.org_url),
                      HINT = 'Use the address of the organization, e.g. https://contoso.crm4.dynamics.com; http:// is accepted only for 127.0.0.1, ::1 and localhost.';
        END IF;
    END IF;

    NEW.authority_url := rtrim(NEW.authority_url, '/');
    problem := d365._url_problem(NEW.authority_url);
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'invalid value for setting "authority_url": %', problem
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('The value was %L.', NEW.authority_url),
                  HINT = 'The default is https://login.microsoftonline.com.';
    END IF;

    IF NEW.tenant_id IS NOT NULL AND
       NEW.tenant_id !~ '^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)+)$' THEN
        RAISE EXCEPTION 'invalid value for setting "tenant_id"'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('%L is neither a GUID nor a domain name.', NEW.tenant_id),
                  HINT = 'Use the Directory (tenant) ID shown on the app registration''s overview page.';
    END IF;

    IF NEW.api_version !~ '^v[0-9]+\.[0-9]+$' THEN
        RAISE EXCEPTION 'invalid value for setting "api_version"'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('%L is not a Web API version.', NEW.api_version),
                  HINT = 'Use a version such as v9.2.';
    END IF;

    IF NEW.min_score < 0 THEN
        RAISE EXCEPTION 'invalid value for setting "min_score"'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('The minimum score must not be negative; it was %s.', NEW.min_score),
                  HINT = 'Use 0 to keep scheduled contact sync off, or a positive score.';
    END IF;

    IF NEW.default_owner IS NOT NULL AND
       NEW.default_owner !~ '^/(systemusers|teams)\([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\)$' THEN
        RAISE EXCEPTION 'invalid value for setting "default_owner"'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('%L is not an owner bind path.', NEW.default_owner),
                  HINT = 'Use /systemusers(<guid>) or /teams(<guid>), as the bind column of d365_owners() shows it.';
    END IF;

    IF NEW.incoming_mapper IS NOT NULL AND NOT EXISTS (
           SELECT FROM pg_proc p
            WHERE p.oid = NEW.incoming_mapper
              AND p.proargtypes = '3802 3802 3802'::oidvector
              AND p.prorettype = 'jsonb'::regtype AND NOT p.proretset) THEN
        RAISE EXCEPTION 'invalid value for setting "incoming_mapper"'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('%s does not take (jsonb, jsonb, jsonb) and return jsonb.', NEW.incoming_mapper),
                  HINT = 'An incoming mapper takes (dynamics jsonb, local jsonb, mapping jsonb) and returns {column: value}.';
    END IF;

    IF TG_OP = 'INSERT' AND EXISTS (SELECT FROM d365.settings) THEN
        -- The table holds exactly one row.  An INSERT (pg_dump's restore of
        -- the configuration among them) replaces its values.
        UPDATE d365.settings
           SET org_url = NEW.org_url, tenant_id = NEW.tenant_id,
               client_id = NEW.client_id, client_secret = NEW.client_secret,
               authority_url = NEW.authority_url, api_version = NEW.api_version,
               contact_sync_enabled = NEW.contact_sync_enabled,
               min_score = NEW.min_score,
               activity_sync_enabled = NEW.activity_sync_enabled,
               default_owner = NEW.default_owner,
               incoming_mapper = NEW.incoming_mapper,
               instance_id = NEW.instance_id;
        RETURN NULL;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER settings_check
    BEFORE INSERT OR UPDATE OR DELETE ON d365.settings
    FOR EACH ROW EXECUTE FUNCTION d365._settings_check();

INSERT INTO d365.settings DEFAULT VALUES;

SELECT pg_catalog.pg_extension_config_dump('d365.settings', '');

-- ---------------------------------------------------------------------------
-- Diagnostics
-- ---------------------------------------------------------------------------

CREATE FUNCTION d365.d365_whoami(
    OUT user_id uuid,
    OUT business_unit_id uuid,
    OUT organization_id uuid,
    OUT dop_hint integer)
RETURNS record
AS 'MODULE_PATHNAME', 'd365_whoami'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION d365.d365_whoami() IS
    'Calls the Dataverse WhoAmI function: checks settings, credentials and connectivity';

-- ---------------------------------------------------------------------------
-- Run history
-- ---------------------------------------------------------------------------

CREATE TABLE d365.sync_run (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    created     integer NOT NULL DEFAULT 0,
    updated     integer NOT NULL DEFAULT 0,
    unchanged   integer NOT NULL DEFAULT 0,
    failed      integer NOT NULL DEFAULT 0,
    unlinked    integer NOT NULL DEFAULT 0,
    requests    integer NOT NULL DEFAULT 0,
    throttled   integer NOT NULL DEFAULT 0,
    message     text
);
CREATE INDEX sync_run_kind_idx ON d365.sync_run (kind, id);
SELECT pg_catalog.pg_extension_config_dump('d365.sync_run', '');
SELECT pg_catalog.pg_extension_config_dump('d365.sync_run_id_seq', '');
COMMENT ON TABLE d365.sync_run IS
    'One row per sync run: what it did, the HTTP requests it made, and why it stopped early if it did';

-- ---------------------------------------------------------------------------
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
    dynamics_field text NOT NULL
);
COMMENT ON TABLE d365.field_map IS
    'Contact column -> Dynamics attribute; unmapped columns are never sent. A lookup maps a uuid column to <navigation property>@odata.bind';
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
    last_error        text
);
CREATE INDEX contact_state_failing_idx ON d365.contact_state (next_attempt_at)
    WHERE attempts > 0;
-- dumped with the configuration: without it a restored database would send
-- every linked contact's mapped values once more
SELECT pg_catalog.pg_extension_config_dump('d365.contact_state', '');
COMMENT ON TABLE d365.contact_state IS
    'Sync state of each contact: pending changes, last synced values, failures and back-off';

-- Contact capture trigger: count a change of anything but the link columns.
-- It runs as the extension owner, so whoever may write the contact table
-- needs no rights on d365's tables.
CREATE FUNCTION d365._contact_capture()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        -- keep a tombstone: a contact inserted later under the same key gets
        -- a new Dynamics id, never the deleted contact's record
        UPDATE d365.contact_state
           SET generation = generation + 1, synced = NULL, synced_seq = change_seq,
               remote_deleted_at = NULL, attempts = 0, next_attempt_at = NULL,
               last_error = NULL, last_error_code = NULL
         WHERE contact_key = to_jsonb(OLD) ->> TG_ARGV[0];
        RETURN NULL;
    END IF;
    INSERT INTO d365.contact_state AS s (contact_key)
    VALUES (to_jsonb(NEW) ->> TG_ARGV[0])
    ON CONFLICT (contact_key) DO UPDATE SET change_seq = s.change_seq + 1;
    RETURN NULL;
END;
$$;

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
 * The JSON expression of one mapped column, converted as SPEC section 2
 * says; NULL when the column's type cannot be converted.  bind_set turns a
 * uuid into a lookup bind path /<entity set>(<uuid>).
 */
CREATE FUNCTION d365._json_expr(expr text, typ regtype, bind_set text DEFAULT NULL)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN bind_set IS NOT NULL AND base IN ('uuid'::regtype, 'text'::regtype, 'character varying'::regtype)
            THEN format('to_jsonb(%L || (%s)::text || '')'')', '/' || bind_set || '(', expr)
        WHEN bind_set IS NOT NULL THEN NULL
        WHEN base IN ('text'::regtype, 'character varying'::regtype, 'character'::regtype,
                      'name'::regtype, 'smallint'::regtype, 'integer'::regtype,
                      'bigint'::regtype, 'numeric'::regtype, 'real'::regtype,
                      'double precision'::regtype, 'boolean'::regtype)
            THEN format('to_jsonb(%s)', expr)
        WHEN base = 'uuid'::regtype THEN format('to_jsonb((%s)::text)', expr)
        WHEN base = 'date'::regtype
            THEN format('to_jsonb(to_char(%s, ''YYYY-MM-DD''))', expr)
        WHEN base IN ('timestamp with time zone'::regtype, 'timestamp without time zone'::regtype)
            THEN format('to_jsonb(to_char((%s)::timestamptz AT TIME ZONE ''UTC'', ''YYYY-MM-DD"T"HH24:MI:SS"Z"''))', expr)
        WHEN typtype = 'e'
            THEN format('to_jsonb((%s)::text)', expr)
        ELSE NULL
    END
    FROM (SELECT coalesce(nullif(t.typbasetype, 0), t.oid)::regtype AS base,
                 (SELECT b.typtype FROM pg_type b
                   WHERE b.oid = coalesce(nullif(t.typbasetype, 0), t.oid)) AS typtype
            FROM pg_type t WHERE t.oid = typ) b
$$;

/*
 * Contact keys are smallint, integer, bigint, text, varchar or uuid: their
 * text form is stable (no padding, no DateStyle) and their conversions are
 * built in, so code running as the extension owner never runs a cast or an
 * output function a user wrote.
 */
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
    IF typ IS NULL OR typ NOT IN ('smallint'::regtype, 'integer'::regtype, 'bigint'::regtype,
                                  'text'::regtype, 'character varying'::regtype, 'uuid'::regtype) THEN
        RAISE EXCEPTION 'key column "%" of % has type %, which d365sync does not support',
                        key_column, tbl, coalesce(typ::text, 'none')
            USING ERRCODE = 'datatype_mismatch',
                  HINT = 'Use a key of type smallint, integer, bigint, text, varchar or uuid.';
    END IF;
END;
$$;

-- A contact key passed by the application, as text; only the key types
-- above are accepted (see _check_key_type).
CREATE FUNCTION d365._key_text(contact_key anyelement)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pg_typeof(contact_key) NOT IN ('smallint'::regtype, 'integer'::regtype, 'bigint'::regtype,
                                      'text'::regtype, 'character varying'::regtype, 'uuid'::regtype) THEN
        RAISE EXCEPTION 'a contact key of type % is not supported', pg_typeof(contact_key)
            USING ERRCODE = 'datatype_mismatch',
                  HINT = 'Pass the key as smallint, integer, bigint, text, varchar or uuid.';
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
BEGIN
    SELECT * INTO src FROM d365.contact_source;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no contact table is attached'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Call d365_attach_contacts(''your_contacts''::regclass) first.';
    END IF;
    PERFORM d365._check_key_type(src.contact_table, src.key_column);
    RETURN src;
END;
$$;

-- When a failed item is tried again: 5 minutes, 10, 20, ... at most a day.
CREATE FUNCTION d365._next_attempt(failures integer)
RETURNS timestamptz
LANGUAGE sql STABLE
AS $$ SELECT now() + least(interval '5 minutes' * power(2, greatest(failures - 1, 0)), interval '1 day') $$;

-- Field map validation: the column must exist and be mappable.
CREATE FUNCTION d365._field_map_check()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source;
    typ regtype;
BEGIN
    src := d365._contact_source();
    IF NEW.column_name IN (src.key_column, 'dynamics365_related_id', 'dynamics365_synchronized_on') THEN
        RAISE EXCEPTION 'column "%" cannot be mapped', NEW.column_name
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'The key column and the link columns are managed by d365sync.',
                  HINT = 'Map one of the columns d365_contact_fields() lists.';
    END IF;
    SELECT a.atttypid::regtype INTO typ
      FROM pg_attribute a
     WHERE a.attrelid = src.contact_table AND a.attname = NEW.column_name
       AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'column "%" does not exist in %', NEW.column_name, src.contact_table
            USING ERRCODE = 'undefined_column',
                  HINT = 'd365_contact_fields() lists the columns that can be mapped.';
    END IF;
    IF NEW.dynamics_field !~ '^[a-z_][a-z0-9_]*(@odata\.bind)?$' THEN
        RAISE EXCEPTION 'invalid Dynamics field name "%"', NEW.dynamics_field
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'Dynamics attributes are written by their lowercase logical name.',
                  HINT = 'Use a logical name such as emailaddress1, or <lookup>_<target>@odata.bind for a lookup; d365_dynamics_fields() lists them.';
    END IF;
    IF d365._json_expr('x', typ, CASE WHEN NEW.dynamics_field LIKE '%@odata.bind' THEN 'set' END) IS NULL THEN
        RAISE EXCEPTION 'column "%" of type % cannot be sent to Dynamics', NEW.column_name, typ
            USING ERRCODE = 'datatype_mismatch',
                  DETAIL = CASE WHEN NEW.dynamics_field LIKE '%@odata.bind'
                                THEN 'A lookup (@odata.bind) is written from a uuid column.'
                                ELSE 'Supported types: text, varchar, char, integers, numeric, real, double precision, boolean, date, timestamp, timestamptz, uuid and enums.' END,
                  HINT = 'Map a column of a supported type, or a generated column that converts this one.';
    END IF;
    IF EXISTS (SELECT FROM d365.field_map f
                WHERE f.dynamics_field = NEW.dynamics_field
                  AND f.column_name <> NEW.column_name) THEN
        RAISE EXCEPTION 'Dynamics field "%" is already mapped', NEW.dynamics_field
            USING ERRCODE = 'unique_violation',
                  HINT = 'Each Dynamics field takes its value from one column.';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER field_map_check
    BEFORE INSERT OR UPDATE ON d365.field_map
    FOR EACH ROW EXECUTE FUNCTION d365._field_map_check();

-- A changed map applies to contacts already linked: the next run compares
-- every linked contact with its snapshot again, so a newly mapped field is
-- sent (once, where it has a value) and nothing else is.
CREATE FUNCTION d365._field_map_changed()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE d365.contact_state SET change_seq = change_seq + 1
     WHERE synced IS NOT NULL AND change_seq = synced_seq;
    RETURN NULL;
END;
$$;
CREATE TRIGGER field_map_changed
    AFTER INSERT OR UPDATE OR DELETE ON d365.field_map
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
    IF FOUND AND old.contact_table <> contact_table THEN
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
    EXECUTE format('CREATE OR REPLACE TRIGGER d365_capture AFTER INSERT OR DELETE ON %s'
                   ' FOR EACH ROW EXECUTE FUNCTION d365._contact_capture(%L)',
                   contact_table, key_column);
    EXECUTE format('CREATE OR REPLACE TRIGGER d365_capture_update AFTER UPDATE ON %s FOR EACH ROW'
                   ' WHEN ((to_jsonb(OLD) - ''{dynamics365_related_id,dynamics365_synchronized_on}''::text[])'
                   ' IS DISTINCT FROM (to_jsonb(NEW) - ''{dynamics365_related_id,dynamics365_synchronized_on}''::text[]))'
                   ' EXECUTE FUNCTION d365._contact_capture(%L)',
                   contact_table, key_column);

    INSERT INTO d365.contact_source AS s (contact_table, key_column, score_column)
    VALUES (contact_table, key_column, score_column)
    ON CONFLICT (singleton) DO UPDATE
       SET contact_table = EXCLUDED.contact_table, key_column = EXCLUDED.key_column,
           score_column = EXCLUDED.score_column;

    -- contacts that exist already get their state row
    EXECUTE format('INSERT INTO d365.contact_state (contact_key)'
                   ' SELECT %I::text FROM %s ON CONFLICT DO NOTHING', key_column, contact_table);
END;
$$;
COMMENT ON FUNCTION d365.d365_attach_contacts(regclass, name, name) IS
    'Registers the contact table: adds the link columns, the change-capture triggers and the sync state';

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
    EXECUTE format('DROP TRIGGER IF EXISTS d365_capture ON %s', src.contact_table);
    EXECUTE format('DROP TRIGGER IF EXISTS d365_capture_update ON %s', src.contact_table);
    DELETE FROM d365.field_map;
    DELETE FROM d365.contact_source;
END;
$$;
COMMENT ON FUNCTION d365.d365_detach_contacts() IS
    'Removes the capture triggers and the field map; the link columns, their values and the sync state stay';

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

-- ---------------------------------------------------------------------------
-- Dynamics metadata, cached
-- ---------------------------------------------------------------------------

CREATE TABLE d365.metadata_cache (
    path       text PRIMARY KEY,
    fetched_at timestamptz NOT NULL,
    body       jsonb NOT NULL
);
COMMENT ON TABLE d365.metadata_cache IS
    'Web API metadata responses, kept for an hour; DELETE FROM d365.metadata_cache to fetch them again';

-- GET a Web API path (relative to the service root), following every
-- @odata.nextLink; one row per element of "value" (or the body itself).
CREATE FUNCTION d365._get_all(path text)
RETURNS SETOF jsonb
AS 'MODULE_PATHNAME', 'd365_get_all'
LANGUAGE C VOLATILE STRICT;

CREATE FUNCTION d365._get_cached(path text)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    result jsonb;
BEGIN
    SELECT c.body INTO result FROM d365.metadata_cache c
     WHERE c.path = _get_cached.path AND c.fetched_at > now() - interval '1 hour';
    IF FOUND THEN
        RETURN result;
    END IF;
    SELECT coalesce(jsonb_agg(r), '[]') INTO result FROM d365._get_all(path) r;
    INSERT INTO d365.metadata_cache AS c (path, fetched_at, body)
    VALUES (_get_cached.path, now(), result)
    ON CONFLICT ON CONSTRAINT metadata_cache_pkey
    DO UPDATE SET fetched_at = EXCLUDED.fetched_at, body = EXCLUDED.body;
    RETURN result;
END;
$$;

CREATE FUNCTION d365._metadata(entity text)
RETURNS SETOF jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF entity IS NULL OR entity !~ '^[a-z][a-z0-9_]*$' THEN
        RAISE EXCEPTION 'invalid entity logical name %', coalesce(quote_literal(entity), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Entities are named by their lowercase logical name, e.g. contact or new_pageview.';
    END IF;
    RETURN QUERY SELECT jsonb_array_elements(d365._get_cached(format(
        'EntityDefinitions(LogicalName=''%s'')/Attributes?$select=LogicalName,AttributeType,IsValidForCreate,IsValidForUpdate,DisplayName',
        entity)));
END;
$$;

CREATE FUNCTION d365._entity_set(entity text)
RETURNS text
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT e ->> 'EntitySetName'
      FROM jsonb_array_elements(d365._get_cached(
               'EntityDefinitions?$select=LogicalName,EntitySetName,IsActivity')) e
     WHERE e ->> 'LogicalName' = entity
       AND e ->> 'EntitySetName' ~ '^[A-Za-z0-9_]+$'
$$;

-- Lookup mappings: the entity set each <lookup>_<target>@odata.bind points
-- to, from Dynamics metadata (fetched only when a lookup is mapped).
CREATE FUNCTION d365._lookup_binds(OUT dynamics_field text, OUT entity_set text, OUT attribute text)
RETURNS SETOF record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    f record;
    nav text;
    target text;
BEGIN
    FOR f IN SELECT m.dynamics_field FROM d365.field_map m
              WHERE m.dynamics_field LIKE '%@odata.bind' LOOP
        nav := split_part(f.dynamics_field, '@', 1);
        target := NULL;
        SELECT t, a ->> 'LogicalName' INTO target, attribute
          FROM d365._metadata('contact') a,
               LATERAL jsonb_array_elements_text(coalesce(a -> 'Targets', '[]')) t
         WHERE nav = (a ->> 'LogicalName') || '_' || t
            OR (nav = a ->> 'LogicalName' AND jsonb_array_length(a -> 'Targets') = 1)
         LIMIT 1;
        IF target IS NULL THEN
            RAISE EXCEPTION 'Dynamics field "%" is not a lookup of contact', f.dynamics_field
                USING ERRCODE = 'undefined_object',
                      HINT = 'Use <lookup attribute>_<target entity>@odata.bind, e.g. parentcustomerid_account@odata.bind.';
        END IF;
        dynamics_field := f.dynamics_field;
        entity_set := d365._entity_set(target);
        RETURN NEXT;
    END LOOP;
END;
$$;

CREATE FUNCTION d365.d365_dynamics_fields(
    entity text DEFAULT 'contact',
    OUT logical_name text, OUT display_name text, OUT attribute_type text,
    OUT valid_for_create boolean, OUT valid_for_update boolean)
RETURNS SETOF record
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT a ->> 'LogicalName',
           a #>> '{DisplayName,UserLocalizedLabel,Label}',
           a ->> 'AttributeType',
           (a ->> 'IsValidForCreate')::boolean,
           (a ->> 'IsValidForUpdate')::boolean
      FROM d365._metadata(entity) a
     ORDER BY 1
$$;
COMMENT ON FUNCTION d365.d365_dynamics_fields(text) IS
    'Attributes of a Dynamics entity, from Web API metadata (cached for an hour)';

CREATE FUNCTION d365._type_problem(atype text, ctype text, is_bind boolean, name text)
RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE
        WHEN is_bind AND atype NOT IN ('Lookup', 'Customer', 'Owner')
            THEN format('attribute %s is %s, not a lookup', name, atype)
        WHEN is_bind AND ctype NOT IN ('uuid', 'text', 'character varying')
            THEN format('a lookup takes a GUID but the column is %s', ctype)
        WHEN is_bind THEN NULL
        WHEN atype IN ('Lookup', 'Customer', 'Owner')
            THEN format('attribute %s is a lookup: map it as %s_<target>@odata.bind', name, name)
        WHEN atype IN ('Virtual', 'PartyList', 'EntityName', 'CalendarRules', 'ManagedProperty')
            THEN format('attribute %s (%s) cannot be written', name, atype)
        WHEN atype IN ('String', 'Memo')
             AND ctype NOT IN ('text', 'character varying', 'character', 'name', 'uuid')
             AND ctype NOT LIKE 'character%'
            THEN format('attribute %s is text but the column is %s', name, ctype)
        WHEN atype IN ('Integer', 'BigInt', 'Picklist', 'State', 'Status')
             AND ctype NOT IN ('smallint', 'integer', 'bigint')
            THEN format('attribute %s takes an integer but the column is %s', name, ctype)
        WHEN atype IN ('Decimal', 'Double', 'Money')
             AND ctype NOT IN ('smallint', 'integer', 'bigint', 'numeric', 'real', 'double precision')
             AND ctype NOT LIKE 'numeric%'
            THEN format('attribute %s takes a number but the column is %s', name, ctype)
        WHEN atype = 'Boolean' AND ctype <> 'boolean'
            THEN format('attribute %s takes a boolean but the column is %s', name, ctype)
        WHEN atype = 'DateTime'
             AND ctype NOT IN ('date', 'timestamp with time zone', 'timestamp without time zone')
            THEN format('attribute %s takes a date or time but the column is %s', name, ctype)
        WHEN atype = 'Uniqueidentifier' AND ctype NOT IN ('uuid', 'text')
            THEN format('attribute %s takes a GUID but the column is %s', name, ctype)
    END
$$;

CREATE FUNCTION d365.d365_validate_mapping(
    OUT column_name name, OUT dynamics_field text, OUT problem text)
RETURNS SETOF record
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH meta AS (SELECT a ->> 'LogicalName' AS name, a ->> 'AttributeType' AS atype,
                         (a ->> 'IsValidForCreate')::boolean AS cre,
                         (a ->> 'IsValidForUpdate')::boolean AS upd,
                         coalesce(a -> 'Targets', '[]') AS targets
                    FROM d365._metadata('contact') a),
         maps AS (SELECT f.column_name, f.dynamics_field,
                         split_part(f.dynamics_field, '@', 1) AS nav,
                         f.dynamics_field LIKE '%@odata.bind' AS is_bind,
                         format_type(a.atttypid, NULL) AS ctype
                    FROM d365.field_map f
                    CROSS JOIN d365.contact_source s
                    LEFT JOIN pg_attribute a ON a.attrelid = s.contact_table
                         AND a.attname = f.column_name AND a.attnum > 0 AND NOT a.attisdropped),
         matched AS (SELECT m.*, x.name, x.atype, x.cre, x.upd
                       FROM maps m
                       LEFT JOIN LATERAL (
                           SELECT meta.* FROM meta
                            WHERE (NOT m.is_bind AND meta.name = m.nav)
                               OR (m.is_bind AND (m.nav = meta.name
                                   OR EXISTS (SELECT FROM jsonb_array_elements_text(meta.targets) t
                                               WHERE m.nav = meta.name || '_' || t)))
                            LIMIT 1) x ON true),
         judged AS (SELECT column_name, dynamics_field,
                           CASE
                             WHEN ctype IS NULL THEN 'the column no longer exists'
                             WHEN name IS NULL THEN 'no such attribute in Dynamics'
                             WHEN NOT cre AND NOT upd THEN format('attribute %s is read-only in Dynamics', name)
                             WHEN NOT upd THEN format('attribute %s can be set on create only, so changes would fail', name)
                             WHEN NOT cre THEN format('attribute %s cannot be set on create', name)
                             ELSE d365._type_problem(atype, ctype, is_bind, name)
                           END AS problem
                      FROM matched)
    SELECT column_name, dynamics_field, problem FROM judged
     WHERE problem IS NOT NULL
     ORDER BY column_name
$$;
COMMENT ON FUNCTION d365.d365_validate_mapping() IS
    'Mappings whose Dynamics field does not exist, is not writable, or does not fit the column''s type';

CREATE FUNCTION d365.d365_owners(
    OUT kind text, OUT id uuid, OUT name text, OUT email text, OUT bind text)
RETURNS SETOF record
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM (
        SELECT 'user' AS kind, (u ->> 'systemuserid')::uuid AS id, u ->> 'fullname' AS name,
               u ->> 'internalemailaddress' AS email,
               '/systemusers(' || (u ->> 'systemuserid') || ')' AS bind
          FROM d365._get_all('systemusers?$select=systemuserid,fullname,internalemailaddress,accessmode,isdisabled') u
         WHERE coalesce((u ->> 'accessmode')::int, 0) < 4
           AND NOT coalesce((u ->> 'isdisabled')::boolean, false)
        UNION ALL
        SELECT 'team', (t ->> 'teamid')::uuid, t ->> 'name', NULL, '/teams(' || (t ->> 'teamid') || ')'
          FROM d365._get_all('teams?$select=teamid,name,teamtype') t) o
     ORDER BY kind DESC, name
$$;
COMMENT ON FUNCTION d365.d365_owners() IS
    'Dynamics users (interactive ones) and teams that can own synced records, with the bind path for default_owner';

-- ---------------------------------------------------------------------------
-- Outgoing contact sync: the select and record stages (SQL), the send
-- stage is the C pipeline (src/pipeline.c).
-- ---------------------------------------------------------------------------

/*
 * The map stage of contacts, outgoing: one jsonb expression over the contact
 * row "c" that yields {dynamics_field: value} for every mapped column,
 * converted as SPEC section 2 says.  Raises when a mapped column is gone or
 * cannot be converted.
 */
CREATE FUNCTION d365._contact_values_expr()
RETURNS text
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source;
    cur text := '''{}''::jsonb';
    m record;
    expr text;
BEGIN
    SELECT * INTO src FROM d365.contact_source;
    FOR m IN SELECT f.column_name, f.dynamics_field, a.atttypid::regtype AS typ, b.entity_set
               FROM d365.field_map f
               LEFT JOIN pg_attribute a ON a.attrelid = src.contact_table
                    AND a.attname = f.column_name AND a.attnum > 0 AND NOT a.attisdropped
               LEFT JOIN d365._lookup_binds() b ON b.dynamics_field = f.dynamics_field
              ORDER BY f.column_name
    LOOP
        IF m.typ IS NULL THEN
            RAISE EXCEPTION 'mapped column "%" no longer exists in %', m.column_name, src.contact_table
                USING ERRCODE = 'undefined_column',
                      HINT = format('DELETE FROM d365.field_map WHERE column_name = %L;', m.column_name);
        END IF;
        expr := d365._json_expr(format('c.%I', m.column_name), m.typ, m.entity_set);
        IF expr IS NULL THEN
            RAISE EXCEPTION 'mapped column "%" of type % cannot be sent to Dynamics', m.column_name, m.typ
                USING ERRCODE = 'datatype_mismatch',
                      HINT = 'Change the column''s type or its mapping.';
        END IF;
        cur := cur || format(' || jsonb_build_object(%L, %s)', m.dynamics_field, expr);
    END LOOP;
    RETURN cur;
END;
$$;

/*
 * The work query of a contact sync: one row per contact to consider, with
 * the request to send (none when nothing changed) and a context that
 * d365._contact_record() gets back.  A create is an upsert on the id the
 * contact will have (no If-Match); an update carries If-Match: * so that it
 * never re-creates a contact deleted in Dynamics.  The map stage is here: the mapped
 * columns become one jsonb object converted as SPEC section 2 says, and for
 * a linked contact the body is the part of it that differs from the synced
 * snapshot (a NULL clears the Dynamics value).
 *
 * scheduled = true: the job's selection (qualifying unlinked contacts,
 * linked contacts with pending changes, past their back-off).
 * scheduled = false: the one contact whose key is $1, whatever its score.
 */
CREATE FUNCTION d365._contact_work_sql(scheduled boolean)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source;
    key_type text;
    cur text;
    sel text;
BEGIN
    src := d365._contact_source();
    SELECT format_type(a.atttypid, a.atttypmod) INTO key_type
      FROM pg_attribute a WHERE a.attrelid = src.contact_table AND a.attname = src.key_column;
    cur := d365._contact_values_expr();

    IF scheduled THEN
        sel := format(
            '((c.dynamics365_related_id IS NULL AND c.%1$I >= (SELECT min_score FROM d365.settings)'
            '   AND (s.remote_deleted_at IS NULL OR s.change_seq > s.synced_seq))'
            ' OR (c.dynamics365_related_id IS NOT NULL'
            '   AND (s.contact_key IS NULL OR s.change_seq > s.synced_seq)))'
            ' AND (s.next_attempt_at IS NULL OR s.next_attempt_at <= now())',
            src.score_column);
    ELSE
        sel := format('c.%I = $1::%s', src.key_column, key_type);
    END IF;

    RETURN format($q$
        SELECT w.item_key,
               CASE WHEN w.body IS NULL THEN '[]'
                    ELSE jsonb_build_array(jsonb_build_object(
                             'method', 'PATCH',
                             'path', 'contacts(' || w.dynamics_id || ')',
                             'body', w.body::text,
                             'headers', CASE WHEN w.linked THEN '["If-Match: *"]'::jsonb
                                             ELSE '[]'::jsonb END))::text
               END AS requests,
               jsonb_build_object('action', CASE WHEN NOT w.linked THEN 'create'
                                                 WHEN w.body IS NULL THEN 'unchanged'
                                                 ELSE 'update' END,
                                  'id', w.dynamics_id, 'seq', w.change_seq,
                                  'generation', w.generation, 'values', w.cur,
                                  'sent', w.body)::text AS context
          FROM (SELECT v.*,
                       CASE WHEN NOT v.linked THEN jsonb_strip_nulls(v.cur)
                            ELSE (SELECT jsonb_object_agg(e.key, e.value)
                                    FROM jsonb_each(v.cur) e
                                   WHERE (v.synced IS NULL AND e.value <> 'null'::jsonb)
                                      OR (v.synced IS NOT NULL
                                          AND e.value IS DISTINCT FROM coalesce(v.synced -> e.key, 'null'::jsonb)))
                       END AS body
                  FROM (SELECT c.%1$I::text AS item_key,
                               c.dynamics365_related_id IS NOT NULL AS linked,
                               coalesce(c.dynamics365_related_id,
                                        d365._contact_guid(c.%1$I::text, coalesce(s.generation, 0))) AS dynamics_id,
                               coalesce(s.change_seq, 0) AS change_seq,
                               coalesce(s.generation, 0) AS generation,
                               s.synced,
                               %2$s AS cur
                          FROM %3$s c
                          LEFT JOIN d365.contact_state s ON s.contact_key = c.%1$I::text
                         WHERE %4$s
                        OFFSET 0) v) w
    $q$, src.key_column, cur, src.contact_table, sel);
END;
$$;

/*
 * The record stage of a contact sync: link columns, sync state, failures
 * and back-off for a chunk of outcomes (one array element per item).
 * No SET search_path here, nor on the incoming functions: they run with
 * their caller's rights and update the application's table, whose own
 * triggers expect the session's search_path (every name below is qualified,
 * and pg_catalog is searched first anyway).
 * Returns the chunk's counts.
 */
CREATE FUNCTION d365._contact_record(
    item_keys text[], contexts text[], statuses integer[],
    error_codes text[], error_messages text[],
    OUT created integer, OUT updated integer, OUT unchanged integer,
    OUT failed integer, OUT unlinked integer)
RETURNS record
LANGUAGE plpgsql
-- a chunk against the whole table: always by index, so a chunk's cost does
-- not grow with the table (the planner knows nothing of the chunk's size)
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
DECLARE
    src d365.contact_source;
    key_type text;
BEGIN
    SELECT * INTO src FROM d365.contact_source;
    SELECT format_type(a.atttypid, a.atttypmod) INTO key_type
      FROM pg_attribute a WHERE a.attrelid = src.contact_table AND a.attname = src.key_column;

    IF to_regclass('pg_temp.d365_contact_outcome') IS NULL THEN
        CREATE TEMP TABLE d365_contact_outcome (
            item_key text, action text, dynamics_id uuid, seq bigint, generation integer,
            vals jsonb, sent jsonb, status integer, error_code text, error_message text,
            ok boolean, gone boolean
        ) ON COMMIT DROP;
    ELSE
        TRUNCATE d365_contact_outcome;
    END IF;
    INSERT INTO d365_contact_outcome
    SELECT o.k, x.c ->> 'action', (x.c ->> 'id')::uuid, (x.c ->> 'seq')::bigint,
           (x.c ->> 'generation')::integer, x.c -> 'values', nullif(x.c -> 'sent', 'null'),
           o.st, o.code, o.msg,
           (x.c ->> 'action') = 'unchanged' OR (o.st BETWEEN 200 AND 299 AND o.msg IS NULL),
           (x.c ->> 'action') = 'update' AND o.st = 404
      FROM unnest(item_keys, contexts, statuses, error_codes, error_messages)
               AS o(k, ctx, st, code, msg),
           LATERAL (SELECT o.ctx::jsonb AS c) x;

    -- created or updated: link and stamp the contact
    EXECUTE format(
        'UPDATE %s t SET dynamics365_related_id = o.dynamics_id,'
        '               dynamics365_synchronized_on = now()'
        '  FROM d365_contact_outcome o'
        ' WHERE o.ok AND o.action IN (''create'', ''update'') AND t.%I = o.item_key::%s',
        src.contact_table, src.key_column, key_type);

    -- success (or nothing to send): remember what Dynamics now holds.  A
    -- create sent every value; an update only the fields it carried, merged
    -- into the snapshot (which an incoming change may have moved meanwhile).
    INSERT INTO d365.contact_state (contact_key, change_seq, synced_seq)
    SELECT o.item_key, o.seq, o.seq FROM d365_contact_outcome o WHERE o.ok
    ON CONFLICT (contact_key) DO NOTHING;
    UPDATE d365.contact_state s
       SET synced = CASE WHEN o.action = 'create' OR s.synced IS NULL THEN o.vals
                         ELSE s.synced || coalesce(o.sent, '{}') END,
           synced_seq = o.seq, generation = o.generation, attempts = 0,
           next_attempt_at = NULL, last_attempt_at = now(),
           last_status = coalesce(o.status, s.last_status),
           last_error_code = NULL, last_error = NULL, remote_deleted_at = NULL
      FROM d365_contact_outcome o
     WHERE o.ok AND s.contact_key = o.item_key;

    -- deleted in Dynamics: unlink and report; a re-creation gets a new id
    EXECUTE format(
        'UPDATE %s t SET dynamics365_related_id = NULL, dynamics365_synchronized_on = NULL'
        '  FROM d365_contact_outcome o'
        ' WHERE o.gone AND t.%I = o.item_key::%s AND t.dynamics365_related_id = o.dynamics_id',
        src.contact_table, src.key_column, key_type);
    UPDATE d365.contact_state s
       SET synced = NULL, synced_seq = o.seq, generation = s.generation + 1,
           remote_deleted_at = now(), attempts = 0, next_attempt_at = NULL,
           last_attempt_at = now(), last_status = o.status, last_error_code = o.error_code,
           last_error = 'deleted in Dynamics 365, unlinked: ' || coalesce(o.error_message, '')
      FROM d365_contact_outcome o
     WHERE o.gone AND s.contact_key = o.item_key;

    -- other failures: stay pending, back off 5 min, 10 min, ... up to a day
    INSERT INTO d365.contact_state AS s
           (contact_key, attempts, next_attempt_at, last_attempt_at, last_status,
            last_error_code, last_error)
    SELECT o.item_key, 1, d365._next_attempt(1), now(), nullif(o.status, 0),
           o.error_code, o.error_message
      FROM d365_contact_outcome o
     WHERE NOT o.ok AND NOT o.gone
    ON CONFLICT (contact_key) DO UPDATE
       SET attempts = s.attempts + 1,
           next_attempt_at = d365._next_attempt(s.attempts + 1),
           last_attempt_at = now(), last_status = EXCLUDED.last_status,
           last_error_code = EXCLUDED.last_error_code, last_error = EXCLUDED.last_error;

    SELECT count(*) FILTER (WHERE ok AND action = 'create'),
           count(*) FILTER (WHERE ok AND action = 'update'),
           count(*) FILTER (WHERE action = 'unchanged'),
           count(*) FILTER (WHERE NOT ok AND NOT gone),
           count(*) FILTER (WHERE gone)
      INTO created, updated, unchanged, failed, unlinked
      FROM d365_contact_outcome;
END;
$$;

CREATE FUNCTION d365._contact_link(contact_key text)
RETURNS uuid
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source;
    result uuid;
BEGIN
    SELECT * INTO src FROM d365.contact_source;
    EXECUTE format('SELECT dynamics365_related_id FROM %s WHERE %I::text = $1',
                   src.contact_table, src.key_column)
       INTO result USING contact_key;
    RETURN result;
END;
$$;

CREATE FUNCTION d365.d365_sync_contact(contact_key anyelement)
RETURNS uuid
AS 'MODULE_PATHNAME', 'd365_sync_contact'
LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION d365.d365_sync_contact(anyelement) IS
    'Creates or updates one contact in Dynamics now, whatever its score and the enabled flag; returns its Dynamics id';

CREATE FUNCTION d365.d365_sync_contacts(
    OUT created integer, OUT updated integer, OUT unchanged integer,
    OUT failed integer, OUT unlinked integer, OUT requests integer)
RETURNS record
AS 'MODULE_PATHNAME', 'd365_sync_contacts'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION d365.d365_sync_contacts() IS
    'The scheduled contact sync: creates qualifying contacts and sends the changed fields of linked ones';

-- ---------------------------------------------------------------------------
-- Activities: the local log, type mapping, bodies, and the engine's SQL
-- stages (the send stage is the C pipeline).
-- ---------------------------------------------------------------------------

/*
 * The activity log.  dynamics_activity_id is chosen when the activity is
 * logged, so every attempt to create it addresses the same Dynamics record
 * (create-only upsert: a retry after a lost commit finds it there instead of
 * making a second one).  synced_at NULL means pending.
 */
CREATE TABLE d365.activity (
    id                   bigserial PRIMARY KEY,
    contact_key          text NOT NULL,
    activity_type        text NOT NULL CHECK (activity_type <> ''),
    subject              text,
    details              jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(details) = 'object'),
    occurred_at          timestamptz NOT NULL DEFAULT now(),
    logged_at            timestamptz NOT NULL DEFAULT now(),
    dynamics_activity_id uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    dynamics_entity      text,
    synced_at            timestamptz,
    attempts             integer NOT NULL DEFAULT 0,
    next_attempt_at      timestamptz,
    last_status          integer,
    last_error_code      text,
    last_error           text
);
CREATE INDEX activity_pending_idx ON d365.activity (contact_key, id) WHERE synced_at IS NULL;
COMMENT ON TABLE d365.activity IS
    'Local activity log; an activity is pending until synced_at is set, and is sent once';
COMMENT ON COLUMN d365.activity.dynamics_activity_id IS
    'The id the activity has (once synced_at is set) in Dynamics';
SELECT pg_catalog.pg_extension_config_dump('d365.activity', '');
SELECT pg_catalog.pg_extension_config_dump('d365.activity_id_seq', '');

CREATE TABLE d365.activity_type_map (
    activity_type   text PRIMARY KEY,
    dynamics_entity text NOT NULL CHECK (dynamics_entity ~ '^[a-z][a-z0-9_]*$')
);
COMMENT ON TABLE d365.activity_type_map IS
    'Activity type -> Dynamics activity entity (logical name); types not listed map to themselves';
SELECT pg_catalog.pg_extension_config_dump('d365.activity_type_map', '');

-- A new or changed type mapping applies at once to the pending activities
-- it concerns, instead of after their back-off.
CREATE FUNCTION d365._activity_retry_now()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE d365.activity SET next_attempt_at = NULL
     WHERE synced_at IS NULL AND activity_type = NEW.activity_type;
    RETURN NULL;
END;
$$;
CREATE TRIGGER activity_type_map_retry
    AFTER INSERT OR UPDATE ON d365.activity_type_map
    FOR EACH ROW EXECUTE FUNCTION d365._activity_retry_now();

CREATE TABLE d365.activity_mapper (
    dynamics_entity text PRIMARY KEY,
    mapper          regprocedure NOT NULL
);
COMMENT ON TABLE d365.activity_mapper IS
    'Custom body mapping: mapper(dynamics_entity text, dynamics_contact_id uuid, activity jsonb) returns jsonb merged over the built-in body';
SELECT pg_catalog.pg_extension_config_dump('d365.activity_mapper', '');

CREATE FUNCTION d365._activity_mapper_check()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_proc p
                    WHERE p.oid = NEW.mapper
                      AND p.proargtypes = '25 2950 3802'::oidvector
                      AND p.prorettype = 'jsonb'::regtype
                      AND p.prokind = 'f' AND NOT p.proretset) THEN
        RAISE EXCEPTION 'function % is not an activity mapper', NEW.mapper
            USING ERRCODE = 'invalid_function_definition',
                  DETAIL = 'A mapper takes (dynamics_entity text, dynamics_contact_id uuid, activity jsonb) and returns jsonb.',
                  HINT = 'Create it as CREATE FUNCTION my_mapper(text, uuid, jsonb) RETURNS jsonb ...';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER activity_mapper_check
    BEFORE INSERT OR UPDATE ON d365.activity_mapper
    FOR EACH ROW EXECUTE FUNCTION d365._activity_mapper_check();

-- Dynamics users by internal email, from the cached list; a GUID is taken as
-- a user id.  NULL when no such user exists.
CREATE FUNCTION d365._user_id(email_or_id text)
RETURNS uuid
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN email_or_id ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
            THEN email_or_id::uuid
        ELSE (SELECT (u ->> 'systemuserid')::uuid
                FROM jsonb_array_elements(d365._get_cached(
                         'systemusers?$select=systemuserid,internalemailaddress,fullname,accessmode,isdisabled')) u
               WHERE lower(u ->> 'internalemailaddress') = lower(email_or_id)
               LIMIT 1)
    END
$$;

CREATE FUNCTION d365._utc(ts timestamptz)
RETURNS text
LANGUAGE sql IMMUTABLE
AS $$ SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') $$;

/*
 * The built-in body of an activity, SPEC section 4: regarding = the contact
 * (Microsoft's suffixed bind), subject, description, scheduledstart, the
 * default owner, and per entity: phonecall, email, task, appointment
 * fields and activity parties.  A problem that makes the activity unsendable
 * (an unknown attendee) comes back as {"__error": "..."}.
 */
CREATE FUNCTION d365._activity_body(a d365.activity, entity text, contact_id uuid)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    owner text := (SELECT default_owner FROM d365.settings);
    d jsonb := a.details;
    b jsonb;
    parties jsonb := '[]';
    contact_bind text := format('/contacts(%s)', contact_id);
    outgoing boolean;
    user_id uuid;
    who text;
    ends timestamptz;
BEGIN
    b := jsonb_build_object(
        'subject', coalesce(a.subject, d ->> 'subject', initcap(replace(a.activity_type, '_', ' '))),
        'description', d ->> 'description',
        'scheduledstart', d365._utc(a.occurred_at),
        format('regardingobjectid_contact_%s@odata.bind', entity), contact_bind);
    IF owner IS NOT NULL THEN
        b := b || jsonb_build_object('ownerid@odata.bind', owner);
    END IF;

    CASE entity
    WHEN 'phonecall' THEN
        outgoing := coalesce(lower(d ->> 'direction'), 'outgoing') <> 'incoming';
        b := b || jsonb_build_object(
            'phonenumber', d ->> 'phone_number',
            'directioncode', outgoing,
            'actualdurationminutes', (d ->> 'duration_minutes')::integer,
            'scheduledend', d365._utc(a.occurred_at),
            'actualend', d365._utc(a.occurred_at));
        parties := parties || jsonb_build_object('partyid_contact@odata.bind', contact_bind,
                                                 'participationtypemask', CASE WHEN outgoing THEN 2 ELSE 1 END);
        IF d ? 'from_email' THEN
            user_id := d365._user_id(d ->> 'from_email');
            IF user_id IS NOT NULL THEN
                parties := parties || jsonb_build_object('partyid_systemuser@odata.bind', format('/systemusers(%s)', user_id),
                                                         'participationtypemask', CASE WHEN outgoing THEN 1 ELSE 2 END);
            END IF;
        END IF;
        b := b || jsonb_build_object('phonecall_activity_parties', parties);
    WHEN 'email' THEN
        b := b || jsonb_build_object('description', coalesce(d ->> 'body', d ->> 'description'),
                                     'directioncode', true);
        parties := parties || jsonb_strip_nulls(jsonb_build_object(
            'partyid_contact@odata.bind', contact_bind, 'participationtypemask', 2,
            'addressused', d ->> 'to_email'));
        IF d ? 'from_email' THEN
            user_id := d365._user_id(d ->> 'from_email');
            IF user_id IS NOT NULL THEN
                parties := parties || jsonb_build_object('partyid_systemuser@odata.bind', format('/systemusers(%s)', user_id),
                                                         'participationtypemask', 1);
            END IF;
        END IF;
        b := b || jsonb_build_object('email_activity_parties', parties);
    WHEN 'task' THEN
        b := b || jsonb_build_object(
            'scheduledend', d365._utc((d ->> 'due')::timestamptz),
            'prioritycode', (d ->> 'priority')::integer,
            'actualdurationminutes', (d ->> 'duration_minutes')::integer);
    WHEN 'appointment' THEN
        IF coalesce((d ->> 'all_day')::boolean, false) THEN
            ends := coalesce((d ->> 'ends_at')::timestamptz, a.occurred_at + interval '1 day');
        ELSE
            ends := coalesce((d ->> 'ends_at')::timestamptz, a.occurred_at + interval '30 minutes');
        END IF;
        b := b || jsonb_build_object(
            'scheduledend', d365._utc(ends),
            'scheduleddurationminutes', (extract(epoch FROM ends - a.occurred_at) / 60)::integer,
            'isalldayevent', coalesce((d ->> 'all_day')::boolean, false),
            'location', d ->> 'location');
        parties := parties || jsonb_build_object('partyid_contact@odata.bind', contact_bind,
                                                 'participationtypemask', 5);
        FOR who IN SELECT jsonb_array_elements_text(coalesce(d -> 'required_attendees', '[]')) LOOP
            user_id := d365._user_id(who);
            IF user_id IS NULL THEN
                RETURN jsonb_build_object('__error', format('no Dynamics user has the email %s', who));
            END IF;
            parties := parties || jsonb_build_object('partyid_systemuser@odata.bind', format('/systemusers(%s)', user_id),
                                                     'participationtypemask', 5);
        END LOOP;
        FOR who IN SELECT jsonb_array_elements_text(coalesce(d -> 'optional_attendees', '[]')) LOOP
            user_id := d365._user_id(who);
            IF user_id IS NULL THEN
                RETURN jsonb_build_object('__error', format('no Dynamics user has the email %s', who));
            END IF;
            parties := parties || jsonb_build_object('partyid_systemuser@odata.bind', format('/systemusers(%s)', user_id),
                                                     'participationtypemask', 6);
        END LOOP;
        IF owner LIKE '/systemusers(%' THEN
            parties := parties || jsonb_build_object('partyid_systemuser@odata.bind', owner,
                                                     'participationtypemask', 7);
        END IF;
        b := b || jsonb_build_object('appointment_activity_parties', parties);
    ELSE
        NULL;   -- any other activity entity: the generic body
    END CASE;
    RETURN jsonb_strip_nulls(b);
EXCEPTION WHEN data_exception THEN
    -- a details value that does not fit (a date, a number) fails this
    -- activity alone, with the reason
    RETURN jsonb_build_object('__error', 'the activity''s details do not fit: ' || SQLERRM);
END;
$$;

-- statecode/statuscode that complete an activity after it is created, or
-- NULL for activities that stay open.
CREATE FUNCTION d365._activity_completion(entity text, details jsonb)
RETURNS jsonb
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE entity
        WHEN 'phonecall' THEN jsonb_build_object('statecode', 1, 'statuscode',
             CASE WHEN lower(details ->> 'direction') = 'incoming' THEN 4 ELSE 2 END)
        WHEN 'email' THEN '{"statecode": 1, "statuscode": 2}'::jsonb
    END
$$;

/*
 * The work query of an activity sync.  mode:
 *   'scheduled'  every pending activity of a linked contact, past its back-off
 *   'one'        the activity one_id (the query's $1), whatever its back-off
 *   'recent'     pending activities of contacts synced in this transaction
 * Requests per activity: a create-only upsert (If-None-Match: *, a 412 means
 * an earlier attempt created it), then for phone calls and emails the PATCH
 * that completes it.
 */
CREATE FUNCTION d365._activity_work_sql(mode text, one_id bigint DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source;
    mappers text := '';
    m record;
    sel text;
    pending boolean;
BEGIN
    src := d365._contact_source();

    sel := CASE mode
        WHEN 'scheduled' THEN '(a.next_attempt_at IS NULL OR a.next_attempt_at <= now())'
        WHEN 'one' THEN 'a.id = $1'
        WHEN 'recent' THEN 'c.dynamics365_synchronized_on = now() AND (a.next_attempt_at IS NULL OR a.next_attempt_at <= now())'
    END;

    -- nothing pending: no metadata request, no work
    EXECUTE format('SELECT EXISTS (SELECT FROM d365.activity a JOIN %s c ON c.%I::text = a.contact_key'
                   ' WHERE a.synced_at IS NULL AND c.dynamics365_related_id IS NOT NULL AND %s)',
                   src.contact_table, src.key_column,
                   CASE mode WHEN 'one' THEN 'a.id = $1' ELSE sel END)
        INTO pending USING one_id;
    IF NOT pending THEN
        RETURN 'SELECT NULL::text, NULL::text, NULL::text WHERE false';
    END IF;

    FOR m IN SELECT dynamics_entity, mapper FROM d365.activity_mapper ORDER BY 1 LOOP
        mappers := mappers || format(' WHEN %L THEN %s(t.entity, c.dynamics365_related_id, to_jsonb(a))',
                                     m.dynamics_entity, m.mapper::oid::regproc);
    END LOOP;
    IF mappers <> '' THEN
        mappers := format('coalesce(CASE t.entity %s END, ''{}'')', mappers);
    ELSE
        mappers := '''{}''::jsonb';
    END IF;

    RETURN format($q$
        WITH ent AS (
            SELECT e ->> 'LogicalName' AS name, e ->> 'EntitySetName' AS entity_set
              FROM jsonb_array_elements(d365._get_cached(
                       'EntityDefinitions?$select=LogicalName,EntitySetName,IsActivity')) e
             WHERE (e ->> 'IsActivity')::boolean
               AND e ->> 'EntitySetName' ~ '^[A-Za-z0-9_]+$')
        SELECT a.id::text AS item_key,
               CASE WHEN x.err IS NOT NULL THEN '[]'
                    ELSE (jsonb_build_array(jsonb_build_object(
                              'method', 'PATCH',
                              'path', format('%%s(%%s)', ent.entity_set, a.dynamics_activity_id),
                              'body', bb.body::text,
                              'headers', '["If-None-Match: *"]'::jsonb,
                              'ok', '[412]'::jsonb))
                          || CASE WHEN d365._activity_completion(t.entity, a.details) IS NULL THEN '[]'::jsonb
                                  ELSE jsonb_build_array(jsonb_build_object(
                                      'method', 'PATCH',
                                      'path', format('%%s(%%s)', ent.entity_set, a.dynamics_activity_id),
                                      'body', d365._activity_completion(t.entity, a.details)::text,
                                      'headers', '["If-Match: *"]'::jsonb)) END)::text
               END AS requests,
               jsonb_build_object('entity', t.entity, 'error', x.err)::text AS context
          FROM d365.activity a
          JOIN %1$s c ON c.%2$I::text = a.contact_key AND c.dynamics365_related_id IS NOT NULL
          LEFT JOIN d365.activity_type_map tm ON tm.activity_type = a.activity_type
          CROSS JOIN LATERAL (SELECT coalesce(tm.dynamics_entity, a.activity_type) AS entity) t
          LEFT JOIN ent ON ent.name = t.entity
          CROSS JOIN LATERAL (
              SELECT CASE WHEN ent.name IS NULL THEN NULL
                          ELSE d365._activity_body(a, t.entity, c.dynamics365_related_id) || %3$s
                     END AS body) bb
          CROSS JOIN LATERAL (
              SELECT CASE WHEN ent.name IS NULL
                          THEN format('activity type "%%s" is not a Dynamics activity entity (it maps to "%%s")',
                                      a.activity_type, t.entity)
                          ELSE bb.body ->> '__error' END AS err) x
         WHERE a.synced_at IS NULL AND %4$s
         ORDER BY a.id
    $q$, src.contact_table, src.key_column, mappers, sel);
END;
$$;

/*
 * The record stage of an activity sync: synced_at for what Dynamics now
 * has, the failure and a back-off for the rest.
 */
CREATE FUNCTION d365._activity_record(
    item_keys text[], contexts text[], statuses integer[],
    error_codes text[], error_messages text[],
    OUT created integer, OUT updated integer, OUT unchanged integer,
    OUT failed integer, OUT unlinked integer)
RETURNS record
LANGUAGE plpgsql
-- a chunk against the whole table: always by index, so a chunk's cost does
-- not grow with the table (the planner knows nothing of the chunk's size)
SET enable_hashjoin = off
SET enable_mergejoin = off
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    WITH o AS (
        SELECT k::bigint AS id, ctx::jsonb ->> 'entity' AS entity,
               coalesce(msg, ctx::jsonb ->> 'error') AS err, st, code
          FROM unnest(item_keys, contexts, statuses, error_codes, error_messages)
                   AS u(k, ctx, st, code, msg)),
    ok AS (
        UPDATE d365.activity a
           SET synced_at = now(), dynamics_entity = o.entity, attempts = 0,
               next_attempt_at = NULL, last_status = o.st, last_error_code = NULL,
               last_error = NULL
          FROM o
         WHERE a.id = o.id AND o.err IS NULL AND o.st IS NOT NULL
        RETURNING a.id),
    bad AS (
        UPDATE d365.activity a
           SET attempts = a.attempts + 1,
               next_attempt_at = d365._next_attempt(a.attempts + 1),
               dynamics_entity = o.entity, last_status = nullif(o.st, 0),
               last_error_code = o.code, last_error = o.err
          FROM o
         WHERE a.id = o.id AND (o.err IS NOT NULL OR o.st IS NULL)
        RETURNING a.id)
    SELECT (SELECT count(*) FROM ok), 0, 0, (SELECT count(*) FROM bad), 0
      INTO created, updated, unchanged, failed, unlinked;
END;
$$;

/*
 * Sends one logged activity now through the pipeline.  strict: raise the
 * failure as an ERROR; otherwise a WARNING says the activity stays pending.
 * Returns the Dynamics id, or NULL when it was not created.
 */
CREATE FUNCTION d365._send_activity(activity_id bigint, strict boolean)
RETURNS uuid
AS 'MODULE_PATHNAME', 'd365_send_activity'
LANGUAGE C VOLATILE STRICT;

CREATE FUNCTION d365._contact_for_activity(contact_key text, must_be_linked boolean)
RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source;
    found_key text;
    link uuid;
BEGIN
    src := d365._contact_source();
    EXECUTE format('SELECT %I::text, dynamics365_related_id FROM %s WHERE %I::text = $1',
                   src.key_column, src.contact_table, src.key_column)
       INTO found_key, link USING contact_key;
    IF found_key IS NULL THEN
        RAISE EXCEPTION 'contact % does not exist', contact_key
            USING ERRCODE = 'no_data_found',
                  HINT = format('The key is looked up in %s.', src.contact_table);
    END IF;
    IF must_be_linked AND link IS NULL THEN
        RAISE EXCEPTION 'contact % is not linked to Dynamics 365', contact_key
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'Tasks and appointments are created for a contact that exists in Dynamics.',
                  HINT = 'Call d365_sync_contact() for it first.';
    END IF;
    RETURN link;
END;
$$;

CREATE FUNCTION d365.d365_log_activity(
    contact_key anyelement,
    activity_type text,
    subject text DEFAULT NULL,
    details jsonb DEFAULT '{}',
    occurred_at timestamptz DEFAULT now())
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    link uuid := d365._contact_for_activity(d365._key_text(contact_key), false);
    new_id bigint;
BEGIN
    INSERT INTO d365.activity (contact_key, activity_type, subject, details, occurred_at)
    VALUES (d365._key_text(contact_key), activity_type, subject, coalesce(details, '{}'), coalesce(occurred_at, now()))
    RETURNING id INTO new_id;
    IF link IS NOT NULL AND (SELECT activity_sync_enabled FROM d365.settings) THEN
        PERFORM d365._send_activity(new_id, false);
    END IF;
    RETURN new_id;
END;
$$;
COMMENT ON FUNCTION d365.d365_log_activity(anyelement, text, text, jsonb, timestamptz) IS
    'Logs an activity; when activity sync is on and the contact is linked, creates it in Dynamics at once (else it stays pending)';

CREATE FUNCTION d365.d365_create_task(
    contact_key anyelement,
    subject text,
    description text DEFAULT NULL,
    due timestamptz DEFAULT NULL,
    priority integer DEFAULT NULL,
    duration_minutes integer DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    new_id bigint;
BEGIN
    PERFORM d365._contact_for_activity(d365._key_text(contact_key), true);
    IF priority IS NOT NULL AND priority NOT IN (0, 1, 2) THEN
        RAISE EXCEPTION 'invalid task priority %', priority
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Dynamics task priorities are 0 (low), 1 (normal) and 2 (high).';
    END IF;
    INSERT INTO d365.activity (contact_key, activity_type, subject, details)
    VALUES (d365._key_text(contact_key), 'task', subject,
            jsonb_strip_nulls(jsonb_build_object('description', description, 'due', due,
                                                 'priority', priority,
                                                 'duration_minutes', duration_minutes)))
    RETURNING id INTO new_id;
    RETURN d365._send_activity(new_id, true);
END;
$$;
COMMENT ON FUNCTION d365.d365_create_task(anyelement, text, text, timestamptz, integer, integer) IS
    'Creates a task in Dynamics now, regarding a linked contact, owned by the default owner';

CREATE FUNCTION d365.d365_create_appointment(
    contact_key anyelement,
    subject text,
    starts_at timestamptz,
    ends_at timestamptz DEFAULT NULL,
    all_day boolean DEFAULT false,
    location text DEFAULT NULL,
    description text DEFAULT NULL,
    required_attendees text[] DEFAULT '{}',
    optional_attendees text[] DEFAULT '{}')
RETURNS uuid
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    new_id bigint;
    who text;
BEGIN
    PERFORM d365._contact_for_activity(d365._key_text(contact_key), true);
    IF starts_at IS NULL THEN
        RAISE EXCEPTION 'an appointment needs a start time'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF ends_at IS NOT NULL AND ends_at < starts_at THEN
        RAISE EXCEPTION 'the appointment ends before it starts'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('starts_at is %s, ends_at is %s.', starts_at, ends_at);
    END IF;
    FOREACH who IN ARRAY coalesce(required_attendees, '{}') || coalesce(optional_attendees, '{}') LOOP
        IF d365._user_id(who) IS NULL THEN
            RAISE EXCEPTION 'no Dynamics user has the email %', who
                USING ERRCODE = 'undefined_object',
                      HINT = 'Attendees are Dynamics users, given by internal email address or systemuserid; d365_owners() lists them.';
        END IF;
    END LOOP;
    INSERT INTO d365.activity (contact_key, activity_type, subject, occurred_at, details)
    VALUES (d365._key_text(contact_key), 'appointment', subject, starts_at,
            jsonb_strip_nulls(jsonb_build_object(
                'ends_at', ends_at, 'all_day', coalesce(all_day, false), 'location', location,
                'description', description,
                'required_attendees', to_jsonb(coalesce(required_attendees, '{}')),
                'optional_attendees', to_jsonb(coalesce(optional_attendees, '{}')))))
    RETURNING id INTO new_id;
    RETURN d365._send_activity(new_id, true);
END;
$$;
COMMENT ON FUNCTION d365.d365_create_appointment(anyelement, text, timestamptz, timestamptz, boolean, text, text, text[], text[]) IS
    'Creates an appointment in Dynamics now: the contact and the given users as attendees, the default owner (a user) as organizer';

CREATE FUNCTION d365.d365_sync_activities(
    OUT created integer, OUT failed integer, OUT requests integer)
RETURNS record
AS 'MODULE_PATHNAME', 'd365_sync_activities'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION d365.d365_sync_activities() IS
    'The scheduled activity sync: creates every pending activity of a linked contact';

-- ---------------------------------------------------------------------------
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
AS 'MODULE_PATHNAME', 'd365_pull_changes'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION d365.d365_pull_changes() IS
    'Pulls contact changes from Dynamics with change tracking (delta links) and applies them; needs no inbound port';

-- ---------------------------------------------------------------------------
-- Status and scheduling
-- ---------------------------------------------------------------------------

CREATE FUNCTION d365.d365_status(OUT item text, OUT value text)
RETURNS SETOF record
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s d365.settings;
    src d365.contact_source;
    n bigint;
    r record;
BEGIN
    SELECT * INTO s FROM d365.settings;
    item := 'configured';
    value := (s.org_url IS NOT NULL AND s.tenant_id IS NOT NULL AND s.client_id IS NOT NULL
              AND s.client_secret IS NOT NULL)::text;
    RETURN NEXT;
    item := 'organization'; value := coalesce(s.org_url, '(not set)'); RETURN NEXT;
    item := 'contact sync enabled';
    value := format('%s (contact_sync_enabled = %s, min_score = %s)',
                    (s.contact_sync_enabled AND s.min_score > 0)::text,
                    s.contact_sync_enabled::text, s.min_score);
    RETURN NEXT;
    item := 'activity sync enabled'; value := s.activity_sync_enabled::text; RETURN NEXT;
    item := 'default owner'; value := coalesce(s.default_owner, '(none)'); RETURN NEXT;

    SELECT * INTO src FROM d365.contact_source;
    item := 'contact table'; value := coalesce(src.contact_table::text, '(not attached)'); RETURN NEXT;
    IF src.contact_table IS NOT NULL THEN
        PERFORM d365._check_key_type(src.contact_table, src.key_column);
        item := 'mapped fields';
        SELECT count(*)::text INTO value FROM d365.field_map; RETURN NEXT;
        EXECUTE format('SELECT count(*) FROM %s c LEFT JOIN d365.contact_state s ON s.contact_key = c.%I::text'
                       ' WHERE c.dynamics365_related_id IS NULL AND c.%I >= $1'
                       '   AND (s.remote_deleted_at IS NULL OR s.change_seq > s.synced_seq)',
                       src.contact_table, src.key_column, src.score_column)
            INTO n USING s.min_score;
        item := 'contacts to create'; value := n::text; RETURN NEXT;
        EXECUTE format('SELECT count(*) FROM %s c JOIN d365.contact_state s ON s.contact_key = c.%I::text'
                       ' WHERE c.dynamics365_related_id IS NOT NULL AND s.change_seq > s.synced_seq',
                       src.contact_table, src.key_column) INTO n;
        item := 'contacts with pending changes'; value := n::text; RETURN NEXT;
        EXECUTE format('SELECT count(*) FROM %s c WHERE c.dynamics365_related_id IS NOT NULL',
                       src.contact_table) INTO n;
        item := 'contacts linked'; value := n::text; RETURN NEXT;
    END IF;
    item := 'contacts failing';
    SELECT count(*)::text INTO value FROM d365.contact_state WHERE attempts > 0; RETURN NEXT;
    item := 'contacts deleted in Dynamics';
    SELECT count(*)::text INTO value FROM d365.contact_state WHERE remote_deleted_at IS NOT NULL; RETURN NEXT;
    item := 'activities pending';
    SELECT count(*)::text INTO value FROM d365.activity WHERE synced_at IS NULL; RETURN NEXT;
    item := 'activities failing';
    SELECT count(*)::text INTO value FROM d365.activity WHERE synced_at IS NULL AND attempts > 0; RETURN NEXT;

    FOR r IN SELECT DISTINCT ON (kind) * FROM d365.sync_run ORDER BY kind, id DESC LOOP
        item := 'last run: ' || r.kind;
        value := format('%s (%s ms): %s created, %s updated, %s unchanged, %s failed, %s unlinked, %s requests, %s throttled%s',
                        to_char(r.finished_at, 'YYYY-MM-DD HH24:MI:SS TZ'),
                        round(extract(epoch FROM r.finished_at - r.started_at) * 1000),
                        r.created, r.updated, r.unchanged, r.failed, r.unlinked,
                        r.requests, r.throttled, coalesce('; ' || r.message, ''));
        RETURN NEXT;
    END LOOP;

    SELECT cs.contact_key, cs.last_attempt_at, cs.last_error INTO r FROM d365.contact_state cs
     WHERE cs.attempts > 0 OR cs.remote_deleted_at IS NOT NULL
     ORDER BY cs.last_attempt_at DESC NULLS LAST LIMIT 1;
    IF FOUND THEN
        item := 'last contact error';
        value := format('contact %s at %s: %s', r.contact_key,
                        to_char(r.last_attempt_at, 'YYYY-MM-DD HH24:MI:SS TZ'), r.last_error);
        RETURN NEXT;
    END IF;
    SELECT a.id, a.last_attempt_at, a.last_error INTO r FROM (
        SELECT id, coalesce(next_attempt_at, logged_at) AS last_attempt_at, last_error
          FROM d365.activity WHERE synced_at IS NULL AND attempts > 0
         ORDER BY id DESC LIMIT 1) a;
    IF FOUND THEN
        item := 'last activity error';
        value := format('activity %s: %s', r.id, r.last_error);
        RETURN NEXT;
    END IF;
    SELECT sr.finished_at, sr.kind, sr.message INTO r FROM d365.sync_run sr
     WHERE sr.message LIKE 'failed:%'
     ORDER BY sr.id DESC LIMIT 1;
    IF FOUND THEN
        item := 'last run error';
        value := format('%s at %s: %s', r.kind, to_char(r.finished_at, 'YYYY-MM-DD HH24:MI:SS TZ'), r.message);
        RETURN NEXT;
    END IF;
END;
$$;
COMMENT ON FUNCTION d365.d365_status() IS
    'At a glance: what is enabled, backlog, failures, the last run of each job and the last error';

CREATE FUNCTION d365.d365_schedule(
    contacts text DEFAULT '0 * * * *',
    activities text DEFAULT '0 * * * *',
    pull text DEFAULT NULL)
RETURNS TABLE (job_name text, schedule text, command text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    jobs text[][] := ARRAY[['d365-contact-sync', contacts, 'SELECT d365.d365_sync_contacts()', 'd365.d365_sync_contacts()'],
                           ['d365-activity-sync', activities, 'SELECT d365.d365_sync_activities()', 'd365.d365_sync_activities()'],
                           ['d365-pull-changes', pull, 'SELECT d365.d365_pull_changes()', 'd365.d365_pull_changes()']];
    i integer;
BEGIN
    IF to_regclass('cron.job') IS NULL THEN
        RAISE EXCEPTION 'pg_cron is not installed in this database'
            USING ERRCODE = 'undefined_object',
                  HINT = 'Add pg_cron to shared_preload_libraries, set cron.database_name to this database, and run CREATE EXTENSION pg_cron.';
    END IF;
    FOR i IN 1 .. array_length(jobs, 1) LOOP
        IF jobs[i][2] IS NOT NULL AND to_regprocedure(jobs[i][4]) IS NOT NULL THEN
            PERFORM cron.schedule(jobs[i][1], jobs[i][2], jobs[i][3]);
        ELSE
            PERFORM cron.unschedule(j.jobid) FROM cron.job j WHERE j.jobname = jobs[i][1];
        END IF;
    END LOOP;
    RETURN QUERY SELECT j.jobname::text, j.schedule::text, j.command::text
                   FROM cron.job j WHERE j.jobname LIKE 'd365-%' ORDER BY j.jobname;
END;
$$;
COMMENT ON FUNCTION d365.d365_schedule(text, text, text) IS
    'Creates or updates the pg_cron jobs d365-contact-sync, d365-activity-sync and d365-pull-changes';

CREATE FUNCTION d365.d365_unschedule()
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer := 0;
BEGIN
    IF to_regclass('cron.job') IS NULL THEN
        RETURN 0;
    END IF;
    SELECT count(*) INTO n FROM cron.job j WHERE j.jobname LIKE 'd365-%';
    PERFORM cron.unschedule(j.jobid) FROM cron.job j WHERE j.jobname LIKE 'd365-%';
    RETURN n;
END;
$$;
COMMENT ON FUNCTION d365.d365_unschedule() IS
    'Removes the d365sync pg_cron jobs; returns how many there were';


-- ---------------------------------------------------------------------------
-- Privileges: nothing for PUBLIC.
-- ---------------------------------------------------------------------------

REVOKE ALL ON ALL TABLES IN SCHEMA d365 FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA d365 FROM PUBLIC;

-- The internals of d365_update_contact(), which runs with its caller's
-- rights.  Safe for anyone: they run as the caller, or run no user code,
-- or check the caller's right to update contacts (_contact_snapshot).
-- Without EXECUTE on d365_update_contact and USAGE on schema d365 a role
-- cannot reach them anyway.
GRANT EXECUTE ON FUNCTION d365._incoming_apply(jsonb, boolean), d365._typed_jsonb(jsonb, regtype, text, name),
      d365._contact_source(), d365._incoming_fields(), d365._contact_values_expr(),
      d365._incoming_mapper(), d365._contact_snapshot(text, jsonb) TO PUBLIC;
