-- Dynamics metadata, cached
-- ---------------------------------------------------------------------------

CREATE TABLE d365.metadata_cache (
    path       text PRIMARY KEY,
    fetched_at timestamptz NOT NULL,
    body       jsonb NOT NULL
);
COMMENT ON TABLE d365.metadata_cache IS
    'Web API metadata responses, kept for an hour; DELETE FROM d365.metadata_cache to fetch them again';

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
    SELECT coalesce(jsonb_agg(r), '[]') INTO result FROM d365._get_all(path) r;
    INSERT INTO d365.metadata_cache AS c (path, fetched_at, body)
    VALUES (_get_cached.path, now(), result)
    ON CONFLICT ON CONSTRAINT metadata_cache_pkey
    DO UPDATE SET fetched_at = EXCLUDED.fetched_at, body = EXCLUDED.body;
    RETURN result;
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
                         -- a domain is judged by its base type, an enum is sent as text
                         CASE WHEN b.typtype = 'e' THEN 'text'
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

-- ---------------------------------------------------------------------------
