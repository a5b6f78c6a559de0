-- Attacks on a shared production database, each kept as a regression test:
-- the shapes an adversarial review found to work, and what must hold now.
--
-- regress_rt_app owns the attached contact table (and may create types and
-- casts), the test session is a superuser that runs the syncs, and
-- regress_rt_app's planted code calls public.rt_evil(what), which records
-- who it ran as and tries to make regress_rt_app a superuser.
\set SHOW_CONTEXT never
\ir sql/include/configured.sql
SET client_min_messages = warning;
DO $$ BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'regress_rt_app') THEN
        DROP OWNED BY regress_rt_app CASCADE;
        DROP ROLE regress_rt_app;
    END IF;
END $$;
RESET client_min_messages;
\set ECHO all
\set VERBOSITY terse
SET search_path = public, d365;
SELECT pg_postmaster_start_time() AS started \gset

CREATE ROLE regress_rt_app;
GRANT CREATE ON SCHEMA public TO regress_rt_app;
SET ROLE regress_rt_app;
CREATE TABLE rt_log (what text, who name, su boolean);
CREATE FUNCTION public.rt_evil(what text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    INSERT INTO public.rt_log SELECT what, current_user, r.rolsuper
      FROM pg_catalog.pg_roles r WHERE r.rolname = current_user;
    BEGIN
        EXECUTE 'ALTER ROLE regress_rt_app SUPERUSER';
    EXCEPTION WHEN OTHERS THEN
        NULL;
    END;
    RETURN true;
END $$;
CREATE VIEW rt_seen AS
    SELECT what, who, su, count(*) > 0 AS ran FROM rt_log GROUP BY 1, 2, 3 ORDER BY 1, 2;
-- the owner's own types, with implicit casts to the built-in types that
-- d365sync compares the score and link columns with
CREATE TYPE rt_level AS ENUM ('low', 'high');
CREATE FUNCTION public.rt_level_int(rt_level) RETURNS integer
LANGUAGE sql AS $$ SELECT CASE WHEN public.rt_evil('implicit cast of the score column') THEN 50 END $$;
CREATE CAST (rt_level AS integer) WITH FUNCTION public.rt_level_int(rt_level) AS IMPLICIT;
CREATE TYPE rt_id AS (u uuid);
CREATE FUNCTION public.rt_id_uuid(rt_id) RETURNS uuid
LANGUAGE sql AS $$ SELECT CASE WHEN public.rt_evil('implicit cast of the link column') THEN $1.u END $$;
CREATE CAST (rt_id AS uuid) WITH FUNCTION public.rt_id_uuid(rt_id) AS IMPLICIT;
CREATE TYPE rt_stamp AS (t timestamptz);
CREATE FUNCTION public.rt_stamp_ts(rt_stamp) RETURNS timestamptz
LANGUAGE sql AS $$ SELECT CASE WHEN public.rt_evil('implicit cast of the stamp column') THEN $1.t END $$;
CREATE CAST (rt_stamp AS timestamptz) WITH FUNCTION public.rt_stamp_ts(rt_stamp) AS IMPLICIT;
CREATE TABLE rt_person (id integer PRIMARY KEY, name text, score integer);
INSERT INTO rt_person VALUES (1, 'Ada', 50), (2, 'Bob', 50);
RESET ROLE;
SELECT d365_attach_contacts('rt_person');
INSERT INTO d365.field_map VALUES ('name', 'firstname');
UPDATE d365.settings SET activity_sync_enabled = true;
SELECT created FROM d365_sync_contacts();
SELECT dynamics365_related_id AS ada FROM rt_person WHERE id = 1 \gset

-- ---------------------------------------------------------------------------
-- 1. After attaching, the owner changes the score column to a type of its
-- own with an implicit cast to integer: "score >= min_score" in the work
-- query and in d365_status() (SECURITY DEFINER) would call the cast as the
-- superuser running the sync, or as the extension's owner.
-- ---------------------------------------------------------------------------
SET ROLE regress_rt_app;
ALTER TABLE rt_person ALTER COLUMN score TYPE rt_level USING 'high';
INSERT INTO rt_person VALUES (3, 'Cy', 'high');
RESET ROLE;
SELECT item, value FROM d365_status() WHERE item IN ('attachment', 'contacts to create');
SELECT created, failed FROM d365_sync_contacts();
SELECT d365_sync_contact(3);
SELECT * FROM rt_seen;
SELECT rolsuper FROM pg_roles WHERE rolname = 'regress_rt_app';
SET ROLE regress_rt_app;
ALTER TABLE rt_person ALTER COLUMN score TYPE integer USING 50;
RESET ROLE;

-- ---------------------------------------------------------------------------
-- 2. The same with the link column: "link = $1" in d365_update_contact and
-- the pull, the link read by d365_log_activity() (SECURITY DEFINER, granted
-- to the application role) and d365_status() would call the owner's cast.
-- ---------------------------------------------------------------------------
SET ROLE regress_rt_app;
-- (the guard of the link columns depends on them: the owner drops it first)
DROP TRIGGER d365_link_guard ON rt_person;
DROP TRIGGER d365_link_guard_update ON rt_person;
ALTER TABLE rt_person ALTER COLUMN dynamics365_related_id TYPE rt_id USING ROW(dynamics365_related_id);
RESET ROLE;
SELECT item, value FROM d365_status() WHERE item = 'attachment';
SELECT d365_update_contact(jsonb_build_object('contactid', :'ada', 'firstname', 'Augusta'));
SELECT d365_log_activity(1, 'phonecall', 'a call');
SELECT created, failed FROM d365_sync_contacts();
SELECT updated, failed FROM d365_pull_changes();
SELECT * FROM rt_seen;
SELECT rolsuper FROM pg_roles WHERE rolname = 'regress_rt_app';
SET ROLE regress_rt_app;
ALTER TABLE rt_person ALTER COLUMN dynamics365_related_id TYPE uuid USING (dynamics365_related_id).u;
-- ... and the stamp column (compared with now() by the activity sync)
ALTER TABLE rt_person ALTER COLUMN dynamics365_synchronized_on TYPE rt_stamp USING ROW(dynamics365_synchronized_on);
RESET ROLE;
SELECT item, value FROM d365_status() WHERE item = 'attachment';
SELECT created, failed FROM d365_sync_activities();
SELECT * FROM rt_seen;
SET ROLE regress_rt_app;
ALTER TABLE rt_person ALTER COLUMN dynamics365_synchronized_on TYPE timestamptz USING (dynamics365_synchronized_on).t;
RESET ROLE;
SELECT d365._contact_capture_install();
SELECT item, value FROM d365_status() WHERE item = 'attachment';

-- The check and the statements that follow it see the same table: the
-- check takes the table's lock (a type changed between the check and the
-- parse of the work query would be used unchecked).
BEGIN;
SELECT value FROM d365_status() WHERE item = 'attachment';
SELECT mode FROM pg_locks
 WHERE relation = 'rt_person'::regclass AND pid = pg_backend_pid() AND granted;
