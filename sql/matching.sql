-- Matching existing Dynamics contacts on the first sync; field direction.
\set SHOW_CONTEXT never
\ir sql/include/fresh.sql
\set ECHO all
SET search_path = public, d365;
SET client_min_messages = warning;
DROP TABLE IF EXISTS member CASCADE;
DROP DOMAIN IF EXISTS short_name;
DROP TYPE IF EXISTS tier;
RESET client_min_messages;
UPDATE d365.settings
   SET org_url = :'sim_url', authority_url = :'sim_url',
       tenant_id = '11111111-1111-1111-1111-111111111111',
       client_id = '22222222-2222-2222-2222-222222222222',
       client_secret = 'sim-secret',
       contact_sync_enabled = true, min_score = 10;
CREATE TEMP TABLE sim_req (j jsonb);
CREATE TEMP TABLE sim_contact (j jsonb);

-- Dynamics holds some people already
\! "$D365_SIMCTL" edit contact '{"op": "create", "id": "d0000000-0000-4000-8000-000000000001", "values": {"firstname": "Ada", "lastname": "Lovelace", "emailaddress1": "Ada@Example.com", "jobtitle": "Analyst", "telephone1": "+44 1"}}' >/dev/null
\! "$D365_SIMCTL" edit contact '{"op": "create", "id": "d0000000-0000-4000-8000-000000000002", "values": {"firstname": "Tom", "lastname": "Twin", "emailaddress1": "twin@example.com"}}' >/dev/null
\! "$D365_SIMCTL" edit contact '{"op": "create", "id": "d0000000-0000-4000-8000-000000000003", "values": {"firstname": "Tim", "lastname": "Twin", "emailaddress1": "TWIN@example.com"}}' >/dev/null
\! "$D365_SIMCTL" edit contact '{"op": "create", "id": "d0000000-0000-4000-8000-000000000004", "values": {"firstname": "Grace", "lastname": "Hopper", "emailaddress1": "grace@example.com", "jobtitle": "Admiral"}}' >/dev/null

CREATE DOMAIN short_name AS varchar(40);
CREATE TYPE tier AS ENUM ('gold', 'silver');
CREATE TABLE member (
    id         integer PRIMARY KEY,
    email      text,
    first_name short_name,
    last_name  text,
    phone      text,
    job        text,
    level      tier,
    seen_at    timestamptz,
    score      integer NOT NULL DEFAULT 50,
    label      text GENERATED ALWAYS AS (first_name || ' ' || last_name) STORED
);
INSERT INTO member (id, email, first_name, last_name, phone, job) VALUES
    (1, 'ada@example.com', 'Ada', 'King', NULL, 'Analyst'),     -- one hit, case differs
    (2, 'twin@example.com', 'Twan', 'Twin', NULL, NULL),         -- two hits
    (3, 'new@example.com', 'Nia', 'New', '+1 555', 'Engineer'),  -- no hit
    (4, NULL, 'Nobody', 'Noemail', NULL, NULL),                  -- NULL match value
    (5, 'GRACE@example.com', 'Grace', 'Hopper', NULL, 'Admiral'); -- one hit, nothing differs
SELECT d365_attach_contacts('member');

\set VERBOSITY terse
-- direction is one of both, out, in
INSERT INTO d365.field_map (column_name, dynamics_field, direction) VALUES ('job', 'jobtitle', 'sideways');
-- a generated column can only be sent
INSERT INTO d365.field_map (column_name, dynamics_field) VALUES ('label', 'description');
INSERT INTO d365.field_map (column_name, dynamics_field, direction) VALUES ('label', 'description', 'in');
-- a match field must be comparable in a query
INSERT INTO d365.field_map (column_name, dynamics_field, match) VALUES ('seen_at', 'lastusedincampaign', true);
\set VERBOSITY default

INSERT INTO d365.field_map (column_name, dynamics_field, match, direction) VALUES
    ('email', 'emailaddress1', true, 'both'),
    ('first_name', 'firstname', false, 'both'),
    ('last_name', 'lastname', false, 'both'),
    ('phone', 'telephone1', false, 'in'),
    ('job', 'jobtitle', false, 'out');
