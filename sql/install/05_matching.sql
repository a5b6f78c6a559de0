-- Matching existing Dynamics contacts before creating: the look-up stage of
-- the outgoing contact sync (the pipeline sends the look-ups, these
-- functions write them and judge the answers).
-- ---------------------------------------------------------------------------

/*
 * The match fields of the field map: column, Dynamics field and how its
 * value is written in a query (d365._match_type).  Ordered by Dynamics
 * field, so every look-up spells its filter the same way.
 */
CREATE FUNCTION d365._match_fields(
    OUT column_name name, OUT dynamics_field text, OUT kind text, OUT typ regtype)
RETURNS SETOF record
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT f.column_name, f.dynamics_field, d365._match_type(a.atttypid::regtype),
           a.atttypid::regtype
      FROM d365.field_map f
      JOIN d365.contact_source s ON true
      JOIN pg_attribute a ON a.attrelid = s.contact_table AND a.attname = f.column_name
                         AND a.attnum > 0 AND NOT a.attisdropped
     WHERE f.match
     ORDER BY f.dynamics_field
$$;

/*
 * The match values of the contact row "c" as one jsonb expression
 * ({dynamics_field: value}, converted as for sending), or 'NULL::jsonb' when
 * no field is marked match.
 */
CREATE FUNCTION d365._contact_match_expr()
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    expr text;
BEGIN
    SELECT string_agg(format('jsonb_build_object(%L, %s)', m.dynamics_field,
                             d365._json_expr(format('c.%I', m.column_name), m.typ)), ' || ')
      INTO expr
      FROM d365._match_fields() m;
    RETURN coalesce(expr, 'NULL::jsonb');
END;
$$;

-- Percent-encode everything but RFC 3986 unreserved characters (UTF-8).
CREATE FUNCTION d365._uri_escape(s text)
RETURNS text
LANGUAGE sql IMMUTABLE STRICT
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(string_agg(CASE WHEN b BETWEEN 48 AND 57 OR b BETWEEN 65 AND 90
                                         OR b BETWEEN 97 AND 122 OR b IN (45, 46, 95, 126)
                                    THEN chr(b) ELSE '%' || upper(lpad(to_hex(b), 2, '0')) END,
                               '' ORDER BY i), '')
      FROM (SELECT i, get_byte(convert_to(s, 'UTF8'), i) AS b
              FROM generate_series(0, octet_length(convert_to(s, 'UTF8')) - 1) i) x
$$;

-- One match value as an OData literal of its kind.
CREATE FUNCTION d365._odata_literal(val jsonb, kind text)
RETURNS text
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN kind = 'text' THEN '''' || replace(val #>> '{}', '''', '''''') || ''''
                ELSE val #>> '{}' END
$$;

/*
 * The look-up request of a group of unlinked contacts (lookups: each
 * contact's match values as the work query gave them): one GET of the
 * active Dynamics contacts whose match fields equal one contact's values,
 * with every mapped field selected so that a hit can be compared with the
 * local values.  One match field is searched with the In query function,
 * several with an "or" chain of "and" groups.  The path is percent-encoded;
 * the caller keeps it under the Web API's URL length limit by sending
 * fewer contacts per look-up.
 */
CREATE FUNCTION d365._contact_lookup_path(lookups text[])
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    fields record;
    cond text;
    sel text;
