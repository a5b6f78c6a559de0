-- Outgoing contact sync: the select and record stages (SQL), the send
-- stage is the C pipeline (src/pipeline/pipeline.c).
-- ---------------------------------------------------------------------------

/*
 * The map stage of contacts as one jsonb expression over the row alias
 * row_alias: {dynamics_field: value} for the mapped columns named in
 * only_columns (all when NULL), each converted by d365._json_expr (no code
 * of the application's making runs).  Raises when a mapped column is gone
 * or cannot be converted.
 */
CREATE FUNCTION d365._values_expr(row_alias text, only_columns name[])
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source;
    cur text := '''{}''::pg_catalog.jsonb';
    m record;
    expr text;
BEGIN
    SELECT * INTO src FROM d365.contact_source;
    FOR m IN SELECT f.column_name, f.dynamics_field, a.atttypid::regtype AS typ, b.entity_set,
                    l.parent, l.bind_set
               FROM d365.field_map f
               LEFT JOIN pg_attribute a ON a.attrelid = src.contact_table
                    AND a.attname = f.column_name AND a.attnum > 0 AND NOT a.attisdropped
               LEFT JOIN d365._lookup_binds() b ON b.dynamics_field = f.dynamics_field
               LEFT JOIN d365._contact_lookups() l ON l.column_name = f.column_name
              WHERE only_columns IS NULL OR f.column_name = ANY (only_columns)
              ORDER BY f.column_name
    LOOP
        IF m.typ IS NULL THEN
            RAISE EXCEPTION 'mapped column "%" no longer exists in %', m.column_name, src.contact_table
                USING ERRCODE = 'undefined_column',
                      HINT = format('DELETE FROM d365.field_map WHERE column_name = %L;', m.column_name);
        END IF;
        IF m.parent IS NOT NULL THEN
            -- a foreign key to a mapped table: bound to the record d365sync
            -- linked the referenced row to (d365._contact_waiting_expr keeps
            -- a contact whose parent is not linked yet from being sent)
            expr := format('pg_catalog.to_jsonb(%L OPERATOR(pg_catalog.||) d365._map_parent_link(%L, (%I.%I)::pg_catalog.text)::pg_catalog.text OPERATOR(pg_catalog.||) '')'')',
                           '/' || m.bind_set || '(', m.parent, row_alias, m.column_name);
        ELSE
            expr := d365._json_expr(format('%I.%I', row_alias, m.column_name), m.typ, m.entity_set);
        END IF;
        IF expr IS NULL THEN
            RAISE EXCEPTION 'mapped column "%" of type % cannot be sent to Dynamics', m.column_name, m.typ
                USING ERRCODE = 'datatype_mismatch',
                      HINT = 'Change the column''s type or its mapping.';
        END IF;
        cur := cur || format(' OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object(%L, %s)',
                             m.dynamics_field, expr);
    END LOOP;
    RETURN cur;
END;
$$;

/*
 * The map stage over the contact row "c", outgoing: every mapped column that
 * is sent (direction both or out; an 'in' field is never sent, so it is in
 * no create, no update and no comparison with the synced snapshot).
 */
CREATE FUNCTION d365._contact_values_expr()
RETURNS text
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT d365._values_expr('c', (SELECT coalesce(array_agg(f.column_name), '{}')
                                     FROM d365.field_map f WHERE f.direction <> 'in'))
$$;

/*
 * Whose sync state is it?  A state row that names a Dynamics contact while
 * the row is unlinked belongs to an earlier person under the same key
 * (deleted while detached, restored from a dump, link cleared by hand): its
 * snapshot, failures and back-off are not the row's, and the row gets the
 * next generation -- a Dynamics id of its own.  (A linked row whose link
 * differs from the state's id is untrusted: d365._contact_untrusted_sql.)
 * Aliases: c the contact row, s its state (LEFT JOIN).
 */
CREATE FUNCTION d365._contact_foreign_sql()
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT '(s.dynamics_id IS NOT NULL AND c.dynamics365_related_id IS NULL)' $$;

/*
 * The one "pending" condition, used by the work query of the scheduled
 * sync and by d365_status() alike.  what = 'create': unlinked contacts whose
 * score reaches min_score (not one deleted in Dynamics and unchanged since);
 * 'update': linked contacts with a change not yet sent (or no snapshot);
 * 'any': either.  Both honour the back-off of a failing contact.  queued:
 * changes still in d365.contact_change count as pending too (alias q, see
 * _contact_pending_from); the sync folds them into the state first.
 */
CREATE FUNCTION d365._contact_pending_sql(what text, score_column name, queued boolean)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    own_or text := format('s.contact_key IS NULL OR %s', d365._contact_foreign_sql());
    changed text := 's.change_seq > s.synced_seq' || CASE WHEN queued THEN ' OR q.contact_key IS NOT NULL' ELSE '' END;
    create_cond text := format(
        '(c.dynamics365_related_id IS NULL AND c.%I >= (SELECT min_score FROM d365.settings)'
        ' AND (%s OR s.remote_deleted_at IS NULL OR %s))',
        score_column, own_or, changed);
    update_cond text := format(
        '(c.dynamics365_related_id IS NOT NULL AND (%s OR s.synced IS NULL OR %s))',
        d365._contact_untrusted_sql(), changed);
    backoff text := format('(%s OR s.next_attempt_at IS NULL OR s.next_attempt_at <= now())', own_or);
BEGIN
    RETURN CASE what WHEN 'create' THEN create_cond
                     WHEN 'update' THEN update_cond
                     ELSE format('(%s OR %s)', create_cond, update_cond) END
           || ' AND ' || backoff;
END;
$$;

-- The FROM list the pending condition needs: the contact row c, its state
-- s, and (queued) its changes not yet folded q.
CREATE FUNCTION d365._contact_pending_from(src d365.contact_source, queued boolean)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('%s c LEFT JOIN d365.contact_state s ON s.contact_key = c.%I::text', src.contact_table, src.key_column)
           || CASE WHEN queued
                   THEN format(' LEFT JOIN (SELECT DISTINCT k AS contact_key'
                               '              FROM d365.contact_change, unnest(keys) k) q'
                               ' ON q.contact_key = c.%I::text', src.key_column)
                   ELSE '' END
$$;

/*
 * The work query of a contact sync: one row per contact to consider, with
 * the request to send (none when nothing changed) and a context that
 * d365._contact_record() gets back.  A create is an upsert on the id the
 * contact will have (no If-Match); an update carries If-Match: * so that it
 * never re-creates a contact deleted in Dynamics.  The map stage is here: the mapped
 * columns become one jsonb object converted as docs/contacts.md ("Map columns
 * to Dynamics fields") says, and for
 * a linked contact the body is the part of it that differs from the synced
 * snapshot (a NULL clears the Dynamics value).
 *
 * When match fields are marked in d365.field_map, an unlinked contact whose
 * match values are all present also gets a look-up (the fourth column: its
 * match values as {dynamics_field: value}); the pipeline searches Dynamics
 * for them before anything is sent (d365._contact_lookup_path and
 * d365._contact_lookup_resolve).
 *
 * The context carries the generation the id was made from and the
 * state's generation as read ("base"): the record step writes nothing when
 * a delete, truncate or key change moved the state on meanwhile.
 *
 * scheduled = true: the job's selection (the pending condition), after
 * folding the noted changes into the state.
 * scheduled = false: the one contact whose key is $1, whatever its score.
 */
CREATE FUNCTION d365._contact_work_sql(scheduled boolean)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
-- its look-up of the untrusted links reads the whole table: compiling it
-- would cost more than it saves
SET jit = off
AS $$
DECLARE
    src d365.contact_source;
    key_type text;
    cur text;
    sel text;
    match text;
    limits jsonb;
    untrusted text[];
BEGIN
    src := d365._contact_source();
    -- row security is the table owner's code: never run as the role running
    -- the job (d365sync refuses such a role; docs/security.md)
    IF row_security_active(src.contact_table) THEN
        RAISE EXCEPTION 'row-level security of % applies to role "%"', src.contact_table, current_user
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'Its policies are code of the table''s owner: d365sync does not read the table as a role they bind.',
                  HINT = 'Run the sync as the table''s owner, or as a role with BYPASSRLS.';
    END IF;
    -- the job reads the table as the job role: for a caller that may read it
    PERFORM d365._caller_reads(src.contact_table);
    SELECT format_type(a.atttypid, a.atttypmod) INTO key_type
      FROM pg_attribute a WHERE a.attrelid = src.contact_table AND a.attname = src.key_column;
    cur := d365._contact_values_expr();
    match := d365._contact_match_expr();
    -- the maximum lengths of the text fields sent, as last fetched (never
    -- fetched here): a longer value fails its contact before sending
    SELECT coalesce(jsonb_object_agg(f.dynamics_field,
                                     jsonb_build_object('max', l.value::integer, 'column', f.column_name)), '{}')
      INTO limits
      FROM d365.field_map f
      JOIN jsonb_each_text(d365._max_lengths('contact', false)) l ON l.key = f.dynamics_field
     WHERE f.direction <> 'in';

    IF scheduled THEN
        PERFORM d365._contact_fold_changes();
        -- a row without a key (a UNIQUE key allows NULLs) cannot be sent
        -- or recorded: left alone, it must not stop the others
        sel := format('c.%I IS NOT NULL AND ', src.key_column)
               || d365._contact_pending_sql('any', src.score_column, false);
        /*
         * The rows the pending condition can hold, found without reading
         * every contact's state: the unlinked rows that reach min_score
         * (the link column's index), the rows linked to a state that has
         * something to send (contact_state_pending_idx, then the link
         * column's index), and the linked rows whose link d365sync did not
         * write -- found once here (the table against the states' keys and
         * ids, no wider than those) and named by key (the key's index), or
         * all rows when there are many.  The pending condition then holds
         * as it stands.
         */
        -- (planned for all rows, not for the first ones: a LIMIT in the
        -- same query made it an index probe per contact)
        EXECUTE format('WITH u AS MATERIALIZED (SELECT c.%1$I::text AS k FROM %2$s c'
                       ' WHERE c.dynamics365_related_id IS NOT NULL'
                       '   AND NOT EXISTS (SELECT FROM d365.contact_state s'
                       '                    WHERE s.contact_key = c.%1$I::text'
                       '                      AND s.dynamics_id = c.dynamics365_related_id))'
                       ' SELECT array_agg(x.k) FROM (SELECT u.k FROM u LIMIT 10001) x',
                       src.key_column, src.contact_table)
           INTO untrusted;
        sel := sel || format(
            ' AND ((c.dynamics365_related_id IS NULL AND c.%1$I >= (SELECT min_score FROM d365.settings))'
            '      OR c.dynamics365_related_id = ANY (ARRAY(SELECT p.dynamics_id FROM d365.contact_state p'
            '          WHERE p.dynamics_id IS NOT NULL AND (p.synced IS NULL OR p.change_seq > p.synced_seq)))'
            '      OR %2$s)',
            src.score_column,
            CASE WHEN untrusted IS NULL THEN 'false'
                 WHEN cardinality(untrusted) <= 10000
                 THEN format('c.%I = ANY (%L::%s[])', src.key_column, untrusted, key_type)
                 ELSE 'true' END);
    ELSE
        sel := format('c.%I = $1::%s', src.key_column, key_type);
    END IF;

    RETURN format($q$
        SELECT w.item_key,
               CASE WHEN w.body IS NULL OR w.refused OR w.too_long IS NOT NULL THEN '[]'
                    ELSE jsonb_build_array(jsonb_build_object(
                             'method', 'PATCH',
                             'path', 'contacts(' || w.dynamics_id || ')',
                             'body', w.body::text,
                             'headers', CASE WHEN w.linked THEN '["If-Match: *"]'::jsonb
                                             ELSE '[]'::jsonb END))::text
               END AS requests,
               (jsonb_build_object('action', CASE WHEN w.refused THEN 'refused'
                                                  WHEN NOT w.linked THEN 'create'
                                                  WHEN w.body IS NULL THEN 'unchanged'
                                                  ELSE 'update' END,
                                   'id', w.dynamics_id, 'seq', w.change_seq,
                                   'generation', w.generation, 'base', w.base,
                                   'values', w.cur, 'sent', CASE WHEN NOT w.refused THEN w.body END)
                || CASE WHEN w.refused
                        THEN jsonb_build_object('error_code', 'd365sync.link', 'error',
                                 format('holds Dynamics 365 id %%s in its link column, which d365sync did not link to it; nothing was sent',
                                        w.link))
                        WHEN w.too_long IS NOT NULL
                        THEN jsonb_build_object('error_code', 'd365sync.length',
                                                'error', 'value too long for Dynamics 365: ' || w.too_long || '; not sent')
                        ELSE '{}' END)::text AS context,
               CASE WHEN NOT w.linked AND NOT w.refused AND w.too_long IS NULL AND w.match_values IS NOT NULL
                         AND NOT EXISTS (SELECT FROM jsonb_each(w.match_values) e
                                          WHERE e.value IN ('null'::jsonb, '""'::jsonb))
                    THEN w.match_values::text END AS lookup
          FROM (SELECT x.*,
                       (SELECT string_agg(format('%%s has %%s characters, at most %%s (column %%s)', e.key,
                                                 char_length(e.value #>> '{}'), l.value ->> 'max',
                                                 l.value ->> 'column'), '; ' ORDER BY e.key)
                          FROM jsonb_each(x.body) e
                          JOIN jsonb_each(%8$L::jsonb) l ON l.key = e.key
                         WHERE NOT x.refused AND jsonb_typeof(e.value) = 'string'
                           AND char_length(e.value #>> '{}') > (l.value ->> 'max')::integer) AS too_long
          FROM (SELECT v.*,
                       CASE WHEN NOT v.linked THEN jsonb_strip_nulls(v.cur)
                            ELSE (SELECT jsonb_object_agg(e.key, e.value)
                                    FROM jsonb_each(v.cur) e
                                   WHERE (v.synced IS NULL AND e.value <> 'null'::jsonb)
                                      OR (v.synced IS NOT NULL
                                          AND e.value IS DISTINCT FROM coalesce(v.synced -> e.key, 'null'::jsonb)))
                       END AS body
                  FROM (SELECT c.%1$I::text AS item_key,
                               c.dynamics365_related_id IS NOT NULL AND NOT %7$s AS linked,
                               %7$s AS refused,
                               c.dynamics365_related_id AS link,
                               CASE WHEN %7$s THEN s.dynamics_id
                                    ELSE coalesce(c.dynamics365_related_id,
                                                  d365._contact_guid(c.%1$I::text, g.generation)) END AS dynamics_id,
                               coalesce(s.change_seq, 0) AS change_seq,
                               g.generation, s.generation AS base,
                               CASE WHEN %6$s THEN NULL ELSE s.synced END AS synced,
                               %2$s AS cur,
                               %5$s AS match_values
                          FROM %3$s,
                               LATERAL (SELECT coalesce(s.generation, 0)
                                               + CASE WHEN %6$s THEN 1 ELSE 0 END AS generation) g
                         WHERE %4$s
                           -- a lookup's parent not linked yet: the contact waits
                           AND NOT (%9$s)
                        OFFSET 0) v) x) w
    $q$, src.key_column, cur, d365._contact_pending_from(src, false), sel, match,
         d365._contact_foreign_sql(), d365._contact_untrusted_sql(), limits,
         d365._contact_waiting_expr());
END;
$$;

/*
 * One outcome of a contact sync, as the record stage works on it.  An array
 * of these, not a temporary table: a temporary table is a new relation in
 * every run, and every statement on it a new entry in pg_stat_statements.
 */
CREATE TYPE d365._contact_outcome AS (
    item_key text, action text, dynamics_id uuid, seq bigint, generation integer,
    base integer, vals jsonb, sent jsonb, status integer, error_code text,
    error_message text, ok boolean, gone boolean, matched boolean, current boolean
);

/*
 * The record stage of a contact sync: link columns, sync state, failures
 * and back-off for a chunk of outcomes (one array element per item).
 * The link columns are written as the table's owner in a security-restricted
 * operation (d365._contact_set_links): the application table's own
 * triggers, fired by that update, run with its owner's rights under
 * search_path = pg_catalog, pg_temp (as under PostgreSQL's maintenance
 * commands) and must qualify names.
 *
 * Nothing is written for a contact whose state moved on since the work
 * query read it (its generation is no longer "base": the row was deleted,
 * the table truncated or the key changed meanwhile), and a create (or a
 * match) links only a row that is still unlinked, an update only a row
 * still linked to that record: a Dynamics record belongs to the person
 * whose data it holds, never to a newcomer under the same key.  Returns the
 * chunk's counts.
 */
CREATE FUNCTION d365._contact_record(
    item_keys text[], contexts text[], statuses integer[],
    error_codes text[], error_messages text[],
    OUT created integer, OUT updated integer, OUT unchanged integer,
    OUT failed integer, OUT unlinked integer)
RETURNS record
LANGUAGE plpgsql
-- a chunk against the whole table: always by index, so a chunk's cost does
-- not grow with the table (the planner knows nothing of the chunk's size)
SET enable_hashjoin = off
SET enable_mergejoin = off
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    done text[];
    outcomes d365._contact_outcome[];
BEGIN
    -- a contact without state gets a state row first, so that a concurrent
    -- tombstone shows as a change
    INSERT INTO d365.contact_state (contact_key, change_seq, synced_seq)
    SELECT o.k, coalesce((x.c ->> 'seq')::bigint, 0), coalesce((x.c ->> 'seq')::bigint, 0)
      FROM unnest(item_keys, contexts) AS o(k, ctx),
           LATERAL (SELECT o.ctx::jsonb AS c) x
     WHERE x.c ->> 'base' IS NULL
    ON CONFLICT (contact_key) DO NOTHING;

    -- the chunk's outcomes; current: the contact still has the identity
    -- the work query saw
    SELECT array_agg(ROW(
               o.k, x.c ->> 'action', (x.c ->> 'id')::uuid, (x.c ->> 'seq')::bigint,
               (x.c ->> 'generation')::integer, (x.c ->> 'base')::integer,
               x.c -> 'values', nullif(x.c -> 'sent', 'null'),
               o.st, coalesce(o.code, x.c ->> 'error_code'), coalesce(o.msg, x.c ->> 'error'),
               coalesce((x.c ->> 'action') IN ('unchanged', 'link')
                        OR (o.st BETWEEN 200 AND 299 AND o.msg IS NULL), false),
               coalesce((x.c ->> 'action') = 'update' AND o.st = 404 AND x.c -> 'matched' IS NULL, false),
               x.c -> 'matched' IS NOT NULL,
               EXISTS (SELECT FROM d365.contact_state s
                        WHERE s.contact_key = o.k
                          AND s.generation = coalesce((x.c ->> 'base')::integer, 0))
           )::d365._contact_outcome)
      INTO outcomes
      FROM unnest(item_keys, contexts, statuses, error_codes, error_messages)
               AS o(k, ctx, st, code, msg),
           LATERAL (SELECT o.ctx::jsonb AS c) x;

    -- created, updated or matched: link and stamp the contact (as the
    -- table's owner: its triggers and index expressions never run with the
    -- caller's rights); a create or a match only a row still unlinked, an
    -- update only a row still linked to that record
    SELECT d365._contact_set_links(array_agg(o.item_key), array_agg(o.dynamics_id),
                                   array_agg(CASE WHEN o.action = 'update' AND NOT o.matched
                                                  THEN o.dynamics_id END))
      INTO done
      FROM unnest(outcomes) o
     WHERE o.ok AND o.current AND o.action IN ('create', 'update', 'link');

    -- success (or nothing to send): remember what Dynamics now holds.  A
    -- create sent every value; an update only the fields it carried, merged
    -- into the snapshot (which an incoming change may have moved meanwhile).
    -- A matched contact now holds the local values wherever they are set
    -- (where the local value is NULL, Dynamics keeps its own and the
    -- snapshot says NULL, so the next run does not clear it).
    UPDATE d365.contact_state s
       SET synced = CASE WHEN o.action = 'create' OR o.matched OR s.synced IS NULL
                           OR s.dynamics_id <> o.dynamics_id THEN o.vals
                         ELSE s.synced || coalesce(o.sent, '{}') END,
           dynamics_id = o.dynamics_id, synced_seq = o.seq, generation = o.generation,
           attempts = 0, next_attempt_at = NULL, last_attempt_at = now(),
           last_status = coalesce(o.status, s.last_status),
           last_error_code = NULL, last_error = NULL, remote_deleted_at = NULL
      FROM unnest(outcomes) o
     WHERE o.ok AND o.current AND s.contact_key = o.item_key
       AND (o.item_key = ANY (done) OR o.action = 'unchanged');

    -- deleted in Dynamics: unlink (only a row still linked to it) and
    -- report; a re-creation gets a new id
    SELECT d365._contact_set_links(array_agg(o.item_key), array_agg(NULL::uuid), array_agg(o.dynamics_id))
      INTO done
      FROM unnest(outcomes) o WHERE o.gone AND o.current;
    PERFORM d365._contact_remote_deleted(array_agg(o.item_key), array_agg(o.status), array_agg(o.error_code),
                array_agg('deleted in Dynamics 365, unlinked: ' || coalesce(o.error_message, '')))
       FROM unnest(outcomes) o
      WHERE o.gone AND o.item_key = ANY (done);

    -- other failures: stay pending, back off 5 min, 10 min, ... up to a
    -- day.  The contact keeps the identity its id was made from, so the
    -- retry sends the same id.
    UPDATE d365.contact_state s
       SET attempts = CASE WHEN o.foreign THEN 1 ELSE s.attempts + 1 END,
           next_attempt_at = d365._next_attempt(CASE WHEN o.foreign THEN 1 ELSE s.attempts + 1 END),
           synced = CASE WHEN o.foreign THEN NULL ELSE s.synced END,
           dynamics_id = o.link_id, generation = o.generation,
           last_attempt_at = now(), last_status = nullif(o.status, 0),
           last_error_code = o.error_code, last_error = o.error_message
      FROM (SELECT x.*, l.link_id,
                   (SELECT t.dynamics_id IS NOT NULL AND t.dynamics_id IS DISTINCT FROM l.link_id
                      FROM d365.contact_state t WHERE t.contact_key = x.item_key) AS foreign
              FROM unnest(outcomes) x,
                   -- a refused row keeps the id d365sync linked its key to
                   LATERAL (SELECT CASE WHEN x.action = 'update' AND NOT x.matched
                                          OR x.action = 'refused'
                                        THEN x.dynamics_id END AS link_id) l) o
     WHERE NOT o.ok AND NOT o.gone AND o.current AND s.contact_key = o.item_key;

    SELECT count(*) FILTER (WHERE ok AND action = 'create'),
           count(*) FILTER (WHERE ok AND action = 'update'),
           count(*) FILTER (WHERE action IN ('unchanged', 'link')),
           count(*) FILTER (WHERE NOT ok AND NOT gone),
           count(*) FILTER (WHERE gone)
      INTO created, updated, unchanged, failed, unlinked
      FROM unnest(outcomes);
END;
$$;

CREATE FUNCTION d365._contact_link(contact_key text)
RETURNS uuid
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source := d365._contact_source();
    key_type text;
    result uuid;
BEGIN
    -- compared in the key's own type, so that its primary key is used
    SELECT format_type(a.atttypid, a.atttypmod) INTO key_type
      FROM pg_attribute a WHERE a.attrelid = src.contact_table AND a.attname = src.key_column;
    EXECUTE format('SELECT dynamics365_related_id FROM %s WHERE %I = $1::%s',
                   src.contact_table, src.key_column, key_type)
       INTO result USING contact_key;
    RETURN result;
END;
$$;

CREATE FUNCTION d365.d365_sync_contact(contact_key anyelement)
RETURNS uuid
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_sync_contact'
LANGUAGE C VOLATILE STRICT;
COMMENT ON FUNCTION d365.d365_sync_contact(anyelement) IS
    'Creates or updates one contact in Dynamics now, whatever its score and the enabled flag; returns its Dynamics id';

CREATE FUNCTION d365.d365_sync_contacts(
    OUT created integer, OUT updated integer, OUT unchanged integer,
    OUT failed integer, OUT unlinked integer, OUT requests integer)
RETURNS record
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_sync_contacts'
LANGUAGE C VOLATILE;
COMMENT ON FUNCTION d365.d365_sync_contacts() IS
    'The scheduled contact sync: creates qualifying contacts and sends the changed fields of linked ones';

/*
 * A linked row d365sync must not trust: its link column holds an id other
 * than the one d365sync linked its key to (d365.contact_state.dynamics_id),
 * or its key has no such id.  Only d365sync's link writer passes the guard
 * on the link columns (src/capture/link_guard.c); a value that got there another
 * way -- the table's owner with the guard disabled, a superuser, a release
 * before the guard -- never makes d365sync write to that Dynamics record:
 * the contact sync refuses the row (error code d365sync.link), the pull
 * and the activity sync pass it by.  Aliases: c the contact row, s its
 * state (LEFT JOIN).
 */
CREATE FUNCTION d365._contact_untrusted_sql()
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$ SELECT '(c.dynamics365_related_id IS NOT NULL AND s.dynamics_id IS DISTINCT FROM c.dynamics365_related_id)' $$;

/*
 * Whether d365sync linked the contact with this key to the Dynamics id:
 * the state's id.  For callers without rights on d365's tables (the push
 * of incoming changes runs with its caller's); reads nothing else.
 */
CREATE FUNCTION d365._contact_link_trusted(contact_key text, dynamics_id uuid)
RETURNS boolean
LANGUAGE sql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT EXISTS (SELECT FROM d365.contact_state s
                    WHERE s.contact_key = _contact_link_trusted.contact_key
                      AND s.dynamics_id = _contact_link_trusted.dynamics_id)
$$;

/*
 * Links a contact to an existing Dynamics 365 contact by hand: the one way
 * to put a chosen id into the link column (the guard refuses any other,
 * src/capture/link_guard.c).  The next sync sends the contact's mapped values to
 * that record.  Needs the UPDATE right on the link columns (checked by
 * d365._contact_set_links) and on d365.contact_state.
 */
CREATE FUNCTION d365.d365_link_contact(contact_key anyelement, dynamics_id uuid)
RETURNS void
LANGUAGE plpgsql
STRICT
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source := d365._contact_source();
    k text := d365._key_text(contact_key);
    cur uuid;
    holder text;
    found_key text;
BEGIN
    EXECUTE format('SELECT %I::text, dynamics365_related_id FROM %s WHERE %I::text = $1',
                   src.key_column, src.contact_table, src.key_column)
       INTO found_key, cur USING k;
    IF found_key IS NULL THEN
        RAISE EXCEPTION 'contact % does not exist', k
            USING ERRCODE = 'no_data_found',
                  HINT = format('The key is looked up in %s.', src.contact_table);
    END IF;
    EXECUTE format('SELECT %I::text FROM %s WHERE dynamics365_related_id = $1 AND %I::text <> $2',
                   src.key_column, src.contact_table, src.key_column)
       INTO holder USING dynamics_id, k;
    IF holder IS NOT NULL THEN
        RAISE EXCEPTION 'Dynamics 365 contact % is linked to contact % already', dynamics_id, holder
            USING ERRCODE = 'unique_violation',
                  HINT = 'A Dynamics 365 record belongs to one contact: unlink the other one first (set its dynamics365_related_id to NULL).';
    END IF;
    IF d365._contact_set_links(ARRAY[k], ARRAY[dynamics_id], ARRAY[cur]) IS NULL THEN
        RAISE EXCEPTION 'contact % could not be linked: another transaction holds it locked or changed it', k
            USING ERRCODE = 'lock_not_available',
                  HINT = 'Try again.';
    END IF;
    INSERT INTO d365.contact_state AS s (contact_key, change_seq, synced_seq, dynamics_id)
    VALUES (k, 1, 0, dynamics_id)
    ON CONFLICT ON CONSTRAINT contact_state_pkey DO UPDATE
       SET dynamics_id = EXCLUDED.dynamics_id, synced = NULL, remote_deleted_at = NULL,
           attempts = 0, next_attempt_at = NULL, last_error_code = NULL, last_error = NULL,
           pending_since = now();
END;
$$;
COMMENT ON FUNCTION d365.d365_link_contact(anyelement, uuid) IS
    'Links a contact to an existing Dynamics 365 contact (the only way to set its dynamics365_related_id); the next sync sends its mapped values there';

-- The linked contacts whose state has something to send: the scheduled
-- sync finds them by this index (d365._contact_work_sql), not by reading
-- every contact's state.
CREATE INDEX contact_state_pending_idx ON d365.contact_state (dynamics_id)
    WHERE dynamics_id IS NOT NULL AND (synced IS NULL OR change_seq > synced_seq);

-- ---------------------------------------------------------------------------
