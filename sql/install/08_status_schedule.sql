-- Status and scheduling
-- ---------------------------------------------------------------------------

CREATE FUNCTION d365.d365_status(OUT item text, OUT value text)
RETURNS SETOF record
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s d365.settings;
    src d365.contact_source;
    attached boolean;
    problem text;
    w record;
    n bigint;
    queued bigint := 0;
    oldest timestamptz;
    since timestamptz;
    r record;
BEGIN
    SELECT * INTO s FROM d365.settings;
    item := 'configured';
    value := (s.org_url IS NOT NULL AND s.tenant_id IS NOT NULL AND s.client_id IS NOT NULL
              AND s.client_secret IS NOT NULL)::text;
    RETURN NEXT;
    item := 'organization'; value := coalesce(s.org_url, '(not set)'); RETURN NEXT;
    item := 'contact sync enabled';
    value := format('%s (contact_sync_enabled = %s, min_score = %s)',
                    (s.contact_sync_enabled AND s.min_score > 0)::text,
                    s.contact_sync_enabled::text, s.min_score);
    -- the map "contact" switched off (src/engines/contact_policies.c)
    IF EXISTS (SELECT FROM d365.table_map t WHERE t.name = 'contact' AND NOT t.enabled) THEN
        value := 'false (map contact disabled: enabled = false; '
                 || substr(value, strpos(value, '(') + 1);
    END IF;
    RETURN NEXT;
    item := 'activity sync enabled'; value := s.activity_sync_enabled::text; RETURN NEXT;
    item := 'default owner'; value := coalesce(s.default_owner, '(none)'); RETURN NEXT;
    item := 'realtime'; value := s.realtime::text; RETURN NEXT;
    item := 'pull interval'; value := coalesce(s.pull_interval::text, '(none)'); RETURN NEXT;

    -- the background worker (docs/worker.md)
    SELECT * INTO w FROM d365._worker_state();
    item := 'worker';
    value := CASE
        WHEN pg_catalog.pg_is_in_recovery()
            THEN 'not running: this server is a hot standby (in recovery); nothing is sent to Dynamics 365 from here, and the worker starts when the server is promoted'
        WHEN NOT w.preloaded THEN 'not running (d365sync is not in shared_preload_libraries)'
        WHEN NOT w.running THEN 'not running (the server starts it again within seconds)'
        WHEN w.database IS DISTINCT FROM current_database()
            THEN format('running in database %s, not in this one (pid %s)', w.database, w.pid)
        ELSE format('running (pid %s, %s, since %s)', w.pid, w.state,
                    to_char(w.started_at, 'YYYY-MM-DD HH24:MI:SS TZ')) END;
    RETURN NEXT;
    IF w.running AND w.database = current_database() THEN
        item := 'worker last wake';
        value := coalesce(to_char(w.last_wake, 'YYYY-MM-DD HH24:MI:SS.MS TZ'), '(none yet)');
        RETURN NEXT;
        item := 'worker last pull';
        value := coalesce(to_char(w.last_pull, 'YYYY-MM-DD HH24:MI:SS.MS TZ'), '(none yet)');
        RETURN NEXT;
    END IF;
    IF w.last_error IS NOT NULL THEN
        item := 'worker last error';
        value := format('%s at %s', w.last_error, to_char(w.last_error_at, 'YYYY-MM-DD HH24:MI:SS TZ'));
        RETURN NEXT;
    END IF;

    SELECT * INTO src FROM d365.contact_source;
    attached := FOUND;
    item := 'contact table';
    value := CASE WHEN NOT attached THEN '(not attached)'
                  WHEN NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = src.contact_table)
                      THEN format('(dropped, OID %s)', src.contact_table::oid)
                  ELSE src.contact_table::text END;
    RETURN NEXT;
    IF attached THEN
        problem := d365._attachment_problem(src);
        item := 'attachment'; value := coalesce('broken: ' || problem, 'ok'); RETURN NEXT;
        item := 'mapped fields';
        SELECT count(*)::text INTO value FROM d365.field_map;
        -- linked contacts and no map: nothing is sent or received for them
        -- (a map lost in a restore that refused it, or deleted by hand)
        IF value = '0' AND EXISTS (SELECT FROM d365.contact_state cs WHERE cs.synced IS NOT NULL) THEN
            value := '0 -- WARNING: contacts are linked but no field is mapped, so nothing is sent or received;'
                     ' restore d365.field_map (see "Backup and restore" in docs/operations.md) or map the fields again';
        END IF;
        RETURN NEXT;
    END IF;
    IF attached AND problem IS NULL THEN
        -- the queue's age: folded changes not backing off after a failure
        -- (pending_since), changes not folded yet (noted_at), activities of
        -- linked contacts (logged_at)
        EXECUTE format('SELECT count(*), min(s.pending_since) FILTER (WHERE s.attempts = 0)'
                       '  FROM %s WHERE c.%I IS NOT NULL AND %s', d365._contact_pending_from(src, true),
                       src.key_column, d365._contact_pending_sql('create', src.score_column, true)) INTO n, oldest;
        item := 'contacts to create'; value := n::text; RETURN NEXT;
        queued := queued + n;
        EXECUTE format('SELECT count(*), min(s.pending_since) FILTER (WHERE s.attempts = 0)'
                       '  FROM %s WHERE c.%I IS NOT NULL AND %s', d365._contact_pending_from(src, true),
                       src.key_column, d365._contact_pending_sql('update', src.score_column, true)) INTO n, since;
        item := 'contacts with pending changes'; value := n::text; RETURN NEXT;
        queued := queued + n;
        oldest := least(oldest, since, (SELECT min(q.noted_at) FROM d365.contact_change q));
        EXECUTE format('SELECT count(*), min(a.logged_at) FILTER (WHERE a.attempts = 0)'
                       '  FROM d365.activity a JOIN %s c ON c.%I::text = a.contact_key'
                       ' WHERE a.synced_at IS NULL AND c.dynamics365_related_id IS NOT NULL',
                       src.contact_table, src.key_column) INTO n, since;
        queued := queued + n;
        oldest := least(oldest, since);
        item := 'queue length'; value := queued::text; RETURN NEXT;
        item := 'queue lag';
        value := CASE WHEN oldest IS NOT NULL
                      THEN round(extract(epoch FROM now() - oldest)::numeric, 1)::text || ' s'
                      WHEN queued > 0 THEN '(not measured: only new contacts no sync has seen yet)'
                      ELSE '(nothing pending)' END;
        RETURN NEXT;
        EXECUTE format('SELECT count(*) FROM %s c WHERE c.dynamics365_related_id IS NOT NULL',
                       src.contact_table) INTO n;
        item := 'contacts linked'; value := n::text; RETURN NEXT;
    END IF;
    item := 'contacts failing';
    SELECT count(*)::text INTO value FROM d365.contact_state WHERE attempts > 0; RETURN NEXT;
    item := 'contacts deleted in Dynamics';
    SELECT count(*)::text INTO value FROM d365.contact_state WHERE remote_deleted_at IS NOT NULL; RETURN NEXT;
    item := 'activities pending';
    SELECT count(*)::text INTO value FROM d365.activity WHERE synced_at IS NULL; RETURN NEXT;
    item := 'activities failing';
    SELECT count(*)::text INTO value FROM d365.activity WHERE synced_at IS NULL AND attempts > 0; RETURN NEXT;

    FOR r IN SELECT * FROM d365.d365_run_progress() LOOP
        item := 'running: ' || r.kind;
        value := format('since %s (pid %s): %s done, %s failed, %s remaining, %s requests, %s throttled',
                        to_char(r.started_at, 'YYYY-MM-DD HH24:MI:SS TZ'), r.pid, r.done, r.failed,
                        coalesce(r.remaining::text, 'unknown'), r.requests, r.throttled);
        RETURN NEXT;
    END LOOP;

    FOR r IN SELECT DISTINCT ON (kind) * FROM d365.sync_run ORDER BY kind, id DESC LOOP
        item := 'last run: ' || r.kind;
        value := format('%s (%s ms): %s created, %s updated, %s unchanged, %s failed, %s unlinked, %s requests, %s throttled%s',
                        to_char(r.finished_at, 'YYYY-MM-DD HH24:MI:SS TZ'),
                        round(extract(epoch FROM r.finished_at - r.started_at) * 1000),
                        r.created, r.updated, r.unchanged, r.failed, r.unlinked,
                        r.requests, r.throttled, coalesce('; ' || r.message, ''));
        RETURN NEXT;
    END LOOP;

    SELECT cs.contact_key, cs.last_attempt_at, cs.last_error INTO r FROM d365.contact_state cs
     WHERE cs.attempts > 0 OR cs.remote_deleted_at IS NOT NULL
     ORDER BY cs.last_attempt_at DESC NULLS LAST LIMIT 1;
    IF FOUND THEN
        item := 'last contact error';
        value := format('contact %s at %s: %s', r.contact_key,
                        to_char(r.last_attempt_at, 'YYYY-MM-DD HH24:MI:SS TZ'), r.last_error);
        RETURN NEXT;
    END IF;
    SELECT a.id, a.last_attempt_at, a.last_error INTO r FROM (
        SELECT id, coalesce(next_attempt_at, logged_at) AS last_attempt_at, last_error
          FROM d365.activity WHERE synced_at IS NULL AND attempts > 0
         ORDER BY id DESC LIMIT 1) a;
    IF FOUND THEN
        item := 'last activity error';
        value := format('activity %s: %s', r.id, r.last_error);
        RETURN NEXT;
    END IF;
    -- rows deleted locally whose Dynamics record is not deactivated or
    -- deleted yet (d365.pending_delete)
    FOR r IN SELECT d.map, count(*) AS n, min(d.deleted_at) AS oldest,
                    (array_agg(d.dynamics_id ORDER BY d.deleted_at, d.dynamics_id))[1] AS first_id,
                    (array_agg(d.last_error ORDER BY d.last_attempt_at DESC NULLS LAST))[1] AS last_error
               FROM d365.map_delete d GROUP BY d.map ORDER BY d.map LOOP
        item := format('pending deletes of map %s', r.map);
        value := format('%s (oldest %s, Dynamics id %s)%s', r.n,
                        to_char(r.oldest, 'YYYY-MM-DD HH24:MI:SS TZ'), r.first_id,
                        coalesce('; last error: ' || r.last_error, ''));
        RETURN NEXT;
    END LOOP;
    -- fields changed on both sides, as resolved (d365.conflict): how many,
    -- the newest; their values are for those who may read the table
    FOR r IN SELECT c.map, count(*) AS n, max(c.at) AS newest,
                    count(*) FILTER (WHERE c.resolution = 'local_wins') AS local_wins
               FROM d365.conflict c GROUP BY c.map ORDER BY c.map LOOP
        item := format('conflicts of map %s', r.map);
        value := format('%s (%s dynamics_wins, %s local_wins; newest %s)', r.n, r.n - r.local_wins,
                        r.local_wins, to_char(r.newest, 'YYYY-MM-DD HH24:MI:SS TZ'));
        RETURN NEXT;
    END LOOP;
    -- each table map: pending rows, its last run error, its last row error
    RETURN QUERY SELECT * FROM d365._map_status();
    -- initial loads not finished, and lookups of loaded rows waiting for
    -- their parent record to be linked (14_map_load.sql)
    FOR r IN SELECT substr(l.entity, 5) AS map, l.records, l.total, l.pages, l.started_at, l.last_error
               FROM d365.load_state l
              WHERE l.entity LIKE 'map:%' AND l.finished_at IS NULL ORDER BY 1 LOOP
        item := format('load of map %s', r.map);
        value := format('not finished (started %s): %s of %s records in %s page(s)%s',
                        to_char(r.started_at, 'YYYY-MM-DD HH24:MI:SS TZ'), r.records,
                        coalesce(r.total::text, '?'), r.pages, coalesce('; last error: ' || r.last_error, ''));
        RETURN NEXT;
    END LOOP;
    FOR r IN SELECT q.map, count(*) AS n FROM d365.map_lookup_pending q GROUP BY q.map ORDER BY 1 LOOP
        item := format('lookups waiting in map %s', r.map);
        value := format('%s (their parent record is linked to no row yet)', r.n);
        RETURN NEXT;
    END LOOP;
    -- the newest failed run of a job that has not completed a run since
    -- (a skipped or disabled run does not count); the history keeps them all
    SELECT sr.finished_at, sr.kind, sr.message INTO r FROM d365.sync_run sr
     WHERE sr.message LIKE 'failed:%'
       AND NOT EXISTS (SELECT FROM d365.sync_run ok
                        WHERE ok.kind = sr.kind AND ok.id > sr.id
                          AND (ok.message IS NULL OR
                               NOT (ok.message LIKE 'failed:%' OR ok.message LIKE 'skipped:%'
                                    OR ok.message LIKE '% sync is disabled (%')))
     ORDER BY sr.id DESC LIMIT 1;
    IF FOUND THEN
        item := 'last run error';
        value := format('%s at %s: %s', r.kind, to_char(r.finished_at, 'YYYY-MM-DD HH24:MI:SS TZ'), r.message);
        RETURN NEXT;
    END IF;
