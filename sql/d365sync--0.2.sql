/*
 * d365sync install script, built by the Makefile from the parts in
 * sql/install/ (concatenated in file-name order) into sql/d365sync--X.Y.sql.
 *
 * One part per subsystem, each beside the C file that implements its send
 * stage or its SQL-callable functions (see docs/architecture.md):
 *   01_settings         the settings row, its validation, d365_whoami
 *   02_runs             the run history
 *   03_contact_source   the attached table, field map, sync state
 *   03_identity         tombstones, the capture triggers (src/capture.c), broken attachments
 *   04_metadata         Dynamics metadata, cached; mapping validation
 *   05_contacts_out     outgoing contacts: work query, record step, API
 *   06_activities       the activity log, bodies, work query, record step
 *   07_incoming         incoming changes: push payloads and the pull
 *   08_status_schedule  d365_status and the pg_cron schedule
 *   09_privileges       nothing for PUBLIC; the few explicit grants
 *
 * Everything lives in schema d365, which CREATE EXTENSION creates.  Nothing
 * here is granted to PUBLIC: an application role gets exactly the GRANTs
 * docs/security.md lists.  Configuration tables are marked with
 * pg_extension_config_dump so pg_dump keeps what the user wrote.  Every
 * function pins its search_path.
 *
 * A change here is a change of the next release: it goes into the upgrade
 * script sql/d365sync--A--B.sql too, and the upgrade test proves that an
 * updated installation equals a fresh one.
 */
\echo Use "CREATE EXTENSION d365sync" to load this file. \quit
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
 * The background worker's side of the catalog (src/worker.c,
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
        INSERT INTO d365.app_users AS u (client_id, client_secret)
        VALUES (d365_set_secret_from_file.client_id, secret)
        ON CONFLICT ON CONSTRAINT app_users_pkey DO UPDATE SET client_secret = EXCLUDED.client_secret;
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
 * contains (...)".
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
CREATE INDEX sync_run_finished_idx ON d365.sync_run (finished_at);

/*
 * Deletes the runs older than d365.settings.run_history_retention, keeping
 * the newest run of each kind whatever its age (d365_status shows it), at
 * most 10,000 rows per call so that a first prune after a long time stays
 * short; returns how many rows it deleted.  Every scheduled run calls it
 * after recording itself.  SECURITY DEFINER: a role that may run the jobs
 * need not be allowed to delete history; it deletes nothing but rows past
 * the retention the settings' owner chose.
 */
CREATE FUNCTION d365._prune_runs()
RETURNS integer
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH old AS (
        SELECT r.id FROM d365.sync_run r
         WHERE r.finished_at < pg_catalog.now() - (SELECT s.run_history_retention FROM d365.settings s)
           AND EXISTS (SELECT FROM d365.sync_run n WHERE n.kind = r.kind AND n.id > r.id)
         ORDER BY r.finished_at
         LIMIT 10000),
    gone AS (
        DELETE FROM d365.sync_run r USING old WHERE r.id = old.id RETURNING 1)
    SELECT count(*)::integer FROM gone
$$;
COMMENT ON FUNCTION d365._prune_runs() IS
    'Deletes run history older than d365.settings.run_history_retention (the newest run of each kind stays); returns the number of rows deleted';

/*
 * Runs in progress in shared memory: one row per run of a backend or the
 * background worker of this database.  Without d365sync in
 * shared_preload_libraries there is no shared memory, and no row.
 */
CREATE FUNCTION d365._run_progress_shared(
    OUT pid integer, OUT kind text, OUT started_at timestamptz,
    OUT done bigint, OUT failed bigint, OUT remaining bigint,
    OUT requests bigint, OUT throttled bigint)
RETURNS SETOF record
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_run_progress_shared'
LANGUAGE C VOLATILE;

/*
 * Runs in progress, as other sessions see them.  A running run reports its
 * progress two ways: in shared memory (with the preload) and in its
 * backend's activity text in pg_stat_activity (a comment before the query:
 * "d365sync: contacts run since ...: 120 done, ..."), which works without
 * the preload but needs track_activities (on by default).  Shared memory
 * wins where both exist.
 * SECURITY DEFINER: the activity text of another role's backend is hidden
 * from a caller without pg_read_all_stats; this shows only the numbers of
 * d365sync runs in this database.
 */
CREATE FUNCTION d365.d365_run_progress(
    OUT pid integer, OUT kind text, OUT started_at timestamptz,
    OUT done bigint, OUT failed bigint, OUT remaining bigint,
    OUT requests bigint, OUT throttled bigint, OUT source text)
RETURNS SETOF record
LANGUAGE sql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH shm AS (SELECT * FROM d365._run_progress_shared())
    SELECT shm.*, 'shared memory' FROM shm
    UNION ALL
    SELECT a.pid, m[1], m[2]::timestamptz, m[3]::bigint, m[4]::bigint,
           nullif(m[5], '?')::bigint, m[6]::bigint, m[7]::bigint, 'pg_stat_activity'
      FROM pg_stat_activity a,
           regexp_match(a.query, '^/\* d365sync: ([a-z]+) run since ([0-9: -]+ UTC): ([0-9]+) done, ([0-9]+) failed, ([0-9]+|\?) remaining, ([0-9]+) requests, ([0-9]+) throttled') m
     WHERE a.state = 'active' AND a.datname = current_database() AND m IS NOT NULL
       AND a.pid NOT IN (SELECT shm.pid FROM shm)
    ORDER BY 3, 1
$$;
COMMENT ON FUNCTION d365.d365_run_progress() IS
    'Sync runs in progress in this database (any session or the worker): items done and failed, items remaining (NULL while unknown), HTTP requests and throttled responses so far';

CREATE VIEW d365.run_progress AS SELECT * FROM d365.d365_run_progress();
COMMENT ON VIEW d365.run_progress IS
    'Sync runs in progress in this database, as d365_run_progress() returns them';
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
 * The JSON expression of one mapped column, as Dynamics takes the value;
 * NULL when the column's type cannot be converted.  bind_set turns a uuid
 * into a lookup bind path /<entity set>(<uuid>).
 *
 * The expression runs no code a user wrote, whoever evaluates it: built-in
 * types go through to_jsonb (which looks for a user's cast to json only for
 * types of the user's making), an enum through its output function
 * (enum_out, never a cast the application defined), a domain as its base
 * type.  A timestamp without time zone is read as UTC, whatever the
 * session's TimeZone.
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
    problem := d365._attachment_problem(src);
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
 * table's owner, in a security-restricted operation (see src/table_owner.c
 * and docs/security.md): the code the table's owner controls -- triggers,
 * index expressions, defaults, domain checks, casts, row security, the
 * incoming mapper -- then runs with the owner's rights, never with ours or
 * a superuser caller's.  The statements take their data as parameters (the
 * table's owner has no rights on d365's tables) and name every object with
 * its schema.  columns: the columns the statement writes (or converts),
 * whose UPDATE right the caller must hold.
 *
 *   links    $1 text[] keys, $2 uuid[] ids, $3 uuid[] the ids the rows must
 *            still be linked to (NULL: still unlinked): sets the link
 *            columns; returns the keys changed
 *   unlink   $1 uuid: unlinks the contact linked to that Dynamics id;
 *            returns its key
 *   convert  $1 jsonb {column: JSON value}: each value as its column holds
 *            it, as {dynamics_field: value} (d365._json_expr's form)
 *   apply    $1 jsonb {column: JSON value}, $2 text key: the update
 *   map      $1 jsonb Dynamics row, $2 jsonb mapping, $3 text key: the
 *            incoming mapper's {column: value} for the contact
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
    IF op IN ('convert', 'apply') THEN
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
    WHEN 'links' THEN
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
                      ' RETURNING t.%2$I::pg_catalog.text AS k)'
                      ' SELECT pg_catalog.array_agg(k) FROM u',
                      tbl, src.key_column, key_type);
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
    WHEN 'map' THEN
        columns := NULL;
        IF (SELECT incoming_mapper FROM d365.settings) IS NULL THEN
            RAISE EXCEPTION 'no incoming mapper is set'
                USING ERRCODE = 'object_not_in_prerequisite_state';
        END IF;
        sql := format('SELECT %1$s($1, pg_catalog.to_jsonb(c), $2) FROM %2$s c'
                      ' WHERE c.%3$I OPERATOR(pg_catalog.=) $3::%4$s',
                      (SELECT incoming_mapper::oid::regproc FROM d365.settings),
                      tbl, src.key_column, key_type);
    ELSE
        RAISE EXCEPTION 'unknown table-owner operation "%"', op
            USING ERRCODE = 'invalid_parameter_value';
    END CASE;
END;
$$;

