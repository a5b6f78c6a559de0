-- Activities: the log, sync, built-in bodies, mapping, tasks, appointments.
\set SHOW_CONTEXT never
\ir sql/include/app_contact.sql
\set ECHO all
SET search_path = public, d365;
\! "$D365_SIMCTL" clear-requests
CREATE TEMP TABLE sim_req (j jsonb);
CREATE TEMP TABLE sim_row (j jsonb);
UPDATE d365.settings SET activity_sync_enabled = false,
       default_owner = '/systemusers(5e5e0000-0000-4000-8000-000000000002)';
SELECT id, dynamics365_related_id IS NOT NULL AS linked FROM app_contact ORDER BY id;

-- logged while activity sync is off: pending, nothing sent
SELECT d365_log_activity(1, 'phonecall', 'Called Ada',
       '{"phone_number": "+44 20 7946 0000", "direction": "outgoing", "duration_minutes": 12,
         "from_email": "alex@contoso.example", "description": "Discussed pricing"}',
       '2026-03-02 15:00+00') AS call_id \gset
SELECT activity_type, synced_at IS NULL AS pending, attempts FROM d365.activity WHERE id = :call_id;
SELECT * FROM d365_sync_activities();
SELECT message FROM d365.sync_run ORDER BY id DESC LIMIT 1;

-- the scheduled sync creates it, bound to the contact, and completes it
UPDATE d365.settings SET activity_sync_enabled = true;
SELECT * FROM d365_sync_activities();
SELECT synced_at IS NOT NULL AS synced, dynamics_entity FROM d365.activity WHERE id = :call_id;
\copy sim_row from program '"$D365_SIMCTL" rows phonecall --copy'
SELECT r.j->>'subject' AS subject, r.j->>'phonenumber' AS phone, r.j->>'directioncode' AS outgoing,
       r.j->>'actualdurationminutes' AS minutes, r.j->>'description' AS description,
       r.j->>'scheduledstart' AS scheduledstart, r.j->>'statecode' AS state, r.j->>'statuscode' AS status,
       (r.j->>'_regardingobjectid_value')::uuid = c.dynamics365_related_id AS regarding_ada,
       r.j->>'_ownerid_value' AS owner
  FROM sim_row r, app_contact c, d365.activity a
 WHERE c.id = 1 AND a.id = :call_id AND (r.j->>'activityid')::uuid = a.dynamics_activity_id;
SELECT p->>'participationtypemask' AS mask,
       p->>'_partyid_value@Microsoft.Dynamics.CRM.lookuplogicalname' AS party
  FROM sim_row r, jsonb_array_elements(coalesce(r.j->'phonecall_activity_parties', r.j->'activity_parties', '[]')) p
 ORDER BY 1;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT j->>'method' AS method, regexp_replace(j->>'path', '\(.*\)', '(<id>)') AS path,
       j->'headers'->>'if-none-match' AS if_none_match, j->'headers'->>'if-match' AS if_match,
       CASE WHEN j->'body' ? 'statecode' THEN j->>'body' END AS completion
  FROM sim_req WHERE j->>'method' = 'PATCH' ORDER BY (j->>'seq')::int;
-- a second run sends nothing
\! "$D365_SIMCTL" clear-requests
SELECT * FROM d365_sync_activities();

-- with sync on, an activity of a linked contact is created at once
SELECT d365_log_activity(1::bigint, 'email', 'Your quote',
       '{"body": "Please find the quote attached.", "from_email": "sam@contoso.example", "to_email": "ada@example.com"}') AS mail_id \gset
SELECT synced_at IS NOT NULL AS synced FROM d365.activity WHERE id = :mail_id;
TRUNCATE sim_row;
\copy sim_row from program '"$D365_SIMCTL" rows email --copy'
SELECT j->>'subject' AS subject, j->>'description' AS body, j->>'directioncode' AS outgoing,
       j->>'statecode' AS state, j->>'statuscode' AS status
  FROM sim_row;
SELECT p->>'participationtypemask' AS mask, p->>'addressused' AS address,
       p->>'_partyid_value@Microsoft.Dynamics.CRM.lookuplogicalname' AS party
  FROM sim_row r, jsonb_array_elements(r.j->'email_activity_parties') p ORDER BY 1;

