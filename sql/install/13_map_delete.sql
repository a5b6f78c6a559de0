-- Deletes both ways for table maps.  A row deleted locally from a map whose
-- on_local_delete is 'deactivate' or 'delete' leaves its Dynamics id in
-- d365.map_delete (the capture trigger, 11_table_maps.sql) until the next
-- sync has deactivated or deleted the record (d365._map_work_sql and
-- d365._map_record, 12_map_sync.sql); d365.pending_delete shows them.  A
-- record deleted in Dynamics deletes its local row when on_remote_delete is
-- 'delete' (d365._map_remove: as the table's owner, src/privilege/map_owner.c).  See
-- docs/table-maps.md.
-- ---------------------------------------------------------------------------

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

CREATE FUNCTION d365._map_remove(map text, row_key text)
RETURNS boolean
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_map_remove'
LANGUAGE C VOLATILE;

/*
 * The requests of the pending deletes of a map, as rows of its work query
 * (d365._map_work_sql): a DELETE, or a PATCH of statecode 1 / statuscode 2
 * (inactive); 404 (the record is gone already) counts as done.
 */
CREATE FUNCTION d365._map_delete_work_sql(map text, entity_set text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format($q$
        SELECT 'delete:' || d.dynamics_id::text AS item_key,
               jsonb_build_array(CASE WHEN d.action = 'delete'
                   THEN jsonb_build_object('method', 'DELETE',
                                           'path', %2$L || '(' || d.dynamics_id || ')',
                                           'headers', '[]'::jsonb, 'ok', '[404]'::jsonb)
                   ELSE jsonb_build_object('method', 'PATCH',
                                           'path', %2$L || '(' || d.dynamics_id || ')',
                                           'body', '{"statecode":1,"statuscode":2}',
                                           'headers', '["If-Match: *"]'::jsonb,
                                           'ok', '[404]'::jsonb) END)::text AS requests,
               jsonb_build_object('map', %1$L, 'action', 'remote_' || d.action,
                                  'id', d.dynamics_id, 'key', d.row_key)::text AS context
          FROM d365.map_delete d
         WHERE d.map = %1$L AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= now())
    $q$, map, entity_set)
$$;

REVOKE ALL ON d365.map_delete, d365.pending_delete FROM PUBLIC;
REVOKE ALL ON FUNCTION d365._map_remove(text, text), d365._map_delete_work_sql(text, text)
    FROM PUBLIC;

/*
 * on_remote_delete 'delete': the row of a record deleted in Dynamics (and
 * unlinked already) is deleted as the table's owner.  A row that cannot be
 * deleted (a foreign key of another table, the owner's trigger) stays,
 * unlinked, with a WARNING and the error in its sync state; returns false
 * then.
 */
CREATE FUNCTION d365._map_remove_row(map text, row_key text)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    msg text;
    code text;
BEGIN
    PERFORM d365._map_remove(map, row_key);
    RETURN true;
EXCEPTION WHEN data_exception OR integrity_constraint_violation OR raise_exception
               OR insufficient_privilege OR object_not_in_prerequisite_state THEN
    GET STACKED DIAGNOSTICS code = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
    RAISE WARNING 'row % of map "%" was deleted in Dynamics 365 but could not be deleted here: %',
                  row_key, map, msg
        USING ERRCODE = '01000';
    UPDATE d365.map_row s
       SET last_error_code = code,
           last_error = left('deleted in Dynamics 365, unlinked; the local delete failed: ' || msg, 2000)
     WHERE s.map = _map_remove_row.map AND s.row_key = _map_remove_row.row_key;
    RETURN false;
END;
$$;
REVOKE ALL ON FUNCTION d365._map_remove_row(text, text) FROM PUBLIC;
