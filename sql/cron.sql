-- A failed scheduled run, run by pg_cron itself: cron.job_run_details says
-- failed and d365.sync_run keeps the run.  pg_cron 1.4 runs a job at most
-- once a minute: this suite waits for the next minute (at most 75 s).
\set SHOW_CONTEXT never
\ir sql/include/app_contact.sql
\set ECHO all
SET search_path = public, d365;
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS pg_cron;
RESET client_min_messages;
CREATE EXTENSION pg_cron;

-- a contact run that fails: the client secret has expired
UPDATE d365.settings SET client_secret = 'an-expired-secret';
UPDATE app_contact SET first_name = 'Ada Augusta' WHERE id = 1;
SELECT max(id) AS last_run FROM d365.sync_run \gset
SELECT * FROM d365_schedule(contacts => '* * * * *', activities => NULL, pull => NULL);
DO $$
BEGIN
    FOR i IN 1 .. 750 LOOP
        EXIT WHEN EXISTS (SELECT FROM cron.job_run_details d JOIN cron.job j USING (jobid)
                           WHERE j.jobname = 'd365-contact-sync' AND d.status IN ('succeeded', 'failed'));
        PERFORM pg_sleep(0.1);
    END LOOP;
END;
$$;
SELECT d365_unschedule();
SELECT d.status, d.command,
       d.return_message LIKE '%d365sync contacts run failed: could not obtain an access token from Microsoft Entra ID%' AS says_why
  FROM cron.job_run_details d
 WHERE d.command = 'CALL d365.d365_run_job(''contacts'')'
 ORDER BY d.runid LIMIT 1;
-- the run's record was committed before the error
SELECT kind, message FROM d365.sync_run WHERE id > :last_run ORDER BY id;
UPDATE d365.settings SET client_secret = 'sim-secret';
