-- Hand-written steps of the upgrade from 0.2 to 0.3: only what cannot be
-- re-created from sql/install/ (new tables, columns, indexes, constraints,
-- triggers, views and types; data moves; drops).  Never a function: every
-- function and procedure of 0.3 is copied from sql/install/ into
-- sql/d365sync--0.2--0.3.sql by scripts/gen-sql.py (make regen), between
-- the part above the line "-- The metadata cache is dumped with the configuration (a restored
-- database's next sync sends no request for metadata).
SELECT pg_catalog.pg_extension_config_dump('d365.metadata_cache', '');

-- @functions" and the part below it.
-- docs/development.md says which step goes where.
--
-- Before the functions: new tables, columns, types and indexes (a
-- LANGUAGE sql function's body is checked when it is created, so what it
-- reads must exist); drops of functions whose signature, return type,
-- argument names or defaults change, with the views and triggers that
-- depend on them.

-- The pull's record stage takes its page as json (a row may hold U+0000,
-- which jsonb cannot).
DROP FUNCTION d365._pull_record(jsonb);
-- d365_schedule() takes the map jobs' schedules too (maps, map_pull): the
-- 0.2 function goes, and the grants made on it are given to the new one
-- (below "-- @functions").
SELECT pg_catalog.set_config('d365sync_upgrade.schedule_acl',
    coalesce((SELECT p.proacl::text FROM pg_catalog.pg_proc p
               WHERE p.oid = 'd365.d365_schedule(text, text, text)'::pg_catalog.regprocedure), ''), true);
DROP FUNCTION d365.d365_schedule(text, text, text);
-- Table maps (11_table_maps.sql, 12_map_sync.sql): their tables and the
-- record stage's row type.
CREATE TABLE d365.table_map (
    name             text PRIMARY KEY
                     CONSTRAINT table_map_name_check CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    local_table      regclass UNIQUE NOT NULL,
    entity_set       text NOT NULL
                     CONSTRAINT table_map_entity_set_check CHECK (entity_set ~ '^[A-Za-z][A-Za-z0-9_]*$'),
    key_column       name NOT NULL,
    direction        text NOT NULL DEFAULT 'both'
                     CONSTRAINT table_map_direction_check CHECK (direction IN ('both', 'in', 'out')),
    load             boolean NOT NULL DEFAULT false,
    on_local_delete  text NOT NULL DEFAULT 'unlink'
                     CONSTRAINT table_map_on_local_delete_check
                     CHECK (on_local_delete IN ('unlink', 'deactivate', 'delete')),
    on_remote_delete text NOT NULL DEFAULT 'unlink'
                     CONSTRAINT table_map_on_remote_delete_check
                     CHECK (on_remote_delete IN ('unlink', 'delete')),
    conflict         text NOT NULL DEFAULT 'dynamics_wins'
                     CONSTRAINT table_map_conflict_check
                     CHECK (conflict IN ('dynamics_wins', 'local_wins')),
    enabled          boolean NOT NULL DEFAULT true
);
COMMENT ON TABLE d365.table_map IS
    'Table maps: a local table synced with a Dataverse table (d365_map_table, d365_unmap_table)';
SELECT pg_catalog.pg_extension_config_dump('d365.table_map', '');

CREATE TABLE d365.column_map (
    map       text REFERENCES d365.table_map ON DELETE CASCADE,
    "column"  name,
    field     text NOT NULL
              CONSTRAINT column_map_field_check CHECK (field ~ '^[a-z][a-z0-9_]*$'),
    direction text NOT NULL DEFAULT 'both'
              CONSTRAINT column_map_direction_check CHECK (direction IN ('both', 'in', 'out')),
    match     boolean NOT NULL DEFAULT false,
    PRIMARY KEY (map, "column")
);
COMMENT ON TABLE d365.column_map IS
    'Columns of a table map and the Dataverse field (attribute logical name) each is synced with (d365_map_column)';
SELECT pg_catalog.pg_extension_config_dump('d365.column_map', '');

-- Per-row sync state of a map: the Dynamics record, what it holds as far
-- as d365sync knows (synced: {wire field: value}), changes not yet sent
-- (change_seq > synced_seq), failures and back-off.
CREATE TABLE d365.map_row (
    map              text NOT NULL REFERENCES d365.table_map ON DELETE CASCADE,
    row_key          text NOT NULL,
    dynamics_id      uuid,
    synced           jsonb,
    change_seq       bigint NOT NULL DEFAULT 0,
    synced_seq       bigint NOT NULL DEFAULT 0,
    generation       integer NOT NULL DEFAULT 0,
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    last_attempt_at  timestamptz,
    last_status      integer,
    last_error_code  text,
    last_error       text,
    remote_deleted_at timestamptz,
    PRIMARY KEY (map, row_key)
);
CREATE INDEX map_row_dynamics_idx ON d365.map_row (map, dynamics_id);
COMMENT ON TABLE d365.map_row IS
    'Sync state of each row of a table map: its Dynamics record, the values last synced, failures';