END;
$$;
COMMENT ON FUNCTION d365.d365_status() IS
    'At a glance: what is enabled, backlog, failures, the last run of each job and the last error';

/*
 * The scheduled jobs: the name d365_run_job() takes, the pg_cron job name,
 * the job's command and the schedule a first d365_schedule() gives it.
 */
CREATE FUNCTION d365._jobs(OUT job text, OUT job_name text, OUT command text, OUT default_schedule text)
RETURNS SETOF record
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    VALUES ('contacts', 'd365-contact-sync', 'CALL d365.d365_run_job(''contacts'')', '0 * * * *'),
           ('activities', 'd365-activity-sync', 'CALL d365.d365_run_job(''activities'')', '0 * * * *'),
           ('pull', 'd365-pull-changes', 'CALL d365.d365_run_job(''pull'')', NULL),
           ('maps', 'd365-map-sync', 'CALL d365.d365_run_job(''maps'')', '0 * * * *'),
           ('map-pull', 'd365-map-pull', 'CALL d365.d365_run_job(''map-pull'')', NULL)
$$;

/*
 * One run of a scheduled job, through the job's function (lock, error
 * capture, its row in d365.sync_run, pruning of old runs): returns the id
 * of the row the run recorded and, when the run failed, why.  The map
 * jobs (maps, map-pull) run d365_sync(map) or d365_pull(map) for each map
 * of d365._map_jobs(), parents first, one run each: a map that fails does
 * not stop the others; run_id is then the first failed run's, and failure
 * names every map that failed.
 */
