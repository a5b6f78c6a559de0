-- Safe on a shared database: code the application's table owner controls
-- never runs with the extension owner's rights or a superuser caller's, no
-- function pins a search_path that can be hijacked, no crash with nothing
-- configured, and the client secret shows in no message.
--
-- The application role regress_sec_app owns the contact table and plants
-- code everywhere PostgreSQL lets a table owner put it.  Each planted piece
-- calls public.sec_evil(what), which records who it runs as and then tries
-- to make regress_sec_app a superuser.  The test session is a superuser and
-- runs the sync, the pull and d365_update_contact itself.
\set SHOW_CONTEXT never
\ir sql/include/configured.sql
SET client_min_messages = warning;
DO $$ BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'regress_sec_app') THEN
        DROP OWNED BY regress_sec_app CASCADE;
        DROP ROLE regress_sec_app;
    END IF;
END $$;
RESET client_min_messages;
\set ECHO all
SET search_path = public, d365;
SELECT pg_postmaster_start_time() AS started, pg_backend_pid() AS pid \gset

-- ---------------------------------------------------------------------------
-- Every function of d365 pins its search_path: pg_temp last, neither public
-- nor "$user" (SECURITY INVOKER functions too: superusers and pg_cron run
-- them)
-- ---------------------------------------------------------------------------
SELECT p.oid::regprocedure AS unpinned
  FROM pg_proc p
  LEFT JOIN LATERAL (SELECT substr(c, length('search_path=') + 1) AS path
                       FROM unnest(p.proconfig) c WHERE c LIKE 'search_path=%') s ON true
 WHERE p.pronamespace = 'd365'::regnamespace AND p.prokind <> 'p'
   AND (s.path IS NULL
        OR s.path !~ '(^|, )pg_temp$'
        OR s.path ~ '(^|, )(public|"\$user"|\$user)(,|$)')
 ORDER BY p.oid::regprocedure::text;
SELECT count(*) > 50 AS functions_checked FROM pg_proc WHERE pronamespace = 'd365'::regnamespace;
-- a procedure that commits cannot carry a SET clause: it pins the path
-- itself at the start of each of its transactions, with set_config()
-- (d365_load() and d365_run_job() are written in C and pin it with
-- set_config_option() at the start of each of their transactions,
-- src/engines/table_maps.c, src/worker/run_job.c)
SELECT p.oid::regprocedure AS procedure,
       p.proconfig IS NULL AS no_set_clause,
       (SELECT count(*) FROM regexp_matches(p.prosrc, '\mCOMMIT\M', 'g')) + 1 AS transactions,
       (SELECT count(*) FROM regexp_matches(p.prosrc,
            'PERFORM pg_catalog\.set_config\(''search_path'', ''pg_catalog, pg_temp'', true\)', 'g')) AS pins
  FROM pg_proc p
 WHERE p.pronamespace = 'd365'::regnamespace AND p.prokind = 'p' AND p.prolang = (SELECT l.oid FROM pg_language l WHERE l.lanname = 'plpgsql')
 ORDER BY p.oid::regprocedure::text;
SELECT p.oid::regprocedure AS c_procedure, p.proconfig IS NULL AS no_set_clause
  FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
 WHERE p.pronamespace = 'd365'::regnamespace AND p.prokind = 'p' AND l.lanname = 'c'
 ORDER BY p.oid::regprocedure::text;

