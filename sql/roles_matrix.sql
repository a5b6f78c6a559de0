-- The sets of rights of d365_grant(): what a role holding each one can and
-- cannot do.  Every routine of schema d365 is taken from the catalog and
-- called as a role of each set; a call is refused for want of EXECUTE
-- exactly where the catalog says the set lacks it.
\set SHOW_CONTEXT never
\ir sql/include/app_contact.sql
SET client_min_messages = warning;
DO $$
DECLARE r name;
BEGIN
    FOREACH r IN ARRAY ARRAY['regress_rm_monitor', 'regress_rm_operator', 'regress_rm_admin',
                             'regress_rm_app', 'regress_rm_none', 'regress_rm_other'] LOOP
        IF EXISTS (SELECT FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('DROP OWNED BY %I CASCADE', r);
            EXECUTE format('DROP ROLE %I', r);
        END IF;
    END LOOP;
END $$;
RESET client_min_messages;
\set ECHO all
\set VERBOSITY terse

CREATE ROLE regress_rm_monitor;
CREATE ROLE regress_rm_operator;
CREATE ROLE regress_rm_admin;
CREATE ROLE regress_rm_app;
CREATE ROLE regress_rm_none;
CREATE ROLE regress_rm_other;
SELECT d365.d365_grant('regress_rm_monitor', 'monitor');
SELECT d365.d365_grant('regress_rm_operator', 'operator');
SELECT d365.d365_grant('regress_rm_admin', 'admin');
SELECT d365.d365_grant('regress_rm_app', 'app');
-- the application's table is the application's: its owner grants it
GRANT SELECT, UPDATE ON app_contact TO regress_rm_operator, regress_rm_admin, regress_rm_app;
SELECT d365.d365_grant('regress_rm_none', 'everything');
SELECT d365.d365_grant(NULL, 'monitor');

-- ---------------------------------------------------------------------------
-- The routines: who may execute each (from the catalog).
-- ---------------------------------------------------------------------------
CREATE TEMP VIEW rm_sets (set_name, role_name) AS
    VALUES ('monitor', 'regress_rm_monitor'), ('operator', 'regress_rm_operator'),
           ('admin', 'regress_rm_admin'), ('app', 'regress_rm_app'), ('none', 'regress_rm_none');
SELECT p.oid::regprocedure AS routine,
       has_function_privilege('regress_rm_monitor', p.oid, 'EXECUTE') AS monitor,
       has_function_privilege('regress_rm_operator', p.oid, 'EXECUTE') AS operator,
       has_function_privilege('regress_rm_admin', p.oid, 'EXECUTE') AS admin,
       has_function_privilege('regress_rm_app', p.oid, 'EXECUTE') AS app,
       has_function_privilege('regress_rm_none', p.oid, 'EXECUTE') AS "none"
  FROM pg_proc p
 WHERE p.pronamespace = 'd365'::regnamespace AND p.proname NOT LIKE '\_%'
 ORDER BY p.oid::regprocedure::text;
-- the internal functions: the trigger functions for nobody; the others for
-- the admin only (the jobs and d365_update_contact() run them as the job
-- role), but d365._jobs() and d365._cron_host() for the operator too
-- (d365_schedule() calls them as its caller)
SELECT DISTINCT p.prorettype = 'trigger'::regtype AS trigger_function,
       array_remove(ARRAY[
           CASE WHEN has_function_privilege('regress_rm_monitor', p.oid, 'EXECUTE') THEN 'monitor' END,
           CASE WHEN has_function_privilege('regress_rm_operator', p.oid, 'EXECUTE') THEN 'operator' END,
           CASE WHEN has_function_privilege('regress_rm_admin', p.oid, 'EXECUTE') THEN 'admin' END,
           CASE WHEN has_function_privilege('regress_rm_app', p.oid, 'EXECUTE') THEN 'app' END,
           CASE WHEN has_function_privilege('regress_rm_none', p.oid, 'EXECUTE') THEN 'none' END], NULL)
           AS executable_by
  FROM pg_proc p
 WHERE p.pronamespace = 'd365'::regnamespace AND p.proname LIKE '\_%'
 ORDER BY 1, 2;
SELECT p.oid::regprocedure AS internal_for_app
  FROM pg_proc p
 WHERE p.pronamespace = 'd365'::regnamespace AND p.proname LIKE '\_%'
   AND has_function_privilege('regress_rm_app', p.oid, 'EXECUTE')
 ORDER BY p.oid::regprocedure::text;

-- Each routine called as each role, with NULL arguments, in a
-- subtransaction that is rolled back: "denied" when PostgreSQL refused the
-- call for want of EXECUTE (or of USAGE on the schema).
CREATE TEMP TABLE rm_call (set_name text, routine regprocedure, outcome text, sqlstate text);
DO $$
DECLARE
    s record;
    p record;
    args text;
    stmt text;
    state text;
    msg text;
    outcome text;
BEGIN
    FOR s IN SELECT * FROM rm_sets LOOP
        FOR p IN SELECT f.oid, f.oid::regprocedure AS sig, f.prokind, f.proargtypes
                   FROM pg_proc f WHERE f.pronamespace = 'd365'::regnamespace LOOP
            -- each NULL in a sub-select: a STRICT function called with a
            -- constant NULL is folded away by the planner, uncalled
            SELECT coalesce(string_agg(format(CASE p.prokind WHEN 'p' THEN 'NULL::%s' ELSE '(SELECT NULL::%s)' END,
                       CASE t WHEN 'anyelement'::regtype THEN 'integer'
                              WHEN 'anyarray'::regtype THEN 'integer[]'
                              ELSE format_type(t, NULL) END), ', ' ORDER BY o), '')
              INTO args FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY u(t, o);
            stmt := format('%s %s.%I(%s)', CASE p.prokind WHEN 'p' THEN 'CALL' ELSE 'SELECT' END,
                           'd365', (SELECT proname FROM pg_proc WHERE oid = p.oid), args);
            outcome := 'called';
            state := NULL;
            BEGIN
                EXECUTE format('SET LOCAL ROLE %I', s.role_name);
                SET LOCAL statement_timeout = '20s';
                EXECUTE stmt;
                RAISE EXCEPTION USING ERRCODE = 'U0001';     -- roll the call back
            EXCEPTION WHEN OTHERS THEN
                GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
                IF state = 'U0001' THEN
                    state := NULL;
                ELSIF state = '42501' AND msg ~ '^permission denied for (function|procedure|schema d365)' THEN
                    outcome := 'denied';
                END IF;
            END;
            INSERT INTO rm_call VALUES (s.set_name, p.sig, outcome, state);
        END LOOP;
    END LOOP;
END $$;
RESET ROLE;
-- a call refused exactly where the catalog says no
SELECT c.set_name, c.routine, c.outcome, c.sqlstate
  FROM rm_call c JOIN rm_sets s USING (set_name)
 WHERE (c.outcome = 'denied') = has_function_privilege(s.role_name, c.routine, 'EXECUTE')
 ORDER BY 1, 2;
SELECT set_name, count(*) = (SELECT count(*) FROM pg_proc WHERE pronamespace = 'd365'::regnamespace) AS all_tried,
       bool_or(outcome = 'called') AS some_called, bool_or(outcome = 'denied') AS some_denied
  FROM rm_call GROUP BY 1 ORDER BY 1;
-- no call ended the session or reached a superuser
SELECT rolname, rolsuper FROM pg_roles WHERE rolname LIKE 'regress\_rm\_%' AND rolsuper;

-- ---------------------------------------------------------------------------
-- The tables and views: the privileges each set holds.
-- ---------------------------------------------------------------------------
SELECT c.oid::regclass AS relation,
       (SELECT string_agg(priv, ',' ORDER BY o) FROM unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE',
                'TRUNCATE', 'REFERENCES', 'TRIGGER']) WITH ORDINALITY x(priv, o)
         WHERE has_table_privilege(s.role_name, c.oid, priv)
            OR (priv = 'SELECT' AND has_any_column_privilege(s.role_name, c.oid, 'SELECT'))) AS privileges,
       s.set_name
  FROM pg_class c CROSS JOIN rm_sets s
 WHERE c.relnamespace = 'd365'::regnamespace AND c.relkind IN ('r', 'p', 'v') AND s.set_name <> 'none'
   AND EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                  AND d.deptype = 'e')
 ORDER BY 3, 1 \crosstabview relation set_name privileges
