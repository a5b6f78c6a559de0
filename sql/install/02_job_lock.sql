-- Job locks and the reading of run progress written by others: what keeps
-- one role from stopping the jobs or faking their progress (see
-- docs/security.md, "Roles").
-- ---------------------------------------------------------------------------

/*
 * One row per scheduled job: a run holds its job's row lock (FOR NO KEY
 * UPDATE) to the end of its transaction, so a second run of the same job
 * skips instead of duplicating work.  Only roles that may run the jobs (the
 * operator set: UPDATE on this table) can take such a lock; an advisory
 * lock could be taken by anyone able to connect.
 */
CREATE TABLE d365.job_lock (
    job text PRIMARY KEY
);
INSERT INTO d365.job_lock (job) VALUES ('contacts'), ('activities'), ('pull');
COMMENT ON TABLE d365.job_lock IS
    'One row per scheduled job; a run holds its row''s lock so that two runs of one job never overlap';

/*
 * A timestamptz from text, or NULL where it is not one: for values read
 * from text others may write (the activity text of another session).
 */
CREATE FUNCTION d365._safe_timestamptz(value text)
RETURNS timestamptz
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN value::timestamptz;
EXCEPTION WHEN data_exception OR syntax_error THEN
    RETURN NULL;
END;
$$;

-- ---------------------------------------------------------------------------