SELECT pg_catalog.pg_extension_config_dump('d365.map_row', '');

-- Keys noted by the capture triggers, folded into map_row by the next sync.
CREATE TABLE d365.map_change (
    map      text NOT NULL,
    keys     text[] NOT NULL,
    noted_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE d365.map_change IS
    'Keys of mapped rows changed since the last sync of their map (capture triggers)';
SELECT pg_catalog.pg_extension_config_dump('d365.map_change', '');

CREATE TYPE d365._map_outcome AS (
    item_key text, action text, dynamics_id uuid, seq bigint, generation integer,
    vals jsonb, sent jsonb, status integer, error_code text, error_message text,
    ok boolean, gone boolean, matched boolean
);

-- Job locks: the jobs lock a row each instead of an advisory lock anyone
-- could hold (sql/install/02_job_lock.sql).
CREATE TABLE d365.job_lock (
    job text PRIMARY KEY
);
INSERT INTO d365.job_lock (job) VALUES ('contacts'), ('activities'), ('pull');
COMMENT ON TABLE d365.job_lock IS
    'One row per scheduled job; a run holds its row''s lock so that two runs of one job never overlap';
REVOKE ALL ON d365.job_lock FROM PUBLIC;

-- Deletes both ways (13_map_delete.sql): the pending deletes and their view.
CREATE TABLE d365.map_delete (
    map              text NOT NULL REFERENCES d365.table_map ON DELETE CASCADE,
    dynamics_id      uuid NOT NULL,
    row_key          text NOT NULL,
    action           text NOT NULL
                     CONSTRAINT map_delete_action_check CHECK (action IN ('deactivate', 'delete')),
    deleted_at       timestamptz NOT NULL DEFAULT now(),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    last_attempt_at  timestamptz,
    last_status      integer,
    last_error_code  text,
    last_error       text,
    CONSTRAINT map_delete_pkey PRIMARY KEY (map, dynamics_id)
);
COMMENT ON TABLE d365.map_delete IS
    'Dynamics records of rows deleted locally that the next sync deactivates or deletes (on_local_delete)';
SELECT pg_catalog.pg_extension_config_dump('d365.map_delete', '');

CREATE VIEW d365.pending_delete AS
SELECT d.map, d.row_key, d.dynamics_id, d.action, d.deleted_at, d.attempts,
       d.next_attempt_at, d.last_attempt_at, d.last_status, d.last_error
  FROM d365.map_delete d;
COMMENT ON VIEW d365.pending_delete IS
    'Rows deleted locally whose Dynamics record is not deactivated or deleted yet: the Dynamics id, the action, the last failure';

REVOKE ALL ON d365.map_delete, d365.pending_delete FROM PUBLIC;

-- The contact table as the map "contact" (14_contact_map.sql): its rows of
-- the map tables are made from the attachment and the field map, not
-- dumped; its column map holds the field map's fields as written there.
SELECT pg_catalog.pg_extension_config_dump('d365.table_map', 'WHERE name <> ''contact''');
SELECT pg_catalog.pg_extension_config_dump('d365.column_map', 'WHERE map <> ''contact''');
ALTER TABLE d365.column_map DROP CONSTRAINT column_map_field_check;
ALTER TABLE d365.column_map ADD CONSTRAINT column_map_field_check
    CHECK (field ~ '^[a-z][a-z0-9_]*$'
           OR (map = 'contact' AND field ~ '^[a-z_][a-z0-9_]*(@odata\.bind)?$'));

-- Conflicts (14_map_conflict.sql): the ETag of each mapped row, the conflicts.
-- the ETag of the record as d365sync last saw it (NULL: not known)
ALTER TABLE d365.map_row ADD COLUMN etag text;

CREATE TABLE d365.conflict (
    id             bigserial PRIMARY KEY,
    map            text NOT NULL REFERENCES d365.table_map ON DELETE CASCADE,
    row_key        text NOT NULL,
    dynamics_id    uuid NOT NULL,
    "column"       name NOT NULL,
    field          text NOT NULL,
    local_value    jsonb,
    dynamics_value jsonb,
    base_value     jsonb,
    resolution     text NOT NULL
                   CONSTRAINT conflict_resolution_check CHECK (resolution IN ('dynamics_wins', 'local_wins')),
    at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX conflict_map_idx ON d365.conflict (map, at);
COMMENT ON TABLE d365.conflict IS
    'Fields of mapped rows changed both here and in Dynamics since the last sync: both values, the value before, how it was resolved';
SELECT pg_catalog.pg_extension_config_dump('d365.conflict', '');
SELECT pg_catalog.pg_extension_config_dump('d365.conflict_id_seq', '');

REVOKE ALL ON d365.conflict FROM PUBLIC;

-- The scheduled contact sync finds the linked contacts whose state has
-- something to send by index (05_contacts_out.sql).
CREATE INDEX contact_state_pending_idx ON d365.contact_state (dynamics_id)
    WHERE dynamics_id IS NOT NULL AND (synced IS NULL OR change_seq > synced_seq);
-- Initial loads of table maps (14_map_load.sql): where each load stands,
-- and the lookups of loaded rows waiting for their parent.
CREATE TABLE d365.load_state (
    entity       text PRIMARY KEY,
    delta_link   text,
    next_link    text,
    total        bigint,
    pages        integer NOT NULL DEFAULT 0,
    records      bigint NOT NULL DEFAULT 0,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    last_error   text
);
COMMENT ON TABLE d365.load_state IS
    'Initial loads of table maps: the delta link taken before the first page, the next page, the records read';
SELECT pg_catalog.pg_extension_config_dump('d365.load_state', '');
CREATE TABLE d365.map_lookup_pending (
    map          text NOT NULL REFERENCES d365.table_map ON DELETE CASCADE,
    row_key      text NOT NULL,
    "column"     name NOT NULL,
    dynamics_id  uuid NOT NULL,
    PRIMARY KEY (map, row_key, "column")
);
COMMENT ON TABLE d365.map_lookup_pending IS
    'Lookups of rows loaded from Dynamics whose parent record is not linked to a local row yet';
SELECT pg_catalog.pg_extension_config_dump('d365.map_lookup_pending', '');
REVOKE ALL ON d365.load_state, d365.map_lookup_pending FROM PUBLIC;

-- The jobs run as the role d365sync_job (sql/install/90_job_role.sql): made
-- here when no database of the cluster made it yet.
DO $upgrade_job_role$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE r.rolname = 'd365sync_job') THEN
        CREATE ROLE d365sync_job NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION BYPASSRLS;
    END IF;
    IF NOT pg_catalog.pg_has_role('d365sync_job', 'pg_read_all_data', 'MEMBER') THEN
        GRANT pg_read_all_data TO d365sync_job;
    END IF;
    IF NOT pg_catalog.pg_has_role('d365sync_job', 'pg_read_all_stats', 'MEMBER') THEN
        GRANT pg_read_all_stats TO d365sync_job;
    END IF;
END;
$upgrade_job_role$;

-- @functions
-- After the functions: triggers and views that use new functions, data
-- moves done with the new functions, drops of what 0.3 no longer has,
-- REVOKEs of grants 0.3 no longer makes.

-- Foreign tables (10_fdw.sql): the wrapper, on its handler and validator.
CREATE FOREIGN DATA WRAPPER d365_fdw
    HANDLER d365._fdw_handler
    VALIDATOR d365._fdw_validator;
COMMENT ON FOREIGN DATA WRAPPER d365_fdw IS
    'Dataverse tables as read-only foreign tables, through d365sync''s connection (d365.settings)';

-- The link columns of an attached table: the guard trigger (with the
-- capture triggers) and the unique index.  Rows sharing a Dynamics id, or
-- holding a link d365sync's sync state does not confirm, are reported, not
-- changed: the update goes on, and until they are fixed the attachment is
-- reported broken (no index) or the rows are refused (d365sync.link).
DO $upgrade_links$
DECLARE
    src d365.contact_source;
    n bigint;
    msg text;
    det text;
    hnt text;
BEGIN
    SELECT * INTO src FROM d365.contact_source;
    IF NOT FOUND OR NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = src.contact_table)
       OR NOT EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = src.contact_table
                         AND a.attname = 'dynamics365_related_id' AND NOT a.attisdropped) THEN
        RETURN;
    END IF;
    PERFORM d365._contact_capture_install();
    BEGIN
        PERFORM d365._link_index_create(src.contact_table);
    EXCEPTION WHEN unique_violation THEN
        GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT, det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
        RAISE WARNING 'd365sync 0.3: %; the unique index on dynamics365_related_id was not made', msg
            USING DETAIL = det, HINT = hnt;
    END;
    IF NOT EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = src.contact_table
                      AND a.attname = src.key_column AND a.attnum > 0 AND NOT a.attisdropped) THEN
        RETURN;     -- a broken attachment: d365_status() says why
    END IF;
    EXECUTE format('SELECT count(*) FROM %s c LEFT JOIN d365.contact_state s ON s.contact_key = c.%I::text'
                   ' WHERE %s', src.contact_table, src.key_column, d365._contact_untrusted_sql())
       INTO n;
    IF n > 0 THEN
        RAISE WARNING 'd365sync 0.3: % row(s) of % hold a link d365sync''s sync state does not confirm', n, src.contact_table
            USING DETAIL = 'Their dynamics365_related_id differs from the Dynamics id d365sync linked their key to (d365.contact_state.dynamics_id), or their key has none: the contact sync refuses them (d365sync.link) and incoming changes pass them by.',
                  HINT = 'Confirm a right link with d365_link_contact(key, id), or set a wrong one to NULL to have the contact created anew.';
    END IF;