COMMIT;

-- ---------------------------------------------------------------------------
-- 3. Link columns made by the owner before a superuser attaches the table
-- are of the owner's choosing: attach refuses other types.
-- ---------------------------------------------------------------------------
SELECT d365_detach_contacts();
SET ROLE regress_rt_app;
CREATE TABLE rt_other (id integer PRIMARY KEY, score integer, dynamics365_related_id rt_id);
RESET ROLE;
SELECT d365_attach_contacts('rt_other');
SELECT count(*) AS attached FROM d365.contact_source;
SET ROLE regress_rt_app;
DROP TABLE rt_other;
RESET ROLE;
SELECT d365_attach_contacts('rt_person');
INSERT INTO d365.field_map VALUES ('name', 'firstname');
SELECT * FROM rt_seen;
SELECT rolsuper FROM pg_roles WHERE rolname = 'regress_rt_app';
TRUNCATE rt_log;

-- ---------------------------------------------------------------------------
-- 4. One row with a NULL key (a UNIQUE key column allows NULLs) made every
-- contact sync fail ("a request without method or path"): nobody else was
-- created any more.  Such a row is left alone.
-- ---------------------------------------------------------------------------
ALTER TABLE rt_person DROP CONSTRAINT rt_person_pkey;
ALTER TABLE rt_person ALTER COLUMN id DROP NOT NULL, ADD CONSTRAINT rt_person_id_key UNIQUE (id);
INSERT INTO rt_person VALUES (NULL, 'Nobody', 50), (4, 'Dee', 50);
SELECT created, failed FROM d365_sync_contacts();
SELECT id, name, dynamics365_related_id IS NOT NULL AS linked FROM rt_person ORDER BY id;
SELECT value FROM d365_status() WHERE item = 'contacts to create';
DELETE FROM rt_person WHERE id IS NULL;

-- ---------------------------------------------------------------------------
-- 5. Secrets in COPY: a refused row of d365.app_users or d365.settings
-- (a restore from pg_dump, a \copy) was printed whole in the CONTEXT line
-- ("COPY app_users, line 1: "...,the-secret"").
-- ---------------------------------------------------------------------------
\set VERBOSITY default
\set SHOW_CONTEXT always
COPY d365.app_users (client_id, client_secret) FROM stdin WITH (FORMAT csv);
,copied-secret-one
\.
COPY d365.app_users (client_id, client_secret, enabled) FROM stdin WITH (FORMAT csv);
33333333-3333-3333-3333-333333333333,copied-secret-two,
\.
COPY d365.settings (singleton, org_url, tenant_id, client_secret, min_score) FROM stdin WITH (FORMAT csv);
t,https://x.crm.dynamics.com,x.io,copied-secret-three,-1
\.
\set SHOW_CONTEXT never
\set VERBOSITY terse
SELECT count(*) AS app_users FROM d365.app_users;
SELECT client_secret = 'sim-secret' AS secret_kept FROM d365.settings;