/*
 * The statements above, run as the contact table's owner (src/table_owner.c).
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

-- Field map validation: the column must exist and be mappable.
CREATE FUNCTION d365._field_map_check()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source;
    typ regtype;
    generated boolean;
BEGIN
    src := d365._contact_source();
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
    IF d365._json_expr('x', typ, CASE WHEN NEW.dynamics_field LIKE '%@odata.bind' THEN 'set' END) IS NULL THEN
        RAISE EXCEPTION 'column "%" of type % cannot be sent to Dynamics', NEW.column_name, typ
            USING ERRCODE = 'datatype_mismatch',
                  DETAIL = CASE WHEN NEW.dynamics_field LIKE '%@odata.bind'
                                THEN 'A lookup (@odata.bind) is written from a uuid column.'
                                ELSE 'Supported types: text, varchar, char, integers, numeric, real, double precision, boolean, date, timestamp, timestamptz, uuid and enums.' END,
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
BEGIN
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

-- ---------------------------------------------------------------------------
-- Identity and change capture: tombstones for keys that stop belonging to
-- a person, the capture triggers on the attached table (their C side is
-- src/capture.c) and the check of an attachment.  See docs/contacts.md,
-- "Identity" and "Change capture".
-- ---------------------------------------------------------------------------

/*
 * What is wrong with an attachment, or NULL when nothing is: the table was
 * dropped, the key or score column renamed or dropped, the type of the key,
 * score or link columns changed, or a capture trigger is missing or no
 * longer watches the key column.  Runs no user code (catalog look-ups
 * only), so d365_status() can report it whatever state the table is in.
 * d365._contact_table_problem checks the score and link columns under the
 * table's lock, kept to the end of the transaction.
 */
CREATE FUNCTION d365._contact_table_problem(tbl regclass, score_column name)
RETURNS text
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_contact_table_problem'
LANGUAGE C VOLATILE;

CREATE FUNCTION d365._attachment_problem(src d365.contact_source)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key_att pg_attribute;
    trg text;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = src.contact_table) THEN
        RETURN format('the attached table (OID %s) was dropped', src.contact_table::oid);
    END IF;
    SELECT * INTO key_att FROM pg_attribute a
     WHERE a.attrelid = src.contact_table AND a.attname = src.key_column
       AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        RETURN format('key column "%s" of %s was renamed or dropped', src.key_column, src.contact_table);
    END IF;
    IF key_att.atttypid <> ALL (d365._key_types()) THEN
        RETURN format('key column "%s" of %s has type %s, which d365sync does not support',
                      src.key_column, src.contact_table, key_att.atttypid::regtype);
    END IF;
    -- the score and link columns are compared and converted by d365's own
    -- expressions: a type of the owner's making there (by ALTER TABLE after
    -- attaching) would run its casts and operators with the caller's rights.
    -- Checked under the table's lock, so that no ALTER TABLE comes between
    -- this check and the statements that rely on it.
    trg := d365._contact_table_problem(src.contact_table, src.score_column);
    IF trg IS NOT NULL THEN
        RETURN trg;
    END IF;
    FOREACH trg IN ARRAY ARRAY['d365_capture_update', 'd365_capture_update_flush',
                               'd365_capture_insert_flush', 'd365_capture_delete',
                               'd365_capture_truncate'] LOOP
        IF NOT EXISTS (SELECT FROM pg_trigger t
                        WHERE t.tgrelid = src.contact_table AND t.tgname = trg
                          AND t.tgenabled <> 'D'
                          AND (t.tgnargs = 0 OR encode(t.tgargs, 'escape') = key_att.attnum || '\000')) THEN
            RETURN format('capture trigger %s on %s is missing, disabled or watches another key column',
                          trg, src.contact_table);
        END IF;
    END LOOP;
    RETURN NULL;
END;
$$;

/*
 * Change capture.  The triggers d365._contact_capture_install() puts on the
 * attached table cost the application little and run nothing it controls
 * with our rights:
 *   d365_capture_update        AFTER UPDATE, per row, WHEN the key or a mapped
 *                              column changed: the WHEN clause is evaluated
 *                              by the executor as the writing user, and the
 *                              C function only notes the key (src/capture.c)
 *   d365_capture_update_flush  AFTER UPDATE, per statement, and
 *   d365_capture_insert_flush  AFTER INSERT, per statement: the noted keys
 *                              go to d365.contact_change, one row per
 *                              statement
 *   d365_capture_delete        AFTER DELETE, per statement: tombstones
 *   d365_capture_truncate      AFTER TRUNCATE: tombstones for every key
 * The key column is passed by attribute number, so renaming it never breaks
 * the application's writes (d365_status() reports the attachment broken
 * until the table is attached again under the new name).
 */

/*
 * The keys stop belonging to the person who had them (deleted, truncated,
 * moved to another key): raise their generation, so a row inserted later
 * under the same key gets a Dynamics id of its own, and forget the snapshot,
 * the failures and the link of the earlier person.  A key without state gets
 * a tombstone row too (a create for it may have reached Dynamics in a
 * transaction that never committed).
 */
CREATE FUNCTION d365._contact_tombstone(keys text[])
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO d365.contact_state AS s (contact_key, change_seq, synced_seq, generation)
    SELECT DISTINCT k, 0, 0, 1 FROM unnest(keys) k WHERE k IS NOT NULL
    ON CONFLICT (contact_key) DO UPDATE
       SET generation = s.generation + 1, synced = NULL, dynamics_id = NULL,
           synced_seq = s.change_seq, remote_deleted_at = NULL, attempts = 0,
           next_attempt_at = NULL, last_status = NULL, last_error_code = NULL,
           last_error = NULL
$$;

/*
 * The one account of a contact deleted in Dynamics, once its row was
 * unlinked (a 404 on update, or a $deletedEntity of the pull): the state
 * forgets the snapshot and the link, takes the next generation (a
 * re-creation gets a new id), and records why.
 */
CREATE FUNCTION d365._contact_remote_deleted(keys text[], statuses integer[],
                                             error_codes text[], reasons text[])
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE d365.contact_state s
       SET synced = NULL, dynamics_id = NULL, synced_seq = s.change_seq,
           generation = s.generation + 1, remote_deleted_at = now(), attempts = 0,
           next_attempt_at = NULL, last_attempt_at = now(), last_status = o.st,
           last_error_code = o.code, last_error = o.reason
      FROM unnest(keys, statuses, error_codes, reasons) o(k, st, code, reason)
     WHERE s.contact_key = o.k
$$;

/*
 * Rows whose key changed (old_keys[i] became new_keys[i]): the old key is a
 * tombstone, and so is whatever state the new key had (it belonged to an
 * earlier person).  The moved row keeps its link column, so it stays linked
 * to its own Dynamics record and is sent in full at the next sync.
 */
CREATE FUNCTION d365._contact_keys_moved(old_keys text[], new_keys text[])
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ SELECT d365._contact_tombstone(old_keys || new_keys) $$;

-- AFTER DELETE, per statement: every deleted key becomes a tombstone.
-- Reads only the key column of the transition table (a built-in type).
CREATE FUNCTION d365._contact_capture_delete()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key_name name;
    keys text[];
BEGIN
    SELECT a.attname INTO key_name FROM pg_attribute a
     WHERE a.attrelid = TG_RELID AND a.attnum = TG_ARGV[0]::smallint
       AND NOT a.attisdropped AND a.atttypid = ANY (d365._key_types());
    IF key_name IS NULL THEN
        RETURN NULL;        -- broken attachment: d365_status() reports it
    END IF;
    EXECUTE format('SELECT array_agg(g.%I::text) FROM d365_gone g', key_name) INTO keys;
    PERFORM d365._contact_tombstone(keys);
    RETURN NULL;
END;
$$;

-- AFTER TRUNCATE: every key the state knows becomes a tombstone.
CREATE FUNCTION d365._contact_capture_truncate()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM d365._contact_tombstone(ARRAY(SELECT s.contact_key FROM d365.contact_state s));
    DELETE FROM d365.contact_change;
    RETURN NULL;
END;
$$;

-- AFTER UPDATE, per row, behind the WHEN clause: notes the key (and a key
-- change).  Argument: the key column's attribute number.
CREATE FUNCTION d365._contact_capture_row()
RETURNS trigger
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_capture_row'
LANGUAGE C;

-- AFTER INSERT or UPDATE, per statement: writes the keys the statement's
-- rows noted (as the extension owner: writers of the table need no rights
-- in d365).
CREATE FUNCTION d365._contact_capture_flush()
RETURNS trigger
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_capture_flush'
LANGUAGE C;

/*
 * The first step of a contact sync: the changes noted since the last one
 * become change_seq increments.  Queue rows another run is folding are
 * left to it (SKIP LOCKED); rows of transactions still in progress wait
 * for the next run.  Runs as the owner of d365's tables (it touches
 * nothing else), so whoever may run the sync needs no rights on the queue.
 */
CREATE FUNCTION d365._contact_fold_changes()
RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH gone AS (
        DELETE FROM d365.contact_change q
         WHERE q.ctid = ANY (ARRAY(SELECT ctid FROM d365.contact_change FOR UPDATE SKIP LOCKED))
        RETURNING q.keys, q.noted_at)
    INSERT INTO d365.contact_state AS s (contact_key, pending_since)
    SELECT k, min(g.noted_at) FROM gone g, unnest(g.keys) k GROUP BY k
    ON CONFLICT (contact_key) DO UPDATE
       SET change_seq = s.change_seq + 1,
           -- the lag counts from the oldest change not yet sent
           pending_since = CASE WHEN s.change_seq > s.synced_seq THEN s.pending_since
                                ELSE EXCLUDED.pending_since END