-- the secrets: only the admin set reads them
SELECT s.set_name, has_column_privilege(s.role_name, 'd365.settings', 'client_secret', 'SELECT') AS settings_secret,
       has_column_privilege(s.role_name, 'd365.app_users', 'client_secret', 'SELECT') AS app_users_secret
  FROM rm_sets s ORDER BY 1;

-- ---------------------------------------------------------------------------
-- What each set can do, and what it cannot.
-- ---------------------------------------------------------------------------
-- monitor: the status, the history and the progress; nothing else
SET ROLE regress_rm_monitor;
SELECT count(*) > 10 AS status FROM d365.d365_status();
SELECT count(*) >= 1 AS history FROM d365.sync_run;
SELECT count(*) AS running FROM d365.run_progress;
SELECT org_url FROM d365.settings;
SELECT * FROM d365.d365_sync_contacts();
RESET ROLE;

-- operator: runs the jobs, never reads the secret, changes no settings
SET ROLE regress_rm_operator;
UPDATE app_contact SET email = 'ada@operator.example' WHERE id = 1;
SELECT created, updated, failed FROM d365.d365_sync_contacts();
SELECT updated, failed FROM d365.d365_pull_changes();
SELECT failed FROM d365.d365_sync_activities();
SELECT org_url IS NOT NULL AS sees_org_url FROM d365.settings;
SELECT client_secret FROM d365.settings;
UPDATE d365.settings SET min_score = 1;
INSERT INTO d365.field_map VALUES ('note', 'description');
SELECT d365.d365_grant('regress_rm_other', 'monitor');
SELECT d365.d365_log_activity(1, 'phonecall', 'by the operator');
RESET ROLE;

