-- Dynamics metadata, cached
-- ---------------------------------------------------------------------------

CREATE TABLE d365.metadata_cache (
    path       text PRIMARY KEY,
    fetched_at timestamptz NOT NULL,
    body       jsonb NOT NULL
);
COMMENT ON TABLE d365.metadata_cache IS
    'Web API metadata responses, kept for an hour; DELETE FROM d365.metadata_cache to fetch them again';
-- dumped with the configuration: a restored database's next sync finds
-- the metadata its source had, and sends no request for it
SELECT pg_catalog.pg_extension_config_dump('d365.metadata_cache', '');

-- GET a Web API path (relative to the service root), following every
-- @odata.nextLink; one row per element of "value" (or the body itself).
CREATE FUNCTION d365._get_all(path text)
RETURNS SETOF jsonb
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_get_all'
LANGUAGE C VOLATILE STRICT;

CREATE FUNCTION d365._get_cached(path text)
RETURNS jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    result jsonb;
BEGIN
    SELECT c.body INTO result FROM d365.metadata_cache c
     WHERE c.path = _get_cached.path AND c.fetched_at > now() - interval '1 hour';
    IF FOUND THEN
        RETURN result;
    END IF;
    -- fetched and kept by d365sync's own write (14_state_guard.sql)
    RETURN d365._metadata_store(path);
END;
$$;

