-- Hand-written steps of the upgrade from 0.1 to 0.2: only what cannot be
-- re-created (tables, columns, indexes, triggers, views, types, data moves,
-- drops).  Never a function: every function and procedure of 0.2 is copied
-- from the frozen sql/d365sync--0.2.sql into sql/d365sync--0.1--0.2.sql by
-- scripts/gen-sql.py (make regen), between the part above the line
-- "-- @functions" and the part below it.  0.2 is released: these steps are
-- frozen with it.
--
-- Before the functions: what their bodies and signatures need.

-- 0.2 converts incoming values without user code (_incoming_value).
DROP FUNCTION d365._typed_jsonb(jsonb, regtype, text, name);

-- Matching and field direction: d365.field_map gains match and direction
-- (added at the end, as a fresh install has them).
ALTER TABLE d365.field_map
    ADD COLUMN match boolean NOT NULL DEFAULT false,
    ADD COLUMN direction text NOT NULL DEFAULT 'both'
        CONSTRAINT field_map_direction_check CHECK (direction IN ('both', 'out', 'in'));
COMMENT ON COLUMN d365.field_map.match IS
    'Before an unlinked contact is created, Dynamics is searched for a contact whose match fields all equal its values; one hit is linked instead of creating a duplicate';
COMMENT ON COLUMN d365.field_map.direction IS
    'both: sent and received; out: only sent (incoming changes never write it); in: only received (never sent)';

