/*
 * d365sync install script, built by the Makefile from the parts in
 * sql/install/ (concatenated in file-name order) into sql/d365sync--X.Y.sql.
 *
 * One part per subsystem, each beside the C file that implements its send
 * stage or its SQL-callable functions (see docs/architecture.md):
 *   01_settings         the settings row, its validation, d365_whoami
 *   02_runs             the run history
 *   03_contact_source   the attached table, field map, sync state
 *   03_identity         tombstones, the capture triggers (src/capture/capture.c), broken attachments
 *   04_metadata         Dynamics metadata, cached; mapping validation
 *   05_contacts_out     outgoing contacts: work query, record step, API
 *   06_activities       the activity log, bodies, work query, record step
 *   07_incoming         incoming changes: push payloads and the pull
 *   08_status_schedule  d365_status and the pg_cron schedule
 *   09_privileges       nothing for PUBLIC; the few explicit grants
 *   10_fdw              foreign tables (d365_fdw), d365_tables, d365_describe
 *
 * Everything lives in schema d365, which CREATE EXTENSION creates.  Nothing
 * here is granted to PUBLIC: an application role gets exactly the GRANTs
 * docs/security.md lists.  Configuration tables are marked with
 * pg_extension_config_dump so pg_dump keeps what the user wrote.  Every
 * function pins its search_path.
 *
 * These parts are the one place each function is defined.  A change here
 * is a change of the next release: the function part of the upgrade script
 * sql/d365sync--A--B.sql is generated from them (make regen), what cannot
 * be re-created (tables, columns, data moves, drops) is written by hand in
 * sql/upgrade/A--B.sql, and the upgrade test proves that an updated
 * installation equals a fresh one (docs/development.md).
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
-- Job locks and the reading of run progress written by others: what keeps
-- one role from stopping the jobs or faking their progress (see
-- docs/security.md, "Roles").
-- ---------------------------------------------------------------------------

/*
 * One row per scheduled job: a run holds its job's row lock (FOR NO KEY
 * UPDATE) to the end of its transaction, so a second run of the same job
 * skips instead of duplicating work.  Only roles that may run the jobs (the
 * operator set: UPDATE on this table) can take such a lock; an advisory
 * lock could be taken by anyone able to connect.
 */
CREATE TABLE d365.job_lock (
    job text PRIMARY KEY
);
INSERT INTO d365.job_lock (job) VALUES ('contacts'), ('activities'), ('pull');
COMMENT ON TABLE d365.job_lock IS
    'One row per scheduled job; a run holds its row''s lock so that two runs of one job never overlap';

/*
 * A timestamptz from text, or NULL where it is not one: for values read
 * from text others may write (the activity text of another session).
 */
CREATE FUNCTION d365._safe_timestamptz(value text)
RETURNS timestamptz
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN value::timestamptz;
EXCEPTION WHEN data_exception OR syntax_error THEN
    RETURN NULL;
END;
$$;

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
 * d365sync runs in this database.  An activity text counts only from a
 * session whose role may run the jobs (a superuser, or UPDATE on
 * d365.job_lock: the operator set), with numbers that fit a bigint and a
 * time that parses, so that another session can neither show a made-up run
 * nor make this fail for everyone.
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
    SELECT a.pid, m[1], d365._safe_timestamptz(m[2]), m[3]::bigint, m[4]::bigint,
           nullif(m[5], '?')::bigint, m[6]::bigint, m[7]::bigint, 'pg_stat_activity'
      FROM pg_stat_activity a,
           regexp_match(a.query, '^/\* d365sync: ([a-z][a-z0-9_:-]{0,70}) run since ([0-9: -]+ UTC): ([0-9]{1,18}) done, ([0-9]{1,18}) failed, ([0-9]{1,18}|\?) remaining, ([0-9]{1,18}) requests, ([0-9]{1,18}) throttled') m
     WHERE a.state = 'active' AND a.datname = current_database() AND m IS NOT NULL
       AND a.pid NOT IN (SELECT shm.pid FROM shm)
       -- only sessions that may run the jobs report runs: anyone else can
       -- write a query text of the same shape
       AND (EXISTS (SELECT FROM pg_roles r WHERE r.oid = a.usesysid AND r.rolsuper)
            OR has_table_privilege(a.usesysid, 'd365.job_lock', 'UPDATE'))
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
-- Identity and change capture: tombstones for keys that stop belonging to
-- a person, the capture triggers on the attached table (their C side is
-- src/capture/capture.c) and the check of an attachment.  See docs/contacts.md,
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
    fn text;
BEGIN
    trg := d365._attachment_table_problem(src);
    IF trg IS NOT NULL THEN
        RETURN trg;
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
    -- each capture trigger, by its name AND the d365 function it calls (a
    -- trigger of the same name calling the owner's function captures
    -- nothing); a table only (a view or another relation standing in the
    -- table's place is refused by d365._contact_table_problem above)
    FOR trg, fn IN SELECT * FROM (VALUES
            ('d365_capture_update', 'd365._contact_capture_row()'),
            ('d365_capture_update_flush', 'd365._contact_capture_flush()'),
            ('d365_capture_insert_flush', 'd365._contact_capture_flush()'),
            ('d365_capture_delete', 'd365._contact_capture_delete()'),
            ('d365_capture_truncate', 'd365._contact_capture_truncate()'),
            ('d365_link_guard', 'd365._contact_link_guard()'),
            ('d365_link_guard_update', 'd365._contact_link_guard()')) v LOOP
        IF NOT EXISTS (SELECT FROM pg_trigger t
                        WHERE t.tgrelid = src.contact_table AND t.tgname = trg
                          AND t.tgenabled IN ('O', 'A')     -- 'R' fires only in replica mode
                          AND (t.tgnargs = 0 OR
                               d365._capture_key_attnum(src.contact_table, d365._trigger_args(t.tgargs))
                                   = key_att.attnum)) THEN
            RETURN format('capture trigger %s on %s is missing, disabled or watches another key column',
                          trg, src.contact_table);
        END IF;
        IF NOT EXISTS (SELECT FROM pg_trigger t
                        WHERE t.tgrelid = src.contact_table AND t.tgname = trg
                          AND t.tgfoid = fn::regprocedure
                          AND (trg <> 'd365_capture_delete' OR t.tgoldtable IS NOT NULL)) THEN
            RETURN format('capture trigger %s on %s does not call %s', trg, src.contact_table, fn);
        END IF;
    END LOOP;
    IF NOT d365._link_index_exists(src.contact_table) THEN
        RETURN format('the unique index on dynamics365_related_id of %s is missing', src.contact_table);
    END IF;
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
 *                              C function only notes the key (src/capture/capture.c)
 *   d365_capture_update_flush  AFTER UPDATE, per statement, and
 *   d365_capture_insert_flush  AFTER INSERT, per statement: the noted keys
 *                              go to d365.contact_change, one row per
 *                              statement
 *   d365_capture_delete        AFTER DELETE, per statement: tombstones
 *   d365_capture_truncate      AFTER TRUNCATE: tombstones for every key
 *   d365_link_guard,           AFTER INSERT, and AFTER UPDATE OF the link
 *   d365_link_guard_update     columns, per row, WHEN a link value is set or
 *                              changed: refuses link values d365sync did not
 *                              write, undoing the statement (src/capture/link_guard.c)
 * The key column is passed by attribute number and by name
 * (d365._capture_key_attnum): renaming it never breaks the application's
 * writes (d365_status() reports the attachment broken until the table is
 * attached again under the new name), and a copy of the table restored by
 * pg_restore, which numbers the columns afresh, watches the same column.
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
 * re-creation gets a new id), and records why.  With on_remote_delete
 * 'delete' the row goes too (d365._contact_remote_remove).
 */
CREATE FUNCTION d365._contact_remote_deleted(keys text[], statuses integer[],
                                             error_codes text[], reasons text[])
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE d365.contact_state s
       SET synced = NULL, dynamics_id = NULL, synced_seq = s.change_seq,
           generation = s.generation + 1, remote_deleted_at = now(), attempts = 0,
           next_attempt_at = NULL, last_attempt_at = now(), last_status = o.st,
           last_error_code = o.code, last_error = o.reason
      FROM unnest(keys, statuses, error_codes, reasons) o(k, st, code, reason)
     WHERE s.contact_key = o.k;
    PERFORM d365._contact_remote_remove(keys);
END;
$$;

/*
 * Rows whose key changed (old_keys[i] became new_keys[i]): the old key is a
 * tombstone, and so is whatever state the new key had (it belonged to an
 * earlier person).  The moved row keeps its link column, and the new key
 * the Dynamics id d365sync had linked the old one to, so it stays linked
 * to its own Dynamics record and is sent in full at the next sync.
 */
CREATE FUNCTION d365._contact_keys_moved(old_keys text[], new_keys text[])
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ids uuid[];
BEGIN
    SELECT array_agg(s.dynamics_id ORDER BY m.i) INTO ids
      FROM unnest(old_keys) WITH ORDINALITY m(k, i)
      LEFT JOIN d365.contact_state s ON s.contact_key = m.k;
    PERFORM d365._contact_tombstone(old_keys || new_keys);
    UPDATE d365.contact_state s SET dynamics_id = m.id
      FROM unnest(new_keys, ids) m(k, id)
     WHERE s.contact_key = m.k AND m.id IS NOT NULL;
END;
$$;

-- AFTER DELETE, per statement: every deleted key becomes a tombstone.
-- Reads only the key column of the trigger's own transition table, handed
-- over by the executor (src/capture/capture_guard.c).  SECURITY DEFINER: the
-- writers of the table need no rights in d365.  Runs only as d365sync's
-- trigger d365_capture_delete of the attached table, and raises elsewhere.
CREATE FUNCTION d365._contact_capture_delete()
RETURNS trigger
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_capture_delete'
LANGUAGE C;

-- AFTER TRUNCATE: every key the state knows becomes a tombstone.
-- SECURITY DEFINER (the writers need no rights in d365); runs only as
-- d365sync's trigger d365_capture_truncate of the attached table.
CREATE FUNCTION d365._contact_capture_truncate()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_NAME <> 'd365_capture_truncate' OR TG_WHEN <> 'AFTER' OR TG_LEVEL <> 'STATEMENT'
       OR TG_OP <> 'TRUNCATE'
       OR TG_RELID IS DISTINCT FROM (SELECT s.contact_table::oid FROM d365.contact_source s) THEN
        RAISE EXCEPTION 'd365._contact_capture_truncate() cannot run in trigger "%" on %', TG_NAME, TG_TABLE_NAME
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'd365sync''s capture functions run only in the capture triggers that d365sync puts on the attached contact table.',
                  HINT = 'Attach the table with d365.d365_attach_contacts(), which creates them.';
    END IF;
    -- the records of on_local_delete deactivate/delete wait (16_contact_policies.sql)
    PERFORM d365._contact_deleted(ARRAY(SELECT s.contact_key FROM d365.contact_state s));
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
 * The statements that (re)create the capture triggers on the attached
 * table, and the table; both NULL when nothing is attached or the key
 * column is gone.  The WHEN clause of d365_capture_update lists the key and
 * the mapped columns that are sent (direction both or out) and exist,
 * compared by their binary images (pg_catalog.record_image_eq(), the
 * function of the operator *=: a type's own equality calls values equal
 * that are sent differently, such as 'abc' and 'ABC' under a
 * case-insensitive collation or in citext), so an UPDATE of other columns
 * costs no trigger call.  d365._contact_capture_install() runs them.
 */
CREATE FUNCTION d365._contact_capture_sql(OUT tbl regclass, OUT statements text[])
RETURNS record
LANGUAGE plpgsql STABLE
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
    SELECT format('NOT pg_catalog.record_image_eq(ROW(%s), ROW(%s))',
                  string_agg(format('OLD.%I', a.attname), ', ' ORDER BY a.attnum),
                  string_agg(format('NEW.%I', a.attname), ', ' ORDER BY a.attnum))
      INTO changed
      FROM pg_attribute a
     WHERE a.attrelid = src.contact_table AND a.attnum > 0 AND NOT a.attisdropped
       AND (a.attnum = key_num
            OR a.attname IN (SELECT f.column_name FROM d365.field_map f WHERE f.direction <> 'in'));
    tbl := src.contact_table;
    statements := ARRAY[
        format('CREATE OR REPLACE TRIGGER d365_capture_update AFTER UPDATE ON %s FOR EACH ROW'
               ' WHEN (%s) EXECUTE FUNCTION d365._contact_capture_row(%L, %L)',
               src.contact_table, changed, key_num, src.key_column),
        format('CREATE OR REPLACE TRIGGER d365_capture_update_flush AFTER UPDATE ON %s'
               ' FOR EACH STATEMENT EXECUTE FUNCTION d365._contact_capture_flush()',
               src.contact_table),
        format('CREATE OR REPLACE TRIGGER d365_capture_insert_flush AFTER INSERT ON %s'
               ' FOR EACH STATEMENT EXECUTE FUNCTION d365._contact_capture_flush()',
               src.contact_table),
        format('CREATE OR REPLACE TRIGGER d365_capture_delete AFTER DELETE ON %s'
               ' REFERENCING OLD TABLE AS d365_gone'
               ' FOR EACH STATEMENT EXECUTE FUNCTION d365._contact_capture_delete(%L, %L)',
               src.contact_table, key_num, src.key_column),
        format('CREATE OR REPLACE TRIGGER d365_capture_truncate AFTER TRUNCATE ON %s'
               ' FOR EACH STATEMENT EXECUTE FUNCTION d365._contact_capture_truncate()',
               src.contact_table),
        -- AFTER, not BEFORE: an AFTER row trigger fetches no old row the
        -- capture trigger does not fetch already, and a BEFORE INSERT one
        -- would take COPY's batched inserts away; the error still undoes the
        -- statement.  The WHEN clauses (built-in operators on the built-in
        -- link types, evaluated by the executor) keep the guard from being
        -- called (or queued) for rows that need no look: inserted unlinked,
        -- or links left alone.
        format('CREATE OR REPLACE TRIGGER d365_link_guard AFTER INSERT ON %s FOR EACH ROW'
               ' WHEN (NEW.dynamics365_related_id IS NOT NULL'
               '       OR NEW.dynamics365_synchronized_on IS NOT NULL)'
               ' EXECUTE FUNCTION d365._contact_link_guard()',
               src.contact_table),
        format('CREATE OR REPLACE TRIGGER d365_link_guard_update'
               ' AFTER UPDATE OF dynamics365_related_id, dynamics365_synchronized_on ON %s FOR EACH ROW'
               ' WHEN ((NEW.dynamics365_related_id IS NOT NULL'
               '        AND NEW.dynamics365_related_id IS DISTINCT FROM OLD.dynamics365_related_id)'
               '       OR (NEW.dynamics365_synchronized_on IS NOT NULL'
               '        AND NEW.dynamics365_synchronized_on IS DISTINCT FROM OLD.dynamics365_synchronized_on))'
               ' EXECUTE FUNCTION d365._contact_link_guard()',
               src.contact_table)];
END;
$$;

/*
 * (Re)creates the capture triggers on the attached table: the statements
 * of d365._contact_capture_sql(), run as the owner of schema d365 (the only
 * role that may use the trigger functions) once the caller is found to own
 * the table, as CREATE TRIGGER itself requires (src/capture/capture_guard.c).
 */
CREATE FUNCTION d365._contact_capture_install()
RETURNS void
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_capture_install'
LANGUAGE C;

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

/*
 * The guard of the link columns (src/capture/link_guard.c), put on the attached
 * table with the capture triggers.
 */
CREATE FUNCTION d365._contact_link_guard()
RETURNS trigger
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_link_guard'
LANGUAGE C;

/*
 * Whether tbl has a unique index on dynamics365_related_id alone (no
 * expression; no predicate, or the one d365sync gives it): no two rows then
 * hold one Dynamics id, and the incoming changes find a contact by its id
 * through it.
 */
CREATE FUNCTION d365._link_index_exists(tbl regclass)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT FROM pg_index i
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                    WHERE i.indrelid = tbl AND i.indisunique AND i.indisvalid AND i.indnatts = 1
                      AND i.indexprs IS NULL AND a.attname = 'dynamics365_related_id'
                      AND (i.indpred IS NULL
                           OR pg_get_expr(i.indpred, i.indrelid) = '(dynamics365_related_id IS NOT NULL)'))
$$;

/*
 * Makes the unique index on the link column of tbl when it has none.  Rows
 * sharing a Dynamics id are reported, not changed: the error names them and
 * says how to unlink all but one.
 */
CREATE FUNCTION d365._link_index_create(tbl regclass)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    dups text;
    n bigint;
BEGIN
    IF d365._link_index_exists(tbl) THEN
        RETURN;
    END IF;
    EXECUTE format('SELECT count(*), string_agg(d.id::text, '', '' ORDER BY d.id) FILTER (WHERE d.r <= 10)'
                   '  FROM (SELECT dynamics365_related_id AS id, row_number() OVER (ORDER BY dynamics365_related_id) AS r'
                   '          FROM %s WHERE dynamics365_related_id IS NOT NULL'
                   '         GROUP BY 1 HAVING count(*) > 1) d', tbl)
       INTO n, dups;
    IF n > 0 THEN
        RAISE EXCEPTION 'rows of % share a Dynamics 365 id', tbl
            USING ERRCODE = 'unique_violation',
                  DETAIL = format('%s Dynamics 365 id(s) are held by more than one row: %s%s.', n, dups,
                                  CASE WHEN n > 10 THEN ', ...' ELSE '' END),
                  HINT = format('A Dynamics 365 record belongs to one contact: keep the link of the right row and unlink the others (UPDATE %s SET dynamics365_related_id = NULL WHERE ...), then call d365_attach_contacts() again.', tbl);
    END IF;
    -- unlinked rows are not in it: inserting them, and updating them
    -- outside HOT, costs the application nothing more
    EXECUTE format('CREATE UNIQUE INDEX ON %s (dynamics365_related_id)'
                   ' WHERE dynamics365_related_id IS NOT NULL', tbl);
END;
$$;

-- ---------------------------------------------------------------------------

/*
 * The arguments of a trigger, from pg_trigger.tgargs.
 */