CREATE FUNCTION d365._run_job(job text, OUT run_id bigint, OUT failure text)
RETURNS record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m record;
    one record;
BEGIN
    IF job IN ('maps', 'map-pull') THEN
        FOR m IN SELECT j.name FROM d365._map_jobs(job = 'maps') j LOOP
            SELECT * INTO one FROM d365._run_map_job(job, m.name);
            IF one.failure IS NOT NULL THEN
                run_id := coalesce(run_id, one.run_id);
                failure := concat_ws('; ', failure, format('map %s: %s', m.name, one.failure));
            END IF;
        END LOOP;
        RETURN;
    END IF;
    CASE job
        WHEN 'contacts' THEN PERFORM d365.d365_sync_contacts();
        WHEN 'activities' THEN PERFORM d365.d365_sync_activities();
        WHEN 'pull' THEN PERFORM d365.d365_pull_changes();
        ELSE
            RAISE EXCEPTION 'unknown d365sync job "%"', job
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'The jobs are contacts, activities, pull, maps and map-pull.';
    END CASE;
    -- the run recorded itself last: this session's last value of the sequence
    SELECT r.id, CASE WHEN r.message LIKE 'failed: %' THEN substr(r.message, 9) END
      INTO run_id, failure
      FROM d365.sync_run r WHERE r.id = currval('d365.sync_run_id_seq'::regclass);