-- an activity of an unlinked contact waits until the contact is linked
SELECT d365_log_activity(2, 'phonecall', 'Called Bob', '{"direction": "incoming"}') AS bob_call \gset
SELECT synced_at IS NULL AS pending, attempts FROM d365.activity WHERE id = :bob_call;
SELECT * FROM d365_sync_activities();
SELECT d365_sync_contact(2) IS NOT NULL AS bob_linked;
SELECT synced_at IS NOT NULL AS synced FROM d365.activity WHERE id = :bob_call;
TRUNCATE sim_row;
\copy sim_row from program '"$D365_SIMCTL" rows phonecall --copy'
SELECT j->>'subject' AS subject, j->>'directioncode' AS outgoing, j->>'statuscode' AS status
  FROM sim_row ORDER BY j->>'subject';
-- ... and the scheduled contact sync sends a new contact's activities right after it
INSERT INTO app_contact (id, first_name, last_name, email, score) VALUES (7, 'Gil', 'New', 'gil@example.com', 70);
SELECT d365_log_activity(7, 'task', 'Welcome Gil') AS gil_task \gset
SELECT created FROM d365_sync_contacts();
SELECT synced_at IS NOT NULL AS synced FROM d365.activity WHERE id = :gil_task;
SELECT kind, created, failed FROM d365.sync_run ORDER BY id DESC LIMIT 2;

-- a 300-character subject fails alone, with Dynamics' reason; the rest go
UPDATE d365.settings SET activity_sync_enabled = false;
SELECT d365_log_activity(1, 'phonecall', repeat('x', 300)) AS long_id \gset
SELECT d365_log_activity(1, 'phonecall', 'Short one') AS short_id \gset
UPDATE d365.settings SET activity_sync_enabled = true;
SELECT * FROM d365_sync_activities();
SELECT id = :long_id AS is_long, synced_at IS NOT NULL AS synced, attempts, last_status, last_error_code, last_error
  FROM d365.activity WHERE id IN (:long_id, :short_id) ORDER BY id;
UPDATE d365.activity SET subject = 'Long call' WHERE id = :long_id;
UPDATE d365.activity SET next_attempt_at = NULL WHERE id = :long_id;
SELECT * FROM d365_sync_activities();

-- a type Dynamics does not know fails with a clear message
SELECT d365_log_activity(1, 'pagevisit', 'Visited /pricing', '{"url": "/pricing"}') AS visit_id \gset
SELECT synced_at IS NULL AS pending, last_error FROM d365.activity WHERE id = :visit_id;
-- mapped to a custom activity entity, with a custom mapper for its own field
CREATE FUNCTION pageview_mapper(entity text, contact uuid, activity jsonb) RETURNS jsonb
    LANGUAGE sql AS $$ SELECT jsonb_build_object('new_url', activity->'details'->>'url',
                                                 'description', 'Page visit by ' || contact) $$;
INSERT INTO d365.activity_mapper VALUES ('new_pageview', 'pageview_mapper(text,uuid,jsonb)');
INSERT INTO d365.activity_mapper VALUES ('task', 'd365_whoami()');
INSERT INTO d365.activity_type_map VALUES ('pagevisit', 'new_pageview');
SELECT * FROM d365_sync_activities();
TRUNCATE sim_row;
\copy sim_row from program '"$D365_SIMCTL" rows new_pageview --copy'
SELECT j->>'subject' AS subject, j->>'new_url' AS url,
       j->>'description' = 'Page visit by ' || (SELECT dynamics365_related_id FROM app_contact WHERE id = 1) AS mapper_description,
       j->>'statecode' AS state
  FROM sim_row;

-- a run that rolls back does not make the retry create a second activity
SELECT d365_log_activity(1, 'pagevisit', 'Visited /rollback', '{"url": "/rollback"}') AS rb_id \gset
UPDATE d365.activity SET synced_at = NULL WHERE id = :rb_id;
BEGIN;
UPDATE d365.activity SET synced_at = NULL WHERE id = :rb_id;
SELECT created FROM d365_sync_activities();
ROLLBACK;
UPDATE d365.activity SET synced_at = NULL WHERE id = :rb_id;
SELECT created FROM d365_sync_activities();
TRUNCATE sim_row;
\copy sim_row from program '"$D365_SIMCTL" rows new_pageview --copy'
SELECT j->>'subject' AS subject, count(*) FROM sim_row GROUP BY 1 ORDER BY 1;

