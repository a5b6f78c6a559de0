-- Attacks through the data d365sync reads and writes, each kept as a
-- regression test: forged link columns, the incoming mapper's rights.
--
-- regress_rd_owner owns the attached contact table and a table of its own
-- that nobody else may read; regress_rd_writer may only INSERT contacts;
-- regress_rd_admin writes the incoming mapper.  The test session is a
-- superuser that runs the syncs.
\set SHOW_CONTEXT never
\ir sql/include/configured.sql
SET client_min_messages = warning;
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['regress_rd_owner', 'regress_rd_writer', 'regress_rd_admin'] LOOP
        IF EXISTS (SELECT FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('DROP OWNED BY %I CASCADE', r);
            EXECUTE format('DROP ROLE %I', r);
        END IF;
    END LOOP;
END $$;
RESET client_min_messages;
\set ECHO all
\set VERBOSITY terse
SET search_path = public, d365;
CREATE TEMP TABLE sim_req (j jsonb);
CREATE TEMP TABLE sim_row (j jsonb);

CREATE ROLE regress_rd_owner;
CREATE ROLE regress_rd_writer;
CREATE ROLE regress_rd_admin;
GRANT CREATE ON SCHEMA public TO regress_rd_owner, regress_rd_admin;
SET ROLE regress_rd_owner;
CREATE TABLE rd_person (id integer PRIMARY KEY, name text, note text, score integer);
INSERT INTO rd_person VALUES (1, 'Ada', NULL, 50), (2, 'Bob', NULL, 50);
GRANT INSERT ON rd_person TO regress_rd_writer;
CREATE TABLE rd_secret (v text);
INSERT INTO rd_secret VALUES ('the owner''s secret');
RESET ROLE;
SELECT d365_attach_contacts('rd_person');
INSERT INTO d365.field_map VALUES ('name', 'firstname');
SELECT created, failed FROM d365_sync_contacts();
SELECT dynamics365_related_id AS ada FROM rd_person WHERE id = 1 \gset
SELECT dynamics365_related_id AS bob FROM rd_person WHERE id = 2 \gset
-- a Dynamics contact that is nobody's here: the victim
\copy (SELECT json_build_object('op', 'create', 'id', 'dddddddd-0000-4000-8000-000000000001', 'values', json_build_object('firstname', 'Victor'))) to program '"$D365_SIMCTL" edit contact -'

-- the attach made a unique index on the link column
SELECT d365._link_index_exists('rd_person') AS unique_link_index;
SELECT indexdef FROM pg_indexes WHERE tablename = 'rd_person' AND indexdef LIKE '%dynamics365_related_id%';
-- ... which the look-up of an incoming change can use (as it does on a
-- large table; this one is too small for the planner to prefer it)
SET enable_seqscan = off;
EXPLAIN (COSTS OFF) SELECT id FROM rd_person WHERE dynamics365_related_id = 'dddddddd-0000-4000-8000-000000000001';
RESET enable_seqscan;

-- 1. A role with only INSERT writes another person's Dynamics id into the
-- link column of a new row (0.2: the next sync overwrote that record).
SET ROLE regress_rd_writer;
INSERT INTO rd_person (id, name, score, dynamics365_related_id)
VALUES (3, 'Mallory', 50, 'dddddddd-0000-4000-8000-000000000001');
INSERT INTO rd_person (id, name, score, dynamics365_synchronized_on) VALUES (3, 'Mallory', 50, now());
-- a row without link values is welcome
INSERT INTO rd_person (id, name, score) VALUES (3, 'Mallory', 50);
RESET ROLE;

-- 2. Nor may anyone else set one: the owner, a superuser (NULL -- an
-- unlink -- and the value already there are allowed)
SET ROLE regress_rd_owner;
UPDATE rd_person SET dynamics365_related_id = 'dddddddd-0000-4000-8000-000000000001' WHERE id = 3;
UPDATE rd_person SET dynamics365_related_id = dynamics365_related_id, name = 'Bob' WHERE id = 2;
RESET ROLE;
UPDATE rd_person SET dynamics365_related_id = 'dddddddd-0000-4000-8000-000000000002' WHERE id = 3;
-- two rows never hold one id, even past the guard
SET ROLE regress_rd_owner;
ALTER TABLE rd_person DISABLE TRIGGER d365_link_guard, DISABLE TRIGGER d365_link_guard_update;
UPDATE rd_person SET dynamics365_related_id = :'ada' WHERE id = 3;
-- the table's owner can switch the guard off: its forged link is not trusted
UPDATE rd_person SET dynamics365_related_id = 'dddddddd-0000-4000-8000-000000000001' WHERE id = 3;
-- ... and while the guard is off the attachment counts as broken
RESET ROLE;
SELECT * FROM d365_sync_contacts();
SET ROLE regress_rd_owner;
ALTER TABLE rd_person ENABLE TRIGGER d365_link_guard, ENABLE TRIGGER d365_link_guard_update;
RESET ROLE;

-- 3. The sync never sends the forged row to the victim's record: the row is
-- refused and reported, nothing is sent.
\! "$D365_SIMCTL" clear-requests
SELECT * FROM d365_sync_contacts();
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT count(*) AS requests FROM sim_req;
SELECT contact_key, attempts, last_error_code, last_error FROM d365.contact_state WHERE contact_key = '3';
\set VERBOSITY default
SELECT d365_sync_contact(3);
\set VERBOSITY terse
TRUNCATE sim_row;
\copy sim_row from program '"$D365_SIMCTL" rows contact --copy'
SELECT j->>'firstname' AS victim_firstname FROM sim_row WHERE j->>'contactid' = 'dddddddd-0000-4000-8000-000000000001';
-- its activities are not sent to the victim's record either
SELECT d365_log_activity(3, 'phonecall', 'Call Mallory') > 0 AS logged;
UPDATE d365.settings SET activity_sync_enabled = true;
SELECT * FROM d365_sync_activities();
SELECT count(*) AS mallory_activities_sent FROM d365.activity WHERE contact_key = '3' AND synced_at IS NOT NULL;

-- 4. Incoming changes of the victim's record never land in the forged row,
-- pushed or pulled.
\copy (SELECT json_build_object('op', 'update', 'id', 'dddddddd-0000-4000-8000-000000000001', 'values', json_build_object('firstname', 'Victoria'))) to program '"$D365_SIMCTL" edit contact -'
SELECT d365_update_contact('{"contactid": "dddddddd-0000-4000-8000-000000000001", "firstname": "Victoria"}') IS NULL AS not_applied;
SELECT updated, failed FROM d365_pull_changes();
SELECT id, name FROM rd_person ORDER BY id;
-- while the real links work both ways
\copy (SELECT json_build_object('op', 'update', 'id', dynamics365_related_id, 'values', json_build_object('firstname', 'Augusta')) FROM rd_person WHERE id = 1) to program '"$D365_SIMCTL" edit contact -'
SELECT updated, failed FROM d365_pull_changes();
SELECT id, name FROM rd_person WHERE id = 1;

-- 5. The row gets a record of its own once its link is cleared (allowed to
-- whoever may update the column), or the admin links it by hand.
SET ROLE regress_rd_owner;
UPDATE rd_person SET dynamics365_related_id = NULL WHERE id = 3;
RESET ROLE;
\set VERBOSITY sqlstate
SELECT d365_link_contact(3, :'bob');
\set VERBOSITY terse
SELECT d365_link_contact(3, 'dddddddd-0000-4000-8000-000000000001');
\! "$D365_SIMCTL" clear-requests
SELECT created, updated, failed FROM d365_sync_contacts();
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT j->>'method' AS method, j->>'path' AS path, j->'body' AS body FROM sim_req ORDER BY (j->>'seq')::int;

-- 6. A key change keeps the row linked to its own record (the trust moves
-- with the key): sent in full to the same record, nothing refused.
UPDATE rd_person SET id = 10 WHERE id = 2;
\! "$D365_SIMCTL" clear-requests
SELECT created, updated, failed FROM d365_sync_contacts();
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT j->>'method' AS method, j->>'path' LIKE '%/contacts(' || :'bob' || ')' AS bobs_record FROM sim_req ORDER BY (j->>'seq')::int;

-- 7. The incoming mapper runs as its function's owner, not as the contact
-- table's owner (0.2: an admin's mapper read a table the admin cannot read).
SET ROLE regress_rd_admin;
CREATE FUNCTION public.rd_mapper(payload jsonb, contact jsonb, mapping jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    seen text;
BEGIN
    BEGIN
        SELECT v INTO seen FROM public.rd_secret;
    EXCEPTION WHEN insufficient_privilege THEN
        seen := 'denied';
    END;
    RETURN jsonb_build_object('note', seen || ' as ' || current_user,
                              'name', payload ->> 'firstname');
END $$;
RESET ROLE;
UPDATE d365.settings SET incoming_mapper = 'public.rd_mapper(jsonb,jsonb,jsonb)';
\copy (SELECT json_build_object('op', 'update', 'id', dynamics365_related_id, 'values', json_build_object('firstname', 'Ada')) FROM rd_person WHERE id = 1) to program '"$D365_SIMCTL" edit contact -'
SELECT updated, failed FROM d365_pull_changes();
SELECT id, name, note FROM rd_person WHERE id = 1;
UPDATE d365.settings SET incoming_mapper = NULL;

-- 8. Attaching a table whose rows share a Dynamics id is refused, naming
-- the ids; nothing is changed.
SELECT d365_detach_contacts();
CREATE TABLE rd_dup (id integer PRIMARY KEY, name text, score integer,
                     dynamics365_related_id uuid, dynamics365_synchronized_on timestamptz);
INSERT INTO rd_dup VALUES (1, 'A', 50, 'eeeeeeee-0000-4000-8000-000000000001', NULL),
                          (2, 'B', 50, 'eeeeeeee-0000-4000-8000-000000000001', NULL),
                          (3, 'C', 50, NULL, NULL), (4, 'D', 50, NULL, NULL);
\set VERBOSITY default
SELECT d365_attach_contacts('rd_dup');
\set VERBOSITY terse
SELECT count(*) AS rows_kept FROM rd_dup WHERE dynamics365_related_id IS NOT NULL;
UPDATE rd_dup SET dynamics365_related_id = NULL WHERE id = 2;
SELECT d365_attach_contacts('rd_dup');
SELECT d365._link_index_exists('rd_dup') AS unique_link_index;
SELECT d365_detach_contacts();
DROP TABLE rd_dup;

SET client_min_messages = warning;
DROP TABLE rd_person;
DROP FUNCTION public.rd_mapper(jsonb, jsonb, jsonb);
DROP OWNED BY regress_rd_owner, regress_rd_writer, regress_rd_admin CASCADE;
DROP ROLE regress_rd_owner, regress_rd_writer, regress_rd_admin;
