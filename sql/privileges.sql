-- Roles: what an application role, an operator and a monitor can do.
\set SHOW_CONTEXT never
\ir sql/include/person.sql
\set ECHO all
SET search_path = public, d365;
UPDATE d365.settings SET activity_sync_enabled = true;

-- an application role that only logs activities and pushes Dynamics edits
-- (d365_update_contact reads and updates the contact table as its caller)
CREATE ROLE regress_app;
SELECT d365.d365_grant('regress_app', 'app');
GRANT SELECT, UPDATE ON person TO regress_app;
SELECT dynamics365_related_id AS ada FROM person WHERE id = 1 \gset
SET ROLE regress_app;
SELECT d365.d365_log_activity(1, 'phonecall', 'Logged by the app') > 0 AS logged;
SELECT d365.d365_update_contact(jsonb_build_object('contactid', :'ada', 'firstname', 'Ada Augusta'));
-- ... and nothing else
SELECT count(*) FROM d365.activity;
SELECT client_secret FROM d365.settings;
SELECT * FROM d365.d365_sync_contacts();
SELECT d365.d365_sync_contact(1);
RESET ROLE;
SELECT subject, synced_at IS NOT NULL AS synced FROM d365.activity ORDER BY id DESC LIMIT 1;

-- a role that only writes the contact table needs no rights in d365
CREATE ROLE regress_writer;
GRANT SELECT, INSERT, UPDATE, DELETE ON person TO regress_writer;
SET ROLE regress_writer;
INSERT INTO person (id, first_name, email, score) VALUES (4, 'Dot', 'dot@example.com', 60);
UPDATE person SET first_name = 'Dorothy' WHERE id = 4;
DELETE FROM person WHERE id = 4;
UPDATE person SET first_name = 'Ada' WHERE id = 1;
RESET ROLE;
SELECT contact_key, dynamics_id IS NULL AND synced IS NULL AS tombstone,
       contact_key IN (SELECT unnest(keys) FROM d365.contact_change) AS change_noted
  FROM d365.contact_state WHERE contact_key IN ('1', '4') ORDER BY 1;

-- an operator: runs and watches the sync, never sees the secret
CREATE ROLE regress_operator;
SELECT d365.d365_grant('regress_operator', 'operator');
GRANT SELECT, UPDATE ON person TO regress_operator;
SET ROLE regress_operator;
UPDATE person SET email = 'ada@operator.example' WHERE id = 1;
SELECT created, updated, failed FROM d365.d365_sync_contacts();
SELECT item, value FROM d365.d365_status() WHERE item IN ('configured', 'contacts with pending changes', 'contacts failing');
SELECT client_secret FROM d365.settings;
RESET ROLE;

-- a monitor sees the status and nothing else
CREATE ROLE regress_monitor;
SELECT d365.d365_grant('regress_monitor', 'monitor');
SET ROLE regress_monitor;
SELECT count(*) > 10 AS status_rows FROM d365.d365_status();
SELECT count(*) FROM d365.sync_run;
RESET ROLE;

-- the secret and the token appear in no message, view or table
SELECT count(*) AS secret_in_run_messages FROM d365.sync_run WHERE message LIKE '%sim-secret%';
SELECT count(*) AS secret_in_errors FROM d365.contact_state WHERE last_error LIKE '%sim-secret%';
SELECT count(*) AS secret_in_cache FROM d365.metadata_cache WHERE body::text LIKE '%sim-secret%';

DROP OWNED BY regress_app, regress_writer, regress_operator, regress_monitor;
DROP ROLE regress_app, regress_writer, regress_operator, regress_monitor;

-- Running as the extension owner never runs the caller's code:
-- a contact key of a type of the caller's making is refused ...
CREATE TYPE regress_key AS (v integer);
SELECT d365.d365_log_activity(row(1)::regress_key, 'phonecall');
DROP TYPE regress_key;
-- ... and d365_update_contact checks its caller's rights, then changes the
-- contact as the table's owner: the table's own triggers see its owner (here
-- the test's superuser), never the caller or the extension's owner, in a
-- security-restricted operation under search_path = pg_catalog, pg_temp (as
-- under PostgreSQL's maintenance commands), so they name their tables with
-- the schema
CREATE TABLE regress_seen (who name);
CREATE FUNCTION regress_note_user() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.regress_seen VALUES (current_user); RETURN NEW; END $$;
CREATE TRIGGER regress_note_user BEFORE UPDATE ON person FOR EACH ROW EXECUTE FUNCTION regress_note_user();
CREATE ROLE regress_hook2;
SELECT d365.d365_grant('regress_hook2', 'app');
GRANT SELECT, UPDATE ON person TO regress_hook2;
GRANT INSERT ON regress_seen TO regress_hook2;
SET ROLE regress_hook2;
SELECT d365.d365_update_contact(jsonb_build_object('contactid', :'ada', 'firstname', 'Ada Byron'));
RESET ROLE;
SELECT who FROM regress_seen;
DROP TRIGGER regress_note_user ON person;
DROP TABLE regress_seen;
DROP FUNCTION regress_note_user();
DROP OWNED BY regress_hook2;
DROP ROLE regress_hook2;

-- the access token goes only to the organization's Web API
SELECT updated, failed FROM d365_pull_changes();
UPDATE d365.pull_state SET delta_link = 'http://127.0.0.1:9/api/data/v9.2/contacts?$deltatoken=1';
\set VERBOSITY terse
SELECT * FROM d365_pull_changes();
\set VERBOSITY default
SELECT regexp_replace(message, '127\.0\.0\.1:\d+', '<sim>') AS message FROM d365.sync_run ORDER BY id DESC LIMIT 1;
DELETE FROM d365.pull_state;

-- an activity whose details do not fit fails alone, with the reason
SELECT d365_log_activity(1, 'task', 'Bad duration', '{"duration_minutes": "ten"}') AS bad_id \gset
SELECT synced_at IS NULL AS pending, last_error FROM d365.activity WHERE id = :bad_id;