$$;

/*
 * (Re)creates the capture triggers on the attached table; the WHEN clause of
 * d365_capture_update lists the key and the mapped columns that are sent
 * (direction both or out) and exist, each
 * compared with IS DISTINCT FROM (the column type's own equality, evaluated
 * as the writing user), so an UPDATE of other columns costs no trigger
 * call.  Runs as the caller: creating triggers
 * takes the table owner's rights.
 */
CREATE FUNCTION d365._contact_capture_install()
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source;
    key_num smallint;
    changed text;
BEGIN
    SELECT * INTO src FROM d365.contact_source;
    SELECT a.attnum INTO key_num FROM pg_attribute a
     WHERE a.attrelid = src.contact_table AND a.attname = src.key_column
       AND a.attnum > 0 AND NOT a.attisdropped;
    IF key_num IS NULL THEN
        RETURN;             -- nothing attached, or broken: d365_status() says which
    END IF;
    SELECT string_agg(format('OLD.%1$I IS DISTINCT FROM NEW.%1$I', a.attname), ' OR ' ORDER BY a.attnum)
      INTO changed
      FROM pg_attribute a
     WHERE a.attrelid = src.contact_table AND a.attnum > 0 AND NOT a.attisdropped
       AND (a.attnum = key_num
            OR a.attname IN (SELECT f.column_name FROM d365.field_map f WHERE f.direction <> 'in'));
    EXECUTE format('CREATE OR REPLACE TRIGGER d365_capture_update AFTER UPDATE ON %s FOR EACH ROW'
                   ' WHEN (%s) EXECUTE FUNCTION d365._contact_capture_row(%L)',
                   src.contact_table, changed, key_num);
    EXECUTE format('CREATE OR REPLACE TRIGGER d365_capture_update_flush AFTER UPDATE ON %s'
                   ' FOR EACH STATEMENT EXECUTE FUNCTION d365._contact_capture_flush()',
                   src.contact_table);
    EXECUTE format('CREATE OR REPLACE TRIGGER d365_capture_insert_flush AFTER INSERT ON %s'
                   ' FOR EACH STATEMENT EXECUTE FUNCTION d365._contact_capture_flush()',
                   src.contact_table);
    EXECUTE format('CREATE OR REPLACE TRIGGER d365_capture_delete AFTER DELETE ON %s'
                   ' REFERENCING OLD TABLE AS d365_gone'
                   ' FOR EACH STATEMENT EXECUTE FUNCTION d365._contact_capture_delete(%L)',
                   src.contact_table, key_num);
    EXECUTE format('CREATE OR REPLACE TRIGGER d365_capture_truncate AFTER TRUNCATE ON %s'
                   ' FOR EACH STATEMENT EXECUTE FUNCTION d365._contact_capture_truncate()',
                   src.contact_table);
EXCEPTION WHEN insufficient_privilege THEN
    RAISE EXCEPTION 'permission denied to change the capture triggers of %', src.contact_table
        USING ERRCODE = 'insufficient_privilege',
              DETAIL = 'The capture trigger watches the mapped columns, so attaching the table and changing the field map re-create it.',
              HINT = 'Do this as the owner of the table, or as a member of its owning role.';
END;
$$;

-- Every trigger d365sync put on a table (by the functions they call, so
-- triggers of earlier releases are found too).
CREATE FUNCTION d365._contact_capture_drop(tbl regclass)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    trg name;
BEGIN
    FOR trg IN SELECT t.tgname FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
                WHERE t.tgrelid = tbl AND NOT t.tgisinternal
                  AND p.pronamespace = 'd365'::regnamespace LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', trg, tbl);
    END LOOP;
