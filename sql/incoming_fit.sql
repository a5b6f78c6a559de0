-- Incoming changes that do not fit their column fail alone: each such row
-- is reported with the field and the column, every other change of the
-- pull is applied, and the pull moves on.  A value its column rounds is not
-- sent back; a timestamp without time zone is UTC whatever the TimeZone.
\set SHOW_CONTEXT never
\ir sql/include/configured.sql
\set ECHO all
SET search_path = public, d365;
SET client_min_messages = warning;
DROP TABLE IF EXISTS fit_person;
RESET client_min_messages;
CREATE DOMAIN short_nick AS text CHECK (length(VALUE) <= 8);
-- an unmapped column of a NOT NULL domain takes no part in the conversion
CREATE DOMAIN required_tag AS text NOT NULL;
CREATE TABLE fit_person (
    id      integer PRIMARY KEY,
    name    text,
    kids    smallint,
    city    varchar(5),
    credit  numeric(5,2),
    income  numeric(12,2),
    nick    short_nick,
    shout   text GENERATED ALWAYS AS (upper(name)) STORED,
    seen    timestamp,
    tag     required_tag DEFAULT 'tagged',
    score   integer NOT NULL
);
SET TimeZone = 'America/New_York';
INSERT INTO fit_person (id, name, kids, city, credit, income, nick, seen, score)
SELECT i, 'P' || i, 1, 'Oslo', 1.5, 100, 'n' || i, '2024-03-01 10:00', 50
  FROM generate_series(1, 7) i;
SELECT d365_attach_contacts('fit_person');
INSERT INTO d365.field_map (column_name, dynamics_field) VALUES
    ('name', 'firstname'), ('kids', 'numberofchildren'), ('city', 'address1_city'),
    ('credit', 'creditlimit'), ('income', 'annualincome'), ('nick', 'middlename'),
    ('seen', 'lastusedincampaign');
-- a generated column is sent only (direction 'out'): an edit of its field in
-- Dynamics never reaches it
INSERT INTO d365.field_map (column_name, dynamics_field, direction) VALUES ('shout', 'jobtitle', 'out');
SELECT created, failed FROM d365_sync_contacts();
-- a timestamp without time zone goes out as UTC, not shifted by TimeZone
CREATE TEMP TABLE sim_row (j jsonb);
\copy sim_row from program '"$D365_SIMCTL" rows contact --copy'
SELECT DISTINCT j ->> 'lastusedincampaign' AS sent FROM sim_row WHERE j ->> 'firstname' LIKE 'P_';
-- ... and a session in another TimeZone finds nothing to send
SET TimeZone = 'Asia/Tokyo';
SELECT created, updated, unchanged, failed, requests FROM d365_sync_contacts();
SELECT updated, unchanged, failed FROM d365_pull_changes();

-- seven edits in Dynamics: four do not fit, one is of a field sent only
CREATE FUNCTION pg_temp.edit(k integer, vals json) RETURNS json
LANGUAGE sql AS $$
    SELECT json_build_object('op', 'update', 'id', dynamics365_related_id, 'values', vals)
      FROM public.fit_person WHERE id = k
$$;
\copy (SELECT pg_temp.edit(1, '{"numberofchildren": 100000}')) to program '"$D365_SIMCTL" edit contact -'
\copy (SELECT pg_temp.edit(2, '{"address1_city": "Amsterdam"}')) to program '"$D365_SIMCTL" edit contact -'
\copy (SELECT pg_temp.edit(3, '{"creditlimit": 123456}')) to program '"$D365_SIMCTL" edit contact -'
\copy (SELECT pg_temp.edit(4, '{"middlename": "much too long"}')) to program '"$D365_SIMCTL" edit contact -'
\copy (SELECT pg_temp.edit(5, '{"jobtitle": "Shouting"}')) to program '"$D365_SIMCTL" edit contact -'
\copy (SELECT pg_temp.edit(6, '{"firstname": "Fine", "annualincome": 2500.125}')) to program '"$D365_SIMCTL" edit contact -'
\copy (SELECT pg_temp.edit(7, '{"lastusedincampaign": "2024-05-06T07:08:09Z", "numberofchildren": 3}')) to program '"$D365_SIMCTL" edit contact -'
\set VERBOSITY default
SELECT updated, unchanged, failed FROM d365_pull_changes();
\set VERBOSITY terse
-- the fitting changes arrived; the others left their contacts as they were
SELECT id, name, kids, city, credit, income, nick, shout, seen FROM fit_person ORDER BY id;
-- each failure is kept with its contact, naming the field and the column
SELECT contact_key, last_error_code, last_error FROM d365.contact_state
 WHERE last_error LIKE 'incoming%' ORDER BY contact_key::integer;
-- the pull moved on: the next one has nothing to apply and nothing fails
SELECT updated, unchanged, failed FROM d365_pull_changes();
-- the rounded income (2500.13) is not sent back: the one update carries the
-- generated column only, which changed with the name
\! "$D365_SIMCTL" clear-requests
SELECT created, updated, failed FROM d365_sync_contacts();
CREATE TEMP TABLE sim_req (j jsonb);
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT j ->> 'method' AS method, j -> 'body' AS body
  FROM sim_req WHERE j ->> 'method' IN ('PATCH', 'POST') AND j -> 'body' IS NOT NULL
   AND jsonb_typeof(j -> 'body') = 'object' ORDER BY (j ->> 'seq')::int;
RESET TimeZone;

-- d365_update_contact names the field and the column too
SELECT dynamics365_related_id AS one FROM fit_person WHERE id = 1 \gset
\set VERBOSITY default
SELECT d365_update_contact(jsonb_build_object('contactid', :'one', 'numberofchildren', 100000));
SELECT d365_update_contact(jsonb_build_object('contactid', :'one', 'address1_city', 'Amsterdam'));
SELECT d365_update_contact(jsonb_build_object('contactid', :'one', 'jobtitle', 'Loud'));
\set VERBOSITY terse
SELECT d365_update_contact(jsonb_build_object('contactid', :'one', 'address1_city', 'Rome', 'lastusedincampaign', '2024-05-06T09:08:09+02:00'));
SELECT city, seen FROM fit_person WHERE id = 1;

SELECT d365_detach_contacts();
DROP TABLE fit_person;
DROP DOMAIN short_nick, required_tag;
DELETE FROM d365.contact_state;