-- A change of match alone changes nothing that is sent.  (The trigger
-- calls 0.1's _field_map_changed until the functions below replace it.)
DROP TRIGGER field_map_changed ON d365.field_map;
CREATE TRIGGER field_map_changed
    AFTER INSERT OR UPDATE OF column_name, dynamics_field, direction OR DELETE ON d365.field_map
    FOR EACH STATEMENT EXECUTE FUNCTION d365._field_map_changed();

-- A mapped generated column can only be sent: 0.1 let it be mapped both ways.
DO $$
BEGIN
    IF EXISTS (SELECT FROM d365.field_map f
                 JOIN d365.contact_source s ON true
                 JOIN pg_catalog.pg_attribute a ON a.attrelid = s.contact_table
                      AND a.attname = f.column_name
                WHERE a.attgenerated <> '' AND f.direction <> 'out') THEN
        UPDATE d365.field_map f SET direction = 'out'
          FROM d365.contact_source s, pg_catalog.pg_attribute a
         WHERE a.attrelid = s.contact_table AND a.attname = f.column_name
           AND a.attgenerated <> '' AND f.direction <> 'out';
    END IF;
END;
$$;

-- One Dynamics record per person, cheap change capture: the state knows
-- whose it is (filled below, after the functions), and a queue of the keys
-- the capture trigger notes, one text[] per statement.
ALTER TABLE d365.contact_state ADD COLUMN dynamics_id uuid;
COMMENT ON COLUMN d365.contact_state.generation IS
    'Identity of the key''s current person: raised whenever the key stops belonging to one (delete, truncate, key change, deleted in Dynamics)';
COMMENT ON COLUMN d365.contact_state.dynamics_id IS
    'The Dynamics contact this state (snapshot, failures) belongs to; NULL until linked';

CREATE TABLE d365.contact_change (
    keys     text[] NOT NULL,
    noted_at timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('d365.contact_change', '');
COMMENT ON TABLE d365.contact_change IS
    'Keys of contacts changed by one statement each, noted by the capture trigger and folded into contact_state by the next contact sync';
COMMENT ON COLUMN d365.contact_change.noted_at IS
    'When the change was noted (its transaction''s start); becomes contact_state.pending_since, the start of the queue lag d365_status() shows';

-- More application users (the pool); the check trigger comes after its
-- function, below.
CREATE TABLE d365.app_users (
    client_id     uuid PRIMARY KEY,
    client_secret text NOT NULL,
    enabled       boolean NOT NULL DEFAULT true
);
COMMENT ON TABLE d365.app_users IS
    'More application users of the same tenant (app registrations with an application user in Dataverse): work is spread over the settings'' user and every enabled one; client_secret is readable only by the table owner';
COMMENT ON COLUMN d365.app_users.client_id IS
    'Application (client) id of the app registration';
COMMENT ON COLUMN d365.app_users.client_secret IS
    'Client secret value of the app registration (never shown in messages)';
COMMENT ON COLUMN d365.app_users.enabled IS
    'Whether syncs send as this user';
SELECT pg_catalog.pg_extension_config_dump('d365.app_users', '');

-- The background worker: its settings, and the start of the queue lag.
ALTER TABLE d365.settings
    ADD COLUMN realtime boolean NOT NULL DEFAULT false,
    ADD COLUMN pull_interval interval;
COMMENT ON COLUMN d365.settings.realtime IS
    'The background worker sends contact changes and activities as they commit (needs d365sync in shared_preload_libraries); d365_log_activity then only queues';
COMMENT ON COLUMN d365.settings.pull_interval IS
    'The background worker pulls Dynamics changes at this interval (at least 5 seconds; NULL: it does not pull)';

ALTER TABLE d365.contact_state ADD COLUMN pending_since timestamptz DEFAULT now();
COMMENT ON COLUMN d365.contact_state.pending_since IS
    'When the oldest change not yet sent was captured (meaningful while change_seq > synced_seq); d365_status() shows the lag from it';

-- Operations: run-history retention.
ALTER TABLE d365.settings ADD COLUMN run_history_retention interval NOT NULL DEFAULT '30 days';
COMMENT ON COLUMN d365.settings.run_history_retention IS
    'How long d365.sync_run keeps a run; every scheduled run deletes older rows (the newest run of each kind is always kept)';
CREATE INDEX sync_run_finished_idx ON d365.sync_run (finished_at);

-- The record stage of contacts works on an array, not a temporary table.
CREATE TYPE d365._contact_outcome AS (
    item_key text, action text, dynamics_id uuid, seq bigint, generation integer,
    base integer, vals jsonb, sent jsonb, status integer, error_code text,
    error_message text, ok boolean, gone boolean, matched boolean, current boolean
);

-- @functions
-- After the functions: what uses them.

-- The attached table: the state learns which Dynamics contact each linked
-- row has, and the capture triggers of 0.1 give way to those of 0.2.
DO $$
DECLARE
    src d365.contact_source;
BEGIN
    SELECT * INTO src FROM d365.contact_source;
    IF NOT FOUND OR NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = src.contact_table) THEN
        RETURN;             -- nothing attached, or the table dropped
    END IF;
    -- 0.1's triggers go in any case: their function is dropped below
    PERFORM d365._contact_capture_drop(src.contact_table);
    IF NOT EXISTS (SELECT FROM pg_attribute a
                    WHERE a.attrelid = src.contact_table AND a.attname = src.key_column
                      AND a.attnum > 0 AND NOT a.attisdropped) THEN
        RETURN;             -- key column renamed: d365_status() reports it, attach again
    END IF;
    EXECUTE format('UPDATE d365.contact_state s SET dynamics_id = c.dynamics365_related_id'
                   '  FROM %s c WHERE c.%I::text = s.contact_key'
                   '   AND c.dynamics365_related_id IS NOT NULL',
                   src.contact_table, src.key_column);
    PERFORM d365._contact_capture_install();
END;
$$;
DROP FUNCTION d365._contact_capture();

CREATE TRIGGER app_users_check
    BEFORE INSERT OR UPDATE ON d365.app_users
    FOR EACH ROW EXECUTE FUNCTION d365._app_users_check();

CREATE VIEW d365.run_progress AS SELECT * FROM d365.d365_run_progress();
COMMENT ON VIEW d365.run_progress IS
    'Sync runs in progress in this database, as d365_run_progress() returns them';

-- Privileges of tables and views as a fresh install has them (those of
-- functions are replayed above).
REVOKE ALL ON ALL TABLES IN SCHEMA d365 FROM PUBLIC;