BEGIN
    SELECT count(*) AS n, min(dynamics_field) AS first_field, min(kind) AS first_kind
      INTO fields FROM d365._match_fields();
    IF fields.n = 0 OR lookups IS NULL OR cardinality(lookups) = 0 THEN
        RETURN NULL;
    END IF;
    IF fields.n = 1 THEN
        SELECT format('Microsoft.Dynamics.CRM.In(PropertyName=%L,PropertyValues=[%s])',
                      fields.first_field,
                      string_agg(DISTINCT d365._odata_literal(to_jsonb(l::jsonb ->> fields.first_field), 'text'), ','))
          INTO cond
          FROM unnest(lookups) l
         WHERE l IS NOT NULL;
    ELSE
        SELECT string_agg(DISTINCT g, ' or ')
          INTO cond
          FROM (SELECT '(' || string_agg(format('%s eq %s', m.dynamics_field,
                                                d365._odata_literal(l::jsonb -> m.dynamics_field, m.kind)),
                                         ' and ' ORDER BY m.dynamics_field) || ')' AS g
                  FROM unnest(lookups) WITH ORDINALITY u(l, i)
                  CROSS JOIN d365._match_fields() m
                 WHERE l IS NOT NULL
                 GROUP BY i) x;
    END IF;
    IF cond IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT string_agg(DISTINCT r, ',') INTO sel
      FROM (SELECT CASE WHEN b.attribute IS NOT NULL THEN '_' || b.attribute || '_value'
                        ELSE f.dynamics_field END AS r
              FROM d365.field_map f
              LEFT JOIN d365._lookup_binds() b ON b.dynamics_field = f.dynamics_field) x;
    RETURN 'contacts?$select=contactid' || coalesce(',' || sel, '') ||
           '&$filter=' || d365._uri_escape('(' || cond || ') and statecode eq 0');
END;
$$;

/*
 * Whether a local value (as sent) and the value Dynamics holds are the same
 * for the purpose of matching (fold = true: text compared case-insensitively,
 * as Dataverse compares) or of sending (fold = false: exact).  Numbers
 * compare as numbers, date-times as instants, a lookup bind path by its id.
 */
CREATE FUNCTION d365._same_value(local jsonb, remote jsonb, fold boolean)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    l text := local #>> '{}';
    r text := remote #>> '{}';
BEGIN
    IF local IS NULL OR jsonb_typeof(local) = 'null' THEN
        RETURN remote IS NULL OR jsonb_typeof(remote) = 'null';
    ELSIF remote IS NULL OR jsonb_typeof(remote) = 'null' THEN
        RETURN false;
    ELSIF jsonb_typeof(local) = 'number' AND jsonb_typeof(remote) = 'number' THEN
        RETURN l::numeric = r::numeric;
    ELSIF jsonb_typeof(local) <> 'string' OR jsonb_typeof(remote) <> 'string' THEN
        RETURN local = remote;
    ELSIF d365._bind_guid(l) IS NOT NULL THEN
        RETURN lower(d365._bind_guid(l)) = lower(r);
    ELSIF l ~ '^\d{4}-\d\d-\d\dT' AND r ~ '^\d{4}-\d\d-\d\dT' THEN
        BEGIN
            RETURN l::timestamptz = r::timestamptz;
        EXCEPTION WHEN data_exception THEN
            RETURN l = r;
        END;
    ELSIF fold THEN
        RETURN lower(l) = lower(r);
    END IF;
    RETURN l = r;
END;
$$;

/*
 * The match values of a row (fields: the match fields), normalised so that
 * equal means equal to Dataverse: text (and a GUID) lower-cased, numbers as
 * numbers; a missing field is null.
 */
CREATE FUNCTION d365._match_key(vals jsonb, fields text[])
RETURNS jsonb
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(jsonb_object_agg(f, CASE jsonb_typeof(vals -> f)
                                            WHEN 'string' THEN to_jsonb(lower(vals ->> f))
                                            WHEN 'number' THEN to_jsonb((vals ->> f)::numeric)
                                            ELSE coalesce(vals -> f, 'null'::jsonb) END), '{}')
      FROM unnest(fields) f
$$;

/*
 * The judge of the look-ups: for each looked-up contact (item_keys,
 * lookups and contexts as the work query gave them, groups[i] the number of
 * the answer to its group's look-up in answers, the bodies of the answers),
 * what to send instead.  A row for
 * every contact: requests NULL means "as planned" (no Dynamics contact has
 * these values: it is created).
 *
 *	 one hit    link to it: PATCH (If-Match: *) only the fields whose local
 *				value is set and differs from Dynamics' (a match field that
 *				differs only in case does not count; action 'update', or
 *				'link' with no request when nothing differs)
 *	 several    fail, naming the candidate ids; nothing is sent
 *	 taken		fail when the hit is linked to another local contact already,
 *				or is the only hit of another contact of the same run
 *
 * Reads the contact table's link columns (to find hits already linked).
 */
