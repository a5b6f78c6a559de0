-- Configuration checked when it is written, and operations a DBA relies on:
-- org_url must be the organization's root; text-like columns (citext, a
-- domain over text, varchar(n)) map both ways like text; a field map that
-- cannot convert is refused by the write (metadata read then, or a WARNING
-- when it cannot be); a value longer than the field's maximum fails its
-- contact before sending; "last run error" clears after a good run.
\set SHOW_CONTEXT never
\ir sql/include/configured.sql
\set ECHO all
SET search_path = public, d365;
CREATE TEMP TABLE sim_req (j jsonb);
CREATE TEMP TABLE sim_row (j jsonb);

-- org_url: the root, never a path (the address bar's or the Web API's)
\set VERBOSITY default
UPDATE d365.settings SET org_url = 'https://contoso.crm4.dynamics.com/main.aspx?appid=5f3c1e2a-9b7d-4c8e-a1f0-2d3e4b5c6a7f';
UPDATE d365.settings SET org_url = 'https://contoso.crm4.dynamics.com/api/data/v9.2';
UPDATE d365.settings SET org_url = 'https://contoso.crm4.dynamics.com#home';
\set VERBOSITY terse
SELECT org_url = :'sim_url' AS unchanged FROM d365.settings;
-- a trailing slash is still just dropped
UPDATE d365.settings SET org_url = :'sim_url' || '/';
SELECT org_url = :'sim_url' AS root FROM d365.settings;

-- text-like columns: citext, a domain over text, varchar(n)
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS citext;
DROP TABLE IF EXISTS crm_member;
DROP DOMAIN IF EXISTS person_name;
RESET client_min_messages;
CREATE DOMAIN person_name AS text CHECK (VALUE <> '');
CREATE TABLE crm_member (
    id         integer PRIMARY KEY,
    email      citext UNIQUE,
    first_name person_name,
    last_name  varchar(40),
    job        varchar(200),
    visits     text,
    score      integer NOT NULL
);
INSERT INTO crm_member VALUES
    (1, 'Ada@Example.com', 'Ada', 'Lovelace', 'Analyst', '3', 50),
    (2, 'alan@example.com', 'Alan', 'Turing', NULL, '5', 50);
SELECT d365_attach_contacts('crm_member');
SELECT column_name, data_type, convertible FROM d365_contact_fields() ORDER BY column_name;
INSERT INTO d365.field_map (column_name, dynamics_field, match) VALUES ('email', 'emailaddress1', true);
INSERT INTO d365.field_map (column_name, dynamics_field) VALUES
    ('first_name', 'firstname'), ('last_name', 'lastname');

-- a column that cannot convert is refused by the write; a column declared
-- longer than the field is accepted with a WARNING
\set VERBOSITY default
INSERT INTO d365.field_map (column_name, dynamics_field) VALUES ('visits', 'numberofchildren');
INSERT INTO d365.field_map (column_name, dynamics_field) VALUES ('job', 'jobtitle');
\set VERBOSITY terse
SELECT * FROM d365_validate_mapping();

-- out: citext, the domain and varchar values as text
\! "$D365_SIMCTL" clear-requests
SELECT created, updated, failed FROM d365_sync_contacts();
\copy sim_row from program '"$D365_SIMCTL" rows contact --copy'
SELECT j->>'emailaddress1' AS email, j->>'firstname' AS first_name, j->>'lastname' AS last_name,
       j->>'jobtitle' AS job
  FROM sim_row WHERE j->>'contactid' IN (SELECT dynamics365_related_id::text FROM crm_member)
 ORDER BY 1;

