-- Identity and change capture: tombstones for keys that stop belonging to
-- a person, the capture triggers on the attached table (their C side is
-- src/capture/capture.c) and the check of an attachment.  See docs/contacts.md,
-- "Identity" and "Change capture".
-- ---------------------------------------------------------------------------

/*
 * What is wrong with an attachment, or NULL when nothing is: the table was
 * dropped, the key or score column renamed or dropped, the type of the key,
 * score or link columns changed, or a capture trigger is missing or no
 * longer watches the key column.  Runs no user code (catalog look-ups
 * only), so d365_status() can report it whatever state the table is in.
 * d365._contact_table_problem checks the score and link columns under the
 * table's lock, kept to the end of the transaction.
 */
CREATE FUNCTION d365._contact_table_problem(tbl regclass, score_column name)
RETURNS text
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_contact_table_problem'
LANGUAGE C VOLATILE;

CREATE FUNCTION d365._attachment_problem(src d365.contact_source)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key_att pg_attribute;
    trg text;
    fn text;
BEGIN
    trg := d365._attachment_table_problem(src);
    IF trg IS NOT NULL THEN
        RETURN trg;
    END IF;
    SELECT * INTO key_att FROM pg_attribute a
     WHERE a.attrelid = src.contact_table AND a.attname = src.key_column
       AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        RETURN format('key column "%s" of %s was renamed or dropped', src.key_column, src.contact_table);
    END IF;
    IF key_att.atttypid <> ALL (d365._key_types()) THEN
        RETURN format('key column "%s" of %s has type %s, which d365sync does not support',
                      src.key_column, src.contact_table, key_att.atttypid::regtype);
    END IF;
    -- the score and link columns are compared and converted by d365's own
    -- expressions: a type of the owner's making there (by ALTER TABLE after
    -- attaching) would run its casts and operators with the caller's rights.
    -- Checked under the table's lock, so that no ALTER TABLE comes between
    -- this check and the statements that rely on it.
    trg := d365._contact_table_problem(src.contact_table, src.score_column);
    IF trg IS NOT NULL THEN
        RETURN trg;
    END IF;
    -- each capture trigger, by its name AND the d365 function it calls (a
    -- trigger of the same name calling the owner's function captures
    -- nothing); a table only (a view or another relation standing in the
    -- table's place is refused by d365._contact_table_problem above)
    FOR trg, fn IN SELECT * FROM (VALUES
            ('d365_capture_update', 'd365._contact_capture_row()'),
            ('d365_capture_update_flush', 'd365._contact_capture_flush()'),
            ('d365_capture_insert_flush', 'd365._contact_capture_flush()'),
            ('d365_capture_delete', 'd365._contact_capture_delete()'),
            ('d365_capture_truncate', 'd365._contact_capture_truncate()'),
            ('d365_link_guard', 'd365._contact_link_guard()'),
            ('d365_link_guard_update', 'd365._contact_link_guard()')) v LOOP
        IF NOT EXISTS (SELECT FROM pg_trigger t
                        WHERE t.tgrelid = src.contact_table AND t.tgname = trg
                          AND t.tgenabled IN ('O', 'A')     -- 'R' fires only in replica mode
                          AND (t.tgnargs = 0 OR
                               d365._capture_key_attnum(src.contact_table, d365._trigger_args(t.tgargs))
                                   = key_att.attnum)) THEN
            RETURN format('capture trigger %s on %s is missing, disabled or watches another key column',
                          trg, src.contact_table);
        END IF;
        IF NOT EXISTS (SELECT FROM pg_trigger t
                        WHERE t.tgrelid = src.contact_table AND t.tgname = trg
                          AND t.tgfoid = fn::regprocedure
                          AND (trg <> 'd365_capture_delete' OR t.tgoldtable IS NOT NULL)) THEN
            RETURN format('capture trigger %s on %s does not call %s', trg, src.contact_table, fn);
        END IF;
    END LOOP;
    IF NOT d365._link_index_exists(src.contact_table) THEN
        RETURN format('the unique index on dynamics365_related_id of %s is missing', src.contact_table);
    END IF;
    RETURN NULL;
END;
$$;

/*
 * Change capture.  The triggers d365._contact_capture_install() puts on the
 * attached table cost the application little and run nothing it controls
 * with our rights:
 *   d365_capture_update        AFTER UPDATE, per row, WHEN the key or a mapped
 *                              column changed: the WHEN clause is evaluated
 *                              by the executor as the writing user, and the
 *                              C function only notes the key (src/capture/capture.c)
 *   d365_capture_update_flush  AFTER UPDATE, per statement, and
 *   d365_capture_insert_flush  AFTER INSERT, per statement: the noted keys
 *                              go to d365.contact_change, one row per
 *                              statement
 *   d365_capture_delete        AFTER DELETE, per statement: tombstones
 *   d365_capture_truncate      AFTER TRUNCATE: tombstones for every key
 *   d365_link_guard,           AFTER INSERT, and AFTER UPDATE OF the link
 *   d365_link_guard_update     columns, per row, WHEN a link value is set or
 *                              changed: refuses link values d365sync did not
 *                              write, undoing the statement (src/capture/link_guard.c)
 * The key column is passed by attribute number and by name
 * (d365._capture_key_attnum): renaming it never breaks the application's
 * writes (d365_status() reports the attachment broken until the table is
 * attached again under the new name), and a copy of the table restored by
 * pg_restore, which numbers the columns afresh, watches the same column.
 */

/*
 * The keys stop belonging to the person who had them (deleted, truncated,
 * moved to another key): raise their generation, so a row inserted later
 * under the same key gets a Dynamics id of its own, and forget the snapshot,
 * the failures and the link of the earlier person.  A key without state gets
 * a tombstone row too (a create for it may have reached Dynamics in a
 * transaction that never committed).
 */
CREATE FUNCTION d365._contact_tombstone(keys text[])
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO d365.contact_state AS s (contact_key, change_seq, synced_seq, generation)
    SELECT DISTINCT k, 0, 0, 1 FROM unnest(keys) k WHERE k IS NOT NULL
    ON CONFLICT (contact_key) DO UPDATE
       SET generation = s.generation + 1, synced = NULL, dynamics_id = NULL,
           synced_seq = s.change_seq, remote_deleted_at = NULL, attempts = 0,
           next_attempt_at = NULL, last_status = NULL, last_error_code = NULL,
           last_error = NULL
$$;

/*
 * The one account of a contact deleted in Dynamics, once its row was
 * unlinked (a 404 on update, or a $deletedEntity of the pull): the state
 * forgets the snapshot and the link, takes the next generation (a
 * re-creation gets a new id), and records why.  With on_remote_delete
 * 'delete' the row goes too (d365._contact_remote_remove).
 */
CREATE FUNCTION d365._contact_remote_deleted(keys text[], statuses integer[],
                                             error_codes text[], reasons text[])
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE d365.contact_state s
       SET synced = NULL, dynamics_id = NULL, synced_seq = s.change_seq,
           generation = s.generation + 1, remote_deleted_at = now(), attempts = 0,
           next_attempt_at = NULL, last_attempt_at = now(), last_status = o.st,
           last_error_code = o.code, last_error = o.reason
      FROM unnest(keys, statuses, error_codes, reasons) o(k, st, code, reason)
     WHERE s.contact_key = o.k;
    PERFORM d365._contact_remote_remove(keys);
END;
$$;

/*
 * Rows whose key changed (old_keys[i] became new_keys[i]): the old key is a
 * tombstone, and so is whatever state the new key had (it belonged to an
 * earlier person).  The moved row keeps its link column, and the new key
 * the Dynamics id d365sync had linked the old one to, so it stays linked
 * to its own Dynamics record and is sent in full at the next sync.
 */
CREATE FUNCTION d365._contact_keys_moved(old_keys text[], new_keys text[])
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ids uuid[];
BEGIN
    SELECT array_agg(s.dynamics_id ORDER BY m.i) INTO ids
      FROM unnest(old_keys) WITH ORDINALITY m(k, i)
      LEFT JOIN d365.contact_state s ON s.contact_key = m.k;
    PERFORM d365._contact_tombstone(old_keys || new_keys);
    UPDATE d365.contact_state s SET dynamics_id = m.id
      FROM unnest(new_keys, ids) m(k, id)
     WHERE s.contact_key = m.k AND m.id IS NOT NULL;
END;
$$;

-- AFTER DELETE, per statement: every deleted key becomes a tombstone.
-- Reads only the key column of the trigger's own transition table, handed
-- over by the executor (src/capture/capture_guard.c).  SECURITY DEFINER: the
-- writers of the table need no rights in d365.  Runs only as d365sync's
-- trigger d365_capture_delete of the attached table, and raises elsewhere.
CREATE FUNCTION d365._contact_capture_delete()
RETURNS trigger
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_capture_delete'
LANGUAGE C;

-- AFTER TRUNCATE: every key the state knows becomes a tombstone.
-- SECURITY DEFINER (the writers need no rights in d365); runs only as
-- d365sync's trigger d365_capture_truncate of the attached table.
CREATE FUNCTION d365._contact_capture_truncate()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_NAME <> 'd365_capture_truncate' OR TG_WHEN <> 'AFTER' OR TG_LEVEL <> 'STATEMENT'
       OR TG_OP <> 'TRUNCATE'
       OR TG_RELID IS DISTINCT FROM (SELECT s.contact_table::oid FROM d365.contact_source s) THEN
        RAISE EXCEPTION 'd365._contact_capture_truncate() cannot run in trigger "%" on %', TG_NAME, TG_TABLE_NAME
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'd365sync''s capture functions run only in the capture triggers that d365sync puts on the attached contact table.',
                  HINT = 'Attach the table with d365.d365_attach_contacts(), which creates them.';
    END IF;
    -- the records of on_local_delete deactivate/delete wait (16_contact_policies.sql)
    PERFORM d365._contact_deleted(ARRAY(SELECT s.contact_key FROM d365.contact_state s));
    DELETE FROM d365.contact_change;
    RETURN NULL;
END;
$$;

-- AFTER UPDATE, per row, behind the WHEN clause: notes the key (and a key
-- change).  Argument: the key column's attribute number.
CREATE FUNCTION d365._contact_capture_row()
RETURNS trigger
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_capture_row'
LANGUAGE C;

-- AFTER INSERT or UPDATE, per statement: writes the keys the statement's
-- rows noted (as the extension owner: writers of the table need no rights
-- in d365).
CREATE FUNCTION d365._contact_capture_flush()
RETURNS trigger
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_capture_flush'
LANGUAGE C;

/*
 * The first step of a contact sync: the changes noted since the last one
 * become change_seq increments.  Queue rows another run is folding are
 * left to it (SKIP LOCKED); rows of transactions still in progress wait
 * for the next run.  Runs as the owner of d365's tables (it touches
 * nothing else), so whoever may run the sync needs no rights on the queue.
 */
CREATE FUNCTION d365._contact_fold_changes()
RETURNS void
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH gone AS (
        DELETE FROM d365.contact_change q
         WHERE q.ctid = ANY (ARRAY(SELECT ctid FROM d365.contact_change FOR UPDATE SKIP LOCKED))
        RETURNING q.keys, q.noted_at)
    INSERT INTO d365.contact_state AS s (contact_key, pending_since)
    SELECT k, min(g.noted_at) FROM gone g, unnest(g.keys) k GROUP BY k
    ON CONFLICT (contact_key) DO UPDATE
       SET change_seq = s.change_seq + 1,
           -- the lag counts from the oldest change not yet sent
           pending_since = CASE WHEN s.change_seq > s.synced_seq THEN s.pending_since
                                ELSE EXCLUDED.pending_since END
$$;

/*
 * The statements that (re)create the capture triggers on the attached
 * table, and the table; both NULL when nothing is attached or the key
 * column is gone.  The WHEN clause of d365_capture_update lists the key and
 * the mapped columns that are sent (direction both or out) and exist,
 * compared by their binary images (pg_catalog.record_image_eq(), the
 * function of the operator *=: a type's own equality calls values equal
 * that are sent differently, such as 'abc' and 'ABC' under a
 * case-insensitive collation or in citext), so an UPDATE of other columns
 * costs no trigger call.  d365._contact_capture_install() runs them.
 */
CREATE FUNCTION d365._contact_capture_sql(OUT tbl regclass, OUT statements text[])
RETURNS record
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source;
    key_num smallint;
    changed text;
BEGIN
    SELECT * INTO src FROM d365.contact_source;
    SELECT a.attnum INTO key_num FROM pg_attribute a
     WHERE a.attrelid = src.contact_table AND a.attname = src.key_column
       AND a.attnum > 0 AND NOT a.attisdropped;
    IF key_num IS NULL THEN
        RETURN;             -- nothing attached, or broken: d365_status() says which
    END IF;
    SELECT format('NOT pg_catalog.record_image_eq(ROW(%s), ROW(%s))',
                  string_agg(format('OLD.%I', a.attname), ', ' ORDER BY a.attnum),
                  string_agg(format('NEW.%I', a.attname), ', ' ORDER BY a.attnum))
      INTO changed
      FROM pg_attribute a
     WHERE a.attrelid = src.contact_table AND a.attnum > 0 AND NOT a.attisdropped
       AND (a.attnum = key_num
            OR a.attname IN (SELECT f.column_name FROM d365.field_map f WHERE f.direction <> 'in'));
    tbl := src.contact_table;
    statements := ARRAY[
        format('CREATE OR REPLACE TRIGGER d365_capture_update AFTER UPDATE ON %s FOR EACH ROW'
               ' WHEN (%s) EXECUTE FUNCTION d365._contact_capture_row(%L, %L)',
               src.contact_table, changed, key_num, src.key_column),
        format('CREATE OR REPLACE TRIGGER d365_capture_update_flush AFTER UPDATE ON %s'
               ' FOR EACH STATEMENT EXECUTE FUNCTION d365._contact_capture_flush()',
               src.contact_table),
        format('CREATE OR REPLACE TRIGGER d365_capture_insert_flush AFTER INSERT ON %s'
               ' FOR EACH STATEMENT EXECUTE FUNCTION d365._contact_capture_flush()',
               src.contact_table),
        format('CREATE OR REPLACE TRIGGER d365_capture_delete AFTER DELETE ON %s'
               ' REFERENCING OLD TABLE AS d365_gone'
               ' FOR EACH STATEMENT EXECUTE FUNCTION d365._contact_capture_delete(%L, %L)',
               src.contact_table, key_num, src.key_column),
        format('CREATE OR REPLACE TRIGGER d365_capture_truncate AFTER TRUNCATE ON %s'
               ' FOR EACH STATEMENT EXECUTE FUNCTION d365._contact_capture_truncate()',
               src.contact_table),
        -- AFTER, not BEFORE: an AFTER row trigger fetches no old row the
        -- capture trigger does not fetch already, and a BEFORE INSERT one
        -- would take COPY's batched inserts away; the error still undoes the
        -- statement.  The WHEN clauses (built-in operators on the built-in
        -- link types, evaluated by the executor) keep the guard from being
        -- called (or queued) for rows that need no look: inserted unlinked,
        -- or links left alone.
        format('CREATE OR REPLACE TRIGGER d365_link_guard AFTER INSERT ON %s FOR EACH ROW'
               ' WHEN (NEW.dynamics365_related_id IS NOT NULL'
               '       OR NEW.dynamics365_synchronized_on IS NOT NULL)'
               ' EXECUTE FUNCTION d365._contact_link_guard()',
               src.contact_table),
        format('CREATE OR REPLACE TRIGGER d365_link_guard_update'
               ' AFTER UPDATE OF dynamics365_related_id, dynamics365_synchronized_on ON %s FOR EACH ROW'
               ' WHEN ((NEW.dynamics365_related_id IS NOT NULL'
               '        AND NEW.dynamics365_related_id IS DISTINCT FROM OLD.dynamics365_related_id)'
               '       OR (NEW.dynamics365_synchronized_on IS NOT NULL'
               '        AND NEW.dynamics365_synchronized_on IS DISTINCT FROM OLD.dynamics365_synchronized_on))'
               ' EXECUTE FUNCTION d365._contact_link_guard()',
               src.contact_table)];
END;
$$;

/*
 * (Re)creates the capture triggers on the attached table: the statements
 * of d365._contact_capture_sql(), run as the owner of schema d365 (the only
 * role that may use the trigger functions) once the caller is found to own
 * the table, as CREATE TRIGGER itself requires (src/capture/capture_guard.c).
 */
CREATE FUNCTION d365._contact_capture_install()
RETURNS void
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_capture_install'
LANGUAGE C;

-- Every trigger d365sync put on a table (by the functions they call, so
-- triggers of earlier releases are found too).
CREATE FUNCTION d365._contact_capture_drop(tbl regclass)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    trg name;
BEGIN
    FOR trg IN SELECT t.tgname FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
                WHERE t.tgrelid = tbl AND NOT t.tgisinternal
                  AND p.pronamespace = 'd365'::regnamespace LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', trg, tbl);
    END LOOP;
END;
$$;

/*
 * The guard of the link columns (src/capture/link_guard.c), put on the attached
 * table with the capture triggers.
 */
CREATE FUNCTION d365._contact_link_guard()
RETURNS trigger
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_link_guard'
LANGUAGE C;

/*
 * Whether tbl has a unique index on dynamics365_related_id alone (no
 * expression; no predicate, or the one d365sync gives it): no two rows then
 * hold one Dynamics id, and the incoming changes find a contact by its id
 * through it.
 */
CREATE FUNCTION d365._link_index_exists(tbl regclass)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT FROM pg_index i
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                    WHERE i.indrelid = tbl AND i.indisunique AND i.indisvalid AND i.indnatts = 1
                      AND i.indexprs IS NULL AND a.attname = 'dynamics365_related_id'
                      AND (i.indpred IS NULL
                           OR pg_get_expr(i.indpred, i.indrelid) = '(dynamics365_related_id IS NOT NULL)'))