END;
$$;

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
SET search_path = pg_catalog, pg_temp
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
SET search_path = pg_catalog, pg_temp
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
         maps AS (SELECT f.column_name, f.dynamics_field, f.direction,
                         split_part(f.dynamics_field, '@', 1) AS nav,
                         f.dynamics_field LIKE '%@odata.bind' AS is_bind,
                         -- a domain is judged by its base type, an enum is sent as text
                         CASE WHEN b.typtype = 'e' THEN 'text'
                              ELSE format_type(b.oid, NULL) END AS ctype
                    FROM d365.field_map f
                    CROSS JOIN d365.contact_source s
                    LEFT JOIN pg_attribute a ON a.attrelid = s.contact_table
                         AND a.attname = f.column_name AND a.attnum > 0 AND NOT a.attisdropped
                    LEFT JOIN pg_type t ON t.oid = a.atttypid
                    LEFT JOIN pg_type b ON b.oid = coalesce(nullif(t.typbasetype, 0), t.oid)),
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
                             -- an 'in' field is only read: whether it can be written does not matter
                             WHEN direction = 'in' THEN d365._type_problem(atype, ctype, is_bind, name)
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
 * The map stage of contacts as one jsonb expression over the row alias
 * row_alias: {dynamics_field: value} for the mapped columns named in
 * only_columns (all when NULL), each converted by d365._json_expr (no code
 * of the application's making runs).  Raises when a mapped column is gone
 * or cannot be converted.
 */
CREATE FUNCTION d365._values_expr(row_alias text, only_columns name[])
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source;
    cur text := '''{}''::pg_catalog.jsonb';
    m record;
    expr text;
BEGIN
    SELECT * INTO src FROM d365.contact_source;
    FOR m IN SELECT f.column_name, f.dynamics_field, a.atttypid::regtype AS typ, b.entity_set
               FROM d365.field_map f
               LEFT JOIN pg_attribute a ON a.attrelid = src.contact_table
                    AND a.attname = f.column_name AND a.attnum > 0 AND NOT a.attisdropped
               LEFT JOIN d365._lookup_binds() b ON b.dynamics_field = f.dynamics_field
              WHERE only_columns IS NULL OR f.column_name = ANY (only_columns)
              ORDER BY f.column_name
    LOOP
        IF m.typ IS NULL THEN
            RAISE EXCEPTION 'mapped column "%" no longer exists in %', m.column_name, src.contact_table
                USING ERRCODE = 'undefined_column',
                      HINT = format('DELETE FROM d365.field_map WHERE column_name = %L;', m.column_name);
        END IF;
        expr := d365._json_expr(format('%I.%I', row_alias, m.column_name), m.typ, m.entity_set);
        IF expr IS NULL THEN
            RAISE EXCEPTION 'mapped column "%" of type % cannot be sent to Dynamics', m.column_name, m.typ
                USING ERRCODE = 'datatype_mismatch',
                      HINT = 'Change the column''s type or its mapping.';
        END IF;
        cur := cur || format(' OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object(%L, %s)',
                             m.dynamics_field, expr);
    END LOOP;
    RETURN cur;
END;
$$;

/*
 * The map stage over the contact row "c", outgoing: every mapped column that
 * is sent (direction both or out; an 'in' field is never sent, so it is in
 * no create, no update and no comparison with the synced snapshot).
 */
CREATE FUNCTION d365._contact_values_expr()
RETURNS text
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT d365._values_expr('c', (SELECT coalesce(array_agg(f.column_name), '{}')
                                     FROM d365.field_map f WHERE f.direction <> 'in'))
$$;

/*
 * Whose sync state is it?  A row's own link column says whether it is
 * linked.  A state row that names a Dynamics contact other than the row's
 * link (the row is unlinked, or linked elsewhere) belongs to an earlier
 * person under the same key (deleted while detached, restored from a dump,
 * link cleared by hand): its snapshot, failures and back-off are not the
 * row's, and an unlinked row gets the next generation -- a Dynamics id of
 * its own.  Aliases: c the contact row, s its state (LEFT JOIN).
 */
CREATE FUNCTION d365._contact_foreign_sql()
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT '(s.dynamics_id IS NOT NULL AND s.dynamics_id IS DISTINCT FROM c.dynamics365_related_id)' $$;

/*
 * The one "pending" condition, used by the work query of the scheduled
 * sync and by d365_status() alike.  what = 'create': unlinked contacts whose
 * score reaches min_score (not one deleted in Dynamics and unchanged since);
 * 'update': linked contacts with a change not yet sent (or no snapshot);
 * 'any': either.  Both honour the back-off of a failing contact.  queued:
 * changes still in d365.contact_change count as pending too (alias q, see
 * _contact_pending_from); the sync folds them into the state first.
 */
CREATE FUNCTION d365._contact_pending_sql(what text, score_column name, queued boolean)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    own_or text := format('s.contact_key IS NULL OR %s', d365._contact_foreign_sql());
    changed text := 's.change_seq > s.synced_seq' || CASE WHEN queued THEN ' OR q.contact_key IS NOT NULL' ELSE '' END;
    create_cond text := format(
        '(c.dynamics365_related_id IS NULL AND c.%I >= (SELECT min_score FROM d365.settings)'
        ' AND (%s OR s.remote_deleted_at IS NULL OR %s))',
        score_column, own_or, changed);
    update_cond text := format(
        '(c.dynamics365_related_id IS NOT NULL AND (%s OR s.synced IS NULL OR %s))',
        own_or, changed);
    backoff text := format('(%s OR s.next_attempt_at IS NULL OR s.next_attempt_at <= now())', own_or);
BEGIN
    RETURN CASE what WHEN 'create' THEN create_cond
                     WHEN 'update' THEN update_cond
                     ELSE format('(%s OR %s)', create_cond, update_cond) END
           || ' AND ' || backoff;
END;
$$;

-- The FROM list the pending condition needs: the contact row c, its state
-- s, and (queued) its changes not yet folded q.
CREATE FUNCTION d365._contact_pending_from(src d365.contact_source, queued boolean)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('%s c LEFT JOIN d365.contact_state s ON s.contact_key = c.%I::text', src.contact_table, src.key_column)
           || CASE WHEN queued
                   THEN format(' LEFT JOIN (SELECT DISTINCT k AS contact_key'
                               '              FROM d365.contact_change, unnest(keys) k) q'
                               ' ON q.contact_key = c.%I::text', src.key_column)
                   ELSE '' END
$$;

/*
 * The work query of a contact sync: one row per contact to consider, with
 * the request to send (none when nothing changed) and a context that
 * d365._contact_record() gets back.  A create is an upsert on the id the
 * contact will have (no If-Match); an update carries If-Match: * so that it
 * never re-creates a contact deleted in Dynamics.  The map stage is here: the mapped
 * columns become one jsonb object converted as docs/contacts.md ("Map columns
 * to Dynamics fields") says, and for
 * a linked contact the body is the part of it that differs from the synced
 * snapshot (a NULL clears the Dynamics value).
 *
 * When match fields are marked in d365.field_map, an unlinked contact whose
 * match values are all present also gets a look-up (the fourth column: its
 * match values as {dynamics_field: value}); the pipeline searches Dynamics
 * for them before anything is sent (d365._contact_lookup_path and
 * d365._contact_lookup_resolve).
 *
 * The context carries the generation the id was made from and the
 * state's generation as read ("base"): the record step writes nothing when
 * a delete, truncate or key change moved the state on meanwhile.
 *
 * scheduled = true: the job's selection (the pending condition), after
 * folding the noted changes into the state.
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
    match text;
BEGIN
    src := d365._contact_source();
    SELECT format_type(a.atttypid, a.atttypmod) INTO key_type
      FROM pg_attribute a WHERE a.attrelid = src.contact_table AND a.attname = src.key_column;
    cur := d365._contact_values_expr();
    match := d365._contact_match_expr();

    IF scheduled THEN
        PERFORM d365._contact_fold_changes();
        -- a row without a key (a UNIQUE key allows NULLs) cannot be sent
        -- or recorded: left alone, it must not stop the others
        sel := format('c.%I IS NOT NULL AND ', src.key_column)
               || d365._contact_pending_sql('any', src.score_column, false);
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
                                  'generation', w.generation, 'base', w.base,
                                  'values', w.cur, 'sent', w.body)::text AS context,
               CASE WHEN NOT w.linked AND w.match_values IS NOT NULL
                         AND NOT EXISTS (SELECT FROM jsonb_each(w.match_values) e
                                          WHERE e.value IN ('null'::jsonb, '""'::jsonb))
                    THEN w.match_values::text END AS lookup
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
                                        d365._contact_guid(c.%1$I::text, g.generation)) AS dynamics_id,
                               coalesce(s.change_seq, 0) AS change_seq,
                               g.generation, s.generation AS base,
                               CASE WHEN %6$s THEN NULL ELSE s.synced END AS synced,
                               %2$s AS cur,
                               %5$s AS match_values
                          FROM %3$s,
                               LATERAL (SELECT coalesce(s.generation, 0)
                                               + CASE WHEN %6$s THEN 1 ELSE 0 END AS generation) g
                         WHERE %4$s
                        OFFSET 0) v) w
    $q$, src.key_column, cur, d365._contact_pending_from(src, false), sel, match,
         d365._contact_foreign_sql());
END;
$$;

/*
 * One outcome of a contact sync, as the record stage works on it.  An array
 * of these, not a temporary table: a temporary table is a new relation in
 * every run, and every statement on it a new entry in pg_stat_statements.
 */
CREATE TYPE d365._contact_outcome AS (
    item_key text, action text, dynamics_id uuid, seq bigint, generation integer,
    base integer, vals jsonb, sent jsonb, status integer, error_code text,
    error_message text, ok boolean, gone boolean, matched boolean, current boolean
);

/*
 * The record stage of a contact sync: link columns, sync state, failures
 * and back-off for a chunk of outcomes (one array element per item).
 * The link columns are written as the table's owner in a security-restricted
 * operation (d365._contact_set_links): the application table's own
 * triggers, fired by that update, run with its owner's rights under
 * search_path = pg_catalog, pg_temp (as under PostgreSQL's maintenance
 * commands) and must qualify names.
 *
 * Nothing is written for a contact whose state moved on since the work
 * query read it (its generation is no longer "base": the row was deleted,
 * the table truncated or the key changed meanwhile), and a create (or a
 * match) links only a row that is still unlinked, an update only a row
 * still linked to that record: a Dynamics record belongs to the person
 * whose data it holds, never to a newcomer under the same key.  Returns the
 * chunk's counts.
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
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    done text[];
    outcomes d365._contact_outcome[];
BEGIN
    -- a contact without state gets a state row first, so that a concurrent
    -- tombstone shows as a change
    INSERT INTO d365.contact_state (contact_key, change_seq, synced_seq)
    SELECT o.k, coalesce((x.c ->> 'seq')::bigint, 0), coalesce((x.c ->> 'seq')::bigint, 0)
      FROM unnest(item_keys, contexts) AS o(k, ctx),
           LATERAL (SELECT o.ctx::jsonb AS c) x
     WHERE x.c ->> 'base' IS NULL
    ON CONFLICT (contact_key) DO NOTHING;

    -- the chunk's outcomes; current: the contact still has the identity
    -- the work query saw
    SELECT array_agg(ROW(
               o.k, x.c ->> 'action', (x.c ->> 'id')::uuid, (x.c ->> 'seq')::bigint,
               (x.c ->> 'generation')::integer, (x.c ->> 'base')::integer,
               x.c -> 'values', nullif(x.c -> 'sent', 'null'),
               o.st, coalesce(o.code, x.c ->> 'error_code'), coalesce(o.msg, x.c ->> 'error'),
               coalesce((x.c ->> 'action') IN ('unchanged', 'link')
                        OR (o.st BETWEEN 200 AND 299 AND o.msg IS NULL), false),
               coalesce((x.c ->> 'action') = 'update' AND o.st = 404 AND x.c -> 'matched' IS NULL, false),
               x.c -> 'matched' IS NOT NULL,
               EXISTS (SELECT FROM d365.contact_state s
                        WHERE s.contact_key = o.k
                          AND s.generation = coalesce((x.c ->> 'base')::integer, 0))
           )::d365._contact_outcome)
      INTO outcomes
      FROM unnest(item_keys, contexts, statuses, error_codes, error_messages)
               AS o(k, ctx, st, code, msg),
           LATERAL (SELECT o.ctx::jsonb AS c) x;

    -- created, updated or matched: link and stamp the contact (as the
    -- table's owner: its triggers and index expressions never run with the
    -- caller's rights); a create or a match only a row still unlinked, an
    -- update only a row still linked to that record
    SELECT d365._contact_set_links(array_agg(o.item_key), array_agg(o.dynamics_id),
                                   array_agg(CASE WHEN o.action = 'update' AND NOT o.matched
                                                  THEN o.dynamics_id END))
      INTO done
      FROM unnest(outcomes) o
     WHERE o.ok AND o.current AND o.action IN ('create', 'update', 'link');

    -- success (or nothing to send): remember what Dynamics now holds.  A
    -- create sent every value; an update only the fields it carried, merged
    -- into the snapshot (which an incoming change may have moved meanwhile).
    -- A matched contact now holds the local values wherever they are set
    -- (where the local value is NULL, Dynamics keeps its own and the
    -- snapshot says NULL, so the next run does not clear it).
    UPDATE d365.contact_state s
       SET synced = CASE WHEN o.action = 'create' OR o.matched OR s.synced IS NULL
                           OR s.dynamics_id <> o.dynamics_id THEN o.vals
                         ELSE s.synced || coalesce(o.sent, '{}') END,
           dynamics_id = o.dynamics_id, synced_seq = o.seq, generation = o.generation,
           attempts = 0, next_attempt_at = NULL, last_attempt_at = now(),
           last_status = coalesce(o.status, s.last_status),
           last_error_code = NULL, last_error = NULL, remote_deleted_at = NULL
      FROM unnest(outcomes) o
     WHERE o.ok AND o.current AND s.contact_key = o.item_key
       AND (o.item_key = ANY (done) OR o.action = 'unchanged');

    -- deleted in Dynamics: unlink (only a row still linked to it) and
    -- report; a re-creation gets a new id
    SELECT d365._contact_set_links(array_agg(o.item_key), array_agg(NULL::uuid), array_agg(o.dynamics_id))
      INTO done
      FROM unnest(outcomes) o WHERE o.gone AND o.current;
    PERFORM d365._contact_remote_deleted(array_agg(o.item_key), array_agg(o.status), array_agg(o.error_code),
                array_agg('deleted in Dynamics 365, unlinked: ' || coalesce(o.error_message, '')))
       FROM unnest(outcomes) o
      WHERE o.gone AND o.item_key = ANY (done);

    -- other failures: stay pending, back off 5 min, 10 min, ... up to a
    -- day.  The contact keeps the identity its id was made from, so the
    -- retry sends the same id.
    UPDATE d365.contact_state s
       SET attempts = CASE WHEN o.foreign THEN 1 ELSE s.attempts + 1 END,
           next_attempt_at = d365._next_attempt(CASE WHEN o.foreign THEN 1 ELSE s.attempts + 1 END),
           synced = CASE WHEN o.foreign THEN NULL ELSE s.synced END,
           dynamics_id = o.link_id, generation = o.generation,
           last_attempt_at = now(), last_status = nullif(o.status, 0),
           last_error_code = o.error_code, last_error = o.error_message
      FROM (SELECT x.*, l.link_id,
                   (SELECT t.dynamics_id IS NOT NULL AND t.dynamics_id IS DISTINCT FROM l.link_id
                      FROM d365.contact_state t WHERE t.contact_key = x.item_key) AS foreign
              FROM unnest(outcomes) x,
                   LATERAL (SELECT CASE WHEN x.action = 'update' AND NOT x.matched
                                        THEN x.dynamics_id END AS link_id) l) o
     WHERE NOT o.ok AND NOT o.gone AND o.current AND s.contact_key = o.item_key;

    SELECT count(*) FILTER (WHERE ok AND action = 'create'),
           count(*) FILTER (WHERE ok AND action = 'update'),
           count(*) FILTER (WHERE action IN ('unchanged', 'link')),
           count(*) FILTER (WHERE NOT ok AND NOT gone),
           count(*) FILTER (WHERE gone)
      INTO created, updated, unchanged, failed, unlinked
      FROM unnest(outcomes);
END;
$$;

CREATE FUNCTION d365._contact_link(contact_key text)
RETURNS uuid
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source := d365._contact_source();
    result uuid;
BEGIN
    EXECUTE format('SELECT dynamics365_related_id FROM %s WHERE %I::text = $1',
                   src.contact_table, src.key_column)
       INTO result USING contact_key;
    RETURN result;
END;
$$;

CREATE FUNCTION d365.d365_sync_contact(contact_key anyelement)
RETURNS uuid
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_sync_contact'
LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION d365.d365_sync_contact(anyelement) IS
    'Creates or updates one contact in Dynamics now, whatever its score and the enabled flag; returns its Dynamics id';

CREATE FUNCTION d365.d365_sync_contacts(
    OUT created integer, OUT updated integer, OUT unchanged integer,
    OUT failed integer, OUT unlinked integer, OUT requests integer)
RETURNS record
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_sync_contacts'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION d365.d365_sync_contacts() IS
    'The scheduled contact sync: creates qualifying contacts and sends the changed fields of linked ones';

-- ---------------------------------------------------------------------------
-- Matching existing Dynamics contacts before creating: the look-up stage of
-- the outgoing contact sync (the pipeline sends the look-ups, these
-- functions write them and judge the answers).
-- ---------------------------------------------------------------------------

/*
 * The match fields of the field map: column, Dynamics field and how its
 * value is written in a query (d365._match_type).  Ordered by Dynamics
 * field, so every look-up spells its filter the same way.
 */
CREATE FUNCTION d365._match_fields(
    OUT column_name name, OUT dynamics_field text, OUT kind text, OUT typ regtype)
RETURNS SETOF record
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT f.column_name, f.dynamics_field, d365._match_type(a.atttypid::regtype),
           a.atttypid::regtype
      FROM d365.field_map f
      JOIN d365.contact_source s ON true
      JOIN pg_attribute a ON a.attrelid = s.contact_table AND a.attname = f.column_name
                         AND a.attnum > 0 AND NOT a.attisdropped
     WHERE f.match
     ORDER BY f.dynamics_field
$$;

/*
 * The match values of the contact row "c" as one jsonb expression
 * ({dynamics_field: value}, converted as for sending), or 'NULL::jsonb' when
 * no field is marked match.
 */
CREATE FUNCTION d365._contact_match_expr()
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    expr text;
BEGIN
    SELECT string_agg(format('jsonb_build_object(%L, %s)', m.dynamics_field,
                             d365._json_expr(format('c.%I', m.column_name), m.typ)), ' || ')
      INTO expr
      FROM d365._match_fields() m;
    RETURN coalesce(expr, 'NULL::jsonb');
END;
$$;

-- Percent-encode everything but RFC 3986 unreserved characters (UTF-8).
CREATE FUNCTION d365._uri_escape(s text)
RETURNS text
LANGUAGE sql IMMUTABLE STRICT
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(string_agg(CASE WHEN b BETWEEN 48 AND 57 OR b BETWEEN 65 AND 90
                                         OR b BETWEEN 97 AND 122 OR b IN (45, 46, 95, 126)
                                    THEN chr(b) ELSE '%' || upper(lpad(to_hex(b), 2, '0')) END,
                               '' ORDER BY i), '')
      FROM (SELECT i, get_byte(convert_to(s, 'UTF8'), i) AS b
              FROM generate_series(0, octet_length(convert_to(s, 'UTF8')) - 1) i) x
$$;

-- One match value as an OData literal of its kind.
CREATE FUNCTION d365._odata_literal(val jsonb, kind text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN kind = 'text' THEN '''' || replace(val #>> '{}', '''', '''''') || ''''
                ELSE val #>> '{}' END
$$;

/*
 * The look-up request of a group of unlinked contacts (lookups: each
 * contact's match values as the work query gave them): one GET of the
 * active Dynamics contacts whose match fields equal one contact's values,
 * with every mapped field selected so that a hit can be compared with the
 * local values.  One match field is searched with the In query function,
 * several with an "or" chain of "and" groups.  The path is percent-encoded;
 * the caller keeps it under the Web API's URL length limit by sending
 * fewer contacts per look-up.
 */
CREATE FUNCTION d365._contact_lookup_path(lookups text[])
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    fields record;
    cond text;
    sel text;
BEGIN
    SELECT count(*) AS n, min(dynamics_field) AS first_field, min(kind) AS first_kind
      INTO fields FROM d365._match_fields();
    IF fields.n = 0 OR lookups IS NULL OR cardinality(lookups) = 0 THEN
        RETURN NULL;
    END IF;
    IF fields.n = 1 THEN
        SELECT format('Microsoft.Dynamics.CRM.In(PropertyName=%L,PropertyValues=[%s])',
                      fields.first_field,
                      string_agg(DISTINCT d365._odata_literal(to_jsonb(l::jsonb ->> fields.first_field), 'text'), ','))
          INTO cond
          FROM unnest(lookups) l
         WHERE l IS NOT NULL;
    ELSE
        SELECT string_agg(DISTINCT g, ' or ')
          INTO cond
          FROM (SELECT '(' || string_agg(format('%s eq %s', m.dynamics_field,
                                                d365._odata_literal(l::jsonb -> m.dynamics_field, m.kind)),
                                         ' and ' ORDER BY m.dynamics_field) || ')' AS g
                  FROM unnest(lookups) WITH ORDINALITY u(l, i)
                  CROSS JOIN d365._match_fields() m
                 WHERE l IS NOT NULL
                 GROUP BY i) x;
    END IF;
    IF cond IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT string_agg(DISTINCT r, ',') INTO sel
      FROM (SELECT CASE WHEN b.attribute IS NOT NULL THEN '_' || b.attribute || '_value'
                        ELSE f.dynamics_field END AS r
              FROM d365.field_map f
              LEFT JOIN d365._lookup_binds() b ON b.dynamics_field = f.dynamics_field) x;
    RETURN 'contacts?$select=contactid' || coalesce(',' || sel, '') ||
           '&$filter=' || d365._uri_escape('(' || cond || ') and statecode eq 0');
END;
$$;

/*
 * Whether a local value (as sent) and the value Dynamics holds are the same
 * for the purpose of matching (fold = true: text compared case-insensitively,
 * as Dataverse compares) or of sending (fold = false: exact).  Numbers
 * compare as numbers, date-times as instants, a lookup bind path by its id.
 */
CREATE FUNCTION d365._same_value(local jsonb, remote jsonb, fold boolean)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    l text := local #>> '{}';
    r text := remote #>> '{}';
BEGIN
    IF local IS NULL OR jsonb_typeof(local) = 'null' THEN
        RETURN remote IS NULL OR jsonb_typeof(remote) = 'null';
    ELSIF remote IS NULL OR jsonb_typeof(remote) = 'null' THEN
        RETURN false;
    ELSIF jsonb_typeof(local) = 'number' AND jsonb_typeof(remote) = 'number' THEN
        RETURN l::numeric = r::numeric;
    ELSIF jsonb_typeof(local) <> 'string' OR jsonb_typeof(remote) <> 'string' THEN
        RETURN local = remote;
    ELSIF d365._bind_guid(l) IS NOT NULL THEN
        RETURN lower(d365._bind_guid(l)) = lower(r);
    ELSIF l ~ '^\d{4}-\d\d-\d\dT' AND r ~ '^\d{4}-\d\d-\d\dT' THEN
        BEGIN
            RETURN l::timestamptz = r::timestamptz;
        EXCEPTION WHEN data_exception THEN
            RETURN l = r;
        END;
    ELSIF fold THEN
        RETURN lower(l) = lower(r);
    END IF;
    RETURN l = r;
END;
$$;

/*
 * The match values of a row (fields: the match fields), normalised so that
 * equal means equal to Dataverse: text (and a GUID) lower-cased, numbers as
 * numbers; a missing field is null.
 */
CREATE FUNCTION d365._match_key(vals jsonb, fields text[])
RETURNS jsonb
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(jsonb_object_agg(f, CASE jsonb_typeof(vals -> f)
                                            WHEN 'string' THEN to_jsonb(lower(vals ->> f))
                                            WHEN 'number' THEN to_jsonb((vals ->> f)::numeric)
                                            ELSE coalesce(vals -> f, 'null'::jsonb) END), '{}')
      FROM unnest(fields) f
$$;

/*
 * The judge of the look-ups: for each looked-up contact (item_keys,
 * lookups and contexts as the work query gave them, groups[i] the number of
 * the answer to its group's look-up in answers, the bodies of the answers),
 * what to send instead.  A row for
 * every contact: requests NULL means "as planned" (no Dynamics contact has
 * these values: it is created).
 *
 *	 one hit    link to it: PATCH (If-Match: *) only the fields whose local
 *				value is set and differs from Dynamics' (a match field that
 *				differs only in case does not count; action 'update', or
 *				'link' with no request when nothing differs)
 *	 several    fail, naming the candidate ids; nothing is sent
 *	 taken		fail when the hit is linked to another local contact already,
 *				or is the only hit of another contact of the same run
 *
 * Reads the contact table's link columns (to find hits already linked).
 */
CREATE FUNCTION d365._contact_lookup_resolve(item_keys text[], lookups text[],
    contexts text[], groups integer[], answers text[],
    OUT item_key text, OUT requests text, OUT context text)
RETURNS SETOF record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source;
    taken jsonb := '{}';
    fields text[];
    read_names jsonb;
BEGIN
    src := d365._contact_source();     -- key and link column types checked
    IF to_regclass('pg_temp.d365_lookup_hits') IS NULL THEN
        CREATE TEMP TABLE d365_lookup_hits (
            i integer, k text, c jsonb, look jsonb, n integer, more boolean, first_hit jsonb,
            ids text[]
        ) ON COMMIT DROP;
    ELSE
        TRUNCATE d365_lookup_hits;
    END IF;
    -- the hits of each contact: the rows of its group's answer whose match
    -- fields equal its values (one hash join on a normalised key)
    fields := (SELECT array_agg(m.dynamics_field) FROM d365._match_fields() m);
    WITH grp AS MATERIALIZED (
        SELECT x.g, x.a::jsonb AS j FROM unnest(answers) WITH ORDINALITY x(a, g)),
    items AS MATERIALIZED (
        SELECT u.i, u.k, u.c, u.l, u.g, coalesce(gr.j ? '@odata.nextLink', false) AS more,
               d365._match_key(u.l::jsonb, fields) AS key
          FROM unnest(item_keys, lookups, contexts, groups) WITH ORDINALITY u(k, l, c, g, i)
          LEFT JOIN grp gr ON gr.g = u.g),
    hits AS MATERIALIZED (
        SELECT gr.g, v, d365._match_key(v, fields) AS key
          FROM grp gr, jsonb_array_elements(coalesce(gr.j -> 'value', '[]')) v)
    INSERT INTO d365_lookup_hits
    SELECT t.i, t.k, t.c::jsonb, t.l::jsonb, x.n, t.more, x.first_hit, x.ids
      FROM items t
      LEFT JOIN (SELECT h.g, h.key, count(*) AS n, (array_agg(h.v))[1] AS first_hit,
                        array_agg(h.v ->> 'contactid' ORDER BY h.v ->> 'contactid') AS ids
                   FROM hits h GROUP BY h.g, h.key) x ON x.g = t.g AND x.key = t.key;

    -- hits that are someone else's already: linked locally, or the only
    -- hit of more than one contact of this run
    IF EXISTS (SELECT FROM d365_lookup_hits h WHERE h.n = 1) THEN
        EXECUTE format('SELECT coalesce(jsonb_object_agg(t.dynamics365_related_id, t.%I::text), ''{}'')'
                       '  FROM %s t JOIN pg_catalog.unnest($1) u(id) ON t.dynamics365_related_id = u.id',
                       src.key_column, src.contact_table)
           INTO taken
          USING (SELECT array_agg((h.first_hit ->> 'contactid')::uuid) FROM d365_lookup_hits h WHERE h.n = 1);
        SELECT taken || coalesce(jsonb_object_agg(d.id, d.keys), '{}') INTO taken
          FROM (SELECT h.first_hit ->> 'contactid' AS id,
                       string_agg(h.k, ', ' ORDER BY h.i) AS keys
                  FROM d365_lookup_hits h WHERE h.n = 1
                 GROUP BY 1 HAVING count(*) > 1) d
         WHERE NOT taken ? d.id;
    END IF;

    -- a lookup is read back as _<attribute>_value
    SELECT coalesce(jsonb_object_agg(b.dynamics_field, '_' || b.attribute || '_value'), '{}')
      INTO read_names FROM d365._lookup_binds() b;
    RETURN QUERY
    WITH judged AS (
        SELECT h.*,
               CASE WHEN h.n > 1
                        THEN format('matches %s Dynamics 365 contacts (%s%s)', h.n,
                                    array_to_string(h.ids[1:10], ', '),
                                    CASE WHEN h.n > 10 THEN format(' and %s more', h.n - 10) ELSE '' END)
                    WHEN h.more
                        THEN 'could not be matched: its look-up found more than one page of Dynamics 365 contacts'
                    WHEN h.n = 1 AND taken ? (h.first_hit ->> 'contactid')
                        THEN format('matches Dynamics 365 contact %s, which contact %s matches or is linked to',
                                    h.first_hit ->> 'contactid', taken ->> (h.first_hit ->> 'contactid'))
               END AS reason
          FROM d365_lookup_hits h),
    diffed AS MATERIALIZED (
        SELECT j.*,
               CASE WHEN j.reason IS NULL AND j.n = 1 THEN
                   (SELECT jsonb_object_agg(e.key, e.value)
                      FROM jsonb_each(j.c -> 'values') e
                     WHERE e.value <> 'null'::jsonb
                       AND NOT d365._same_value(e.value,
                                                j.first_hit -> coalesce(read_names ->> e.key, e.key),
                                                j.look ? e.key))
               END AS body
          FROM judged j)
    SELECT d.k,
           CASE WHEN d.reason IS NOT NULL OR (d.n = 1 AND d.body IS NULL) THEN '[]'
                WHEN d.n = 1
                    THEN jsonb_build_array(jsonb_build_object(
                             'method', 'PATCH',
                             'path', 'contacts(' || (d.first_hit ->> 'contactid') || ')',
                             'body', d.body::text,
                             'headers', '["If-Match: *"]'::jsonb))::text
           END,
           CASE WHEN d.reason IS NOT NULL
                    THEN (d.c || jsonb_build_object('action', 'ambiguous', 'sent', NULL,
                                                    'error_code', 'd365sync.match',
                                                    'error', d.reason || '; not created'))::text
                WHEN d.n = 1
                    THEN (d.c || jsonb_build_object('id', d.first_hit ->> 'contactid', 'matched', true,
                                                    'sent', d.body,
                                                    'action', CASE WHEN d.body IS NULL THEN 'link'
                                                                   ELSE 'update' END))::text
           END
      FROM diffed d
     ORDER BY d.i;
END;
$$;
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

/*
 * An activity mapper, called as the mapper function's owner in a
 * security-restricted operation (src/table_owner.c): whoever runs the
 * activity sync -- a superuser, a pg_cron job, d365_log_activity() running
 * as the extension's owner -- never runs a mapper with their own rights.
 * Only functions registered in d365.activity_mapper are called, and only
 * for a caller that may EXECUTE them.
 */
CREATE FUNCTION d365._activity_mapper_call(mapper regprocedure, entity text,
                                           dynamics_contact_id uuid, activity jsonb)
RETURNS jsonb
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_activity_mapper_call'
LANGUAGE C VOLATILE;

-- Whether a function is a registered activity mapper (the caller of
-- d365._activity_mapper_call may not be able to read d365.activity_mapper).
CREATE FUNCTION d365._is_activity_mapper(mapper regprocedure)
RETURNS boolean
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT EXISTS (SELECT FROM d365.activity_mapper m WHERE m.mapper = $1) $$;

-- Dynamics users by internal email, from the cached list; a GUID is taken as
-- a user id.  NULL when no such user exists.
CREATE FUNCTION d365._user_id(email_or_id text)
RETURNS uuid
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN d365._is_guid(email_or_id)
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
SET search_path = pg_catalog, pg_temp
LANGUAGE sql IMMUTABLE
AS $$ SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') $$;

/*
 * The built-in body of an activity (docs/activities.md, "Activity types and
 * built-in bodies"): regarding = the contact
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
SET search_path = pg_catalog, pg_temp
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
        mappers := mappers || format(' WHEN %L THEN d365._activity_mapper_call(%L::pg_catalog.regprocedure,'
                                     ' t.entity, c.dynamics365_related_id, pg_catalog.to_jsonb(a))',
                                     m.dynamics_entity, m.mapper);
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
SET search_path = pg_catalog, pg_temp
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
        IF (SELECT realtime FROM d365.settings) THEN
            -- queued: the background worker sends it once this transaction
            -- commits, and never if it rolls back
            PERFORM d365._worker_wake(false);
        ELSE
            PERFORM d365._send_activity(new_id, false);
        END IF;
    END IF;
    RETURN new_id;
END;
$$;
COMMENT ON FUNCTION d365.d365_log_activity(anyelement, text, text, jsonb, timestamptz) IS
    'Logs an activity; when activity sync is on and the contact is linked, creates it in Dynamics at once, or with realtime on queues it for the background worker (sent at commit); else it stays pending';

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
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_sync_activities'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION d365.d365_sync_activities() IS
    'The scheduled activity sync: creates every pending activity of a linked contact';

-- ---------------------------------------------------------------------------
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
     WHERE f.direction <> 'out'
     ORDER BY f.column_name
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
 * contact is linked to the row.  It runs with its caller's rights and reads
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

    IF check_privileges AND NOT (has_any_column_privilege(src.contact_table, 'UPDATE')
                                 AND has_any_column_privilege(src.contact_table, 'SELECT')) THEN
        RAISE EXCEPTION 'permission denied for table %', src.contact_table
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'd365_update_contact() reads and changes contacts with its caller''s rights.',
                  HINT = format('GRANT SELECT, UPDATE ON %s TO %I;', src.contact_table, current_user);
    END IF;

    EXECUTE format('SELECT c.%I::text, %s FROM %s c WHERE c.dynamics365_related_id = $1',
                   src.key_column, d365._contact_incoming_values_expr(), src.contact_table)
       INTO k, cur USING cid;
    IF k IS NULL THEN
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
                        WHERE (vals -> (e.value #>> '{}')) IS DISTINCT FROM (cur -> e.key)
                           OR (snap -> e.key) IS DISTINCT FROM (cur -> e.key)) THEN
        RETURN '{}';
    END IF;
    IF vals <> '{}' THEN
        conv := d365._incoming_convert(vals, names);
    END IF;

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
                IF NOT has_column_privilege(src.contact_table, col, 'UPDATE') THEN
                    RAISE EXCEPTION 'permission denied to update column "%" of %', col, src.contact_table
                        USING ERRCODE = 'insufficient_privilege',
                              DETAIL = 'd365_update_contact() changes contacts only where its caller may.',
                              HINT = format('GRANT UPDATE ON %s TO %I;', src.contact_table, current_user);
                END IF;
            END LOOP;
        END IF;
        BEGIN
            PERFORM d365._contact_apply(changes, k);
        EXCEPTION WHEN data_exception OR integrity_constraint_violation OR generated_always THEN
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
        EXECUTE format('SELECT %s FROM %s c WHERE c.%I::text = $1',
                       d365._contact_incoming_values_expr(), src.contact_table, src.key_column)
           INTO cur USING k;
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
 * qualifies again).  A row that does not fit -- a value its column cannot
 * hold, a constraint, trigger or generated column of the contact table
 * refusing it -- fails alone: a WARNING names the field and column, the
 * contact's d365.contact_state.last_error keeps the reason, it is counted as
 * failed, and the rest of the page (and the pull) goes on.  Other errors
 * (rights, a missing table) stop the pull.
 */
CREATE FUNCTION d365._pull_record(page jsonb,
    OUT updated integer, OUT unchanged integer, OUT failed integer, OUT unlinked integer)
RETURNS record
SET search_path = pg_catalog, pg_temp
LANGUAGE plpgsql
AS $$
DECLARE
    src d365.contact_source := d365._contact_source();
    r jsonb;
    changed jsonb;
    k text;
    code text;
    msg text;
    detail text;
BEGIN
    updated := 0; unchanged := 0; failed := 0; unlinked := 0;
    IF page IS NULL OR jsonb_typeof(page) <> 'array' THEN
        RAISE EXCEPTION 'a change-tracking page is not a JSON array'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR r IN SELECT jsonb_array_elements(page) LOOP
        IF jsonb_typeof(r) = 'object' AND r ->> '@odata.context' LIKE '%$deletedEntity' THEN
            k := NULL;
            IF d365._is_guid(r ->> 'id') THEN
                k := d365._contact_unlink((r ->> 'id')::uuid);
            END IF;
            IF k IS NOT NULL THEN
                PERFORM d365._contact_remote_deleted(ARRAY[k], ARRAY[NULL::integer], ARRAY[NULL::text],
                            ARRAY['deleted in Dynamics 365 (change tracking), unlinked']);
                unlinked := unlinked + 1;
            END IF;
            CONTINUE;
        END IF;
        BEGIN
            changed := d365._incoming_apply(r, false);
        EXCEPTION WHEN data_exception OR integrity_constraint_violation OR generated_always
                       OR raise_exception OR with_check_option_violation THEN
            GET STACKED DIAGNOSTICS code = RETURNED_SQLSTATE, msg = MESSAGE_TEXT, detail = PG_EXCEPTION_DETAIL;
            k := NULL;
            IF r ->> 'contactid' ~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$' THEN
                EXECUTE format('SELECT %I::text FROM %s WHERE dynamics365_related_id = $1',
                               src.key_column, src.contact_table)
                   INTO k USING (r ->> 'contactid')::uuid;
            END IF;
            RAISE WARNING 'incoming change of contact % was not applied: %',
                          coalesce(k, format('(Dynamics id %s)', r ->> 'contactid')), msg
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
    attached boolean;
    problem text;
    w record;
    n bigint;
    queued bigint := 0;
    oldest timestamptz;
    since timestamptz;
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
    item := 'realtime'; value := s.realtime::text; RETURN NEXT;
    item := 'pull interval'; value := coalesce(s.pull_interval::text, '(none)'); RETURN NEXT;

    -- the background worker (docs/worker.md)
    SELECT * INTO w FROM d365._worker_state();
    item := 'worker';
    value := CASE
        WHEN NOT w.preloaded THEN 'not running (d365sync is not in shared_preload_libraries)'
        WHEN NOT w.running THEN 'not running (the server starts it again within seconds)'
        WHEN w.database IS DISTINCT FROM current_database()
            THEN format('running in database %s, not in this one (pid %s)', w.database, w.pid)
        ELSE format('running (pid %s, %s, since %s)', w.pid, w.state,
                    to_char(w.started_at, 'YYYY-MM-DD HH24:MI:SS TZ')) END;
    RETURN NEXT;
    IF w.running AND w.database = current_database() THEN
        item := 'worker last wake';
        value := coalesce(to_char(w.last_wake, 'YYYY-MM-DD HH24:MI:SS.MS TZ'), '(none yet)');
        RETURN NEXT;
        item := 'worker last pull';
        value := coalesce(to_char(w.last_pull, 'YYYY-MM-DD HH24:MI:SS.MS TZ'), '(none yet)');
        RETURN NEXT;
    END IF;
    IF w.last_error IS NOT NULL THEN
        item := 'worker last error';
        value := format('%s at %s', w.last_error, to_char(w.last_error_at, 'YYYY-MM-DD HH24:MI:SS TZ'));
        RETURN NEXT;
    END IF;

    SELECT * INTO src FROM d365.contact_source;
    attached := FOUND;
    item := 'contact table';
    value := CASE WHEN NOT attached THEN '(not attached)'
                  WHEN NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = src.contact_table)
                      THEN format('(dropped, OID %s)', src.contact_table::oid)
                  ELSE src.contact_table::text END;
    RETURN NEXT;
    IF attached THEN
        problem := d365._attachment_problem(src);
        item := 'attachment'; value := coalesce('broken: ' || problem, 'ok'); RETURN NEXT;
        item := 'mapped fields';
        SELECT count(*)::text INTO value FROM d365.field_map; RETURN NEXT;
    END IF;
    IF attached AND problem IS NULL THEN
        -- the queue's age: folded changes not backing off after a failure
        -- (pending_since), changes not folded yet (noted_at), activities of
        -- linked contacts (logged_at)
        EXECUTE format('SELECT count(*), min(s.pending_since) FILTER (WHERE s.attempts = 0)'
                       '  FROM %s WHERE c.%I IS NOT NULL AND %s', d365._contact_pending_from(src, true),
                       src.key_column, d365._contact_pending_sql('create', src.score_column, true)) INTO n, oldest;
        item := 'contacts to create'; value := n::text; RETURN NEXT;
        queued := queued + n;
        EXECUTE format('SELECT count(*), min(s.pending_since) FILTER (WHERE s.attempts = 0)'
                       '  FROM %s WHERE c.%I IS NOT NULL AND %s', d365._contact_pending_from(src, true),
                       src.key_column, d365._contact_pending_sql('update', src.score_column, true)) INTO n, since;
        item := 'contacts with pending changes'; value := n::text; RETURN NEXT;
        queued := queued + n;
        oldest := least(oldest, since, (SELECT min(q.noted_at) FROM d365.contact_change q));
        EXECUTE format('SELECT count(*), min(a.logged_at) FILTER (WHERE a.attempts = 0)'
                       '  FROM d365.activity a JOIN %s c ON c.%I::text = a.contact_key'
                       ' WHERE a.synced_at IS NULL AND c.dynamics365_related_id IS NOT NULL',
                       src.contact_table, src.key_column) INTO n, since;
        queued := queued + n;
        oldest := least(oldest, since);
        item := 'queue length'; value := queued::text; RETURN NEXT;
        item := 'queue lag';
        value := CASE WHEN oldest IS NOT NULL
                      THEN round(extract(epoch FROM now() - oldest)::numeric, 1)::text || ' s'
                      WHEN queued > 0 THEN '(not measured: only new contacts no sync has seen yet)'
                      ELSE '(nothing pending)' END;
        RETURN NEXT;
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

    FOR r IN SELECT * FROM d365.d365_run_progress() LOOP
        item := 'running: ' || r.kind;
        value := format('since %s (pid %s): %s done, %s failed, %s remaining, %s requests, %s throttled',
                        to_char(r.started_at, 'YYYY-MM-DD HH24:MI:SS TZ'), r.pid, r.done, r.failed,
                        coalesce(r.remaining::text, 'unknown'), r.requests, r.throttled);
        RETURN NEXT;
    END LOOP;

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

