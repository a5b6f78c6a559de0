-- Operations: a running run's progress seen from another session, the job
-- procedure pg_cron runs, run-history retention, and schedules that change
-- only what they name.
\set SHOW_CONTEXT never
\ir sql/include/app_contact.sql
\set ECHO all
SET search_path = public, d365;
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS dblink;
DROP EXTENSION IF EXISTS pg_cron;
RESET client_min_messages;
CREATE EXTENSION dblink;

-- progress: a slow run in another session, one contact at a time
UPDATE app_contact SET dynamics365_related_id = NULL, dynamics365_synchronized_on = NULL;
TRUNCATE d365.contact_state;
INSERT INTO d365.contact_state (contact_key) SELECT id::text FROM app_contact;
\! "$D365_SIMCTL" fault '{"method": "PATCH", "delay_ms": 500, "times": null}'
SELECT dblink_connect('other', 'dbname=' || current_database() || ' application_name=regress_progress');
SELECT dblink_exec('other', 'SET d365sync.batch_size = 1');
SELECT dblink_exec('other', 'SET d365sync.max_parallel = 1');
SELECT dblink_send_query('other', 'SELECT created, failed FROM d365.d365_sync_contacts()');
-- what another session sees once the run has finished one contact, taken
-- in one snapshot of the backends (at most 20 s of waiting)
CREATE TEMP TABLE progress_seen AS SELECT * FROM d365.run_progress WITH NO DATA;
CREATE TEMP TABLE status_seen (item text, value text);
CREATE TEMP TABLE activity_seen (query text, wait_event_type text, wait_event text);
DO $$
BEGIN
    FOR i IN 1 .. 400 LOOP
        PERFORM pg_stat_clear_snapshot();
        INSERT INTO progress_seen SELECT * FROM d365.run_progress WHERE done >= 1;
        IF FOUND THEN
            INSERT INTO status_seen SELECT * FROM d365.d365_status() WHERE item LIKE 'running:%';
            INSERT INTO activity_seen SELECT query, NULL, NULL FROM pg_stat_activity
             WHERE application_name = 'regress_progress';
            EXIT;
        END IF;
        PERFORM pg_sleep(0.05);
    END LOOP;
END;
$$;
-- five contacts qualify: done + failed + remaining adds up to them
SELECT kind, done + failed + remaining AS items, requests > done AS requests_counted,
       throttled, started_at <= now() AS started,
       pid = (SELECT pid FROM pg_stat_activity WHERE application_name = 'regress_progress') AS its_pid
  FROM progress_seen;
SELECT item, value ~ '^since .* \(pid [0-9]+\): [0-9]+ done, 0 failed, [0-9]+ remaining, [0-9]+ requests, 0 throttled$' AS value_ok
  FROM status_seen;
-- pg_stat_activity: the query behind a comment with the same numbers
SELECT query LIKE '/* d365sync: contacts run since % UTC: % done, % failed, % remaining, % requests, % throttled */ SELECT created, failed FROM d365.d365_sync_contacts()' AS progress_comment
  FROM activity_seen;
-- waiting for the server is a wait, not busy work (at most 10 s to see it)
DO $$
BEGIN
    FOR i IN 1 .. 1000 LOOP
        PERFORM pg_stat_clear_snapshot();
        INSERT INTO activity_seen SELECT NULL, wait_event_type, wait_event FROM pg_stat_activity
         WHERE application_name = 'regress_progress' AND wait_event_type = 'Extension';
        EXIT WHEN FOUND;
        PERFORM pg_sleep(0.01);
    END LOOP;
END;
$$;
SELECT wait_event_type, wait_event FROM activity_seen WHERE wait_event IS NOT NULL;
SELECT * FROM dblink_get_result('other') AS t(created int, failed int);
SELECT * FROM dblink_get_result('other') AS t(created int, failed int);
\! "$D365_SIMCTL" clear-faults
-- the run is over: no progress, and the session shows its query again
SELECT count(*) FROM d365.run_progress;
SELECT query FROM pg_stat_activity WHERE application_name = 'regress_progress';
SELECT dblink_disconnect('other');

-- the job procedure: a run that fails is recorded, committed, then raised
CALL d365.d365_run_job('contacts');
SELECT kind, created, message FROM d365.sync_run ORDER BY id DESC LIMIT 1;
UPDATE d365.settings SET client_secret = 'an-expired-secret';
UPDATE app_contact SET first_name = 'Ada Augusta' WHERE id = 1;
\set VERBOSITY default
CALL d365.d365_run_job('contacts');
\set VERBOSITY terse
SELECT kind, message FROM d365.sync_run ORDER BY id DESC LIMIT 1;
SELECT message FROM d365.sync_run WHERE id = currval('d365.sync_run_id_seq');
CALL d365.d365_run_job('payroll');
BEGIN;
CALL d365.d365_run_job('activities');
ROLLBACK;
UPDATE d365.settings SET client_secret = 'sim-secret';

-- retention: runs older than run_history_retention go at the next job run;
-- the newest run of each kind stays
SELECT run_history_retention FROM d365.settings;
UPDATE d365.settings SET run_history_retention = '10 minutes';
UPDATE d365.settings SET run_history_retention = '-1 day';
INSERT INTO d365.sync_run (kind, started_at, finished_at, message) VALUES
    ('contacts', now() - interval '40 days', now() - interval '40 days', 'old contacts'),
    ('pull', now() - interval '50 days', now() - interval '50 days', 'old pull'),
    ('pull', now() - interval '45 days', now() - interval '45 days', 'newest pull'),
    ('contacts', now() - interval '20 days', now() - interval '20 days', 'recent contacts');
SELECT created FROM d365_sync_contacts();
SELECT kind, message FROM d365.sync_run WHERE message IN ('old contacts', 'old pull', 'newest pull', 'recent contacts')
 ORDER BY id;
UPDATE d365.settings SET run_history_retention = '7 days';
CALL d365.d365_run_job('activities');
SELECT kind, message FROM d365.sync_run WHERE message IN ('old contacts', 'old pull', 'newest pull', 'recent contacts')
 ORDER BY id;
SELECT count(*) AS older_than_a_week FROM d365.sync_run
 WHERE finished_at < now() - interval '7 days'
   AND id <> (SELECT max(id) FROM d365.sync_run r WHERE r.kind = sync_run.kind);
UPDATE d365.settings SET run_history_retention = DEFAULT;

-- schedules: only what a call names changes
CREATE EXTENSION pg_cron;
SELECT * FROM d365_schedule();
SELECT * FROM d365_schedule(pull => '*/5 * * * *');
SELECT * FROM d365_schedule(contacts => '*/15 * * * *', activities => NULL);
SELECT * FROM d365_schedule(activities => 'off', pull => 'keep');
-- no argument: the missing default jobs come back, the others stay
SELECT * FROM d365_schedule();
-- a job scheduled under another cron.host, or with 0.1's command, is
-- brought up to date when d365_schedule() keeps or changes it
UPDATE cron.job SET nodename = 'elsewhere' WHERE jobname = 'd365-contact-sync';
UPDATE cron.job SET command = 'SELECT d365.d365_pull_changes()' WHERE jobname = 'd365-pull-changes';
SELECT * FROM d365_schedule(contacts => '*/10 * * * *');
SELECT jobname, schedule, nodename = current_setting('cron.host') AS current_host
  FROM cron.job ORDER BY jobname;
SELECT d365_unschedule();