CREATE FUNCTION d365._metadata(entity text)
RETURNS SETOF jsonb
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF entity IS NULL OR entity !~ '^[a-z][a-z0-9_]*$' THEN
        RAISE EXCEPTION 'invalid entity logical name %', coalesce(quote_literal(entity), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Entities are named by their lowercase logical name, e.g. contact or new_pageview.';
    END IF;
    RETURN QUERY SELECT jsonb_array_elements(d365._get_cached(format(
        'EntityDefinitions(LogicalName=''%s'')/Attributes?$select=LogicalName,AttributeType,IsValidForCreate,IsValidForUpdate,DisplayName',
        entity)));
END;
$$;

CREATE FUNCTION d365._entity_set(entity text)
RETURNS text
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT e ->> 'EntitySetName'
      FROM jsonb_array_elements(d365._get_cached(
               'EntityDefinitions?$select=LogicalName,EntitySetName,IsActivity')) e
     WHERE e ->> 'LogicalName' = entity
       AND e ->> 'EntitySetName' ~ '^[A-Za-z0-9_]+$'
$$;

-- Lookup mappings: the entity set each <lookup>_<target>@odata.bind points
-- to, from Dynamics metadata (fetched only when a lookup is mapped).
CREATE FUNCTION d365._lookup_binds(OUT dynamics_field text, OUT entity_set text, OUT attribute text)
RETURNS SETOF record
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    f record;
    nav text;
    target text;
BEGIN
    FOR f IN SELECT m.dynamics_field FROM d365.field_map m
              WHERE m.dynamics_field LIKE '%@odata.bind' LOOP
        nav := split_part(f.dynamics_field, '@', 1);
        target := NULL;
        SELECT t, a ->> 'LogicalName' INTO target, attribute
          FROM d365._metadata('contact') a,
               LATERAL jsonb_array_elements_text(coalesce(a -> 'Targets', '[]')) t
         WHERE nav = (a ->> 'LogicalName') || '_' || t
            OR (nav = a ->> 'LogicalName' AND jsonb_array_length(a -> 'Targets') = 1)
         LIMIT 1;
        IF target IS NULL THEN
            RAISE EXCEPTION 'Dynamics field "%" is not a lookup of contact', f.dynamics_field
                USING ERRCODE = 'undefined_object',
                      HINT = 'Use <lookup attribute>_<target entity>@odata.bind, e.g. parentcustomerid_account@odata.bind.';
        END IF;
        dynamics_field := f.dynamics_field;
        entity_set := d365._entity_set(target);
        RETURN NEXT;
    END LOOP;
END;
$$;

CREATE FUNCTION d365.d365_dynamics_fields(
    entity text DEFAULT 'contact',
    OUT logical_name text, OUT display_name text, OUT attribute_type text,
    OUT valid_for_create boolean, OUT valid_for_update boolean)
RETURNS SETOF record
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT a ->> 'LogicalName',
           a #>> '{DisplayName,UserLocalizedLabel,Label}',
           a ->> 'AttributeType',
           (a ->> 'IsValidForCreate')::boolean,
           (a ->> 'IsValidForUpdate')::boolean
      FROM d365._metadata(entity) a
     ORDER BY 1
$$;
COMMENT ON FUNCTION d365.d365_dynamics_fields(text) IS
    'Attributes of a Dynamics entity, from Web API metadata (cached for an hour)';

CREATE FUNCTION d365._type_problem(atype text, ctype text, is_bind boolean, name text)
RETURNS text
SET search_path = pg_catalog, pg_temp
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE
        WHEN is_bind AND atype NOT IN ('Lookup', 'Customer', 'Owner')
            THEN format('attribute %s is %s, not a lookup', name, atype)
        WHEN is_bind AND ctype NOT IN ('uuid', 'text', 'character varying')
            THEN format('a lookup takes a GUID but the column is %s', ctype)
        WHEN is_bind THEN NULL
        WHEN atype IN ('Lookup', 'Customer', 'Owner')
            THEN format('attribute %s is a lookup: map it as %s_<target>@odata.bind', name, name)
        WHEN atype IN ('Virtual', 'PartyList', 'EntityName', 'CalendarRules', 'ManagedProperty')
            THEN format('attribute %s (%s) cannot be written', name, atype)
        WHEN atype IN ('String', 'Memo')
             AND ctype NOT IN ('text', 'character varying', 'character', 'name', 'uuid')
             AND ctype NOT LIKE 'character%'
            THEN format('attribute %s is text but the column is %s', name, ctype)
        WHEN atype IN ('Integer', 'BigInt', 'Picklist', 'State', 'Status')
             AND ctype NOT IN ('smallint', 'integer', 'bigint')
            THEN format('attribute %s takes an integer but the column is %s', name, ctype)
        WHEN atype IN ('Decimal', 'Double', 'Money')
             AND ctype NOT IN ('smallint', 'integer', 'bigint', 'numeric', 'real', 'double precision')
             AND ctype NOT LIKE 'numeric%'
            THEN format('attribute %s takes a number but the column is %s', name, ctype)
        WHEN atype = 'Boolean' AND ctype <> 'boolean'
            THEN format('attribute %s takes a boolean but the column is %s', name, ctype)
        WHEN atype = 'DateTime'
             AND ctype NOT IN ('date', 'timestamp with time zone', 'timestamp without time zone')
            THEN format('attribute %s takes a date or time but the column is %s', name, ctype)
        WHEN atype = 'Uniqueidentifier' AND ctype NOT IN ('uuid', 'text')
            THEN format('attribute %s takes a GUID but the column is %s', name, ctype)
    END
$$;

CREATE FUNCTION d365.d365_validate_mapping(
    OUT column_name name, OUT dynamics_field text, OUT problem text)
RETURNS SETOF record
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH meta AS (SELECT a ->> 'LogicalName' AS name, a ->> 'AttributeType' AS atype,
                         (a ->> 'IsValidForCreate')::boolean AS cre,
                         (a ->> 'IsValidForUpdate')::boolean AS upd,
                         coalesce(a -> 'Targets', '[]') AS targets
                    FROM d365._metadata('contact') a),
         maps AS (SELECT f.column_name, f.dynamics_field, f.direction,
                         split_part(f.dynamics_field, '@', 1) AS nav,
                         f.dynamics_field LIKE '%@odata.bind' AS is_bind,
                         -- a domain is judged by its base type, an enum and citext are sent as text;
                         -- a lookup from a foreign key is sent as the referenced row's record id
                         CASE WHEN b.oid IS NULL THEN NULL
                              WHEN f.dynamics_field LIKE '%@odata.bind'
                                   AND EXISTS (SELECT FROM pg_constraint k
                                                WHERE k.contype = 'f' AND k.conrelid = s.contact_table
                                                  AND k.conkey = ARRAY[a.attnum]) THEN 'uuid'
                              WHEN b.typtype = 'e' OR d365._text_like(b.oid::regtype) THEN 'text'
                              ELSE format_type(b.oid, NULL) END AS ctype
                    FROM d365.field_map f
                    CROSS JOIN d365.contact_source s
                    LEFT JOIN pg_attribute a ON a.attrelid = s.contact_table
                         AND a.attname = f.column_name AND a.attnum > 0 AND NOT a.attisdropped
                    LEFT JOIN pg_type t ON t.oid = a.atttypid
                    LEFT JOIN pg_type b ON b.oid = coalesce(nullif(t.typbasetype, 0), t.oid)),
         matched AS (SELECT m.*, x.name, x.atype, x.cre, x.upd
                       FROM maps m
                       LEFT JOIN LATERAL (
                           SELECT meta.* FROM meta
                            WHERE (NOT m.is_bind AND meta.name = m.nav)
                               OR (m.is_bind AND (m.nav = meta.name
                                   OR EXISTS (SELECT FROM jsonb_array_elements_text(meta.targets) t
                                               WHERE m.nav = meta.name || '_' || t)))
                            LIMIT 1) x ON true),
         judged AS (SELECT column_name, dynamics_field,
                           CASE
                             WHEN ctype IS NULL THEN 'the column no longer exists'
                             WHEN name IS NULL THEN 'no such attribute in Dynamics'
                             -- an 'in' field is only read: whether it can be written does not matter
                             WHEN direction = 'in' THEN d365._type_problem(atype, ctype, is_bind, name)
                             WHEN NOT cre AND NOT upd THEN format('attribute %s is read-only in Dynamics', name)
                             WHEN NOT upd THEN format('attribute %s can be set on create only, so changes would fail', name)
                             WHEN NOT cre THEN format('attribute %s cannot be set on create', name)
                             ELSE d365._type_problem(atype, ctype, is_bind, name)
                           END AS problem
                      FROM matched)
    SELECT column_name, dynamics_field, problem FROM judged
     WHERE problem IS NOT NULL
     ORDER BY column_name
$$;
COMMENT ON FUNCTION d365.d365_validate_mapping() IS
    'Mappings whose Dynamics field does not exist, is not writable, or does not fit the column''s type';

CREATE FUNCTION d365.d365_owners(
    OUT kind text, OUT id uuid, OUT name text, OUT email text, OUT bind text)
RETURNS SETOF record
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM (
        SELECT 'user' AS kind, (u ->> 'systemuserid')::uuid AS id, u ->> 'fullname' AS name,
               u ->> 'internalemailaddress' AS email,
               '/systemusers(' || (u ->> 'systemuserid') || ')' AS bind
          FROM d365._get_all('systemusers?$select=systemuserid,fullname,internalemailaddress,accessmode,isdisabled') u
         WHERE coalesce((u ->> 'accessmode')::int, 0) < 4
           AND NOT coalesce((u ->> 'isdisabled')::boolean, false)
        UNION ALL
        SELECT 'team', (t ->> 'teamid')::uuid, t ->> 'name', NULL, '/teams(' || (t ->> 'teamid') || ')'
          FROM d365._get_all('teams?$select=teamid,name,teamtype') t) o
     ORDER BY kind DESC, name
$$;
COMMENT ON FUNCTION d365.d365_owners() IS
    'Dynamics users (interactive ones) and teams that can own synced records, with the bind path for default_owner';

/*
 * The maximum length of the text attributes (String and Memo) of an entity,
 * {logical name: MaxLength}.  refresh = true reads them through the metadata
 * cache (fetched when older than an hour), as the check of a field map
 * written does.  refresh = false reads the cache whatever its age (a field's
 * length rarely changes) and never sends a request, as the sync does; '{}'
 * when they were never fetched.  What Dynamics sends is data: a MaxLength
 * that is not a small whole number is left out.
 */
CREATE FUNCTION d365._max_lengths(entity text, refresh boolean)
RETURNS jsonb
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    paths text[];
    result jsonb;
BEGIN
    IF entity IS NULL OR entity !~ '^[a-z][a-z0-9_]*$' THEN
        RAISE EXCEPTION 'invalid entity logical name %', coalesce(quote_literal(entity), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    paths := ARRAY(SELECT format('EntityDefinitions(LogicalName=''%s'')/Attributes/Microsoft.Dynamics.CRM.%s?$select=LogicalName,MaxLength',
                                 entity, t)
                     FROM unnest(ARRAY['StringAttributeMetadata', 'MemoAttributeMetadata']) t);
    IF refresh THEN
        PERFORM d365._get_cached(p) FROM unnest(paths) p;
    END IF;
    SELECT coalesce(jsonb_object_agg(a ->> 'LogicalName', (a ->> 'MaxLength')::integer), '{}')
      INTO result
      FROM d365.metadata_cache c,
           LATERAL jsonb_array_elements(CASE WHEN jsonb_typeof(c.body) = 'array' THEN c.body ELSE '[]' END) a
     WHERE c.path = ANY (paths)
       AND jsonb_typeof(a) = 'object'
       AND a ->> 'LogicalName' IS NOT NULL
       AND a ->> 'MaxLength' ~ '^[0-9]{1,9}$';
    RETURN result;
END;
$$;

/*
 * The check of a field map row against Dynamics metadata, when it is
 * written (d365._field_map_check): the attribute must exist on contact, be
 * writable when the column is sent, and take the column's type
 * (d365._type_problem, as d365_validate_mapping() judges it); otherwise the
 * write is refused.  A column declared longer than the attribute's maximum
 * length (varchar(200) to a field of 50) gets a WARNING: its longer values
 * fail their contact before sending.  Nothing is checked while d365sync is
 * not configured (a restore loads the map before the settings); when the
 * metadata cannot be read (Dynamics unreachable) the row is accepted with a
 * WARNING, and d365_validate_mapping() checks it later.  SECURITY DEFINER:
 * the metadata is read with the settings' credentials, which the writer of
 * the map need not be able to read.
 */
CREATE FUNCTION d365._field_map_metadata_check(column_name name, dynamics_field text,
                                               direction text, typ regtype, typmod integer)
RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s d365.settings;
    nav text := split_part(dynamics_field, '@', 1);
    is_bind boolean := dynamics_field LIKE '%@odata.bind';
    attr jsonb;
    maxlen integer;
    collen integer;
    ctype text;
    problem text;
    msg text;
BEGIN
    SELECT * INTO s FROM d365.settings;
    IF s.org_url IS NULL OR s.tenant_id IS NULL OR s.client_id IS NULL OR s.client_secret IS NULL THEN
        RETURN;
    END IF;
    BEGIN
        FOR i IN 1 .. 2 LOOP
            SELECT a INTO attr FROM d365._metadata('contact') a
             WHERE (NOT is_bind AND a ->> 'LogicalName' = nav)
                OR (is_bind AND (nav = a ->> 'LogicalName'
                                 OR EXISTS (SELECT FROM jsonb_array_elements_text(coalesce(a -> 'Targets', '[]')) t
                                             WHERE nav = (a ->> 'LogicalName') || '_' || t)))
             LIMIT 1;
            EXIT WHEN attr IS NOT NULL OR i = 2;
            -- not in the cached list: it may be a field made in the last hour
            DELETE FROM d365.metadata_cache c
             WHERE c.path LIKE 'EntityDefinitions(LogicalName=''contact'')/Attributes%';
        END LOOP;
        IF attr IS NOT NULL AND attr ->> 'AttributeType' IN ('String', 'Memo') THEN
            maxlen := (d365._max_lengths('contact', true) ->> (attr ->> 'LogicalName'))::integer;
        END IF;
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS msg = MESSAGE_TEXT;
        RAISE WARNING 'the mapping of column "%" to Dynamics field "%" was not checked: the Dynamics 365 metadata could not be read',
                      column_name, dynamics_field
            USING DETAIL = msg,
                  HINT = 'd365_validate_mapping() checks the map once Dynamics 365 can be reached; until then a value that does not fit fails its contact at sync time.';
        RETURN;
    END;
    IF attr IS NULL THEN
        RAISE EXCEPTION 'Dynamics field "%" does not exist on contact', dynamics_field
            USING ERRCODE = 'undefined_column',
                  HINT = 'd365_dynamics_fields() lists the attributes of contact; a lookup is mapped as <lookup>_<target>@odata.bind.';
    END IF;
    -- a domain is judged by its base type; an enum and citext go as text
    SELECT CASE WHEN b.typtype = 'e' OR d365._text_like(b.oid::regtype) THEN 'text'
                ELSE format_type(b.oid, NULL) END,
           CASE WHEN b.oid IN ('character varying'::regtype, 'character'::regtype)
                     AND coalesce(nullif(typmod, -1), nullif(t.typtypmod, -1)) > 4
                THEN coalesce(nullif(typmod, -1), nullif(t.typtypmod, -1)) - 4 END
      INTO ctype, collen
      FROM pg_type t JOIN pg_type b ON b.oid = coalesce(nullif(t.typbasetype, 0), t.oid)
     WHERE t.oid = typ;
    problem := d365._type_problem(attr ->> 'AttributeType', ctype, is_bind, attr ->> 'LogicalName');
    IF problem IS NULL AND direction <> 'in'
       AND (attr ->> 'IsValidForCreate') = 'false' AND (attr ->> 'IsValidForUpdate') = 'false' THEN
        RAISE EXCEPTION 'column "%" cannot be mapped to Dynamics field "%": attribute % is read-only in Dynamics',
                        column_name, dynamics_field, attr ->> 'LogicalName'
            USING ERRCODE = 'invalid_parameter_value',
                  DETAIL = 'Dynamics 365 lets the attribute be set neither on create nor on update.',
                  HINT = 'Map it with direction ''in'' to receive its value, or map another field.';
    END IF;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'column "%" cannot be mapped to Dynamics field "%": %', column_name, dynamics_field, problem
            USING ERRCODE = 'datatype_mismatch',
                  DETAIL = format('Dynamics 365 says %s is of type %s; the column is of type %s.',
                                  attr ->> 'LogicalName', attr ->> 'AttributeType', typ),
                  HINT = 'Map a column of a matching type, or a generated column (direction ''out'') that converts this one; d365_dynamics_fields() lists the fields with their types.';
    END IF;
    IF maxlen IS NOT NULL AND collen > maxlen AND direction <> 'in' THEN
        RAISE WARNING 'column "%" holds up to % characters, Dynamics field "%" at most %', column_name, collen, nav, maxlen
            USING DETAIL = 'A longer value fails its contact before it is sent (error code d365sync.length); the other contacts are sent.',
                  HINT = format('Keep the values within %s characters, or shorten the column to varchar(%s).', maxlen, maxlen);
    END IF;
END;
$$;

-- ---------------------------------------------------------------------------