END;
$$;

/*
 * One map's run of a map job: d365_sync(map) ('maps') or d365_pull(map)
 * ('map-pull'), after waiting for a run of that map in progress (the
 * worker's, the other map job's) instead of skipping it -- a sync and a
 * pull scheduled at the same minute would otherwise skip one another.
 * Returns the id of the row the run recorded and, when it failed, why; a
 * map gone meanwhile returns NULLs.
 */
CREATE FUNCTION d365._run_map_job(job text, map text, OUT run_id bigint, OUT failure text)
RETURNS record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM FROM d365.table_map t WHERE t.name = map FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF job = 'maps' THEN
        PERFORM d365.d365_sync(map);
    ELSE
        PERFORM d365.d365_pull(map);
    END IF;
    SELECT s.id, CASE WHEN s.message LIKE 'failed: %' THEN substr(s.message, 9) END
      INTO run_id, failure
      FROM d365.sync_run s WHERE s.id = currval('d365.sync_run_id_seq'::regclass);
EXCEPTION WHEN OTHERS THEN
    run_id := NULL;
    failure := SQLERRM;
END;
$$;
REVOKE ALL ON FUNCTION d365._run_map_job(text, text) FROM PUBLIC;

/*
 * The command of the pg_cron jobs (src/worker/run_job.c), run as the job role.  A
 * failed run is committed to d365.sync_run first, then raised, so that
 * pg_cron records the job run as failed and the run's record stays.  A
 * procedure that commits cannot carry a SET clause: it pins its search_path
 * in each of its transactions instead.
 */
CREATE PROCEDURE d365.d365_run_job(job text)
AS 'MODULE_PATHNAME', 'd365_run_job'
LANGUAGE C;
COMMENT ON PROCEDURE d365.d365_run_job(text) IS
    'Runs one scheduled job (contacts, activities, pull, maps or map-pull) as pg_cron does: records the run (the map jobs: one run and one transaction per map, every enabled map, parents first, each waiting for a run of its map in progress), commits, and raises when it failed so that cron.job_run_details says failed; call it outside a transaction block';