-- ---------------------------------------------------------------------------
-- 6. Row-level security: the table-owner helpers are granted to PUBLIC (the
-- internals of d365_update_contact) and write as the table's owner, whom
-- the policies do not restrict.  A role that may update only its tenant's
-- rows changed another tenant's row through d365._contact_apply.  A role
-- the table's row security applies to is refused by them (and the app set
-- may not call them at all), and by d365_update_contact(), which reads the
-- table as the job role: for its own tenant's rows too, so that it cannot
-- tell which of another tenant's rows are linked.
-- ---------------------------------------------------------------------------
ALTER TABLE rt_person OWNER TO regress_rt_app;
SET ROLE regress_rt_app;
ALTER TABLE rt_person ADD COLUMN tenant text NOT NULL DEFAULT 'a';
UPDATE rt_person SET tenant = 'b' WHERE id = 2;
ALTER TABLE rt_person ENABLE ROW LEVEL SECURITY;
CREATE POLICY rt_tenant_a ON rt_person USING (tenant = 'a');
RESET ROLE;
CREATE ROLE regress_rt_tenant_a;
SELECT d365.d365_grant('regress_rt_tenant_a', 'app');
GRANT SELECT, UPDATE ON rt_person TO regress_rt_tenant_a;
SELECT dynamics365_related_id AS bob FROM rt_person WHERE id = 2 \gset
SET ROLE regress_rt_tenant_a;
UPDATE rt_person SET name = 'Mallory' WHERE id = 2;
SELECT d365._contact_apply('{"name": "Mallory"}', '2');
SELECT d365._contact_convert('{"name": "Mallory"}') IS NOT NULL AS converted;
SELECT d365_update_contact(jsonb_build_object('contactid', :'bob', 'firstname', 'Mallory'));
SELECT d365_update_contact(jsonb_build_object('contactid', :'ada', 'firstname', 'Ada'));
RESET ROLE;
SELECT id, tenant, name FROM rt_person ORDER BY id;
-- the owner and a superuser (the pull) are not restricted by the policy
SELECT d365_update_contact(jsonb_build_object('contactid', :'bob', 'firstname', 'Robert'));
SELECT id, tenant, name FROM rt_person ORDER BY id;
DROP OWNED BY regress_rt_tenant_a;
DROP ROLE regress_rt_tenant_a;

-- ---------------------------------------------------------------------------
-- 7. A custom activity mapper belongs to whoever created it: an
-- administrator registers regress_rt_app's function, whose owner later
-- replaces its body.  The activity sync (a superuser, pg_cron, the worker)
-- ran it with its own rights; it runs as the function's owner.
-- ---------------------------------------------------------------------------
SET ROLE regress_rt_app;
CREATE FUNCTION public.rt_mapper(entity text, contact uuid, activity jsonb) RETURNS jsonb
LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
RESET ROLE;
INSERT INTO d365.activity_mapper VALUES ('phonecall', 'public.rt_mapper(text, uuid, jsonb)');
SET ROLE regress_rt_app;
CREATE OR REPLACE FUNCTION public.rt_mapper(entity text, contact uuid, activity jsonb) RETURNS jsonb
LANGUAGE sql AS $$ SELECT CASE WHEN public.rt_evil('activity mapper')
                               THEN '{"description": "mapped"}'::jsonb END $$;
RESET ROLE;
TRUNCATE rt_log;
SELECT d365_log_activity(4, 'phonecall', 'mapped call') > 0 AS logged;
SELECT created, failed FROM d365_sync_activities();
SELECT subject, synced_at IS NOT NULL AS synced FROM d365.activity WHERE subject = 'mapped call';
CREATE TEMP TABLE rt_sim (j jsonb);
\copy rt_sim from program '"$D365_SIMCTL" rows phonecall --copy'
SELECT j ->> 'subject' AS subject, j ->> 'description' AS description FROM rt_sim
 WHERE j ->> 'subject' = 'mapped call';
SELECT * FROM rt_seen;
SELECT rolsuper FROM pg_roles WHERE rolname = 'regress_rt_app';
DELETE FROM d365.activity_mapper;

SELECT d365_detach_contacts();
DROP TABLE rt_person;
DELETE FROM d365.contact_state;
DELETE FROM d365.activity;
SET client_min_messages = warning;
DROP OWNED BY regress_rt_app CASCADE;
RESET client_min_messages;
DROP ROLE regress_rt_app;
SELECT pg_postmaster_start_time() = :'started' AS same_postmaster;
