-- Contact tables keyed by uuid and by text; detach and re-attach.
\set SHOW_CONTEXT never
\ir sql/include/app_contact.sql
\set ECHO all
SET search_path = public, d365;
SET client_min_messages = warning;
DROP TABLE IF EXISTS lead_u, "Lead T";
RESET client_min_messages;
CREATE TEMP TABLE sim_contact (j jsonb);

-- one contact table per database
CREATE TABLE lead_u (uid uuid PRIMARY KEY, name text, points numeric);
SELECT d365_attach_contacts('lead_u', 'uid', 'points');
SELECT d365_detach_contacts();
-- the sync state stays (re-attaching the table resumes where it was)
SELECT count(*) > 0 AS state_kept FROM d365.contact_state;
SELECT tgname FROM pg_trigger WHERE tgrelid = 'app_contact'::regclass;

-- attach checks the key and the score columns
SELECT d365_attach_contacts('lead_u', 'nope', 'points');
SELECT d365_attach_contacts('lead_u', 'name', 'points');
SELECT d365_attach_contacts('lead_u', 'uid', 'name');

-- uuid keys
INSERT INTO lead_u VALUES ('00000000-0000-4000-8000-0000000000a1', 'Uma', 12.5),
                          ('00000000-0000-4000-8000-0000000000a2', 'Udo', 1);
SELECT d365_attach_contacts('lead_u', 'uid', 'points');
INSERT INTO d365.field_map VALUES ('name', 'lastname');
SELECT * FROM d365_sync_contacts();
SELECT d365_sync_contact('00000000-0000-4000-8000-0000000000a2'::uuid) IS NOT NULL AS udo_linked;
SELECT uid, dynamics365_related_id IS NOT NULL AS linked FROM lead_u ORDER BY uid;
\copy sim_contact from program '"$D365_SIMCTL" rows contact --copy'
SELECT j->>'lastname' AS lastname FROM sim_contact ORDER BY 1;
SELECT d365_detach_contacts();

-- text keys, and a key that needs quoting
CREATE TABLE "Lead T" ("E-mail" text PRIMARY KEY, "Score" int, "First name" text);
INSERT INTO "Lead T" VALUES ('o''brien@example.com', 40, 'Pat'), ('low@example.com', 1, 'Lo');
SELECT d365_attach_contacts('"Lead T"', 'E-mail', 'Score');
INSERT INTO d365.field_map VALUES ('E-mail', 'emailaddress1');
INSERT INTO d365.field_map VALUES ('First name', 'firstname');
SELECT * FROM d365_sync_contacts();
SELECT d365_sync_contact('low@example.com'::text) IS NOT NULL AS lo_linked;
UPDATE "Lead T" SET "First name" = 'Patrick' WHERE "E-mail" = 'o''brien@example.com';
SELECT * FROM d365_sync_contacts();
TRUNCATE sim_contact;
\copy sim_contact from program '"$D365_SIMCTL" rows contact --copy'
SELECT j->>'firstname' AS firstname FROM sim_contact ORDER BY 1;
SELECT "E-mail", dynamics365_related_id IS NOT NULL AS linked FROM "Lead T" ORDER BY 1;

-- back to the main table for the tests that follow
SELECT d365_detach_contacts();
SELECT d365_attach_contacts('app_contact');
INSERT INTO d365.field_map VALUES ('first_name', 'firstname'), ('last_name', 'lastname'), ('email', 'emailaddress1');
