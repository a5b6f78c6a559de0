-- The initial load of a table map (d365.table_map.load): the first pull of
-- such a map reads every record of its Dataverse table, links the records
-- its match columns find to the existing rows and inserts the others as
-- new rows, as the table's owner (d365._map_insert, src/privilege/map_owner.c).  The
-- reading is the pipeline's incoming reader (src/pipeline/pipeline_pull.c), which
-- keeps its position in d365.load_state so that a load committed page by
-- page (CALL d365_load()) goes on where it stopped.  A lookup whose parent
-- record is not linked to a local row yet waits in d365.map_lookup_pending
-- until it is.  See docs/table-maps.md.
-- ---------------------------------------------------------------------------

-- Where each load stands: the change-tracking link taken before its first
-- page (the pull continues from it once the load is done), the next page
-- to read, how far it got.
CREATE TABLE d365.load_state (
    entity       text PRIMARY KEY,
    delta_link   text,
    next_link    text,
    total        bigint,
    pages        integer NOT NULL DEFAULT 0,
    records      bigint NOT NULL DEFAULT 0,
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    last_error   text
);
COMMENT ON TABLE d365.load_state IS
    'Initial loads of table maps: the delta link taken before the first page, the next page, the records read';
SELECT pg_catalog.pg_extension_config_dump('d365.load_state', '');

-- Lookups of loaded rows whose parent record is linked to no local row
-- yet: resolved when it is (d365._map_resolve_lookups).
CREATE TABLE d365.map_lookup_pending (
    map          text NOT NULL REFERENCES d365.table_map ON DELETE CASCADE,
    row_key      text NOT NULL,
    "column"     name NOT NULL,
    dynamics_id  uuid NOT NULL,
    PRIMARY KEY (map, row_key, "column")
);
COMMENT ON TABLE d365.map_lookup_pending IS
    'Lookups of rows loaded from Dynamics whose parent record is not linked to a local row yet';
SELECT pg_catalog.pg_extension_config_dump('d365.map_lookup_pending', '');

/*
 * Why the rows of a map cannot be loaded (NULL when they can): a new row's
 * key comes from the key column's default (or identity), or is the
 * Dynamics id when the key column is a uuid.
 */
CREATE FUNCTION d365._map_load_problem(tbl regclass, key_column name)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('key column "%s" of %s has no default and is not a uuid: a loaded row would have no key',
                  a.attname, tbl)
      FROM pg_attribute a
     WHERE a.attrelid = tbl AND a.attname = key_column AND a.attnum > 0 AND NOT a.attisdropped
       AND NOT a.atthasdef AND a.attidentity = '' AND a.atttypid <> 'uuid'::regtype
$$;