SELECT column_name, dynamics_field, match, direction FROM d365.field_map ORDER BY column_name;

-- a domain and an enum column fit their attributes; an 'in' field may be
-- read-only in Dynamics
INSERT INTO d365.field_map (column_name, dynamics_field) VALUES ('level', 'address1_city');
UPDATE d365.field_map SET dynamics_field = 'fullname', direction = 'in' WHERE column_name = 'phone';
SELECT * FROM d365_validate_mapping();
-- sent, a read-only field is refused
UPDATE d365.field_map SET direction = 'out' WHERE column_name = 'phone';
SELECT * FROM d365_validate_mapping();
UPDATE d365.field_map SET dynamics_field = 'telephone1', direction = 'in' WHERE column_name = 'phone';
DELETE FROM d365.field_map WHERE column_name = 'level';

-- the first sync: one look-up for the four contacts with an email
\! "$D365_SIMCTL" clear-requests
SELECT * FROM d365_sync_contacts();
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT j->>'method' AS method,
       regexp_replace(j->>'path', '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}', '<id>') AS path,
       j->>'status' AS status
  FROM sim_req WHERE j->>'method' = 'GET' ORDER BY (j->>'seq')::int;
-- Ada: linked to her record, only the differing last name sent (If-Match:
-- the record must exist); Grace: linked, nothing sent; Nia and Nobody:
-- created; the twins: nothing
SELECT p.id, j->>'path' = '/api/data/v9.2/contacts(' || p.dynamics365_related_id || ')' AS to_its_link,
       j->'headers'->>'if-match' AS if_match, j->'body' AS body
  FROM sim_req JOIN member p ON j->>'path' LIKE '%' || p.dynamics365_related_id || '%'
 WHERE j->>'method' = 'PATCH' ORDER BY p.id;
SELECT count(*) AS requests_for_twins FROM sim_req WHERE j->>'path' LIKE '%d0000000-0000-4000-8000-00000000000_)%'
   AND j->>'path' NOT LIKE '%0001)' AND j->>'method' <> 'GET';
SELECT id, CASE WHEN dynamics365_related_id::text LIKE 'd0000000-%' THEN dynamics365_related_id::text
                WHEN dynamics365_related_id IS NOT NULL THEN 'created' END AS link
  FROM member ORDER BY id;
SELECT contact_key, attempts, last_error_code, last_error, next_attempt_at > now() AS backing_off
  FROM d365.contact_state WHERE attempts > 0;
\copy sim_contact from program '"$D365_SIMCTL" rows contact --copy'
-- Ada keeps the phone Dynamics had (no local value clears it); nobody was
-- created twice
SELECT j->>'firstname' AS first, j->>'lastname' AS last, j->>'emailaddress1' AS email,
       j->>'telephone1' AS phone, j->>'jobtitle' AS job, j->>'description' AS description
  FROM sim_contact ORDER BY j->>'firstname';
-- the next run sends nothing
\! "$D365_SIMCTL" clear-requests
SELECT created, updated, unchanged, failed, requests FROM d365_sync_contacts();
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT count(*) AS requests FROM sim_req;

-- "Import to Dynamics 365" of a twin names the candidates
\set VERBOSITY terse
SELECT d365_sync_contact(2);
\set VERBOSITY default
-- once one twin is gone from Dynamics, the match is unique
\! "$D365_SIMCTL" edit contact '{"op": "delete", "id": "d0000000-0000-4000-8000-000000000003"}' >/dev/null
SELECT d365_sync_contact(2) AS linked_to;
SELECT contact_key, attempts, last_error FROM d365.contact_state WHERE contact_key = '2';

-- a contact whose only hit is linked to another local contact is not linked twice
INSERT INTO member (id, email, first_name, last_name) VALUES (6, 'Ada@example.COM', 'Ada', 'Again');
SELECT created, updated, unchanged, failed FROM d365_sync_contacts();
SELECT contact_key, last_error FROM d365.contact_state WHERE contact_key = '6';
DELETE FROM member WHERE id = 6;