/*
 * Schedules the d365sync jobs with pg_cron.  Only the jobs an argument
 * names change; the COMMENT below gives the rules.
 */
CREATE FUNCTION d365.d365_schedule(
    contacts text DEFAULT 'keep',
    activities text DEFAULT 'keep',
    pull text DEFAULT 'keep',
    maps text DEFAULT 'keep',
    map_pull text DEFAULT 'keep')
RETURNS TABLE (job_name text, schedule text, command text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    wanted text[] := ARRAY[contacts, activities, pull, maps, map_pull];
    nothing_named boolean := coalesce(contacts = 'keep' AND activities = 'keep' AND pull = 'keep'
                                      AND maps = 'keep' AND map_pull = 'keep', false);
    host text;
    j record;
    cur record;
    i integer := 0;
    sched text;
BEGIN
    IF to_regclass('cron.job') IS NULL THEN
        RAISE EXCEPTION 'pg_cron is not installed in this database'
            USING ERRCODE = 'undefined_object',
                  HINT = 'Add pg_cron to shared_preload_libraries, set cron.database_name to this database, and run CREATE EXTENSION pg_cron.';
    END IF;
    host := coalesce(d365._cron_host(), 'localhost');
    FOR j IN SELECT * FROM d365._jobs() LOOP
        i := i + 1;
        SELECT c.jobid, c.schedule, c.command, c.nodename INTO cur
          FROM cron.job c WHERE c.jobname = j.job_name AND c.username = current_user;
        sched := wanted[i];
        IF sched IS NULL OR sched = 'off' THEN
            IF cur.jobid IS NOT NULL THEN
                PERFORM cron.unschedule(cur.jobid);
            END IF;
            CONTINUE;
        ELSIF sched = 'keep' THEN
            -- not named: its schedule stays (the command and host are
            -- brought up to date); a call naming nothing creates the
            -- default jobs that are missing
            sched := CASE WHEN cur.jobid IS NOT NULL THEN cur.schedule
                          -- the map job only where there is a map to send
                          WHEN nothing_named AND j.job = 'maps'
                               AND NOT EXISTS (SELECT FROM d365.table_map t
                                                WHERE t.enabled AND t.name <> 'contact' AND t.direction <> 'in')
                              THEN NULL
                          WHEN nothing_named THEN j.default_schedule END;
            CONTINUE WHEN sched IS NULL;
        END IF;
        CONTINUE WHEN cur.jobid IS NOT NULL AND cur.schedule = sched
                  AND cur.command = j.command AND cur.nodename = host;
        -- pg_cron keeps the host of an existing job when its schedule
        -- changes: a job whose host is not cron.host is scheduled anew
        IF cur.jobid IS NOT NULL AND cur.nodename <> host THEN
            PERFORM cron.unschedule(cur.jobid);
        END IF;
        PERFORM cron.schedule(j.job_name, sched, j.command);
    END LOOP;
    RETURN QUERY SELECT c.jobname::text, c.schedule::text, c.command::text
                   FROM cron.job c WHERE c.jobname LIKE 'd365-%' AND c.username = current_user
                  ORDER BY c.jobname;
END;
$$;
COMMENT ON FUNCTION d365.d365_schedule(text, text, text, text, text) IS
    'Creates, changes or removes the pg_cron jobs d365-contact-sync, d365-activity-sync, d365-pull-changes, d365-map-sync (maps: every enabled table map, parents first) and d365-map-pull (map_pull). ONLY THE JOBS THE CALL NAMES CHANGE: a cron schedule sets that job, NULL or ''off'' removes it, ''keep'' (the default: an argument left out) leaves its schedule as it is. Called without any argument it creates the missing contact and activity jobs, hourly, and the map job when a table map sends. Every job it keeps or sets runs CALL d365.d365_run_job(...) and connects to the current cron.host.';

CREATE FUNCTION d365.d365_unschedule()
RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n integer := 0;
BEGIN
    IF to_regclass('cron.job') IS NULL THEN
        RETURN 0;
    END IF;
    SELECT count(*) INTO n FROM cron.job j WHERE j.jobname LIKE 'd365-%';
    PERFORM cron.unschedule(j.jobid) FROM cron.job j WHERE j.jobname LIKE 'd365-%';
    RETURN n;
END;
$$;
COMMENT ON FUNCTION d365.d365_unschedule() IS
    'Removes the d365sync pg_cron jobs; returns how many there were';


-- ---------------------------------------------------------------------------
