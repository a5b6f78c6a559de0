-- pg_cron jobs, and two runs at once.
\set SHOW_CONTEXT never
\ir sql/include/app_contact.sql
\set ECHO all
SET search_path = public, d365;
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS pg_cron;
DROP EXTENSION IF EXISTS dblink;
RESET client_min_messages;
CREATE TEMP TABLE sim_contact (j jsonb);

-- without pg_cron: a clear error
SELECT * FROM d365_schedule();
CREATE EXTENSION pg_cron;
SELECT * FROM d365_schedule();
SELECT * FROM d365_schedule(contacts => '*/15 * * * *', activities => NULL);
SELECT jobname, schedule, command, username = current_user AS mine FROM cron.job ORDER BY jobname;
SELECT d365_unschedule();
SELECT count(*) FROM cron.job;

-- two runs at once: the second one skips, nothing is created twice
UPDATE app_contact SET dynamics365_related_id = NULL, dynamics365_synchronized_on = NULL;
TRUNCATE d365.contact_state;
INSERT INTO d365.contact_state (contact_key) SELECT id::text FROM app_contact;
CREATE EXTENSION dblink;
SELECT dblink_connect('other', 'dbname=' || current_database());
-- slow every create down so the first run is still going when the second starts
\! "$D365_SIMCTL" fault '{"method": "PATCH", "delay_ms": 400, "times": null}'
SELECT dblink_send_query('other', 'SELECT created, failed FROM d365.d365_sync_contacts()');
SELECT pg_sleep(0.3);
SELECT * FROM d365_sync_contacts();
SELECT message FROM d365.sync_run ORDER BY id DESC LIMIT 1;
SELECT * FROM dblink_get_result('other') AS t(created int, failed int);
SELECT * FROM dblink_get_result('other') AS t(created int, failed int);
-- and d365_sync_contact() racing the job for the same contact
UPDATE app_contact SET dynamics365_related_id = NULL, dynamics365_synchronized_on = NULL WHERE id = 1;
-- (its state forgotten too, or the cleared link would make it a new person)
UPDATE d365.contact_state SET synced = NULL, dynamics_id = NULL WHERE contact_key = '1';
SELECT dblink_send_query('other', 'SELECT d365.d365_sync_contact(1)');
SELECT d365_sync_contact(1) IS NOT NULL AS linked;
SELECT id = (SELECT dynamics365_related_id FROM app_contact WHERE app_contact.id = 1) AS same_id
  FROM dblink_get_result('other') AS t(id uuid);
SELECT dblink_disconnect('other');
\! "$D365_SIMCTL" clear-faults
\copy sim_contact from program '"$D365_SIMCTL" rows contact --copy'
SELECT j->>'emailaddress1' AS email, count(*) FROM sim_contact GROUP BY 1 ORDER BY 1;
SELECT count(*) AS linked FROM app_contact WHERE dynamics365_related_id IS NOT NULL;