END;
$upgrade_links$;
-- Table maps: their tables are not for PUBLIC.
REVOKE ALL ON d365.table_map, d365.column_map, d365.map_row, d365.map_change FROM PUBLIC;

-- The contact table becomes the map "contact": an attachment moves into
-- its row of d365.table_map, its field map into d365.column_map (the sync
-- state stays in d365.contact_state; nothing is sent).  Then the triggers
-- that keep the map in step with the attachment and the field map.
INSERT INTO d365.table_map (name, local_table, entity_set, key_column)
SELECT 'contact', s.contact_table, 'contacts', s.key_column FROM d365.contact_source s;
INSERT INTO d365.column_map (map, "column", field, direction, match)
SELECT 'contact', f.column_name, f.dynamics_field, f.direction, f.match
  FROM d365.field_map f
 WHERE EXISTS (SELECT FROM d365.contact_source);
CREATE TRIGGER contact_map_refresh
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON d365.contact_source
    FOR EACH STATEMENT EXECUTE FUNCTION d365._contact_map_refresh();
CREATE TRIGGER contact_map_refresh
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON d365.field_map
    FOR EACH STATEMENT EXECUTE FUNCTION d365._contact_map_refresh();
CREATE TRIGGER contact_map_guard
    BEFORE INSERT OR UPDATE OR DELETE ON d365.table_map
    FOR EACH ROW EXECUTE FUNCTION d365._contact_map_guard();
