-- Incoming changes: push payloads (d365_update_contact) and the
-- change-tracking pull (d365_pull_changes), without echo.
\set SHOW_CONTEXT never
\ir sql/include/person.sql
\set ECHO all
SET search_path = public, d365;
CREATE TEMP TABLE sim_req (j jsonb);
CREATE TEMP TABLE sim_row (j jsonb);

\set VERBOSITY default
-- bad payloads: clear errors
SELECT d365_update_contact('{"firstname": "Ada"}');
SELECT d365_update_contact('[1, 2]');
SELECT d365_update_contact('{"contactid": "not-a-guid"}');
\set VERBOSITY terse
-- a row no local contact is linked to
SELECT d365_update_contact('{"contactid": "00000000-0000-4000-8000-000000000099", "firstname": "Nobody"}') IS NULL AS not_linked;

-- the row as Dynamics holds it changes nothing
\copy sim_row from program '"$D365_SIMCTL" rows contact --copy'
SELECT d365_update_contact(j) FROM sim_row WHERE (j->>'contactid')::uuid = :'ada';

-- changed and cleared values are applied, unmapped fields ignored
SELECT d365_update_contact(jsonb_build_object(
    'contactid', :'ada', 'emailaddress1', 'ada@analytical.example', 'numberofchildren', NULL,
    'jobtitle', 'Countess', '@odata.etag', 'W/"123"', 'SdkMessage', 'Update'));
SELECT email, kids, note FROM person WHERE id = 1;
-- ... and the next outgoing sync sends nothing back
\! "$D365_SIMCTL" clear-requests
SELECT * FROM d365_sync_contacts();
-- a later local edit of the same field still goes out
UPDATE person SET email = 'ada@engine.example' WHERE id = 1;
SELECT * FROM d365_sync_contacts();
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT j->>'method' AS method, j->'body' AS body FROM sim_req ORDER BY (j->>'seq')::int;

-- every type, in the spellings Dynamics uses
SELECT d365_update_contact(jsonb_build_object(
    'contactid', :'bob',
    'birthdate', '2001-02-03',
    'lastusedincampaign', '2024-05-06T07:08:09+02:00',
    'annualincome', 5000000.0000,
    'donotemail', false,
    'gendercode', 1,
    'numberofchildren', 4,
    '_parentcustomerid_value', 'acc00000-0000-4000-8000-000000000002',
    '_parentcustomerid_value@Microsoft.Dynamics.CRM.lookuplogicalname', 'account'));
SELECT birthday, seen AT TIME ZONE 'UTC' AS seen_utc, income, vip, gender, kids, company FROM person WHERE id = 2;
-- the webhook date form, and a date-time for a date column
SELECT d365_update_contact(jsonb_build_object('contactid', :'bob',
    'lastusedincampaign', '/Date(1700000000000)/', 'birthdate', '2001-02-04T00:00:00Z'));
SELECT birthday, seen AT TIME ZONE 'UTC' AS seen_utc FROM person WHERE id = 2;
-- the same instant spelled differently is no change
SELECT d365_update_contact(jsonb_build_object('contactid', :'bob',
    'lastusedincampaign', '2023-11-14T23:13:20+01:00', 'annualincome', 5000000));

-- a value that does not fit is an error naming the field; nothing changes
\set VERBOSITY default
SELECT d365_update_contact(jsonb_build_object('contactid', :'bob', 'birthdate', 'soon', 'firstname', 'Robert'));
SELECT d365_update_contact(jsonb_build_object('contactid', :'bob', 'numberofchildren', 'many'));
\set VERBOSITY terse
SELECT first_name, kids FROM person WHERE id = 2;

-- a local change not yet sent is not overwritten by the old Dynamics value
UPDATE person SET last_name = 'Builder-Smith' WHERE id = 2;
SELECT d365_update_contact(jsonb_build_object('contactid', :'bob', 'lastname', 'Builder', 'firstname', 'Robert'));
SELECT first_name, last_name FROM person WHERE id = 2;
-- ... it goes out with the next sync, and the pulled-in first name does not
\! "$D365_SIMCTL" clear-requests
SELECT * FROM d365_sync_contacts();
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT j->>'method' AS method, j->'body' AS body FROM sim_req ORDER BY (j->>'seq')::int;

