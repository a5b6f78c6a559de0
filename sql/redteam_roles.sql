-- Least privilege: attacks by the roles d365sync documents (an operator, an
-- administrator, the owner of the attached table, a role with one column
-- right), each kept as a regression test.
--
-- The test session is a superuser.  Planted code calls public.rr_evil(what),
-- which records who it ran as and tries to make regress_rr_operator a
-- superuser.  Nothing may ever run it as a superuser.
\set SHOW_CONTEXT never
\ir sql/include/app_contact.sql
SET client_min_messages = warning;
DO $$
DECLARE r name;
BEGIN
    FOREACH r IN ARRAY ARRAY['regress_rr_operator', 'regress_rr_oldop', 'regress_rr_admin',
                             'regress_rr_owner', 'regress_rr_scorer', 'regress_rr_spoof'] LOOP
        IF EXISTS (SELECT FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('DROP OWNED BY %I CASCADE', r);
            EXECUTE format('DROP ROLE %I', r);
        END IF;
    END LOOP;
END $$;
DROP TABLE IF EXISTS public.rr_log;
DROP FUNCTION IF EXISTS public.rr_evil(text);
RESET client_min_messages;
\set ECHO all
\set VERBOSITY terse

CREATE TABLE public.rr_log (what text, who name, su boolean);
GRANT SELECT, INSERT ON public.rr_log TO PUBLIC;
CREATE FUNCTION public.rr_evil(what text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    INSERT INTO public.rr_log SELECT what, current_user, r.rolsuper
      FROM pg_catalog.pg_roles r WHERE r.rolname = current_user;
    BEGIN
        EXECUTE 'ALTER ROLE regress_rr_operator SUPERUSER';
    EXCEPTION WHEN OTHERS THEN
        NULL;
    END;
    RETURN true;
END $$;
CREATE VIEW rr_seen AS
    SELECT what, su, count(*) > 0 AS ran FROM public.rr_log GROUP BY 1, 2 ORDER BY 1, 2;
GRANT SELECT ON rr_seen TO PUBLIC;

CREATE ROLE regress_rr_operator;
CREATE ROLE regress_rr_admin;
CREATE ROLE regress_rr_owner;
CREATE ROLE regress_rr_scorer;
SELECT d365.d365_grant('regress_rr_operator', 'operator');
SELECT d365.d365_grant('regress_rr_admin', 'admin');

-- ---------------------------------------------------------------------------
-- 1. Operator -> superuser through a trigger function.  With 0.2's operator
-- grants (EXECUTE on every function in d365) the operator puts
-- d365._contact_capture_delete on a temporary table of its own, with no
-- transition table: the function's unqualified d365_gone then named the
-- operator's temporary view, whose WHERE ran as the extension's owner.
-- Now: no role may use d365's trigger functions, and each refuses to run
-- anywhere but on d365sync's own trigger of the attached table.
-- ---------------------------------------------------------------------------
CREATE ROLE regress_rr_oldop;
GRANT USAGE ON SCHEMA d365 TO regress_rr_oldop;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA d365 TO regress_rr_oldop;   -- 0.2's recipe
SET ROLE regress_rr_oldop;
CREATE TEMP TABLE rr_mine (id integer);
CREATE TEMP VIEW d365_gone AS SELECT 1 AS id WHERE public.rr_evil('finding 1: temp view d365_gone');
CREATE TRIGGER rr_grab AFTER DELETE ON rr_mine
    FOR EACH STATEMENT EXECUTE FUNCTION d365._contact_capture_delete('1');
INSERT INTO rr_mine VALUES (1);
DELETE FROM rr_mine;
-- the same with a transition table of the right name, and with the other
-- trigger functions
CREATE TRIGGER d365_capture_delete AFTER DELETE ON rr_mine REFERENCING OLD TABLE AS d365_gone
    FOR EACH STATEMENT EXECUTE FUNCTION d365._contact_capture_delete('1');
DROP TRIGGER rr_grab ON rr_mine;
INSERT INTO rr_mine VALUES (1);
DELETE FROM rr_mine;
CREATE TRIGGER d365_capture_truncate AFTER TRUNCATE ON rr_mine
    FOR EACH STATEMENT EXECUTE FUNCTION d365._contact_capture_truncate();
TRUNCATE rr_mine;
CREATE TRIGGER d365_capture_insert_flush AFTER INSERT ON rr_mine
    FOR EACH STATEMENT EXECUTE FUNCTION d365._contact_capture_flush();
INSERT INTO rr_mine VALUES (2);
CREATE TRIGGER d365_capture_update AFTER UPDATE ON rr_mine
    FOR EACH ROW EXECUTE FUNCTION d365._contact_capture_row('1');
UPDATE rr_mine SET id = 3;
RESET ROLE;
SELECT * FROM rr_seen;
SELECT count(*) AS tombstones_for_key_1 FROM d365.contact_state
 WHERE contact_key = '1' AND dynamics_id IS NULL;
-- an operator set up with d365_grant cannot even create the trigger
SET ROLE regress_rr_operator;
CREATE TEMP TABLE rr_mine2 (id integer);
CREATE TRIGGER rr_grab AFTER DELETE ON rr_mine2
    FOR EACH STATEMENT EXECUTE FUNCTION d365._contact_capture_delete('1');
RESET ROLE;
-- no role but the extension's owner may execute a trigger function
SELECT p.oid::regprocedure AS trigger_function, p.proacl IS NOT NULL AND EXISTS (
           SELECT FROM aclexplode(p.proacl) a
            WHERE a.grantee <> p.proowner AND a.privilege_type = 'EXECUTE'
              AND a.grantee NOT IN (SELECT oid FROM pg_roles WHERE rolname = 'regress_rr_oldop'))
           AS executable_by_others
  FROM pg_proc p
 WHERE p.pronamespace = 'd365'::regnamespace AND p.prorettype = 'trigger'::regtype
 ORDER BY 1;
SELECT rolsuper FROM pg_roles WHERE rolname = 'regress_rr_operator';
DROP OWNED BY regress_rr_oldop;
DROP ROLE regress_rr_oldop;

-- ---------------------------------------------------------------------------
-- 2. Admin -> superuser through a trigger on a d365 table.  0.2's admin
-- grants included ALL on d365's tables, TRIGGER among them; a trigger on
-- d365.activity ran as the superuser whenever d365_log_activity() (SECURITY
-- DEFINER) logged one.  No d365_grant set includes TRIGGER, REFERENCES or
-- TRUNCATE on any d365 table.
-- ---------------------------------------------------------------------------
GRANT CREATE ON SCHEMA public TO regress_rr_admin;
SET ROLE regress_rr_admin;
CREATE FUNCTION public.rr_admin_trigger() RETURNS trigger
LANGUAGE plpgsql AS $$ BEGIN PERFORM public.rr_evil('finding 2: trigger on a d365 table'); RETURN NULL; END $$;
CREATE TRIGGER rr_grab AFTER INSERT ON d365.activity
    FOR EACH STATEMENT EXECUTE FUNCTION public.rr_admin_trigger();
CREATE TRIGGER rr_grab AFTER INSERT ON d365.contact_change
    FOR EACH STATEMENT EXECUTE FUNCTION public.rr_admin_trigger();
TRUNCATE d365.sync_run;
RESET ROLE;
SELECT d365.d365_log_activity(1, 'phonecall', 'a call') > 0 AS logged;
UPDATE app_contact SET email = 'ada@two.example' WHERE id = 1;
SELECT * FROM rr_seen;
SELECT s.what AS grant_set, count(*) FILTER (WHERE has_table_privilege(r.rolname, c.oid, 'TRIGGER'))    AS can_trigger,
       count(*) FILTER (WHERE has_table_privilege(r.rolname, c.oid, 'REFERENCES')) AS can_reference,
       count(*) FILTER (WHERE has_table_privilege(r.rolname, c.oid, 'TRUNCATE'))   AS can_truncate
  FROM (VALUES ('operator', 'regress_rr_operator'), ('admin', 'regress_rr_admin')) s(what, rolname)
  JOIN pg_roles r USING (rolname)
 CROSS JOIN pg_class c
 WHERE c.relnamespace = 'd365'::regnamespace AND c.relkind IN ('r', 'p', 'v')
 GROUP BY 1 ORDER BY 1;

-- ---------------------------------------------------------------------------
-- 3. The table's owner replaces what d365sync reads.  0.2 checked the
-- capture triggers by name only: triggers of the same names calling the
-- owner's functions passed, and the table could be turned into a view
-- (CREATE RULE "_RETURN") whose WHERE calls the owner's function, read by
-- d365_status() (SECURITY DEFINER) and the jobs.  Now the attachment is
-- broken unless the relation is a table and each trigger calls d365's
-- function, and nothing reads the relation while it is broken.
-- ---------------------------------------------------------------------------
ALTER TABLE app_contact OWNER TO regress_rr_owner;
GRANT CREATE ON SCHEMA public TO regress_rr_owner;
SET ROLE regress_rr_owner;
CREATE FUNCTION public.rr_owner_trigger() RETURNS trigger
LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
DROP TRIGGER d365_capture_update_flush ON app_contact;
CREATE TRIGGER d365_capture_update_flush AFTER UPDATE ON app_contact
    FOR EACH STATEMENT EXECUTE FUNCTION public.rr_owner_trigger();
RESET ROLE;
SELECT item, value FROM d365.d365_status() WHERE item = 'attachment';
SELECT d365.d365_attach_contacts('app_contact');    -- the superuser repairs it
SELECT item, value FROM d365.d365_status() WHERE item = 'attachment';
-- now the view
SET ROLE regress_rr_owner;
DELETE FROM app_contact;
DROP TRIGGER d365_capture_update ON app_contact;
DROP TRIGGER d365_capture_update_flush ON app_contact;
DROP TRIGGER d365_capture_insert_flush ON app_contact;
DROP TRIGGER d365_capture_delete ON app_contact;
DROP TRIGGER d365_capture_truncate ON app_contact;
DROP TRIGGER d365_link_guard ON app_contact;
DROP TRIGGER d365_link_guard_update ON app_contact;
SELECT format('DROP INDEX %s', indexrelid::regclass) FROM pg_index
 WHERE indrelid = 'app_contact'::regclass AND NOT indisprimary \gexec
ALTER TABLE app_contact DROP CONSTRAINT app_contact_pkey;
RESET ROLE;
VACUUM app_contact;
SET ROLE regress_rr_owner;
CREATE RULE "_RETURN" AS ON SELECT TO app_contact DO INSTEAD
    SELECT 1::bigint AS id, 'x'::text AS first_name, 'y'::text AS last_name, 'e'::text AS email,
           50 AS score, NULL::date AS birthday, NULL::timestamptz AS last_seen, NULL::integer AS kids,
           NULL::boolean AS no_email, NULL::numeric(12,2) AS income, NULL::uuid AS company,
           NULL::smallint AS gender, NULL::text[] AS tags, NULL::text AS note,
           NULL::uuid AS dynamics365_related_id, NULL::timestamptz AS dynamics365_synchronized_on
     WHERE public.rr_evil('finding 3: view in the table''s place');
CREATE TRIGGER d365_capture_update INSTEAD OF UPDATE ON app_contact
    FOR EACH ROW EXECUTE FUNCTION public.rr_owner_trigger();
CREATE TRIGGER d365_capture_update_flush AFTER UPDATE ON app_contact
    FOR EACH STATEMENT EXECUTE FUNCTION public.rr_owner_trigger();
CREATE TRIGGER d365_capture_insert_flush AFTER INSERT ON app_contact
    FOR EACH STATEMENT EXECUTE FUNCTION public.rr_owner_trigger();
CREATE TRIGGER d365_capture_delete AFTER DELETE ON app_contact
    FOR EACH STATEMENT EXECUTE FUNCTION public.rr_owner_trigger();
RESET ROLE;
SELECT item, value FROM d365.d365_status() WHERE item IN ('attachment', 'contacts linked');
SELECT created, failed FROM d365.d365_sync_contacts();
SELECT d365.d365_log_activity(1, 'phonecall', 'a call');
SELECT d365.d365_attach_contacts('app_contact');
SELECT * FROM rr_seen;
SELECT rolsuper FROM pg_roles WHERE rolname = 'regress_rr_operator';
SELECT d365.d365_detach_contacts();
DROP VIEW app_contact;
\ir sql/include/app_contact.sql
\set ECHO all

-- ---------------------------------------------------------------------------
-- 6. One column right is not a key to the sync state.  d365._contact_snapshot
-- was granted to PUBLIC and asked only for UPDATE on any column: a role with
-- UPDATE (score) alone read every contact's synced name and email, and wrote
-- made-up state; d365._contact_apply updated rows it could not SELECT.
-- ---------------------------------------------------------------------------
GRANT USAGE ON SCHEMA d365 TO regress_rr_scorer;
GRANT UPDATE (score) ON app_contact TO regress_rr_scorer;
SET ROLE regress_rr_scorer;
SELECT d365._contact_snapshot('1', NULL);
SELECT d365._contact_snapshot('1', '{"emailaddress1": "forged@example.com"}');
SELECT d365._contact_apply('{"score": 1}', '1');
RESET ROLE;
-- even where EXECUTE is granted, the functions ask for the rights of the
-- columns involved
GRANT EXECUTE ON FUNCTION d365._contact_snapshot(text, jsonb), d365._contact_apply(jsonb, text),
                          d365._owner_sql(text, name[])
   TO regress_rr_scorer;
SET ROLE regress_rr_scorer;
SELECT d365._contact_snapshot('1', NULL);
SELECT d365._contact_snapshot('1', '{"emailaddress1": "forged@example.com"}');
SELECT d365._contact_apply('{"score": 1}', '1');
RESET ROLE;
SELECT synced ->> 'emailaddress1' AS synced_email, (SELECT score FROM app_contact WHERE id = 1)
  FROM d365.contact_state WHERE contact_key = '1';
-- with SELECT on the mapped columns and the key the same role may
GRANT SELECT (id, first_name, last_name, email, score) ON app_contact TO regress_rr_scorer;
SET ROLE regress_rr_scorer;
SELECT d365._contact_snapshot('1', NULL) ->> 'emailaddress1' AS synced_email;
SELECT d365._contact_apply('{"score": 51}', '1');
SELECT d365._contact_snapshot('1', '{"emailaddress1": "forged@example.com"}');
RESET ROLE;
SELECT score FROM app_contact WHERE id = 1;

-- ---------------------------------------------------------------------------
-- 8. Smaller: anyone who can connect held d365sync's advisory locks (every
-- job then "skipped" without an error), and a query text shaped like the
-- progress comment showed a made-up run in d365_status(), or broke it for
-- everyone with a number too large for bigint.
-- ---------------------------------------------------------------------------
-- a role that may not run the jobs holds 0.2's lock of the contact job and
-- reports a made-up run in its query text
CREATE ROLE regress_rr_spoof LOGIN;
SELECT current_database() AS db \gset
\setenv RR_DB :db
\! psql -X -q -U regress_rr_spoof -d "$RR_DB" -c "/* d365sync: contacts run since 2020-01-01 00:00:00 UTC: 99999999999999999999 done, 0 failed, 0 remaining, 0 requests, 0 throttled */ SELECT pg_advisory_lock(1144206901, 1), pg_sleep(4)" >/dev/null 2>&1 &
DO $$
BEGIN
    FOR i IN 1..100 LOOP
        EXIT WHEN EXISTS (SELECT FROM pg_stat_activity WHERE usename = 'regress_rr_spoof' AND state = 'active');
        PERFORM pg_sleep(0.05);
        PERFORM pg_stat_clear_snapshot();
    END LOOP;
END $$;
SELECT count(*) AS spoofing_sessions FROM pg_stat_activity
 WHERE usename = 'regress_rr_spoof' AND query LIKE '/* d365sync: contacts run since%';
SELECT count(*) AS advisory_locks_held FROM pg_locks l JOIN pg_stat_activity a USING (pid)
 WHERE a.usename = 'regress_rr_spoof' AND l.locktype = 'advisory' AND l.granted;
UPDATE app_contact SET email = 'ada@three.example' WHERE id = 1;
SELECT updated, failed FROM d365.d365_sync_contacts();
SELECT coalesce(message, 'ran') AS last_contacts_run FROM d365.sync_run WHERE kind = 'contacts' ORDER BY id DESC LIMIT 1;
SELECT count(*) AS made_up_runs FROM d365.d365_run_progress();
SELECT count(*) > 10 AS status_works FROM d365.d365_status();
SELECT count(*) AS made_up_rows FROM d365.d365_status() WHERE item LIKE 'running:%';
-- the job's row lock is out of its reach
SET ROLE regress_rr_spoof;
SELECT job FROM d365.job_lock FOR UPDATE;
RESET ROLE;
DO $$
BEGIN
    FOR i IN 1..200 LOOP
        EXIT WHEN NOT EXISTS (SELECT FROM pg_stat_activity WHERE usename = 'regress_rr_spoof');
        PERFORM pg_sleep(0.05);
        PERFORM pg_stat_clear_snapshot();
    END LOOP;
END $$;
DROP ROLE regress_rr_spoof;

-- ---------------------------------------------------------------------------
-- Table maps: no role may use d365's trigger functions, so the capture
-- triggers of a mapped table are created as d365's owner -- for a caller
-- that owns the table (an admin mapping its own table), and for nobody else.
-- (The extension was installed anew above: the sets are given again.)
-- ---------------------------------------------------------------------------
SELECT d365.d365_grant('regress_rr_admin', 'admin');
SELECT d365.d365_grant('regress_rr_operator', 'operator');
SET ROLE regress_rr_admin;
CREATE TABLE public.rr_account (id integer PRIMARY KEY, name text);
SELECT d365.d365_map_table('rr_accounts', 'public.rr_account'::regclass, 'accounts');
SELECT tgname, tgfoid::regprocedure FROM pg_trigger
 WHERE tgrelid = 'public.rr_account'::regclass ORDER BY 1;
RESET ROLE;
CREATE TABLE public.rr_other (id integer PRIMARY KEY, name text);
SET ROLE regress_rr_operator;
SELECT d365._map_capture_install('public.rr_other'::regclass);
SELECT d365._map_capture_install('public.rr_account'::regclass);
RESET ROLE;
SELECT count(*) AS triggers_on_rr_other FROM pg_trigger WHERE tgrelid = 'public.rr_other'::regclass;
SET ROLE regress_rr_admin;
SELECT d365.d365_unmap_table('rr_accounts');
DROP TABLE public.rr_account;
RESET ROLE;
DROP TABLE public.rr_other;

SELECT * FROM rr_seen;
SELECT rolsuper FROM pg_roles WHERE rolname = 'regress_rr_operator';
SELECT d365.d365_revoke('regress_rr_operator', 'operator');
SELECT d365.d365_revoke('regress_rr_admin', 'admin');
DROP OWNED BY regress_rr_operator, regress_rr_admin, regress_rr_owner, regress_rr_scorer;
DROP ROLE regress_rr_operator, regress_rr_admin, regress_rr_owner, regress_rr_scorer;