-- in: edits made in Dynamics reach the citext, domain and varchar columns
SELECT * FROM d365_pull_changes() \gset pull_
\copy (SELECT json_build_object('op', 'update', 'id', dynamics365_related_id, 'values', json_build_object('emailaddress1', 'ADA@analytical.example', 'firstname', 'Augusta', 'lastname', 'King', 'jobtitle', 'Countess')) FROM crm_member WHERE id = 1) to program '"$D365_SIMCTL" edit contact -'
SELECT updated, failed FROM d365_pull_changes();
SELECT id, email, first_name, last_name, job FROM crm_member ORDER BY id;
SELECT email = 'ada@ANALYTICAL.example' AS citext_compares_as_citext FROM crm_member WHERE id = 1;
-- ... and nothing goes back
\! "$D365_SIMCTL" clear-requests
SELECT created, updated, unchanged, failed FROM d365_sync_contacts();
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT count(*) AS requests FROM sim_req;
-- a value that does not fit the column fails that change alone
\copy (SELECT json_build_object('op', 'update', 'id', dynamics365_related_id, 'values', json_build_object('lastname', repeat('x', 45))) FROM crm_member WHERE id = 2) to program '"$D365_SIMCTL" edit contact -'
SELECT updated, failed FROM d365_pull_changes();
SELECT last_name FROM crm_member WHERE id = 2;

-- a value longer than the field's maximum (jobtitle: 100) fails its
-- contact before it is sent, with a clear message; the others are sent
UPDATE crm_member SET job = repeat('J', 150) WHERE id = 1;
UPDATE crm_member SET last_name = 'Turing-Hodges' WHERE id = 2;
\! "$D365_SIMCTL" clear-requests
SELECT created, updated, failed FROM d365_sync_contacts();
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT j->>'method' AS method, j->'body' AS body FROM sim_req ORDER BY (j->>'seq')::int;
SELECT contact_key, attempts, last_status, last_error_code, last_error
  FROM d365.contact_state WHERE attempts > 0;
SELECT substr(value, strpos(value, ': ') + 2) AS last_contact_error
  FROM d365_status() WHERE item = 'last contact error';
-- fixed, it is sent
UPDATE crm_member SET job = 'Countess of Lovelace' WHERE id = 1;
UPDATE d365.contact_state SET next_attempt_at = NULL;
SELECT created, updated, failed FROM d365_sync_contacts();

-- a map written while the metadata cannot be read is accepted with a
-- WARNING; d365_validate_mapping() judges it once Dynamics answers
DELETE FROM d365.metadata_cache;
\! "$D365_SIMCTL" fault '{"path_regex": "EntityDefinitions", "status": 400, "json": {"error": {"code": "0x80060888", "message": "Metadata is unavailable."}}, "times": null}'
\set VERBOSITY default
INSERT INTO d365.field_map (column_name, dynamics_field) VALUES ('visits', 'numberofchildren');
\set VERBOSITY terse
\! "$D365_SIMCTL" clear-faults
SELECT * FROM d365_validate_mapping();
DELETE FROM d365.field_map WHERE column_name = 'visits';

-- "last run error" clears once a later run of the same job succeeds; the
-- history keeps the failed run
UPDATE d365.settings SET org_url = 'http://127.0.0.1:9';
UPDATE crm_member SET first_name = 'Ada' WHERE id = 1;
SELECT created, updated, failed FROM d365_sync_contacts();
SELECT item, value LIKE 'contacts at % failed: could not obtain an access token%' AS says_why
  FROM d365_status() WHERE item = 'last run error';
-- a skipped or disabled run does not clear it
UPDATE d365.settings SET org_url = :'sim_url', contact_sync_enabled = false;
SELECT * FROM d365_sync_contacts();
SELECT count(*) AS last_run_error_rows FROM d365_status() WHERE item = 'last run error';
UPDATE d365.settings SET contact_sync_enabled = true;
SELECT created, updated, failed FROM d365_sync_contacts();
SELECT count(*) AS last_run_error_rows FROM d365_status() WHERE item = 'last run error';
SELECT kind, message LIKE 'failed: could not obtain an access token%' AS failed_run_kept
  FROM d365.sync_run WHERE message LIKE 'failed:%';

SELECT d365_detach_contacts();
DROP TABLE crm_member;
DROP DOMAIN person_name;
