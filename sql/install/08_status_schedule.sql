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
    RETURN NEXT;
    item := 'activity sync enabled'; value := s.activity_sync_enabled::text; RETURN NEXT;
    item := 'default owner'; value := coalesce(s.default_owner, '(none)'); RETURN NEXT;
    item := 'realtime'; value := s.realtime::text; RETURN NEXT;
    item := 'pull interval'; value := coalesce(s.pull_interval::text, '(none)'); RETURN NEXT;

    -- the background worker (docs/worker.md)
    SELECT * INTO w FROM d365._worker_state();
    item := 'worker';
    value := CASE
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
        SELECT count(*)::text INTO value FROM d365.field_map; RETURN NEXT;
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
    SELECT sr.finished_at, sr.kind, sr.message INTO r FROM d365.sync_run sr
     WHERE sr.message LIKE 'failed:%'
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

CREATE FUNCTION d365.d365_schedule(
    contacts text DEFAULT '0 * * * *',
    activities text DEFAULT '0 * * * *',
    pull text DEFAULT NULL)
RETURNS TABLE (job_name text, schedule text, command text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    jobs text[][] := ARRAY[['d365-contact-sync', contacts, 'SELECT d365.d365_sync_contacts()', 'd365.d365_sync_contacts()'],
                           ['d365-activity-sync', activities, 'SELECT d365.d365_sync_activities()', 'd365.d365_sync_activities()'],
                           ['d365-pull-changes', pull, 'SELECT d365.d365_pull_changes()', 'd365.d365_pull_changes()']];
    i integer;
BEGIN
    IF to_regclass('cron.job') IS NULL THEN
        RAISE EXCEPTION 'pg_cron is not installed in this database'
            USING ERRCODE = 'undefined_object',
                  HINT = 'Add pg_cron to shared_preload_libraries, set cron.database_name to this database, and run CREATE EXTENSION pg_cron.';
    END IF;
    FOR i IN 1 .. array_length(jobs, 1) LOOP
        IF jobs[i][2] IS NOT NULL AND to_regprocedure(jobs[i][4]) IS NOT NULL THEN
            PERFORM cron.schedule(jobs[i][1], jobs[i][2], jobs[i][3]);
        ELSE
            PERFORM cron.unschedule(j.jobid) FROM cron.job j WHERE j.jobname = jobs[i][1];
        END IF;
    END LOOP;
    RETURN QUERY SELECT j.jobname::text, j.schedule::text, j.command::text
                   FROM cron.job j WHERE j.jobname LIKE 'd365-%' ORDER BY j.jobname;
END;
$$;
COMMENT ON FUNCTION d365.d365_schedule(text, text, text) IS
    'Creates or updates the pg_cron jobs d365-contact-sync, d365-activity-sync and d365-pull-changes';

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