CREATE TRIGGER contact_map_guard
    BEFORE INSERT OR UPDATE OR DELETE ON d365.column_map
    FOR EACH ROW EXECUTE FUNCTION d365._contact_map_guard();
-- The Dynamics ids of the sync state are d365sync's (14_state_guard.sql).
CREATE TRIGGER state_guard BEFORE INSERT OR UPDATE ON d365.contact_state
    FOR EACH ROW WHEN (NEW.dynamics_id IS NOT NULL)
    EXECUTE FUNCTION d365._state_guard('dynamics_id', 'contact_key');
CREATE TRIGGER state_guard BEFORE INSERT OR UPDATE ON d365.map_row
    FOR EACH ROW WHEN (NEW.dynamics_id IS NOT NULL)
    EXECUTE FUNCTION d365._state_guard('dynamics_id', 'map', 'row_key');
CREATE TRIGGER state_guard BEFORE INSERT OR UPDATE ON d365.pull_state
    FOR EACH ROW WHEN (NEW.delta_link IS NOT NULL)
    EXECUTE FUNCTION d365._state_guard('delta_link', 'entity');
CREATE TRIGGER state_guard BEFORE INSERT OR UPDATE ON d365.metadata_cache
    FOR EACH ROW EXECUTE FUNCTION d365._state_guard('body', 'path');

-- The grants of 0.2's d365_schedule(), on the new one (see above).
DO $upgrade_schedule$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT a.grantee, a.is_grantable
               FROM pg_catalog.aclexplode(NULLIF(
                        pg_catalog.current_setting('d365sync_upgrade.schedule_acl', true), '')::pg_catalog.aclitem[]) a
              WHERE a.privilege_type = 'EXECUTE'
                AND a.grantee <> (SELECT p.proowner FROM pg_catalog.pg_proc p
                                   WHERE p.oid = 'd365.d365_schedule(text, text, text, text, text)'::pg_catalog.regprocedure)
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION d365.d365_schedule(text, text, text, text, text) TO %s%s',
                                  CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE g.grantee::pg_catalog.regrole::pg_catalog.text END,
                                  CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
END;
$upgrade_schedule$;