-- load = true is refused at once for a table whose new rows could not get
-- a key.
CREATE FUNCTION d365._map_load_check()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    problem text;
BEGIN
    -- (the map "contact" is the contact engine's: d365_load() leaves it)
    IF NEW.load AND NEW.name <> 'contact' THEN
        problem := d365._map_load_problem(NEW.local_table, NEW.key_column);
        IF problem IS NOT NULL THEN
            RAISE EXCEPTION 'map "%" cannot load its Dynamics rows: %', NEW.name, problem
                USING ERRCODE = 'invalid_table_definition',
                      HINT = 'Give the key column a default (a sequence, an identity column), or use a uuid key (it then holds the Dynamics id).';
        END IF;
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER map_load_check BEFORE INSERT OR UPDATE OF load, key_column ON d365.table_map
    FOR EACH ROW EXECUTE FUNCTION d365._map_load_check();

/*
 * The statement that inserts loaded rows into a map's table, run as its
 * owner (src/privilege/map_owner.c, op "insert"): $1 jsonb, an array of objects
 * {column: value, "@dynamics_id": id}; the key from its default, or the
 * Dynamics id (a uuid key without default).  Sets the link columns (as
 * d365sync's link writer).  Returns [[key, id], ...] of the rows inserted.
 * columns: the columns it writes, whose INSERT right the caller must hold.
 */
CREATE FUNCTION d365._map_insert_sql(map text,
    OUT sql text, OUT tbl regclass, OUT columns name[])
RETURNS record
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map := d365._table_map(map);
    problem text := d365._map_load_problem(m.local_table, m.key_column);
    cols name[];
    id_key boolean;
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'map "%" cannot load its Dynamics rows: %', m.name, problem
            USING ERRCODE = 'invalid_table_definition',
                  HINT = 'Give the key column a default (a sequence, an identity column), or use a uuid key (it then holds the Dynamics id).';
    END IF;
    tbl := m.local_table;
    SELECT array_agg(c."column" ORDER BY c."column") INTO cols
      FROM d365.column_map c
     WHERE c.map = m.name AND c.direction <> 'out' AND c."column" <> m.key_column;
    cols := coalesce(cols, '{}');
    SELECT NOT a.atthasdef AND a.attidentity = '' INTO id_key
      FROM pg_attribute a WHERE a.attrelid = tbl AND a.attname = m.key_column;
    columns := cols || '{dynamics365_related_id,dynamics365_synchronized_on}'::name[]
               || CASE WHEN id_key THEN ARRAY[m.key_column] ELSE '{}'::name[] END;
    sql := format('WITH i AS (INSERT INTO %1$s AS t (%2$s dynamics365_related_id, dynamics365_synchronized_on)'
                  ' SELECT %3$s r."@dynamics_id", pg_catalog.now()'
                  '   FROM pg_catalog.jsonb_to_recordset($1) AS r(%4$s "@dynamics_id" pg_catalog.uuid)'
                  ' RETURNING t.%5$I::pg_catalog.text AS k, t.dynamics365_related_id AS id)'
                  ' SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_array(i.k, i.id)) FROM i',
                  tbl,
                  (SELECT string_agg(format('%I, ', c), '') FROM unnest(cols) c)
                      || CASE WHEN id_key THEN format('%I, ', m.key_column) ELSE '' END,
                  (SELECT string_agg(format('r.%I, ', c), '') FROM unnest(cols) c)
                      || CASE WHEN id_key THEN 'r."@dynamics_id", ' ELSE '' END,
                  coalesce(d365._column_defs(tbl, cols) || ', ', ''),
                  m.key_column);
END;
$$;

CREATE FUNCTION d365._map_insert(map text, rows jsonb)
RETURNS jsonb
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_map_insert'
LANGUAGE C VOLATILE;

/*
 * The conversion of incoming records of a map, for a whole page at once:
 * a query over $1 jsonb[] (the records) and $2 uuid[] (their ids) giving,
 * per record, i (its position), id, vals ({column: local value}), wires
 * ({wire property: value} to remember as synced), pending ({column:
 * Dynamics id} of lookups whose parent record is linked to no local row
 * yet), problem (why the record cannot be taken, or NULL) and etag (its
 * @odata.etag when it is one, as d365._etag says).  Built-in
 * functions only: no code of the application's making runs.
 */
CREATE FUNCTION d365._map_in_sql(map text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    col record;
    pm d365.table_map;
    v text;
    g text;
    loc text;
    wire text;
    vals text := '''{}''::pg_catalog.jsonb';
    wires text := '''{}''::pg_catalog.jsonb';
    pending text := '''{}''::pg_catalog.jsonb';
    problems text := 'NULL::pg_catalog.text';
    joins text := '';
    n integer := 0;
    ids text;
    -- the pairs of vals and wires, built by one jsonb_build_object per
    -- 40 pairs (not one || per column: each || copies the object)
    val_pairs text[] := '{}';
    wire_names text[] := '{}';
    wire_exprs text[] := '{}';
    w integer;
BEGIN
    FOR col IN SELECT * FROM d365._map_columns(map) x
                WHERE x.direction <> 'out' AND x.problem IS NULL LOOP
        v := format('(r.rec OPERATOR(pg_catalog.->) %L)', col.read);
        g := format('(r.rec OPERATOR(pg_catalog.->>) %L)', col.read);
        wire := v;
        CASE col.kind
        WHEN 'lookup' THEN
            problems := format('pg_catalog.concat_ws(''; '', %s, CASE WHEN %s IS NOT NULL AND NOT %s OPERATOR(pg_catalog.~) ''^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'''
                               ' THEN pg_catalog.format(''field %%s: %%s is not a GUID'', %L, pg_catalog.left(%s, 100)) END)',
                               problems, g, g, col.read, g);
            wire := format('CASE WHEN %1$s IS NULL THEN ''null''::pg_catalog.jsonb'
                           ' WHEN %1$s OPERATOR(pg_catalog.~) ''^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'' THEN pg_catalog.to_jsonb(%2$L OPERATOR(pg_catalog.||) pg_catalog.lower(%1$s) OPERATOR(pg_catalog.||) '')'') END',
                           g, '/' || col.bind_set || '(');
            IF col.parent IS NULL THEN
                loc := format('CASE WHEN %1$s OPERATOR(pg_catalog.~) ''^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'' THEN %2$s END', g, v);
            ELSE
                n := n + 1;
                SELECT * INTO pm FROM d365.table_map t WHERE t.name = col.parent;
                -- the parent row d365sync linked to that record
                joins := joins || format(
                    ' LEFT JOIN LATERAL (SELECT pg_catalog.to_jsonb(p.%1$I) AS k FROM %2$s p'
                    '   JOIN d365.map_row pr ON pr.map OPERATOR(pg_catalog.=) %3$L'
                    '    AND pr.row_key OPERATOR(pg_catalog.=) p.%1$I::pg_catalog.text'
                    '    AND pr.dynamics_id OPERATOR(pg_catalog.=) p.dynamics365_related_id'
                    '  WHERE %4$s OPERATOR(pg_catalog.~) ''^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'''
                    '    AND p.dynamics365_related_id OPERATOR(pg_catalog.=) (CASE WHEN %4$s OPERATOR(pg_catalog.~) ''^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'' THEN %4$s END)::pg_catalog.uuid'
                    '  LIMIT 1) l%5$s ON true',
                    pm.key_column, pm.local_table, pm.name, g, n);
                loc := format('l%s.k', n);
                wire := format('CASE WHEN %1$s IS NULL THEN ''null''::pg_catalog.jsonb WHEN l%3$s.k IS NOT NULL'
                               ' THEN pg_catalog.to_jsonb(%2$L OPERATOR(pg_catalog.||) pg_catalog.lower(%1$s) OPERATOR(pg_catalog.||) '')'') END',
                               g, '/' || col.bind_set || '(', n);
                pending := format('%s OPERATOR(pg_catalog.||) CASE WHEN %s OPERATOR(pg_catalog.~) ''^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'' AND l%s.k IS NULL'
                                  ' THEN pg_catalog.jsonb_build_object(%L, %s) ELSE ''{}''::pg_catalog.jsonb END',
                                  pending, g, n, col."column", g);
            END IF;
        WHEN 'choice' THEN
            loc := format('(SELECT pg_catalog.to_jsonb(o OPERATOR(pg_catalog.->>) ''label'')'
                          '   FROM pg_catalog.jsonb_array_elements(%L::pg_catalog.jsonb) o'
                          '  WHERE o OPERATOR(pg_catalog.->) ''value'' OPERATOR(pg_catalog.=) %s LIMIT 1)',
                          col.options, v);
            problems := format('pg_catalog.concat_ws(''; '', %s, CASE WHEN %s IS NOT NULL AND %s IS NULL'
                               ' THEN pg_catalog.format(''field %%s: %%s is not an option of the choice'', %L, pg_catalog.left(%s, 100)) END)',
                               problems, g, loc, col.field, g);
        WHEN 'multi', 'multi_value' THEN
            ids := format('ARRAY(SELECT DISTINCT pg_catalog.btrim(x)::pg_catalog.int4'
                          '  FROM pg_catalog.unnest(pg_catalog.string_to_array(%s, '','')) x'
                          ' WHERE pg_catalog.btrim(x) ~ ''^-?[0-9]{1,9}$'' ORDER BY 1)', g);
            wire := format('CASE WHEN %s IS NULL THEN ''null''::pg_catalog.jsonb'
                           ' ELSE pg_catalog.to_jsonb(pg_catalog.array_to_string(%s, '','')) END', g, ids);
            IF col.kind = 'multi_value' THEN
                loc := format('CASE WHEN %s IS NOT NULL THEN pg_catalog.to_jsonb(%s) END', g, ids);
            ELSE
                loc := format('CASE WHEN %s IS NOT NULL THEN coalesce((SELECT pg_catalog.jsonb_agg(o OPERATOR(pg_catalog.->) ''label'''
                              '   ORDER BY (o OPERATOR(pg_catalog.->>) ''value'')::pg_catalog.int4)'
                              '   FROM pg_catalog.jsonb_array_elements(%L::pg_catalog.jsonb) o'
                              '  WHERE (o OPERATOR(pg_catalog.->>) ''value'')::pg_catalog.int4 OPERATOR(pg_catalog.=) ANY (%s)), ''[]'') END',
                              g, col.options, ids);
                problems := format('pg_catalog.concat_ws(''; '', %s, CASE WHEN %s IS NOT NULL AND'
                                   ' pg_catalog.jsonb_array_length(%s) OPERATOR(pg_catalog.<>) pg_catalog.cardinality(%s)'
                                   ' THEN pg_catalog.format(''field %%s: %%s holds a value that is not an option of the choice'', %L, pg_catalog.left(%s, 100)) END)',
                                   problems, g, loc, ids, col.field, g);
            END IF;
        ELSE
            loc := v;
        END CASE;
        val_pairs := val_pairs || format('%L::pg_catalog.text, %s', col."column", loc);
        -- a field read for two columns is one wire: the value of the last
        -- of them that has one
        w := array_position(wire_names, col.wire::text);
        IF w IS NULL THEN
            wire_names := wire_names || col.wire::text;
            wire_exprs := wire_exprs || wire;
        ELSE
            wire_exprs[w] := format('coalesce(%s, %s)', wire, wire_exprs[w]);
        END IF;
    END LOOP;
    IF cardinality(val_pairs) > 0 THEN
        vals := (SELECT string_agg(format('pg_catalog.jsonb_build_object(%s)',
                                          array_to_string(val_pairs[s.n:s.n + 39], ', ')),
                                   ' OPERATOR(pg_catalog.||) ' ORDER BY s.n)
                   FROM generate_series(1, cardinality(val_pairs), 40) s(n));
        wires := (SELECT string_agg(format('pg_catalog.jsonb_build_object(%s)',
                                           (SELECT string_agg(format('%L::pg_catalog.text, %s', wire_names[y.j], wire_exprs[y.j]), ', ' ORDER BY y.j)
                                              FROM generate_series(s.n, least(s.n + 39, cardinality(wire_names))) AS y(j))),
                                    ' OPERATOR(pg_catalog.||) ' ORDER BY s.n)
                    FROM generate_series(1, cardinality(wire_names), 40) s(n));
        -- a wire whose value is SQL NULL (the field is not in the record)
        -- is left out, as before; one that is JSON null is kept
        wires := format('CASE WHEN %s THEN (%s) OPERATOR(pg_catalog.-) ARRAY[%s] ELSE %s END',
                        (SELECT string_agg(format('(%s) IS NULL', x.e), ' OR ' ORDER BY x.j)
                           FROM unnest(wire_exprs) WITH ORDINALITY AS x(e, j)),
                        wires,
                        (SELECT string_agg(format('CASE WHEN (%s) IS NULL THEN %L::pg_catalog.text END', x.e, wire_names[x.j]), ', ' ORDER BY x.j)
                           FROM unnest(wire_exprs) WITH ORDINALITY AS x(e, j)),
                        wires);
    END IF;
    RETURN format('SELECT r.i::pg_catalog.int4 AS i, r.id, %s AS vals, %s AS wires, %s AS pending,'
                  '       NULLIF(%s, '''') AS problem,'
                  -- (the test of d365._etag, without its {1,255}: a bounded
                  -- repetition makes the regular expression slow)
                  '       CASE WHEN (r.rec OPERATOR(pg_catalog.->>) ''@odata.etag'') OPERATOR(pg_catalog.~) ''^(W/)?"[!#-~]+"$'''
                  '                 AND pg_catalog.length(r.rec OPERATOR(pg_catalog.->>) ''@odata.etag'')'
                  '                     OPERATOR(pg_catalog.<=) CASE WHEN (r.rec OPERATOR(pg_catalog.->>) ''@odata.etag'') LIKE ''W/%%'' THEN 259 ELSE 257 END'
                  '            THEN r.rec OPERATOR(pg_catalog.->>) ''@odata.etag'' END AS etag'
                  '  FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.jsonb[]), pg_catalog.unnest($2::pg_catalog.uuid[]))'
                  '       WITH ORDINALITY AS r(rec, id, i)%s'
                  ' ORDER BY r.i',
                  vals, wires, pending, problems, joins);
END;
$$;

/*
 * The unlinked local rows each record's match values find ($1 jsonb[]: the
 * records' converted values {column: value}): text compared without case,
 * as Dataverse does, other types as JSON values.  NULL when the map has no
 * match column.
 */
CREATE FUNCTION d365._map_load_match_sql(map text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map := d365._table_map(map);
    cond text;
BEGIN
    -- no match column: no need to read the map's columns (each page of a
    -- load asks)
    IF NOT EXISTS (SELECT FROM d365.column_map c
                    WHERE c.map = m.name AND c.match AND c.direction <> 'out') THEN
        RETURN NULL;
    END IF;
    SELECT string_agg(CASE WHEN x.typ IN ('text'::regtype, 'character varying'::regtype, 'character'::regtype)
                           THEN format('pg_catalog.lower(c.%1$I::pg_catalog.text) OPERATOR(pg_catalog.=) pg_catalog.lower(v.vals OPERATOR(pg_catalog.->>) %2$L)',
                                       x."column", x."column")
                           -- the JSON of the column's value as d365._json_expr
                           -- writes it: built-in conversions only (to_jsonb
                           -- of an enum or another type of the table owner's
                           -- would call the owner's cast to json)
                           ELSE format('coalesce(%1$s OPERATOR(pg_catalog.=) (v.vals OPERATOR(pg_catalog.->) %2$L), false)',
                                       coalesce(d365._json_expr(format('c.%I', x."column"), x.typ), 'NULL::pg_catalog.jsonb'),
                                       x."column") END, ' AND ' ORDER BY x."column")
      INTO cond
      FROM d365._map_columns(m.name) x
     WHERE x.match AND x.problem IS NULL AND x.direction <> 'out';
    IF cond IS NULL THEN
        RETURN NULL;
    END IF;
    RETURN format('SELECT v.i::pg_catalog.int4, pg_catalog.array_agg(c.%1$I::pg_catalog.text ORDER BY c.%1$I)'
                  '  FROM pg_catalog.unnest($1::pg_catalog.jsonb[]) WITH ORDINALITY AS v(vals, i)'
                  '  JOIN %2$s c ON c.dynamics365_related_id IS NULL AND c.%1$I IS NOT NULL AND %3$s'
                  ' GROUP BY v.i',
                  m.key_column, m.local_table, cond);
END;
$$;

/*
 * The record stage of a map's load, and of its later pulls (load = true):
 * one page of records.  A record linked to a local row already (and a
 * deleted one) goes to d365._map_pull_record as any change.  The others are
 * converted at once (d365._map_in_sql); one whose match values find one
 * unlinked local row is linked to it and merged field by field (a value
 * one side lacks is taken from the other; different values on both sides
 * are a conflict, resolved by the map's policy and recorded in
 * d365.conflict), the rest are inserted as the table's owner
 * (d365._map_insert), the whole page in one statement, record by record
 * when that fails.  A
 * record that does not fit fails alone: a WARNING, counted as failed, the
 * last such error in d365.load_state.last_error.
 */
CREATE FUNCTION d365._map_load_record(page json, map text,
    OUT created integer, OUT updated integer, OUT unchanged integer,
    OUT failed integer, OUT unlinked integer)
RETURNS record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map := d365._table_map(map);
    ent record := d365._map_entity(m.entity_set);
    recs jsonb[] := '{}';
    e json;
    old jsonb[] := '{}';
    fresh jsonb[] := '{}';
    ids uuid[] := '{}';
    id uuid;
    msg text;
    c_ids uuid[];
    c_vals jsonb[];
    c_wires jsonb[];
    c_pending jsonb[];
    c_problems text[];
    c_etags text[];
    kinds text[];
    hit_keys text[];
    hitmap jsonb;
    nbad integer;
    bad text[];
    match_sql text;
    ninsert integer;
    insert_rows jsonb;
    out_body text;
    in_cols jsonb;
    cur jsonb;
    apply_vals jsonb;
    conflicts jsonb;
    done jsonb;
    one jsonb;
    k text;
    counts record;
    problems text[] := '{}';
BEGIN
    created := 0; updated := 0; unchanged := 0; failed := 0; unlinked := 0;
    IF row_security_active(m.local_table) THEN
        RAISE EXCEPTION 'row-level security of % applies to role "%"', m.local_table, current_user
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'Its policies are code of the table''s owner: d365sync does not read the table as a role they bind.',
                  HINT = 'Run the pull as the table''s owner, or as a role with BYPASSRLS.';
    END IF;
    -- the job reads the table as the job role: for a caller that may read it
    PERFORM d365._caller_reads(m.local_table);
    IF page IS NULL OR json_typeof(page) <> 'array' THEN
        RAISE EXCEPTION 'a page of records is not a JSON array'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- the whole page at once; record by record when a record holds U+0000
    BEGIN
        recs := ARRAY(SELECT x FROM jsonb_array_elements(page::jsonb) x);
    EXCEPTION WHEN untranslatable_character OR invalid_text_representation THEN
        recs := '{}';
        FOR e IN SELECT json_array_elements(page) LOOP
            BEGIN
                recs := recs || e::jsonb;
            EXCEPTION WHEN untranslatable_character OR invalid_text_representation THEN
                GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT;
                problems := problems || ('a record was not loaded: ' || msg);
                failed := failed + 1;
            END;
        END LOOP;
    END;

    -- linked already, or deleted: a change as any other; the others are
    -- new (a record without a GUID fails)
    EXECUTE format('WITH u AS MATERIALIZED ('
                   -- a GUID: 8-4-4-4-12 hex digits (five groups of hex
                   -- digits, 36 characters, the hyphens in their places:
                   -- a regular expression with counted repeats is slow)
                   '  SELECT u.i, u.r, CASE WHEN (u.r OPERATOR(pg_catalog.->>) $3) OPERATOR(pg_catalog.~) ''^[0-9a-fA-F]+-[0-9a-fA-F]+-[0-9a-fA-F]+-[0-9a-fA-F]+-[0-9a-fA-F]+$'''
                   '                         AND pg_catalog.length(u.r OPERATOR(pg_catalog.->>) $3) OPERATOR(pg_catalog.=) 36'
                   '                         AND pg_catalog.substr(u.r OPERATOR(pg_catalog.->>) $3, 9, 1) OPERATOR(pg_catalog.=) ''-'''
                   '                         AND pg_catalog.substr(u.r OPERATOR(pg_catalog.->>) $3, 14, 1) OPERATOR(pg_catalog.=) ''-'''
                   '                         AND pg_catalog.substr(u.r OPERATOR(pg_catalog.->>) $3, 19, 1) OPERATOR(pg_catalog.=) ''-'''
                   '                         AND pg_catalog.substr(u.r OPERATOR(pg_catalog.->>) $3, 24, 1) OPERATOR(pg_catalog.=) ''-'''
                   '                        THEN (u.r OPERATOR(pg_catalog.->>) $3)::pg_catalog.uuid END AS id,'
                   '         pg_catalog.jsonb_typeof(u.r) OPERATOR(pg_catalog.<>) ''object'''
                   '         OR coalesce((u.r OPERATOR(pg_catalog.->>) ''@odata.context'') LIKE ''%%$deletedEntity'', false) AS special'
                   '    FROM pg_catalog.unnest($1) WITH ORDINALITY AS u(r, i)),'
                   -- each id looked up in the link column's index and in
                   -- d365.map_row's (not a hash of the whole table, which
                   -- grows with each page a load adds)
                   ' v AS MATERIALIZED ('
                   '  SELECT u.*, u.special OR lc.hit IS NOT NULL OR ls.hit IS NOT NULL AS old'
                   '    FROM u'
                   '    LEFT JOIN LATERAL (SELECT 1 AS hit FROM %1$s c'
                   '                        WHERE c.dynamics365_related_id OPERATOR(pg_catalog.=) u.id LIMIT 1) lc ON true'
                   '    LEFT JOIN LATERAL (SELECT 1 AS hit FROM d365.map_row s WHERE s.map OPERATOR(pg_catalog.=) $2'
                   '                          AND s.dynamics_id OPERATOR(pg_catalog.=) u.id LIMIT 1) ls ON true)'
                   ' SELECT pg_catalog.array_agg(v.r ORDER BY v.i) FILTER (WHERE v.old),'
                   '        pg_catalog.array_agg(v.r ORDER BY v.i) FILTER (WHERE NOT v.old AND v.id IS NOT NULL),'
                   '        pg_catalog.array_agg(v.id ORDER BY v.i) FILTER (WHERE NOT v.old AND v.id IS NOT NULL),'
                   '        pg_catalog.count(*) FILTER (WHERE NOT v.old AND v.id IS NULL)::pg_catalog.int4'
                   '   FROM v', m.local_table)
       INTO old, fresh, ids, nbad USING recs, m.name, ent.primary_id;
    old := coalesce(old, '{}'); fresh := coalesce(fresh, '{}'); ids := coalesce(ids, '{}');
    IF nbad > 0 THEN
        failed := failed + nbad;
        problems := problems || format('%s record(s) without a GUID in %s were not loaded', nbad, ent.primary_id);
    END IF;

    IF cardinality(fresh) > 0 THEN
        -- converted at once, into arrays by position (the same record twice
        -- in a page: the first)
        EXECUTE format('SELECT pg_catalog.array_agg(c.id ORDER BY c.i), pg_catalog.array_agg(c.vals ORDER BY c.i),'
                       '       pg_catalog.array_agg(c.wires ORDER BY c.i), pg_catalog.array_agg(c.pending ORDER BY c.i),'
                       '       pg_catalog.array_agg(c.problem ORDER BY c.i), pg_catalog.array_agg(c.etag ORDER BY c.i)'
                       '  FROM (SELECT DISTINCT ON (x.id) x.* FROM (%s) x ORDER BY x.id, x.i) c',
                       d365._map_in_sql(m.name))
           INTO c_ids, c_vals, c_wires, c_pending, c_problems, c_etags USING fresh, ids;
        SELECT count(*), array_agg(format('record %s was not loaded: %s', x.id, x.problem))
          INTO nbad, bad
          FROM unnest(c_ids, c_problems) AS x(id, problem) WHERE x.problem IS NOT NULL;
        failed := failed + nbad;
        problems := problems || coalesce(bad, '{}');
        -- the unlinked local rows each record's match values find, in one
        -- query (by position)
        match_sql := d365._map_load_match_sql(m.name);
        IF match_sql IS NOT NULL THEN
            EXECUTE 'SELECT pg_catalog.jsonb_object_agg(x.i::pg_catalog.text, pg_catalog.to_jsonb(x.h)) FROM ('
                    || match_sql || ') AS x(i, h)'
               INTO hitmap USING c_vals;
        END IF;
        hitmap := coalesce(hitmap, '{}');
        -- what becomes of each: 'insert' (no hit), 'match' (one hit; a row
        -- several records find goes to the first, the others are new rows),
        -- 'fail' (several hits) or 'problem'
        WITH c AS (SELECT x.n, x.id, x.problem, coalesce(hitmap -> x.n::text, '[]') AS h
                     FROM unnest(c_ids, c_problems) WITH ORDINALITY AS x(id, problem, n)),
             d AS (SELECT c.*, jsonb_array_length(c.h) AS nh,
                          row_number() OVER (PARTITION BY CASE WHEN c.problem IS NULL AND jsonb_array_length(c.h) = 1
                                                               THEN c.h ->> 0 END
                                             ORDER BY c.n) AS rn
                     FROM c)
        SELECT array_agg(CASE WHEN d.problem IS NOT NULL THEN 'problem'
                              WHEN d.nh > 1 THEN 'fail'
                              WHEN d.nh = 1 AND d.rn = 1 THEN 'match'
                              ELSE 'insert' END ORDER BY d.n),
               array_agg(d.h ->> 0 ORDER BY d.n),
               array_agg(format('record %s was not loaded: it matches %s local rows (%s)', d.id, d.nh,
                                (SELECT string_agg(v, ', ') FROM (SELECT jsonb_array_elements_text(d.h) v LIMIT 10) z)))
                   FILTER (WHERE d.problem IS NULL AND d.nh > 1)
          INTO kinds, hit_keys, bad
          FROM d;
        failed := failed + coalesce(cardinality(bad), 0);
        problems := problems || coalesce(bad, '{}');
    END IF;

    -- matched: link, then field by field (the values as they are sent,
    -- d365._map_out_exprs): a field set on one side only takes that
    -- side's value (here now, or sent by the next sync); set on both sides
    -- to different values, it is a conflict, resolved by the map's policy
    -- and recorded in d365.conflict (no value before: base NULL)
    IF 'match' = ANY (kinds) THEN
        out_body := (d365._map_out_exprs(m.name)).body;
        SELECT coalesce(jsonb_object_agg(x."column", jsonb_build_object('wire', x.wire, 'field', x.field,
                                                                         'both', x.direction = 'both')), '{}')
          INTO in_cols
          FROM d365._map_columns(m.name) x WHERE x.direction <> 'out' AND x.problem IS NULL;
    END IF;
    FOR one IN SELECT jsonb_build_object('k', x.k, 'id', x.id, 'vals', x.vals, 'wires', x.wires, 'pending', x.pending,
                                         'etag', x.etag)
                 FROM unnest(c_ids, c_vals, c_wires, c_pending, kinds, hit_keys, c_etags)
                      AS x(id, vals, wires, pending, kind, k, etag)
                WHERE x.kind = 'match' LOOP
        k := one ->> 'k';
        id := (one ->> 'id')::uuid;
        BEGIN
            EXECUTE format('SELECT %s FROM %s c WHERE c.%I::pg_catalog.text OPERATOR(pg_catalog.=) $1',
                           out_body, m.local_table, m.key_column)
               INTO cur USING k;
            SELECT coalesce(jsonb_object_agg(c.key, one -> 'vals' -> c.key)
                                FILTER (WHERE coalesce(cur -> (c.value ->> 'wire'), 'null') = 'null'
                                           OR (m.conflict = 'dynamics_wins'
                                               AND cur -> (c.value ->> 'wire') <> one -> 'wires' -> (c.value ->> 'wire'))), '{}'),
                   coalesce(jsonb_agg(jsonb_build_object('column', c.key, 'field', c.value ->> 'field',
                                                         'local', cur -> (c.value ->> 'wire'),
                                                         'dynamics', one -> 'wires' -> (c.value ->> 'wire')))
                                FILTER (WHERE (c.value ->> 'both')::boolean
                                          AND coalesce(cur -> (c.value ->> 'wire'), 'null') <> 'null'
                                          AND cur -> (c.value ->> 'wire') <> one -> 'wires' -> (c.value ->> 'wire')), '[]')
              INTO apply_vals, conflicts
              FROM jsonb_each(in_cols) c
             WHERE coalesce(one -> 'wires' -> (c.value ->> 'wire'), 'null') <> 'null'
               AND NOT (one -> 'pending') ? c.key;
            IF d365._map_set_links(m.name, ARRAY[k], ARRAY[id], ARRAY[NULL::uuid]) IS NULL THEN
                RAISE EXCEPTION 'row % is locked or linked meanwhile', k USING ERRCODE = 'lock_not_available';
            END IF;
            INSERT INTO d365.map_row AS s (map, row_key, dynamics_id) VALUES (m.name, k, id)
            ON CONFLICT ON CONSTRAINT map_row_pkey DO UPDATE
               SET dynamics_id = EXCLUDED.dynamics_id, remote_deleted_at = NULL;
            IF apply_vals <> '{}' THEN
                PERFORM d365._map_apply(m.name, apply_vals, k);
            END IF;
            INSERT INTO d365.conflict (map, row_key, dynamics_id, "column", field,
                                       local_value, dynamics_value, base_value, resolution)
            SELECT m.name, k, id, (f ->> 'column')::name, f ->> 'field', f -> 'local', f -> 'dynamics',
                   NULL, m.conflict
              FROM jsonb_array_elements(conflicts) f;
            -- synced: what Dynamics holds, so the next sync sends the fields
            -- the row keeps of its own
            UPDATE d365.map_row s
               SET synced = one -> 'wires', etag = one ->> 'etag', attempts = 0, next_attempt_at = NULL,
                   last_error = NULL, last_error_code = NULL
             WHERE s.map = m.name AND s.row_key = k;
            -- a lookup whose parent is not linked yet, where the row has none
            INSERT INTO d365.map_lookup_pending AS p (map, row_key, "column", dynamics_id)
            SELECT m.name, k, x.key, (x.value #>> '{}')::uuid FROM jsonb_each(one -> 'pending') x
             WHERE coalesce(cur -> (in_cols -> x.key ->> 'wire'), 'null') = 'null'
            ON CONFLICT ON CONSTRAINT map_lookup_pending_pkey DO UPDATE SET dynamics_id = EXCLUDED.dynamics_id;
            updated := updated + 1;
        EXCEPTION WHEN data_exception OR integrity_constraint_violation OR raise_exception
                       OR invalid_parameter_value OR with_check_option_violation OR lock_not_available THEN
            GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT;
            failed := failed + 1;
            problems := problems || format('record %s was not linked to row %s: %s', id, k, msg);
        END;
    END LOOP;

    -- new rows: the page in one statement, record by record when it fails
    SELECT count(*), jsonb_agg(x.vals || jsonb_build_object('@dynamics_id', x.id) ORDER BY x.n)
      INTO ninsert, insert_rows
      FROM unnest(c_ids, c_vals, kinds) WITH ORDINALITY AS x(id, vals, kind, n)
     WHERE x.kind = 'insert';
    IF ninsert > 0 THEN
        BEGIN
            done := d365._map_insert(m.name, insert_rows);
        EXCEPTION WHEN data_exception OR integrity_constraint_violation OR raise_exception
                       OR invalid_parameter_value OR with_check_option_violation OR program_limit_exceeded THEN
            done := '[]';
            FOR one IN SELECT x FROM jsonb_array_elements(insert_rows) x LOOP
                BEGIN
                    done := done || coalesce(d365._map_insert(m.name, jsonb_build_array(one)), '[]');
                EXCEPTION WHEN data_exception OR integrity_constraint_violation OR raise_exception
                               OR invalid_parameter_value OR with_check_option_violation
                               OR program_limit_exceeded THEN
                    GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT;
                    problems := problems || format('record %s was not loaded: %s', one ->> '@dynamics_id', msg);
                END;
            END LOOP;
        END;
        done := coalesce(done, '[]');
        -- the state of each row inserted: linked, synced with what it
        -- holds.  A new row's key has no state row as a rule: one plain
        -- INSERT (an upsert of every row costs a quarter more), and the
        -- upsert when a state row was left behind for one of the keys
        BEGIN
            WITH d AS MATERIALIZED (SELECT y ->> 0 AS k, (y ->> 1)::uuid AS id FROM jsonb_array_elements(done) y)
            INSERT INTO d365.map_row (map, row_key, dynamics_id, synced, etag)
            SELECT m.name, d.k, d.id, x.wires, x.etag
              FROM d JOIN unnest(c_ids, c_wires, c_etags) AS x(id, wires, etag) ON x.id = d.id;
        EXCEPTION WHEN unique_violation THEN
            WITH d AS MATERIALIZED (SELECT y ->> 0 AS k, (y ->> 1)::uuid AS id FROM jsonb_array_elements(done) y)
            INSERT INTO d365.map_row AS s (map, row_key, dynamics_id, synced, etag)
            SELECT m.name, d.k, d.id, x.wires, x.etag
              FROM d JOIN unnest(c_ids, c_wires, c_etags) AS x(id, wires, etag) ON x.id = d.id
            ON CONFLICT ON CONSTRAINT map_row_pkey DO UPDATE
               SET dynamics_id = EXCLUDED.dynamics_id, synced = EXCLUDED.synced, etag = EXCLUDED.etag,
                   synced_seq = s.change_seq,
                   generation = 0, attempts = 0, next_attempt_at = NULL, last_error = NULL,
                   last_error_code = NULL, remote_deleted_at = NULL;
        END;
        WITH d AS MATERIALIZED (SELECT y ->> 0 AS k, (y ->> 1)::uuid AS id FROM jsonb_array_elements(done) y)
        INSERT INTO d365.map_lookup_pending AS p (map, row_key, "column", dynamics_id)
        SELECT m.name, d.k, e.key, (e.value #>> '{}')::uuid
          FROM d JOIN unnest(c_ids, c_pending) AS x(id, pending) ON x.id = d.id AND x.pending <> '{}',
               jsonb_each(x.pending) e
        ON CONFLICT ON CONSTRAINT map_lookup_pending_pkey DO UPDATE SET dynamics_id = EXCLUDED.dynamics_id;
        created := created + jsonb_array_length(done);
        failed := failed + ninsert - jsonb_array_length(done);
        IF ninsert > jsonb_array_length(done) AND cardinality(problems) = 0 THEN
            problems := problems || format('%s record(s) were not inserted (a trigger of %s skipped them)',
                                           ninsert - jsonb_array_length(done), m.local_table);
        END IF;
    END IF;

    IF cardinality(old) > 0 THEN
        SELECT * INTO counts FROM d365._map_pull_record(to_json(old), m.name);
        updated := updated + counts.updated;
        unchanged := unchanged + counts.unchanged;
        failed := failed + counts.failed;
        unlinked := unlinked + counts.unlinked;
    END IF;

    -- one WARNING per page at most, the last problem kept with the load
    IF cardinality(problems) > 0 THEN
        RAISE WARNING 'map "%": %', m.name,
                      problems[1] || CASE WHEN cardinality(problems) > 1
                                          THEN format(' (and %s more problem(s) in this page)', cardinality(problems) - 1)
                                          ELSE '' END
            USING ERRCODE = '01000';
        UPDATE d365.load_state l SET last_error = left(problems[cardinality(problems)], 2000)
         WHERE l.entity = 'map:' || m.name;
    END IF;
END;
$$;

-- The request of Dataverse's count of the records of a map's table
-- (RetrieveTotalRecordCount, a snapshot): the total a load's progress is
-- measured against.
CREATE FUNCTION d365._map_load_count_path(map text)
RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map := d365._table_map(map);
    ent record := d365._map_entity(m.entity_set);
BEGIN
    RETURN 'RetrieveTotalRecordCount(EntityNames=@p1)?@p1='
           || d365._uri_escape(pg_catalog.to_jsonb(ARRAY[ent.logical_name])::text);
END;
$$;

/*
 * Lookups waiting for their parent (d365.map_lookup_pending): each one
 * whose parent record is now linked to a local row gets that row's key, as
 * the table's owner (d365._map_apply), unless a pull has brought the
 * field since (the state then knows it).  Run at the end of each load and
 * of each pull of a map, for the lookups of every map, but only where the
 * run's caller may write the child's column and read the parent's key and
 * link (the others wait for a run of a role that may).  Returns how many
 * were resolved and how many still wait.
 */
CREATE FUNCTION d365._map_resolve_lookups(OUT resolved integer, OUT waiting integer)
RETURNS record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    grp record;
    col record;
    pm d365.table_map;
    child_table regclass;
    p record;
    msg text;
    code text;
BEGIN
    resolved := 0;
    -- rows deleted or unlinked since
    DELETE FROM d365.map_lookup_pending q
     WHERE NOT EXISTS (SELECT FROM d365.map_row r
                        WHERE r.map = q.map AND r.row_key = q.row_key AND r.dynamics_id IS NOT NULL);
    FOR grp IN SELECT DISTINCT q.map, q."column" FROM d365.map_lookup_pending q ORDER BY 1, 2 LOOP
        col := NULL;
        SELECT * INTO col FROM d365._map_columns(grp.map) x WHERE x."column" = grp."column";
        IF col."column" IS NULL OR col.parent IS NULL OR col.problem IS NOT NULL OR col.direction = 'out' THEN
            DELETE FROM d365.map_lookup_pending q WHERE q.map = grp.map AND q."column" = grp."column";
            CONTINUE;
        END IF;
        -- brought by a pull since
        DELETE FROM d365.map_lookup_pending q USING d365.map_row r
         WHERE q.map = grp.map AND q."column" = grp."column"
           AND r.map = q.map AND r.row_key = q.row_key AND r.synced ? col.wire;
        SELECT * INTO pm FROM d365.table_map t WHERE t.name = col.parent;
        -- the parent's table is read, the child's written: both must pass
        -- the check a map run starts with (16_map_guard.sql); else they wait
        CONTINUE WHEN d365._map_problem(grp.map) IS NOT NULL OR d365._map_problem(pm.name) IS NOT NULL;
        -- and the role the run is for (any map's pull comes here) must be
        -- one that may write the child's column and read the parent's key
        -- and link, with no row-level security binding it on either table;
        -- else they wait for a run of a role that may
        SELECT t.local_table INTO child_table FROM d365.table_map t WHERE t.name = grp.map;
        CONTINUE WHEN NOT (has_column_privilege(d365._job_caller(), child_table, grp."column"::text, 'UPDATE')
                           AND has_column_privilege(d365._job_caller(), pm.local_table, pm.key_column::text, 'SELECT')
                           AND has_column_privilege(d365._job_caller(), pm.local_table, 'dynamics365_related_id', 'SELECT')
                           AND NOT d365._caller_rls(child_table) AND NOT d365._caller_rls(pm.local_table));
        FOR p IN EXECUTE format(
                'SELECT q.row_key, q.dynamics_id, pg_catalog.to_jsonb(par.%1$I) AS k'
                '  FROM d365.map_lookup_pending q'
                '  JOIN %2$s par ON par.dynamics365_related_id OPERATOR(pg_catalog.=) q.dynamics_id'
                '  JOIN d365.map_row pr ON pr.map OPERATOR(pg_catalog.=) %3$L'
                '   AND pr.row_key OPERATOR(pg_catalog.=) par.%1$I::pg_catalog.text'
                '   AND pr.dynamics_id OPERATOR(pg_catalog.=) par.dynamics365_related_id'
                ' WHERE q.map OPERATOR(pg_catalog.=) $1 AND q."column" OPERATOR(pg_catalog.=) $2'
                ' ORDER BY q.row_key', pm.key_column, pm.local_table, pm.name)
              USING grp.map, grp."column" LOOP
            BEGIN
                PERFORM d365._map_apply(grp.map, jsonb_build_object(grp."column", p.k), p.row_key);
                UPDATE d365.map_row r
                   SET synced = coalesce(r.synced, '{}')
                                || jsonb_build_object(col.wire, '/' || col.bind_set || '(' || p.dynamics_id || ')')
                 WHERE r.map = grp.map AND r.row_key = p.row_key;
                resolved := resolved + 1;
            EXCEPTION WHEN data_exception OR integrity_constraint_violation OR raise_exception
                           OR invalid_parameter_value OR with_check_option_violation THEN
                GET STACKED DIAGNOSTICS code = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
                RAISE WARNING 'the lookup % of row % of map "%" was not applied: %', grp."column", p.row_key, grp.map, msg
                    USING ERRCODE = '01000';
                UPDATE d365.map_row r
                   SET last_error_code = code, last_error = left('lookup not applied: ' || msg, 2000)
                 WHERE r.map = grp.map AND r.row_key = p.row_key;
            END;
            DELETE FROM d365.map_lookup_pending q
             WHERE q.map = grp.map AND q.row_key = p.row_key AND q."column" = grp."column";
        END LOOP;
    END LOOP;
    SELECT count(*) INTO waiting FROM d365.map_lookup_pending;
END;
$$;

-- A procedure that commits cannot carry a SET clause: the C code pins
-- search_path = pg_catalog, pg_temp in each of its transactions.
CREATE PROCEDURE d365.d365_load(map text DEFAULT NULL)
AS 'MODULE_PATHNAME', 'd365_load'
LANGUAGE C;
COMMENT ON PROCEDURE d365.d365_load(text) IS
    'Runs the pull of one table map or of every enabled map (parents first) as d365_pull() does, committing after each page of an initial load (load = true), so that a load stopped halfway goes on where it stopped';

REVOKE ALL ON d365.load_state, d365.map_lookup_pending FROM PUBLIC;
REVOKE ALL ON FUNCTION d365._map_load_problem(regclass, name), d365._map_load_check(),
       d365._map_insert_sql(text), d365._map_insert(text, jsonb), d365._map_in_sql(text),
       d365._map_load_match_sql(text), d365._map_load_record(json, text),
       d365._map_load_count_path(text), d365._map_resolve_lookups()
    FROM PUBLIC;
REVOKE ALL ON PROCEDURE d365.d365_load(text) FROM PUBLIC;
