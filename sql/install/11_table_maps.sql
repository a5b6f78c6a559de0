-- Table maps: any PostgreSQL table <-> any Dataverse table.  The maps and
-- their columns, what Dynamics metadata says about each mapped field
-- (lookups, choices), the capture triggers, and the statements run as a
-- mapped table's owner (src/privilege/map_owner.c).  The sync itself is
-- 12_map_sync.sql and src/engines/table_maps.c, on the pipeline.  See
-- docs/table-maps.md.
-- ---------------------------------------------------------------------------

CREATE TABLE d365.table_map (
    name             text PRIMARY KEY
                     CONSTRAINT table_map_name_check CHECK (name ~ '^[a-z][a-z0-9_]{0,62}$'),
    local_table      regclass UNIQUE NOT NULL,
    entity_set       text NOT NULL
                     CONSTRAINT table_map_entity_set_check CHECK (entity_set ~ '^[A-Za-z][A-Za-z0-9_]*$'),
    key_column       name NOT NULL,
    direction        text NOT NULL DEFAULT 'both'
                     CONSTRAINT table_map_direction_check CHECK (direction IN ('both', 'in', 'out')),
    load             boolean NOT NULL DEFAULT false,
    on_local_delete  text NOT NULL DEFAULT 'unlink'
                     CONSTRAINT table_map_on_local_delete_check
                     CHECK (on_local_delete IN ('unlink', 'deactivate', 'delete')),
    on_remote_delete text NOT NULL DEFAULT 'unlink'
                     CONSTRAINT table_map_on_remote_delete_check
                     CHECK (on_remote_delete IN ('unlink', 'delete')),
    conflict         text NOT NULL DEFAULT 'dynamics_wins'
                     CONSTRAINT table_map_conflict_check
                     CHECK (conflict IN ('dynamics_wins', 'local_wins')),
    enabled          boolean NOT NULL DEFAULT true
);
COMMENT ON TABLE d365.table_map IS
    'Table maps: a local table synced with a Dataverse table (d365_map_table, d365_unmap_table)';
SELECT pg_catalog.pg_extension_config_dump('d365.table_map', '');

CREATE TABLE d365.column_map (
    map       text REFERENCES d365.table_map ON DELETE CASCADE,
    "column"  name,
    field     text NOT NULL
              CONSTRAINT column_map_field_check CHECK (field ~ '^[a-z][a-z0-9_]*$'),
    direction text NOT NULL DEFAULT 'both'
              CONSTRAINT column_map_direction_check CHECK (direction IN ('both', 'in', 'out')),
    match     boolean NOT NULL DEFAULT false,
    PRIMARY KEY (map, "column")
);
COMMENT ON TABLE d365.column_map IS
    'Columns of a table map and the Dataverse field (attribute logical name) each is synced with (d365_map_column)';
SELECT pg_catalog.pg_extension_config_dump('d365.column_map', '');

-- Per-row sync state of a map: the Dynamics record, what it holds as far
-- as d365sync knows (synced: {wire field: value}), changes not yet sent
-- (change_seq > synced_seq), failures and back-off.
CREATE TABLE d365.map_row (
    map              text NOT NULL REFERENCES d365.table_map ON DELETE CASCADE,
    row_key          text NOT NULL,
    dynamics_id      uuid,
    synced           jsonb,
    change_seq       bigint NOT NULL DEFAULT 0,
    synced_seq       bigint NOT NULL DEFAULT 0,
    generation       integer NOT NULL DEFAULT 0,
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    last_attempt_at  timestamptz,
    last_status      integer,
    last_error_code  text,
    last_error       text,
    remote_deleted_at timestamptz,
    PRIMARY KEY (map, row_key)
);
CREATE INDEX map_row_dynamics_idx ON d365.map_row (map, dynamics_id);
COMMENT ON TABLE d365.map_row IS
    'Sync state of each row of a table map: its Dynamics record, the values last synced, failures';
SELECT pg_catalog.pg_extension_config_dump('d365.map_row', '');

-- Keys noted by the capture triggers, folded into map_row by the next sync.
CREATE TABLE d365.map_change (
    map      text NOT NULL,
    keys     text[] NOT NULL,
    noted_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE d365.map_change IS
    'Keys of mapped rows changed since the last sync of their map (capture triggers)';
SELECT pg_catalog.pg_extension_config_dump('d365.map_change', '');

/*
 * A map by name, with a clear error when there is none.
 */
CREATE FUNCTION d365._table_map(map text)
RETURNS d365.table_map
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map;
BEGIN
    SELECT * INTO m FROM d365.table_map t WHERE t.name = map;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table map "%" does not exist', map
            USING ERRCODE = 'undefined_object',
                  HINT = 'SELECT name FROM d365.table_map lists the maps; d365_map_table() adds one.';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = m.local_table) THEN
        RAISE EXCEPTION 'the table of map "%" (OID %) was dropped', map, m.local_table::oid
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('SELECT d365_unmap_table(%L);', map);
    END IF;
    RETURN m;
END;
$$;