/*
 * The scheduled jobs: the name d365_run_job() takes, the pg_cron job name,
 * the job's command and the schedule a first d365_schedule() gives it.
 */
CREATE FUNCTION d365._jobs(OUT job text, OUT job_name text, OUT command text, OUT default_schedule text)
RETURNS SETOF record
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    VALUES ('contacts', 'd365-contact-sync', 'CALL d365.d365_run_job(''contacts'')', '0 * * * *'),
           ('activities', 'd365-activity-sync', 'CALL d365.d365_run_job(''activities'')', '0 * * * *'),
           ('pull', 'd365-pull-changes', 'CALL d365.d365_run_job(''pull'')', NULL)
$$;

/*
 * One run of a scheduled job, through the job's function (lock, error
 * capture, its row in d365.sync_run, pruning of old runs): returns the id
 * of the row the run recorded and, when the run failed, why.
 */
CREATE FUNCTION d365._run_job(job text, OUT run_id bigint, OUT failure text)
RETURNS record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    CASE job
        WHEN 'contacts' THEN PERFORM d365.d365_sync_contacts();
        WHEN 'activities' THEN PERFORM d365.d365_sync_activities();
        WHEN 'pull' THEN PERFORM d365.d365_pull_changes();
        ELSE
            RAISE EXCEPTION 'unknown d365sync job "%"', job
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'The jobs are contacts, activities and pull.';
    END CASE;
    -- the run recorded itself last: this session's last value of the sequence
    SELECT r.id, CASE WHEN r.message LIKE 'failed: %' THEN substr(r.message, 9) END
      INTO run_id, failure
      FROM d365.sync_run r WHERE r.id = currval('d365.sync_run_id_seq'::regclass);
