-- d365_sync_contact() and a contact row another transaction holds locked:
-- the one-contact call waits for the row (up to lock_timeout) and returns
-- the Dynamics id, or raises a clear error and leaves the contact pending;
-- the scheduled run skips the row and links it next time.
\set SHOW_CONTEXT never
\ir sql/include/app_contact.sql
\set ECHO all
SET search_path = public, d365;
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS dblink;
RESET client_min_messages;
CREATE EXTENSION dblink;
CREATE TEMP TABLE sim_contact (j jsonb);
SELECT dblink_connect('holder', 'dbname=' || current_database());
SELECT dblink_connect('caller', 'dbname=' || current_database());
-- the caller's backend waits on a lock (true), or finished without (false)
CREATE FUNCTION caller_waits(caller_pid int) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1..600 LOOP
        IF EXISTS (SELECT FROM pg_stat_activity
                    WHERE pid = caller_pid AND wait_event_type = 'Lock') THEN
            RETURN true;
        END IF;
        IF dblink_is_busy('caller') = 0 THEN
            RETURN false;
        END IF;
        PERFORM pg_sleep(0.05);
    END LOOP;
    RETURN NULL;
END;
$$;

-- 1. contact 2 (unlinked) is held FOR UPDATE while d365_sync_contact(2) runs:
-- the call waits, and returns the id once the holder commits
SELECT dblink_exec('holder', 'BEGIN');
SELECT * FROM dblink('holder', 'SELECT id FROM app_contact WHERE id = 2 FOR UPDATE') AS t(id bigint);
SELECT p AS caller_pid FROM dblink('caller', 'SELECT pg_backend_pid()') AS t(p int) \gset
SELECT dblink_send_query('caller', 'SELECT d365.d365_sync_contact(2)');
SELECT caller_waits(:caller_pid) AS waited_for_the_row;
SELECT dblink_exec('holder', 'COMMIT');
SELECT id AS returned FROM dblink_get_result('caller') AS t(id uuid) \gset
SELECT * FROM dblink_get_result('caller') AS t(id uuid);
SELECT :'returned' <> '' AS returned_an_id,
       :'returned' = dynamics365_related_id::text AS the_linked_id
  FROM app_contact WHERE id = 2;
SELECT dynamics365_related_id IS NOT NULL AS linked, dynamics365_synchronized_on IS NOT NULL AS stamped
  FROM app_contact WHERE id = 2;
SELECT s.dynamics_id = a.dynamics365_related_id AS state_agrees, s.synced_seq = s.change_seq AS synced
  FROM d365.contact_state s JOIN app_contact a ON s.contact_key = a.id::text WHERE a.id = 2;

-- 2. the holder keeps contact 7 past the caller's lock_timeout: a clear
-- error (55P03), nothing linked, the contact stays pending
INSERT INTO app_contact (id, first_name, last_name, email, score)
VALUES (7, 'Gus', 'Held', 'gus@example.com', 40);
SELECT dblink_exec('holder', 'BEGIN');
SELECT * FROM dblink('holder', 'SELECT id FROM app_contact WHERE id = 7 FOR UPDATE') AS t(id bigint);
SET lock_timeout = '300ms';
DO $$
DECLARE
    code text; msg text; det text; hnt text;
BEGIN
    PERFORM d365.d365_sync_contact(7);
    RAISE NOTICE 'no error';
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS code = RETURNED_SQLSTATE, msg = MESSAGE_TEXT,
                            det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
    RAISE NOTICE E'%: %\nDETAIL: %\nHINT: %', code, msg, det, hnt;
END;
$$;
RESET lock_timeout;
SELECT dynamics365_related_id IS NULL AS unlinked FROM app_contact WHERE id = 7;
SELECT count(*) AS state_rows_synced FROM d365.contact_state
 WHERE contact_key = '7' AND synced IS NOT NULL;
SELECT dblink_exec('holder', 'COMMIT');
-- once the row is free the same call goes through, to the same record:
-- Dynamics holds gus once
SELECT d365_sync_contact(7) AS returned \gset
SELECT :'returned' = dynamics365_related_id::text AS linked_now FROM app_contact WHERE id = 7;
\copy sim_contact from program '"$D365_SIMCTL" rows contact --copy'
SELECT count(*) AS gus_in_dynamics FROM sim_contact WHERE j->>'emailaddress1' = 'gus@example.com';

-- 3. the scheduled run does not wait: it skips the held row (contact 8),
-- leaves it pending and links it on its next run
INSERT INTO app_contact (id, first_name, last_name, email, score)
VALUES (8, 'Hal', 'Skipped', 'hal@example.com', 40);
SELECT dblink_exec('holder', 'BEGIN');
SELECT * FROM dblink('holder', 'SELECT id FROM app_contact WHERE id = 8 FOR UPDATE') AS t(id bigint);
SET lock_timeout = '5s';
SELECT failed FROM d365_sync_contacts();
RESET lock_timeout;
SELECT dynamics365_related_id IS NULL AS skipped FROM app_contact WHERE id = 8;
SELECT dblink_exec('holder', 'COMMIT');
SELECT failed FROM d365_sync_contacts();
SELECT dynamics365_related_id IS NOT NULL AS linked_next_run FROM app_contact WHERE id = 8;
TRUNCATE sim_contact;
\copy sim_contact from program '"$D365_SIMCTL" rows contact --copy'
SELECT j->>'emailaddress1' AS email, count(*) FROM sim_contact
 WHERE j->>'emailaddress1' IN ('bob@example.com', 'gus@example.com', 'hal@example.com')
 GROUP BY 1 ORDER BY 1;

SELECT dblink_disconnect('holder');
SELECT dblink_disconnect('caller');
DROP FUNCTION caller_waits(int);
