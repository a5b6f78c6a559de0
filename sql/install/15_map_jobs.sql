-- Table maps as jobs: the maps the background worker (src/worker/worker_jobs.c)
-- and the scheduled map jobs (d365_run_job('maps'), d365_run_job('map-pull'))
-- run, and what d365_status() shows of each map.  See docs/worker.md and
-- docs/table-maps.md.
-- ---------------------------------------------------------------------------

/*
 * The maps a job runs when no map is named, parents before children: the
 * enabled maps whose direction sends (outgoing) or receives (NOT outgoing)
 * and that have at least one column mapped that way (a map being set up,
 * its columns not mapped yet, is not run), except "contact" -- the contact
 * table, which the contact jobs run.  noted: an outgoing map has changes
 * noted by its capture triggers, or deletes due, that no sync has taken
 * yet (the worker runs such a map at once, the others at its poll).
 */
CREATE FUNCTION d365._map_jobs(outgoing boolean, OUT name text, OUT noted boolean)
RETURNS SETOF record
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT t.name,
           coalesce(outgoing, false)
           AND (EXISTS (SELECT FROM d365.map_change q WHERE q.map = t.name)
                OR EXISTS (SELECT FROM d365.map_delete d
                            WHERE d.map = t.name
                              AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= now())))
      FROM d365._map_order() o
      JOIN d365.table_map t ON t.name = o.name
     WHERE t.enabled AND t.name <> 'contact'
       AND t.direction <> CASE WHEN outgoing THEN 'in' ELSE 'out' END
       AND EXISTS (SELECT FROM d365.column_map c
                    WHERE c.map = t.name AND c.direction <> CASE WHEN outgoing THEN 'in' ELSE 'out' END)
     ORDER BY o.depth, o.name
$$;

/*
 * What d365_status() shows of each table map (but "contact", whose lines
 * are the contact table's): "map <name>", the rows waiting to be sent (not
 * linked yet, or changed since their last sync, or noted by the capture and
 * not yet seen by a sync) and those failing; "last run error of map <name>",
 * the newest failed run of its sync or pull that no run of the same kind
 * has completed since; "last row error of map <name>", the newest row
 * still failing.  Reads the mapped table as whoever calls it (d365_status()
 * is its owner's), with built-in operators only, and only when the check
 * a map run starts with passes (d365._map_problem).
 */
CREATE FUNCTION d365._map_status(OUT item text, OUT value text)
RETURNS SETOF record
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map;
    r record;
    pending bigint;
    to_create bigint;
    failing bigint;
    noted timestamptz;
    problem text;
BEGIN
    FOR m IN SELECT * FROM d365.table_map t WHERE t.name <> 'contact' ORDER BY t.name LOOP
        item := format('map %s', m.name);
        SELECT count(*) INTO failing FROM d365.map_row s WHERE s.map = m.name AND s.attempts > 0;
        SELECT min(q.noted_at) INTO noted FROM d365.map_change q WHERE q.map = m.name;
        BEGIN
            -- the check a run of the map starts with (16_map_guard.sql),
            -- under the table's lock: a view, rules, a key of the owner's
            -- type or row security would run the owner's code here
            problem := d365._map_problem(m.name);
            IF problem IS NOT NULL THEN
                RAISE EXCEPTION 'table map "%" cannot run: %', m.name, problem;
            END IF;
            EXECUTE format(
                'SELECT count(*), count(*) FILTER (WHERE c.dynamics365_related_id IS NULL)'
                '  FROM %1$s c LEFT JOIN d365.map_row r'
                '    ON r.map OPERATOR(pg_catalog.=) $1 AND r.row_key OPERATOR(pg_catalog.=) c.%2$I::pg_catalog.text'
                ' WHERE c.%2$I IS NOT NULL'
                '   AND ((c.dynamics365_related_id IS NULL'
                '         AND (r.row_key IS NULL OR r.remote_deleted_at IS NULL'
                '              OR r.change_seq OPERATOR(pg_catalog.>) r.synced_seq))'
                '        OR (c.dynamics365_related_id IS NOT NULL'
                '            AND (r.row_key IS NULL OR r.synced IS NULL'
                '                 OR r.change_seq OPERATOR(pg_catalog.>) r.synced_seq'
                '                 OR r.dynamics_id IS DISTINCT FROM c.dynamics365_related_id))'
                '        OR c.%2$I::pg_catalog.text OPERATOR(pg_catalog.=) ANY (ARRAY('
                '               SELECT k FROM d365.map_change q, pg_catalog.unnest(q.keys) k'
                '                WHERE q.map OPERATOR(pg_catalog.=) $1)))',
                m.local_table, m.key_column) INTO pending, to_create USING m.name;
            value := format('%s pending (%s to create), %s failing', pending, to_create, failing);
        EXCEPTION WHEN OTHERS THEN
            value := format('pending not counted (%s), %s failing', SQLERRM, failing);
        END;
        value := value
                 || coalesce('; oldest change noted ' || to_char(noted, 'YYYY-MM-DD HH24:MI:SS TZ'), '')
                 || CASE WHEN NOT m.enabled THEN '; disabled (enabled = false): the worker and the scheduled map jobs pass it by'
                         WHEN m.direction = 'in' THEN '; direction in: nothing is sent'
                         ELSE '' END;
        RETURN NEXT;

        SELECT sr.finished_at, sr.kind, sr.message INTO r FROM d365.sync_run sr
         WHERE sr.kind IN ('map:' || m.name, 'map-pull:' || m.name) AND sr.message LIKE 'failed:%'
           AND NOT EXISTS (SELECT FROM d365.sync_run ok
                            WHERE ok.kind = sr.kind AND ok.id > sr.id
                              AND (ok.message IS NULL
                                   OR NOT (ok.message LIKE 'failed:%' OR ok.message LIKE 'skipped:%')))
         ORDER BY sr.id DESC LIMIT 1;
        IF FOUND THEN
            item := format('last run error of map %s', m.name);
            value := format('%s at %s: %s', r.kind, to_char(r.finished_at, 'YYYY-MM-DD HH24:MI:SS TZ'),
                            r.message);
            RETURN NEXT;
        END IF;
        SELECT s.row_key, s.last_attempt_at, s.last_error INTO r FROM d365.map_row s
         WHERE s.map = m.name AND s.attempts > 0
         ORDER BY s.last_attempt_at DESC NULLS LAST, s.row_key LIMIT 1;
        IF FOUND THEN
            item := format('last row error of map %s', m.name);
            value := format('row %s at %s: %s', r.row_key,
                            to_char(r.last_attempt_at, 'YYYY-MM-DD HH24:MI:SS TZ'), r.last_error);
            RETURN NEXT;
        END IF;
    END LOOP;
END;
$$;

REVOKE ALL ON FUNCTION d365._map_jobs(boolean), d365._map_status() FROM PUBLIC;
