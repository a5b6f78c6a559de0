-- Run history
-- ---------------------------------------------------------------------------

CREATE TABLE d365.sync_run (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    created     integer NOT NULL DEFAULT 0,
    updated     integer NOT NULL DEFAULT 0,
    unchanged   integer NOT NULL DEFAULT 0,
    failed      integer NOT NULL DEFAULT 0,
    unlinked    integer NOT NULL DEFAULT 0,
    requests    integer NOT NULL DEFAULT 0,
    throttled   integer NOT NULL DEFAULT 0,
    message     text
);
CREATE INDEX sync_run_kind_idx ON d365.sync_run (kind, id);
SELECT pg_catalog.pg_extension_config_dump('d365.sync_run', '');
SELECT pg_catalog.pg_extension_config_dump('d365.sync_run_id_seq', '');
COMMENT ON TABLE d365.sync_run IS
    'One row per sync run: what it did, the HTTP requests it made, and why it stopped early if it did';

-- ---------------------------------------------------------------------------
CREATE INDEX sync_run_finished_idx ON d365.sync_run (finished_at);

/*
 * Deletes the runs older than d365.settings.run_history_retention, keeping
 * the newest run of each kind whatever its age (d365_status shows it), at
 * most 10,000 rows per call so that a first prune after a long time stays
 * short; returns how many rows it deleted.  Every scheduled run calls it
 * after recording itself.  SECURITY DEFINER: a role that may run the jobs
 * need not be allowed to delete history; it deletes nothing but rows past
 * the retention the settings' owner chose.
 */
CREATE FUNCTION d365._prune_runs()
RETURNS integer
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH old AS (
        SELECT r.id FROM d365.sync_run r
         WHERE r.finished_at < pg_catalog.now() - (SELECT s.run_history_retention FROM d365.settings s)
           AND EXISTS (SELECT FROM d365.sync_run n WHERE n.kind = r.kind AND n.id > r.id)
         ORDER BY r.finished_at
         LIMIT 10000),
    gone AS (
        DELETE FROM d365.sync_run r USING old WHERE r.id = old.id RETURNING 1)
    SELECT count(*)::integer FROM gone
$$;
COMMENT ON FUNCTION d365._prune_runs() IS
    'Deletes run history older than d365.settings.run_history_retention (the newest run of each kind stays); returns the number of rows deleted';

/*
 * Runs in progress in shared memory: one row per run of a backend or the
 * background worker of this database.  Without d365sync in
 * shared_preload_libraries there is no shared memory, and no row.
 */
CREATE FUNCTION d365._run_progress_shared(
    OUT pid integer, OUT kind text, OUT started_at timestamptz,
    OUT done bigint, OUT failed bigint, OUT remaining bigint,
    OUT requests bigint, OUT throttled bigint)
RETURNS SETOF record
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_run_progress_shared'
LANGUAGE C VOLATILE;

/*
 * Runs in progress, as other sessions see them.  A running run reports its
 * progress two ways: in shared memory (with the preload) and in its
 * backend's activity text in pg_stat_activity (a comment before the query:
 * "d365sync: contacts run since ...: 120 done, ..."), which works without
 * the preload but needs track_activities (on by default).  Shared memory
 * wins where both exist.
 * SECURITY DEFINER: the activity text of another role's backend is hidden
 * from a caller without pg_read_all_stats; this shows only the numbers of
 * d365sync runs in this database.  An activity text counts only from a
 * session whose role may run the jobs (a superuser, or UPDATE on
 * d365.job_lock: the operator set), with numbers that fit a bigint and a
 * time that parses, so that another session can neither show a made-up run
 * nor make this fail for everyone.
 */
CREATE FUNCTION d365.d365_run_progress(
    OUT pid integer, OUT kind text, OUT started_at timestamptz,
    OUT done bigint, OUT failed bigint, OUT remaining bigint,
    OUT requests bigint, OUT throttled bigint, OUT source text)
RETURNS SETOF record
LANGUAGE sql VOLATILE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH shm AS (SELECT * FROM d365._run_progress_shared())
    SELECT shm.*, 'shared memory' FROM shm
    UNION ALL
    SELECT a.pid, m[1], d365._safe_timestamptz(m[2]), m[3]::bigint, m[4]::bigint,
           nullif(m[5], '?')::bigint, m[6]::bigint, m[7]::bigint, 'pg_stat_activity'
      FROM pg_stat_activity a,
           regexp_match(a.query, '^/\* d365sync: ([a-z][a-z0-9_:-]{0,70}) run since ([0-9: -]+ UTC): ([0-9]{1,18}) done, ([0-9]{1,18}) failed, ([0-9]{1,18}|\?) remaining, ([0-9]{1,18}) requests, ([0-9]{1,18}) throttled') m
     WHERE a.state = 'active' AND a.datname = current_database() AND m IS NOT NULL
       AND a.pid NOT IN (SELECT shm.pid FROM shm)
       -- only sessions that may run the jobs report runs: anyone else can
       -- write a query text of the same shape
       AND (EXISTS (SELECT FROM pg_roles r WHERE r.oid = a.usesysid AND r.rolsuper)
            OR has_table_privilege(a.usesysid, 'd365.job_lock', 'UPDATE'))
    ORDER BY 3, 1
$$;
COMMENT ON FUNCTION d365.d365_run_progress() IS
    'Sync runs in progress in this database (any session or the worker): items done and failed, items remaining (NULL while unknown), HTTP requests and throttled responses so far';

CREATE VIEW d365.run_progress AS SELECT * FROM d365.d365_run_progress();
COMMENT ON VIEW d365.run_progress IS
    'Sync runs in progress in this database, as d365_run_progress() returns them';