-- direction: an 'in' field is never sent, an 'out' field is; a generated
-- column is mapped 'out' (and stays so)
INSERT INTO d365.field_map (column_name, dynamics_field, direction) VALUES ('label', 'description', 'out');
\set VERBOSITY terse
UPDATE d365.field_map SET direction = 'both' WHERE column_name = 'label';
\set VERBOSITY default
\! "$D365_SIMCTL" clear-requests
UPDATE member SET phone = '+1 556' WHERE id = 3;
SELECT created, updated, unchanged, failed, requests FROM d365_sync_contacts();
UPDATE member SET job = 'Architect', phone = '+1 557' WHERE id = 3;
SELECT created, updated, unchanged, failed, requests FROM d365_sync_contacts();
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT j->'body' AS body FROM sim_req WHERE j->>'method' = 'PATCH' ORDER BY j->>'body';

-- incoming (push): the 'in' field is written, the 'out' ones are not
SELECT d365_update_contact(jsonb_build_object(
           'contactid', (SELECT dynamics365_related_id FROM member WHERE id = 3),
           'telephone1', '+1 999', 'jobtitle', 'Intruder', 'description', 'Someone Else',
           'lastname', 'Newer')) AS changed;
SELECT phone, job, last_name FROM member WHERE id = 3;

-- incoming (pull): the same
SELECT updated, failed FROM d365_pull_changes();
\copy (SELECT json_build_object('op', 'update', 'id', dynamics365_related_id, 'values', json_build_object('telephone1', '+44 2', 'jobtitle', 'Boss', 'firstname', 'Augusta')) FROM member WHERE id = 1) to program '"$D365_SIMCTL" edit contact -'
\! "$D365_SIMCTL" clear-requests
SELECT updated, unchanged, failed, unlinked FROM d365_pull_changes();
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
-- the pull reads only the fields it may write
SELECT (j->>'path') LIKE '%telephone1%' AS reads_phone, (j->>'path') LIKE '%jobtitle%' AS reads_job
  FROM sim_req WHERE j->>'method' = 'GET' ORDER BY (j->>'seq')::int LIMIT 1;
SELECT first_name, phone, job FROM member WHERE id = 1;
-- none of it goes back out; the generated label ('out') that follows the
-- new first name does
\! "$D365_SIMCTL" clear-requests
SELECT created, updated, failed FROM d365_sync_contacts();
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT j->'body' AS body FROM sim_req WHERE j->>'method' = 'PATCH' ORDER BY j->>'body';

-- with every field 'out' there is nothing a pull could write
UPDATE d365.field_map SET direction = 'out';
DELETE FROM d365.pull_state;
SELECT updated, failed FROM d365_pull_changes();
UPDATE d365.field_map SET direction = 'both' WHERE column_name IN ('email', 'first_name', 'last_name');
UPDATE d365.field_map SET direction = 'in' WHERE column_name = 'phone';

-- two match fields: an "or" chain of "and" groups; a NULL in either means create
UPDATE d365.field_map SET match = false WHERE column_name = 'email';
UPDATE d365.field_map SET match = true WHERE column_name IN ('first_name', 'last_name');
\copy (SELECT json_build_object('op', 'create', 'id', 'd0000000-0000-4000-8000-000000000005', 'values', json_build_object('firstname', 'Kay', 'lastname', 'O''Hara'))) to program '"$D365_SIMCTL" edit contact - >/dev/null'
INSERT INTO member (id, email, first_name, last_name) VALUES
    (7, 'kay@example.com', 'KAY', 'o''hara'), (8, 'lee@example.com', 'Lee', NULL);
\! "$D365_SIMCTL" clear-requests
SELECT created, updated, unchanged, failed FROM d365_sync_contacts();
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT regexp_replace(j->>'path', '\$select=[^&]*', '$select=...') AS path
  FROM sim_req WHERE j->>'method' = 'GET';