CREATE FUNCTION d365._contact_lookup_resolve(item_keys text[], lookups text[],
    contexts text[], groups integer[], answers text[],
    OUT item_key text, OUT requests text, OUT context text)
RETURNS SETOF record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src d365.contact_source;
    taken jsonb := '{}';
    fields text[];
    read_names jsonb;
BEGIN
    src := d365._contact_source();     -- key and link column types checked
    IF to_regclass('pg_temp.d365_lookup_hits') IS NULL THEN
        CREATE TEMP TABLE d365_lookup_hits (
            i integer, k text, c jsonb, look jsonb, n integer, more boolean, first_hit jsonb,
            ids text[], unreadable text
        ) ON COMMIT DROP;
    ELSE
        TRUNCATE d365_lookup_hits;
    END IF;
    -- the hits of each contact: the rows of its group's answer whose match
    -- fields equal its values (one hash join on a normalised key)
    fields := (SELECT array_agg(m.dynamics_field) FROM d365._match_fields() m);
    WITH grp AS MATERIALIZED (
        SELECT x.g, d365._lookup_answer(x.a) AS j FROM unnest(answers) WITH ORDINALITY x(a, g)),
    items AS MATERIALIZED (
        SELECT u.i, u.k, u.c, u.l, u.g, coalesce(gr.j ? '@odata.nextLink', false) AS more,
               gr.j ->> '@d365sync.unreadable' AS unreadable,
               d365._match_key(u.l::jsonb, fields) AS key
          FROM unnest(item_keys, lookups, contexts, groups) WITH ORDINALITY u(k, l, c, g, i)
          LEFT JOIN grp gr ON gr.g = u.g),
    hits AS MATERIALIZED (
        SELECT gr.g, v, d365._match_key(v, fields) AS key
          FROM grp gr, jsonb_array_elements(CASE WHEN jsonb_typeof(gr.j -> 'value') = 'array' THEN gr.j -> 'value' ELSE '[]' END) v)
    INSERT INTO d365_lookup_hits
    SELECT t.i, t.k, t.c::jsonb, t.l::jsonb, x.n, t.more, x.first_hit, x.ids, t.unreadable
      FROM items t
      LEFT JOIN (SELECT h.g, h.key, count(*) AS n, (array_agg(h.v))[1] AS first_hit,
                        array_agg(h.v ->> 'contactid' ORDER BY h.v ->> 'contactid') AS ids
                   FROM hits h GROUP BY h.g, h.key) x ON x.g = t.g AND x.key = t.key;

    -- hits that are someone else's already: linked locally, or the only
    -- hit of more than one contact of this run
    IF EXISTS (SELECT FROM d365_lookup_hits h WHERE h.n = 1) THEN
        EXECUTE format('SELECT coalesce(jsonb_object_agg(t.dynamics365_related_id, t.%I::text), ''{}'')'
                       '  FROM %s t JOIN pg_catalog.unnest($1) u(id) ON t.dynamics365_related_id = u.id',
                       src.key_column, src.contact_table)
           INTO taken
          USING (SELECT array_agg((h.first_hit ->> 'contactid')::uuid) FROM d365_lookup_hits h
                  WHERE h.n = 1 AND d365._is_guid(h.first_hit ->> 'contactid'));
        SELECT taken || coalesce(jsonb_object_agg(d.id, d.keys), '{}') INTO taken
          FROM (SELECT h.first_hit ->> 'contactid' AS id,
                       string_agg(h.k, ', ' ORDER BY h.i) AS keys
                  FROM d365_lookup_hits h WHERE h.n = 1 AND d365._is_guid(h.first_hit ->> 'contactid')
                 GROUP BY 1 HAVING count(*) > 1) d
         WHERE NOT taken ? d.id;
    END IF;

    -- a lookup is read back as _<attribute>_value
    SELECT coalesce(jsonb_object_agg(b.dynamics_field, '_' || b.attribute || '_value'), '{}')
      INTO read_names FROM d365._lookup_binds() b;
    RETURN QUERY
    WITH judged AS (
        SELECT h.*,
               CASE WHEN h.unreadable IS NOT NULL
                        THEN 'could not be matched: ' || h.unreadable
                    WHEN h.n >= 1 AND EXISTS (SELECT FROM unnest(h.ids) x WHERE NOT d365._is_guid(x))
                        THEN format('could not be matched: its look-up answer names contact id %s, which is not a GUID',
                                    (SELECT to_jsonb(x) FROM unnest(h.ids) x WHERE NOT d365._is_guid(x) LIMIT 1))
                    WHEN h.n > 1
                        THEN format('matches %s Dynamics 365 contacts (%s%s)', h.n,
                                    array_to_string(h.ids[1:10], ', '),
                                    CASE WHEN h.n > 10 THEN format(' and %s more', h.n - 10) ELSE '' END)
                    WHEN h.more
                        THEN 'could not be matched: its look-up found more than one page of Dynamics 365 contacts'
                    WHEN h.n = 1 AND taken ? (h.first_hit ->> 'contactid')
                        THEN format('matches Dynamics 365 contact %s, which contact %s matches or is linked to',
                                    h.first_hit ->> 'contactid', taken ->> (h.first_hit ->> 'contactid'))
               END AS reason
          FROM d365_lookup_hits h),
    diffed AS MATERIALIZED (
        SELECT j.*,
               CASE WHEN j.reason IS NULL AND j.n = 1 THEN
                   (SELECT jsonb_object_agg(e.key, e.value)
                      FROM jsonb_each(j.c -> 'values') e
                     WHERE e.value <> 'null'::jsonb
                       AND NOT d365._same_value(e.value,
                                                j.first_hit -> coalesce(read_names ->> e.key, e.key),
                                                j.look ? e.key))
               END AS body
          FROM judged j)
    SELECT d.k,
           CASE WHEN d.reason IS NOT NULL OR (d.n = 1 AND d.body IS NULL) THEN '[]'
                WHEN d.n = 1
                    THEN jsonb_build_array(jsonb_build_object(
                             'method', 'PATCH',
                             'path', 'contacts(' || (d.first_hit ->> 'contactid') || ')',
                             'body', d.body::text,
                             'headers', '["If-Match: *"]'::jsonb))::text
           END,
           CASE WHEN d.reason IS NOT NULL
                    THEN (d.c || jsonb_build_object('action', 'ambiguous', 'sent', NULL,
                                                    'error_code', 'd365sync.match',
                                                    'error', d.reason || '; not created'))::text
                WHEN d.n = 1
                    THEN (d.c || jsonb_build_object('id', d.first_hit ->> 'contactid', 'matched', true,
                                                    'sent', d.body,
                                                    'action', CASE WHEN d.body IS NULL THEN 'link'
                                                                   ELSE 'update' END))::text
           END
      FROM diffed d
     ORDER BY d.i;
END;
$$;

/*
 * The body of a look-up answer as jsonb.  jsonb holds no U+0000: a string
 * holding one is read with U+FFFD in its place (the value only takes part
 * in comparisons, where it then equals no local value; a matched contact's
 * local values are sent over it).  A body that cannot be read still is
 * {"@d365sync.unreadable": why}: the contacts of that look-up fail alone,
 * the rest of the run goes on.
 */
CREATE FUNCTION d365._lookup_answer(body text)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN body::jsonb;
EXCEPTION WHEN data_exception THEN
    BEGIN
        -- \u0000 not preceded by an escaped backslash
        RETURN regexp_replace(body, '(?<!\\)((?:\\\\)*)\\u0000', '\1\\ufffd', 'g')::jsonb;
    EXCEPTION WHEN data_exception THEN
        RETURN jsonb_build_object('@d365sync.unreadable',
                   'the answer to its look-up cannot be read: ' || SQLERRM);
    END;
END;
$$;
