-- Service protection and a pool of application users: the execution-time
-- budget (429 0x80072321) never sends a contact twice, requests in flight
-- stay within x-ms-dop-hint, and a pool user whose secret is wrong is
-- reported and skipped while the others do the work.
\ir sql/include/configured.sql
\set ECHO all
SET search_path = d365, public;
CREATE TEMP TABLE sim_req (j jsonb);
CREATE TEMP TABLE sim_stats (j jsonb);
CREATE TABLE crowd (
    id         integer PRIMARY KEY,
    first_name text,
    last_name  text,
    score      integer NOT NULL
);
SELECT d365_attach_contacts('crowd');
INSERT INTO field_map VALUES ('first_name', 'firstname'), ('last_name', 'lastname');

-- the budget: 100 ms of server time per second, 20 ms per operation, so a
-- $batch of 5 uses half of it and the sync meets 429 0x80072321 again and
-- again; each contact is still written exactly once
\! "$D365_SIMCTL" config '{"per_record_ms": 20, "exec_budget_s": 0.1, "window_s": 1}'
SET d365sync.batch_size = 5;
SET d365sync.max_retries = 30;
INSERT INTO crowd SELECT g, 'Storm' || g, 'Budget', 20 FROM generate_series(1, 30) g;
SELECT created, failed FROM d365_sync_contacts();
SELECT throttled > 0 AS throttled, message FROM sync_run ORDER BY started_at DESC LIMIT 1;
SELECT count(*) FILTER (WHERE dynamics365_related_id IS NOT NULL) AS linked FROM crowd;
\copy sim_stats from program '"$D365_SIMCTL" stats --copy'
SELECT (j #>> '{users,22222222-2222-2222-2222-222222222222,throttled_by_code,0x80072321}')::int > 0
       AS budget_429s, j #>> '{rows,contact}' AS dynamics_contacts
  FROM sim_stats;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
-- every write that succeeded, per contact: each exactly once
SELECT count(*) AS written, count(DISTINCT j->>'path') AS distinct_contacts
  FROM sim_req WHERE j->>'method' = 'PATCH' AND j->>'status' LIKE '2%';
SELECT count(*) AS written_twice FROM (
    SELECT j->>'path' FROM sim_req WHERE j->>'method' = 'PATCH' AND j->>'status' LIKE '2%'
     GROUP BY 1 HAVING count(*) > 1) t;
-- a throttled $batch ran none of its operations
SELECT count(*) AS operations_of_throttled_batches
  FROM sim_req o JOIN sim_req b ON (o.j->>'batch')::int = (b.j->>'seq')::int
 WHERE b.j->>'status' = '429';

-- requests in flight: never more than the server's x-ms-dop-hint (2 here),
-- whatever d365sync.max_parallel allows
\! "$D365_SIMCTL" reset
\! "$D365_SIMCTL" config '{"latency_ms": 50, "dop_hint": 2}'
SET d365sync.batch_size = 2;
SET d365sync.max_parallel = 8;
DELETE FROM crowd;
INSERT INTO crowd SELECT g, 'Hint' || g, 'Parallel', 20 FROM generate_series(1, 30) g;
SELECT created, failed FROM d365_sync_contacts();
TRUNCATE sim_stats;
\copy sim_stats from program '"$D365_SIMCTL" stats --copy'
SELECT j #>> '{users,22222222-2222-2222-2222-222222222222,max_inflight}' AS max_in_flight
  FROM sim_stats;

-- a pool: two more application users, one with a wrong secret
\! "$D365_SIMCTL" reset
\! "$D365_SIMCTL" config '{"app_users": {"33333333-3333-4333-8333-333333333333": "pool-secret", "44444444-4444-4444-8444-444444444444": "right-secret"}}'
INSERT INTO app_users (client_id, client_secret) VALUES
    ('33333333-3333-4333-8333-333333333333', 'pool-secret'),
    ('44444444-4444-4444-8444-444444444444', 'wrong-secret');
SELECT client_id, source, enabled, user_id IS NOT NULL AS signed_in, problem
  FROM d365_whoami_all() ORDER BY source DESC, client_id;
DELETE FROM crowd;
INSERT INTO crowd SELECT g, 'Pool' || g, 'Member', 20 FROM generate_series(1, 24) g;
SELECT created, failed FROM d365_sync_contacts();
SELECT message FROM sync_run ORDER BY started_at DESC LIMIT 1;
SELECT count(*) FILTER (WHERE dynamics365_related_id IS NOT NULL) AS linked FROM crowd;
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
-- both working users sent, the one with the wrong secret did not
SELECT j->>'client' AS client, count(*) > 0 AS sent
  FROM sim_req WHERE j->>'batch' IS NULL AND j->>'status' LIKE '2%' GROUP BY 1 ORDER BY 1;
-- a disabled user is checked by d365_whoami_all() but not used by syncs
UPDATE app_users SET enabled = false WHERE client_id = '44444444-4444-4444-8444-444444444444';
SELECT client_id, enabled, problem IS NULL AS ok FROM d365_whoami_all() ORDER BY source DESC, client_id;

-- secrets: no grant, and never in a message
INSERT INTO app_users (client_id, client_secret) VALUES ('55555555-5555-4555-8555-555555555555', NULL);
INSERT INTO app_users (client_id, client_secret) VALUES ('33333333-3333-4333-8333-333333333333', 'another-secret');
SELECT has_table_privilege('public', 'd365.app_users', 'SELECT') AS public_reads_secrets;
SELECT pg_catalog.pg_get_userbyid(relowner) = current_user AS owned_by_installer
  FROM pg_class WHERE oid = 'd365.app_users'::regclass;
DELETE FROM app_users;
RESET d365sync.batch_size;
RESET d365sync.max_parallel;
RESET d365sync.max_retries;
\! "$D365_SIMCTL" reset