SELECT id, dynamics365_related_id = 'd0000000-0000-4000-8000-000000000005' AS matched_kay,
       dynamics365_related_id IS NOT NULL AS linked
  FROM member WHERE id IN (7, 8) ORDER BY id;

-- look-ups are batched: 120 new contacts, at most one look-up per 50
UPDATE d365.field_map SET match = (column_name = 'email');
\! "$D365_SIMCTL" edit contact '{"op": "create", "id": "d0000000-0000-4000-8000-000000000006", "values": {"lastname": "Bulk", "emailaddress1": "bulk77@example.com"}}' >/dev/null
INSERT INTO member (id, email, first_name, last_name)
SELECT 100 + i, format('bulk%s@example.com', i), 'B' || i, 'Bulk' FROM generate_series(1, 120) i;
\! "$D365_SIMCTL" clear-requests
SELECT created, updated, unchanged, failed FROM d365_sync_contacts();
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT count(*) AS lookups FROM sim_req WHERE j->>'method' = 'GET' AND j->>'path' LIKE '%$filter=%';
SELECT dynamics365_related_id AS bulk77 FROM member WHERE id = 177;
TRUNCATE sim_contact;
\copy sim_contact from program '"$D365_SIMCTL" rows contact --copy'
SELECT count(*) AS bulk_in_dynamics, count(DISTINCT lower(j->>'emailaddress1')) AS distinct_emails
  FROM sim_contact WHERE j->>'lastname' = 'Bulk';

-- a look-up whose URL would pass the Web API's limit is split: 60 long
-- values (each character percent-encoded as 6), never more than 30,000
-- characters per look-up
UPDATE d365.field_map SET match = (column_name = 'job');
INSERT INTO member (id, email, first_name, last_name, job)
SELECT 300 + i, format('long%s@example.com', i), 'L' || i, 'Long', repeat('é', 96) || lpad(i::text, 3, '0')
  FROM generate_series(1, 60) i;
\! "$D365_SIMCTL" clear-requests
SELECT created, updated, unchanged, failed FROM d365_sync_contacts();
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT count(*) AS lookups, max(length(j->>'path')) < 30000 AS short_enough
  FROM sim_req WHERE j->>'method' = 'GET' AND j->>'path' LIKE '%$filter=%';

-- a look-up that fails fails its contacts with its error; nothing is created
UPDATE d365.field_map SET match = (column_name = 'email');
INSERT INTO member (id, email, first_name, last_name) VALUES (9, 'fay@example.com', 'Fay', 'Lure');
\! "$D365_SIMCTL" fault '{"method": "GET", "path_regex": "filter", "status": 500, "json": {"error": {"code": "0x80040216", "message": "Look-up refused."}}, "times": null}'
SET d365sync.max_retries = 0;
SELECT created, failed FROM d365_sync_contacts();
RESET d365sync.max_retries;
\! "$D365_SIMCTL" clear-faults
SELECT contact_key, last_status, last_error_code, last_error FROM d365.contact_state WHERE contact_key = '9';
SELECT dynamics365_related_id IS NULL AS not_created FROM member WHERE id = 9;

-- a look-up answered with more than one page cannot tell a single hit:
-- its contacts fail, nothing is linked or created
\! "$D365_SIMCTL" fault '{"method": "GET", "path_regex": "filter", "status": 200, "json": {"value": [{"contactid": "d0000000-0000-4000-8000-000000000009", "emailaddress1": "paged@example.com"}], "@odata.nextLink": "http://127.0.0.1/next"}, "times": 1}'
INSERT INTO member (id, email, first_name, last_name) VALUES (10, 'paged@example.com', 'Page', 'Two');
SELECT created, updated, failed FROM d365_sync_contacts();
\! "$D365_SIMCTL" clear-faults
SELECT contact_key, last_error FROM d365.contact_state WHERE contact_key = '10';
SELECT dynamics365_related_id IS NULL AS not_linked FROM member WHERE id = 10;

SELECT d365_detach_contacts();
DROP TABLE member;
DROP DOMAIN short_name;
DROP TYPE tier;
