-- The throttling governor: the execution-time budget, not x-ms-dop-hint,
-- sets the pace.  With a hint above what the budget sustains, a sync keeps
-- at most 4 requests in flight per application user and is not throttled,
-- with or without the budget headers; when the budget is far smaller than
-- Dataverse's, the sync meets 429s but never sends as a user while it is
-- throttled (the simulator counts requests that arrive before a 429's
-- Retry-After has passed), and each contact is written once.
\ir sql/include/configured.sql
\set ECHO all
SET search_path = d365, public;
CREATE TEMP TABLE sim_req (j jsonb);
CREATE TEMP TABLE sim_stats (j jsonb);
CREATE TABLE paced (
    id         integer PRIMARY KEY,
    first_name text,
    last_name  text,
    score      integer NOT NULL
);
SELECT d365_attach_contacts('paced');
INSERT INTO field_map VALUES ('first_name', 'firstname'), ('last_name', 'lastname');

-- Dataverse's budget, 4 s of server time per second (here 1.2 s per 0.3 s),
-- 10 ms per operation, $batches of 10 (100 ms each), and a hint of 8: eight
-- batches in flight would spend twice the budget
\! "$D365_SIMCTL" config '{"latency_ms": 20, "per_record_ms": 10, "exec_budget_s": 1.2, "window_s": 0.3, "dop_hint": 8}'
\! "$D365_SIMCTL" reset-stats >/dev/null
SET d365sync.batch_size = 10;
SET d365sync.max_parallel = 8;
INSERT INTO paced SELECT g, 'Paced' || g, 'Budget', 20 FROM generate_series(1, 240) g;
SELECT created, failed FROM d365_sync_contacts();
\copy sim_stats from program '"$D365_SIMCTL" stats --copy'
SELECT j #>> '{users,22222222-2222-2222-2222-222222222222,max_inflight}' AS max_in_flight,
       j ->> 'throttled' AS throttled, j ->> 'sent_while_throttled' AS sent_while_throttled,
       j #>> '{rows,contact}' AS dynamics_contacts
  FROM sim_stats;

-- the same without the budget headers
\! "$D365_SIMCTL" config '{"ratelimit_headers": false, "exec_budget_s": 1.2}'
\! "$D365_SIMCTL" reset-stats >/dev/null
UPDATE paced SET last_name = 'Headless';
SELECT updated, failed FROM d365_sync_contacts();
TRUNCATE sim_stats;
\copy sim_stats from program '"$D365_SIMCTL" stats --copy'
SELECT j #>> '{users,22222222-2222-2222-2222-222222222222,max_inflight}' AS max_in_flight,
       j ->> 'throttled' AS throttled, j ->> 'sent_while_throttled' AS sent_while_throttled
  FROM sim_stats;

-- two application users: each has its own budget and its own pace
\! "$D365_SIMCTL" config '{"ratelimit_headers": true, "exec_budget_s": 1.2, "app_users": {"33333333-3333-4333-8333-333333333333": "pool-secret"}}'
\! "$D365_SIMCTL" reset-stats >/dev/null
INSERT INTO app_users (client_id, client_secret) VALUES
    ('33333333-3333-4333-8333-333333333333', 'pool-secret');
UPDATE paced SET last_name = 'Pooled';
SELECT updated, failed FROM d365_sync_contacts();
TRUNCATE sim_stats;
\copy sim_stats from program '"$D365_SIMCTL" stats --copy'
SELECT u.key AS client, (u.value ->> 'requests')::int > 0 AS sent,
       (u.value ->> 'max_inflight')::int <= 4 AS within_budget_level,
       u.value ->> 'throttled' AS throttled
  FROM sim_stats, jsonb_each(j -> 'users') u ORDER BY 1;
DELETE FROM app_users;

-- a budget far below Dataverse's (100 ms per second; a $batch of 5 is half
-- of it), a hint of 2 and chunks of 8 $batches: 429s, each answered by
-- waiting out its Retry-After as that user, the rest of the chunk included
\! "$D365_SIMCTL" config '{"latency_ms": 10, "per_record_ms": 20, "exec_budget_s": 0.1, "window_s": 1, "dop_hint": 2}'
\! "$D365_SIMCTL" reset-stats >/dev/null
\! "$D365_SIMCTL" clear-requests >/dev/null
SET d365sync.batch_size = 5;
SET d365sync.max_retries = 30;
DELETE FROM paced;
INSERT INTO paced SELECT g, 'Wall' || g, 'Budget', 20 FROM generate_series(1, 40) g;
SELECT created, failed FROM d365_sync_contacts();
TRUNCATE sim_stats;
\copy sim_stats from program '"$D365_SIMCTL" stats --copy'
SELECT (j ->> 'throttled')::int > 0 AS throttled, j ->> 'sent_while_throttled' AS sent_while_throttled
  FROM sim_stats;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
-- every contact written exactly once
SELECT count(*) AS written, count(DISTINCT j->>'path') AS distinct_contacts
  FROM sim_req WHERE j->>'method' = 'PATCH' AND j->>'status' LIKE '2%'
   AND j->>'path' ~ 'contacts\(';

RESET d365sync.batch_size;
RESET d365sync.max_parallel;
RESET d365sync.max_retries;
\! "$D365_SIMCTL" reset
