-- The check every map run starts with.  A map's run (d365_sync(map),
-- d365_pull(map), d365_load(map), the worker's and the scheduled map jobs)
-- and d365_status() read the mapped table with the rights of whoever runs
-- them: the superuser, an admin, an operator, the worker's role, or the
-- extension's owner.  The table's owner must not be able to put code of its
-- own in that read (a view in the table's place, row-level security, casts
-- of a type of its own), nor take away d365sync's capture triggers and
-- link guard (a forged link would send a row to another row's record).  See
-- docs/security.md, "What a map run checks".
-- ---------------------------------------------------------------------------

/*
 * The table part, in C (src/capture/map_guard.c, shared with the contact table's
 * check): the table's ACCESS SHARE lock, to the end of the transaction; a
 * plain or partitioned table without rewrite rules; link columns of the
 * built-in types.
 */
CREATE FUNCTION d365._map_table_problem(tbl regclass)
RETURNS text
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_map_table_problem'
LANGUAGE C VOLATILE;

/*
 * What keeps map `map` from running, or NULL: its table is not a plain or
 * partitioned table, has rules, is gone; its key column is gone or of a
 * type d365sync does not convert with built-in functions; a trigger that
 * d365._map_capture_sql() installs is missing, disabled (or fires only in
 * replica mode), calls another function, or (the link guard) watches
 * other columns than the link columns; the link column's unique index is
 * missing; row-level security applies to the current role (its policies
 * are the owner's code).  The map "contact" is the attached contact table:
 * its attachment's check (d365._attachment_problem).  Reads the catalog
 * only, under the table's lock.
 */
CREATE FUNCTION d365._map_problem(map text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map;
    src d365.contact_source;
    tbl regclass;
    problem text;
    stmt text;
    trg text;
    fn text;
    trans text[];
    cols text;
BEGIN
    SELECT * INTO m FROM d365.table_map t WHERE t.name = map;
    IF NOT FOUND THEN
        RETURN format('table map "%s" does not exist', map);
    END IF;
    tbl := m.local_table;
    IF m.name = 'contact' THEN
        SELECT * INTO src FROM d365.contact_source LIMIT 1;
        IF NOT FOUND THEN
            RETURN 'no contact table is attached';
        END IF;
        problem := d365._attachment_problem(src);
        tbl := src.contact_table;
    ELSE
        problem := d365._map_table_problem(tbl);
        IF problem IS NULL AND NOT EXISTS (
               SELECT FROM pg_attribute a
                WHERE a.attrelid = tbl AND a.attname = m.key_column
                  AND a.attnum > 0 AND NOT a.attisdropped) THEN
            problem := format('key column "%s" of %s was renamed or dropped', m.key_column, tbl);
        END IF;
        IF problem IS NULL THEN
            SELECT format('key column "%s" of %s has type %s, which d365sync does not support',
                          m.key_column, tbl, a.atttypid::regtype) INTO problem
              FROM pg_attribute a
             WHERE a.attrelid = tbl AND a.attname = m.key_column
               AND a.atttypid <> ALL (d365._key_types());
        END IF;
        -- each trigger d365._map_capture_sql() makes: its name (at the start
        -- of its statement), the function it executes and its transition
        -- table (the last of each: the table's name, which its owner
        -- chooses, comes before them), the columns an UPDATE OF watches
        IF problem IS NULL THEN
            FOREACH stmt IN ARRAY d365._map_capture_sql(tbl) LOOP
                trg := substring(stmt FROM '^CREATE OR REPLACE TRIGGER ([a-z0-9_]+) ');
                fn := substring(stmt FROM '.*EXECUTE FUNCTION (d365\.[a-z0-9_]+)\(');
                trans := regexp_match(stmt, '.*REFERENCING (NEW|OLD) TABLE AS ([a-z0-9_]+) ');
                cols := substring(stmt FROM '^CREATE OR REPLACE TRIGGER [a-z0-9_]+ AFTER UPDATE OF ([a-z0-9_, ]+) ON ');
                CONTINUE WHEN trg IS NULL OR fn IS NULL;
                IF NOT EXISTS (SELECT FROM pg_trigger t
                                WHERE t.tgrelid = tbl AND t.tgname = trg AND t.tgenabled IN ('O', 'A')) THEN
                    RETURN format('trigger %s on %s is missing or disabled', trg, tbl);
                END IF;
                IF NOT EXISTS (SELECT FROM pg_trigger t
                                 JOIN pg_proc p ON p.oid = t.tgfoid
                                 JOIN pg_namespace n ON n.oid = p.pronamespace
                                WHERE t.tgrelid = tbl AND t.tgname = trg
                                  AND n.nspname OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) p.proname = fn
                                  AND (trans IS NULL
                                       OR (trans[1] = 'NEW' AND t.tgnewtable = trans[2])
                                       OR (trans[1] = 'OLD' AND t.tgoldtable = trans[2]))) THEN
                    RETURN format('trigger %s on %s does not call %s()', trg, tbl, fn);
                END IF;
                IF cols IS NOT NULL AND NOT EXISTS (
                       SELECT FROM pg_trigger t
                        WHERE t.tgrelid = tbl AND t.tgname = trg
                          AND ARRAY(SELECT x FROM unnest(t.tgattr::int2[]) x ORDER BY x)
                              = ARRAY(SELECT a.attnum FROM pg_attribute a
                                       WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped
                                         AND a.attname = ANY (string_to_array(replace(cols, ' ', ''), ','))
                                       ORDER BY a.attnum)) THEN
                    RETURN format('trigger %s on %s watches other columns than %s', trg, tbl, cols);
                END IF;
            END LOOP;
            IF NOT d365._link_index_exists(tbl) THEN
                problem := format('the unique index on dynamics365_related_id of %s is missing', tbl);
            END IF;
        END IF;
    END IF;
    IF problem IS NULL AND row_security_active(tbl) THEN
        problem := format('row-level security of %s applies to role "%s"', tbl, current_user);
    END IF;
    RETURN problem;
END;
$$;

/*
 * At the start of each run of map `map`, under its table's lock: raises
 * when d365._map_problem() finds something wrong with its table or with a
 * table its lookups read (the parent maps' tables), naming the map, the
 * table and what to do; and (42501) when the job's caller may not read
 * the columns the lookups read of a parent map's table.  The run is
 * recorded as failed; nothing was read or sent, the pending rows stay
 * pending.
 */
CREATE FUNCTION d365._map_guard(map text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map;
    what text := map;
    problem text := d365._map_problem(map);
    parent text;
    pm d365.table_map;
BEGIN
    SELECT * INTO m FROM d365.table_map t WHERE t.name = map;
    -- the run reads the tables as the job role, which no policy binds: for
    -- a caller their row-level security does not apply to
    IF problem IS NULL AND FOUND AND d365._caller_rls(m.local_table) THEN
        problem := format('row-level security of %s applies to role "%s"', m.local_table, d365._job_caller()::regrole);
    END IF;
    IF problem IS NULL AND m.name IS NOT NULL THEN
        FOR parent IN SELECT DISTINCT p FROM d365.column_map c,
                             LATERAL d365._map_fk_target(m.local_table, c."column") p
                       WHERE c.map = m.name AND p IS NOT NULL AND p <> m.name ORDER BY 1 LOOP
            problem := d365._map_problem(parent);
            IF problem IS NULL
               AND d365._caller_rls((SELECT t.local_table FROM d365.table_map t WHERE t.name = parent)) THEN
                problem := format('row-level security of %s applies to role "%s"',
                                  (SELECT t.local_table FROM d365.table_map t WHERE t.name = parent),
                                  d365._job_caller()::regrole);
            END IF;
            IF problem IS NOT NULL THEN
                what := parent;
                problem := format('the table of map "%s", which its lookups read: %s', parent, problem);
                EXIT;
            END IF;
        END LOOP;
    END IF;
    IF problem IS NULL THEN
        -- the lookups read the key and link columns of each parent's table
        -- as the job role, which reads every table: only for a caller that
        -- may read those two columns (as d365_map_column() asked of whoever
        -- mapped the lookup, d365._map_lookup_readable); the run checks the
        -- map's own table (d365._caller_reads)
        FOR pm IN SELECT t.* FROM d365.table_map t
                   WHERE t.name IN (SELECT p FROM d365.column_map c,
                                           LATERAL d365._map_fk_target(m.local_table, c."column") p
                                     WHERE c.map = m.name AND p IS NOT NULL AND p <> m.name)
                   ORDER BY t.name LOOP
            IF NOT (has_column_privilege(d365._job_caller(), pm.local_table, pm.key_column, 'SELECT')
                    AND has_column_privilege(d365._job_caller(), pm.local_table, 'dynamics365_related_id', 'SELECT')) THEN
                RAISE EXCEPTION 'permission denied for table %', pm.local_table
                    USING ERRCODE = 'insufficient_privilege',
                          DETAIL = format('The lookups of map "%s" read columns "%s" and "dynamics365_related_id" of %s (map "%s") for role "%s", which may not read them. Nothing was read or sent; the pending rows stay pending.',
                                          m.name, pm.key_column, pm.local_table, pm.name, d365._job_caller()::regrole),
                          HINT = format('GRANT SELECT (%I, dynamics365_related_id) ON %s TO %s;',
                                        pm.key_column, pm.local_table, d365._job_caller()::regrole);
            END IF;
        END LOOP;
        RETURN;
    END IF;
    IF problem LIKE '%row-level security of % applies to role %' THEN
        RAISE EXCEPTION 'table map "%" cannot run: %', map, problem
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'Row-level security policies are code of the table''s owner: d365sync does not read the table as a role they bind. Nothing was read or sent; the pending rows stay pending.',
                  HINT = 'Run the map as the table''s owner, a superuser or a role with BYPASSRLS.';
    END IF;
    RAISE EXCEPTION 'table map "%" cannot run: %', map, problem
        USING ERRCODE = 'object_not_in_prerequisite_state',
              DETAIL = 'd365sync reads and writes a mapped table only while it is a plain or partitioned table without rules, with d365sync''s capture triggers and link guard enabled and its key and link columns of built-in types: anything else could run code of the table''s owner with the rights of the role running the map, or send a row to a record d365sync did not link it to. Nothing was read or sent; the pending rows stay pending.',
              HINT = CASE WHEN what = 'contact'
                          THEN 'Attach the contact table again with d365_attach_contacts() (its owner, or a superuser); d365_status() shows what is wrong.'
                          ELSE format('The table''s owner puts it back (a table, no rules, d365sync''s triggers enabled, the key and link columns of their types); SELECT d365._map_capture_install(%L) (its owner, or a superuser) recreates d365sync''s triggers.',
                                      (SELECT t.local_table::text FROM d365.table_map t WHERE t.name = what)) END;
END;
$$;

REVOKE ALL ON FUNCTION d365._map_table_problem(regclass), d365._map_problem(text),
       d365._map_guard(text) FROM PUBLIC;