$$;

/*
 * Makes the unique index on the link column of tbl when it has none.  Rows
 * sharing a Dynamics id are reported, not changed: the error names them and
 * says how to unlink all but one.
 */
CREATE FUNCTION d365._link_index_create(tbl regclass)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    dups text;
    n bigint;
BEGIN
    IF d365._link_index_exists(tbl) THEN
        RETURN;
    END IF;
    EXECUTE format('SELECT count(*), string_agg(d.id::text, '', '' ORDER BY d.id) FILTER (WHERE d.r <= 10)'
                   '  FROM (SELECT dynamics365_related_id AS id, row_number() OVER (ORDER BY dynamics365_related_id) AS r'
                   '          FROM %s WHERE dynamics365_related_id IS NOT NULL'
                   '         GROUP BY 1 HAVING count(*) > 1) d', tbl)
       INTO n, dups;
    IF n > 0 THEN
        RAISE EXCEPTION 'rows of % share a Dynamics 365 id', tbl
            USING ERRCODE = 'unique_violation',
                  DETAIL = format('%s Dynamics 365 id(s) are held by more than one row: %s%s.', n, dups,
                                  CASE WHEN n > 10 THEN ', ...' ELSE '' END),
                  HINT = format('A Dynamics 365 record belongs to one contact: keep the link of the right row and unlink the others (UPDATE %s SET dynamics365_related_id = NULL WHERE ...), then call d365_attach_contacts() again.', tbl);
    END IF;
    -- unlinked rows are not in it: inserting them, and updating them
    -- outside HOT, costs the application nothing more
    EXECUTE format('CREATE UNIQUE INDEX ON %s (dynamics365_related_id)'
                   ' WHERE dynamics365_related_id IS NOT NULL', tbl);