END;
$$;

/*
 * The command of the pg_cron jobs.  A failed run is committed to
 * d365.sync_run first, then raised, so that pg_cron records the job run as
 * failed and the run's record stays.  A procedure that commits cannot
 * carry a SET clause: it pins its search_path with set_config() in each of
 * its transactions instead, and names everything schema-qualified.
 */
CREATE PROCEDURE d365.d365_run_job(job text)
LANGUAGE plpgsql
AS $$
DECLARE
    r record;
BEGIN
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    SELECT * INTO r FROM d365._run_job(job);
    COMMIT;
    IF r.failure IS NOT NULL THEN
        PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
        RAISE EXCEPTION 'd365sync % run failed: %', job, r.failure
            USING ERRCODE = 'external_routine_exception',
                  DETAIL = pg_catalog.format('The run is recorded in d365.sync_run with id %s.', r.run_id),
                  HINT = 'What the run did not finish stays pending for the next run.';
    END IF;
END;
$$;
COMMENT ON PROCEDURE d365.d365_run_job(text) IS
    'Runs one scheduled job (contacts, activities or pull) as pg_cron does: records the run, commits, and raises when it failed so that cron.job_run_details says failed; call it outside a transaction block';

/*
 * Schedules the d365sync jobs with pg_cron.  Only the jobs an argument
 * names change; the COMMENT below gives the rules.
 */