-- app: logs activities and applies Dynamics edits; no status, no jobs
SELECT dynamics365_related_id AS ada FROM app_contact WHERE id = 1 \gset
SET ROLE regress_rm_app;
SELECT d365.d365_log_activity(1, 'phonecall', 'by the application') > 0 AS logged;
SELECT d365.d365_update_contact(jsonb_build_object('contactid', :'ada', 'firstname', 'Ada App'));
SELECT * FROM d365.d365_status();
SELECT * FROM d365.d365_sync_contacts();
SELECT count(*) FROM d365.activity;
RESET ROLE;

-- admin: the settings, the maps, the secrets, and granting the sets
SET ROLE regress_rm_admin;
UPDATE d365.settings SET min_score = 10;
SELECT client_secret IS NOT NULL AS reads_secret FROM d365.settings;
INSERT INTO d365.activity_type_map (activity_type, dynamics_entity) VALUES ('visit', 'appointment');
DELETE FROM d365.activity_type_map WHERE activity_type = 'visit';
SELECT d365.d365_grant('regress_rm_other', 'operator');
SELECT d365.d365_grant('regress_rm_other', 'app');
-- ... but never more than the admin set: no trigger, truncate or reference
-- right on d365's tables to pass on, nor one to take
GRANT TRIGGER ON d365.activity TO regress_rm_other;
GRANT TRUNCATE ON d365.sync_run TO regress_rm_admin;
GRANT EXECUTE ON FUNCTION d365._contact_capture_delete() TO regress_rm_other;
CREATE TRIGGER rm_grab AFTER INSERT ON d365.activity
    FOR EACH STATEMENT EXECUTE FUNCTION d365._activity_retry_now();
SELECT d365.d365_revoke('regress_rm_other', 'app');
RESET ROLE;
SELECT has_table_privilege('regress_rm_other', 'd365.activity', 'TRIGGER') AS other_trigger,
       has_table_privilege('regress_rm_admin', 'd365.sync_run', 'TRUNCATE') AS admin_truncate,
       has_function_privilege('regress_rm_other', 'd365._contact_capture_delete()', 'EXECUTE') AS other_trigger_function,
       has_function_privilege('regress_rm_other', 'd365.d365_sync_contacts()', 'EXECUTE') AS other_operator,
       has_function_privilege('regress_rm_other', 'd365.d365_log_activity(anyelement, text, text, jsonb, timestamptz)', 'EXECUTE') AS other_app;

-- the admin set, and no other, may create a server for live reads
SELECT has_foreign_data_wrapper_privilege('regress_rm_admin', 'd365_fdw', 'USAGE') AS admin_fdw,
       has_foreign_data_wrapper_privilege('regress_rm_operator', 'd365_fdw', 'USAGE') AS operator_fdw,
       has_foreign_data_wrapper_privilege('regress_rm_monitor', 'd365_fdw', 'USAGE') AS monitor_fdw,
       has_foreign_data_wrapper_privilege('regress_rm_app', 'd365_fdw', 'USAGE') AS app_fdw;
SET ROLE regress_rm_operator;
CREATE SERVER rm_operator_server FOREIGN DATA WRAPPER d365_fdw;
SET ROLE regress_rm_admin;
CREATE SERVER rm_admin_server FOREIGN DATA WRAPPER d365_fdw;
RESET ROLE;
SELECT srvname, srvowner::regrole FROM pg_foreign_server WHERE srvname LIKE 'rm\_%';

-- d365_revoke takes a set back
SELECT d365.d365_revoke('regress_rm_operator', 'operator');
SELECT has_function_privilege('regress_rm_operator', 'd365.d365_sync_contacts()', 'EXECUTE') AS can_sync,
       has_table_privilege('regress_rm_operator', 'd365.contact_state', 'SELECT') AS reads_state,
       has_schema_privilege('regress_rm_operator', 'd365', 'USAGE') AS uses_schema;

-- an admin takes back what it gave (a superuser's REVOKE acts as the
-- objects' owner, and leaves the grants of others)
SET ROLE regress_rm_admin;
SELECT d365.d365_revoke('regress_rm_other', 'operator');
RESET ROLE;
SELECT has_function_privilege('regress_rm_other', 'd365.d365_sync_contacts()', 'EXECUTE') AS other_operator,
       has_any_column_privilege('regress_rm_other', 'd365.settings', 'SELECT') AS other_reads_settings;
SET client_min_messages = warning;
SELECT d365.d365_revoke('regress_rm_admin', 'admin');
SELECT has_foreign_data_wrapper_privilege('regress_rm_admin', 'd365_fdw', 'USAGE') AS admin_fdw_after_revoke;
SELECT d365.d365_revoke('regress_rm_monitor', 'monitor');
SELECT d365.d365_revoke('regress_rm_app', 'app');
RESET client_min_messages;
DROP OWNED BY regress_rm_monitor, regress_rm_operator, regress_rm_admin, regress_rm_app,
              regress_rm_none, regress_rm_other;
DROP ROLE regress_rm_monitor, regress_rm_operator, regress_rm_admin, regress_rm_app,
          regress_rm_none, regress_rm_other;
