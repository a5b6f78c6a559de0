-- The shape of the sets beyond EXECUTE on documented entry points: which
-- internal functions no set holds, the outcome columns the operator set
-- writes of the activity log and the pending deletes, the guard of the sync
-- state's Dynamics ids, and what d365._get_all() reads for a role that is
-- not a superuser.  Attacks with a simulator: test/redteam_privilege.sh.
\set SHOW_CONTEXT never
\ir sql/include/app_contact.sql
SET client_min_messages = warning;
DO $$
DECLARE r name;
BEGIN
    FOREACH r IN ARRAY ARRAY['regress_pm_operator', 'regress_pm_admin', 'regress_pm_app'] LOOP
        IF EXISTS (SELECT FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('DROP OWNED BY %I CASCADE', r);
            EXECUTE format('DROP ROLE %I', r);
        END IF;
    END LOOP;
END $$;
RESET client_min_messages;
\set ECHO all
\set VERBOSITY terse
CREATE ROLE regress_pm_operator;
CREATE ROLE regress_pm_admin;
CREATE ROLE regress_pm_app;
SELECT d365.d365_grant('regress_pm_operator', 'operator');
SELECT d365.d365_grant('regress_pm_admin', 'admin');
SELECT d365.d365_grant('regress_pm_app', 'app');
GRANT SELECT, UPDATE ON app_contact TO regress_pm_operator, regress_pm_admin;

-- internal functions (by name) that are no trigger function and that no
-- set holds; every other internal function is the admin's, automatically
SELECT p.oid::regprocedure AS internal_for_no_set
  FROM pg_proc p
 WHERE p.pronamespace = 'd365'::regnamespace AND p.proname LIKE '\_%'
   AND p.prorettype <> 'trigger'::regtype
   AND NOT has_function_privilege('regress_pm_admin', p.oid, 'EXECUTE')
 ORDER BY p.oid::regprocedure::text COLLATE "C";
-- the jobs run as the job role d365sync_job: the operator holds no
-- internal function but the two d365_schedule() calls as its caller
-- (docs/security.md); a new one shows here and must be reviewed so
SELECT p.oid::regprocedure AS internal_for_operator
  FROM pg_proc p
 WHERE p.pronamespace = 'd365'::regnamespace AND p.proname LIKE '\_%'
   AND has_function_privilege('regress_pm_operator', p.oid, 'EXECUTE')
 ORDER BY p.oid::regprocedure::text COLLATE "C";

-- the internal functions in C that the operator set may call: d365._cron_host()
-- only, which reads one setting
SELECT p.oid::regprocedure AS internal_c_for_operator
  FROM pg_proc p
 WHERE p.pronamespace = 'd365'::regnamespace AND p.proname LIKE '\_%'
   AND p.prolang = (SELECT oid FROM pg_language WHERE lanname = 'c')
   AND has_function_privilege('regress_pm_operator', p.oid, 'EXECUTE')
 ORDER BY p.oid::regprocedure::text COLLATE "C";

-- the operator's column rights on the activity log and the pending deletes
SELECT c.relname, a.attname,
       has_column_privilege('regress_pm_operator', c.oid, a.attnum, 'SELECT') AS sel,
       has_column_privilege('regress_pm_operator', c.oid, a.attnum, 'INSERT') AS ins,
       has_column_privilege('regress_pm_operator', c.oid, a.attnum, 'UPDATE') AS upd
  FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
 WHERE c.oid IN ('d365.activity'::regclass, 'd365.map_delete'::regclass)
 ORDER BY c.relname, a.attnum;
SELECT has_table_privilege('regress_pm_operator', t, 'DELETE') AS op_deletes,
       has_table_privilege('regress_pm_admin', t, 'INSERT') AS admin_inserts
  FROM unnest(ARRAY['d365.activity', 'd365.map_delete']) t ORDER BY t;

-- the state's Dynamics ids: an operator may clear one, not set or move one
SELECT contact_key, dynamics_id IS NOT NULL AS linked FROM d365.contact_state ORDER BY 1;
SET ROLE regress_pm_operator;
UPDATE d365.contact_state SET dynamics_id = gen_random_uuid() WHERE contact_key = '1';
UPDATE d365.contact_state SET dynamics_id = (SELECT s.dynamics_id FROM d365.contact_state s WHERE s.contact_key = '1')
 WHERE contact_key = '3';
UPDATE d365.contact_state SET contact_key = '2' WHERE contact_key = '1';
INSERT INTO d365.contact_state (contact_key, change_seq, synced_seq, dynamics_id)
VALUES ('2', 1, 1, gen_random_uuid());
INSERT INTO d365.contact_state (contact_key, change_seq, synced_seq) VALUES ('7', 1, 1);
UPDATE d365.contact_state SET attempts = attempts + 1, last_error = 'noted' WHERE contact_key = '1';
UPDATE d365.contact_state SET dynamics_id = NULL WHERE contact_key = '3';
RESET ROLE;
SELECT contact_key, dynamics_id IS NOT NULL AS linked, last_error FROM d365.contact_state ORDER BY 1;
-- what Dynamics answered: a delta link, a cached metadata body
INSERT INTO d365.pull_state (entity, delta_link) VALUES ('contact', NULL);
INSERT INTO d365.metadata_cache (path, fetched_at, body) VALUES ('EntityDefinitions?$select=x', now(), '[]');
SET ROLE regress_pm_operator;
UPDATE d365.pull_state SET delta_link = 'accounts' WHERE entity = 'contact';
INSERT INTO d365.pull_state (entity, delta_link) VALUES ('map:x', 'accounts');
UPDATE d365.metadata_cache SET body = '[{"x": 1}]';
INSERT INTO d365.metadata_cache (path, fetched_at, body) VALUES ('EntityDefinitions?$select=y', now(), '[]');
UPDATE d365.metadata_cache SET fetched_at = now() - interval '2 hours';
UPDATE d365.pull_state SET delta_link = NULL, last_pull_at = now();
DELETE FROM d365.metadata_cache;
DELETE FROM d365.pull_state;
RESET ROLE;
-- an admin links by hand
SET ROLE regress_pm_admin;
UPDATE d365.contact_state SET dynamics_id = gen_random_uuid() WHERE contact_key = '3';
RESET ROLE;
SELECT contact_key, dynamics_id IS NOT NULL AS linked FROM d365.contact_state WHERE contact_key = '3';
-- the guard checks where it fires
CREATE TABLE pm_table (dynamics_id uuid, contact_key text);
CREATE TRIGGER state_guard BEFORE INSERT ON pm_table
    FOR EACH ROW EXECUTE FUNCTION d365._state_guard('dynamics_id', 'contact_key');
INSERT INTO pm_table VALUES (gen_random_uuid(), 'x');
DROP TABLE pm_table;

-- d365._get_all() for a role that is not a superuser: metadata and users
SET ROLE regress_pm_operator;
SELECT count(*) FROM d365._get_all('contacts?$select=lastname');
SELECT count(*) FROM d365._get_all('EntityDefinitions(LogicalName=''contact'')/../../contacts');
SELECT count(*) > 0 AS metadata FROM d365._get_all('EntityDefinitions(LogicalName=''contact'')/Attributes?$select=LogicalName');
RESET ROLE;
SET ROLE regress_pm_admin;
SELECT count(*) FROM d365._get_all('accounts');
SELECT d365._send_activity(1, true);
RESET ROLE;
SET ROLE regress_pm_app;
SELECT count(*) FROM d365._get_all('EntityDefinitions?$select=LogicalName');
RESET ROLE;
SELECT count(*) > 0 AS superuser_reads FROM d365._get_all('contacts?$select=lastname');

SELECT d365.d365_revoke('regress_pm_operator', 'operator');
SELECT d365.d365_revoke('regress_pm_admin', 'admin');
SELECT d365.d365_revoke('regress_pm_app', 'app');
REVOKE ALL ON app_contact FROM regress_pm_operator, regress_pm_admin;
DROP ROLE regress_pm_operator;
DROP ROLE regress_pm_admin;
DROP ROLE regress_pm_app;