-- the caller needs SELECT and UPDATE on the contact table (UPDATE on each
-- column it changes): it reads and changes contacts with its own rights
CREATE ROLE regress_hook;
SELECT d365.d365_grant('regress_hook', 'app');
SET ROLE regress_hook;
SELECT d365.d365_update_contact(jsonb_build_object('contactid', :'bob', 'firstname', 'Rob'));
RESET ROLE;
GRANT SELECT, UPDATE (email) ON person TO regress_hook;
SET ROLE regress_hook;
SELECT d365.d365_update_contact(jsonb_build_object('contactid', :'bob', 'firstname', 'Rob'));
SELECT d365.d365_update_contact(jsonb_build_object('contactid', :'bob', 'emailaddress1', 'rob@example.com'));
RESET ROLE;
DROP OWNED BY regress_hook;
DROP ROLE regress_hook;

-- an incoming mapper replaces the changed-column computation
CREATE FUNCTION shout_mapper(dynamics jsonb, local jsonb, mapping jsonb) RETURNS jsonb
    LANGUAGE sql AS $$
    SELECT jsonb_build_object('first_name', upper(dynamics->>'firstname'),
                              'note', 'mapped from ' || (mapping->>'first_name')) $$;
CREATE FUNCTION bad_mapper(text) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
UPDATE d365.settings SET incoming_mapper = 'bad_mapper(text)';
UPDATE d365.settings SET incoming_mapper = 'shout_mapper(jsonb,jsonb,jsonb)';
SELECT d365_update_contact(jsonb_build_object('contactid', :'bob', 'firstname', 'Robert'));
SELECT first_name, note FROM person WHERE id = 2;
UPDATE d365.settings SET incoming_mapper = NULL;

-- the pull: the first call takes a baseline; what the payloads above set
-- without Dynamics having it (they were made up) is brought back in line
SELECT * FROM d365_pull_changes();
SELECT id, first_name, last_name, email, kids, birthday, note FROM person ORDER BY id;
SELECT message FROM d365.sync_run ORDER BY id DESC LIMIT 1;
SELECT entity, delta_link LIKE '%$deltatoken=%' AS has_delta_link, baseline_at IS NOT NULL AS baseline
  FROM d365.pull_state;
-- edits made in Dynamics arrive; unmapped fields are ignored; a cleared value clears
\copy (SELECT json_build_object('op', 'update', 'id', dynamics365_related_id, 'values', json_build_object('firstname', 'Augusta', 'birthdate', NULL, 'jobtitle', 'Countess')) FROM person WHERE id = 1) to program '"$D365_SIMCTL" edit contact -'
\copy (SELECT json_build_object('op', 'update', 'id', dynamics365_related_id, 'values', json_build_object('jobtitle', 'Builder')) FROM person WHERE id = 3) to program '"$D365_SIMCTL" edit contact -'
SELECT * FROM d365_pull_changes();
SELECT id, first_name, birthday FROM person WHERE id IN (1, 3) ORDER BY id;
-- what was pulled in does not go back out
\! "$D365_SIMCTL" clear-requests
SELECT * FROM d365_sync_contacts();
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT count(*) AS requests FROM sim_req;
-- nothing changed: nothing to apply, one request
SELECT * FROM d365_pull_changes();

-- a contact deleted in Dynamics is unlinked and reported
\copy (SELECT json_build_object('op', 'delete', 'id', dynamics365_related_id) FROM person WHERE id = 3) to program '"$D365_SIMCTL" edit contact -'
SELECT * FROM d365_pull_changes();
SELECT id, dynamics365_related_id IS NULL AS unlinked FROM person WHERE id = 3;
SELECT contact_key, generation, remote_deleted_at IS NOT NULL AS deleted, last_error
  FROM d365.contact_state WHERE contact_key = '3';
-- not re-created until it changes locally
SELECT created FROM d365_sync_contacts();

-- an expired delta token falls back to a full read and a new baseline
\! "$D365_SIMCTL" expire-delta-tokens
\copy (SELECT json_build_object('op', 'update', 'id', dynamics365_related_id, 'values', json_build_object('lastname', 'King')) FROM person WHERE id = 1) to program '"$D365_SIMCTL" edit contact -'
SELECT * FROM d365_pull_changes();
SELECT regexp_replace(message, '\(HTTP.*\)', '(...)') AS message FROM d365.sync_run ORDER BY id DESC LIMIT 1;
SELECT last_name FROM person WHERE id = 1;
SELECT * FROM d365_pull_changes();

-- scheduling the pull (pg_cron lives in this database)
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS pg_cron;
RESET client_min_messages;
SELECT * FROM d365_schedule(pull => '*/5 * * * *');
SELECT d365_unschedule();
