-- Outgoing contact sync: attach, mapping, create, partial update, failures.
\set SHOW_CONTEXT never
\ir sql/include/fresh.sql
\set ECHO all
SET search_path = public, d365;
SET client_min_messages = warning;
DROP TABLE IF EXISTS app_contact CASCADE;
RESET client_min_messages;
UPDATE d365.settings
   SET org_url = :'sim_url', authority_url = :'sim_url',
       tenant_id = '11111111-1111-1111-1111-111111111111',
       client_id = '22222222-2222-2222-2222-222222222222',
       client_secret = 'sim-secret',
       contact_sync_enabled = true, min_score = 10;
CREATE TEMP TABLE sim_req (j jsonb);
CREATE TEMP TABLE sim_contact (j jsonb);

CREATE TABLE app_contact (
    id         bigint PRIMARY KEY,
    first_name text,
    last_name  text,
    email      text,
    score      integer NOT NULL DEFAULT 0,
    birthday   date,
    last_seen  timestamptz,
    kids       integer,
    no_email   boolean,
    income     numeric(12,2),
    company    uuid,
    gender     smallint,
    tags       text[],
    note       text
);
INSERT INTO app_contact VALUES
    (1, 'Ada', 'Lovelace', 'ada@example.com', 50, '1815-12-10', '2024-03-01 10:00+01', 0, true, 125000.50, 'acc00000-0000-4000-8000-000000000001', 2, '{math}', 'first'),
    (2, 'Bob', 'Below', 'bob@example.com', 5, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
    (3, 'Cy', 'High', 'cy@example.com', 99, '1990-01-01', NULL, 2, false, NULL, NULL, 1, NULL, NULL);

-- mapping before attaching is refused
INSERT INTO d365.field_map VALUES ('email', 'emailaddress1');

SELECT d365_attach_contacts('app_contact');
-- the link columns and the capture triggers are there
SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
 WHERE attrelid = 'app_contact'::regclass AND attname LIKE 'dynamics365%' ORDER BY attnum;
SELECT tgname FROM pg_trigger WHERE tgrelid = 'app_contact'::regclass ORDER BY tgname;
-- attaching again is harmless
SELECT d365_attach_contacts('app_contact', 'id', 'score');

\set VERBOSITY default
-- mapping validation
INSERT INTO d365.field_map VALUES ('id', 'contactid');
INSERT INTO d365.field_map VALUES ('dynamics365_related_id', 'contactid');
INSERT INTO d365.field_map VALUES ('nickname', 'nickname');
INSERT INTO d365.field_map VALUES ('email', 'EmailAddress1');
INSERT INTO d365.field_map VALUES ('tags', 'description');
INSERT INTO d365.field_map VALUES ('kids', 'parentcustomerid_account@odata.bind');
\set VERBOSITY terse

INSERT INTO d365.field_map VALUES
    ('first_name', 'firstname'), ('last_name', 'lastname'), ('email', 'emailaddress1'),
    ('birthday', 'birthdate'), ('last_seen', 'lastusedincampaign'), ('kids', 'numberofchildren'),
    ('no_email', 'donotemail'), ('income', 'annualincome'),
    ('company', 'parentcustomerid_account@odata.bind'), ('gender', 'gendercode');
INSERT INTO d365.field_map VALUES ('note', 'emailaddress1');

SELECT * FROM d365_contact_fields();

-- Dynamics metadata
SELECT * FROM d365_dynamics_fields()
 WHERE logical_name IN ('emailaddress1', 'fullname', 'contactid', 'gendercode', 'parentcustomerid', 'birthdate');
SELECT * FROM d365_validate_mapping();
-- bad mappings are refused when written, with the reason (Dynamics metadata)
INSERT INTO d365.field_map VALUES ('note', 'no_such_field');
INSERT INTO d365.field_map VALUES ('score', 'jobtitle');
INSERT INTO d365.field_map VALUES ('note', 'fullname');
INSERT INTO d365.field_map VALUES ('score', 'ownerid');
INSERT INTO d365.field_map VALUES ('score', 'donotphone');
-- written while the metadata cannot be read, they are accepted with a
-- WARNING, and d365_validate_mapping() reports them
DELETE FROM d365.metadata_cache;
\! "$D365_SIMCTL" fault '{"path_regex": "EntityDefinitions", "status": 400, "json": {"error": {"code": "0x80060888", "message": "Metadata is unavailable."}}, "times": null}'
INSERT INTO d365.field_map VALUES ('note', 'no_such_field'), ('score', 'jobtitle');
\! "$D365_SIMCTL" clear-faults
SELECT * FROM d365_validate_mapping();
-- a field that can be set on create only is reported, not refused
UPDATE d365.field_map SET dynamics_field = 'contactid' WHERE column_name = 'note';
UPDATE d365.field_map SET dynamics_field = 'birthdate' WHERE column_name = 'birthday';
DELETE FROM d365.field_map WHERE column_name = 'score';
SELECT * FROM d365_validate_mapping();
DELETE FROM d365.field_map WHERE column_name IN ('note', 'score');

SELECT kind, name, email, bind FROM d365_owners();

-- first run: contacts at or above the minimum score are created
\! "$D365_SIMCTL" clear-requests
SELECT * FROM d365_sync_contacts();
SELECT id, dynamics365_related_id IS NOT NULL AS linked,
       dynamics365_synchronized_on IS NOT NULL AS stamped
  FROM app_contact ORDER BY id;
-- the id in Dynamics is the link column's; unmapped columns were not sent
\copy sim_contact from program '"$D365_SIMCTL" rows contact --copy'
SELECT c.id, j->>'firstname' AS firstname, j->>'emailaddress1' AS email,
       j->>'birthdate' AS birthdate, j->>'lastusedincampaign' AS lastused,
       j->>'numberofchildren' AS kids, j->>'donotemail' AS donotemail,
       j->>'annualincome' AS income, j->>'_parentcustomerid_value' AS account,
       j->>'gendercode' AS gender
  FROM sim_contact s JOIN app_contact c ON c.dynamics365_related_id = (s.j->>'contactid')::uuid
 ORDER BY c.id;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
-- both creates travelled in one $batch request, on the connection the
-- metadata request had opened
SELECT count(DISTINCT j->>'conn') AS connections FROM sim_req;
SELECT o.j->>'method' AS method, o.j->>'path' AS path, o.j->>'status' AS status,
       o.j->'headers'->>'prefer' AS prefer,
       (SELECT count(*) FROM sim_req i WHERE i.j->>'batch' = o.j->>'seq') AS parts
  FROM sim_req o WHERE o.j->>'batch' IS NULL ORDER BY (o.j->>'seq')::int;
SELECT j->>'method' AS method, j->'headers'->>'if-match' AS if_match, j->>'status' AS status,
       (SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(j->'body') k) AS fields
  FROM sim_req WHERE j->>'method' = 'PATCH' ORDER BY 4;

-- no change: no request at all
\! "$D365_SIMCTL" clear-requests
SELECT * FROM d365_sync_contacts();
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT count(*) AS requests FROM sim_req;

-- a changed email is one PATCH of exactly that field, update-only
UPDATE app_contact SET email = 'ada@lovelace.example' WHERE id = 1;
-- changing an unmapped column or the score sends nothing
UPDATE app_contact SET note = 'unmapped', score = 60 WHERE id = 3;
SELECT * FROM d365_sync_contacts();
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT j->>'method' AS method, j->'headers'->>'if-match' AS if_match, j->'body' AS body,
       (j->>'path') = '/api/data/v9.2/contacts(' || (SELECT dynamics365_related_id FROM app_contact WHERE id = 1) || ')' AS path_is_ada
  FROM sim_req ORDER BY (j->>'seq')::int;

-- NULL clears the Dynamics value; a value changed and changed back sends nothing
\! "$D365_SIMCTL" clear-requests
UPDATE app_contact SET kids = NULL, last_seen = '2025-06-30 23:30:00-02' WHERE id = 1;
UPDATE app_contact SET first_name = 'Cyrus' WHERE id = 3;
UPDATE app_contact SET first_name = 'Cy' WHERE id = 3;
SELECT * FROM d365_sync_contacts();
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT j->'body' AS body FROM sim_req ORDER BY (j->>'seq')::int;
TRUNCATE sim_contact;
\copy sim_contact from program '"$D365_SIMCTL" rows contact --copy'
SELECT j->>'numberofchildren' AS kids, j->>'lastusedincampaign' AS lastused
  FROM sim_contact WHERE j->>'firstname' = 'Ada';

-- "Import to Dynamics 365": below the score, and with sync disabled
UPDATE d365.settings SET contact_sync_enabled = false;
SELECT * FROM d365_sync_contacts();
SELECT message FROM d365.sync_run ORDER BY id DESC LIMIT 1;
SELECT d365_sync_contact(2::bigint) AS bob_id \gset
SELECT dynamics365_related_id = :'bob_id' AS returns_link FROM app_contact WHERE id = 2;
-- an integer literal finds the bigint key too; unchanged means no request
\! "$D365_SIMCTL" clear-requests
SELECT d365_sync_contact(2) IS NOT NULL AS linked;
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT count(*) AS requests FROM sim_req;
SELECT d365_sync_contact(42);
UPDATE d365.settings SET contact_sync_enabled = true;

-- a create whose transaction rolls back is not duplicated by the retry
INSERT INTO app_contact (id, first_name, last_name, email, score) VALUES (4, 'Dee', 'Rollback', 'dee@example.com', 20);
BEGIN;
SELECT created FROM d365_sync_contacts();
ROLLBACK;
SELECT dynamics365_related_id IS NULL AS unlinked_after_rollback FROM app_contact WHERE id = 4;
SELECT created FROM d365_sync_contacts();
TRUNCATE sim_contact;
\copy sim_contact from program '"$D365_SIMCTL" rows contact --copy'
SELECT count(*) AS dynamics_contacts_named_rollback FROM sim_contact WHERE j->>'lastname' = 'Rollback';
SELECT (SELECT dynamics365_related_id FROM app_contact WHERE id = 4) =
       (SELECT (j->>'contactid')::uuid FROM sim_contact WHERE j->>'lastname' = 'Rollback') AS same_id;

-- one contact failing persistently does not stop the others; the failure is recorded
\! "$D365_SIMCTL" fault '{"method": "PATCH", "body_regex": "erin@example.com", "status": 500, "json": {"error": {"code": "0x80040265", "message": "Plug-in failed: Erin is not welcome."}}, "times": null}'
INSERT INTO app_contact (id, first_name, last_name, email, score) VALUES
    (5, 'Erin', 'Failing', 'erin@example.com', 30),
    (6, 'Fay', 'Fine', 'fay@example.com', 30);
SET d365sync.max_retries = 1;
SELECT * FROM d365_sync_contacts();
SELECT id, dynamics365_related_id IS NOT NULL AS linked FROM app_contact WHERE id IN (5, 6) ORDER BY id;
SELECT contact_key, attempts, last_status, last_error_code, last_error,
       next_attempt_at > now() AS backing_off
  FROM d365.contact_state WHERE attempts > 0;
-- backing off: the next run does not try it again yet
\! "$D365_SIMCTL" clear-requests
SELECT * FROM d365_sync_contacts();
-- once the back-off has passed and Dynamics accepts it, it is created
\! "$D365_SIMCTL" clear-faults
UPDATE d365.contact_state SET next_attempt_at = now() - interval '1 second' WHERE contact_key = '5';
SELECT * FROM d365_sync_contacts();
SELECT count(*) AS failing FROM d365.contact_state WHERE attempts > 0;
RESET d365sync.max_retries;

-- a value Dynamics rejects fails that contact alone, with Dynamics' reason
UPDATE app_contact SET first_name = repeat('x', 60) WHERE id = 6;
UPDATE app_contact SET last_name = 'Highest' WHERE id = 3;
SELECT * FROM d365_sync_contacts();
SELECT contact_key, last_status, last_error_code, last_error FROM d365.contact_state WHERE attempts > 0;
UPDATE app_contact SET first_name = 'Fay' WHERE id = 6;
UPDATE d365.contact_state SET next_attempt_at = NULL WHERE contact_key = '6';
SELECT * FROM d365_sync_contacts();

-- a contact deleted in Dynamics is unlinked and reported, not re-created
SELECT dynamics365_related_id AS cy_id FROM app_contact WHERE id = 3 \gset
\copy (SELECT json_build_object('op', 'delete', 'id', dynamics365_related_id) FROM app_contact WHERE id = 3) to program '"$D365_SIMCTL" edit contact -'
UPDATE app_contact SET email = 'cy@new.example' WHERE id = 3;
SELECT * FROM d365_sync_contacts();
SELECT dynamics365_related_id IS NULL AS unlinked, dynamics365_synchronized_on IS NULL AS unstamped
  FROM app_contact WHERE id = 3;
SELECT contact_key, generation, remote_deleted_at IS NOT NULL AS deleted_remotely, last_status,
       replace(last_error, :'cy_id', '<id>') AS last_error
  FROM d365.contact_state WHERE contact_key = '3';
SELECT * FROM d365_sync_contacts();
-- a change of the score alone is no change of the contact's data
UPDATE app_contact SET score = 100 WHERE id = 3;
SELECT created FROM d365_sync_contacts();
-- it qualifies again after a change of a mapped column: created anew, under a new id
UPDATE app_contact SET last_name = 'Higher' WHERE id = 3;
SELECT * FROM d365_sync_contacts();
SELECT dynamics365_related_id IS NOT NULL AND dynamics365_related_id <> :'cy_id' AS new_link
  FROM app_contact WHERE id = 3;

-- a newly mapped column is sent for the linked contacts that have a value
UPDATE app_contact SET note = 'prefers mornings' WHERE id = 1;
\! "$D365_SIMCTL" clear-requests
INSERT INTO d365.field_map VALUES ('note', 'description');
SELECT created, updated, unchanged, failed FROM d365_sync_contacts();
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT j->'body' AS body FROM sim_req WHERE j->>'method' = 'PATCH' ORDER BY 1;
DELETE FROM d365.field_map WHERE column_name = 'note';
SELECT created, updated, unchanged, failed, requests FROM d365_sync_contacts();

-- a run past its time budget stops between chunks; the rest stays pending
INSERT INTO app_contact (id, first_name, last_name, email, score) VALUES
    (9, 'Ivy', 'Budget', 'ivy@example.com', 30), (10, 'Jo', 'Budget', 'jo@example.com', 30);
SET d365sync.batch_size = 1;
SET d365sync.max_parallel = 1;
SET d365sync.max_run_time_ms = 200;
\! "$D365_SIMCTL" fault '{"method": "PATCH", "delay_ms": 300, "times": 1}'
SELECT created, failed FROM d365_sync_contacts();
SELECT message FROM d365.sync_run ORDER BY id DESC LIMIT 1;
RESET d365sync.max_run_time_ms;
SELECT created, failed FROM d365_sync_contacts();
RESET d365sync.batch_size;
RESET d365sync.max_parallel;
SELECT count(*) AS budget_contacts_linked FROM app_contact WHERE last_name = 'Budget' AND dynamics365_related_id IS NOT NULL;

-- the run history and the status overview
SELECT kind, created, updated, unchanged, failed, unlinked, requests, message
  FROM d365.sync_run ORDER BY id;
SELECT item, regexp_replace(value, '\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \w+( \(\d+ ms\))?', '<time>', 'g') AS value
  FROM d365_status() WHERE item <> 'organization';

-- deleting a local contact leaves the remote one, and a tombstone: a new
-- contact with the same key will get a Dynamics id of its own
SELECT generation AS generation_before FROM d365.contact_state WHERE contact_key = '6';
DELETE FROM app_contact WHERE id = 6;
SELECT generation AS generation_after, synced IS NULL AS forgotten FROM d365.contact_state WHERE contact_key = '6';
