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