/*
 * The Dataverse table of an entity set (from the cached list of tables):
 * logical name, primary id attribute, change tracking.
 */
CREATE FUNCTION d365._map_entity(entity_set text,
    OUT logical_name text, OUT primary_id text, OUT change_tracking boolean)
RETURNS record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    SELECT e ->> 'LogicalName', e ->> 'PrimaryIdAttribute',
           coalesce((e ->> 'ChangeTrackingEnabled')::boolean, false)
      INTO logical_name, primary_id, change_tracking
      FROM d365._entities() e
     WHERE e ->> 'EntitySetName' = entity_set
       AND e ->> 'LogicalName' ~ '^[a-z][a-z0-9_]*$'
       AND e ->> 'PrimaryIdAttribute' ~ '^[a-z][a-z0-9_]*$';
    IF logical_name IS NULL THEN
        RAISE EXCEPTION 'Dynamics 365 has no table with entity set "%"', entity_set
            USING ERRCODE = 'undefined_object',
                  HINT = 'd365_tables() lists the tables and their entity sets (e.g. accounts, contacts, new_projects).';
    END IF;
END;
$$;

-- Forget the cached metadata of one Dataverse table (and the list of
-- tables), so that the next look-up reads it anew.
CREATE FUNCTION d365._map_metadata_refresh(entity text)
RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    DELETE FROM d365.metadata_cache c
     WHERE c.path LIKE 'EntityDefinitions(LogicalName=''' || entity || ''')%'
        OR c.path LIKE 'EntityDefinitions?%'
$$;

/*
 * What Dynamics metadata says about the attributes of a Dataverse table,
 * one row per attribute: its type ('MultiSelectPicklist' for a
 * multi-select choice), whether it can be written, its lookup targets with
 * the navigation property of each ({target: navigation property}, from
 * ManyToOneRelationships: case-sensitive for custom lookups), and the
 * options of a choice ([{value, label}]).  Cached (d365._get_cached).
 */
CREATE FUNCTION d365._map_attributes(entity text,
    OUT logical_name text, OUT attribute_type text, OUT valid_for_create boolean,
    OUT valid_for_update boolean, OUT navs jsonb, OUT options jsonb)
RETURNS SETOF record
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    WITH attrs AS (
        SELECT a FROM jsonb_array_elements(d365._get_cached(format(
                   'EntityDefinitions(LogicalName=''%s'')/Attributes?$select=LogicalName,AttributeType,AttributeTypeName,IsValidForCreate,IsValidForUpdate,Targets',
                   entity))) a),
    rels AS (
        SELECT r ->> 'ReferencingAttribute' AS attribute,
               jsonb_object_agg(r ->> 'ReferencedEntity',
                                r ->> 'ReferencingEntityNavigationPropertyName') AS navs
          FROM jsonb_array_elements(d365._get_cached(format(
                   'EntityDefinitions(LogicalName=''%s'')/ManyToOneRelationships?$select=ReferencingAttribute,ReferencedEntity,ReferencingEntityNavigationPropertyName',
                   entity))) r
         WHERE r ->> 'ReferencingEntityNavigationPropertyName' ~ '^[A-Za-z_][A-Za-z0-9_]*$'
         GROUP BY 1),
    multi AS (
        SELECT a ->> 'LogicalName' AS attribute,
               (SELECT jsonb_agg(jsonb_build_object(
                           'value', (o ->> 'Value')::integer,
                           'label', o #>> '{Label,UserLocalizedLabel,Label}')
                           ORDER BY (o ->> 'Value')::integer)
                  FROM jsonb_array_elements(coalesce(a #> '{OptionSet,Options}', '[]')) o) AS options
          FROM jsonb_array_elements(d365._get_cached(format(
                   'EntityDefinitions(LogicalName=''%s'')/Attributes/Microsoft.Dynamics.CRM.MultiSelectPicklistAttributeMetadata?$select=LogicalName&$expand=OptionSet',
                   entity))) a)
    SELECT x.a ->> 'LogicalName',
           CASE WHEN x.a #>> '{AttributeTypeName,Value}' = 'MultiSelectPicklistType'
                THEN 'MultiSelectPicklist' ELSE x.a ->> 'AttributeType' END,
           coalesce((x.a ->> 'IsValidForCreate')::boolean, false),
           coalesce((x.a ->> 'IsValidForUpdate')::boolean, false),
           r.navs,
           coalesce(m.options, c.options)
      FROM attrs x
      LEFT JOIN rels r ON r.attribute = x.a ->> 'LogicalName'
      LEFT JOIN multi m ON m.attribute = x.a ->> 'LogicalName'
      LEFT JOIN d365._choice_options(entity) c ON c.attribute = x.a ->> 'LogicalName'
$$;

/*
 * The map a column's foreign key points to: a single-column foreign key
 * from tbl.col to the key column of another mapped table.
 */
CREATE FUNCTION d365._map_fk_target(tbl regclass, col name)
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT t.name
      FROM pg_constraint k
      JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = k.conkey[1]
      JOIN d365.table_map t ON t.local_table = k.confrelid
      JOIN pg_attribute p ON p.attrelid = k.confrelid AND p.attnum = k.confkey[1]
     WHERE k.contype = 'f' AND k.conrelid = tbl AND cardinality(k.conkey) = 1
       AND a.attname = col AND p.attname = t.key_column
     ORDER BY t.name
     LIMIT 1
$$;

/*
 * The column map of a map as the sync uses it, one row per mapped column:
 *   kind      'value', 'lookup', 'choice' (a text column: labels),
 *             'choice_value' (an integer: values), 'multi' (text[]:
 *             labels), 'multi_value' (int[]: values)
 *   wire      the property sent and compared (<nav>@odata.bind for a lookup)
 *   read      the property read back (_<field>_value for a lookup)
 *   parent    the map a lookup points to (NULL: the column holds the
 *             Dynamics id itself), bind_set the entity set it binds to
 *   options   the choice's options [{value, label}]
 *   problem   why the pair cannot be synced (NULL when it can)
 */
CREATE FUNCTION d365._map_columns(map text,
    OUT "column" name, OUT field text, OUT direction text, OUT match boolean,
    OUT typ regtype, OUT kind text, OUT wire text, OUT read text,
    OUT parent text, OUT bind_set text, OUT options jsonb, OUT problem text)
RETURNS SETOF record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map := d365._table_map(map);
    ent record := d365._map_entity(m.entity_set);
    c record;
    a record;
    base regtype;
    elem regtype;
    pm d365.table_map;
    pent record;
    target text;
BEGIN
    FOR c IN SELECT cm.*, att.atttypid::regtype AS t, ty.typelem, ty.typbasetype
               FROM d365.column_map cm
               LEFT JOIN pg_attribute att ON att.attrelid = m.local_table
                    AND att.attname = cm."column" AND att.attnum > 0 AND NOT att.attisdropped
               LEFT JOIN pg_type ty ON ty.oid = att.atttypid
              WHERE cm.map = _map_columns.map
              ORDER BY cm."column" LOOP
        "column" := c."column"; field := c.field; direction := c.direction; match := c.match;
        typ := c.t; kind := 'value'; wire := c.field; read := c.field;
        parent := NULL; bind_set := NULL; options := NULL; problem := NULL;
        SELECT * INTO a FROM d365._map_attributes(ent.logical_name) x WHERE x.logical_name = c.field;
        base := CASE WHEN c.typbasetype <> 0 THEN c.typbasetype::regtype ELSE c.t END;
        elem := CASE WHEN c.typelem <> 0 AND c.t::text LIKE '%[]' THEN c.typelem::regtype END;
        IF c.t IS NULL THEN
            problem := format('column "%s" no longer exists in %s', c."column", m.local_table);
        ELSIF a.logical_name IS NULL THEN
            problem := format('Dynamics table %s has no attribute %s', ent.logical_name, c.field);
        ELSIF c.direction <> 'in' AND NOT (a.valid_for_create AND a.valid_for_update) THEN
            problem := format('attribute %s of %s cannot be written in Dynamics; map it with direction ''in''',
                              c.field, ent.logical_name);
        ELSIF a.attribute_type IN ('Lookup', 'Customer', 'Owner') THEN
            kind := 'lookup';
            read := '_' || c.field || '_value';
            parent := d365._map_fk_target(m.local_table, c."column");
            IF parent IS NOT NULL THEN
                SELECT * INTO pm FROM d365.table_map t WHERE t.name = parent;
                pent := d365._map_entity(pm.entity_set);
                target := pent.logical_name;
                bind_set := pm.entity_set;
            ELSIF base = 'uuid'::regtype AND jsonb_typeof(a.navs) = 'object'
                  AND (SELECT count(*) FROM jsonb_object_keys(a.navs)) = 1 THEN
                target := (SELECT k FROM jsonb_object_keys(a.navs) k);
                bind_set := d365._entity_set(target);
            ELSE
                problem := format('attribute %s is a lookup: map a column with a foreign key to the key of a mapped table%s',
                                  c.field, CASE WHEN (SELECT count(*) FROM jsonb_object_keys(coalesce(a.navs, '{}'))) = 1
                                                THEN ', or a uuid column holding the Dynamics id' ELSE '' END);
            END IF;
            IF problem IS NULL THEN
                IF a.navs ->> target IS NULL THEN
                    problem := format('attribute %s of %s cannot refer to %s (it refers to %s)',
                                      c.field, ent.logical_name, target,
                                      coalesce((SELECT string_agg(k, ', ' ORDER BY k) FROM jsonb_object_keys(a.navs) k), 'nothing'));
                ELSIF bind_set IS NULL THEN
                    problem := format('Dynamics table %s has no entity set', target);
                ELSE
                    wire := (a.navs ->> target) || '@odata.bind';
                END IF;
            END IF;
        ELSIF a.attribute_type IN ('Picklist', 'State', 'Status', 'MultiSelectPicklist') THEN
            options := coalesce(a.options, '[]');
            IF a.attribute_type = 'MultiSelectPicklist' THEN
                IF elem IN ('text'::regtype, 'character varying'::regtype) THEN
                    kind := 'multi';
                ELSIF elem IN ('smallint'::regtype, 'integer'::regtype, 'bigint'::regtype) THEN
                    kind := 'multi_value';
                ELSE
                    problem := format('attribute %s is a multi-select choice: map a text[] column (labels) or an integer[] column (values), not %s',
                                      c.field, c.t);
                END IF;
            ELSIF base IN ('text'::regtype, 'character varying'::regtype) THEN
                kind := 'choice';
            ELSIF base IN ('smallint'::regtype, 'integer'::regtype, 'bigint'::regtype) THEN
                kind := 'choice_value';
            ELSE
                problem := format('attribute %s is a choice: map a text column (labels) or an integer column (values), not %s',
                                  c.field, c.t);
            END IF;
        ELSE
            problem := d365._type_problem(a.attribute_type, format_type(base, NULL), false, c.field);
            IF problem IS NULL AND d365._json_expr('x', c.t) IS NULL THEN
                problem := format('column "%s" of type %s cannot be sent to Dynamics', c."column", c.t);
            END IF;
        END IF;
        IF problem IS NULL AND c.match AND (kind <> 'value' OR d365._match_type(c.t) IS NULL) THEN
            problem := format('a match column must hold text, a number, a boolean, a uuid or a date, not %s', c.t);
        END IF;
        RETURN NEXT;
    END LOOP;
