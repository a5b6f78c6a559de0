-- The delete policies of the map "contact" (the attached contact table),
-- on the table maps' delete engine (13_map_delete.sql):
--   on_local_delete 'deactivate' | 'delete': a contact row deleted here
--     (DELETE or TRUNCATE) leaves the record d365sync linked it to in
--     d365.map_delete (map "contact"), which the contact sync deactivates
--     or deletes (d365._map_delete_work_sql, d365._map_record) with
--     back-off; d365.pending_delete and d365_status() show it until then.
--   on_remote_delete 'delete': a contact whose record was deleted in
--     Dynamics (the pull's $deletedEntity, or an update meeting 404) is
--     unlinked, then deleted as the table's owner (d365._map_remove).
-- enabled is honoured by the contact engine's runs (src/engines/contact_policies.c).
-- load = true is refused for the contact map (d365._contact_map_guard).
-- See docs/table-maps.md, "The contact table".
-- ---------------------------------------------------------------------------

/*
 * Keys deleted from the contact table (the DELETE and TRUNCATE capture):
 * with on_local_delete 'deactivate' or 'delete', the record each key was
 * linked to by d365sync (d365.contact_state: never what the deleted row's
 * link column held) waits in d365.map_delete; then every key becomes a
 * tombstone (d365._contact_tombstone).  Wakes the background worker when
 * a record waits.
 */
CREATE FUNCTION d365._contact_deleted(keys text[])
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    queued bigint;
BEGIN
    INSERT INTO d365.map_delete (map, dynamics_id, row_key, action)
    SELECT t.name, s.dynamics_id, s.contact_key, t.on_local_delete
      FROM d365.table_map t, d365.contact_state s
     WHERE t.name = 'contact' AND t.on_local_delete <> 'unlink' AND t.direction <> 'in'
       AND s.contact_key = ANY (keys) AND s.dynamics_id IS NOT NULL
    ON CONFLICT ON CONSTRAINT map_delete_pkey DO NOTHING;
    GET DIAGNOSTICS queued = ROW_COUNT;
    PERFORM d365._contact_tombstone(keys);
    IF queued > 0 THEN
        PERFORM d365._worker_wake(false);
    END IF;
END;
$$;

/*
 * The pending deletes of the map "contact" as the contact sync's work
 * query: the table maps' requests (a DELETE, or a PATCH of statecode 1 /
 * statuscode 2), recorded by d365._map_record.  NULL when none is due.
 */
CREATE FUNCTION d365._contact_delete_work_sql()
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT 'SELECT d.item_key, d.requests, d.context FROM ('
           || d365._map_delete_work_sql('contact', 'contacts') || ') d'
     WHERE EXISTS (SELECT FROM d365.map_delete d
                    WHERE d.map = 'contact' AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= now()))
$$;

/*
 * on_remote_delete 'delete' of the map "contact": the contacts with these
 * keys, whose records were deleted in Dynamics and which are unlinked
 * already, are deleted as the table's owner (d365._map_remove: only while
 * unlinked, and only where the role running the pull or sync holds DELETE
 * on the table).  A row that cannot be deleted stays, unlinked, with a
 * WARNING and the error in d365.contact_state.  Nothing with 'unlink'.
 */
CREATE FUNCTION d365._contact_remote_remove(keys text[])
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    k text;
    msg text;
    code text;
BEGIN
    IF keys IS NULL OR NOT EXISTS (SELECT FROM d365.table_map t
                                    WHERE t.name = 'contact' AND t.on_remote_delete = 'delete') THEN
        RETURN;
    END IF;
    FOREACH k IN ARRAY keys LOOP
        CONTINUE WHEN k IS NULL;
        BEGIN
            PERFORM d365._map_remove('contact', k);
        EXCEPTION WHEN data_exception OR integrity_constraint_violation OR raise_exception
                       OR insufficient_privilege OR object_not_in_prerequisite_state THEN
            GET STACKED DIAGNOSTICS code = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
            RAISE WARNING 'contact % was deleted in Dynamics 365 but could not be deleted here: %', k, msg
                USING ERRCODE = '01000';
            UPDATE d365.contact_state s
               SET last_error_code = code,
                   last_error = left('deleted in Dynamics 365, unlinked; the local delete failed: ' || msg, 2000)
             WHERE s.contact_key = k;
        END;
    END LOOP;
END;
$$;

REVOKE ALL ON FUNCTION d365._contact_deleted(text[]), d365._contact_delete_work_sql(),
       d365._contact_remote_remove(text[]) FROM PUBLIC;
