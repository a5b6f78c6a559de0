-- The governor spends a window's unspent budget: while its accounting of
-- the trailing window (and the server's time left) shows room, a user
-- keeps up to the hint in flight, above the sustained level (budget /
-- window); as the window fills it falls back and is never throttled.
-- Read from the simulator's stats: the most requests one user had in
-- flight, the 429s, the server time spent.
\ir sql/include/configured.sql
\set ECHO all
SET search_path = d365, public;
CREATE TEMP TABLE sim_stats (j jsonb);
CREATE TABLE burst (
    id         integer PRIMARY KEY,
    first_name text,
    last_name  text,
    score      integer NOT NULL
);
SELECT d365_attach_contacts('burst');
INSERT INTO field_map VALUES ('first_name', 'firstname'), ('last_name', 'lastname');

-- the budget and window are superuser settings: another role may not
-- raise them
CREATE ROLE burst_someone;
SET ROLE burst_someone;
SET d365sync.budget_seconds = 100000;
RESET ROLE;
DROP ROLE burst_someone;

-- 4 s of server time per second over a 6 s window (24 s), told to the
-- governor; 10 ms per operation, $batches of 10 (100 ms), a hint of 8
\! "$D365_SIMCTL" config '{"latency_ms": 10, "per_record_ms": 10, "exec_budget_s": 24, "window_s": 6, "dop_hint": 8}'
\! "$D365_SIMCTL" reset-stats >/dev/null
SET d365sync.budget_seconds = 24;
SET d365sync.budget_window_seconds = 6;
SET d365sync.batch_size = 10;
SET d365sync.max_parallel = 8;
SHOW d365sync.budget_seconds;

-- an empty window: 24 $batches (2.4 s of 24) go 8 at a time
INSERT INTO burst SELECT g, 'Burst' || g, 'Room', 20 FROM generate_series(1, 240) g;
SELECT created, failed FROM d365_sync_contacts();
\copy sim_stats from program '"$D365_SIMCTL" stats --copy'
SELECT j #>> '{users,22222222-2222-2222-2222-222222222222,max_inflight}' AS max_in_flight,
       j ->> 'throttled' AS throttled
  FROM sim_stats;

-- 3,000 contacts: 30 s of server time, more than the window's whole
-- budget, which at 8 in flight would be spent in 3 s.  It starts at 8 and
-- falls back as the window fills: more than the budget spent, no 429.
\! "$D365_SIMCTL" reset-stats >/dev/null
INSERT INTO burst SELECT g, 'Burst' || g, 'Fill', 20 FROM generate_series(241, 3240) g;
SELECT created, failed FROM d365_sync_contacts();
TRUNCATE sim_stats;
\copy sim_stats from program '"$D365_SIMCTL" stats --copy'
SELECT j #>> '{users,22222222-2222-2222-2222-222222222222,max_inflight}' AS max_in_flight,
       (j #>> '{users,22222222-2222-2222-2222-222222222222,server_s}')::numeric > 24
           AS spent_more_than_the_budget,
       j ->> 'throttled' AS throttled, j ->> 'sent_while_throttled' AS sent_while_throttled
  FROM sim_stats;

-- without the budget headers nothing shows what other sessions spent in
-- the window: the sustained level, no more (once the window has emptied)
\! sleep 7
\! "$D365_SIMCTL" config '{"ratelimit_headers": false}'
\! "$D365_SIMCTL" reset-stats >/dev/null
UPDATE burst SET last_name = 'Headless' WHERE id <= 240;
SELECT updated, failed FROM d365_sync_contacts();
TRUNCATE sim_stats;
\copy sim_stats from program '"$D365_SIMCTL" stats --copy'
SELECT j #>> '{users,22222222-2222-2222-2222-222222222222,max_inflight}' AS max_in_flight,
       j ->> 'throttled' AS throttled
  FROM sim_stats;

-- the governor told a budget larger than the server's: the time left
-- still bounds it (1.2 s per 3 s on the server, 24 s per 6 s told)
\! "$D365_SIMCTL" config '{"ratelimit_headers": true, "exec_budget_s": 1.2, "window_s": 3}'
\! "$D365_SIMCTL" reset-stats >/dev/null
UPDATE burst SET last_name = 'Told' WHERE id <= 240;
SELECT updated + failed AS items FROM d365_sync_contacts();
TRUNCATE sim_stats;
\copy sim_stats from program '"$D365_SIMCTL" stats --copy'
SELECT (j #>> '{users,22222222-2222-2222-2222-222222222222,max_inflight}')::int <= 4
           AS at_most_sustained
  FROM sim_stats;

RESET d365sync.budget_seconds;
RESET d365sync.budget_window_seconds;
RESET d365sync.batch_size;
RESET d365sync.max_parallel;
\! "$D365_SIMCTL" reset
