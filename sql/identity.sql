-- One Dynamics record per person: a key re-used after TRUNCATE, a key
-- change, a delete while detached or during a run gives the new row a
-- Dynamics contact of its own; renaming the key column or dropping the
-- table never breaks the application's writes; the capture runs no user
-- code with the extension's rights and notes only what the sync needs.
\set SHOW_CONTEXT never
\set VERBOSITY terse
SET search_path = public, d365;
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS d365sync;
CREATE EXTENSION IF NOT EXISTS dblink;
RESET client_min_messages;
\getenv sim_url D365_SIM_URL
\! "$D365_SIMCTL" reset
UPDATE d365.settings
   SET org_url = :'sim_url', authority_url = :'sim_url',
       tenant_id = '11111111-1111-1111-1111-111111111111',
       client_id = '22222222-2222-2222-2222-222222222222',
       client_secret = 'sim-secret',
       contact_sync_enabled = true, min_score = 10,
       activity_sync_enabled = false, default_owner = NULL;
SELECT d365_detach_contacts();
CREATE TEMP TABLE sim_contact (j jsonb);

CREATE TABLE ident (
    id         integer PRIMARY KEY,
    first_name text,
    email      text,
    score      integer NOT NULL
);
SELECT d365_attach_contacts('ident');
INSERT INTO d365.field_map VALUES ('first_name', 'firstname'), ('email', 'emailaddress1');

-- every Dynamics contact with the local row linked to it (the earlier
-- person's record must keep the earlier person's data and no link)
CREATE VIEW dynamics_people AS
    SELECT s.j ->> 'firstname' AS dynamics_name, s.j ->> 'emailaddress1' AS dynamics_email,
           (SELECT i.id FROM ident i WHERE i.dynamics365_related_id = (s.j ->> 'contactid')::uuid) AS linked_row
      FROM sim_contact s;

-- TRUNCATE: Alice had key 1; Bob, inserted after TRUNCATE under key 1, gets
-- his own record and Alice's stays hers
INSERT INTO ident VALUES (1, 'Alice', 'alice@example.com', 50);
SELECT created, updated FROM d365_sync_contacts();
TRUNCATE ident;
INSERT INTO ident VALUES (1, 'Bob', 'bob@example.com', 50);
SELECT created, updated FROM d365_sync_contacts();
\copy sim_contact from program '"$D365_SIMCTL" rows contact --copy'
SELECT * FROM dynamics_people ORDER BY 1;

-- a key change: Carol moves from key 2 to 22 and keeps her record; Dan,
-- inserted under key 2, gets his own
INSERT INTO ident VALUES (2, 'Carol', 'carol@example.com', 50);
SELECT created, updated FROM d365_sync_contacts();
UPDATE ident SET id = 22 WHERE id = 2;
INSERT INTO ident VALUES (2, 'Dan', 'dan@example.com', 50);
SELECT created, updated FROM d365_sync_contacts();
-- key and data change in one statement: still Carol's record
UPDATE ident SET id = 23, first_name = 'Caroline' WHERE id = 22;
SELECT created, updated FROM d365_sync_contacts();
TRUNCATE sim_contact;
\copy sim_contact from program '"$D365_SIMCTL" rows contact --copy'
SELECT * FROM dynamics_people ORDER BY 1;

-- a delete while the table is detached: Erin (key 3) is deleted and Frank
-- inserted under key 3 before attaching again; Gus (key 4) is deleted while
-- detached and Hana inserted under key 4 after attaching again
INSERT INTO ident VALUES (3, 'Erin', 'erin@example.com', 50), (4, 'Gus', 'gus@example.com', 50);
SELECT created, updated FROM d365_sync_contacts();
SELECT d365_detach_contacts();
DELETE FROM ident WHERE id IN (3, 4);
INSERT INTO ident VALUES (3, 'Frank', 'frank@example.com', 50);
SELECT d365_attach_contacts('ident');
INSERT INTO d365.field_map VALUES ('first_name', 'firstname'), ('email', 'emailaddress1');
INSERT INTO ident VALUES (4, 'Hana', 'hana@example.com', 50);
SELECT created, updated FROM d365_sync_contacts();
TRUNCATE sim_contact;
\copy sim_contact from program '"$D365_SIMCTL" rows contact --copy'
SELECT * FROM dynamics_people ORDER BY 1;