END;
$$;

-- ---------------------------------------------------------------------------
-- Capture.  An INSERT, and an UPDATE of the key or of a column the map
-- sends, notes the row's key in d365.map_change (the next sync compares
-- each noted row with what Dynamics holds and sends only what differs):
-- C row triggers, the UPDATE one behind a WHEN clause on those columns, and
-- statement triggers that write a statement's keys (src/capture/map_capture.c,
-- 16_map_capture.sql).  DELETE and TRUNCATE (d365._map_capture(), below)
-- forget the rows' state; the Dynamics records stay (on_local_delete
-- 'unlink') or wait in d365.map_delete to be deactivated or deleted by the
-- next sync (13_map_delete.sql).  d365._map_capture() reads only the key
-- column of the statement's transition table, of a built-in type, and
-- refuses to run from any trigger but d365sync's own DELETE or TRUNCATE
-- trigger on a mapped table.
-- ---------------------------------------------------------------------------

CREATE FUNCTION d365._map_capture()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map;
    keys text[];
BEGIN
    SELECT * INTO m FROM d365.table_map t WHERE t.local_table = TG_RELID;
    IF NOT FOUND OR NOT EXISTS (
           SELECT FROM pg_trigger g
            WHERE g.tgrelid = TG_RELID AND g.tgname = TG_NAME
              AND g.tgfoid = 'd365._map_capture()'::regprocedure
              AND ((TG_OP = 'DELETE' AND g.tgname = 'd365_map_capture_delete'
                    AND g.tgoldtable = 'd365_rows')
                   OR (TG_OP = 'TRUNCATE' AND g.tgname = 'd365_map_capture_truncate'))) THEN
        RAISE EXCEPTION 'd365._map_capture() runs only as d365sync''s capture trigger of a mapped table'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF TG_OP = 'TRUNCATE' THEN
        -- the records of the rows linked as far as the sync state knows
        IF m.on_local_delete <> 'unlink' AND m.direction <> 'in' THEN
            INSERT INTO d365.map_delete (map, dynamics_id, row_key, action)
            SELECT m.name, r.dynamics_id, r.row_key, m.on_local_delete
              FROM d365.map_row r WHERE r.map = m.name AND r.dynamics_id IS NOT NULL
            ON CONFLICT ON CONSTRAINT map_delete_pkey DO NOTHING;
        END IF;
        DELETE FROM d365.map_row r WHERE r.map = m.name;
        DELETE FROM d365.map_change q WHERE q.map = m.name;
        RETURN NULL;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_attribute a
                    WHERE a.attrelid = TG_RELID AND a.attname = m.key_column
                      AND NOT a.attisdropped AND a.atttypid = ANY (d365._key_types())) THEN
        RETURN NULL;        -- broken map: d365_sync() reports it
    END IF;
    EXECUTE format('SELECT array_agg(DISTINCT r.%1$I::text) FROM d365_rows r WHERE r.%1$I IS NOT NULL',
                   m.key_column) INTO keys;
    IF keys IS NULL THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN        -- (always: checked above)
        -- on_local_delete deactivate/delete: the deleted rows' records wait
        -- in d365.map_delete until Dynamics has done it.  The record is the
        -- one d365sync linked the row to (d365.map_row), never what the
        -- deleted row's link column held: a link written past the guard
        -- must not have d365sync delete another row's record.
        IF m.on_local_delete <> 'unlink' AND m.direction <> 'in' THEN
            INSERT INTO d365.map_delete (map, dynamics_id, row_key, action)
            SELECT m.name, r.dynamics_id, r.row_key, m.on_local_delete
              FROM d365.map_row r
             WHERE r.map = m.name AND r.row_key = ANY (keys) AND r.dynamics_id IS NOT NULL
            ON CONFLICT ON CONSTRAINT map_delete_pkey DO NOTHING;
        END IF;
        DELETE FROM d365.map_row r WHERE r.map = m.name AND r.row_key = ANY (keys);
    END IF;
    -- the background worker sends it after COMMIT (with realtime on)
    PERFORM d365._worker_wake(false);
    RETURN NULL;
