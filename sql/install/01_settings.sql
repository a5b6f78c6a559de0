-- ---------------------------------------------------------------------------
-- Settings
-- ---------------------------------------------------------------------------

-- The one GUID check: 8-4-4-4-12 hexadecimal digits, either case.  NULL
-- for NULL.
CREATE FUNCTION d365._is_guid(txt text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT txt ~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$' $$;

-- The GUID of an OData bind path /<entity set>(<guid>), or NULL.
CREATE FUNCTION d365._bind_guid(txt text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT g FROM (SELECT substring(txt FROM '^/[A-Za-z0-9_]+\((.*)\)$') AS g) x
     WHERE d365._is_guid(g)
$$;

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
    instance_id           uuid NOT NULL DEFAULT gen_random_uuid(),
    realtime              boolean NOT NULL DEFAULT false,
    pull_interval         interval,
    run_history_retention interval NOT NULL DEFAULT '30 days'
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
COMMENT ON COLUMN d365.settings.run_history_retention IS
    'How long d365.sync_run keeps a run; every scheduled run deletes older rows (the newest run of each kind is always kept)';
COMMENT ON COLUMN d365.settings.realtime IS
    'The background worker sends contact changes and activities as they commit (needs d365sync in shared_preload_libraries); d365_log_activity then only queues';
COMMENT ON COLUMN d365.settings.pull_interval IS
    'The background worker pulls Dynamics changes at this interval (at least 5 seconds; NULL: it does not pull)';

/*
 * The background worker's side of the catalog (src/worker/worker.c,
 * docs/worker.md).  _worker_wake arms a wake of the worker at the commit of
 * the current transaction: always, or only while realtime is on; a no-op
 * without the preload, in another database or on rollback.  _worker_state
 * reads the worker's shared state for d365_status().
 */
CREATE FUNCTION d365._worker_wake(always boolean)
RETURNS void
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_worker_wake'
LANGUAGE C VOLATILE;

CREATE FUNCTION d365._worker_state(
    OUT preloaded boolean, OUT running boolean, OUT pid integer,
    OUT database text, OUT state text, OUT realtime boolean,
    OUT started_at timestamptz, OUT last_wake timestamptz,
    OUT last_pass timestamptz, OUT last_pull timestamptz,
    OUT last_error text, OUT last_error_at timestamptz)
RETURNS record
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_worker_state'
LANGUAGE C VOLATILE;

/*
 * Reports why a URL may not be used for Dynamics 365 requests, or NULL when
 * it may.  The HTTP layer applies the same rule to every request.
 */
CREATE FUNCTION d365._url_problem(url text)
RETURNS text
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_url_problem'
LANGUAGE C STABLE STRICT;

/*
 * Raises an ERROR (level 'WARNING': a warning) without any error context,
 * for the check triggers of the tables holding a secret: the context of a
 * COPY (a restore, a \copy) would print the refused input line whole, the
 * secret included.
 */
CREATE FUNCTION d365._raise_quietly(level text, sqlstate text, message text,
                                    detail text, hint text)
RETURNS void
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_raise_quietly'
LANGUAGE C VOLATILE;

/*
 * Tests a row of a d365 table holding a secret against the table's NOT NULL
 * and CHECK constraints, raising errors that name the column or constraint
 * only.  PostgreSQL's own constraint errors carry "Failing row contains
 * (...)" with every value, the secret included, to the client and to the
 * server log; a BEFORE trigger that calls this first never lets them happen.
 */
CREATE FUNCTION d365._check_row_quietly(r anyelement, rel regclass)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    c record;
    ok boolean;
    vals jsonb := to_jsonb(r);
BEGIN
    FOR c IN SELECT a.attname FROM pg_attribute a
              WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped AND a.attnotnull
              ORDER BY a.attnum LOOP
        IF vals -> c.attname IS NULL OR vals -> c.attname = 'null'::jsonb THEN
            RAISE EXCEPTION 'null value in column "%" of relation "%" violates not-null constraint',
                            c.attname, (SELECT relname FROM pg_class WHERE oid = rel)
                USING ERRCODE = 'not_null_violation',
                      HINT = 'Set the column to a value, or to DEFAULT.';
        END IF;
    END LOOP;
    FOR c IN SELECT k.conname, pg_get_expr(k.conbin, k.conrelid) AS expr FROM pg_constraint k
              WHERE k.conrelid = rel AND k.contype = 'c' ORDER BY k.conname LOOP
        EXECUTE format('SELECT (%s) IS NOT FALSE FROM (SELECT ($1).*) t', c.expr) INTO ok USING r;
        IF NOT ok THEN
            RAISE EXCEPTION 'new row for relation "%" violates check constraint "%"',
                            (SELECT relname FROM pg_class WHERE oid = rel), c.conname
                USING ERRCODE = 'check_violation';
        END IF;
    END LOOP;
END;
$$;

CREATE FUNCTION d365._settings_check()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    problem text;
    code text;
    msg text;
    det text;
    hnt text;
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
        -- the organization's root: d365sync adds /api/data/<version>/, and
        -- Entra ID issues tokens for the root only (AADSTS500011 otherwise).
        -- A value kept from an earlier release is refused once it is changed.
        IF NEW.org_url ~ '^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*[/?#]' AND
           (TG_OP = 'INSERT' OR NEW.org_url IS DISTINCT FROM OLD.org_url) THEN
            RAISE EXCEPTION 'invalid value for setting "org_url": it must be the organization''s root URL, without a path'
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = format('The value was %L; its path is %L.', NEW.org_url,
                                      substring(NEW.org_url FROM '^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*(.*)$')),
                      HINT = format('Remove the path: set org_url = %L.',
                                    substring(NEW.org_url FROM '^([A-Za-z][A-Za-z0-9+.-]*://[^/?#]*)'));
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

    IF NEW.tenant_id IS NOT NULL AND NOT d365._is_guid(NEW.tenant_id) AND
       NEW.tenant_id !~ '^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)+$' THEN
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
       NOT coalesce(d365._is_guid(substring(NEW.default_owner FROM '^/(?:systemusers|teams)\((.*)\)$')), false) THEN
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

    IF NEW.run_history_retention < interval '1 hour' THEN
        RAISE EXCEPTION 'invalid value for setting "run_history_retention"'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('Run history must be kept at least an hour; the value was %s.', NEW.run_history_retention),
                  HINT = 'The default is 30 days; use a long interval such as ''10 years'' to keep history for good.';
    END IF;

    -- NOT NULL and CHECK constraints, tested here with errors of our own:
    -- PostgreSQL's would print the whole row, the client secret included
    PERFORM d365._check_row_quietly(NEW, TG_RELID);
    IF NEW.pull_interval IS NOT NULL AND NEW.pull_interval < interval '5 seconds' THEN
        RAISE EXCEPTION 'invalid value for setting "pull_interval"'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = format('The interval must be at least 5 seconds; it was %s.', NEW.pull_interval),
                  HINT = 'Set NULL to stop pulling, or an interval of 5 seconds or more.';
    END IF;

    IF TG_OP = 'UPDATE' AND (NEW.realtime OR NEW.pull_interval IS NOT NULL)
       AND (NEW.realtime IS DISTINCT FROM OLD.realtime
            OR NEW.pull_interval IS DISTINCT FROM OLD.pull_interval) THEN
        SELECT CASE WHEN NOT w.preloaded
                    THEN 'd365sync is not in shared_preload_libraries, so no background worker runs.'
                    WHEN w.running AND w.database IS DISTINCT FROM current_database()
                    THEN format('The background worker serves database %s, not this one.', w.database)
               END
          INTO problem FROM d365._worker_state() w;
        IF problem IS NOT NULL THEN
            PERFORM d365._raise_quietly('WARNING', '01000',
                'realtime and pull_interval take effect only where the d365sync worker runs',
                problem,
                'Add d365sync to shared_preload_libraries, set d365sync.database_name to this database and restart the server; until then the scheduled jobs do the work.');
        END IF;
    END IF;

    -- the worker reads the settings again at the commit of this change
    PERFORM d365._worker_wake(true);

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
               instance_id = NEW.instance_id,
               realtime = NEW.realtime,
               pull_interval = NEW.pull_interval,
               run_history_retention = NEW.run_history_retention;
        RETURN NULL;
    END IF;
    RETURN NEW;
EXCEPTION WHEN OTHERS THEN
    -- without the context: a COPY's would show the refused line, secret and all
    GET STACKED DIAGNOSTICS code = RETURNED_SQLSTATE, msg = MESSAGE_TEXT,
                            det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM d365._raise_quietly('ERROR', code, msg, det, hnt);
    RETURN NULL;
END;
$$;

CREATE TRIGGER settings_check
    BEFORE INSERT OR UPDATE OR DELETE ON d365.settings
    FOR EACH ROW EXECUTE FUNCTION d365._settings_check();

INSERT INTO d365.settings DEFAULT VALUES;

SELECT pg_catalog.pg_extension_config_dump('d365.settings', '');

/*
 * Sets a client secret from a file on the database server, so that the
 * value never appears in a statement text (log_statement = all logs only
 * the file name): the settings' secret, or with client_id that of an
 * application user of d365.app_users (added when missing).  Reading server
 * files needs superuser or a role in pg_read_server_files (pg_read_file's
 * own check, made for the caller); the table needs the caller's UPDATE (and
 * INSERT for a new application user).  Surrounding white space and line
 * breaks are dropped.
 */
CREATE FUNCTION d365.d365_set_secret_from_file(path text, client_id uuid DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    secret text;
BEGIN
    IF path IS NULL OR path = '' THEN
        RAISE EXCEPTION 'no file name given'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass the absolute path of a file the database server can read.';
    END IF;
    secret := btrim(pg_read_file(path), E' \t\r\n');
    IF secret IS NULL OR secret = '' THEN
        RAISE EXCEPTION 'file "%" holds no client secret', path
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Write the secret''s value (not its ID) into the file, on one line.';
    END IF;
    IF d365_set_secret_from_file.client_id IS NULL THEN
        UPDATE d365.settings SET client_secret = secret;
    ELSE
        -- (no ON CONFLICT: the table's trigger refuses an existing id before
        -- the conflict could be seen)
        UPDATE d365.app_users u SET client_secret = secret
         WHERE u.client_id = d365_set_secret_from_file.client_id;
        IF NOT FOUND THEN
            INSERT INTO d365.app_users (client_id, client_secret)
            VALUES (d365_set_secret_from_file.client_id, secret);
        END IF;
    END IF;
END;
$$;
COMMENT ON FUNCTION d365.d365_set_secret_from_file(text, uuid) IS
    'Sets the client secret of d365.settings, or of the application user client_id in d365.app_users, from a file on the database server, keeping the value out of statement logs';

-- ---------------------------------------------------------------------------
-- Application users beside the settings' one
-- ---------------------------------------------------------------------------

CREATE TABLE d365.app_users (
    client_id     uuid PRIMARY KEY,
    client_secret text NOT NULL,
    enabled       boolean NOT NULL DEFAULT true
);

COMMENT ON TABLE d365.app_users IS
    'More application users of the same tenant (app registrations with an application user in Dataverse): work is spread over the settings'' user and every enabled one; client_secret is readable only by the table owner';
COMMENT ON COLUMN d365.app_users.client_id IS
    'Application (client) id of the app registration';
COMMENT ON COLUMN d365.app_users.client_secret IS
    'Client secret value of the app registration (never shown in messages)';
COMMENT ON COLUMN d365.app_users.enabled IS
    'Whether syncs send as this user';

/*
 * Checks a row of d365.app_users before PostgreSQL does: its own NOT NULL
 * errors would print the whole row, the secret included, as "Failing row
 * contains (...)", and any error raised past this trigger -- the primary
 * key's "already exists" among them -- comes with a COPY's context, the
 * line with the secret.  So a client_id that exists already is refused
 * here, quietly, under a lock that serializes the writers of the table (a
 * concurrent insert of the same id waits, then sees it).
 */
CREATE FUNCTION d365._app_users_check()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    code text;
    msg text;
    det text;
    hnt text;
BEGIN
    PERFORM d365._check_row_quietly(NEW, TG_RELID);
    IF TG_OP = 'INSERT' OR NEW.client_id IS DISTINCT FROM OLD.client_id THEN
        LOCK TABLE d365.app_users IN SHARE ROW EXCLUSIVE MODE;
        IF EXISTS (SELECT FROM d365.app_users u WHERE u.client_id = NEW.client_id) THEN
            RAISE EXCEPTION 'application user % exists already', NEW.client_id
                USING ERRCODE = 'unique_violation',
                      HINT = 'Change its secret with d365_set_secret_from_file(path, client_id), or UPDATE its row.';
        END IF;
    END IF;
    IF NEW.client_secret = '' THEN
        RAISE EXCEPTION 'the client secret of application user % is empty', NEW.client_id
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Store the secret''s value (not its ID), or delete the row.';
    END IF;
    RETURN NEW;
EXCEPTION WHEN OTHERS THEN
    -- without the context: a COPY's would show the refused line, secret and all
    GET STACKED DIAGNOSTICS code = RETURNED_SQLSTATE, msg = MESSAGE_TEXT,
                            det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    PERFORM d365._raise_quietly('ERROR', code, msg, det, hnt);
    RETURN NULL;
END;
$$;

CREATE TRIGGER app_users_check
    BEFORE INSERT OR UPDATE ON d365.app_users
    FOR EACH ROW EXECUTE FUNCTION d365._app_users_check();

SELECT pg_catalog.pg_extension_config_dump('d365.app_users', '');

-- ---------------------------------------------------------------------------
-- Diagnostics
-- ---------------------------------------------------------------------------

CREATE FUNCTION d365.d365_whoami(
    OUT user_id uuid,
    OUT business_unit_id uuid,
    OUT organization_id uuid,
    OUT dop_hint integer)
RETURNS record
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_whoami'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION d365.d365_whoami() IS
    'Calls the Dataverse WhoAmI function: checks settings, credentials and connectivity';

CREATE FUNCTION d365.d365_whoami_all(
    OUT client_id uuid,
    OUT source text,
    OUT enabled boolean,
    OUT user_id uuid,
    OUT problem text)
RETURNS SETOF record
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_whoami_all'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION d365.d365_whoami_all() IS
    'Calls WhoAmI as every configured application user (d365.settings and d365.app_users): one row each, with its problem if it cannot sign in or call';

-- ---------------------------------------------------------------------------