-- a delete during a running sync: Ina (key 5) is deleted while her create
-- is in flight; the run must not undo the tombstone, and Jon, inserted
-- under key 5 afterwards, gets a record of his own
INSERT INTO ident VALUES (5, 'Ina', 'ina@example.com', 50);
SELECT dblink_connect('other', 'dbname=' || current_database());
\! "$D365_SIMCTL" clear-requests
\! "$D365_SIMCTL" fault '{"method": "PATCH", "delay_ms": 800, "times": 1}' >/dev/null
SELECT dblink_send_query('other', 'SELECT created, updated FROM d365.d365_sync_contacts()');
-- wait until Ina's create has reached Dynamics (it is held there 800 ms)
\! for i in $(seq 1 200); do "$D365_SIMCTL" requests --kind api | grep -q '"PATCH"' && break; sleep 0.05; done
DELETE FROM ident WHERE id = 5;
SELECT * FROM dblink_get_result('other') AS t(created int, updated int);
SELECT * FROM dblink_get_result('other') AS t(created int, updated int);
SELECT dblink_disconnect('other');
\! "$D365_SIMCTL" clear-faults
SELECT generation > 0 AS tombstone, dynamics_id IS NULL AS no_link FROM d365.contact_state WHERE contact_key = '5';
INSERT INTO ident VALUES (5, 'Jon', 'jon@example.com', 50);
SELECT created, updated FROM d365_sync_contacts();
TRUNCATE sim_contact;
\copy sim_contact from program '"$D365_SIMCTL" rows contact --copy'
SELECT * FROM dynamics_people ORDER BY 1;

-- a table restored from an older copy with its triggers off (as a
-- data-only restore with session_replication_role = replica does): Dan is
-- back under key 2 with his link, but the state of key 2 names Olga's
-- record -- d365sync did not link key 2 to Dan's, so the row is refused
-- and nothing is sent; once an admin confirms the link with
-- d365_link_contact(), Dan is sent to his own record, and the state of key
-- 2 lends him nothing of Olga's
CREATE TEMP TABLE ident_copy AS SELECT * FROM ident;
DELETE FROM ident WHERE id = 2;
INSERT INTO ident VALUES (2, 'Olga', 'olga@example.com', 50);
SELECT created, updated FROM d365_sync_contacts();
SET session_replication_role = replica;
DELETE FROM ident;
INSERT INTO ident SELECT * FROM ident_copy;
RESET session_replication_role;
SELECT created, updated, failed FROM d365_sync_contacts();
SELECT d365_link_contact(2, dynamics365_related_id) FROM ident WHERE id = 2;
SELECT created, updated FROM d365_sync_contacts();
TRUNCATE sim_contact;
\copy sim_contact from program '"$D365_SIMCTL" rows contact --copy'
SELECT * FROM dynamics_people WHERE dynamics_name IN ('Dan', 'Olga') ORDER BY 1;

-- a link cleared by hand: the row is unlinked, so it is a new person to
-- Dynamics (its earlier record is left alone)
UPDATE ident SET dynamics365_related_id = NULL WHERE id = 1;
SELECT created, updated FROM d365_sync_contacts();
TRUNCATE sim_contact;
\copy sim_contact from program '"$D365_SIMCTL" rows contact --copy'
SELECT * FROM dynamics_people WHERE dynamics_name = 'Bob' ORDER BY linked_row;

-- the capture: an UPDATE of unmapped columns notes nothing, a mapped one
-- notes its key; a rolled-back subtransaction's changes are forgotten
TRUNCATE d365.contact_change;
UPDATE ident SET score = score + 1;
SELECT count(*) AS noted_after_unmapped FROM d365.contact_change, unnest(keys);
UPDATE ident SET email = upper(email) WHERE id = 1;
BEGIN;
UPDATE ident SET first_name = 'Janet' WHERE id = 4;
SAVEPOINT s;
UPDATE ident SET first_name = 'Nobody' WHERE id = 3;
ROLLBACK TO SAVEPOINT s;
COMMIT;
SELECT k AS contact_key FROM d365.contact_change, unnest(keys) k ORDER BY 1;
SELECT item, value FROM d365_status() WHERE item = 'contacts with pending changes';
-- the WHEN clause follows the field map
SELECT regexp_replace(pg_get_triggerdef(oid), '.* WHEN (.*) EXECUTE .*', '\1') AS watched
  FROM pg_trigger WHERE tgrelid = 'ident'::regclass AND tgname = 'd365_capture_update';
DELETE FROM d365.field_map WHERE column_name = 'email';
SELECT regexp_replace(pg_get_triggerdef(oid), '.* WHEN (.*) EXECUTE .*', '\1') AS watched
  FROM pg_trigger WHERE tgrelid = 'ident'::regclass AND tgname = 'd365_capture_update';
INSERT INTO d365.field_map VALUES ('email', 'emailaddress1');
SELECT created, updated FROM d365_sync_contacts();