-- Dynamics unreachable while logging: a WARNING, and the activity stays pending
UPDATE d365.settings SET org_url = 'http://127.0.0.1:9', authority_url = 'http://127.0.0.1:9';
SET d365sync.max_retries = 0;
\set VERBOSITY terse
SELECT d365_log_activity(1, 'phonecall', 'Offline call') AS offline_id \gset
\set VERBOSITY default
SELECT synced_at IS NULL AS pending FROM d365.activity WHERE id = :offline_id;
RESET d365sync.max_retries;
UPDATE d365.settings SET org_url = :'sim_url', authority_url = :'sim_url';
SELECT * FROM d365_sync_activities();
SELECT synced_at IS NOT NULL AS synced FROM d365.activity WHERE id = :offline_id;

-- tasks, created at once
SELECT d365_create_task(1, 'Send flowers', 'Roses, red', '2026-12-24 09:00+00', 2, 30) AS task_id \gset
SELECT :'task_id' = dynamics_activity_id::text AS logged, activity_type, synced_at IS NOT NULL AS synced
  FROM d365.activity WHERE dynamics_activity_id = :'task_id';
TRUNCATE sim_row;
\copy sim_row from program '"$D365_SIMCTL" rows task --copy'
SELECT j->>'subject' AS subject, j->>'description' AS description, j->>'scheduledend' AS due,
       j->>'prioritycode' AS priority, j->>'actualdurationminutes' AS minutes,
       j->>'_ownerid_value' AS owner, j->>'statecode' AS state
  FROM sim_row WHERE j->>'activityid' = :'task_id';
\set VERBOSITY default
SELECT d365_create_task(42, 'Nobody');
SELECT d365_create_task(66, 'Deleted contact');
INSERT INTO app_contact (id, first_name, score) VALUES (8, 'Hal', 0);
SELECT d365_create_task(8, 'Unlinked');
SELECT d365_create_task(1, 'Urgent', priority => 9);

-- appointments: the contact and the users as attendees, the owner as organizer
SELECT d365_create_appointment(1, 'Partner meeting', '2026-12-10 14:00+00', '2026-12-10 15:30+00',
       location => 'Contoso HQ', description => 'New opportunity',
       required_attendees => '{sam@contoso.example}',
       optional_attendees => '{5e5e0000-0000-4000-8000-000000000003}') AS appt_id \gset
TRUNCATE sim_row;
\copy sim_row from program '"$D365_SIMCTL" rows appointment --copy'
SELECT j->>'subject' AS subject, j->>'location' AS location, j->>'scheduledstart' AS starts,
       j->>'scheduledend' AS ends, j->>'scheduleddurationminutes' AS minutes, j->>'isalldayevent' AS all_day
  FROM sim_row WHERE j->>'activityid' = :'appt_id';
SELECT p->>'participationtypemask' AS mask, p->>'_partyid_value@Microsoft.Dynamics.CRM.lookuplogicalname' AS kind,
       CASE WHEN p->>'_partyid_value' = (SELECT dynamics365_related_id::text FROM app_contact WHERE id = 1)
            THEN 'the contact' ELSE p->>'_partyid_value' END AS party
  FROM sim_row r, jsonb_array_elements(r.j->'appointment_activity_parties') p
 WHERE r.j->>'activityid' = :'appt_id' ORDER BY 1, 3;
SELECT d365_create_appointment(1, 'Bad guest', '2026-12-10 14:00+00', required_attendees => '{nobody@contoso.example}');
SELECT d365_create_appointment(1, 'Backwards', '2026-12-10 14:00+00', '2026-12-10 13:00+00');
\set VERBOSITY terse
-- a team as default owner: owner is the team, no organizer
UPDATE d365.settings SET default_owner = '/teams(7ea70000-0000-4000-8000-000000000001)';
SELECT d365_create_appointment(1, 'All hands', '2026-12-11', all_day => true) AS appt2 \gset
TRUNCATE sim_row;
\copy sim_row from program '"$D365_SIMCTL" rows appointment --copy'
SELECT j->>'_ownerid_value' AS owner, j->>'isalldayevent' AS all_day, j->>'scheduleddurationminutes' AS minutes,
       (SELECT array_agg(p->>'participationtypemask' ORDER BY p->>'participationtypemask')
          FROM jsonb_array_elements(j->'appointment_activity_parties') p) AS masks
  FROM sim_row WHERE j->>'activityid' = :'appt2';
UPDATE d365.settings SET default_owner = NULL;

SELECT item, value FROM d365_status() WHERE item LIKE 'activit%';