END;
$$;

-- The statements that (re)create the capture triggers of a mapped table and
-- the guard of its link columns (src/capture/link_guard.c: only d365sync's own link
-- writer may set them); d365._map_capture_install() runs them.  The WHEN
-- clause of d365_map_capture_update lists the key and the mapped columns
-- that are sent (direction both or out) and exist, compared by their
-- binary images (pg_catalog.record_image_eq(ROW(OLD...), ROW(NEW...)), the
-- function of the operator *=, called as a function: pg_dump prints the
-- operator between ROW()s as a row-wise comparison): a type's own equality
-- calls values equal that are sent differently, such as 'abc' and 'ABC'
-- under a case-insensitive collation or in citext, and runs no code of the
-- type's.  An UPDATE of other columns costs no trigger call.  The clause
-- follows the column map (d365._column_map_changed,
-- 16_map_capture.sql).  The row triggers' arguments are the key's attribute
-- number and name.  A trigger of an earlier form under the same name (a
-- statement trigger with a transition table) is dropped first.
CREATE FUNCTION d365._map_capture_sql(tbl regclass)
RETURNS text[]
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map;
    key_num smallint;
    changed text;
    stale text[];
BEGIN
    SELECT * INTO m FROM d365.table_map t WHERE t.local_table = tbl AND t.name <> 'contact';
    SELECT a.attnum INTO key_num FROM pg_attribute a
     WHERE a.attrelid = tbl AND a.attname = m.key_column AND a.attnum > 0 AND NOT a.attisdropped;
    IF key_num IS NULL THEN
        RAISE EXCEPTION 'the key column "%" of map "%" is not a column of %', m.key_column, m.name, tbl
            USING ERRCODE = 'undefined_column',
                  HINT = format('Unmap the table (d365_unmap_table(%L)) and map it again naming its key.', m.name);
    END IF;
    SELECT format('NOT pg_catalog.record_image_eq(ROW(%s), ROW(%s))',
                  string_agg(format('OLD.%I', a.attname), ', ' ORDER BY a.attnum),
                  string_agg(format('NEW.%I', a.attname), ', ' ORDER BY a.attnum))
      INTO changed
      FROM pg_attribute a
     WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped
       AND (a.attnum = key_num
            OR a.attname IN (SELECT c."column" FROM d365.column_map c
                              WHERE c.map = m.name AND c.direction <> 'in'));
    SELECT array_agg(format('DROP TRIGGER %I ON %s', g.tgname, tbl) ORDER BY g.tgname) INTO stale
      FROM pg_trigger g
     WHERE g.tgrelid = tbl AND g.tgname IN ('d365_map_capture_insert', 'd365_map_capture_update')
       AND g.tgfoid = 'd365._map_capture()'::regprocedure;
    RETURN coalesce(stale, '{}') || ARRAY[
        format('CREATE OR REPLACE TRIGGER d365_map_capture_insert AFTER INSERT ON %s FOR EACH ROW'
               ' EXECUTE FUNCTION d365._map_capture_row(%L, %L)', tbl, key_num, m.key_column),
        format('CREATE OR REPLACE TRIGGER d365_map_capture_update AFTER UPDATE ON %s FOR EACH ROW'
               ' WHEN (%s) EXECUTE FUNCTION d365._map_capture_row(%L, %L)',
               tbl, changed, key_num, m.key_column),
        format('CREATE OR REPLACE TRIGGER d365_map_capture_insert_flush AFTER INSERT ON %s'
               ' FOR EACH STATEMENT EXECUTE FUNCTION d365._map_capture_flush()', tbl),
        format('CREATE OR REPLACE TRIGGER d365_map_capture_update_flush AFTER UPDATE ON %s'
               ' FOR EACH STATEMENT EXECUTE FUNCTION d365._map_capture_flush()', tbl),
        format('CREATE OR REPLACE TRIGGER d365_map_capture_delete AFTER DELETE ON %s'
               ' REFERENCING OLD TABLE AS d365_rows FOR EACH STATEMENT'
               ' EXECUTE FUNCTION d365._map_capture()', tbl),
        format('CREATE OR REPLACE TRIGGER d365_map_capture_truncate AFTER TRUNCATE ON %s'
               ' FOR EACH STATEMENT EXECUTE FUNCTION d365._map_capture()', tbl),
        format('CREATE OR REPLACE TRIGGER d365_link_guard AFTER INSERT ON %s FOR EACH ROW'
               ' WHEN (NEW.dynamics365_related_id IS NOT NULL'
               '       OR NEW.dynamics365_synchronized_on IS NOT NULL)'
               ' EXECUTE FUNCTION d365._contact_link_guard()', tbl),
        format('CREATE OR REPLACE TRIGGER d365_link_guard_update'
               ' AFTER UPDATE OF dynamics365_related_id, dynamics365_synchronized_on ON %s FOR EACH ROW'
               ' WHEN ((NEW.dynamics365_related_id IS NOT NULL'
               '        AND NEW.dynamics365_related_id IS DISTINCT FROM OLD.dynamics365_related_id)'
               '       OR (NEW.dynamics365_synchronized_on IS NOT NULL'
               '        AND NEW.dynamics365_synchronized_on IS DISTINCT FROM OLD.dynamics365_synchronized_on))'
               ' EXECUTE FUNCTION d365._contact_link_guard()', tbl)];