-- a statement that changes more rows than one chunk holds (65536) is noted
-- in chunks, so the memory it takes stays bounded
INSERT INTO ident SELECT g, 'Bulk', NULL, 1 FROM generate_series(1000, 70999) g;
TRUNCATE d365.contact_change;
UPDATE ident SET first_name = 'Bulk too' WHERE id >= 1000;
SELECT count(*) AS queue_rows, sum(cardinality(keys)) AS keys FROM d365.contact_change;
SELECT count(DISTINCT k) AS distinct_keys FROM d365.contact_change, unnest(keys) k;
DELETE FROM ident WHERE id >= 1000;
TRUNCATE d365.contact_change;

-- the capture runs no code of the table's owner with the extension's
-- rights: a cast to json on a column type never fires for a writer's rows
CREATE TYPE regress_mood AS ENUM ('calm', 'cross');
CREATE TABLE regress_cast_calls (who text);
GRANT INSERT ON regress_cast_calls TO PUBLIC;
CREATE FUNCTION regress_mood_json(regress_mood) RETURNS json LANGUAGE sql
    AS $$ INSERT INTO public.regress_cast_calls VALUES (current_user) RETURNING '"x"'::json $$;
CREATE CAST (regress_mood AS json) WITH FUNCTION regress_mood_json(regress_mood);
ALTER TABLE ident ADD COLUMN mood regress_mood;
CREATE ROLE regress_ident_writer;
GRANT SELECT, INSERT, UPDATE, DELETE ON ident TO regress_ident_writer;
SET ROLE regress_ident_writer;
INSERT INTO ident (id, first_name, email, score, mood) VALUES (7, 'Kim', 'kim@example.com', 50, 'calm');
UPDATE ident SET mood = 'cross', first_name = 'Kimberly' WHERE id = 7;
UPDATE ident SET id = 8 WHERE id = 7;
DELETE FROM ident WHERE id = 8;
RESET ROLE;
SELECT count(*) AS cast_calls FROM regress_cast_calls;
SELECT contact_key, generation > 0 AS tombstone FROM d365.contact_state WHERE contact_key IN ('7', '8') ORDER BY 1;

-- renaming the key column: the application's writes go on (a delete
-- still leaves a tombstone), the attachment is reported broken, the sync
-- says why, and attaching again under the new name repairs it
ALTER TABLE ident RENAME COLUMN id TO person_id;
INSERT INTO ident (person_id, first_name, email, score) VALUES (9, 'Lou', 'lou@example.com', 50);
UPDATE ident SET first_name = 'Louise' WHERE person_id = 9;
UPDATE ident SET first_name = 'Janine' WHERE person_id = 4;
DELETE FROM ident WHERE person_id = 3;
SELECT generation > 1 AS tombstone FROM d365.contact_state WHERE contact_key = '3';
SELECT item, value FROM d365_status() WHERE item IN ('contact table', 'attachment');
SET client_min_messages = error;
SELECT created FROM d365_sync_contacts();
RESET client_min_messages;
SELECT message FROM d365.sync_run ORDER BY id DESC LIMIT 1;
SELECT d365_attach_contacts('ident', 'person_id');
SELECT item, value FROM d365_status() WHERE item = 'attachment';
SELECT created, updated FROM d365_sync_contacts();
TRUNCATE sim_contact;
\copy sim_contact from program '"$D365_SIMCTL" rows contact --copy'
SELECT s.j ->> 'firstname' AS dynamics_name, i.person_id AS linked_row
  FROM sim_contact s LEFT JOIN ident i ON i.dynamics365_related_id = (s.j ->> 'contactid')::uuid
 WHERE s.j ->> 'firstname' IN ('Erin', 'Frank', 'Hana', 'Janine', 'Louise') ORDER BY 1;

-- dropping the attached table: status, attach and detach keep working
DROP VIEW dynamics_people;
DROP TABLE ident;
SELECT item, regexp_replace(value, '\d+', 'N', 'g') AS value
  FROM d365_status() WHERE item IN ('contact table', 'attachment', 'mapped fields');
SET client_min_messages = error;
SELECT created FROM d365_sync_contacts();
RESET client_min_messages;
SELECT regexp_replace(message, '\d+', 'N', 'g') AS message FROM d365.sync_run ORDER BY id DESC LIMIT 1;
CREATE TABLE ident_b (id integer PRIMARY KEY, first_name text, score integer);
SELECT d365_attach_contacts('ident_b');
SELECT item, value FROM d365_status() WHERE item IN ('contact table', 'attachment');
DROP TABLE ident_b;
SELECT d365_detach_contacts();
SELECT item, value FROM d365_status() WHERE item IN ('contact table', 'attachment');
SELECT d365_detach_contacts();

DROP ROLE regress_ident_writer;
DROP CAST (regress_mood AS json);
DROP FUNCTION regress_mood_json(regress_mood);
DROP TYPE regress_mood;
DROP TABLE regress_cast_calls;