CREATE FUNCTION d365.d365_schedule(
    contacts text DEFAULT 'keep',
    activities text DEFAULT 'keep',
    pull text DEFAULT 'keep')
RETURNS TABLE (job_name text, schedule text, command text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    wanted text[] := ARRAY[contacts, activities, pull];
    nothing_named boolean := coalesce(contacts = 'keep' AND activities = 'keep' AND pull = 'keep', false);
    host text;
    j record;
    cur record;
    i integer := 0;
    sched text;
BEGIN
    IF to_regclass('cron.job') IS NULL THEN
        RAISE EXCEPTION 'pg_cron is not installed in this database'
            USING ERRCODE = 'undefined_object',
                  HINT = 'Add pg_cron to shared_preload_libraries, set cron.database_name to this database, and run CREATE EXTENSION pg_cron.';
    END IF;
    host := coalesce(current_setting('cron.host', true), 'localhost');
    FOR j IN SELECT * FROM d365._jobs() LOOP
        i := i + 1;
        SELECT c.jobid, c.schedule, c.command, c.nodename INTO cur
          FROM cron.job c WHERE c.jobname = j.job_name AND c.username = current_user;
        sched := wanted[i];
        IF sched IS NULL OR sched = 'off' THEN
            IF cur.jobid IS NOT NULL THEN
                PERFORM cron.unschedule(cur.jobid);
            END IF;
            CONTINUE;
        ELSIF sched = 'keep' THEN
            -- not named: its schedule stays (the command and host are
            -- brought up to date); a call naming nothing creates the
            -- default jobs that are missing
            sched := CASE WHEN cur.jobid IS NOT NULL THEN cur.schedule
                          WHEN nothing_named THEN j.default_schedule END;
            CONTINUE WHEN sched IS NULL;
        END IF;
        CONTINUE WHEN cur.jobid IS NOT NULL AND cur.schedule = sched
                  AND cur.command = j.command AND cur.nodename = host;
        -- pg_cron keeps the host of an existing job when its schedule
        -- changes: a job whose host is not cron.host is scheduled anew
        IF cur.jobid IS NOT NULL AND cur.nodename <> host THEN
            PERFORM cron.unschedule(cur.jobid);
        END IF;
        PERFORM cron.schedule(j.job_name, sched, j.command);
    END LOOP;
    RETURN QUERY SELECT c.jobname::text, c.schedule::text, c.command::text
                   FROM cron.job c WHERE c.jobname LIKE 'd365-%' AND c.username = current_user
                  ORDER BY c.jobname;
END;
$$;
COMMENT ON FUNCTION d365.d365_schedule(text, text, text) IS
    'Creates, changes or removes the pg_cron jobs d365-contact-sync, d365-activity-sync and d365-pull-changes. ONLY THE JOBS THE CALL NAMES CHANGE: a cron schedule sets that job, NULL or ''off'' removes it, ''keep'' (the default: an argument left out) leaves its schedule as it is. Called without any argument it creates the missing contact and activity jobs, hourly. Every job it keeps or sets runs CALL d365.d365_run_job(...) and connects to the current cron.host.';

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
-- The table-owner helpers (_contact_convert, _contact_apply, _contact_map)
-- check that their caller may update the columns they write.
GRANT EXECUTE ON FUNCTION d365._incoming_apply(jsonb, boolean),
      d365._incoming_value(jsonb, regtype, text, name), d365._incoming_convert(jsonb, jsonb),
      d365._contact_source(), d365._incoming_fields(), d365._contact_values_expr(), d365._contact_incoming_values_expr(),
      d365._outgoing_only_columns(), d365._is_guid(text), d365._bind_guid(text),
      d365._incoming_mapper(), d365._contact_snapshot(text, jsonb),
      d365._owner_sql(text, name[]), d365._contact_convert(jsonb),
      d365._contact_apply(jsonb, text), d365._contact_map(jsonb, jsonb, text) TO PUBLIC;
REVOKE ALL ON ALL PROCEDURES IN SCHEMA d365 FROM PUBLIC;
