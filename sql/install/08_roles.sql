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