-- ---------------------------------------------------------------------------
-- The application role and its planted code
-- ---------------------------------------------------------------------------
CREATE ROLE regress_sec_app;
GRANT CREATE ON SCHEMA public TO regress_sec_app;
SET ROLE regress_sec_app;
CREATE TABLE sec_log (id serial, what text, who name, su boolean);
CREATE FUNCTION public.sec_evil(what text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    INSERT INTO public.sec_log (what, who, su)
    SELECT what, current_user, r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user;
    BEGIN
        EXECUTE 'ALTER ROLE regress_sec_app SUPERUSER';
    EXCEPTION WHEN OTHERS THEN
        NULL;       -- a careful attacker hides the failure
    END;
    RETURN true;
END $$;
-- which planted code ran, as whom; then forget it
CREATE VIEW sec_seen AS
    SELECT what, who, su, count(*) > 0 AS ran FROM sec_log GROUP BY what, who, su ORDER BY what, who;
CREATE FUNCTION public.sec_idx(u uuid) RETURNS uuid
LANGUAGE sql IMMUTABLE AS $$ SELECT CASE WHEN public.sec_evil('index expression') THEN u END $$;
CREATE FUNCTION public.sec_gen(t text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT CASE WHEN public.sec_evil('generated column') THEN upper(t) END $$;
CREATE FUNCTION public.sec_default() RETURNS text
LANGUAGE sql VOLATILE AS $$ SELECT CASE WHEN public.sec_evil('column default') THEN 'x' END $$;
CREATE FUNCTION public.sec_check(t text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$ SELECT public.sec_evil('domain check') AND length(t) < 40 $$;
CREATE DOMAIN nickname AS text CHECK (public.sec_check(VALUE));
CREATE TYPE mood AS ENUM ('calm', 'busy');
CREATE FUNCTION public.sec_mood_text(m mood) RETURNS text
LANGUAGE sql AS $$ SELECT CASE WHEN public.sec_evil('cast to text') THEN 'text:' || m::text END $$;
CREATE FUNCTION public.sec_mood_json(m mood) RETURNS json
LANGUAGE sql AS $$ SELECT CASE WHEN public.sec_evil('cast to json') THEN '"json"'::json END $$;
CREATE FUNCTION public.sec_mood_jsonb(m mood) RETURNS jsonb
LANGUAGE sql AS $$ SELECT CASE WHEN public.sec_evil('cast to jsonb') THEN '"jsonb"'::jsonb END $$;
CREATE CAST (mood AS text) WITH FUNCTION public.sec_mood_text(mood);
CREATE CAST (mood AS json) WITH FUNCTION public.sec_mood_json(mood);
CREATE CAST (mood AS jsonb) WITH FUNCTION public.sec_mood_jsonb(mood);
CREATE TABLE sec_person (
    id      integer PRIMARY KEY,
    name    text,
    nick    nickname,
    mood    mood,
    shout   text GENERATED ALWAYS AS (public.sec_gen(name)) STORED,
    origin  text DEFAULT public.sec_default(),
    score   integer NOT NULL
);
INSERT INTO sec_person (id, name, nick, mood, score) VALUES
    (1, 'Ada', 'Countess', 'calm', 50), (2, 'Bob', NULL, 'busy', 50);
CREATE FUNCTION public.sec_trigger() RETURNS trigger
LANGUAGE plpgsql AS $$ BEGIN PERFORM public.sec_evil('trigger ' || TG_OP); RETURN NEW; END $$;
CREATE TRIGGER sec_trigger BEFORE UPDATE ON sec_person
    FOR EACH ROW EXECUTE FUNCTION public.sec_trigger();
RESET ROLE;

-- a superuser attaches the table and maps its columns (an enum, a domain)
SELECT d365_attach_contacts('sec_person');
INSERT INTO d365.field_map VALUES ('name', 'firstname'), ('nick', 'middlename'), ('mood', 'jobtitle');
SET ROLE regress_sec_app;
-- more planted code, now that the link columns exist: an index expression
-- on the link column (evaluated by every write of it) and a row security
-- policy that applies to the owner too
CREATE INDEX sec_person_link ON sec_person (public.sec_idx(dynamics365_related_id));
ALTER TABLE sec_person ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY sec_policy ON sec_person USING (public.sec_evil('row security'));
-- the search_path hijack: exact-signature functions and an operator in
-- public, which the recommended search_path (public, d365) puts first
CREATE FUNCTION public.format(text, regclass, name, text) RETURNS text
LANGUAGE sql AS $$ SELECT CASE WHEN public.sec_evil('public.format') THEN 'SELECT 1' END $$;
CREATE FUNCTION public.format(text, regclass, name) RETURNS text
LANGUAGE sql AS $$ SELECT CASE WHEN public.sec_evil('public.format') THEN 'SELECT 1' END $$;
CREATE FUNCTION public.to_jsonb(mood) RETURNS jsonb
LANGUAGE sql AS $$ SELECT CASE WHEN public.sec_evil('public.to_jsonb') THEN '"x"'::jsonb END $$;
CREATE FUNCTION public.sec_eq(text, text) RETURNS boolean
LANGUAGE sql AS $$ SELECT public.sec_evil('public operator =') AND $1 OPERATOR(pg_catalog.=) $2 $$;
CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.sec_eq);
CREATE FUNCTION public.sec_concat(jsonb, jsonb) RETURNS jsonb
LANGUAGE sql AS $$ SELECT CASE WHEN public.sec_evil('public operator ||') THEN $1 OPERATOR(pg_catalog.||) $2 END $$;
CREATE OPERATOR public.|| (LEFTARG = jsonb, RIGHTARG = jsonb, FUNCTION = public.sec_concat);
TRUNCATE sec_log;
RESET ROLE;

-- ---------------------------------------------------------------------------
-- A superuser runs the sync: the work query reads the enum and the domain
-- with built-in conversions (no cast of the owner's runs), the link columns
-- are written as the table's owner (its trigger, index expression and row
-- security run as regress_sec_app, in a security-restricted operation)
-- ---------------------------------------------------------------------------
SELECT created, updated, failed FROM d365_sync_contacts();
SELECT id, dynamics365_related_id IS NOT NULL AS linked FROM sec_person ORDER BY id;
SELECT * FROM sec_seen;
TRUNCATE sec_log;
-- Dynamics got the enum's label, not what the casts return
CREATE TEMP TABLE sim_row (j jsonb);
\copy sim_row from program '"$D365_SIMCTL" rows contact --copy'
SELECT j ->> 'firstname' AS firstname, j ->> 'middlename' AS middlename, j ->> 'jobtitle' AS jobtitle
  FROM sim_row ORDER BY 1;
SELECT rolname, rolsuper FROM pg_roles WHERE rolname = 'regress_sec_app';

-- ---------------------------------------------------------------------------
-- Incoming changes, pulled by a superuser: the domain check, the generated
-- column, the trigger and the row security run as the table's owner
-- ---------------------------------------------------------------------------
SELECT * FROM d365_pull_changes();
TRUNCATE sec_log;
\copy (SELECT json_build_object('op', 'update', 'id', dynamics365_related_id, 'values', json_build_object('middlename', 'Enchantress', 'firstname', 'Augusta', 'jobtitle', 'busy')) FROM sec_person WHERE id = 1) to program '"$D365_SIMCTL" edit contact -'
SELECT * FROM d365_pull_changes();
SELECT id, name, nick, mood, shout FROM sec_person ORDER BY id;
SELECT * FROM sec_seen;
TRUNCATE sec_log;
-- ... and pushed by a superuser through d365_update_contact
SELECT dynamics365_related_id AS bob FROM sec_person WHERE id = 2 \gset
SELECT d365_update_contact(jsonb_build_object('contactid', :'bob', 'middlename', 'Builder', 'jobtitle', 'calm'));
SELECT * FROM sec_seen;
TRUNCATE sec_log;
-- a value the owner's domain refuses fails with the field and the column
\set VERBOSITY default
SELECT d365_update_contact(jsonb_build_object('contactid', :'bob', 'middlename', repeat('x', 50)));
SELECT d365_update_contact(jsonb_build_object('contactid', :'bob', 'jobtitle', 'grumpy'));
\set VERBOSITY terse
TRUNCATE sec_log;
-- a Dynamics deletion unlinks as the table's owner too
\copy (SELECT json_build_object('op', 'delete', 'id', dynamics365_related_id) FROM sec_person WHERE id = 2) to program '"$D365_SIMCTL" edit contact -'
SELECT * FROM d365_pull_changes();
SELECT id, dynamics365_related_id IS NULL AS unlinked FROM sec_person WHERE id = 2;
SELECT * FROM sec_seen;
TRUNCATE sec_log;

-- the incoming mapper is the application's code too: it runs as the owner
SET ROLE regress_sec_app;
CREATE FUNCTION public.sec_mapper(dynamics jsonb, local jsonb, mapping jsonb) RETURNS jsonb
LANGUAGE sql AS $$ SELECT CASE WHEN public.sec_evil('incoming mapper')
                               THEN jsonb_build_object('name', dynamics ->> 'firstname') END $$;
RESET ROLE;
UPDATE d365.settings SET incoming_mapper = 'public.sec_mapper(jsonb, jsonb, jsonb)';
SELECT dynamics365_related_id AS ada FROM sec_person WHERE id = 1 \gset
SELECT d365_update_contact(jsonb_build_object('contactid', :'ada', 'firstname', 'Ada'));
UPDATE d365.settings SET incoming_mapper = NULL;
SELECT * FROM sec_seen;
TRUNCATE sec_log;
SELECT rolname, rolsuper FROM pg_roles WHERE rolname = 'regress_sec_app';

-- an activity mapper the application owns runs as its owner too, also when
-- d365_log_activity (which runs as the extension's owner) sends at once
SET ROLE regress_sec_app;
CREATE FUNCTION public.sec_activity_mapper(entity text, contact uuid, activity jsonb) RETURNS jsonb
LANGUAGE sql AS $$ SELECT CASE WHEN public.sec_evil('activity mapper') THEN '{}'::jsonb END $$;
RESET ROLE;
INSERT INTO d365.activity_mapper VALUES ('phonecall', 'public.sec_activity_mapper(text, uuid, jsonb)');
UPDATE d365.settings SET activity_sync_enabled = true;
SELECT d365_log_activity(1, 'phonecall', 'Called') > 0 AS logged;
SELECT synced_at IS NOT NULL AS sent FROM d365.activity ORDER BY id DESC LIMIT 1;
UPDATE d365.settings SET activity_sync_enabled = false;
DELETE FROM d365.activity_mapper;
SELECT * FROM sec_seen;
TRUNCATE sec_log;
-- ... and no function becomes callable as its owner through the helper
SELECT d365._activity_mapper_call('public.sec_mapper(jsonb, jsonb, jsonb)', 'x', NULL, '{}');

-- a type of the owner's making on the score or link columns, put there
-- after attaching, is refused before any of its casts or operators runs
SET ROLE regress_sec_app;
CREATE TYPE sec_score AS (v integer);
CREATE FUNCTION public.sec_score_int(sec_score) RETURNS integer
LANGUAGE sql AS $$ SELECT CASE WHEN public.sec_evil('implicit cast') THEN ($1).v END $$;
CREATE CAST (sec_score AS integer) WITH FUNCTION public.sec_score_int(sec_score) AS IMPLICIT;
ALTER TABLE sec_person ALTER score TYPE sec_score USING row(score)::sec_score;
RESET ROLE;
SELECT created, failed FROM d365_sync_contacts();
SELECT item, value FROM d365_status() WHERE item IN ('attachment', 'contacts to create');
SET ROLE regress_sec_app;
ALTER TABLE sec_person ALTER score TYPE integer USING (score).v;
RESET ROLE;
SELECT * FROM sec_seen;
TRUNCATE sec_log;

-- ---------------------------------------------------------------------------
-- Someone with the owner's helpers but without rights on the table gets
-- nothing done through them
-- ---------------------------------------------------------------------------
CREATE ROLE regress_sec_other;
GRANT USAGE ON SCHEMA d365 TO regress_sec_other;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA d365 TO regress_sec_other;
SET ROLE regress_sec_other;
SELECT d365._contact_set_links('{1}', '{00000000-0000-4000-8000-000000000001}', NULL);
SELECT d365._contact_unlink(:'ada');
SELECT d365._contact_apply('{"name": "Mallory"}', '1');
SELECT d365._contact_convert('{"nick": "x"}');
SELECT d365._contact_map('{}', '{}', '1');
SELECT d365._owner_sql('links', NULL) IS NOT NULL AS statement_text_only;
RESET ROLE;
-- with the rights, but bound by the table's row security: refused too (the
-- owner-run statement would reach rows the policy hides from it)
GRANT SELECT, UPDATE ON sec_person TO regress_sec_other;
SET ROLE regress_sec_other;
SELECT d365._contact_apply('{"name": "Mallory"}', '1');
RESET ROLE;
SELECT name, dynamics365_related_id = :'ada' AS still_linked FROM sec_person WHERE id = 1;
DROP OWNED BY regress_sec_other;
DROP ROLE regress_sec_other;

-- ---------------------------------------------------------------------------
-- No crash with nothing attached (d365_pull_changes() crashed the server),
-- or with nothing mapped
-- ---------------------------------------------------------------------------
SELECT d365_detach_contacts();
SELECT * FROM d365_pull_changes();
SELECT d365_attach_contacts('sec_person');
SELECT updated, unchanged, failed FROM d365_pull_changes();
SELECT pg_postmaster_start_time() = :'started' AS same_postmaster, pg_backend_pid() = :pid AS same_backend;

-- ---------------------------------------------------------------------------
-- The client secret appears in no message, DETAIL, HINT or CONTEXT of a
-- refused settings write (PostgreSQL's own constraint errors would print the
-- whole row: "Failing row contains (..., sim-secret, ...)")
-- ---------------------------------------------------------------------------
\set VERBOSITY default
UPDATE d365.settings SET min_score = NULL;
UPDATE d365.settings SET singleton = false;
\set VERBOSITY terse
-- every column of every d365 table holding a client secret (the settings,
-- and any other, such as more application users) set to NULL, '' and a few
-- bad values, as UPDATE and INSERT: no message, DETAIL, HINT or CONTEXT
-- shows the secret.  (This block runs as a superuser with public first in
-- its search_path, where regress_sec_app planted format(text, regclass,
-- name, text): unpinned code like this block is what the planted function
-- hijacks, so the block pins its search_path as d365's functions do.)
CREATE TEMP TABLE sec_refused (stmt text, msg text);
SET search_path = pg_catalog, pg_temp;
DO $$
DECLARE
    tbl regclass;
    col record;
    val text;
    stmt text;
    m text; d text; h text; c text; s text;
BEGIN
    FOR tbl IN SELECT a.attrelid::regclass FROM pg_attribute a JOIN pg_class r ON r.oid = a.attrelid
                WHERE r.relnamespace = 'd365'::regnamespace AND r.relkind = 'r'
                  AND a.attname = 'client_secret' AND NOT a.attisdropped LOOP
        IF tbl <> 'd365.settings'::regclass THEN      -- a row to refuse changes of
            EXECUTE format('INSERT INTO %s (client_id, client_secret)'
                           ' VALUES (''33333333-3333-3333-3333-333333333333'', ''sim-secret'')', tbl);
        END IF;
        FOR col IN SELECT attname FROM pg_attribute
                    WHERE attrelid = tbl AND attnum > 0 AND NOT attisdropped LOOP
            FOREACH val IN ARRAY ARRAY[NULL, '', '-1', 'x', 'http://example.com', 'f', '1e99'] LOOP
                FOREACH stmt IN ARRAY ARRAY[
                    format('UPDATE %s SET %I = %L', tbl, col.attname, val),
                    format('INSERT INTO %s (%I) VALUES (%L)', tbl, col.attname, val)] LOOP
                    BEGIN
                        EXECUTE stmt;
                        RAISE EXCEPTION 'accepted' USING ERRCODE = 'P0002';
                    EXCEPTION WHEN OTHERS THEN
                        GET STACKED DIAGNOSTICS m = MESSAGE_TEXT, d = PG_EXCEPTION_DETAIL,
                                                h = PG_EXCEPTION_HINT, c = PG_EXCEPTION_CONTEXT, s = RETURNED_SQLSTATE;
                        IF s <> 'P0002' THEN
                            INSERT INTO sec_refused VALUES (stmt, concat_ws(' | ', m, d, h, c));
                        END IF;
                    END;
                END LOOP;
            END LOOP;
        END LOOP;
        IF tbl <> 'd365.settings'::regclass THEN
            EXECUTE format('DELETE FROM %s', tbl);
        END IF;
    END LOOP;
END $$;
SET search_path = public, d365;
SELECT count(*) > 40 AS refused_writes, count(*) FILTER (WHERE msg LIKE '%sim-secret%') AS showing_the_secret
  FROM sec_refused;
SELECT client_secret = 'sim-secret' AS secret_kept, min_score FROM d365.settings;

-- ---------------------------------------------------------------------------
-- The capture trigger (SECURITY DEFINER) never runs the owner's cast to json
-- ---------------------------------------------------------------------------
TRUNCATE sec_log;
SET ROLE regress_sec_app;
UPDATE sec_person SET mood = 'busy' WHERE id = 1;
INSERT INTO sec_person (id, name, mood, score) VALUES (3, 'Cy', 'calm', 5);
DELETE FROM sec_person WHERE id = 3;
RESET ROLE;
SELECT * FROM sec_seen;
SELECT rolname, rolsuper FROM pg_roles WHERE rolname = 'regress_sec_app';

SELECT d365_detach_contacts();
DROP TABLE sec_person;
DELETE FROM d365.contact_state;
DELETE FROM d365.pull_state;
SET client_min_messages = warning;
DROP OWNED BY regress_sec_app CASCADE;     -- the casts go with their functions
RESET client_min_messages;
DROP ROLE regress_sec_app;
SELECT pg_postmaster_start_time() = :'started' AS same_postmaster, pg_backend_pid() = :pid AS same_backend;