-- Initial loads: load = true is refused for a table whose loaded rows
-- could not get a key.
CREATE TRIGGER map_load_check BEFORE INSERT OR UPDATE OF load, key_column ON d365.table_map
    FOR EACH ROW EXECUTE FUNCTION d365._map_load_check();

-- A waiting lookup and a load's links are what Dynamics answered
-- (14_state_guard.sql).
CREATE TRIGGER state_guard BEFORE INSERT OR UPDATE ON d365.map_lookup_pending
    FOR EACH ROW EXECUTE FUNCTION d365._state_guard('dynamics_id', 'map', 'row_key', 'column');
CREATE TRIGGER state_guard BEFORE INSERT OR UPDATE ON d365.load_state
    FOR EACH ROW WHEN (NEW.delta_link IS NOT NULL)
    EXECUTE FUNCTION d365._state_guard('delta_link', 'entity');
CREATE TRIGGER state_guard_next BEFORE INSERT OR UPDATE ON d365.load_state
    FOR EACH ROW WHEN (NEW.next_link IS NOT NULL)
    EXECUTE FUNCTION d365._state_guard('next_link', 'entity');

-- The capture triggers of a mapped table follow its column map
-- (sql/install/16_map_capture.sql).
CREATE TRIGGER column_map_inserted AFTER INSERT ON d365.column_map
    REFERENCING NEW TABLE AS column_map_new
    FOR EACH STATEMENT EXECUTE FUNCTION d365._column_map_changed();
CREATE TRIGGER column_map_updated AFTER UPDATE ON d365.column_map
    REFERENCING OLD TABLE AS column_map_old NEW TABLE AS column_map_new
    FOR EACH STATEMENT EXECUTE FUNCTION d365._column_map_changed();
CREATE TRIGGER column_map_deleted AFTER DELETE ON d365.column_map
    REFERENCING OLD TABLE AS column_map_old
    FOR EACH STATEMENT EXECUTE FUNCTION d365._column_map_changed();

-- Which table a map syncs, and how, is its table owner's choice, also
-- when a statement writes d365.table_map (sql/install/16_map_owner.sql).
CREATE TRIGGER table_map_owner_check BEFORE INSERT OR UPDATE OR DELETE ON d365.table_map
    FOR EACH ROW EXECUTE FUNCTION d365._table_map_owner_check();

-- The job role's rights (sql/install/90_job_role.sql).  No role but an
-- admin keeps EXECUTE on d365's internal functions (an operator: the two
-- d365_schedule() calls, d365._jobs() and d365._cron_host()), nor writes of
-- the sync state, the run history and the outcomes, which the jobs write as
-- the job role (docs/security.md "Roles").
SELECT d365._job_role_grants();
DO $upgrade_sets$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT DISTINCT p.oid::pg_catalog.regprocedure AS f, a.grantee
               FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
              WHERE p.pronamespace = 'd365'::pg_catalog.regnamespace AND p.proname LIKE '\_%'
                AND a.grantee <> p.proowner AND a.grantee <> 'd365sync_job'::pg_catalog.regrole
                AND NOT (a.grantee <> 0 AND pg_catalog.has_table_privilege(a.grantee, 'd365.settings',
                                                                          'UPDATE WITH GRANT OPTION'))
                AND NOT (p.proname IN ('_jobs', '_cron_host') AND a.grantee <> 0)
    LOOP
        EXECUTE pg_catalog.format('REVOKE EXECUTE ON FUNCTION %s FROM %s CASCADE', g.f,
                                  CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE g.grantee::pg_catalog.regrole::pg_catalog.text END);
    END LOOP;
    FOR g IN SELECT DISTINCT c.oid::pg_catalog.regclass AS t, a.grantee
               FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
              WHERE c.relnamespace = 'd365'::pg_catalog.regnamespace
                AND c.relname IN ('contact_state', 'activity', 'sync_run', 'metadata_cache', 'pull_state', 'map_row',
                                  'map_change', 'map_delete', 'load_state', 'map_lookup_pending', 'conflict')
                AND a.privilege_type IN ('INSERT', 'UPDATE')
                AND a.grantee <> c.relowner AND a.grantee <> 'd365sync_job'::pg_catalog.regrole
                AND NOT (a.grantee <> 0 AND pg_catalog.has_table_privilege(a.grantee, 'd365.settings',
                                                                          'UPDATE WITH GRANT OPTION'))
    LOOP
        EXECUTE pg_catalog.format('REVOKE INSERT, UPDATE ON %s FROM %s CASCADE', g.t,
                                  CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE g.grantee::pg_catalog.regrole::pg_catalog.text END);
    END LOOP;
END;
$upgrade_sets$;
