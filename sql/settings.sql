-- Settings: defaults, write-time validation, privileges, GUCs.
\set SHOW_CONTEXT never
\ir sql/include/fresh.sql
\set ECHO all
SET search_path = d365, public;

-- the single row and its defaults
SELECT org_url, tenant_id, client_id, client_secret, authority_url, api_version,
       contact_sync_enabled, min_score, activity_sync_enabled, default_owner,
       instance_id IS NOT NULL AS has_instance_id
  FROM d365.settings;

-- accepted values; a trailing slash is dropped
UPDATE d365.settings
   SET org_url = 'https://contoso.crm4.dynamics.com/',
       tenant_id = '72f988bf-86f1-41af-91ab-2d7cd011db47',
       client_id = '51f81489-12ee-4a9e-aaae-a2591f45987d',
       client_secret = 'not-a-real-secret',
       min_score = 50,
       default_owner = '/teams(1b0a5c4e-6f3d-4a2b-9c8d-7e6f5a4b3c2d)';
SELECT org_url, tenant_id, client_id, min_score, default_owner FROM d365.settings;
UPDATE d365.settings SET tenant_id = 'contoso.onmicrosoft.com';
UPDATE d365.settings SET org_url = 'http://127.0.0.1:8080';
UPDATE d365.settings SET org_url = 'http://localhost:8080';
UPDATE d365.settings SET org_url = 'http://[::1]:8080';
UPDATE d365.settings SET default_owner = '/systemusers(1b0a5c4e-6f3d-4a2b-9c8d-7e6f5a4b3c2d)';
UPDATE d365.settings SET default_owner = NULL;

-- rejected values: each error says which setting and why
\set VERBOSITY default
UPDATE d365.settings SET org_url = 'http://contoso.crm4.dynamics.com';
UPDATE d365.settings SET org_url = 'http://10.0.0.5';
UPDATE d365.settings SET org_url = 'ftp://contoso.crm4.dynamics.com';
UPDATE d365.settings SET org_url = 'contoso.crm4.dynamics.com';
UPDATE d365.settings SET org_url = 'https://admin:hunter2@contoso.crm4.dynamics.com';
UPDATE d365.settings SET authority_url = 'http://login.microsoftonline.com';
UPDATE d365.settings SET tenant_id = 'not a tenant!';
UPDATE d365.settings SET client_id = 'abc';
UPDATE d365.settings SET min_score = -1;
UPDATE d365.settings SET default_owner = '/systemusers(abc)';
UPDATE d365.settings SET default_owner = '/accounts(1b0a5c4e-6f3d-4a2b-9c8d-7e6f5a4b3c2d)';
UPDATE d365.settings SET api_version = '9.2';
DELETE FROM d365.settings;
\set VERBOSITY terse

-- nothing above changed the row
SELECT org_url, tenant_id, min_score, default_owner, api_version FROM d365.settings;

-- the table keeps one row: an INSERT (as pg_dump's restore does) replaces it
INSERT INTO d365.settings (org_url, min_score) VALUES ('https://fabrikam.crm.dynamics.com', 7);
SELECT count(*), min(org_url), min(min_score) FROM d365.settings;

-- privileges: nothing for PUBLIC but the internals of d365_update_contact(),
-- which runs with its caller's rights (they run as the caller, run no user
-- code, or check the caller's right to update contacts)
SELECT p.oid::regprocedure AS public_may_execute
  FROM pg_proc p
 WHERE p.pronamespace = 'd365'::regnamespace
   AND (p.proacl IS NULL OR EXISTS (SELECT FROM aclexplode(p.proacl) a
                                     WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE'))
 ORDER BY p.oid::regprocedure::text;
SELECT count(*) AS tables_public_may_read
  FROM pg_class c
 WHERE c.relnamespace = 'd365'::regnamespace AND c.relkind IN ('r', 'v')
   AND has_table_privilege('public', c.oid, 'SELECT');

CREATE ROLE regress_app;
SET ROLE regress_app;
SELECT org_url FROM d365.settings;
SELECT d365.d365_whoami();
RESET ROLE;

-- the README's grants: settings without the secret, and the functions
GRANT USAGE ON SCHEMA d365 TO regress_app;
GRANT SELECT (org_url, tenant_id, client_id, authority_url, api_version,
              contact_sync_enabled, min_score, activity_sync_enabled,
              default_owner) ON d365.settings TO regress_app;
SET ROLE regress_app;
SELECT org_url, min_score FROM d365.settings;
SELECT client_secret FROM d365.settings;
SELECT * FROM d365.settings;
RESET d365sync.ca_file;
SET d365sync.ca_file = '/tmp/evil.pem';
SET d365sync.request_timeout_ms = 5000;
RESET ROLE;
SET d365sync.no_such_setting = 1;
SHOW d365sync.max_response_size;
SHOW d365sync.request_timeout_ms;
RESET d365sync.request_timeout_ms;

REVOKE ALL ON d365.settings FROM regress_app;
REVOKE ALL ON SCHEMA d365 FROM regress_app;
DROP ROLE regress_app;

-- the background worker's settings: realtime, and pull_interval of 5 s or
-- more; without the preload a WARNING says no worker runs (the scheduled
-- jobs still do the work), and d365_status() says so
SELECT realtime, pull_interval FROM d365.settings;
UPDATE d365.settings SET pull_interval = '4 seconds';
UPDATE d365.settings SET pull_interval = '-1 minute';
UPDATE d365.settings SET realtime = true, pull_interval = '5 seconds';
SELECT realtime, pull_interval FROM d365.settings;
SELECT item, value FROM d365.d365_status()
 WHERE item IN ('realtime', 'pull interval', 'worker', 'worker last wake');
SELECT preloaded, running, pid, state FROM d365._worker_state();
UPDATE d365.settings SET realtime = false, pull_interval = NULL;