END;
$$;
REVOKE ALL ON FUNCTION d365._map_capture_sql(regclass) FROM PUBLIC;

-- (Re)creates the capture triggers of a map: the statements of
-- d365._map_capture_sql(), run as the owner of schema d365 (the only role
-- that may use the trigger functions) once tbl is found to be a mapped
-- table that the caller owns (src/capture/capture_guard.c).
CREATE FUNCTION d365._map_capture_install(tbl regclass)
RETURNS void
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_map_capture_install'
LANGUAGE C;

CREATE FUNCTION d365.d365_map_table(
    name text, local_table regclass, entity_set text, key_column name DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    key name := key_column;
    ent record;
    bad text;
BEGIN
    IF name IS NULL OR name !~ '^[a-z][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'invalid map name %', coalesce(quote_literal(name), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A map is named in lowercase letters, digits and underscores, e.g. account.';
    END IF;
    IF name = 'contact' THEN
        RAISE EXCEPTION 'the map name "contact" is the attached contact table''s'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Attach the contact table with d365_attach_contacts(); name other maps otherwise.';
    END IF;
    IF local_table IS NULL OR entity_set IS NULL THEN
        RAISE EXCEPTION 'a table map needs a local table and an entity set'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = local_table) NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table', local_table
            USING ERRCODE = 'wrong_object_type',
                  HINT = 'Map an ordinary or partitioned table, not a view or a foreign table.';
    END IF;
    IF NOT pg_has_role((SELECT c.relowner FROM pg_class c WHERE c.oid = local_table), 'USAGE') THEN
        RAISE EXCEPTION 'must be the owner of % to map it', local_table
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Map the table as its owner, or as a member of its owning role.';
    END IF;
    IF local_table = (SELECT s.contact_table FROM d365.contact_source s) THEN
        RAISE EXCEPTION '% is the attached contact table', local_table
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'The contact table is synced by the contact engine (map "contact").';
    END IF;
    -- no ALTER TABLE between the checks and the map
    EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', local_table);
    IF key IS NULL THEN
        SELECT a.attname INTO key
          FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
         WHERE i.indrelid = local_table AND i.indisprimary AND i.indnatts = 1;
        IF key IS NULL THEN
            RAISE EXCEPTION '% has no single-column primary key', local_table
                USING ERRCODE = 'invalid_table_definition',
                      HINT = 'Pass the key column: d365_map_table(name, table, entity_set, key_column).';
        END IF;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_index i JOIN pg_attribute a
                            ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                    WHERE i.indrelid = local_table AND i.indisunique AND i.indnatts = 1
                      AND i.indpred IS NULL AND a.attname = key) THEN
        RAISE EXCEPTION 'column "%" of % is not a unique key', key, local_table
            USING ERRCODE = 'invalid_table_definition',
                  HINT = 'The key column needs a PRIMARY KEY or UNIQUE constraint of its own.';
    END IF;
    PERFORM d365._check_key_type(local_table, key);
    ent := d365._map_entity(entity_set);

    IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = local_table
                      AND attname = 'dynamics365_related_id' AND NOT attisdropped) THEN
        EXECUTE format('ALTER TABLE %s ADD COLUMN dynamics365_related_id uuid', local_table);
    END IF;
    IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = local_table
                      AND attname = 'dynamics365_synchronized_on' AND NOT attisdropped) THEN
        EXECUTE format('ALTER TABLE %s ADD COLUMN dynamics365_synchronized_on timestamptz', local_table);
    END IF;
    -- link columns that were there already are of the table owner's making:
    -- d365's statements compare them, so they must be the built-in types
    SELECT string_agg(format('%s is %s', a.attname, format_type(a.atttypid, a.atttypmod)), ', ') INTO bad
      FROM pg_attribute a
     WHERE a.attrelid = local_table AND NOT a.attisdropped
       AND ((a.attname = 'dynamics365_related_id' AND a.atttypid <> 'uuid'::regtype)
            OR (a.attname = 'dynamics365_synchronized_on' AND a.atttypid <> 'timestamptz'::regtype));
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'cannot map %: %', local_table, bad
            USING ERRCODE = 'datatype_mismatch',
                  HINT = 'd365sync adds the link columns dynamics365_related_id uuid and dynamics365_synchronized_on timestamptz itself; drop or convert columns of other types.';
    END IF;
    -- one row per Dynamics record; unlinked rows are not in the index, so
    -- inserting them and updating them outside HOT costs the application
    -- nothing more (an index without the predicate, of an earlier version or
    -- the owner's, does as well)
    IF NOT d365._link_index_exists(local_table) THEN
        EXECUTE format('CREATE UNIQUE INDEX ON %s (dynamics365_related_id)'
                       ' WHERE dynamics365_related_id IS NOT NULL', local_table);
    END IF;

    INSERT INTO d365.table_map AS t (name, local_table, entity_set, key_column)
    VALUES (d365_map_table.name, local_table, entity_set, key);
    -- rows linked before (by hand, or by an earlier map) are linked by
    -- whoever maps the table: their state names their record and starts
    -- without a snapshot, so the first sync sends every mapped value.  A
    -- link that appears later without d365sync writing it is never used.
    EXECUTE format('INSERT INTO d365.map_row (map, row_key, dynamics_id)'
                   ' SELECT $1, t.%1$I::pg_catalog.text, t.dynamics365_related_id FROM %2$s t'
                   '  WHERE t.dynamics365_related_id IS NOT NULL AND t.%1$I IS NOT NULL',
                   key, local_table) USING d365_map_table.name;
    PERFORM d365._map_capture_install(local_table);
END;
$$;
COMMENT ON FUNCTION d365.d365_map_table(text, regclass, text, name) IS
    'Maps a local table to a Dataverse table (entity set): adds the link columns, their unique index and the capture triggers';

CREATE FUNCTION d365.d365_unmap_table(name text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map;
    trg name;
BEGIN
    SELECT * INTO m FROM d365.table_map t WHERE t.name = d365_unmap_table.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table map "%" does not exist', name
            USING ERRCODE = 'undefined_object';
    END IF;
    IF m.name = 'contact' THEN
        RAISE EXCEPTION 'the table map "contact" is the attached contact table'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'd365_detach_contacts() removes it.';
    END IF;
    IF EXISTS (SELECT FROM pg_class c WHERE c.oid = m.local_table) THEN
        IF NOT pg_has_role((SELECT c.relowner FROM pg_class c WHERE c.oid = m.local_table), 'USAGE') THEN
            RAISE EXCEPTION 'must be the owner of % to unmap it', m.local_table
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        FOR trg IN SELECT g.tgname FROM pg_trigger g
                    WHERE g.tgrelid = m.local_table
                      AND g.tgfoid IN ('d365._map_capture()'::regprocedure,
                                       'd365._map_capture_row()'::regprocedure,
                                       'd365._map_capture_flush()'::regprocedure,
                                       'd365._contact_link_guard()'::regprocedure) LOOP
            EXECUTE format('DROP TRIGGER %I ON %s', trg, m.local_table);
        END LOOP;
    END IF;
    DELETE FROM d365.map_change q WHERE q.map = m.name;
    DELETE FROM d365.pull_state p WHERE p.entity = 'map:' || m.name;
    DELETE FROM d365.load_state l WHERE l.entity = 'map:' || m.name;
    DELETE FROM d365.table_map t WHERE t.name = m.name;
END;
$$;
COMMENT ON FUNCTION d365.d365_unmap_table(text) IS
    'Removes a table map, its column map, sync state and capture triggers; the link columns and their values stay';

CREATE FUNCTION d365.d365_map_column(
    map text, "column" name, field text, direction text DEFAULT 'both',
    match boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map := d365._table_map(map);
    ent record;
    problem text;
BEGIN
    IF NOT pg_has_role((SELECT c.relowner FROM pg_class c WHERE c.oid = m.local_table), 'USAGE') THEN
        RAISE EXCEPTION 'must be the owner of % to map its columns', m.local_table
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF "column" IN (m.key_column, 'dynamics365_related_id', 'dynamics365_synchronized_on') THEN
        RAISE EXCEPTION 'column "%" cannot be mapped', "column"
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'The key and the link columns belong to the map itself.';
    END IF;
    IF direction IS NULL OR direction NOT IN ('both', 'in', 'out') THEN
        RAISE EXCEPTION 'direction must be both, in or out'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF m.name = 'contact' THEN
        -- the contact table's column map is its field map
        PERFORM d365._contact_map_column("column", field, direction, match);
        RETURN;
    END IF;
    ent := d365._map_entity(m.entity_set);
    INSERT INTO d365.column_map AS c (map, "column", field, direction, match)
    VALUES (m.name, "column", field, direction, coalesce(match, false))
    ON CONFLICT ON CONSTRAINT column_map_pkey DO UPDATE
       SET field = EXCLUDED.field, direction = EXCLUDED.direction, match = EXCLUDED.match;
    SELECT x.problem INTO problem FROM d365._map_columns(m.name) x WHERE x."column" = d365_map_column."column";
    IF problem LIKE 'Dynamics table % has no attribute %' THEN
        -- a field added in Dynamics since the metadata was read
        PERFORM d365._map_metadata_refresh(ent.logical_name);
        SELECT x.problem INTO problem FROM d365._map_columns(m.name) x WHERE x."column" = d365_map_column."column";
    END IF;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'cannot map column "%" to %: %', "column", field, problem
            USING ERRCODE = 'datatype_mismatch',
                  HINT = format('d365_describe(%L) lists the attributes of %s.', ent.logical_name, ent.logical_name);
    END IF;
    PERFORM d365._map_lookup_readable(x.parent, d365_map_column."column")
       FROM d365._map_columns(m.name) x
      WHERE x."column" = d365_map_column."column" AND x.parent IS NOT NULL;
    -- the next sync compares every linked row with what it sent
    UPDATE d365.map_row r SET synced = NULL WHERE r.map = m.name AND r.synced IS NOT NULL;
END;
$$;
COMMENT ON FUNCTION d365.d365_map_column(text, name, text, text, boolean) IS
    'Maps a column of a table map to a Dataverse field (checked against Dynamics metadata): lookups, choices and multi-select choices included';

-- ---------------------------------------------------------------------------
-- Statements run as a mapped table's owner (src/privilege/map_owner.c), as
-- d365._owner_sql does for the contact table:
--   links  $1 text[] keys, $2 uuid[] ids, $3 uuid[] expected current links
--          (NULL: still unlinked); returns the keys changed
--   apply  $1 jsonb {column: value}, $2 text key: the update
--   remove $1 text key: deletes the row if it is unlinked; returns the key
-- ---------------------------------------------------------------------------

CREATE FUNCTION d365._map_owner_sql(map text, op text, only_columns name[],
    OUT sql text, OUT tbl regclass, OUT columns name[])
RETURNS record
LANGUAGE plpgsql STABLE
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    m d365.table_map := d365._table_map(map);
    key_type text;
    col name;
BEGIN
    tbl := m.local_table;
    SELECT format_type(a.atttypid, a.atttypmod) INTO key_type
      FROM pg_attribute a WHERE a.attrelid = tbl AND a.attname = m.key_column;
    IF op = 'links' THEN
        columns := '{dynamics365_related_id,dynamics365_synchronized_on}';
        sql := format('WITH u AS (UPDATE %1$s t'
                      '   SET dynamics365_related_id = u.id,'
                      '       dynamics365_synchronized_on = CASE WHEN u.id IS NULL THEN NULL'
                      '                                         ELSE pg_catalog.now() END'
                      '  FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]),'
                      '                  pg_catalog.unnest($2::pg_catalog.uuid[]),'
                      '                  pg_catalog.unnest($3::pg_catalog.uuid[])) u(k, id, expect)'
                      ' WHERE t.%2$I OPERATOR(pg_catalog.=) u.k::%3$s'
                      '   AND t.dynamics365_related_id IS NOT DISTINCT FROM u.expect'
                      ' RETURNING t.%2$I::pg_catalog.text AS k)'
                      ' SELECT pg_catalog.array_agg(k) FROM u',
                      tbl, m.key_column, key_type);
    ELSIF op = 'apply' THEN
        columns := coalesce(only_columns, '{}');
        IF columns = '{}' THEN
            RAISE EXCEPTION 'no column to write'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        FOREACH col IN ARRAY columns LOOP
            IF col IS NULL OR NOT EXISTS (SELECT FROM d365.column_map c
                                           WHERE c.map = m.name AND c."column" = col
                                             AND c.direction <> 'out') THEN
                RAISE EXCEPTION 'column "%" of % is not mapped for incoming changes', col, tbl
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
        END LOOP;
        sql := format('UPDATE %1$s t SET (%2$s) = (SELECT %3$s FROM pg_catalog.jsonb_to_record($1) AS r(%6$s))'
                      ' WHERE t.%4$I OPERATOR(pg_catalog.=) $2::%5$s',
                      tbl,
                      (SELECT string_agg(format('%I', c), ', ') FROM unnest(columns) c),
                      (SELECT string_agg(format('r.%I', c), ', ') FROM unnest(columns) c),
                      m.key_column, key_type, d365._column_defs(tbl, columns));
    ELSIF op = 'remove' THEN
        -- $1 text key: the row, only while it is unlinked (a record deleted
        -- in Dynamics, on_remote_delete 'delete'); returns the key deleted
        columns := NULL;
        sql := format('DELETE FROM %1$s t WHERE t.%2$I OPERATOR(pg_catalog.=) $1::%3$s'
                      '   AND t.dynamics365_related_id IS NULL'
                      ' RETURNING t.%2$I::pg_catalog.text',
                      tbl, m.key_column, key_type);
    ELSE
        RAISE EXCEPTION 'unknown table-owner operation "%"', op
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
END;
$$;

CREATE FUNCTION d365._map_own_write(tbl regclass)
RETURNS boolean
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_map_own_write'
LANGUAGE C VOLATILE STRICT;

CREATE FUNCTION d365._map_set_links(map text, keys text[], ids uuid[], expect uuid[])
RETURNS text[]
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_map_set_links'
LANGUAGE C VOLATILE;

CREATE FUNCTION d365._map_apply(map text, vals jsonb, row_key text)
RETURNS void
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_map_apply'
LANGUAGE C VOLATILE;

-- ---------------------------------------------------------------------------