CREATE FUNCTION d365._trigger_args(tgargs bytea)
RETURNS text[]
LANGUAGE sql IMMUTABLE STRICT
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(replace(a, '\\', '\') ORDER BY n) FILTER (WHERE n < total), '{}')
      FROM (SELECT a, n, count(*) OVER () AS total
              FROM regexp_split_to_table(encode(tgargs, 'escape'), '\\000') WITH ORDINALITY x(a, n)) y
$$;

/*
 * The column a capture trigger watches, from its arguments (key attribute
 * number, key name): the column of that name where one exists -- a table
 * restored by pg_restore numbers its columns afresh, without the dropped
 * ones -- otherwise (the key renamed) the column of that number.  NULL
 * when neither is a live column.  src/capture/capture.c applies the same rule.
 */
CREATE FUNCTION d365._capture_key_attnum(tbl regclass, args text[])
RETURNS smallint
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(
        (SELECT a.attnum FROM pg_attribute a
          WHERE a.attrelid = tbl AND cardinality(args) > 1 AND a.attname = args[2]
            AND a.attnum > 0 AND NOT a.attisdropped),
        (SELECT a.attnum FROM pg_attribute a
          WHERE a.attrelid = tbl AND args[1] ~ '^[0-9]{1,4}$' AND a.attnum = args[1]::smallint
            AND a.attnum > 0 AND NOT a.attisdropped))
$$;

-- The table part of d365._attachment_problem: the table, its key, score and
-- link columns; not the capture triggers.
CREATE FUNCTION d365._attachment_table_problem(src d365.contact_source)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key_att pg_attribute;
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
    RETURN d365._contact_table_problem(src.contact_table, src.score_column);
END;
$$;

/*
 * d365._attachment_problem(src), remembered while the catalog says nothing
 * it reads has changed (src/capture/attach_cache.c): the table's lock is taken and
 * the invalidations of other sessions read at every call.
 */
CREATE FUNCTION d365._attachment_problem_cached(src d365.contact_source)
RETURNS text
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_attachment_problem_cached'
LANGUAGE C VOLATILE;
-- Dynamics metadata, cached
-- ---------------------------------------------------------------------------

CREATE TABLE d365.metadata_cache (
    path       text PRIMARY KEY,
    fetched_at timestamptz NOT NULL,
    body       jsonb NOT NULL
);
COMMENT ON TABLE d365.metadata_cache IS
    'Web API metadata responses, kept for an hour; DELETE FROM d365.metadata_cache to fetch them again';
-- dumped with the configuration: a restored database's next sync finds
-- the metadata its source had, and sends no request for it
SELECT pg_catalog.pg_extension_config_dump('d365.metadata_cache', '');

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
    -- fetched and kept by d365sync's own write (14_state_guard.sql)
    RETURN d365._metadata_store(path);
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
                         -- a domain is judged by its base type, an enum and citext are sent as text;
                         -- a lookup from a foreign key is sent as the referenced row's record id
                         CASE WHEN b.oid IS NULL THEN NULL
                              WHEN f.dynamics_field LIKE '%@odata.bind'
                                   AND EXISTS (SELECT FROM pg_constraint k
                                                WHERE k.contype = 'f' AND k.conrelid = s.contact_table
                                                  AND k.conkey = ARRAY[a.attnum]) THEN 'uuid'
                              WHEN b.typtype = 'e' OR d365._text_like(b.oid::regtype) THEN 'text'
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

/*
 * The maximum length of the text attributes (String and Memo) of an entity,
 * {logical name: MaxLength}.  refresh = true reads them through the metadata
 * cache (fetched when older than an hour), as the check of a field map
 * written does.  refresh = false reads the cache whatever its age (a field's
 * length rarely changes) and never sends a request, as the sync does; '{}'
 * when they were never fetched.  What Dynamics sends is data: a MaxLength
 * that is not a small whole number is left out.
 */
CREATE FUNCTION d365._max_lengths(entity text, refresh boolean)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    paths text[];
    result jsonb;
BEGIN
    IF entity IS NULL OR entity !~ '^[a-z][a-z0-9_]*$' THEN
        RAISE EXCEPTION 'invalid entity logical name %', coalesce(quote_literal(entity), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    paths := ARRAY(SELECT format('EntityDefinitions(LogicalName=''%s'')/Attributes/Microsoft.Dynamics.CRM.%s?$select=LogicalName,MaxLength',
                                 entity, t)
                     FROM unnest(ARRAY['StringAttributeMetadata', 'MemoAttributeMetadata']) t);
    IF refresh THEN
        PERFORM d365._get_cached(p) FROM unnest(paths) p;
    END IF;
    SELECT coalesce(jsonb_object_agg(a ->> 'LogicalName', (a ->> 'MaxLength')::integer), '{}')
      INTO result
      FROM d365.metadata_cache c,
           LATERAL jsonb_array_elements(CASE WHEN jsonb_typeof(c.body) = 'array' THEN c.body ELSE '[]' END) a
     WHERE c.path = ANY (paths)
       AND jsonb_typeof(a) = 'object'
       AND a ->> 'LogicalName' IS NOT NULL
       AND a ->> 'MaxLength' ~ '^[0-9]{1,9}$';
    RETURN result;
END;
$$;

/*
 * The check of a field map row against Dynamics metadata, when it is
 * written (d365._field_map_check): the attribute must exist on contact, be
 * writable when the column is sent, and take the column's type
 * (d365._type_problem, as d365_validate_mapping() judges it); otherwise the
 * write is refused.  A column declared longer than the attribute's maximum
 * length (varchar(200) to a field of 50) gets a WARNING: its longer values
 * fail their contact before sending.  Nothing is checked while d365sync is
 * not configured (a restore loads the map before the settings); when the
 * metadata cannot be read (Dynamics unreachable) the row is accepted with a
 * WARNING, and d365_validate_mapping() checks it later.  SECURITY DEFINER:
 * the metadata is read with the settings' credentials, which the writer of
 * the map need not be able to read.
 */
CREATE FUNCTION d365._field_map_metadata_check(column_name name, dynamics_field text,
                                               direction text, typ regtype, typmod integer)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s d365.settings;
    nav text := split_part(dynamics_field, '@', 1);
    is_bind boolean := dynamics_field LIKE '%@odata.bind';
    attr jsonb;
    maxlen integer;
    collen integer;
    ctype text;
    problem text;
    msg text;
BEGIN
    SELECT * INTO s FROM d365.settings;
    IF s.org_url IS NULL OR s.tenant_id IS NULL OR s.client_id IS NULL OR s.client_secret IS NULL THEN
        RETURN;
    END IF;
    BEGIN
        FOR i IN 1 .. 2 LOOP
            SELECT a INTO attr FROM d365._metadata('contact') a
             WHERE (NOT is_bind AND a ->> 'LogicalName' = nav)
                OR (is_bind AND (nav = a ->> 'LogicalName'
                                 OR EXISTS (SELECT FROM jsonb_array_elements_text(coalesce(a -> 'Targets', '[]')) t
                                             WHERE nav = (a ->> 'LogicalName') || '_' || t)))
             LIMIT 1;
            EXIT WHEN attr IS NOT NULL OR i = 2;
            -- not in the cached list: it may be a field made in the last hour
            DELETE FROM d365.metadata_cache c
             WHERE c.path LIKE 'EntityDefinitions(LogicalName=''contact'')/Attributes%';
        END LOOP;
        IF attr IS NOT NULL AND attr ->> 'AttributeType' IN ('String', 'Memo') THEN
            maxlen := (d365._max_lengths('contact', true) ->> (attr ->> 'LogicalName'))::integer;
        END IF;
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT;
        RAISE WARNING 'the mapping of column "%" to Dynamics field "%" was not checked: the Dynamics 365 metadata could not be read',
                      column_name, dynamics_field
            USING DETAIL = msg,
                  HINT = 'd365_validate_mapping() checks the map once Dynamics 365 can be reached; until then a value that does not fit fails its contact at sync time.';
        RETURN;
    END;
    IF attr IS NULL THEN
        RAISE EXCEPTION 'Dynamics field "%" does not exist on contact', dynamics_field
            USING ERRCODE = 'undefined_column',
                  HINT = 'd365_dynamics_fields() lists the attributes of contact; a lookup is mapped as <lookup>_<target>@odata.bind.';
    END IF;
    -- a domain is judged by its base type; an enum and citext go as text
    SELECT CASE WHEN b.typtype = 'e' OR d365._text_like(b.oid::regtype) THEN 'text'
                ELSE format_type(b.oid, NULL) END,
           CASE WHEN b.oid IN ('character varying'::regtype, 'character'::regtype)
                     AND coalesce(nullif(typmod, -1), nullif(t.typtypmod, -1)) > 4
                THEN coalesce(nullif(typmod, -1), nullif(t.typtypmod, -1)) - 4 END
      INTO ctype, collen
      FROM pg_type t JOIN pg_type b ON b.oid = coalesce(nullif(t.typbasetype, 0), t.oid)
     WHERE t.oid = typ;
    problem := d365._type_problem(attr ->> 'AttributeType', ctype, is_bind, attr ->> 'LogicalName');
    IF problem IS NULL AND direction <> 'in'
       AND (attr ->> 'IsValidForCreate') = 'false' AND (attr ->> 'IsValidForUpdate') = 'false' THEN
        RAISE EXCEPTION 'column "%" cannot be mapped to Dynamics field "%": attribute % is read-only in Dynamics',
                        column_name, dynamics_field, attr ->> 'LogicalName'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'Dynamics 365 lets the attribute be set neither on create nor on update.',
                  HINT = 'Map it with direction ''in'' to receive its value, or map another field.';
    END IF;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'column "%" cannot be mapped to Dynamics field "%": %', column_name, dynamics_field, problem
            USING ERRCODE = 'datatype_mismatch',
                  DETAIL = format('Dynamics 365 says %s is of type %s; the column is of type %s.',
                                  attr ->> 'LogicalName', attr ->> 'AttributeType', typ),
                  HINT = 'Map a column of a matching type, or a generated column (direction ''out'') that converts this one; d365_dynamics_fields() lists the fields with their types.';
    END IF;
    IF maxlen IS NOT NULL AND collen > maxlen AND direction <> 'in' THEN
        RAISE WARNING 'column "%" holds up to % characters, Dynamics field "%" at most %', column_name, collen, nav, maxlen
            USING DETAIL = 'A longer value fails its contact before it is sent (error code d365sync.length); the other contacts are sent.',
                  HINT = format('Keep the values within %s characters, or shorten the column to varchar(%s).', maxlen, maxlen);
    END IF;
END;
$$;

-- ---------------------------------------------------------------------------
-- Outgoing contact sync: the select and record stages (SQL), the send
-- stage is the C pipeline (src/pipeline/pipeline.c).
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
    FOR m IN SELECT f.column_name, f.dynamics_field, a.atttypid::regtype AS typ, b.entity_set,
                    l.parent, l.bind_set
               FROM d365.field_map f
               LEFT JOIN pg_attribute a ON a.attrelid = src.contact_table
                    AND a.attname = f.column_name AND a.attnum > 0 AND NOT a.attisdropped
               LEFT JOIN d365._lookup_binds() b ON b.dynamics_field = f.dynamics_field
               LEFT JOIN d365._contact_lookups() l ON l.column_name = f.column_name
              WHERE only_columns IS NULL OR f.column_name = ANY (only_columns)
              ORDER BY f.column_name
    LOOP
        IF m.typ IS NULL THEN
            RAISE EXCEPTION 'mapped column "%" no longer exists in %', m.column_name, src.contact_table
                USING ERRCODE = 'undefined_column',
                      HINT = format('DELETE FROM d365.field_map WHERE column_name = %L;', m.column_name);
        END IF;
        IF m.parent IS NOT NULL THEN
            -- a foreign key to a mapped table: bound to the record d365sync
            -- linked the referenced row to (d365._contact_waiting_expr keeps
            -- a contact whose parent is not linked yet from being sent)
            expr := format('pg_catalog.to_jsonb(%L OPERATOR(pg_catalog.||) d365._map_parent_link(%L, (%I.%I)::pg_catalog.text)::pg_catalog.text OPERATOR(pg_catalog.||) '')'')',
                           '/' || m.bind_set || '(', m.parent, row_alias, m.column_name);
        ELSE
            expr := d365._json_expr(format('%I.%I', row_alias, m.column_name), m.typ, m.entity_set);
        END IF;
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
 * Whose sync state is it?  A state row that names a Dynamics contact while
 * the row is unlinked belongs to an earlier person under the same key
 * (deleted while detached, restored from a dump, link cleared by hand): its
 * snapshot, failures and back-off are not the row's, and the row gets the
 * next generation -- a Dynamics id of its own.  (A linked row whose link
 * differs from the state's id is untrusted: d365._contact_untrusted_sql.)
 * Aliases: c the contact row, s its state (LEFT JOIN).
 */
CREATE FUNCTION d365._contact_foreign_sql()
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT '(s.dynamics_id IS NOT NULL AND c.dynamics365_related_id IS NULL)' $$;

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
        d365._contact_untrusted_sql(), changed);
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
-- its look-up of the untrusted links reads the whole table: compiling it
-- would cost more than it saves
SET jit = off
AS $$
DECLARE
    src d365.contact_source;
    key_type text;
    cur text;
    sel text;
    match text;
    limits jsonb;
    untrusted text[];
BEGIN
    src := d365._contact_source();
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
    SELECT format_type(a.atttypid, a.atttypmod) INTO key_type
      FROM pg_attribute a WHERE a.attrelid = src.contact_table AND a.attname = src.key_column;
    cur := d365._contact_values_expr();
    match := d365._contact_match_expr();
    -- the maximum lengths of the text fields sent, as last fetched (never
    -- fetched here): a longer value fails its contact before sending
    SELECT coalesce(jsonb_object_agg(f.dynamics_field,
                                     jsonb_build_object('max', l.value::integer, 'column', f.column_name)), '{}')
      INTO limits
      FROM d365.field_map f
      JOIN jsonb_each_text(d365._max_lengths('contact', false)) l ON l.key = f.dynamics_field
     WHERE f.direction <> 'in';

    IF scheduled THEN
        PERFORM d365._contact_fold_changes();
        -- a row without a key (a UNIQUE key allows NULLs) cannot be sent
        -- or recorded: left alone, it must not stop the others
        sel := format('c.%I IS NOT NULL AND ', src.key_column)
               || d365._contact_pending_sql('any', src.score_column, false);
        /*
         * The rows the pending condition can hold, found without reading
         * every contact's state: the unlinked rows that reach min_score
         * (the link column's index), the rows linked to a state that has
         * something to send (contact_state_pending_idx, then the link
         * column's index), and the linked rows whose link d365sync did not
         * write -- found once here (the table against the states' keys and
         * ids, no wider than those) and named by key (the key's index), or
         * all rows when there are many.  The pending condition then holds
         * as it stands.
         */
        -- (planned for all rows, not for the first ones: a LIMIT in the
        -- same query made it an index probe per contact)
        EXECUTE format('WITH u AS MATERIALIZED (SELECT c.%1$I::text AS k FROM %2$s c'
                       ' WHERE c.dynamics365_related_id IS NOT NULL'
                       '   AND NOT EXISTS (SELECT FROM d365.contact_state s'
                       '                    WHERE s.contact_key = c.%1$I::text'
                       '                      AND s.dynamics_id = c.dynamics365_related_id))'
                       ' SELECT array_agg(x.k) FROM (SELECT u.k FROM u LIMIT 10001) x',
                       src.key_column, src.contact_table)
           INTO untrusted;
        sel := sel || format(
            ' AND ((c.dynamics365_related_id IS NULL AND c.%1$I >= (SELECT min_score FROM d365.settings))'
            '      OR c.dynamics365_related_id = ANY (ARRAY(SELECT p.dynamics_id FROM d365.contact_state p'
            '          WHERE p.dynamics_id IS NOT NULL AND (p.synced IS NULL OR p.change_seq > p.synced_seq)))'
            '      OR %2$s)',
            src.score_column,
            CASE WHEN untrusted IS NULL THEN 'false'
                 WHEN cardinality(untrusted) <= 10000
                 THEN format('c.%I = ANY (%L::%s[])', src.key_column, untrusted, key_type)
                 ELSE 'true' END);
    ELSE
        sel := format('c.%I = $1::%s', src.key_column, key_type);
    END IF;

    RETURN format($q$
        SELECT w.item_key,
               CASE WHEN w.body IS NULL OR w.refused OR w.too_long IS NOT NULL THEN '[]'
                    ELSE jsonb_build_array(jsonb_build_object(
                             'method', 'PATCH',
                             'path', 'contacts(' || w.dynamics_id || ')',
                             'body', w.body::text,
                             'headers', CASE WHEN w.linked THEN '["If-Match: *"]'::jsonb
                                             ELSE '[]'::jsonb END))::text
               END AS requests,
               (jsonb_build_object('action', CASE WHEN w.refused THEN 'refused'
                                                  WHEN NOT w.linked THEN 'create'
                                                  WHEN w.body IS NULL THEN 'unchanged'
                                                  ELSE 'update' END,
                                   'id', w.dynamics_id, 'seq', w.change_seq,
                                   'generation', w.generation, 'base', w.base,
                                   'values', w.cur, 'sent', CASE WHEN NOT w.refused THEN w.body END)
                || CASE WHEN w.refused
                        THEN jsonb_build_object('error_code', 'd365sync.link', 'error',
                                 format('holds Dynamics 365 id %%s in its link column, which d365sync did not link to it; nothing was sent',
                                        w.link))
                        WHEN w.too_long IS NOT NULL
                        THEN jsonb_build_object('error_code', 'd365sync.length',
                                                'error', 'value too long for Dynamics 365: ' || w.too_long || '; not sent')
                        ELSE '{}' END)::text AS context,
               CASE WHEN NOT w.linked AND NOT w.refused AND w.too_long IS NULL AND w.match_values IS NOT NULL
                         AND NOT EXISTS (SELECT FROM jsonb_each(w.match_values) e
                                          WHERE e.value IN ('null'::jsonb, '""'::jsonb))
                    THEN w.match_values::text END AS lookup
          FROM (SELECT x.*,
                       (SELECT string_agg(format('%%s has %%s characters, at most %%s (column %%s)', e.key,
                                                 char_length(e.value #>> '{}'), l.value ->> 'max',
                                                 l.value ->> 'column'), '; ' ORDER BY e.key)
                          FROM jsonb_each(x.body) e
                          JOIN jsonb_each(%8$L::jsonb) l ON l.key = e.key
                         WHERE NOT x.refused AND jsonb_typeof(e.value) = 'string'
                           AND char_length(e.value #>> '{}') > (l.value ->> 'max')::integer) AS too_long
          FROM (SELECT v.*,
                       CASE WHEN NOT v.linked THEN jsonb_strip_nulls(v.cur)
                            ELSE (SELECT jsonb_object_agg(e.key, e.value)
                                    FROM jsonb_each(v.cur) e
                                   WHERE (v.synced IS NULL AND e.value <> 'null'::jsonb)
                                      OR (v.synced IS NOT NULL
                                          AND e.value IS DISTINCT FROM coalesce(v.synced -> e.key, 'null'::jsonb)))
                       END AS body
                  FROM (SELECT c.%1$I::text AS item_key,
                               c.dynamics365_related_id IS NOT NULL AND NOT %7$s AS linked,
                               %7$s AS refused,
                               c.dynamics365_related_id AS link,
                               CASE WHEN %7$s THEN s.dynamics_id
                                    ELSE coalesce(c.dynamics365_related_id,
                                                  d365._contact_guid(c.%1$I::text, g.generation)) END AS dynamics_id,
                               coalesce(s.change_seq, 0) AS change_seq,
                               g.generation, s.generation AS base,
                               CASE WHEN %6$s THEN NULL ELSE s.synced END AS synced,
                               %2$s AS cur,
                               %5$s AS match_values
                          FROM %3$s,
                               LATERAL (SELECT coalesce(s.generation, 0)
                                               + CASE WHEN %6$s THEN 1 ELSE 0 END AS generation) g
                         WHERE %4$s
                           -- a lookup's parent not linked yet: the contact waits
                           AND NOT (%9$s)
                        OFFSET 0) v) x) w
    $q$, src.key_column, cur, d365._contact_pending_from(src, false), sel, match,
         d365._contact_foreign_sql(), d365._contact_untrusted_sql(), limits,
         d365._contact_waiting_expr());
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
                   -- a refused row keeps the id d365sync linked its key to
                   LATERAL (SELECT CASE WHEN x.action = 'update' AND NOT x.matched
                                          OR x.action = 'refused'
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
    key_type text;
    result uuid;
BEGIN
    -- compared in the key's own type, so that its primary key is used
    SELECT format_type(a.atttypid, a.atttypmod) INTO key_type
      FROM pg_attribute a WHERE a.attrelid = src.contact_table AND a.attname = src.key_column;
    EXECUTE format('SELECT dynamics365_related_id FROM %s WHERE %I = $1::%s',
                   src.contact_table, src.key_column, key_type)
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

/*
 * A linked row d365sync must not trust: its link column holds an id other
 * than the one d365sync linked its key to (d365.contact_state.dynamics_id),
 * or its key has no such id.  Only d365sync's link writer passes the guard
 * on the link columns (src/capture/link_guard.c); a value that got there another
 * way -- the table's owner with the guard disabled, a superuser, a release
 * before the guard -- never makes d365sync write to that Dynamics record:
 * the contact sync refuses the row (error code d365sync.link), the pull
 * and the activity sync pass it by.  Aliases: c the contact row, s its
 * state (LEFT JOIN).
 */
CREATE FUNCTION d365._contact_untrusted_sql()
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT '(c.dynamics365_related_id IS NOT NULL AND s.dynamics_id IS DISTINCT FROM c.dynamics365_related_id)' $$;

/*
 * Whether d365sync linked the contact with this key to the Dynamics id:
 * the state's id.  For callers without rights on d365's tables (the push
 * of incoming changes runs with its caller's); reads nothing else.
 */
CREATE FUNCTION d365._contact_link_trusted(contact_key text, dynamics_id uuid)
RETURNS boolean
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT FROM d365.contact_state s
                    WHERE s.contact_key = _contact_link_trusted.contact_key
                      AND s.dynamics_id = _contact_link_trusted.dynamics_id)
$$;

/*
 * Links a contact to an existing Dynamics 365 contact by hand: the one way
 * to put a chosen id into the link column (the guard refuses any other,
 * src/capture/link_guard.c).  The next sync sends the contact's mapped values to
 * that record.  Needs the UPDATE right on the link columns (checked by
 * d365._contact_set_links) and on d365.contact_state.
 */
CREATE FUNCTION d365.d365_link_contact(contact_key anyelement, dynamics_id uuid)
RETURNS void
LANGUAGE plpgsql
STRICT
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source := d365._contact_source();
    k text := d365._key_text(contact_key);
    cur uuid;
    holder text;
    found_key text;
BEGIN
    EXECUTE format('SELECT %I::text, dynamics365_related_id FROM %s WHERE %I::text = $1',
                   src.key_column, src.contact_table, src.key_column)
       INTO found_key, cur USING k;
    IF found_key IS NULL THEN
        RAISE EXCEPTION 'contact % does not exist', k
            USING ERRCODE = 'no_data_found',
                  HINT = format('The key is looked up in %s.', src.contact_table);
    END IF;
    EXECUTE format('SELECT %I::text FROM %s WHERE dynamics365_related_id = $1 AND %I::text <> $2',
                   src.key_column, src.contact_table, src.key_column)
       INTO holder USING dynamics_id, k;
    IF holder IS NOT NULL THEN
        RAISE EXCEPTION 'Dynamics 365 contact % is linked to contact % already', dynamics_id, holder
            USING ERRCODE = 'unique_violation',
                  HINT = 'A Dynamics 365 record belongs to one contact: unlink the other one first (set its dynamics365_related_id to NULL).';
    END IF;
    IF d365._contact_set_links(ARRAY[k], ARRAY[dynamics_id], ARRAY[cur]) IS NULL THEN
        RAISE EXCEPTION 'contact % could not be linked: another transaction holds it locked or changed it', k
            USING ERRCODE = 'lock_not_available',
                  HINT = 'Try again.';
    END IF;
    INSERT INTO d365.contact_state AS s (contact_key, change_seq, synced_seq, dynamics_id)
    VALUES (k, 1, 0, dynamics_id)
    ON CONFLICT ON CONSTRAINT contact_state_pkey DO UPDATE
       SET dynamics_id = EXCLUDED.dynamics_id, synced = NULL, remote_deleted_at = NULL,
           attempts = 0, next_attempt_at = NULL, last_error_code = NULL, last_error = NULL,
           pending_since = now();
END;
$$;
COMMENT ON FUNCTION d365.d365_link_contact(anyelement, uuid) IS
    'Links a contact to an existing Dynamics 365 contact (the only way to set its dynamics365_related_id); the next sync sends its mapped values there';

-- The linked contacts whose state has something to send: the scheduled
-- sync finds them by this index (d365._contact_work_sql), not by reading
-- every contact's state.
CREATE INDEX contact_state_pending_idx ON d365.contact_state (dynamics_id)
    WHERE dynamics_id IS NOT NULL AND (synced IS NULL OR change_seq > synced_seq);

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
            ids text[], unreadable text
        ) ON COMMIT DROP;
    ELSE
        TRUNCATE d365_lookup_hits;
    END IF;
    -- the hits of each contact: the rows of its group's answer whose match
    -- fields equal its values (one hash join on a normalised key)
    fields := (SELECT array_agg(m.dynamics_field) FROM d365._match_fields() m);
    WITH grp AS MATERIALIZED (
        SELECT x.g, d365._lookup_answer(x.a) AS j FROM unnest(answers) WITH ORDINALITY x(a, g)),
    items AS MATERIALIZED (
        SELECT u.i, u.k, u.c, u.l, u.g, coalesce(gr.j ? '@odata.nextLink', false) AS more,
               gr.j ->> '@d365sync.unreadable' AS unreadable,
               d365._match_key(u.l::jsonb, fields) AS key
          FROM unnest(item_keys, lookups, contexts, groups) WITH ORDINALITY u(k, l, c, g, i)
          LEFT JOIN grp gr ON gr.g = u.g),
    hits AS MATERIALIZED (
        SELECT gr.g, v, d365._match_key(v, fields) AS key
          FROM grp gr, jsonb_array_elements(CASE WHEN jsonb_typeof(gr.j -> 'value') = 'array' THEN gr.j -> 'value' ELSE '[]' END) v)
    INSERT INTO d365_lookup_hits
    SELECT t.i, t.k, t.c::jsonb, t.l::jsonb, x.n, t.more, x.first_hit, x.ids, t.unreadable
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
          USING (SELECT array_agg((h.first_hit ->> 'contactid')::uuid) FROM d365_lookup_hits h
                  WHERE h.n = 1 AND d365._is_guid(h.first_hit ->> 'contactid'));
        SELECT taken || coalesce(jsonb_object_agg(d.id, d.keys), '{}') INTO taken
          FROM (SELECT h.first_hit ->> 'contactid' AS id,
                       string_agg(h.k, ', ' ORDER BY h.i) AS keys
                  FROM d365_lookup_hits h WHERE h.n = 1 AND d365._is_guid(h.first_hit ->> 'contactid')
                 GROUP BY 1 HAVING count(*) > 1) d
         WHERE NOT taken ? d.id;
    END IF;

    -- a lookup is read back as _<attribute>_value
    SELECT coalesce(jsonb_object_agg(b.dynamics_field, '_' || b.attribute || '_value'), '{}')
      INTO read_names FROM d365._lookup_binds() b;
    RETURN QUERY
    WITH judged AS (
        SELECT h.*,
               CASE WHEN h.unreadable IS NOT NULL
                        THEN 'could not be matched: ' || h.unreadable
                    WHEN h.n >= 1 AND EXISTS (SELECT FROM unnest(h.ids) x WHERE NOT d365._is_guid(x))
                        THEN format('could not be matched: its look-up answer names contact id %s, which is not a GUID',
                                    (SELECT to_jsonb(x) FROM unnest(h.ids) x WHERE NOT d365._is_guid(x) LIMIT 1))
                    WHEN h.n > 1
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

/*
 * The body of a look-up answer as jsonb.  jsonb holds no U+0000: a string
 * holding one is read with U+FFFD in its place (the value only takes part
 * in comparisons, where it then equals no local value; a matched contact's
 * local values are sent over it).  A body that cannot be read still is
 * {"@d365sync.unreadable": why}: the contacts of that look-up fail alone,
 * the rest of the run goes on.
 */
CREATE FUNCTION d365._lookup_answer(body text)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN body::jsonb;
EXCEPTION WHEN data_exception THEN
    BEGIN
        -- \u0000 not preceded by an escaped backslash
        RETURN regexp_replace(body, '(?<!\\)((?:\\\\)*)\\u0000', '\1\\ufffd', 'g')::jsonb;
    EXCEPTION WHEN data_exception THEN
        RETURN jsonb_build_object('@d365sync.unreadable',
                   'the answer to its look-up cannot be read: ' || SQLERRM);
    END;
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
 * security-restricted operation (src/privilege/table_owner.c): whoever runs the
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

    sel := CASE mode
        WHEN 'scheduled' THEN '(a.next_attempt_at IS NULL OR a.next_attempt_at <= now())'
        WHEN 'one' THEN 'a.id = $1'
        WHEN 'recent' THEN 'c.dynamics365_synchronized_on = now() AND (a.next_attempt_at IS NULL OR a.next_attempt_at <= now())'
    END;

    -- nothing pending: no metadata request, no work
    EXECUTE format('SELECT EXISTS (SELECT FROM d365.activity a JOIN %s c ON c.%I::text = a.contact_key'
                   ' JOIN d365.contact_state cs ON cs.contact_key = a.contact_key'
                   '  AND cs.dynamics_id = c.dynamics365_related_id'
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
          -- only a link d365sync wrote (d365._contact_untrusted_sql)
          JOIN d365.contact_state cs ON cs.contact_key = a.contact_key
                                    AND cs.dynamics_id = c.dynamics365_related_id
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
-- Roles: the sets of rights d365_grant() gives, and the small helpers that
-- let those sets do their work without more rights.
-- See docs/security.md ("Roles") and src/privilege/roles.c.
-- ---------------------------------------------------------------------------

/*
 * pg_cron's cron.host, which pg_cron lets only superusers and members of
 * pg_read_all_settings read; d365_schedule() needs it to point the jobs at
 * the server pg_cron connects to.  Reading one setting of another
 * extension tells nothing secret, so it is read without that restriction.
 */
CREATE FUNCTION d365._cron_host()
RETURNS text
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_cron_host'
LANGUAGE C STABLE;

/*
 * Whether an object belongs to the extension (not something a user made in
 * schema d365): the sets cover d365sync's own objects only.
 */
CREATE FUNCTION d365._is_member(catalog regclass, objid oid)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT FROM pg_depend d
                    WHERE d.classid = catalog AND d.objid = objid AND d.deptype = 'e'
                      AND d.refclassid = 'pg_extension'::regclass
                      AND d.refobjid = (SELECT e.oid FROM pg_extension e WHERE e.extname = 'd365sync'))
$$;

/*
 * The rights of each set d365_grant() gives (docs/security.md): one row per
 * GRANT, as the object's kind (SCHEMA, ROUTINE, TABLE, SEQUENCE, FOREIGN DATA WRAPPER), the
 * object and the privileges.  The sets nest: monitor, operator (+ monitor),
 * admin (+ operator, app, and the rest of d365); app stands alone.  No set
 * holds TRIGGER, REFERENCES or TRUNCATE on a table of d365, nor EXECUTE on
 * a trigger function.  Computed from the catalog, so that functions and
 * tables added later are covered.
 */
CREATE FUNCTION d365._grant_set(what text)
RETURNS TABLE (kind text, object text, privileges text)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    monitor_functions text[] := ARRAY['d365_status', 'd365_run_progress'];
    operator_functions text[] := ARRAY['d365_sync_contacts', 'd365_sync_contact', 'd365_sync_activities',
        'd365_pull_changes', 'd365_run_job', 'd365_schedule', 'd365_unschedule', 'd365_whoami',
        'd365_whoami_all', 'd365_validate_mapping', 'd365_dynamics_fields', 'd365_owners',
        'd365_contact_fields', 'd365_tables', 'd365_describe', 'd365_sync', 'd365_pull', 'd365_load'];
    app_functions text[] := ARRAY['d365_log_activity', 'd365_create_task', 'd365_create_appointment',
        'd365_update_contact'];
    -- the two internal functions d365_schedule() calls as its caller (it
    -- schedules pg_cron jobs in the caller's name): the jobs' names and
    -- commands, and pg_cron's cron.host; neither takes an argument nor
    -- changes anything (docs/security.md)
    operator_internal text[] := ARRAY['_jobs', '_cron_host'];
    config_tables text[] := ARRAY['settings', 'app_users', 'contact_source', 'field_map',
        'activity_type_map', 'activity_mapper'];
    state_tables text[] := ARRAY['contact_state', 'activity', 'sync_run', 'metadata_cache', 'pull_state',
        'map_row', 'map_change', 'map_delete', 'load_state', 'map_lookup_pending'];
    -- internal functions for no set: they send what their arguments or a
    -- row of d365's tables say, and only d365's SECURITY DEFINER functions
    -- call them
    owner_only text[] := ARRAY['_send_activity', '_job_role_grants'];
BEGIN
    IF what IS NULL OR what NOT IN ('monitor', 'operator', 'admin', 'app') THEN
        RAISE EXCEPTION 'unknown set of rights "%"', what
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'The sets are monitor, operator, admin and app (docs/security.md).';
    END IF;
    kind := 'SCHEMA'; object := 'd365'; privileges := 'USAGE'; RETURN NEXT;

    -- routines: never a trigger function
    RETURN QUERY
    SELECT 'ROUTINE', p.oid::regprocedure::text, 'EXECUTE'
      FROM pg_proc p
     WHERE p.pronamespace = 'd365'::regnamespace AND p.prorettype <> 'trigger'::regtype
       AND p.proname <> ALL (owner_only)
       AND d365._is_member('pg_proc'::regclass, p.oid)
       AND CASE what
           WHEN 'monitor' THEN p.proname = ANY (monitor_functions)
           WHEN 'app' THEN p.proname = ANY (app_functions)
           -- the jobs run as the job role d365sync_job, which holds EXECUTE
           -- on the internal functions (docs/security.md)
           WHEN 'operator' THEN p.proname = ANY (monitor_functions || operator_functions || operator_internal)
           ELSE true END
     ORDER BY 2;

    -- tables and views: the secrets stay with the administrators
    RETURN QUERY
    SELECT 'TABLE', c.oid::regclass::text,
           CASE
           WHEN what = 'monitor' THEN 'SELECT'
           WHEN what = 'admin' THEN 'SELECT, INSERT, UPDATE, DELETE'
           -- a job's lock (taken by the job role); the lock's holder is
           -- shown as a run in progress only for a role that may run jobs
           WHEN c.relname = 'job_lock' THEN 'SELECT, UPDATE'
           -- the operator may switch a map on and off, nothing more
           WHEN c.relname = 'table_map' THEN 'SELECT, UPDATE (enabled)'
           -- the jobs (as the job role) write the sync state, the run
           -- history and the outcomes; an operator reads them, drops a
           -- logged activity, a pending delete or a reviewed conflict,
           -- and clears the metadata cache and the pull's delta links (a
           -- fresh fetch, a new baseline)
           WHEN c.relname IN ('activity', 'map_delete', 'conflict', 'metadata_cache', 'pull_state')
               THEN 'SELECT, DELETE'
           WHEN c.relname = ANY (state_tables) THEN 'SELECT'
           WHEN EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'client_secret')
               THEN format('SELECT (%s)', (SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum)
                                             FROM pg_attribute a
                                            WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                                              AND a.attname <> 'client_secret'))
           ELSE 'SELECT' END
      FROM pg_class c
     WHERE c.relnamespace = 'd365'::regnamespace AND c.relkind IN ('r', 'p', 'v')
       AND d365._is_member('pg_class'::regclass, c.oid)
       AND CASE what
           WHEN 'monitor' THEN c.relname IN ('sync_run', 'run_progress')
           WHEN 'app' THEN false
           ELSE c.relname <> 'contact_change' END
     ORDER BY 2;

    -- the jobs (as the job role) draw the ids; an admin may too
    IF what = 'admin' THEN
        RETURN QUERY
        SELECT 'SEQUENCE', c.oid::regclass::text, 'USAGE'
          FROM pg_class c
         WHERE c.relnamespace = 'd365'::regnamespace AND c.relkind = 'S'
           AND d365._is_member('pg_class'::regclass, c.oid)
         ORDER BY 2;
    END IF;
    -- to schedule with pg_cron
    IF what IN ('operator', 'admin') AND to_regnamespace('cron') IS NOT NULL THEN
        kind := 'SCHEMA'; object := 'cron'; privileges := 'USAGE'; RETURN NEXT;
    END IF;
    -- to create a foreign server for live reads (docs/foreign-tables.md)
    IF what = 'admin' AND EXISTS (SELECT FROM pg_foreign_data_wrapper w WHERE w.fdwname = 'd365_fdw'
                                     AND d365._is_member('pg_foreign_data_wrapper'::regclass, w.oid)) THEN
        kind := 'FOREIGN DATA WRAPPER'; object := 'd365_fdw'; privileges := 'USAGE'; RETURN NEXT;
    END IF;
END;
$$;

/*
 * Who may grant and revoke a set: a superuser, or a role holding the admin
 * set (which has its rights WITH GRANT OPTION, so that it can pass them on
 * but never more than them: PostgreSQL itself refuses the rest).
 */
CREATE FUNCTION d365._check_granter(verb text)
RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = current_user)
       AND NOT has_table_privilege('d365.settings', 'UPDATE WITH GRANT OPTION') THEN
        RAISE EXCEPTION 'permission denied to % d365sync''s rights', verb
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'Only a superuser or a role given the admin set may.',
                  HINT = 'Ask a superuser to run SELECT d365.d365_grant(''your_role'', ''admin'').';
    END IF;
END;
$$;

CREATE FUNCTION d365.d365_grant(role regrole, what text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    g record;
    skipped text[] := '{}';
BEGIN
    IF role IS NULL THEN
        RAISE EXCEPTION 'no role to grant to'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    PERFORM d365._grant_set(what);          -- validates what
    PERFORM d365._check_granter('grant');
    FOR g IN SELECT * FROM d365._grant_set(what) LOOP
        -- another extension's schema: only who may pass its right on
        IF g.kind = 'SCHEMA' AND g.object <> 'd365'
           AND NOT (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = current_user)
           AND NOT has_schema_privilege(g.object, 'USAGE WITH GRANT OPTION') THEN
            skipped := skipped || format('USAGE ON SCHEMA %s', g.object);
            CONTINUE;
        END IF;
        EXECUTE format('GRANT %s ON %s %s TO %s%s', g.privileges, g.kind, g.object, role,
                       CASE WHEN what = 'admin' THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
    IF skipped <> '{}' THEN
        RAISE WARNING 'not granted to %: %', role, array_to_string(skipped, ', ')
            USING HINT = 'Ask a superuser to grant it (scheduling with pg_cron needs it).';
    END IF;
END;
$$;
COMMENT ON FUNCTION d365.d365_grant(regrole, text) IS
    'Gives a role one set of rights: monitor (status, history, progress), operator (+ run and schedule the jobs), admin (+ settings, maps, secrets, granting), app (log activities, apply Dynamics edits); only a superuser or an admin may';

CREATE FUNCTION d365.d365_revoke(role regrole, what text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    g record;
BEGIN
    IF role IS NULL THEN
        RAISE EXCEPTION 'no role to revoke from'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    PERFORM d365._grant_set(what);
    PERFORM d365._check_granter('revoke');
    FOR g IN SELECT * FROM d365._grant_set(what) LOOP
        CONTINUE WHEN g.kind = 'SCHEMA' AND g.object <> 'd365'
                      AND NOT (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = current_user)
                      AND NOT has_schema_privilege(g.object, 'USAGE WITH GRANT OPTION');
        EXECUTE format('REVOKE %s ON %s %s FROM %s CASCADE', g.privileges, g.kind, g.object, role);
    END LOOP;
END;
$$;
COMMENT ON FUNCTION d365.d365_revoke(regrole, text) IS
    'Takes back the rights of one set (monitor, operator, admin or app) that the caller gave, also where another set of the role shares them';

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
    -- the map "contact" switched off (src/engines/contact_policies.c)
    IF EXISTS (SELECT FROM d365.table_map t WHERE t.name = 'contact' AND NOT t.enabled) THEN
        value := 'false (map contact disabled: enabled = false; '
                 || substr(value, strpos(value, '(') + 1);
    END IF;
    RETURN NEXT;
    item := 'activity sync enabled'; value := s.activity_sync_enabled::text; RETURN NEXT;
    item := 'default owner'; value := coalesce(s.default_owner, '(none)'); RETURN NEXT;
    item := 'realtime'; value := s.realtime::text; RETURN NEXT;
    item := 'pull interval'; value := coalesce(s.pull_interval::text, '(none)'); RETURN NEXT;

    -- the background worker (docs/worker.md)
    SELECT * INTO w FROM d365._worker_state();
    item := 'worker';
    value := CASE
        WHEN pg_catalog.pg_is_in_recovery()
            THEN 'not running: this server is a hot standby (in recovery); nothing is sent to Dynamics 365 from here, and the worker starts when the server is promoted'
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
        SELECT count(*)::text INTO value FROM d365.field_map;
        -- linked contacts and no map: nothing is sent or received for them
        -- (a map lost in a restore that refused it, or deleted by hand)
        IF value = '0' AND EXISTS (SELECT FROM d365.contact_state cs WHERE cs.synced IS NOT NULL) THEN
            value := '0 -- WARNING: contacts are linked but no field is mapped, so nothing is sent or received;'
                     ' restore d365.field_map (see "Backup and restore" in docs/operations.md) or map the fields again';
        END IF;
        RETURN NEXT;
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
    -- rows deleted locally whose Dynamics record is not deactivated or
    -- deleted yet (d365.pending_delete)
    FOR r IN SELECT d.map, count(*) AS n, min(d.deleted_at) AS oldest,
                    (array_agg(d.dynamics_id ORDER BY d.deleted_at, d.dynamics_id))[1] AS first_id,
                    (array_agg(d.last_error ORDER BY d.last_attempt_at DESC NULLS LAST))[1] AS last_error
               FROM d365.map_delete d GROUP BY d.map ORDER BY d.map LOOP
        item := format('pending deletes of map %s', r.map);
        value := format('%s (oldest %s, Dynamics id %s)%s', r.n,
                        to_char(r.oldest, 'YYYY-MM-DD HH24:MI:SS TZ'), r.first_id,
                        coalesce('; last error: ' || r.last_error, ''));
        RETURN NEXT;
    END LOOP;
    -- fields changed on both sides, as resolved (d365.conflict): how many,
    -- the newest; their values are for those who may read the table
    FOR r IN SELECT c.map, count(*) AS n, max(c.at) AS newest,
                    count(*) FILTER (WHERE c.resolution = 'local_wins') AS local_wins
               FROM d365.conflict c GROUP BY c.map ORDER BY c.map LOOP
        item := format('conflicts of map %s', r.map);
        value := format('%s (%s dynamics_wins, %s local_wins; newest %s)', r.n, r.n - r.local_wins,
                        r.local_wins, to_char(r.newest, 'YYYY-MM-DD HH24:MI:SS TZ'));
        RETURN NEXT;
    END LOOP;
    -- each table map: pending rows, its last run error, its last row error
    RETURN QUERY SELECT * FROM d365._map_status();
    -- initial loads not finished, and lookups of loaded rows waiting for
    -- their parent record to be linked (14_map_load.sql)
    FOR r IN SELECT substr(l.entity, 5) AS map, l.records, l.total, l.pages, l.started_at, l.last_error
               FROM d365.load_state l
              WHERE l.entity LIKE 'map:%' AND l.finished_at IS NULL ORDER BY 1 LOOP
        item := format('load of map %s', r.map);
        value := format('not finished (started %s): %s of %s records in %s page(s)%s',
                        to_char(r.started_at, 'YYYY-MM-DD HH24:MI:SS TZ'), r.records,
                        coalesce(r.total::text, '?'), r.pages, coalesce('; last error: ' || r.last_error, ''));
        RETURN NEXT;
    END LOOP;
    FOR r IN SELECT q.map, count(*) AS n FROM d365.map_lookup_pending q GROUP BY q.map ORDER BY 1 LOOP
        item := format('lookups waiting in map %s', r.map);
        value := format('%s (their parent record is linked to no row yet)', r.n);
        RETURN NEXT;
    END LOOP;
    -- the newest failed run of a job that has not completed a run since
    -- (a skipped or disabled run does not count); the history keeps them all
    SELECT sr.finished_at, sr.kind, sr.message INTO r FROM d365.sync_run sr
     WHERE sr.message LIKE 'failed:%'
       AND NOT EXISTS (SELECT FROM d365.sync_run ok
                        WHERE ok.kind = sr.kind AND ok.id > sr.id
                          AND (ok.message IS NULL OR
                               NOT (ok.message LIKE 'failed:%' OR ok.message LIKE 'skipped:%'
                                    OR ok.message LIKE '% sync is disabled (%')))
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
           ('pull', 'd365-pull-changes', 'CALL d365.d365_run_job(''pull'')', NULL),
           ('maps', 'd365-map-sync', 'CALL d365.d365_run_job(''maps'')', '0 * * * *'),
           ('map-pull', 'd365-map-pull', 'CALL d365.d365_run_job(''map-pull'')', NULL)
$$;

/*
 * One run of a scheduled job, through the job's function (lock, error
 * capture, its row in d365.sync_run, pruning of old runs): returns the id
 * of the row the run recorded and, when the run failed, why.  The map
 * jobs (maps, map-pull) run d365_sync(map) or d365_pull(map) for each map
 * of d365._map_jobs(), parents first, one run each: a map that fails does
 * not stop the others; run_id is then the first failed run's, and failure
 * names every map that failed.
 */
CREATE FUNCTION d365._run_job(job text, OUT run_id bigint, OUT failure text)
RETURNS record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m record;
    one record;
BEGIN
    IF job IN ('maps', 'map-pull') THEN
        FOR m IN SELECT j.name FROM d365._map_jobs(job = 'maps') j LOOP
            SELECT * INTO one FROM d365._run_map_job(job, m.name);
            IF one.failure IS NOT NULL THEN
                run_id := coalesce(run_id, one.run_id);
                failure := concat_ws('; ', failure, format('map %s: %s', m.name, one.failure));
            END IF;
        END LOOP;
        RETURN;
    END IF;
    CASE job
        WHEN 'contacts' THEN PERFORM d365.d365_sync_contacts();
        WHEN 'activities' THEN PERFORM d365.d365_sync_activities();
        WHEN 'pull' THEN PERFORM d365.d365_pull_changes();
        ELSE
            RAISE EXCEPTION 'unknown d365sync job "%"', job
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'The jobs are contacts, activities, pull, maps and map-pull.';
    END CASE;
    -- the run recorded itself last: this session's last value of the sequence
    SELECT r.id, CASE WHEN r.message LIKE 'failed: %' THEN substr(r.message, 9) END
      INTO run_id, failure
      FROM d365.sync_run r WHERE r.id = currval('d365.sync_run_id_seq'::regclass);
END;
$$;

/*
 * One map's run of a map job: d365_sync(map) ('maps') or d365_pull(map)
 * ('map-pull'), after waiting for a run of that map in progress (the
 * worker's, the other map job's) instead of skipping it -- a sync and a
 * pull scheduled at the same minute would otherwise skip one another.
 * Returns the id of the row the run recorded and, when it failed, why; a
 * map gone meanwhile returns NULLs.
 */
CREATE FUNCTION d365._run_map_job(job text, map text, OUT run_id bigint, OUT failure text)
RETURNS record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM FROM d365.table_map t WHERE t.name = map FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF job = 'maps' THEN
        PERFORM d365.d365_sync(map);
    ELSE
        PERFORM d365.d365_pull(map);
    END IF;
    SELECT s.id, CASE WHEN s.message LIKE 'failed: %' THEN substr(s.message, 9) END
      INTO run_id, failure
      FROM d365.sync_run s WHERE s.id = currval('d365.sync_run_id_seq'::regclass);
EXCEPTION WHEN OTHERS THEN
    run_id := NULL;
    failure := SQLERRM;
END;
$$;
REVOKE ALL ON FUNCTION d365._run_map_job(text, text) FROM PUBLIC;

/*
 * The command of the pg_cron jobs (src/worker/run_job.c), run as the job role.  A
 * failed run is committed to d365.sync_run first, then raised, so that
 * pg_cron records the job run as failed and the run's record stays.  A
 * procedure that commits cannot carry a SET clause: it pins its search_path
 * in each of its transactions instead.
 */
CREATE PROCEDURE d365.d365_run_job(job text)
AS 'MODULE_PATHNAME', 'd365_run_job'
LANGUAGE C;
COMMENT ON PROCEDURE d365.d365_run_job(text) IS
    'Runs one scheduled job (contacts, activities, pull, maps or map-pull) as pg_cron does: records the run (the map jobs: one run and one transaction per map, every enabled map, parents first, each waiting for a run of its map in progress), commits, and raises when it failed so that cron.job_run_details says failed; call it outside a transaction block';

/*
 * Schedules the d365sync jobs with pg_cron.  Only the jobs an argument
 * names change; the COMMENT below gives the rules.
 */
CREATE FUNCTION d365.d365_schedule(
    contacts text DEFAULT 'keep',
    activities text DEFAULT 'keep',
    pull text DEFAULT 'keep',
    maps text DEFAULT 'keep',
    map_pull text DEFAULT 'keep')
RETURNS TABLE (job_name text, schedule text, command text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    wanted text[] := ARRAY[contacts, activities, pull, maps, map_pull];
    nothing_named boolean := coalesce(contacts = 'keep' AND activities = 'keep' AND pull = 'keep'
                                      AND maps = 'keep' AND map_pull = 'keep', false);
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
    host := coalesce(d365._cron_host(), 'localhost');
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
                          -- the map job only where there is a map to send
                          WHEN nothing_named AND j.job = 'maps'
                               AND NOT EXISTS (SELECT FROM d365.table_map t
                                                WHERE t.enabled AND t.name <> 'contact' AND t.direction <> 'in')
                              THEN NULL
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
COMMENT ON FUNCTION d365.d365_schedule(text, text, text, text, text) IS
    'Creates, changes or removes the pg_cron jobs d365-contact-sync, d365-activity-sync, d365-pull-changes, d365-map-sync (maps: every enabled table map, parents first) and d365-map-pull (map_pull). ONLY THE JOBS THE CALL NAMES CHANGE: a cron schedule sets that job, NULL or ''off'' removes it, ''keep'' (the default: an argument left out) leaves its schedule as it is. Called without any argument it creates the missing contact and activity jobs, hourly, and the map job when a table map sends. Every job it keeps or sets runs CALL d365.d365_run_job(...) and connects to the current cron.host.';

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
REVOKE ALL ON ALL PROCEDURES IN SCHEMA d365 FROM PUBLIC;

-- Every right a role needs comes from d365.d365_grant(role, set)
-- (sql/install/08_roles.sql, docs/security.md).  No role but the
-- extension's owner holds EXECUTE on a trigger function.
-- Live reads: Dataverse tables as foreign tables (src/fdw/fdw.c, src/fdw/fdw_deparse.c,
-- src/fdw/fdw_scan.c), and the discovery functions they share their metadata with.
-- ---------------------------------------------------------------------------

-- Discovery: the Dataverse tables, and the columns of one.  Metadata comes
-- through d365._get_cached (an hour in d365.metadata_cache).

CREATE FUNCTION d365._entities()
RETURNS SETOF jsonb
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT jsonb_array_elements(d365._get_cached(
        'EntityDefinitions?$select=LogicalName,EntitySetName,PrimaryIdAttribute,ChangeTrackingEnabled'))
$$;

CREATE FUNCTION d365.d365_tables(
    OUT logical_name text, OUT entity_set text, OUT primary_id text,
    OUT change_tracking boolean)
RETURNS SETOF record
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT e ->> 'LogicalName', e ->> 'EntitySetName', e ->> 'PrimaryIdAttribute',
           coalesce((e ->> 'ChangeTrackingEnabled')::boolean, false)
      FROM d365._entities() e
     WHERE e ->> 'EntitySetName' IS NOT NULL
     ORDER BY 1
$$;
COMMENT ON FUNCTION d365.d365_tables() IS
    'Dataverse tables: logical name, entity set, primary id attribute, change tracking (metadata cached for an hour)';

-- The column a foreign table gives an attribute, and its type; NULL for
-- attributes the Web API does not return as a plain property.
CREATE FUNCTION d365._fdw_column(a jsonb, OUT column_name text, OUT column_type text)
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN t IS NULL THEN NULL
                WHEN a ->> 'AttributeType' IN ('Lookup', 'Customer', 'Owner')
                    THEN '_' || (a ->> 'LogicalName') || '_value'
                ELSE a ->> 'LogicalName' END,
           t
      FROM (SELECT CASE WHEN a ->> 'AttributeOf' IS NOT NULL
                          OR NOT coalesce((a ->> 'IsValidForRead')::boolean, true) THEN NULL
                     ELSE CASE a ->> 'AttributeType'
                WHEN 'String' THEN 'text'
                WHEN 'Memo' THEN 'text'
                WHEN 'EntityName' THEN 'text'
                WHEN 'Integer' THEN 'integer'
                WHEN 'BigInt' THEN 'bigint'
                WHEN 'Decimal' THEN 'numeric'
                WHEN 'Money' THEN 'numeric'
                WHEN 'Double' THEN 'double precision'
                WHEN 'Boolean' THEN 'boolean'
                WHEN 'DateTime' THEN CASE WHEN a ->> 'Format' = 'DateOnly'
                                          THEN 'date' ELSE 'timestamp with time zone' END
                WHEN 'Uniqueidentifier' THEN 'uuid'
                WHEN 'Lookup' THEN 'uuid'
                WHEN 'Customer' THEN 'uuid'
                WHEN 'Owner' THEN 'uuid'
                WHEN 'Picklist' THEN 'integer'
                WHEN 'State' THEN 'integer'
                WHEN 'Status' THEN 'integer'
                WHEN 'Virtual' THEN CASE WHEN a #>> '{AttributeTypeName,Value}' = 'MultiSelectPicklistType'
                                         THEN 'text' END
            END END AS t) x
$$;

CREATE FUNCTION d365._choice_options(entity text, OUT attribute text, OUT options jsonb)
RETURNS SETOF record
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT a ->> 'LogicalName',
           (SELECT jsonb_agg(jsonb_build_object(
                       'value', (o ->> 'Value')::integer,
                       'label', o #>> '{Label,UserLocalizedLabel,Label}')
                       ORDER BY (o ->> 'Value')::integer)
              FROM jsonb_array_elements(coalesce(a #> '{OptionSet,Options}', '[]')) o)
      FROM unnest(ARRAY['PicklistAttributeMetadata', 'StateAttributeMetadata',
                        'StatusAttributeMetadata', 'MultiSelectPicklistAttributeMetadata']) cast_name,
           LATERAL jsonb_array_elements(d365._get_cached(format(
               'EntityDefinitions(LogicalName=''%s'')/Attributes/Microsoft.Dynamics.CRM.%s?$select=LogicalName&$expand=OptionSet',
               entity, cast_name))) a
$$;

CREATE FUNCTION d365.d365_describe(
    entity text,
    OUT logical_name text, OUT attribute_type text, OUT max_length integer,
    OUT required boolean, OUT targets text[], OUT options jsonb,
    OUT column_name text, OUT column_type text)
RETURNS SETOF record
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF entity IS NULL OR entity !~ '^[a-z][a-z0-9_]*$' THEN
        RAISE EXCEPTION 'invalid entity logical name %', coalesce(quote_literal(entity), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Tables are named by their lowercase logical name, e.g. account; d365_tables() lists them.';
    END IF;
    RETURN QUERY
    SELECT a ->> 'LogicalName',
           -- Virtual attributes say what they are in AttributeTypeName
           -- (MultiSelectPicklistType: a multi-select choice)
           CASE WHEN a ->> 'AttributeType' = 'Virtual' AND a #>> '{AttributeTypeName,Value}' IS NOT NULL
                THEN regexp_replace(a #>> '{AttributeTypeName,Value}', 'Type$', '')
                ELSE a ->> 'AttributeType' END,
           (a ->> 'MaxLength')::integer,
           coalesce(a #>> '{RequiredLevel,Value}' IN ('SystemRequired', 'ApplicationRequired'), false),
           CASE WHEN jsonb_typeof(a -> 'Targets') = 'array'
                THEN ARRAY(SELECT jsonb_array_elements_text(a -> 'Targets')) END,
           o.options,
           c.column_name, c.column_type
      FROM jsonb_array_elements(d365._get_cached(format(
               'EntityDefinitions(LogicalName=''%s'')/Attributes?$select=LogicalName,AttributeType,AttributeTypeName,MaxLength,RequiredLevel,Targets,IsValidForRead,AttributeOf,Format,IsPrimaryId',
               entity))) a
      LEFT JOIN d365._choice_options(entity) o ON o.attribute = a ->> 'LogicalName'
      CROSS JOIN LATERAL d365._fdw_column(a) c
     ORDER BY (a ->> 'IsPrimaryId')::boolean IS TRUE DESC, a ->> 'LogicalName';
END;
$$;
COMMENT ON FUNCTION d365.d365_describe(text) IS
    'Attributes of a Dataverse table: type, maximum length, required, lookup targets, choice options, and the column a foreign table gives it (metadata cached for an hour)';

-- IMPORT FOREIGN SCHEMA dataverse: one CREATE FOREIGN TABLE per table
-- (named by its entity set), columns from d365_describe.  Run by the
-- wrapper as the owner of d365's tables.  mode: all, limit to, except.
CREATE FUNCTION d365._fdw_import(server text, mode text, local_schema text, entity_sets text[])
RETURNS SETOF text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t record;
    cols text;
    missing text;
BEGIN
    IF mode = 'limit to' THEN
        SELECT string_agg(quote_ident(s), ', ') INTO missing
          FROM unnest(entity_sets) s
         WHERE s NOT IN (SELECT e ->> 'EntitySetName' FROM d365._entities() e
                          WHERE e ->> 'EntitySetName' IS NOT NULL);
        IF missing IS NOT NULL THEN
            RAISE EXCEPTION 'Dataverse has no table with entity set %', missing
                USING ERRCODE = 'fdw_table_not_found',
                      HINT = 'Tables are named by their entity set (e.g. accounts); d365_tables() lists them.';
        END IF;
    END IF;
    FOR t IN SELECT e ->> 'LogicalName' AS logical_name, e ->> 'EntitySetName' AS entity_set,
                    e ->> 'PrimaryIdAttribute' AS primary_id
               FROM d365._entities() e
              WHERE e ->> 'EntitySetName' ~ '^[A-Za-z_][A-Za-z0-9_]*$'
                AND e ->> 'LogicalName' ~ '^[a-z][a-z0-9_]*$'
                AND CASE mode WHEN 'limit to' THEN e ->> 'EntitySetName' = ANY (entity_sets)
                              WHEN 'except' THEN NOT (e ->> 'EntitySetName' = ANY (entity_sets))
                              ELSE true END
              ORDER BY 2 LOOP
        SELECT string_agg(format('%I %s%s', d.column_name, d.column_type,
                                 CASE WHEN d.logical_name = t.primary_id THEN ' NOT NULL' ELSE '' END),
                          E',\n    ')
          INTO cols
          FROM d365.d365_describe(t.logical_name) d
         WHERE d.column_name IS NOT NULL AND d.column_name ~ '^[A-Za-z_][A-Za-z0-9_]*$';
        CONTINUE WHEN cols IS NULL;
        RETURN NEXT format(E'CREATE FOREIGN TABLE %I.%I (\n    %s\n) SERVER %I OPTIONS (entity_set %L, entity %L)',
                           local_schema, t.entity_set, cols, server, t.entity_set, t.logical_name);
    END LOOP;
END;
$$;

-- The wrapper.  Its handler and validator are called by PostgreSQL itself,
-- never by users.
CREATE FUNCTION d365._fdw_handler()
RETURNS fdw_handler
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_fdw_handler'
LANGUAGE C STRICT;

CREATE FUNCTION d365._fdw_validator(options text[], catalog oid)
RETURNS void
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_fdw_validator'
LANGUAGE C STRICT;

CREATE FOREIGN DATA WRAPPER d365_fdw
    HANDLER d365._fdw_handler
    VALIDATOR d365._fdw_validator;
COMMENT ON FOREIGN DATA WRAPPER d365_fdw IS
    'Dataverse tables as read-only foreign tables, through d365sync''s connection (d365.settings)';

REVOKE ALL ON FUNCTION d365._entities(), d365.d365_tables(), d365._fdw_column(jsonb),
    d365._choice_options(text), d365.d365_describe(text),
    d365._fdw_import(text, text, text, text[]),
    d365._fdw_handler(), d365._fdw_validator(text[], oid) FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- Table maps: any PostgreSQL table <-> any Dataverse table.  The maps and
-- their columns, what Dynamics metadata says about each mapped field
-- (lookups, choices), the capture triggers, and the statements run as a
-- mapped table's owner (src/privilege/map_owner.c).  The sync itself is
-- 12_map_sync.sql and src/engines/table_maps.c, on the pipeline.  See
-- docs/table-maps.md.
-- ---------------------------------------------------------------------------

CREATE TABLE d365.table_map (
    name             text PRIMARY KEY
                     CONSTRAINT table_map_name_check CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    local_table      regclass UNIQUE NOT NULL,
    entity_set       text NOT NULL
                     CONSTRAINT table_map_entity_set_check CHECK (entity_set ~ '^[A-Za-z][A-Za-z0-9_]*$'),
    key_column       name NOT NULL,
    direction        text NOT NULL DEFAULT 'both'
                     CONSTRAINT table_map_direction_check CHECK (direction IN ('both', 'in', 'out')),
    load             boolean NOT NULL DEFAULT false,
    on_local_delete  text NOT NULL DEFAULT 'unlink'
                     CONSTRAINT table_map_on_local_delete_check
                     CHECK (on_local_delete IN ('unlink', 'deactivate', 'delete')),
    on_remote_delete text NOT NULL DEFAULT 'unlink'
                     CONSTRAINT table_map_on_remote_delete_check
                     CHECK (on_remote_delete IN ('unlink', 'delete')),
    conflict         text NOT NULL DEFAULT 'dynamics_wins'
                     CONSTRAINT table_map_conflict_check
                     CHECK (conflict IN ('dynamics_wins', 'local_wins')),
    enabled          boolean NOT NULL DEFAULT true
);
COMMENT ON TABLE d365.table_map IS
    'Table maps: a local table synced with a Dataverse table (d365_map_table, d365_unmap_table)';
SELECT pg_catalog.pg_extension_config_dump('d365.table_map', '');

CREATE TABLE d365.column_map (
    map       text REFERENCES d365.table_map ON DELETE CASCADE,
    "column"  name,
    field     text NOT NULL
              CONSTRAINT column_map_field_check CHECK (field ~ '^[a-z][a-z0-9_]*$'),
    direction text NOT NULL DEFAULT 'both'
              CONSTRAINT column_map_direction_check CHECK (direction IN ('both', 'in', 'out')),
    match     boolean NOT NULL DEFAULT false,
    PRIMARY KEY (map, "column")
);
COMMENT ON TABLE d365.column_map IS
    'Columns of a table map and the Dataverse field (attribute logical name) each is synced with (d365_map_column)';
SELECT pg_catalog.pg_extension_config_dump('d365.column_map', '');

-- Per-row sync state of a map: the Dynamics record, what it holds as far
-- as d365sync knows (synced: {wire field: value}), changes not yet sent
-- (change_seq > synced_seq), failures and back-off.
CREATE TABLE d365.map_row (
    map              text NOT NULL REFERENCES d365.table_map ON DELETE CASCADE,
    row_key          text NOT NULL,
    dynamics_id      uuid,
    synced           jsonb,
    change_seq       bigint NOT NULL DEFAULT 0,
    synced_seq       bigint NOT NULL DEFAULT 0,
    generation       integer NOT NULL DEFAULT 0,
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    last_attempt_at  timestamptz,
    last_status      integer,
    last_error_code  text,
    last_error       text,
    remote_deleted_at timestamptz,
    PRIMARY KEY (map, row_key)
);
CREATE INDEX map_row_dynamics_idx ON d365.map_row (map, dynamics_id);
COMMENT ON TABLE d365.map_row IS
    'Sync state of each row of a table map: its Dynamics record, the values last synced, failures';
SELECT pg_catalog.pg_extension_config_dump('d365.map_row', '');

-- Keys noted by the capture triggers, folded into map_row by the next sync.
CREATE TABLE d365.map_change (
    map      text NOT NULL,
    keys     text[] NOT NULL,
    noted_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE d365.map_change IS
    'Keys of mapped rows changed since the last sync of their map (capture triggers)';
SELECT pg_catalog.pg_extension_config_dump('d365.map_change', '');

/*
 * A map by name, with a clear error when there is none.
 */
CREATE FUNCTION d365._table_map(map text)
RETURNS d365.table_map
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map;
BEGIN
    SELECT * INTO m FROM d365.table_map t WHERE t.name = map;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table map "%" does not exist', map
            USING ERRCODE = 'undefined_object',
                  HINT = 'SELECT name FROM d365.table_map lists the maps; d365_map_table() adds one.';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = m.local_table) THEN
        RAISE EXCEPTION 'the table of map "%" (OID %) was dropped', map, m.local_table::oid
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('SELECT d365_unmap_table(%L);', map);
    END IF;
    RETURN m;
END;
$$;

/*
 * The Dataverse table of an entity set (from the cached list of tables):
 * logical name, primary id attribute, change tracking.
 */
CREATE FUNCTION d365._map_entity(entity_set text,
    OUT logical_name text, OUT primary_id text, OUT change_tracking boolean)
RETURNS record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    SELECT e ->> 'LogicalName', e ->> 'PrimaryIdAttribute',
           coalesce((e ->> 'ChangeTrackingEnabled')::boolean, false)
      INTO logical_name, primary_id, change_tracking
      FROM d365._entities() e
     WHERE e ->> 'EntitySetName' = entity_set
       AND e ->> 'LogicalName' ~ '^[a-z][a-z0-9_]*$'
       AND e ->> 'PrimaryIdAttribute' ~ '^[a-z][a-z0-9_]*$';
    IF logical_name IS NULL THEN
        RAISE EXCEPTION 'Dynamics 365 has no table with entity set "%"', entity_set
            USING ERRCODE = 'undefined_object',
                  HINT = 'd365_tables() lists the tables and their entity sets (e.g. accounts, contacts, new_projects).';
    END IF;
END;
$$;

-- Forget the cached metadata of one Dataverse table (and the list of
-- tables), so that the next look-up reads it anew.
CREATE FUNCTION d365._map_metadata_refresh(entity text)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    DELETE FROM d365.metadata_cache c
     WHERE c.path LIKE 'EntityDefinitions(LogicalName=''' || entity || ''')%'
        OR c.path LIKE 'EntityDefinitions?%'
$$;

/*
 * What Dynamics metadata says about the attributes of a Dataverse table,
 * one row per attribute: its type ('MultiSelectPicklist' for a
 * multi-select choice), whether it can be written, its lookup targets with
 * the navigation property of each ({target: navigation property}, from
 * ManyToOneRelationships: case-sensitive for custom lookups), and the
 * options of a choice ([{value, label}]).  Cached (d365._get_cached).
 */
CREATE FUNCTION d365._map_attributes(entity text,
    OUT logical_name text, OUT attribute_type text, OUT valid_for_create boolean,
    OUT valid_for_update boolean, OUT navs jsonb, OUT options jsonb)
RETURNS SETOF record
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    WITH attrs AS (
        SELECT a FROM jsonb_array_elements(d365._get_cached(format(
                   'EntityDefinitions(LogicalName=''%s'')/Attributes?$select=LogicalName,AttributeType,AttributeTypeName,IsValidForCreate,IsValidForUpdate,Targets',
                   entity))) a),
    rels AS (
        SELECT r ->> 'ReferencingAttribute' AS attribute,
               jsonb_object_agg(r ->> 'ReferencedEntity',
                                r ->> 'ReferencingEntityNavigationPropertyName') AS navs
          FROM jsonb_array_elements(d365._get_cached(format(
                   'EntityDefinitions(LogicalName=''%s'')/ManyToOneRelationships?$select=ReferencingAttribute,ReferencedEntity,ReferencingEntityNavigationPropertyName',
                   entity))) r
         WHERE r ->> 'ReferencingEntityNavigationPropertyName' ~ '^[A-Za-z_][A-Za-z0-9_]*$'
         GROUP BY 1),
    multi AS (
        SELECT a ->> 'LogicalName' AS attribute,
               (SELECT jsonb_agg(jsonb_build_object(
                           'value', (o ->> 'Value')::integer,
                           'label', o #>> '{Label,UserLocalizedLabel,Label}')
                           ORDER BY (o ->> 'Value')::integer)
                  FROM jsonb_array_elements(coalesce(a #> '{OptionSet,Options}', '[]')) o) AS options
          FROM jsonb_array_elements(d365._get_cached(format(
                   'EntityDefinitions(LogicalName=''%s'')/Attributes/Microsoft.Dynamics.CRM.MultiSelectPicklistAttributeMetadata?$select=LogicalName&$expand=OptionSet',
                   entity))) a)
    SELECT x.a ->> 'LogicalName',
           CASE WHEN x.a #>> '{AttributeTypeName,Value}' = 'MultiSelectPicklistType'
                THEN 'MultiSelectPicklist' ELSE x.a ->> 'AttributeType' END,
           coalesce((x.a ->> 'IsValidForCreate')::boolean, false),
           coalesce((x.a ->> 'IsValidForUpdate')::boolean, false),
           r.navs,
           coalesce(m.options, c.options)
      FROM attrs x
      LEFT JOIN rels r ON r.attribute = x.a ->> 'LogicalName'
      LEFT JOIN multi m ON m.attribute = x.a ->> 'LogicalName'
      LEFT JOIN d365._choice_options(entity) c ON c.attribute = x.a ->> 'LogicalName'
$$;

/*
 * The map a column's foreign key points to: a single-column foreign key
 * from tbl.col to the key column of another mapped table.
 */
CREATE FUNCTION d365._map_fk_target(tbl regclass, col name)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT t.name
      FROM pg_constraint k
      JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = k.conkey[1]
      JOIN d365.table_map t ON t.local_table = k.confrelid
      JOIN pg_attribute p ON p.attrelid = k.confrelid AND p.attnum = k.confkey[1]
     WHERE k.contype = 'f' AND k.conrelid = tbl AND cardinality(k.conkey) = 1
       AND a.attname = col AND p.attname = t.key_column
     ORDER BY t.name
     LIMIT 1
$$;

/*
 * The column map of a map as the sync uses it, one row per mapped column:
 *   kind      'value', 'lookup', 'choice' (a text column: labels),
 *             'choice_value' (an integer: values), 'multi' (text[]:
 *             labels), 'multi_value' (int[]: values)
 *   wire      the property sent and compared (<nav>@odata.bind for a lookup)
 *   read      the property read back (_<field>_value for a lookup)
 *   parent    the map a lookup points to (NULL: the column holds the
 *             Dynamics id itself), bind_set the entity set it binds to
 *   options   the choice's options [{value, label}]
 *   problem   why the pair cannot be synced (NULL when it can)
 */
CREATE FUNCTION d365._map_columns(map text,
    OUT "column" name, OUT field text, OUT direction text, OUT match boolean,
    OUT typ regtype, OUT kind text, OUT wire text, OUT read text,
    OUT parent text, OUT bind_set text, OUT options jsonb, OUT problem text)
RETURNS SETOF record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map := d365._table_map(map);
    ent record := d365._map_entity(m.entity_set);
    c record;
    a record;
    base regtype;
    elem regtype;
    pm d365.table_map;
    pent record;
    target text;
BEGIN
    FOR c IN SELECT cm.*, att.atttypid::regtype AS t, ty.typelem, ty.typbasetype
               FROM d365.column_map cm
               LEFT JOIN pg_attribute att ON att.attrelid = m.local_table
                    AND att.attname = cm."column" AND att.attnum > 0 AND NOT att.attisdropped
               LEFT JOIN pg_type ty ON ty.oid = att.atttypid
              WHERE cm.map = _map_columns.map
              ORDER BY cm."column" LOOP
        "column" := c."column"; field := c.field; direction := c.direction; match := c.match;
        typ := c.t; kind := 'value'; wire := c.field; read := c.field;
        parent := NULL; bind_set := NULL; options := NULL; problem := NULL;
        SELECT * INTO a FROM d365._map_attributes(ent.logical_name) x WHERE x.logical_name = c.field;
        base := CASE WHEN c.typbasetype <> 0 THEN c.typbasetype::regtype ELSE c.t END;
        elem := CASE WHEN c.typelem <> 0 AND c.t::text LIKE '%[]' THEN c.typelem::regtype END;
        IF c.t IS NULL THEN
            problem := format('column "%s" no longer exists in %s', c."column", m.local_table);
        ELSIF a.logical_name IS NULL THEN
            problem := format('Dynamics table %s has no attribute %s', ent.logical_name, c.field);
        ELSIF c.direction <> 'in' AND NOT (a.valid_for_create AND a.valid_for_update) THEN
            problem := format('attribute %s of %s cannot be written in Dynamics; map it with direction ''in''',
                              c.field, ent.logical_name);
        ELSIF a.attribute_type IN ('Lookup', 'Customer', 'Owner') THEN
            kind := 'lookup';
            read := '_' || c.field || '_value';
            parent := d365._map_fk_target(m.local_table, c."column");
            IF parent IS NOT NULL THEN
                SELECT * INTO pm FROM d365.table_map t WHERE t.name = parent;
                pent := d365._map_entity(pm.entity_set);
                target := pent.logical_name;
                bind_set := pm.entity_set;
            ELSIF base = 'uuid'::regtype AND jsonb_typeof(a.navs) = 'object'
                  AND (SELECT count(*) FROM jsonb_object_keys(a.navs)) = 1 THEN
                target := (SELECT k FROM jsonb_object_keys(a.navs) k);
                bind_set := d365._entity_set(target);
            ELSE
                problem := format('attribute %s is a lookup: map a column with a foreign key to the key of a mapped table%s',
                                  c.field, CASE WHEN (SELECT count(*) FROM jsonb_object_keys(coalesce(a.navs, '{}'))) = 1
                                                THEN ', or a uuid column holding the Dynamics id' ELSE '' END);
            END IF;
            IF problem IS NULL THEN
                IF a.navs ->> target IS NULL THEN
                    problem := format('attribute %s of %s cannot refer to %s (it refers to %s)',
                                      c.field, ent.logical_name, target,
                                      coalesce((SELECT string_agg(k, ', ' ORDER BY k) FROM jsonb_object_keys(a.navs) k), 'nothing'));
                ELSIF bind_set IS NULL THEN
                    problem := format('Dynamics table %s has no entity set', target);
                ELSE
                    wire := (a.navs ->> target) || '@odata.bind';
                END IF;
            END IF;
        ELSIF a.attribute_type IN ('Picklist', 'State', 'Status', 'MultiSelectPicklist') THEN
            options := coalesce(a.options, '[]');
            IF a.attribute_type = 'MultiSelectPicklist' THEN
                IF elem IN ('text'::regtype, 'character varying'::regtype) THEN
                    kind := 'multi';
                ELSIF elem IN ('smallint'::regtype, 'integer'::regtype, 'bigint'::regtype) THEN
                    kind := 'multi_value';
                ELSE
                    problem := format('attribute %s is a multi-select choice: map a text[] column (labels) or an integer[] column (values), not %s',
                                      c.field, c.t);
                END IF;
            ELSIF base IN ('text'::regtype, 'character varying'::regtype) THEN
                kind := 'choice';
            ELSIF base IN ('smallint'::regtype, 'integer'::regtype, 'bigint'::regtype) THEN
                kind := 'choice_value';
            ELSE
                problem := format('attribute %s is a choice: map a text column (labels) or an integer column (values), not %s',
                                  c.field, c.t);
            END IF;
        ELSE
            problem := d365._type_problem(a.attribute_type, format_type(base, NULL), false, c.field);
            IF problem IS NULL AND d365._json_expr('x', c.t) IS NULL THEN
                problem := format('column "%s" of type %s cannot be sent to Dynamics', c."column", c.t);
            END IF;
        END IF;
        IF problem IS NULL AND c.match AND (kind <> 'value' OR d365._match_type(c.t) IS NULL) THEN
            problem := format('a match column must hold text, a number, a boolean, a uuid or a date, not %s', c.t);
        END IF;
        RETURN NEXT;
    END LOOP;
END;
$$;

-- ---------------------------------------------------------------------------
-- Capture.  An INSERT, and an UPDATE of the key or of a column the map
-- sends, notes the row's key in d365.map_change (the next sync compares
-- each noted row with what Dynamics holds and sends only what differs):
-- C row triggers, the UPDATE one behind a WHEN clause on those columns, and
-- statement triggers that write a statement's keys (src/capture/map_capture.c,
-- 16_map_capture.sql).  DELETE and TRUNCATE (d365._map_capture(), below)
-- forget the rows' state; the Dynamics records stay (on_local_delete
-- 'unlink') or wait in d365.map_delete to be deactivated or deleted by the
-- next sync (13_map_delete.sql).  d365._map_capture() reads only the key
-- column of the statement's transition table, of a built-in type, and
-- refuses to run from any trigger but d365sync's own DELETE or TRUNCATE
-- trigger on a mapped table.
-- ---------------------------------------------------------------------------

CREATE FUNCTION d365._map_capture()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map;
    keys text[];
BEGIN
    SELECT * INTO m FROM d365.table_map t WHERE t.local_table = TG_RELID;
    IF NOT FOUND OR NOT EXISTS (
           SELECT FROM pg_trigger g
            WHERE g.tgrelid = TG_RELID AND g.tgname = TG_NAME
              AND g.tgfoid = 'd365._map_capture()'::regprocedure
              AND ((TG_OP = 'DELETE' AND g.tgname = 'd365_map_capture_delete'
                    AND g.tgoldtable = 'd365_rows')
                   OR (TG_OP = 'TRUNCATE' AND g.tgname = 'd365_map_capture_truncate'))) THEN
        RAISE EXCEPTION 'd365._map_capture() runs only as d365sync''s capture trigger of a mapped table'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF TG_OP = 'TRUNCATE' THEN
        -- the records of the rows linked as far as the sync state knows
        IF m.on_local_delete <> 'unlink' AND m.direction <> 'in' THEN
            INSERT INTO d365.map_delete (map, dynamics_id, row_key, action)
            SELECT m.name, r.dynamics_id, r.row_key, m.on_local_delete
              FROM d365.map_row r WHERE r.map = m.name AND r.dynamics_id IS NOT NULL
            ON CONFLICT ON CONSTRAINT map_delete_pkey DO NOTHING;
        END IF;
        DELETE FROM d365.map_row r WHERE r.map = m.name;
        DELETE FROM d365.map_change q WHERE q.map = m.name;
        RETURN NULL;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_attribute a
                    WHERE a.attrelid = TG_RELID AND a.attname = m.key_column
                      AND NOT a.attisdropped AND a.atttypid = ANY (d365._key_types())) THEN
        RETURN NULL;        -- broken map: d365_sync() reports it
    END IF;
    EXECUTE format('SELECT array_agg(DISTINCT r.%1$I::text) FROM d365_rows r WHERE r.%1$I IS NOT NULL',
                   m.key_column) INTO keys;
    IF keys IS NULL THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN        -- (always: checked above)
        -- on_local_delete deactivate/delete: the deleted rows' records wait
        -- in d365.map_delete until Dynamics has done it.  The record is the
        -- one d365sync linked the row to (d365.map_row), never what the
        -- deleted row's link column held: a link written past the guard
        -- must not have d365sync delete another row's record.
        IF m.on_local_delete <> 'unlink' AND m.direction <> 'in' THEN
            INSERT INTO d365.map_delete (map, dynamics_id, row_key, action)
            SELECT m.name, r.dynamics_id, r.row_key, m.on_local_delete
              FROM d365.map_row r
             WHERE r.map = m.name AND r.row_key = ANY (keys) AND r.dynamics_id IS NOT NULL
            ON CONFLICT ON CONSTRAINT map_delete_pkey DO NOTHING;
        END IF;
        DELETE FROM d365.map_row r WHERE r.map = m.name AND r.row_key = ANY (keys);
    END IF;
    -- the background worker sends it after COMMIT (with realtime on)
    PERFORM d365._worker_wake(false);
    RETURN NULL;
END;
$$;

-- The statements that (re)create the capture triggers of a mapped table and
-- the guard of its link columns (src/capture/link_guard.c: only d365sync's own link
-- writer may set them); d365._map_capture_install() runs them.  The WHEN
-- clause of d365_map_capture_update lists the key and the mapped columns
-- that are sent (direction both or out) and exist, compared by their
-- binary images (pg_catalog.record_image_eq(ROW(OLD...), ROW(NEW...)), the
-- function of the operator *=, called as a function: pg_dump prints the
-- operator between ROW()s as a row-wise comparison): a type's own equality
-- calls values equal that are sent differently, such as 'abc' and 'ABC'
-- under a case-insensitive collation or in citext, and runs no code of the
-- type's.  An UPDATE of other columns costs no trigger call.  The clause
-- follows the column map (d365._column_map_changed,
-- 16_map_capture.sql).  The row triggers' arguments are the key's attribute
-- number and name.  A trigger of an earlier form under the same name (a
-- statement trigger with a transition table) is dropped first.
CREATE FUNCTION d365._map_capture_sql(tbl regclass)
RETURNS text[]
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map;
    key_num smallint;
    changed text;
    stale text[];
BEGIN
    SELECT * INTO m FROM d365.table_map t WHERE t.local_table = tbl AND t.name <> 'contact';
    SELECT a.attnum INTO key_num FROM pg_attribute a
     WHERE a.attrelid = tbl AND a.attname = m.key_column AND a.attnum > 0 AND NOT a.attisdropped;
    IF key_num IS NULL THEN
        RAISE EXCEPTION 'the key column "%" of map "%" is not a column of %', m.key_column, m.name, tbl
            USING ERRCODE = 'undefined_column',
                  HINT = format('Unmap the table (d365_unmap_table(%L)) and map it again naming its key.', m.name);
    END IF;
    SELECT format('NOT pg_catalog.record_image_eq(ROW(%s), ROW(%s))',
                  string_agg(format('OLD.%I', a.attname), ', ' ORDER BY a.attnum),
                  string_agg(format('NEW.%I', a.attname), ', ' ORDER BY a.attnum))
      INTO changed
      FROM pg_attribute a
     WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped
       AND (a.attnum = key_num
            OR a.attname IN (SELECT c."column" FROM d365.column_map c
                              WHERE c.map = m.name AND c.direction <> 'in'));
    SELECT array_agg(format('DROP TRIGGER %I ON %s', g.tgname, tbl) ORDER BY g.tgname) INTO stale
      FROM pg_trigger g
     WHERE g.tgrelid = tbl AND g.tgname IN ('d365_map_capture_insert', 'd365_map_capture_update')
       AND g.tgfoid = 'd365._map_capture()'::regprocedure;
    RETURN coalesce(stale, '{}') || ARRAY[
        format('CREATE OR REPLACE TRIGGER d365_map_capture_insert AFTER INSERT ON %s FOR EACH ROW'
               ' EXECUTE FUNCTION d365._map_capture_row(%L, %L)', tbl, key_num, m.key_column),
        format('CREATE OR REPLACE TRIGGER d365_map_capture_update AFTER UPDATE ON %s FOR EACH ROW'
               ' WHEN (%s) EXECUTE FUNCTION d365._map_capture_row(%L, %L)',
               tbl, changed, key_num, m.key_column),
        format('CREATE OR REPLACE TRIGGER d365_map_capture_insert_flush AFTER INSERT ON %s'
               ' FOR EACH STATEMENT EXECUTE FUNCTION d365._map_capture_flush()', tbl),
        format('CREATE OR REPLACE TRIGGER d365_map_capture_update_flush AFTER UPDATE ON %s'
               ' FOR EACH STATEMENT EXECUTE FUNCTION d365._map_capture_flush()', tbl),
        format('CREATE OR REPLACE TRIGGER d365_map_capture_delete AFTER DELETE ON %s'
               ' REFERENCING OLD TABLE AS d365_rows FOR EACH STATEMENT'
               ' EXECUTE FUNCTION d365._map_capture()', tbl),
        format('CREATE OR REPLACE TRIGGER d365_map_capture_truncate AFTER TRUNCATE ON %s'
               ' FOR EACH STATEMENT EXECUTE FUNCTION d365._map_capture()', tbl),
        format('CREATE OR REPLACE TRIGGER d365_link_guard AFTER INSERT ON %s FOR EACH ROW'
               ' WHEN (NEW.dynamics365_related_id IS NOT NULL'
               '       OR NEW.dynamics365_synchronized_on IS NOT NULL)'
               ' EXECUTE FUNCTION d365._contact_link_guard()', tbl),
        format('CREATE OR REPLACE TRIGGER d365_link_guard_update'
               ' AFTER UPDATE OF dynamics365_related_id, dynamics365_synchronized_on ON %s FOR EACH ROW'
               ' WHEN ((NEW.dynamics365_related_id IS NOT NULL'
               '        AND NEW.dynamics365_related_id IS DISTINCT FROM OLD.dynamics365_related_id)'
               '       OR (NEW.dynamics365_synchronized_on IS NOT NULL'
               '        AND NEW.dynamics365_synchronized_on IS DISTINCT FROM OLD.dynamics365_synchronized_on))'
               ' EXECUTE FUNCTION d365._contact_link_guard()', tbl)];
END;
$$;
REVOKE ALL ON FUNCTION d365._map_capture_sql(regclass) FROM PUBLIC;

-- (Re)creates the capture triggers of a map: the statements of
-- d365._map_capture_sql(), run as the owner of schema d365 (the only role
-- that may use the trigger functions) once tbl is found to be a mapped
-- table that the caller owns (src/capture/capture_guard.c).
CREATE FUNCTION d365._map_capture_install(tbl regclass)
RETURNS void
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_map_capture_install'
LANGUAGE C;

CREATE FUNCTION d365.d365_map_table(
    name text, local_table regclass, entity_set text, key_column name DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key name := key_column;
    ent record;
    bad text;
BEGIN
    IF name IS NULL OR name !~ '^[a-z][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'invalid map name %', coalesce(quote_literal(name), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A map is named in lowercase letters, digits and underscores, e.g. account.';
    END IF;
    IF name = 'contact' THEN
        RAISE EXCEPTION 'the map name "contact" is the attached contact table''s'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Attach the contact table with d365_attach_contacts(); name other maps otherwise.';
    END IF;
    IF local_table IS NULL OR entity_set IS NULL THEN
        RAISE EXCEPTION 'a table map needs a local table and an entity set'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = local_table) NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table', local_table
            USING ERRCODE = 'wrong_object_type',
                  HINT = 'Map an ordinary or partitioned table, not a view or a foreign table.';
    END IF;
    IF NOT pg_has_role((SELECT c.relowner FROM pg_class c WHERE c.oid = local_table), 'USAGE') THEN
        RAISE EXCEPTION 'must be the owner of % to map it', local_table
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Map the table as its owner, or as a member of its owning role.';
    END IF;
    IF local_table = (SELECT s.contact_table FROM d365.contact_source s) THEN
        RAISE EXCEPTION '% is the attached contact table', local_table
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'The contact table is synced by the contact engine (map "contact").';
    END IF;
    -- no ALTER TABLE between the checks and the map
    EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', local_table);
    IF key IS NULL THEN
        SELECT a.attname INTO key
          FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
         WHERE i.indrelid = local_table AND i.indisprimary AND i.indnatts = 1;
        IF key IS NULL THEN
            RAISE EXCEPTION '% has no single-column primary key', local_table
                USING ERRCODE = 'invalid_table_definition',
                      HINT = 'Pass the key column: d365_map_table(name, table, entity_set, key_column).';
        END IF;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_index i JOIN pg_attribute a
                            ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                    WHERE i.indrelid = local_table AND i.indisunique AND i.indnatts = 1
                      AND i.indpred IS NULL AND a.attname = key) THEN
        RAISE EXCEPTION 'column "%" of % is not a unique key', key, local_table
            USING ERRCODE = 'invalid_table_definition',
                  HINT = 'The key column needs a PRIMARY KEY or UNIQUE constraint of its own.';
    END IF;
    PERFORM d365._check_key_type(local_table, key);
    ent := d365._map_entity(entity_set);

    IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = local_table
                      AND attname = 'dynamics365_related_id' AND NOT attisdropped) THEN
        EXECUTE format('ALTER TABLE %s ADD COLUMN dynamics365_related_id uuid', local_table);
    END IF;
    IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = local_table
                      AND attname = 'dynamics365_synchronized_on' AND NOT attisdropped) THEN
        EXECUTE format('ALTER TABLE %s ADD COLUMN dynamics365_synchronized_on timestamptz', local_table);
    END IF;
    -- link columns that were there already are of the table owner's making:
    -- d365's statements compare them, so they must be the built-in types
    SELECT string_agg(format('%s is %s', a.attname, format_type(a.atttypid, a.atttypmod)), ', ') INTO bad
      FROM pg_attribute a
     WHERE a.attrelid = local_table AND NOT a.attisdropped
       AND ((a.attname = 'dynamics365_related_id' AND a.atttypid <> 'uuid'::regtype)
            OR (a.attname = 'dynamics365_synchronized_on' AND a.atttypid <> 'timestamptz'::regtype));
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'cannot map %: %', local_table, bad
            USING ERRCODE = 'datatype_mismatch',
                  HINT = 'd365sync adds the link columns dynamics365_related_id uuid and dynamics365_synchronized_on timestamptz itself; drop or convert columns of other types.';
    END IF;
    -- one row per Dynamics record; unlinked rows are not in the index, so
    -- inserting them and updating them outside HOT costs the application
    -- nothing more (an index without the predicate, of an earlier version or
    -- the owner's, does as well)
    IF NOT d365._link_index_exists(local_table) THEN
        EXECUTE format('CREATE UNIQUE INDEX ON %s (dynamics365_related_id)'
                       ' WHERE dynamics365_related_id IS NOT NULL', local_table);
    END IF;

    INSERT INTO d365.table_map AS t (name, local_table, entity_set, key_column)
    VALUES (d365_map_table.name, local_table, entity_set, key);
    -- rows linked before (by hand, or by an earlier map) are linked by
    -- whoever maps the table: their state names their record and starts
    -- without a snapshot, so the first sync sends every mapped value.  A
    -- link that appears later without d365sync writing it is never used.
    EXECUTE format('INSERT INTO d365.map_row (map, row_key, dynamics_id)'
                   ' SELECT $1, t.%1$I::pg_catalog.text, t.dynamics365_related_id FROM %2$s t'
                   '  WHERE t.dynamics365_related_id IS NOT NULL AND t.%1$I IS NOT NULL',
                   key, local_table) USING d365_map_table.name;
    PERFORM d365._map_capture_install(local_table);
END;
$$;
COMMENT ON FUNCTION d365.d365_map_table(text, regclass, text, name) IS
    'Maps a local table to a Dataverse table (entity set): adds the link columns, their unique index and the capture triggers';

CREATE FUNCTION d365.d365_unmap_table(name text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map;
    trg name;
BEGIN
    SELECT * INTO m FROM d365.table_map t WHERE t.name = d365_unmap_table.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table map "%" does not exist', name
            USING ERRCODE = 'undefined_object';
    END IF;
    IF m.name = 'contact' THEN
        RAISE EXCEPTION 'the table map "contact" is the attached contact table'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'd365_detach_contacts() removes it.';
    END IF;
    IF EXISTS (SELECT FROM pg_class c WHERE c.oid = m.local_table) THEN
        IF NOT pg_has_role((SELECT c.relowner FROM pg_class c WHERE c.oid = m.local_table), 'USAGE') THEN
            RAISE EXCEPTION 'must be the owner of % to unmap it', m.local_table
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        FOR trg IN SELECT g.tgname FROM pg_trigger g
                    WHERE g.tgrelid = m.local_table
                      AND g.tgfoid IN ('d365._map_capture()'::regprocedure,
                                       'd365._map_capture_row()'::regprocedure,
                                       'd365._map_capture_flush()'::regprocedure,
                                       'd365._contact_link_guard()'::regprocedure) LOOP
            EXECUTE format('DROP TRIGGER %I ON %s', trg, m.local_table);
        END LOOP;
    END IF;
    DELETE FROM d365.map_change q WHERE q.map = m.name;
    DELETE FROM d365.pull_state p WHERE p.entity = 'map:' || m.name;
    DELETE FROM d365.load_state l WHERE l.entity = 'map:' || m.name;
    DELETE FROM d365.table_map t WHERE t.name = m.name;
END;
$$;
COMMENT ON FUNCTION d365.d365_unmap_table(text) IS
    'Removes a table map, its column map, sync state and capture triggers; the link columns and their values stay';

CREATE FUNCTION d365.d365_map_column(
    map text, "column" name, field text, direction text DEFAULT 'both',
    match boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map := d365._table_map(map);
    ent record;
    problem text;
BEGIN
    IF NOT pg_has_role((SELECT c.relowner FROM pg_class c WHERE c.oid = m.local_table), 'USAGE') THEN
        RAISE EXCEPTION 'must be the owner of % to map its columns', m.local_table
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF "column" IN (m.key_column, 'dynamics365_related_id', 'dynamics365_synchronized_on') THEN
        RAISE EXCEPTION 'column "%" cannot be mapped', "column"
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'The key and the link columns belong to the map itself.';
    END IF;
    IF direction IS NULL OR direction NOT IN ('both', 'in', 'out') THEN
        RAISE EXCEPTION 'direction must be both, in or out'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF m.name = 'contact' THEN
        -- the contact table's column map is its field map
        PERFORM d365._contact_map_column("column", field, direction, match);
        RETURN;
    END IF;
    ent := d365._map_entity(m.entity_set);
    INSERT INTO d365.column_map AS c (map, "column", field, direction, match)
    VALUES (m.name, "column", field, direction, coalesce(match, false))
    ON CONFLICT ON CONSTRAINT column_map_pkey DO UPDATE
       SET field = EXCLUDED.field, direction = EXCLUDED.direction, match = EXCLUDED.match;
    SELECT x.problem INTO problem FROM d365._map_columns(m.name) x WHERE x."column" = d365_map_column."column";
    IF problem LIKE 'Dynamics table % has no attribute %' THEN
        -- a field added in Dynamics since the metadata was read
        PERFORM d365._map_metadata_refresh(ent.logical_name);
        SELECT x.problem INTO problem FROM d365._map_columns(m.name) x WHERE x."column" = d365_map_column."column";
    END IF;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'cannot map column "%" to %: %', "column", field, problem
            USING ERRCODE = 'datatype_mismatch',
                  HINT = format('d365_describe(%L) lists the attributes of %s.', ent.logical_name, ent.logical_name);
    END IF;
    PERFORM d365._map_lookup_readable(x.parent, d365_map_column."column")
       FROM d365._map_columns(m.name) x
      WHERE x."column" = d365_map_column."column" AND x.parent IS NOT NULL;
    -- the next sync compares every linked row with what it sent
    UPDATE d365.map_row r SET synced = NULL WHERE r.map = m.name AND r.synced IS NOT NULL;
END;
$$;
COMMENT ON FUNCTION d365.d365_map_column(text, name, text, text, boolean) IS
    'Maps a column of a table map to a Dataverse field (checked against Dynamics metadata): lookups, choices and multi-select choices included';

-- ---------------------------------------------------------------------------
-- Statements run as a mapped table's owner (src/privilege/map_owner.c), as
-- d365._owner_sql does for the contact table:
--   links  $1 text[] keys, $2 uuid[] ids, $3 uuid[] expected current links
--          (NULL: still unlinked); returns the keys changed
--   apply  $1 jsonb {column: value}, $2 text key: the update
--   remove $1 text key: deletes the row if it is unlinked; returns the key
-- ---------------------------------------------------------------------------

CREATE FUNCTION d365._map_owner_sql(map text, op text, only_columns name[],
    OUT sql text, OUT tbl regclass, OUT columns name[])
RETURNS record
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map := d365._table_map(map);
    key_type text;
    col name;
BEGIN
    tbl := m.local_table;
    SELECT format_type(a.atttypid, a.atttypmod) INTO key_type
      FROM pg_attribute a WHERE a.attrelid = tbl AND a.attname = m.key_column;
    IF op = 'links' THEN
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
                      tbl, m.key_column, key_type);
    ELSIF op = 'apply' THEN
        columns := coalesce(only_columns, '{}');
        IF columns = '{}' THEN
            RAISE EXCEPTION 'no column to write'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        FOREACH col IN ARRAY columns LOOP
            IF col IS NULL OR NOT EXISTS (SELECT FROM d365.column_map c
                                           WHERE c.map = m.name AND c."column" = col
                                             AND c.direction <> 'out') THEN
                RAISE EXCEPTION 'column "%" of % is not mapped for incoming changes', col, tbl
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
        END LOOP;
        sql := format('UPDATE %1$s t SET (%2$s) = (SELECT %3$s FROM pg_catalog.jsonb_to_record($1) AS r(%6$s))'
                      ' WHERE t.%4$I OPERATOR(pg_catalog.=) $2::%5$s',
                      tbl,
                      (SELECT string_agg(format('%I', c), ', ') FROM unnest(columns) c),
                      (SELECT string_agg(format('r.%I', c), ', ') FROM unnest(columns) c),
                      m.key_column, key_type, d365._column_defs(tbl, columns));
    ELSIF op = 'remove' THEN
        -- $1 text key: the row, only while it is unlinked (a record deleted
        -- in Dynamics, on_remote_delete 'delete'); returns the key deleted
        columns := NULL;
        sql := format('DELETE FROM %1$s t WHERE t.%2$I OPERATOR(pg_catalog.=) $1::%3$s'
                      '   AND t.dynamics365_related_id IS NULL'
                      ' RETURNING t.%2$I::pg_catalog.text',
                      tbl, m.key_column, key_type);
    ELSE
        RAISE EXCEPTION 'unknown table-owner operation "%"', op
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END;
$$;

CREATE FUNCTION d365._map_own_write(tbl regclass)
RETURNS boolean
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_map_own_write'
LANGUAGE C VOLATILE STRICT;

CREATE FUNCTION d365._map_set_links(map text, keys text[], ids uuid[], expect uuid[])
RETURNS text[]
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_map_set_links'
LANGUAGE C VOLATILE;

CREATE FUNCTION d365._map_apply(map text, vals jsonb, row_key text)
RETURNS void
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_map_apply'
LANGUAGE C VOLATILE;

-- ---------------------------------------------------------------------------
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
-- Deletes both ways for table maps.  A row deleted locally from a map whose
-- on_local_delete is 'deactivate' or 'delete' leaves its Dynamics id in
-- d365.map_delete (the capture trigger, 11_table_maps.sql) until the next
-- sync has deactivated or deleted the record (d365._map_work_sql and
-- d365._map_record, 12_map_sync.sql); d365.pending_delete shows them.  A
-- record deleted in Dynamics deletes its local row when on_remote_delete is
-- 'delete' (d365._map_remove: as the table's owner, src/privilege/map_owner.c).  See
-- docs/table-maps.md.
-- ---------------------------------------------------------------------------

CREATE TABLE d365.map_delete (
    map              text NOT NULL REFERENCES d365.table_map ON DELETE CASCADE,
    dynamics_id      uuid NOT NULL,
    row_key          text NOT NULL,
    action           text NOT NULL
                     CONSTRAINT map_delete_action_check CHECK (action IN ('deactivate', 'delete')),
    deleted_at       timestamptz NOT NULL DEFAULT now(),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    last_attempt_at  timestamptz,
    last_status      integer,
    last_error_code  text,
    last_error       text,
    CONSTRAINT map_delete_pkey PRIMARY KEY (map, dynamics_id)
);
COMMENT ON TABLE d365.map_delete IS
    'Dynamics records of rows deleted locally that the next sync deactivates or deletes (on_local_delete)';
SELECT pg_catalog.pg_extension_config_dump('d365.map_delete', '');

CREATE VIEW d365.pending_delete AS
SELECT d.map, d.row_key, d.dynamics_id, d.action, d.deleted_at, d.attempts,
       d.next_attempt_at, d.last_attempt_at, d.last_status, d.last_error
  FROM d365.map_delete d;
COMMENT ON VIEW d365.pending_delete IS
    'Rows deleted locally whose Dynamics record is not deactivated or deleted yet: the Dynamics id, the action, the last failure';

CREATE FUNCTION d365._map_remove(map text, row_key text)
RETURNS boolean
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_map_remove'
LANGUAGE C VOLATILE;

/*
 * The requests of the pending deletes of a map, as rows of its work query
 * (d365._map_work_sql): a DELETE, or a PATCH of statecode 1 / statuscode 2
 * (inactive); 404 (the record is gone already) counts as done.
 */
CREATE FUNCTION d365._map_delete_work_sql(map text, entity_set text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format($q$
        SELECT 'delete:' || d.dynamics_id::text AS item_key,
               jsonb_build_array(CASE WHEN d.action = 'delete'
                   THEN jsonb_build_object('method', 'DELETE',
                                           'path', %2$L || '(' || d.dynamics_id || ')',
                                           'headers', '[]'::jsonb, 'ok', '[404]'::jsonb)
                   ELSE jsonb_build_object('method', 'PATCH',
                                           'path', %2$L || '(' || d.dynamics_id || ')',
                                           'body', '{"statecode":1,"statuscode":2}',
                                           'headers', '["If-Match: *"]'::jsonb,
                                           'ok', '[404]'::jsonb) END)::text AS requests,
               jsonb_build_object('map', %1$L, 'action', 'remote_' || d.action,
                                  'id', d.dynamics_id, 'key', d.row_key)::text AS context
          FROM d365.map_delete d
         WHERE d.map = %1$L AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= now())
    $q$, map, entity_set)
$$;

REVOKE ALL ON d365.map_delete, d365.pending_delete FROM PUBLIC;
REVOKE ALL ON FUNCTION d365._map_remove(text, text), d365._map_delete_work_sql(text, text)
    FROM PUBLIC;

/*
 * on_remote_delete 'delete': the row of a record deleted in Dynamics (and
 * unlinked already) is deleted as the table's owner.  A row that cannot be
 * deleted (a foreign key of another table, the owner's trigger) stays,
 * unlinked, with a WARNING and the error in its sync state; returns false
 * then.
 */
CREATE FUNCTION d365._map_remove_row(map text, row_key text)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    msg text;
    code text;
BEGIN
    PERFORM d365._map_remove(map, row_key);
    RETURN true;
EXCEPTION WHEN data_exception OR integrity_constraint_violation OR raise_exception
               OR insufficient_privilege OR object_not_in_prerequisite_state THEN
    GET STACKED DIAGNOSTICS code = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
    RAISE WARNING 'row % of map "%" was deleted in Dynamics 365 but could not be deleted here: %',
                  row_key, map, msg
        USING ERRCODE = '01000';
    UPDATE d365.map_row s
       SET last_error_code = code,
           last_error = left('deleted in Dynamics 365, unlinked; the local delete failed: ' || msg, 2000)
     WHERE s.map = _map_remove_row.map AND s.row_key = _map_remove_row.row_key;
    RETURN false;
END;
$$;
REVOKE ALL ON FUNCTION d365._map_remove_row(text, text) FROM PUBLIC;
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
-- The initial load of a table map (d365.table_map.load): the first pull of
-- such a map reads every record of its Dataverse table, links the records
-- its match columns find to the existing rows and inserts the others as
-- new rows, as the table's owner (d365._map_insert, src/privilege/map_owner.c).  The
-- reading is the pipeline's incoming reader (src/pipeline/pipeline_pull.c), which
-- keeps its position in d365.load_state so that a load committed page by
-- page (CALL d365_load()) goes on where it stopped.  A lookup whose parent
-- record is not linked to a local row yet waits in d365.map_lookup_pending
-- until it is.  See docs/table-maps.md.
-- ---------------------------------------------------------------------------

-- Where each load stands: the change-tracking link taken before its first
-- page (the pull continues from it once the load is done), the next page
-- to read, how far it got.
CREATE TABLE d365.load_state (
    entity       text PRIMARY KEY,
    delta_link   text,
    next_link    text,
    total        bigint,
    pages        integer NOT NULL DEFAULT 0,
    records      bigint NOT NULL DEFAULT 0,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    last_error   text
);
COMMENT ON TABLE d365.load_state IS
    'Initial loads of table maps: the delta link taken before the first page, the next page, the records read';
SELECT pg_catalog.pg_extension_config_dump('d365.load_state', '');

-- Lookups of loaded rows whose parent record is linked to no local row
-- yet: resolved when it is (d365._map_resolve_lookups).
CREATE TABLE d365.map_lookup_pending (
    map          text NOT NULL REFERENCES d365.table_map ON DELETE CASCADE,
    row_key      text NOT NULL,
    "column"     name NOT NULL,
    dynamics_id  uuid NOT NULL,
    PRIMARY KEY (map, row_key, "column")
);
COMMENT ON TABLE d365.map_lookup_pending IS
    'Lookups of rows loaded from Dynamics whose parent record is not linked to a local row yet';
SELECT pg_catalog.pg_extension_config_dump('d365.map_lookup_pending', '');

/*
 * Why the rows of a map cannot be loaded (NULL when they can): a new row's
 * key comes from the key column's default (or identity), or is the
 * Dynamics id when the key column is a uuid.
 */
CREATE FUNCTION d365._map_load_problem(tbl regclass, key_column name)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('key column "%s" of %s has no default and is not a uuid: a loaded row would have no key',
                  a.attname, tbl)
      FROM pg_attribute a
     WHERE a.attrelid = tbl AND a.attname = key_column AND a.attnum > 0 AND NOT a.attisdropped
       AND NOT a.atthasdef AND a.attidentity = '' AND a.atttypid <> 'uuid'::regtype
$$;

-- load = true is refused at once for a table whose new rows could not get
-- a key.
CREATE FUNCTION d365._map_load_check()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    problem text;
BEGIN
    -- (the map "contact" is the contact engine's: d365_load() leaves it)
    IF NEW.load AND NEW.name <> 'contact' THEN
        problem := d365._map_load_problem(NEW.local_table, NEW.key_column);
        IF problem IS NOT NULL THEN
            RAISE EXCEPTION 'map "%" cannot load its Dynamics rows: %', NEW.name, problem
                USING ERRCODE = 'invalid_table_definition',
                      HINT = 'Give the key column a default (a sequence, an identity column), or use a uuid key (it then holds the Dynamics id).';
        END IF;
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER map_load_check BEFORE INSERT OR UPDATE OF load, key_column ON d365.table_map
    FOR EACH ROW EXECUTE FUNCTION d365._map_load_check();

/*
 * The statement that inserts loaded rows into a map's table, run as its
 * owner (src/privilege/map_owner.c, op "insert"): $1 jsonb, an array of objects
 * {column: value, "@dynamics_id": id}; the key from its default, or the
 * Dynamics id (a uuid key without default).  Sets the link columns (as
 * d365sync's link writer).  Returns [[key, id], ...] of the rows inserted.
 * columns: the columns it writes, whose INSERT right the caller must hold.
 */
CREATE FUNCTION d365._map_insert_sql(map text,
    OUT sql text, OUT tbl regclass, OUT columns name[])
RETURNS record
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map := d365._table_map(map);
    problem text := d365._map_load_problem(m.local_table, m.key_column);
    cols name[];
    id_key boolean;
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'map "%" cannot load its Dynamics rows: %', m.name, problem
            USING ERRCODE = 'invalid_table_definition',
                  HINT = 'Give the key column a default (a sequence, an identity column), or use a uuid key (it then holds the Dynamics id).';
    END IF;
    tbl := m.local_table;
    SELECT array_agg(c."column" ORDER BY c."column") INTO cols
      FROM d365.column_map c
     WHERE c.map = m.name AND c.direction <> 'out' AND c."column" <> m.key_column;
    cols := coalesce(cols, '{}');
    SELECT NOT a.atthasdef AND a.attidentity = '' INTO id_key
      FROM pg_attribute a WHERE a.attrelid = tbl AND a.attname = m.key_column;
    columns := cols || '{dynamics365_related_id,dynamics365_synchronized_on}'::name[]
               || CASE WHEN id_key THEN ARRAY[m.key_column] ELSE '{}'::name[] END;
    sql := format('WITH i AS (INSERT INTO %1$s AS t (%2$s dynamics365_related_id, dynamics365_synchronized_on)'
                  ' SELECT %3$s r."@dynamics_id", pg_catalog.now()'
                  '   FROM pg_catalog.jsonb_to_recordset($1) AS r(%4$s "@dynamics_id" pg_catalog.uuid)'
                  ' RETURNING t.%5$I::pg_catalog.text AS k, t.dynamics365_related_id AS id)'
                  ' SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_array(i.k, i.id)) FROM i',
                  tbl,
                  (SELECT string_agg(format('%I, ', c), '') FROM unnest(cols) c)
                      || CASE WHEN id_key THEN format('%I, ', m.key_column) ELSE '' END,
                  (SELECT string_agg(format('r.%I, ', c), '') FROM unnest(cols) c)
                      || CASE WHEN id_key THEN 'r."@dynamics_id", ' ELSE '' END,
                  coalesce(d365._column_defs(tbl, cols) || ', ', ''),
                  m.key_column);
END;
$$;

CREATE FUNCTION d365._map_insert(map text, rows jsonb)
RETURNS jsonb
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_map_insert'
LANGUAGE C VOLATILE;

/*
 * The conversion of incoming records of a map, for a whole page at once:
 * a query over $1 jsonb[] (the records) and $2 uuid[] (their ids) giving,
 * per record, i (its position), id, vals ({column: local value}), wires
 * ({wire property: value} to remember as synced), pending ({column:
 * Dynamics id} of lookups whose parent record is linked to no local row
 * yet), problem (why the record cannot be taken, or NULL) and etag (its
 * @odata.etag when it is one, as d365._etag says).  Built-in
 * functions only: no code of the application's making runs.
 */
CREATE FUNCTION d365._map_in_sql(map text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    col record;
    pm d365.table_map;
    v text;
    g text;
    loc text;
    wire text;
    vals text := '''{}''::pg_catalog.jsonb';
    wires text := '''{}''::pg_catalog.jsonb';
    pending text := '''{}''::pg_catalog.jsonb';
    problems text := 'NULL::pg_catalog.text';
    joins text := '';
    n integer := 0;
    ids text;
    -- the pairs of vals and wires, built by one jsonb_build_object per
    -- 40 pairs (not one || per column: each || copies the object)
    val_pairs text[] := '{}';
    wire_names text[] := '{}';
    wire_exprs text[] := '{}';
    w integer;
BEGIN
    FOR col IN SELECT * FROM d365._map_columns(map) x
                WHERE x.direction <> 'out' AND x.problem IS NULL LOOP
        v := format('(r.rec OPERATOR(pg_catalog.->) %L)', col.read);
        g := format('(r.rec OPERATOR(pg_catalog.->>) %L)', col.read);
        wire := v;
        CASE col.kind
        WHEN 'lookup' THEN
            problems := format('pg_catalog.concat_ws(''; '', %s, CASE WHEN %s IS NOT NULL AND NOT %s OPERATOR(pg_catalog.~) ''^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'''
                               ' THEN pg_catalog.format(''field %%s: %%s is not a GUID'', %L, pg_catalog.left(%s, 100)) END)',
                               problems, g, g, col.read, g);
            wire := format('CASE WHEN %1$s IS NULL THEN ''null''::pg_catalog.jsonb'
                           ' WHEN %1$s OPERATOR(pg_catalog.~) ''^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'' THEN pg_catalog.to_jsonb(%2$L OPERATOR(pg_catalog.||) pg_catalog.lower(%1$s) OPERATOR(pg_catalog.||) '')'') END',
                           g, '/' || col.bind_set || '(');
            IF col.parent IS NULL THEN
                loc := format('CASE WHEN %1$s OPERATOR(pg_catalog.~) ''^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'' THEN %2$s END', g, v);
            ELSE
                n := n + 1;
                SELECT * INTO pm FROM d365.table_map t WHERE t.name = col.parent;
                -- the parent row d365sync linked to that record
                joins := joins || format(
                    ' LEFT JOIN LATERAL (SELECT pg_catalog.to_jsonb(p.%1$I) AS k FROM %2$s p'
                    '   JOIN d365.map_row pr ON pr.map OPERATOR(pg_catalog.=) %3$L'
                    '    AND pr.row_key OPERATOR(pg_catalog.=) p.%1$I::pg_catalog.text'
                    '    AND pr.dynamics_id OPERATOR(pg_catalog.=) p.dynamics365_related_id'
                    '  WHERE %4$s OPERATOR(pg_catalog.~) ''^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'''
                    '    AND p.dynamics365_related_id OPERATOR(pg_catalog.=) (CASE WHEN %4$s OPERATOR(pg_catalog.~) ''^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'' THEN %4$s END)::pg_catalog.uuid'
                    '  LIMIT 1) l%5$s ON true',
                    pm.key_column, pm.local_table, pm.name, g, n);
                loc := format('l%s.k', n);
                wire := format('CASE WHEN %1$s IS NULL THEN ''null''::pg_catalog.jsonb WHEN l%3$s.k IS NOT NULL'
                               ' THEN pg_catalog.to_jsonb(%2$L OPERATOR(pg_catalog.||) pg_catalog.lower(%1$s) OPERATOR(pg_catalog.||) '')'') END',
                               g, '/' || col.bind_set || '(', n);
                pending := format('%s OPERATOR(pg_catalog.||) CASE WHEN %s OPERATOR(pg_catalog.~) ''^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'' AND l%s.k IS NULL'
                                  ' THEN pg_catalog.jsonb_build_object(%L, %s) ELSE ''{}''::pg_catalog.jsonb END',
                                  pending, g, n, col."column", g);
            END IF;
        WHEN 'choice' THEN
            loc := format('(SELECT pg_catalog.to_jsonb(o OPERATOR(pg_catalog.->>) ''label'')'
                          '   FROM pg_catalog.jsonb_array_elements(%L::pg_catalog.jsonb) o'
                          '  WHERE o OPERATOR(pg_catalog.->) ''value'' OPERATOR(pg_catalog.=) %s LIMIT 1)',
                          col.options, v);
            problems := format('pg_catalog.concat_ws(''; '', %s, CASE WHEN %s IS NOT NULL AND %s IS NULL'
                               ' THEN pg_catalog.format(''field %%s: %%s is not an option of the choice'', %L, pg_catalog.left(%s, 100)) END)',
                               problems, g, loc, col.field, g);
        WHEN 'multi', 'multi_value' THEN
            ids := format('ARRAY(SELECT DISTINCT pg_catalog.btrim(x)::pg_catalog.int4'
                          '  FROM pg_catalog.unnest(pg_catalog.string_to_array(%s, '','')) x'
                          ' WHERE pg_catalog.btrim(x) ~ ''^-?[0-9]{1,9}$'' ORDER BY 1)', g);
            wire := format('CASE WHEN %s IS NULL THEN ''null''::pg_catalog.jsonb'
                           ' ELSE pg_catalog.to_jsonb(pg_catalog.array_to_string(%s, '','')) END', g, ids);
            IF col.kind = 'multi_value' THEN
                loc := format('CASE WHEN %s IS NOT NULL THEN pg_catalog.to_jsonb(%s) END', g, ids);
            ELSE
                loc := format('CASE WHEN %s IS NOT NULL THEN coalesce((SELECT pg_catalog.jsonb_agg(o OPERATOR(pg_catalog.->) ''label'''
                              '   ORDER BY (o OPERATOR(pg_catalog.->>) ''value'')::pg_catalog.int4)'
                              '   FROM pg_catalog.jsonb_array_elements(%L::pg_catalog.jsonb) o'
                              '  WHERE (o OPERATOR(pg_catalog.->>) ''value'')::pg_catalog.int4 OPERATOR(pg_catalog.=) ANY (%s)), ''[]'') END',
                              g, col.options, ids);
                problems := format('pg_catalog.concat_ws(''; '', %s, CASE WHEN %s IS NOT NULL AND'
                                   ' pg_catalog.jsonb_array_length(%s) OPERATOR(pg_catalog.<>) pg_catalog.cardinality(%s)'
                                   ' THEN pg_catalog.format(''field %%s: %%s holds a value that is not an option of the choice'', %L, pg_catalog.left(%s, 100)) END)',
                                   problems, g, loc, ids, col.field, g);
            END IF;
        ELSE
            loc := v;
        END CASE;
        val_pairs := val_pairs || format('%L::pg_catalog.text, %s', col."column", loc);
        -- a field read for two columns is one wire: the value of the last
        -- of them that has one
        w := array_position(wire_names, col.wire::text);
        IF w IS NULL THEN
            wire_names := wire_names || col.wire::text;
            wire_exprs := wire_exprs || wire;
        ELSE
            wire_exprs[w] := format('coalesce(%s, %s)', wire, wire_exprs[w]);
        END IF;
    END LOOP;
    IF cardinality(val_pairs) > 0 THEN
        vals := (SELECT string_agg(format('pg_catalog.jsonb_build_object(%s)',
                                          array_to_string(val_pairs[s.n:s.n + 39], ', ')),
                                   ' OPERATOR(pg_catalog.||) ' ORDER BY s.n)
                   FROM generate_series(1, cardinality(val_pairs), 40) s(n));
        wires := (SELECT string_agg(format('pg_catalog.jsonb_build_object(%s)',
                                           (SELECT string_agg(format('%L::pg_catalog.text, %s', wire_names[y.j], wire_exprs[y.j]), ', ' ORDER BY y.j)
                                              FROM generate_series(s.n, least(s.n + 39, cardinality(wire_names))) AS y(j))),
                                    ' OPERATOR(pg_catalog.||) ' ORDER BY s.n)
                    FROM generate_series(1, cardinality(wire_names), 40) s(n));
        -- a wire whose value is SQL NULL (the field is not in the record)
        -- is left out, as before; one that is JSON null is kept
        wires := format('CASE WHEN %s THEN (%s) OPERATOR(pg_catalog.-) ARRAY[%s] ELSE %s END',
                        (SELECT string_agg(format('(%s) IS NULL', x.e), ' OR ' ORDER BY x.j)
                           FROM unnest(wire_exprs) WITH ORDINALITY AS x(e, j)),
                        wires,
                        (SELECT string_agg(format('CASE WHEN (%s) IS NULL THEN %L::pg_catalog.text END', x.e, wire_names[x.j]), ', ' ORDER BY x.j)
                           FROM unnest(wire_exprs) WITH ORDINALITY AS x(e, j)),
                        wires);
    END IF;
    RETURN format('SELECT r.i::pg_catalog.int4 AS i, r.id, %s AS vals, %s AS wires, %s AS pending,'
                  '       NULLIF(%s, '''') AS problem,'
                  -- (the test of d365._etag, without its {1,255}: a bounded
                  -- repetition makes the regular expression slow)
                  '       CASE WHEN (r.rec OPERATOR(pg_catalog.->>) ''@odata.etag'') OPERATOR(pg_catalog.~) ''^(W/)?"[!#-~]+"$'''
                  '                 AND pg_catalog.length(r.rec OPERATOR(pg_catalog.->>) ''@odata.etag'')'
                  '                     OPERATOR(pg_catalog.<=) CASE WHEN (r.rec OPERATOR(pg_catalog.->>) ''@odata.etag'') LIKE ''W/%%'' THEN 259 ELSE 257 END'
                  '            THEN r.rec OPERATOR(pg_catalog.->>) ''@odata.etag'' END AS etag'
                  '  FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.jsonb[]), pg_catalog.unnest($2::pg_catalog.uuid[]))'
                  '       WITH ORDINALITY AS r(rec, id, i)%s'
                  ' ORDER BY r.i',
                  vals, wires, pending, problems, joins);
END;
$$;

/*
 * The unlinked local rows each record's match values find ($1 jsonb[]: the
 * records' converted values {column: value}): text compared without case,
 * as Dataverse does, other types as JSON values.  NULL when the map has no
 * match column.
 */
CREATE FUNCTION d365._map_load_match_sql(map text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map := d365._table_map(map);
    cond text;
BEGIN
    -- no match column: no need to read the map's columns (each page of a
    -- load asks)
    IF NOT EXISTS (SELECT FROM d365.column_map c
                    WHERE c.map = m.name AND c.match AND c.direction <> 'out') THEN
        RETURN NULL;
    END IF;
    SELECT string_agg(CASE WHEN x.typ IN ('text'::regtype, 'character varying'::regtype, 'character'::regtype)
                           THEN format('pg_catalog.lower(c.%1$I::pg_catalog.text) OPERATOR(pg_catalog.=) pg_catalog.lower(v.vals OPERATOR(pg_catalog.->>) %2$L)',
                                       x."column", x."column")
                           -- the JSON of the column's value as d365._json_expr
                           -- writes it: built-in conversions only (to_jsonb
                           -- of an enum or another type of the table owner's
                           -- would call the owner's cast to json)
                           ELSE format('coalesce(%1$s OPERATOR(pg_catalog.=) (v.vals OPERATOR(pg_catalog.->) %2$L), false)',
                                       coalesce(d365._json_expr(format('c.%I', x."column"), x.typ), 'NULL::pg_catalog.jsonb'),
                                       x."column") END, ' AND ' ORDER BY x."column")
      INTO cond
      FROM d365._map_columns(m.name) x
     WHERE x.match AND x.problem IS NULL AND x.direction <> 'out';
    IF cond IS NULL THEN
        RETURN NULL;
    END IF;
    RETURN format('SELECT v.i::pg_catalog.int4, pg_catalog.array_agg(c.%1$I::pg_catalog.text ORDER BY c.%1$I)'
                  '  FROM pg_catalog.unnest($1::pg_catalog.jsonb[]) WITH ORDINALITY AS v(vals, i)'
                  '  JOIN %2$s c ON c.dynamics365_related_id IS NULL AND c.%1$I IS NOT NULL AND %3$s'
                  ' GROUP BY v.i',
                  m.key_column, m.local_table, cond);
END;
$$;

/*
 * The record stage of a map's load, and of its later pulls (load = true):
 * one page of records.  A record linked to a local row already (and a
 * deleted one) goes to d365._map_pull_record as any change.  The others are
 * converted at once (d365._map_in_sql); one whose match values find one
 * unlinked local row is linked to it and merged field by field (a value
 * one side lacks is taken from the other; different values on both sides
 * are a conflict, resolved by the map's policy and recorded in
 * d365.conflict), the rest are inserted as the table's owner
 * (d365._map_insert), the whole page in one statement, record by record
 * when that fails.  A
 * record that does not fit fails alone: a WARNING, counted as failed, the
 * last such error in d365.load_state.last_error.
 */
CREATE FUNCTION d365._map_load_record(page json, map text,
    OUT created integer, OUT updated integer, OUT unchanged integer,
    OUT failed integer, OUT unlinked integer)
RETURNS record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map := d365._table_map(map);
    ent record := d365._map_entity(m.entity_set);
    recs jsonb[] := '{}';
    e json;
    old jsonb[] := '{}';
    fresh jsonb[] := '{}';
    ids uuid[] := '{}';
    id uuid;
    msg text;
    c_ids uuid[];
    c_vals jsonb[];
    c_wires jsonb[];
    c_pending jsonb[];
    c_problems text[];
    c_etags text[];
    kinds text[];
    hit_keys text[];
    hitmap jsonb;
    nbad integer;
    bad text[];
    match_sql text;
    ninsert integer;
    insert_rows jsonb;
    out_body text;
    in_cols jsonb;
    cur jsonb;
    apply_vals jsonb;
    conflicts jsonb;
    done jsonb;
    one jsonb;
    k text;
    counts record;
    problems text[] := '{}';
BEGIN
    created := 0; updated := 0; unchanged := 0; failed := 0; unlinked := 0;
    IF row_security_active(m.local_table) THEN
        RAISE EXCEPTION 'row-level security of % applies to role "%"', m.local_table, current_user
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'Its policies are code of the table''s owner: d365sync does not read the table as a role they bind.',
                  HINT = 'Run the pull as the table''s owner, or as a role with BYPASSRLS.';
    END IF;
    -- the job reads the table as the job role: for a caller that may read it
    PERFORM d365._caller_reads(m.local_table);
    IF page IS NULL OR json_typeof(page) <> 'array' THEN
        RAISE EXCEPTION 'a page of records is not a JSON array'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- the whole page at once; record by record when a record holds U+0000
    BEGIN
        recs := ARRAY(SELECT x FROM jsonb_array_elements(page::jsonb) x);
    EXCEPTION WHEN untranslatable_character OR invalid_text_representation THEN
        recs := '{}';
        FOR e IN SELECT json_array_elements(page) LOOP
            BEGIN
                recs := recs || e::jsonb;
            EXCEPTION WHEN untranslatable_character OR invalid_text_representation THEN
                GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT;
                problems := problems || ('a record was not loaded: ' || msg);
                failed := failed + 1;
            END;
        END LOOP;
    END;

    -- linked already, or deleted: a change as any other; the others are
    -- new (a record without a GUID fails)
    EXECUTE format('WITH u AS MATERIALIZED ('
                   -- a GUID: 8-4-4-4-12 hex digits (five groups of hex
                   -- digits, 36 characters, the hyphens in their places:
                   -- a regular expression with counted repeats is slow)
                   '  SELECT u.i, u.r, CASE WHEN (u.r OPERATOR(pg_catalog.->>) $3) OPERATOR(pg_catalog.~) ''^[0-9a-fA-F]+-[0-9a-fA-F]+-[0-9a-fA-F]+-[0-9a-fA-F]+-[0-9a-fA-F]+$'''
                   '                         AND pg_catalog.length(u.r OPERATOR(pg_catalog.->>) $3) OPERATOR(pg_catalog.=) 36'
                   '                         AND pg_catalog.substr(u.r OPERATOR(pg_catalog.->>) $3, 9, 1) OPERATOR(pg_catalog.=) ''-'''
                   '                         AND pg_catalog.substr(u.r OPERATOR(pg_catalog.->>) $3, 14, 1) OPERATOR(pg_catalog.=) ''-'''
                   '                         AND pg_catalog.substr(u.r OPERATOR(pg_catalog.->>) $3, 19, 1) OPERATOR(pg_catalog.=) ''-'''
                   '                         AND pg_catalog.substr(u.r OPERATOR(pg_catalog.->>) $3, 24, 1) OPERATOR(pg_catalog.=) ''-'''
                   '                        THEN (u.r OPERATOR(pg_catalog.->>) $3)::pg_catalog.uuid END AS id,'
                   '         pg_catalog.jsonb_typeof(u.r) OPERATOR(pg_catalog.<>) ''object'''
                   '         OR coalesce((u.r OPERATOR(pg_catalog.->>) ''@odata.context'') LIKE ''%%$deletedEntity'', false) AS special'
                   '    FROM pg_catalog.unnest($1) WITH ORDINALITY AS u(r, i)),'
                   -- each id looked up in the link column's index and in
                   -- d365.map_row's (not a hash of the whole table, which
                   -- grows with each page a load adds)
                   ' v AS MATERIALIZED ('
                   '  SELECT u.*, u.special OR lc.hit IS NOT NULL OR ls.hit IS NOT NULL AS old'
                   '    FROM u'
                   '    LEFT JOIN LATERAL (SELECT 1 AS hit FROM %1$s c'
                   '                        WHERE c.dynamics365_related_id OPERATOR(pg_catalog.=) u.id LIMIT 1) lc ON true'
                   '    LEFT JOIN LATERAL (SELECT 1 AS hit FROM d365.map_row s WHERE s.map OPERATOR(pg_catalog.=) $2'
                   '                          AND s.dynamics_id OPERATOR(pg_catalog.=) u.id LIMIT 1) ls ON true)'
                   ' SELECT pg_catalog.array_agg(v.r ORDER BY v.i) FILTER (WHERE v.old),'
                   '        pg_catalog.array_agg(v.r ORDER BY v.i) FILTER (WHERE NOT v.old AND v.id IS NOT NULL),'
                   '        pg_catalog.array_agg(v.id ORDER BY v.i) FILTER (WHERE NOT v.old AND v.id IS NOT NULL),'
                   '        pg_catalog.count(*) FILTER (WHERE NOT v.old AND v.id IS NULL)::pg_catalog.int4'
                   '   FROM v', m.local_table)
       INTO old, fresh, ids, nbad USING recs, m.name, ent.primary_id;
    old := coalesce(old, '{}'); fresh := coalesce(fresh, '{}'); ids := coalesce(ids, '{}');
    IF nbad > 0 THEN
        failed := failed + nbad;
        problems := problems || format('%s record(s) without a GUID in %s were not loaded', nbad, ent.primary_id);
    END IF;

    IF cardinality(fresh) > 0 THEN
        -- converted at once, into arrays by position (the same record twice
        -- in a page: the first)
        EXECUTE format('SELECT pg_catalog.array_agg(c.id ORDER BY c.i), pg_catalog.array_agg(c.vals ORDER BY c.i),'
                       '       pg_catalog.array_agg(c.wires ORDER BY c.i), pg_catalog.array_agg(c.pending ORDER BY c.i),'
                       '       pg_catalog.array_agg(c.problem ORDER BY c.i), pg_catalog.array_agg(c.etag ORDER BY c.i)'
                       '  FROM (SELECT DISTINCT ON (x.id) x.* FROM (%s) x ORDER BY x.id, x.i) c',
                       d365._map_in_sql(m.name))
           INTO c_ids, c_vals, c_wires, c_pending, c_problems, c_etags USING fresh, ids;
        SELECT count(*), array_agg(format('record %s was not loaded: %s', x.id, x.problem))
          INTO nbad, bad
          FROM unnest(c_ids, c_problems) AS x(id, problem) WHERE x.problem IS NOT NULL;
        failed := failed + nbad;
        problems := problems || coalesce(bad, '{}');
        -- the unlinked local rows each record's match values find, in one
        -- query (by position)
        match_sql := d365._map_load_match_sql(m.name);
        IF match_sql IS NOT NULL THEN
            EXECUTE 'SELECT pg_catalog.jsonb_object_agg(x.i::pg_catalog.text, pg_catalog.to_jsonb(x.h)) FROM ('
                    || match_sql || ') AS x(i, h)'
               INTO hitmap USING c_vals;
        END IF;
        hitmap := coalesce(hitmap, '{}');
        -- what becomes of each: 'insert' (no hit), 'match' (one hit; a row
        -- several records find goes to the first, the others are new rows),
        -- 'fail' (several hits) or 'problem'
        WITH c AS (SELECT x.n, x.id, x.problem, coalesce(hitmap -> x.n::text, '[]') AS h
                     FROM unnest(c_ids, c_problems) WITH ORDINALITY AS x(id, problem, n)),
             d AS (SELECT c.*, jsonb_array_length(c.h) AS nh,
                          row_number() OVER (PARTITION BY CASE WHEN c.problem IS NULL AND jsonb_array_length(c.h) = 1
                                                               THEN c.h ->> 0 END
                                             ORDER BY c.n) AS rn
                     FROM c)
        SELECT array_agg(CASE WHEN d.problem IS NOT NULL THEN 'problem'
                              WHEN d.nh > 1 THEN 'fail'
                              WHEN d.nh = 1 AND d.rn = 1 THEN 'match'
                              ELSE 'insert' END ORDER BY d.n),
               array_agg(d.h ->> 0 ORDER BY d.n),
               array_agg(format('record %s was not loaded: it matches %s local rows (%s)', d.id, d.nh,
                                (SELECT string_agg(v, ', ') FROM (SELECT jsonb_array_elements_text(d.h) v LIMIT 10) z)))
                   FILTER (WHERE d.problem IS NULL AND d.nh > 1)
          INTO kinds, hit_keys, bad
          FROM d;
        failed := failed + coalesce(cardinality(bad), 0);
        problems := problems || coalesce(bad, '{}');
    END IF;

    -- matched: link, then field by field (the values as they are sent,
    -- d365._map_out_exprs): a field set on one side only takes that
    -- side's value (here now, or sent by the next sync); set on both sides
    -- to different values, it is a conflict, resolved by the map's policy
    -- and recorded in d365.conflict (no value before: base NULL)
    IF 'match' = ANY (kinds) THEN
        out_body := (d365._map_out_exprs(m.name)).body;
        SELECT coalesce(jsonb_object_agg(x."column", jsonb_build_object('wire', x.wire, 'field', x.field,
                                                                         'both', x.direction = 'both')), '{}')
          INTO in_cols
          FROM d365._map_columns(m.name) x WHERE x.direction <> 'out' AND x.problem IS NULL;
    END IF;
    FOR one IN SELECT jsonb_build_object('k', x.k, 'id', x.id, 'vals', x.vals, 'wires', x.wires, 'pending', x.pending,
                                         'etag', x.etag)
                 FROM unnest(c_ids, c_vals, c_wires, c_pending, kinds, hit_keys, c_etags)
                      AS x(id, vals, wires, pending, kind, k, etag)
                WHERE x.kind = 'match' LOOP
        k := one ->> 'k';
        id := (one ->> 'id')::uuid;
        BEGIN
            EXECUTE format('SELECT %s FROM %s c WHERE c.%I::pg_catalog.text OPERATOR(pg_catalog.=) $1',
                           out_body, m.local_table, m.key_column)
               INTO cur USING k;
            SELECT coalesce(jsonb_object_agg(c.key, one -> 'vals' -> c.key)
                                FILTER (WHERE coalesce(cur -> (c.value ->> 'wire'), 'null') = 'null'
                                           OR (m.conflict = 'dynamics_wins'
                                               AND cur -> (c.value ->> 'wire') <> one -> 'wires' -> (c.value ->> 'wire'))), '{}'),
                   coalesce(jsonb_agg(jsonb_build_object('column', c.key, 'field', c.value ->> 'field',
                                                         'local', cur -> (c.value ->> 'wire'),
                                                         'dynamics', one -> 'wires' -> (c.value ->> 'wire')))
                                FILTER (WHERE (c.value ->> 'both')::boolean
                                          AND coalesce(cur -> (c.value ->> 'wire'), 'null') <> 'null'
                                          AND cur -> (c.value ->> 'wire') <> one -> 'wires' -> (c.value ->> 'wire')), '[]')
              INTO apply_vals, conflicts
              FROM jsonb_each(in_cols) c
             WHERE coalesce(one -> 'wires' -> (c.value ->> 'wire'), 'null') <> 'null'
               AND NOT (one -> 'pending') ? c.key;
            IF d365._map_set_links(m.name, ARRAY[k], ARRAY[id], ARRAY[NULL::uuid]) IS NULL THEN
                RAISE EXCEPTION 'row % is locked or linked meanwhile', k USING ERRCODE = 'lock_not_available';
            END IF;
            INSERT INTO d365.map_row AS s (map, row_key, dynamics_id) VALUES (m.name, k, id)
            ON CONFLICT ON CONSTRAINT map_row_pkey DO UPDATE
               SET dynamics_id = EXCLUDED.dynamics_id, remote_deleted_at = NULL;
            IF apply_vals <> '{}' THEN
                PERFORM d365._map_apply(m.name, apply_vals, k);
            END IF;
            INSERT INTO d365.conflict (map, row_key, dynamics_id, "column", field,
                                       local_value, dynamics_value, base_value, resolution)
            SELECT m.name, k, id, (f ->> 'column')::name, f ->> 'field', f -> 'local', f -> 'dynamics',
                   NULL, m.conflict
              FROM jsonb_array_elements(conflicts) f;
            -- synced: what Dynamics holds, so the next sync sends the fields
            -- the row keeps of its own
            UPDATE d365.map_row s
               SET synced = one -> 'wires', etag = one ->> 'etag', attempts = 0, next_attempt_at = NULL,
                   last_error = NULL, last_error_code = NULL
             WHERE s.map = m.name AND s.row_key = k;
            -- a lookup whose parent is not linked yet, where the row has none
            INSERT INTO d365.map_lookup_pending AS p (map, row_key, "column", dynamics_id)
            SELECT m.name, k, x.key, (x.value #>> '{}')::uuid FROM jsonb_each(one -> 'pending') x
             WHERE coalesce(cur -> (in_cols -> x.key ->> 'wire'), 'null') = 'null'
            ON CONFLICT ON CONSTRAINT map_lookup_pending_pkey DO UPDATE SET dynamics_id = EXCLUDED.dynamics_id;
            updated := updated + 1;
        EXCEPTION WHEN data_exception OR integrity_constraint_violation OR raise_exception
                       OR invalid_parameter_value OR with_check_option_violation OR lock_not_available THEN
            GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT;
            failed := failed + 1;
            problems := problems || format('record %s was not linked to row %s: %s', id, k, msg);
        END;
    END LOOP;

    -- new rows: the page in one statement, record by record when it fails
    SELECT count(*), jsonb_agg(x.vals || jsonb_build_object('@dynamics_id', x.id) ORDER BY x.n)
      INTO ninsert, insert_rows
      FROM unnest(c_ids, c_vals, kinds) WITH ORDINALITY AS x(id, vals, kind, n)
     WHERE x.kind = 'insert';
    IF ninsert > 0 THEN
        BEGIN
            done := d365._map_insert(m.name, insert_rows);
        EXCEPTION WHEN data_exception OR integrity_constraint_violation OR raise_exception
                       OR invalid_parameter_value OR with_check_option_violation OR program_limit_exceeded THEN
            done := '[]';
            FOR one IN SELECT x FROM jsonb_array_elements(insert_rows) x LOOP
                BEGIN
                    done := done || coalesce(d365._map_insert(m.name, jsonb_build_array(one)), '[]');
                EXCEPTION WHEN data_exception OR integrity_constraint_violation OR raise_exception
                               OR invalid_parameter_value OR with_check_option_violation
                               OR program_limit_exceeded THEN
                    GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT;
                    problems := problems || format('record %s was not loaded: %s', one ->> '@dynamics_id', msg);
                END;
            END LOOP;
        END;
        done := coalesce(done, '[]');
        -- the state of each row inserted: linked, synced with what it
        -- holds.  A new row's key has no state row as a rule: one plain
        -- INSERT (an upsert of every row costs a quarter more), and the
        -- upsert when a state row was left behind for one of the keys
        BEGIN
            WITH d AS MATERIALIZED (SELECT y ->> 0 AS k, (y ->> 1)::uuid AS id FROM jsonb_array_elements(done) y)
            INSERT INTO d365.map_row (map, row_key, dynamics_id, synced, etag)
            SELECT m.name, d.k, d.id, x.wires, x.etag
              FROM d JOIN unnest(c_ids, c_wires, c_etags) AS x(id, wires, etag) ON x.id = d.id;
        EXCEPTION WHEN unique_violation THEN
            WITH d AS MATERIALIZED (SELECT y ->> 0 AS k, (y ->> 1)::uuid AS id FROM jsonb_array_elements(done) y)
            INSERT INTO d365.map_row AS s (map, row_key, dynamics_id, synced, etag)
            SELECT m.name, d.k, d.id, x.wires, x.etag
              FROM d JOIN unnest(c_ids, c_wires, c_etags) AS x(id, wires, etag) ON x.id = d.id
            ON CONFLICT ON CONSTRAINT map_row_pkey DO UPDATE
               SET dynamics_id = EXCLUDED.dynamics_id, synced = EXCLUDED.synced, etag = EXCLUDED.etag,
                   synced_seq = s.change_seq,
                   generation = 0, attempts = 0, next_attempt_at = NULL, last_error = NULL,
                   last_error_code = NULL, remote_deleted_at = NULL;
        END;
        WITH d AS MATERIALIZED (SELECT y ->> 0 AS k, (y ->> 1)::uuid AS id FROM jsonb_array_elements(done) y)
        INSERT INTO d365.map_lookup_pending AS p (map, row_key, "column", dynamics_id)
        SELECT m.name, d.k, e.key, (e.value #>> '{}')::uuid
          FROM d JOIN unnest(c_ids, c_pending) AS x(id, pending) ON x.id = d.id AND x.pending <> '{}',
               jsonb_each(x.pending) e
        ON CONFLICT ON CONSTRAINT map_lookup_pending_pkey DO UPDATE SET dynamics_id = EXCLUDED.dynamics_id;
        created := created + jsonb_array_length(done);
        failed := failed + ninsert - jsonb_array_length(done);
        IF ninsert > jsonb_array_length(done) AND cardinality(problems) = 0 THEN
            problems := problems || format('%s record(s) were not inserted (a trigger of %s skipped them)',
                                           ninsert - jsonb_array_length(done), m.local_table);
        END IF;
    END IF;

    IF cardinality(old) > 0 THEN
        SELECT * INTO counts FROM d365._map_pull_record(to_json(old), m.name);
        updated := updated + counts.updated;
        unchanged := unchanged + counts.unchanged;
        failed := failed + counts.failed;
        unlinked := unlinked + counts.unlinked;
    END IF;

    -- one WARNING per page at most, the last problem kept with the load
    IF cardinality(problems) > 0 THEN
        RAISE WARNING 'map "%": %', m.name,
                      problems[1] || CASE WHEN cardinality(problems) > 1
                                          THEN format(' (and %s more problem(s) in this page)', cardinality(problems) - 1)
                                          ELSE '' END
            USING ERRCODE = '01000';
        UPDATE d365.load_state l SET last_error = left(problems[cardinality(problems)], 2000)
         WHERE l.entity = 'map:' || m.name;
    END IF;
END;
$$;

-- The request of Dataverse's count of the records of a map's table
-- (RetrieveTotalRecordCount, a snapshot): the total a load's progress is
-- measured against.
CREATE FUNCTION d365._map_load_count_path(map text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map := d365._table_map(map);
    ent record := d365._map_entity(m.entity_set);
BEGIN
    RETURN 'RetrieveTotalRecordCount(EntityNames=@p1)?@p1='
           || d365._uri_escape(pg_catalog.to_jsonb(ARRAY[ent.logical_name])::text);
END;
$$;

/*
 * Lookups waiting for their parent (d365.map_lookup_pending): each one
 * whose parent record is now linked to a local row gets that row's key, as
 * the table's owner (d365._map_apply), unless a pull has brought the
 * field since (the state then knows it).  Run at the end of each load and
 * of each pull of a map, for the lookups of every map, but only where the
 * run's caller may write the child's column and read the parent's key and
 * link (the others wait for a run of a role that may).  Returns how many
 * were resolved and how many still wait.
 */
CREATE FUNCTION d365._map_resolve_lookups(OUT resolved integer, OUT waiting integer)
RETURNS record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    grp record;
    col record;
    pm d365.table_map;
    child_table regclass;
    p record;
    msg text;
    code text;
BEGIN
    resolved := 0;
    -- rows deleted or unlinked since
    DELETE FROM d365.map_lookup_pending q
     WHERE NOT EXISTS (SELECT FROM d365.map_row r
                        WHERE r.map = q.map AND r.row_key = q.row_key AND r.dynamics_id IS NOT NULL);
    FOR grp IN SELECT DISTINCT q.map, q."column" FROM d365.map_lookup_pending q ORDER BY 1, 2 LOOP
        col := NULL;
        SELECT * INTO col FROM d365._map_columns(grp.map) x WHERE x."column" = grp."column";
        IF col."column" IS NULL OR col.parent IS NULL OR col.problem IS NOT NULL OR col.direction = 'out' THEN
            DELETE FROM d365.map_lookup_pending q WHERE q.map = grp.map AND q."column" = grp."column";
            CONTINUE;
        END IF;
        -- brought by a pull since
        DELETE FROM d365.map_lookup_pending q USING d365.map_row r
         WHERE q.map = grp.map AND q."column" = grp."column"
           AND r.map = q.map AND r.row_key = q.row_key AND r.synced ? col.wire;
        SELECT * INTO pm FROM d365.table_map t WHERE t.name = col.parent;
        -- the parent's table is read, the child's written: both must pass
        -- the check a map run starts with (16_map_guard.sql); else they wait
        CONTINUE WHEN d365._map_problem(grp.map) IS NOT NULL OR d365._map_problem(pm.name) IS NOT NULL;
        -- and the role the run is for (any map's pull comes here) must be
        -- one that may write the child's column and read the parent's key
        -- and link, with no row-level security binding it on either table;
        -- else they wait for a run of a role that may
        SELECT t.local_table INTO child_table FROM d365.table_map t WHERE t.name = grp.map;
        CONTINUE WHEN NOT (has_column_privilege(d365._job_caller(), child_table, grp."column"::text, 'UPDATE')
                           AND has_column_privilege(d365._job_caller(), pm.local_table, pm.key_column::text, 'SELECT')
                           AND has_column_privilege(d365._job_caller(), pm.local_table, 'dynamics365_related_id', 'SELECT')
                           AND NOT d365._caller_rls(child_table) AND NOT d365._caller_rls(pm.local_table));
        FOR p IN EXECUTE format(
                'SELECT q.row_key, q.dynamics_id, pg_catalog.to_jsonb(par.%1$I) AS k'
                '  FROM d365.map_lookup_pending q'
                '  JOIN %2$s par ON par.dynamics365_related_id OPERATOR(pg_catalog.=) q.dynamics_id'
                '  JOIN d365.map_row pr ON pr.map OPERATOR(pg_catalog.=) %3$L'
                '   AND pr.row_key OPERATOR(pg_catalog.=) par.%1$I::pg_catalog.text'
                '   AND pr.dynamics_id OPERATOR(pg_catalog.=) par.dynamics365_related_id'
                ' WHERE q.map OPERATOR(pg_catalog.=) $1 AND q."column" OPERATOR(pg_catalog.=) $2'
                ' ORDER BY q.row_key', pm.key_column, pm.local_table, pm.name)
              USING grp.map, grp."column" LOOP
            BEGIN
                PERFORM d365._map_apply(grp.map, jsonb_build_object(grp."column", p.k), p.row_key);
                UPDATE d365.map_row r
                   SET synced = coalesce(r.synced, '{}')
                                || jsonb_build_object(col.wire, '/' || col.bind_set || '(' || p.dynamics_id || ')')
                 WHERE r.map = grp.map AND r.row_key = p.row_key;
                resolved := resolved + 1;
            EXCEPTION WHEN data_exception OR integrity_constraint_violation OR raise_exception
                           OR invalid_parameter_value OR with_check_option_violation THEN
                GET STACKED DIAGNOSTICS code = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
                RAISE WARNING 'the lookup % of row % of map "%" was not applied: %', grp."column", p.row_key, grp.map, msg
                    USING ERRCODE = '01000';
                UPDATE d365.map_row r
                   SET last_error_code = code, last_error = left('lookup not applied: ' || msg, 2000)
                 WHERE r.map = grp.map AND r.row_key = p.row_key;
            END;
            DELETE FROM d365.map_lookup_pending q
             WHERE q.map = grp.map AND q.row_key = p.row_key AND q."column" = grp."column";
        END LOOP;
    END LOOP;
    SELECT count(*) INTO waiting FROM d365.map_lookup_pending;
END;
$$;

-- A procedure that commits cannot carry a SET clause: the C code pins
-- search_path = pg_catalog, pg_temp in each of its transactions.
CREATE PROCEDURE d365.d365_load(map text DEFAULT NULL)
AS 'MODULE_PATHNAME', 'd365_load'
LANGUAGE C;
COMMENT ON PROCEDURE d365.d365_load(text) IS
    'Runs the pull of one table map or of every enabled map (parents first) as d365_pull() does, committing after each page of an initial load (load = true), so that a load stopped halfway goes on where it stopped';

REVOKE ALL ON d365.load_state, d365.map_lookup_pending FROM PUBLIC;
REVOKE ALL ON FUNCTION d365._map_load_problem(regclass, name), d365._map_load_check(),
       d365._map_insert_sql(text), d365._map_insert(text, jsonb), d365._map_in_sql(text),
       d365._map_load_match_sql(text), d365._map_load_record(json, text),
       d365._map_load_count_path(text), d365._map_resolve_lookups()
    FROM PUBLIC;
REVOKE ALL ON PROCEDURE d365.d365_load(text) FROM PUBLIC;
-- ---------------------------------------------------------------------------
-- What Dynamics answered is d365sync's to write (src/capture/state_guard.c,
-- docs/security.md "The link columns"): a row of d365.contact_state or
-- d365.map_row gets a Dynamics id, or keeps its id under another key, a
-- pull's delta link (d365.pull_state) or a cached metadata body
-- (d365.metadata_cache) is written, only while d365sync records what
-- Dynamics answered, as a superuser, or as a role holding the admin set
-- (hand links).  The roles that run the jobs may write the rest of the
-- state, clear an id or a delta link, and delete.
-- ---------------------------------------------------------------------------

CREATE FUNCTION d365._state_guard()
RETURNS trigger
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_state_guard'
LANGUAGE C;
REVOKE ALL ON FUNCTION d365._state_guard() FROM PUBLIC;

CREATE TRIGGER state_guard BEFORE INSERT OR UPDATE ON d365.contact_state
    FOR EACH ROW WHEN (NEW.dynamics_id IS NOT NULL)
    EXECUTE FUNCTION d365._state_guard('dynamics_id', 'contact_key');
CREATE TRIGGER state_guard BEFORE INSERT OR UPDATE ON d365.map_row
    FOR EACH ROW WHEN (NEW.dynamics_id IS NOT NULL)
    EXECUTE FUNCTION d365._state_guard('dynamics_id', 'map', 'row_key');
CREATE TRIGGER state_guard BEFORE INSERT OR UPDATE ON d365.pull_state
    FOR EACH ROW WHEN (NEW.delta_link IS NOT NULL)
    EXECUTE FUNCTION d365._state_guard('delta_link', 'entity');
CREATE TRIGGER state_guard BEFORE INSERT OR UPDATE ON d365.metadata_cache
    FOR EACH ROW EXECUTE FUNCTION d365._state_guard('body', 'path');

-- A GET of metadata (d365._get_all), kept in d365.metadata_cache by
-- d365sync's own write; d365._get_cached() reads the cache first.
CREATE FUNCTION d365._metadata_store(path text)
RETURNS jsonb
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_metadata_store'
LANGUAGE C VOLATILE STRICT;
REVOKE ALL ON FUNCTION d365._metadata_store(text) FROM PUBLIC;

-- A waiting lookup (d365.map_lookup_pending) names the record a loaded
-- row's lookup pointed to: the next pull, whoever runs it, writes the key
-- of the row linked to it into that row.  A load's delta and next links
-- (d365.load_state) say what the load and the pull after it read.  Both
-- are what Dynamics answered (16_map_guard.sql and docs/security.md).
CREATE TRIGGER state_guard BEFORE INSERT OR UPDATE ON d365.map_lookup_pending
    FOR EACH ROW EXECUTE FUNCTION d365._state_guard('dynamics_id', 'map', 'row_key', 'column');
CREATE TRIGGER state_guard BEFORE INSERT OR UPDATE ON d365.load_state
    FOR EACH ROW WHEN (NEW.delta_link IS NOT NULL)
    EXECUTE FUNCTION d365._state_guard('delta_link', 'entity');
CREATE TRIGGER state_guard_next BEFORE INSERT OR UPDATE ON d365.load_state
    FOR EACH ROW WHEN (NEW.next_link IS NOT NULL)
    EXECUTE FUNCTION d365._state_guard('next_link', 'entity');
-- Table maps as jobs: the maps the background worker (src/worker/worker_jobs.c)
-- and the scheduled map jobs (d365_run_job('maps'), d365_run_job('map-pull'))
-- run, and what d365_status() shows of each map.  See docs/worker.md and
-- docs/table-maps.md.
-- ---------------------------------------------------------------------------

/*
 * The maps a job runs when no map is named, parents before children: the
 * enabled maps whose direction sends (outgoing) or receives (NOT outgoing)
 * and that have at least one column mapped that way (a map being set up,
 * its columns not mapped yet, is not run), except "contact" -- the contact
 * table, which the contact jobs run.  noted: an outgoing map has changes
 * noted by its capture triggers, or deletes due, that no sync has taken
 * yet (the worker runs such a map at once, the others at its poll).
 */
CREATE FUNCTION d365._map_jobs(outgoing boolean, OUT name text, OUT noted boolean)
RETURNS SETOF record
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT t.name,
           coalesce(outgoing, false)
           AND (EXISTS (SELECT FROM d365.map_change q WHERE q.map = t.name)
                OR EXISTS (SELECT FROM d365.map_delete d
                            WHERE d.map = t.name
                              AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= now())))
      FROM d365._map_order() o
      JOIN d365.table_map t ON t.name = o.name
     WHERE t.enabled AND t.name <> 'contact'
       AND t.direction <> CASE WHEN outgoing THEN 'in' ELSE 'out' END
       AND EXISTS (SELECT FROM d365.column_map c
                    WHERE c.map = t.name AND c.direction <> CASE WHEN outgoing THEN 'in' ELSE 'out' END)
     ORDER BY o.depth, o.name
$$;

/*
 * What d365_status() shows of each table map (but "contact", whose lines
 * are the contact table's): "map <name>", the rows waiting to be sent (not
 * linked yet, or changed since their last sync, or noted by the capture and
 * not yet seen by a sync) and those failing; "last run error of map <name>",
 * the newest failed run of its sync or pull that no run of the same kind
 * has completed since; "last row error of map <name>", the newest row
 * still failing.  Reads the mapped table as whoever calls it (d365_status()
 * is its owner's), with built-in operators only, and only when the check
 * a map run starts with passes (d365._map_problem).
 */
CREATE FUNCTION d365._map_status(OUT item text, OUT value text)
RETURNS SETOF record
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map;
    r record;
    pending bigint;
    to_create bigint;
    failing bigint;
    noted timestamptz;
    problem text;
BEGIN
    FOR m IN SELECT * FROM d365.table_map t WHERE t.name <> 'contact' ORDER BY t.name LOOP
        item := format('map %s', m.name);
        SELECT count(*) INTO failing FROM d365.map_row s WHERE s.map = m.name AND s.attempts > 0;
        SELECT min(q.noted_at) INTO noted FROM d365.map_change q WHERE q.map = m.name;
        BEGIN
            -- the check a run of the map starts with (16_map_guard.sql),
            -- under the table's lock: a view, rules, a key of the owner's
            -- type or row security would run the owner's code here
            problem := d365._map_problem(m.name);
            IF problem IS NOT NULL THEN
                RAISE EXCEPTION 'table map "%" cannot run: %', m.name, problem;
            END IF;
            EXECUTE format(
                'SELECT count(*), count(*) FILTER (WHERE c.dynamics365_related_id IS NULL)'
                '  FROM %1$s c LEFT JOIN d365.map_row r'
                '    ON r.map OPERATOR(pg_catalog.=) $1 AND r.row_key OPERATOR(pg_catalog.=) c.%2$I::pg_catalog.text'
                ' WHERE c.%2$I IS NOT NULL'
                '   AND ((c.dynamics365_related_id IS NULL'
                '         AND (r.row_key IS NULL OR r.remote_deleted_at IS NULL'
                '              OR r.change_seq OPERATOR(pg_catalog.>) r.synced_seq))'
                '        OR (c.dynamics365_related_id IS NOT NULL'
                '            AND (r.row_key IS NULL OR r.synced IS NULL'
                '                 OR r.change_seq OPERATOR(pg_catalog.>) r.synced_seq'
                '                 OR r.dynamics_id IS DISTINCT FROM c.dynamics365_related_id))'
                '        OR c.%2$I::pg_catalog.text OPERATOR(pg_catalog.=) ANY (ARRAY('
                '               SELECT k FROM d365.map_change q, pg_catalog.unnest(q.keys) k'
                '                WHERE q.map OPERATOR(pg_catalog.=) $1)))',
                m.local_table, m.key_column) INTO pending, to_create USING m.name;
            value := format('%s pending (%s to create), %s failing', pending, to_create, failing);
        EXCEPTION WHEN OTHERS THEN
            value := format('pending not counted (%s), %s failing', SQLERRM, failing);
        END;
        value := value
                 || coalesce('; oldest change noted ' || to_char(noted, 'YYYY-MM-DD HH24:MI:SS TZ'), '')
                 || CASE WHEN NOT m.enabled THEN '; disabled (enabled = false): the worker and the scheduled map jobs pass it by'
                         WHEN m.direction = 'in' THEN '; direction in: nothing is sent'
                         ELSE '' END;
        RETURN NEXT;

        SELECT sr.finished_at, sr.kind, sr.message INTO r FROM d365.sync_run sr
         WHERE sr.kind IN ('map:' || m.name, 'map-pull:' || m.name) AND sr.message LIKE 'failed:%'
           AND NOT EXISTS (SELECT FROM d365.sync_run ok
                            WHERE ok.kind = sr.kind AND ok.id > sr.id
                              AND (ok.message IS NULL
                                   OR NOT (ok.message LIKE 'failed:%' OR ok.message LIKE 'skipped:%')))
         ORDER BY sr.id DESC LIMIT 1;
        IF FOUND THEN
            item := format('last run error of map %s', m.name);
            value := format('%s at %s: %s', r.kind, to_char(r.finished_at, 'YYYY-MM-DD HH24:MI:SS TZ'),
                            r.message);
            RETURN NEXT;
        END IF;
        SELECT s.row_key, s.last_attempt_at, s.last_error INTO r FROM d365.map_row s
         WHERE s.map = m.name AND s.attempts > 0
         ORDER BY s.last_attempt_at DESC NULLS LAST, s.row_key LIMIT 1;
        IF FOUND THEN
            item := format('last row error of map %s', m.name);
            value := format('row %s at %s: %s', r.row_key,
                            to_char(r.last_attempt_at, 'YYYY-MM-DD HH24:MI:SS TZ'), r.last_error);
            RETURN NEXT;
        END IF;
    END LOOP;
END;
$$;

REVOKE ALL ON FUNCTION d365._map_jobs(boolean), d365._map_status() FROM PUBLIC;
-- The delete policies of the map "contact" (the attached contact table),
-- on the table maps' delete engine (13_map_delete.sql):
--   on_local_delete 'deactivate' | 'delete': a contact row deleted here
--     (DELETE or TRUNCATE) leaves the record d365sync linked it to in
--     d365.map_delete (map "contact"), which the contact sync deactivates
--     or deletes (d365._map_delete_work_sql, d365._map_record) with
--     back-off; d365.pending_delete and d365_status() show it until then.
--   on_remote_delete 'delete': a contact whose record was deleted in
--     Dynamics (the pull's $deletedEntity, or an update meeting 404) is
--     unlinked, then deleted as the table's owner (d365._map_remove).
-- enabled is honoured by the contact engine's runs (src/engines/contact_policies.c).
-- load = true is refused for the contact map (d365._contact_map_guard).
-- See docs/table-maps.md, "The contact table".
-- ---------------------------------------------------------------------------

/*
 * Keys deleted from the contact table (the DELETE and TRUNCATE capture):
 * with on_local_delete 'deactivate' or 'delete', the record each key was
 * linked to by d365sync (d365.contact_state: never what the deleted row's
 * link column held) waits in d365.map_delete; then every key becomes a
 * tombstone (d365._contact_tombstone).  Wakes the background worker when
 * a record waits.
 */
CREATE FUNCTION d365._contact_deleted(keys text[])
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    queued bigint;
BEGIN
    INSERT INTO d365.map_delete (map, dynamics_id, row_key, action)
    SELECT t.name, s.dynamics_id, s.contact_key, t.on_local_delete
      FROM d365.table_map t, d365.contact_state s
     WHERE t.name = 'contact' AND t.on_local_delete <> 'unlink' AND t.direction <> 'in'
       AND s.contact_key = ANY (keys) AND s.dynamics_id IS NOT NULL
    ON CONFLICT ON CONSTRAINT map_delete_pkey DO NOTHING;
    GET DIAGNOSTICS queued = ROW_COUNT;
    PERFORM d365._contact_tombstone(keys);
    IF queued > 0 THEN
        PERFORM d365._worker_wake(false);
    END IF;
END;
$$;

/*
 * The pending deletes of the map "contact" as the contact sync's work
 * query: the table maps' requests (a DELETE, or a PATCH of statecode 1 /
 * statuscode 2), recorded by d365._map_record.  NULL when none is due.
 */
CREATE FUNCTION d365._contact_delete_work_sql()
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT 'SELECT d.item_key, d.requests, d.context FROM ('
           || d365._map_delete_work_sql('contact', 'contacts') || ') d'
     WHERE EXISTS (SELECT FROM d365.map_delete d
                    WHERE d.map = 'contact' AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= now()))
$$;

/*
 * on_remote_delete 'delete' of the map "contact": the contacts with these
 * keys, whose records were deleted in Dynamics and which are unlinked
 * already, are deleted as the table's owner (d365._map_remove: only while
 * unlinked, and only where the role running the pull or sync holds DELETE
 * on the table).  A row that cannot be deleted stays, unlinked, with a
 * WARNING and the error in d365.contact_state.  Nothing with 'unlink'.
 */
CREATE FUNCTION d365._contact_remote_remove(keys text[])
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    k text;
    msg text;
    code text;
BEGIN
    IF keys IS NULL OR NOT EXISTS (SELECT FROM d365.table_map t
                                    WHERE t.name = 'contact' AND t.on_remote_delete = 'delete') THEN
        RETURN;
    END IF;
    FOREACH k IN ARRAY keys LOOP
        CONTINUE WHEN k IS NULL;
        BEGIN
            PERFORM d365._map_remove('contact', k);
        EXCEPTION WHEN data_exception OR integrity_constraint_violation OR raise_exception
                       OR insufficient_privilege OR object_not_in_prerequisite_state THEN
            GET STACKED DIAGNOSTICS code = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
            RAISE WARNING 'contact % was deleted in Dynamics 365 but could not be deleted here: %', k, msg
                USING ERRCODE = '01000';
            UPDATE d365.contact_state s
               SET last_error_code = code,
                   last_error = left('deleted in Dynamics 365, unlinked; the local delete failed: ' || msg, 2000)
             WHERE s.contact_key = k;
        END;
    END LOOP;
END;
$$;

REVOKE ALL ON FUNCTION d365._contact_deleted(text[]), d365._contact_delete_work_sql(),
       d365._contact_remote_remove(text[]) FROM PUBLIC;
-- Capture of INSERT and UPDATE on mapped tables: the contact table's
-- engine (src/capture/capture.c), fired by a map's triggers (src/capture/map_capture.c;
-- the statements are d365._map_capture_sql's, 11_table_maps.sql).
-- Neither function is executable by any role: only d365's owner names them
-- in CREATE TRIGGER (d365._map_capture_install), and each checks, when it
-- fires, that it is d365sync's own trigger.
-- ---------------------------------------------------------------------------

-- AFTER INSERT, and AFTER UPDATE behind the WHEN clause on the key and the
-- columns the map sends, per row: notes the key, as the writing user,
-- unless d365sync itself is writing the table.  Arguments: the key's
-- attribute number and name.
CREATE FUNCTION d365._map_capture_row()
RETURNS trigger
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_map_capture_row'
LANGUAGE C;

-- AFTER INSERT and AFTER UPDATE, per statement: writes the keys the
-- statement's rows noted to d365.map_change (as the extension's owner:
-- writers of the table need no rights in d365), once the table is found to
-- be a mapped one.
CREATE FUNCTION d365._map_capture_flush()
RETURNS trigger
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_map_capture_flush'
LANGUAGE C;

/*
 * The WHEN clause of a map's capture follows its column map: after a
 * change of d365.column_map, the capture triggers of each map concerned are
 * created again (d365._map_capture_install, which needs the caller to own
 * the table, as d365_map_column does).  Only where the map's table has its
 * capture triggers: in a restore they come after the data (the column map
 * is the one they were made for, not a change); an unmapped table has none.
 * The map "contact" is the contact table's (its field map's trigger,
 * d365._field_map_changed).
 */
CREATE FUNCTION d365._column_map_changed()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    maps text[];
    tbl regclass;
BEGIN
    IF TG_OP = 'INSERT' THEN
        maps := ARRAY(SELECT DISTINCT n.map FROM column_map_new n);
    ELSIF TG_OP = 'UPDATE' THEN
        maps := ARRAY(SELECT n.map FROM column_map_new n UNION SELECT o.map FROM column_map_old o);
    ELSE
        maps := ARRAY(SELECT DISTINCT o.map FROM column_map_old o);
    END IF;
    FOR tbl IN SELECT t.local_table FROM d365.table_map t
                WHERE t.name = ANY (maps) AND t.name <> 'contact'
                  AND EXISTS (SELECT FROM pg_trigger g
                               WHERE g.tgrelid = t.local_table AND g.tgname = 'd365_map_capture_update'
                                 AND g.tgfoid = 'd365._map_capture_row()'::regprocedure)
                ORDER BY t.name LOOP
        PERFORM d365._map_capture_install(tbl);
    END LOOP;
    RETURN NULL;
END;
$$;
CREATE TRIGGER column_map_inserted AFTER INSERT ON d365.column_map
    REFERENCING NEW TABLE AS column_map_new
    FOR EACH STATEMENT EXECUTE FUNCTION d365._column_map_changed();
CREATE TRIGGER column_map_updated AFTER UPDATE ON d365.column_map
    REFERENCING OLD TABLE AS column_map_old NEW TABLE AS column_map_new
    FOR EACH STATEMENT EXECUTE FUNCTION d365._column_map_changed();
CREATE TRIGGER column_map_deleted AFTER DELETE ON d365.column_map
    REFERENCING OLD TABLE AS column_map_old
    FOR EACH STATEMENT EXECUTE FUNCTION d365._column_map_changed();

REVOKE ALL ON FUNCTION d365._map_capture_row(), d365._map_capture_flush(),
       d365._column_map_changed() FROM PUBLIC;
-- The check every map run starts with.  A map's run (d365_sync(map),
-- d365_pull(map), d365_load(map), the worker's and the scheduled map jobs)
-- and d365_status() read the mapped table with the rights of whoever runs
-- them: the superuser, an admin, an operator, the worker's role, or the
-- extension's owner.  The table's owner must not be able to put code of its
-- own in that read (a view in the table's place, row-level security, casts
-- of a type of its own), nor take away d365sync's capture triggers and
-- link guard (a forged link would send a row to another row's record).  See
-- docs/security.md, "What a map run checks".
-- ---------------------------------------------------------------------------

/*
 * The table part, in C (src/capture/map_guard.c, shared with the contact table's
 * check): the table's ACCESS SHARE lock, to the end of the transaction; a
 * plain or partitioned table without rewrite rules; link columns of the
 * built-in types.
 */
CREATE FUNCTION d365._map_table_problem(tbl regclass)
RETURNS text
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_map_table_problem'
LANGUAGE C VOLATILE;

/*
 * What keeps map `map` from running, or NULL: its table is not a plain or
 * partitioned table, has rules, is gone; its key column is gone or of a
 * type d365sync does not convert with built-in functions; a trigger that
 * d365._map_capture_sql() installs is missing, disabled (or fires only in
 * replica mode), calls another function, or (the link guard) watches
 * other columns than the link columns; the link column's unique index is
 * missing; row-level security applies to the current role (its policies
 * are the owner's code).  The map "contact" is the attached contact table:
 * its attachment's check (d365._attachment_problem).  Reads the catalog
 * only, under the table's lock.
 */
CREATE FUNCTION d365._map_problem(map text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map;
    src d365.contact_source;
    tbl regclass;
    problem text;
    stmt text;
    trg text;
    fn text;
    trans text[];
    cols text;
BEGIN
    SELECT * INTO m FROM d365.table_map t WHERE t.name = map;
    IF NOT FOUND THEN
        RETURN format('table map "%s" does not exist', map);
    END IF;
    tbl := m.local_table;
    IF m.name = 'contact' THEN
        SELECT * INTO src FROM d365.contact_source LIMIT 1;
        IF NOT FOUND THEN
            RETURN 'no contact table is attached';
        END IF;
        problem := d365._attachment_problem(src);
        tbl := src.contact_table;
    ELSE
        problem := d365._map_table_problem(tbl);
        IF problem IS NULL AND NOT EXISTS (
               SELECT FROM pg_attribute a
                WHERE a.attrelid = tbl AND a.attname = m.key_column
                  AND a.attnum > 0 AND NOT a.attisdropped) THEN
            problem := format('key column "%s" of %s was renamed or dropped', m.key_column, tbl);
        END IF;
        IF problem IS NULL THEN
            SELECT format('key column "%s" of %s has type %s, which d365sync does not support',
                          m.key_column, tbl, a.atttypid::regtype) INTO problem
              FROM pg_attribute a
             WHERE a.attrelid = tbl AND a.attname = m.key_column
               AND a.atttypid <> ALL (d365._key_types());
        END IF;
        -- each trigger d365._map_capture_sql() makes: its name (at the start
        -- of its statement), the function it executes and its transition
        -- table (the last of each: the table's name, which its owner
        -- chooses, comes before them), the columns an UPDATE OF watches
        IF problem IS NULL THEN
            FOREACH stmt IN ARRAY d365._map_capture_sql(tbl) LOOP
                trg := substring(stmt FROM '^CREATE OR REPLACE TRIGGER ([a-z0-9_]+) ');
                fn := substring(stmt FROM '.*EXECUTE FUNCTION (d365\.[a-z0-9_]+)\(');
                trans := regexp_match(stmt, '.*REFERENCING (NEW|OLD) TABLE AS ([a-z0-9_]+) ');
                cols := substring(stmt FROM '^CREATE OR REPLACE TRIGGER [a-z0-9_]+ AFTER UPDATE OF ([a-z0-9_, ]+) ON ');
                CONTINUE WHEN trg IS NULL OR fn IS NULL;
                IF NOT EXISTS (SELECT FROM pg_trigger t
                                WHERE t.tgrelid = tbl AND t.tgname = trg AND t.tgenabled IN ('O', 'A')) THEN
                    RETURN format('trigger %s on %s is missing or disabled', trg, tbl);
                END IF;
                IF NOT EXISTS (SELECT FROM pg_trigger t
                                 JOIN pg_proc p ON p.oid = t.tgfoid
                                 JOIN pg_namespace n ON n.oid = p.pronamespace
                                WHERE t.tgrelid = tbl AND t.tgname = trg
                                  AND n.nspname OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) p.proname = fn
                                  AND (trans IS NULL
                                       OR (trans[1] = 'NEW' AND t.tgnewtable = trans[2])
                                       OR (trans[1] = 'OLD' AND t.tgoldtable = trans[2]))) THEN
                    RETURN format('trigger %s on %s does not call %s()', trg, tbl, fn);
                END IF;
                IF cols IS NOT NULL AND NOT EXISTS (
                       SELECT FROM pg_trigger t
                        WHERE t.tgrelid = tbl AND t.tgname = trg
                          AND ARRAY(SELECT x FROM unnest(t.tgattr::int2[]) x ORDER BY x)
                              = ARRAY(SELECT a.attnum FROM pg_attribute a
                                       WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped
                                         AND a.attname = ANY (string_to_array(replace(cols, ' ', ''), ','))
                                       ORDER BY a.attnum)) THEN
                    RETURN format('trigger %s on %s watches other columns than %s', trg, tbl, cols);
                END IF;
            END LOOP;
            IF NOT d365._link_index_exists(tbl) THEN
                problem := format('the unique index on dynamics365_related_id of %s is missing', tbl);
            END IF;
        END IF;
    END IF;
    IF problem IS NULL AND row_security_active(tbl) THEN
        problem := format('row-level security of %s applies to role "%s"', tbl, current_user);
    END IF;
    RETURN problem;
END;
$$;

/*
 * At the start of each run of map `map`, under its table's lock: raises
 * when d365._map_problem() finds something wrong with its table or with a
 * table its lookups read (the parent maps' tables), naming the map, the
 * table and what to do; and (42501) when the job's caller may not read
 * the columns the lookups read of a parent map's table.  The run is
 * recorded as failed; nothing was read or sent, the pending rows stay
 * pending.
 */
CREATE FUNCTION d365._map_guard(map text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map;
    what text := map;
    problem text := d365._map_problem(map);
    parent text;
    pm d365.table_map;
BEGIN
    SELECT * INTO m FROM d365.table_map t WHERE t.name = map;
    -- the run reads the tables as the job role, which no policy binds: for
    -- a caller their row-level security does not apply to
    IF problem IS NULL AND FOUND AND d365._caller_rls(m.local_table) THEN
        problem := format('row-level security of %s applies to role "%s"', m.local_table, d365._job_caller()::regrole);
    END IF;
    IF problem IS NULL AND m.name IS NOT NULL THEN
        FOR parent IN SELECT DISTINCT p FROM d365.column_map c,
                             LATERAL d365._map_fk_target(m.local_table, c."column") p
                       WHERE c.map = m.name AND p IS NOT NULL AND p <> m.name ORDER BY 1 LOOP
            problem := d365._map_problem(parent);
            IF problem IS NULL
               AND d365._caller_rls((SELECT t.local_table FROM d365.table_map t WHERE t.name = parent)) THEN
                problem := format('row-level security of %s applies to role "%s"',
                                  (SELECT t.local_table FROM d365.table_map t WHERE t.name = parent),
                                  d365._job_caller()::regrole);
            END IF;
            IF problem IS NOT NULL THEN
                what := parent;
                problem := format('the table of map "%s", which its lookups read: %s', parent, problem);
                EXIT;
            END IF;
        END LOOP;
    END IF;
    IF problem IS NULL THEN
        -- the lookups read the key and link columns of each parent's table
        -- as the job role, which reads every table: only for a caller that
        -- may read those two columns (as d365_map_column() asked of whoever
        -- mapped the lookup, d365._map_lookup_readable); the run checks the
        -- map's own table (d365._caller_reads)
        FOR pm IN SELECT t.* FROM d365.table_map t
                   WHERE t.name IN (SELECT p FROM d365.column_map c,
                                           LATERAL d365._map_fk_target(m.local_table, c."column") p
                                     WHERE c.map = m.name AND p IS NOT NULL AND p <> m.name)
                   ORDER BY t.name LOOP
            IF NOT (has_column_privilege(d365._job_caller(), pm.local_table, pm.key_column, 'SELECT')
                    AND has_column_privilege(d365._job_caller(), pm.local_table, 'dynamics365_related_id', 'SELECT')) THEN
                RAISE EXCEPTION 'permission denied for table %', pm.local_table
                    USING ERRCODE = 'insufficient_privilege',
                          DETAIL = format('The lookups of map "%s" read columns "%s" and "dynamics365_related_id" of %s (map "%s") for role "%s", which may not read them. Nothing was read or sent; the pending rows stay pending.',
                                          m.name, pm.key_column, pm.local_table, pm.name, d365._job_caller()::regrole),
                          HINT = format('GRANT SELECT (%I, dynamics365_related_id) ON %s TO %s;',
                                        pm.key_column, pm.local_table, d365._job_caller()::regrole);
            END IF;
        END LOOP;
        RETURN;
    END IF;
    IF problem LIKE '%row-level security of % applies to role %' THEN
        RAISE EXCEPTION 'table map "%" cannot run: %', map, problem
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'Row-level security policies are code of the table''s owner: d365sync does not read the table as a role they bind. Nothing was read or sent; the pending rows stay pending.',
                  HINT = 'Run the map as the table''s owner, a superuser or a role with BYPASSRLS.';
    END IF;
    RAISE EXCEPTION 'table map "%" cannot run: %', map, problem
        USING ERRCODE = 'object_not_in_prerequisite_state',
              DETAIL = 'd365sync reads and writes a mapped table only while it is a plain or partitioned table without rules, with d365sync''s capture triggers and link guard enabled and its key and link columns of built-in types: anything else could run code of the table''s owner with the rights of the role running the map, or send a row to a record d365sync did not link it to. Nothing was read or sent; the pending rows stay pending.',
              HINT = CASE WHEN what = 'contact'
                          THEN 'Attach the contact table again with d365_attach_contacts() (its owner, or a superuser); d365_status() shows what is wrong.'
                          ELSE format('The table''s owner puts it back (a table, no rules, d365sync''s triggers enabled, the key and link columns of their types); SELECT d365._map_capture_install(%L) (its owner, or a superuser) recreates d365sync''s triggers.',
                                      (SELECT t.local_table::text FROM d365.table_map t WHERE t.name = what)) END;
END;
$$;

REVOKE ALL ON FUNCTION d365._map_table_problem(regclass), d365._map_problem(text),
       d365._map_guard(text) FROM PUBLIC;
-- Which table a map syncs, and how, is its table owner's choice.
-- d365_map_table() and d365_unmap_table() act only for the table's owner;
-- d365.table_map is also written directly (an admin writes every table of
-- d365; an operator may switch a map on and off), so a statement's write
-- of a map row is held to the same rule.
-- ---------------------------------------------------------------------------

/*
 * BEFORE INSERT OR UPDATE OR DELETE ON d365.table_map, each row: a new
 * map, a map removed, or any change but "enabled" (its table, key column,
 * entity set, direction, load, delete policies, conflict rule) only for a
 * role that owns, or is a member of the role owning, the table -- both
 * tables when a map moves.  Otherwise an admin could point a map of its
 * own at a table it may not read (the jobs would send that table's
 * columns, and the sync state show them), remove another owner's map (its
 * capture triggers, left on the table, would fail every write of it), or
 * widen what the jobs of other roles write into a table it may not write
 * (on_remote_delete = 'delete' and a record it deletes in Dynamics: the
 * pull deletes the row).  A map whose table was dropped is removed by
 * whoever may, as d365_unmap_table() does.  The map "contact": its row
 * follows the attachment (written from a trigger, d365._contact_map_refresh);
 * a statement may change only enabled and the delete policies of it
 * (d365._contact_map_guard), the policies only as the contact table's owner.
 */
CREATE FUNCTION d365._table_map_owner_check()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    tbl regclass;
    tbls regclass[];
    what text;
BEGIN
    IF TG_OP = 'UPDATE' AND to_jsonb(NEW) - 'enabled' = to_jsonb(OLD) - 'enabled' THEN
        RETURN NEW;
    END IF;
    IF ((TG_OP <> 'INSERT' AND OLD.name = 'contact') OR (TG_OP <> 'DELETE' AND NEW.name = 'contact'))
       AND (TG_OP <> 'UPDATE' OR pg_trigger_depth() > 1) THEN
        RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    IF TG_OP = 'DELETE' THEN
        tbls := ARRAY(SELECT c.oid::regclass FROM pg_class c WHERE c.oid = OLD.local_table);
        what := 'unmap it';
    ELSIF TG_OP = 'INSERT' THEN
        tbls := ARRAY[NEW.local_table];
        what := 'map it';
    ELSE
        tbls := CASE WHEN NEW.local_table = OLD.local_table THEN ARRAY[NEW.local_table]
                     ELSE ARRAY[OLD.local_table, NEW.local_table] END;
        what := format('change map "%s"', OLD.name);
    END IF;
    FOREACH tbl IN ARRAY tbls LOOP
        IF pg_has_role((SELECT c.relowner FROM pg_class c WHERE c.oid = tbl), 'USAGE') IS NOT TRUE THEN
            RAISE EXCEPTION 'must be the owner of % to %', tbl, what
                USING ERRCODE = 'insufficient_privilege',
                      DETAIL = 'Which table a table map syncs, and how (its key column, entity set, direction, load, delete policies and conflict rule), is chosen by the table''s owner; anyone who may write d365.table_map may switch a map on and off (enabled).',
                      HINT = 'Do it as the table''s owner, or as a member of its owning role: d365_map_table() and d365_unmap_table() map and unmap a table, an UPDATE of d365.table_map changes a map''s settings.';
        END IF;
    END LOOP;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END;
$$;
CREATE TRIGGER table_map_owner_check BEFORE INSERT OR UPDATE OR DELETE ON d365.table_map
    FOR EACH ROW EXECUTE FUNCTION d365._table_map_owner_check();

REVOKE ALL ON FUNCTION d365._table_map_owner_check() FROM PUBLIC;
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
-- The job role: what the jobs run as (src/common/job_role.c, docs/security.md
-- "What d365sync runs as").
-- ---------------------------------------------------------------------------

/*
 * d365sync_job: NOLOGIN, never a superuser, no member of any role but
 * pg_read_all_data (the jobs read the application's tables, for callers
 * that may read them: d365._caller_reads) and pg_read_all_stats (the runs
 * in progress of other sessions, d365_run_progress()), and BYPASSRLS (the
 * policies of an application's table are its owner's code: they never run
 * as this role).  Roles belong to the cluster: a database that installed d365sync
 * before made it, and it is used as it is.  docs/install.md says how to drop
 * it after the last DROP EXTENSION.
 */
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = 'd365sync_job') THEN
        CREATE ROLE d365sync_job NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION BYPASSRLS;
    END IF;
    IF NOT pg_catalog.pg_has_role('d365sync_job', 'pg_read_all_data', 'MEMBER') THEN
        GRANT pg_read_all_data TO d365sync_job;
    END IF;
    IF NOT pg_catalog.pg_has_role('d365sync_job', 'pg_read_all_stats', 'MEMBER') THEN
        GRANT pg_read_all_stats TO d365sync_job;
    END IF;
END;
$$;

/*
 * The role whose rights the jobs check: the job's caller while d365's code
 * runs as the job role, else the current user.
 */
CREATE FUNCTION d365._job_caller()
RETURNS oid
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_job_caller_sql'
LANGUAGE C STABLE;

/*
 * Before a job reads an application table: the caller may read the
 * columns d365sync's configuration names of it (or the whole table), and
 * the table's row-level security does not apply to the caller.
 */
CREATE FUNCTION d365._caller_reads(tbl regclass)
RETURNS void
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_caller_reads'
LANGUAGE C;

/*
 * Whether the row-level security of a table applies to the job's caller
 * (a job reads every row, as the job role: it refuses such a caller).
 */
CREATE FUNCTION d365._caller_rls(tbl regclass)
RETURNS boolean
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_caller_rls'
LANGUAGE C STRICT STABLE;

/*
 * What the job role holds in schema d365: USAGE; EXECUTE on every routine
 * of the extension but the trigger functions (which fire without it); on
 * the configuration SELECT, on the maps (which d365sync keeps in step with
 * the attachment), the state, history and queues SELECT, INSERT, UPDATE,
 * DELETE; USAGE on the sequences; and it owns the SECURITY DEFINER
 * functions.  Run by the install and upgrade scripts; computed from the
 * catalog.
 */
CREATE FUNCTION d365._job_role_grants()
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    o record;
    config_tables text[] := ARRAY['settings', 'app_users', 'contact_source', 'field_map',
        'activity_type_map', 'activity_mapper'];
BEGIN
    REVOKE ALL ON ALL FUNCTIONS IN SCHEMA d365 FROM PUBLIC;
    REVOKE ALL ON ALL PROCEDURES IN SCHEMA d365 FROM PUBLIC;
    GRANT USAGE ON SCHEMA d365 TO d365sync_job;
    FOR o IN SELECT p.oid::regprocedure AS f, p.prokind
               FROM pg_proc p
              WHERE p.pronamespace = 'd365'::regnamespace AND p.prorettype <> 'trigger'::regtype
                AND d365._is_member('pg_proc'::regclass, p.oid)
              ORDER BY 1 LOOP
        EXECUTE format('GRANT EXECUTE ON %s %s TO d365sync_job',
                       CASE WHEN o.prokind = 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END, o.f);
    END LOOP;
    FOR o IN SELECT c.oid::regclass AS t, c.relname, c.relkind
               FROM pg_class c
              WHERE c.relnamespace = 'd365'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'S')
                AND d365._is_member('pg_class'::regclass, c.oid)
              ORDER BY 1 LOOP
        IF o.relkind = 'S' THEN
            EXECUTE format('GRANT USAGE, SELECT ON SEQUENCE %s TO d365sync_job', o.t);
        ELSIF o.relname = ANY (config_tables) OR o.relkind = 'v' THEN
            EXECUTE format('GRANT SELECT ON %s TO d365sync_job', o.t);
        ELSE
            EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %s TO d365sync_job', o.t);
        END IF;
    END LOOP;
    -- the SECURITY DEFINER functions run as the job role, not as the
    -- superuser who installed the extension
    FOR o IN SELECT p.oid::regprocedure AS f, p.prokind
               FROM pg_proc p
              WHERE p.pronamespace = 'd365'::regnamespace AND p.prosecdef
                AND d365._is_member('pg_proc'::regclass, p.oid)
              ORDER BY 1 LOOP
        EXECUTE format('ALTER %s %s OWNER TO d365sync_job',
                       CASE WHEN o.prokind = 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END, o.f);
    END LOOP;
END;
$$;
REVOKE ALL ON FUNCTION d365._job_caller(), d365._caller_reads(regclass), d365._caller_rls(regclass),
       d365._job_role_grants() FROM PUBLIC;

SELECT d365._job_role_grants();