END;
$$;

-- ---------------------------------------------------------------------------

/*
 * The arguments of a trigger, from pg_trigger.tgargs.
 */
CREATE FUNCTION d365._trigger_args(tgargs bytea)
RETURNS text[]
LANGUAGE sql IMMUTABLE STRICT
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(replace(a, '\\', '\') ORDER BY n) FILTER (WHERE n < total), '{}')
      FROM (SELECT a, n, count(*) OVER () AS total
              FROM regexp_split_to_table(encode(tgargs, 'escape'), '\\000') WITH ORDINALITY x(a, n)) y
$$;

/*
 * The column a capture trigger watches, from its arguments (key attribute
 * number, key name): the column of that name where one exists -- a table
 * restored by pg_restore numbers its columns afresh, without the dropped
 * ones -- otherwise (the key renamed) the column of that number.  NULL
 * when neither is a live column.  src/capture/capture.c applies the same rule.
 */
CREATE FUNCTION d365._capture_key_attnum(tbl regclass, args text[])
RETURNS smallint
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(
        (SELECT a.attnum FROM pg_attribute a
          WHERE a.attrelid = tbl AND cardinality(args) > 1 AND a.attname = args[2]
            AND a.attnum > 0 AND NOT a.attisdropped),
        (SELECT a.attnum FROM pg_attribute a
          WHERE a.attrelid = tbl AND args[1] ~ '^[0-9]{1,4}$' AND a.attnum = args[1]::smallint
            AND a.attnum > 0 AND NOT a.attisdropped))
$$;

-- The table part of d365._attachment_problem: the table, its key, score and
-- link columns; not the capture triggers.
CREATE FUNCTION d365._attachment_table_problem(src d365.contact_source)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key_att pg_attribute;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = src.contact_table) THEN
        RETURN format('the attached table (OID %s) was dropped', src.contact_table::oid);
    END IF;
    SELECT * INTO key_att FROM pg_attribute a
     WHERE a.attrelid = src.contact_table AND a.attname = src.key_column
       AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        RETURN format('key column "%s" of %s was renamed or dropped', src.key_column, src.contact_table);
    END IF;
    IF key_att.atttypid <> ALL (d365._key_types()) THEN
        RETURN format('key column "%s" of %s has type %s, which d365sync does not support',
                      src.key_column, src.contact_table, key_att.atttypid::regtype);
    END IF;
    -- the score and link columns are compared and converted by d365's own
    -- expressions: a type of the owner's making there (by ALTER TABLE after
    -- attaching) would run its casts and operators with the caller's rights.
    -- Checked under the table's lock, so that no ALTER TABLE comes between
    -- this check and the statements that rely on it.
    RETURN d365._contact_table_problem(src.contact_table, src.score_column);
END;
$$;

/*
 * d365._attachment_problem(src), remembered while the catalog says nothing
 * it reads has changed (src/capture/attach_cache.c): the table's lock is taken and
 * the invalidations of other sessions read at every call.
 */
CREATE FUNCTION d365._attachment_problem_cached(src d365.contact_source)
RETURNS text
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_attachment_problem_cached'
LANGUAGE C VOLATILE;
