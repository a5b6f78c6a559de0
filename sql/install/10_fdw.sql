-- Live reads: Dataverse tables as foreign tables (src/fdw/fdw.c, src/fdw/fdw_deparse.c,
-- src/fdw/fdw_scan.c), and the discovery functions they share their metadata with.
-- ---------------------------------------------------------------------------

-- Discovery: the Dataverse tables, and the columns of one.  Metadata comes
-- through d365._get_cached (an hour in d365.metadata_cache).

CREATE FUNCTION d365._entities()
RETURNS SETOF jsonb
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT jsonb_array_elements(d365._get_cached(
        'EntityDefinitions?$select=LogicalName,EntitySetName,PrimaryIdAttribute,ChangeTrackingEnabled'))
$$;

CREATE FUNCTION d365.d365_tables(
    OUT logical_name text, OUT entity_set text, OUT primary_id text,
    OUT change_tracking boolean)
RETURNS SETOF record
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT e ->> 'LogicalName', e ->> 'EntitySetName', e ->> 'PrimaryIdAttribute',
           coalesce((e ->> 'ChangeTrackingEnabled')::boolean, false)
      FROM d365._entities() e
     WHERE e ->> 'EntitySetName' IS NOT NULL
     ORDER BY 1
$$;
COMMENT ON FUNCTION d365.d365_tables() IS
    'Dataverse tables: logical name, entity set, primary id attribute, change tracking (metadata cached for an hour)';

-- The column a foreign table gives an attribute, and its type; NULL for
-- attributes the Web API does not return as a plain property.
CREATE FUNCTION d365._fdw_column(a jsonb, OUT column_name text, OUT column_type text)
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN t IS NULL THEN NULL
                WHEN a ->> 'AttributeType' IN ('Lookup', 'Customer', 'Owner')
                    THEN '_' || (a ->> 'LogicalName') || '_value'
                ELSE a ->> 'LogicalName' END,
           t
      FROM (SELECT CASE WHEN a ->> 'AttributeOf' IS NOT NULL
                          OR NOT coalesce((a ->> 'IsValidForRead')::boolean, true) THEN NULL
                     ELSE CASE a ->> 'AttributeType'
                WHEN 'String' THEN 'text'
                WHEN 'Memo' THEN 'text'
                WHEN 'EntityName' THEN 'text'
                WHEN 'Integer' THEN 'integer'
                WHEN 'BigInt' THEN 'bigint'
                WHEN 'Decimal' THEN 'numeric'
                WHEN 'Money' THEN 'numeric'
                WHEN 'Double' THEN 'double precision'
                WHEN 'Boolean' THEN 'boolean'
                WHEN 'DateTime' THEN CASE WHEN a ->> 'Format' = 'DateOnly'
                                          THEN 'date' ELSE 'timestamp with time zone' END
                WHEN 'Uniqueidentifier' THEN 'uuid'
                WHEN 'Lookup' THEN 'uuid'
                WHEN 'Customer' THEN 'uuid'
                WHEN 'Owner' THEN 'uuid'
                WHEN 'Picklist' THEN 'integer'
                WHEN 'State' THEN 'integer'
                WHEN 'Status' THEN 'integer'
                WHEN 'Virtual' THEN CASE WHEN a #>> '{AttributeTypeName,Value}' = 'MultiSelectPicklistType'
                                         THEN 'text' END
            END END AS t) x
$$;

CREATE FUNCTION d365._choice_options(entity text, OUT attribute text, OUT options jsonb)
RETURNS SETOF record
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT a ->> 'LogicalName',
           (SELECT jsonb_agg(jsonb_build_object(
                       'value', (o ->> 'Value')::integer,
                       'label', o #>> '{Label,UserLocalizedLabel,Label}')
                       ORDER BY (o ->> 'Value')::integer)
              FROM jsonb_array_elements(coalesce(a #> '{OptionSet,Options}', '[]')) o)
      FROM unnest(ARRAY['PicklistAttributeMetadata', 'StateAttributeMetadata',
                        'StatusAttributeMetadata', 'MultiSelectPicklistAttributeMetadata']) cast_name,
           LATERAL jsonb_array_elements(d365._get_cached(format(
               'EntityDefinitions(LogicalName=''%s'')/Attributes/Microsoft.Dynamics.CRM.%s?$select=LogicalName&$expand=OptionSet',
               entity, cast_name))) a
$$;

CREATE FUNCTION d365.d365_describe(
    entity text,
    OUT logical_name text, OUT attribute_type text, OUT max_length integer,
    OUT required boolean, OUT targets text[], OUT options jsonb,
    OUT column_name text, OUT column_type text)
RETURNS SETOF record
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF entity IS NULL OR entity !~ '^[a-z][a-z0-9_]*$' THEN
        RAISE EXCEPTION 'invalid entity logical name %', coalesce(quote_literal(entity), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Tables are named by their lowercase logical name, e.g. account; d365_tables() lists them.';
    END IF;
    RETURN QUERY
    SELECT a ->> 'LogicalName',
           -- Virtual attributes say what they are in AttributeTypeName
           -- (MultiSelectPicklistType: a multi-select choice)
           CASE WHEN a ->> 'AttributeType' = 'Virtual' AND a #>> '{AttributeTypeName,Value}' IS NOT NULL
                THEN regexp_replace(a #>> '{AttributeTypeName,Value}', 'Type$', '')
                ELSE a ->> 'AttributeType' END,
           (a ->> 'MaxLength')::integer,
           coalesce(a #>> '{RequiredLevel,Value}' IN ('SystemRequired', 'ApplicationRequired'), false),
           CASE WHEN jsonb_typeof(a -> 'Targets') = 'array'
                THEN ARRAY(SELECT jsonb_array_elements_text(a -> 'Targets')) END,
           o.options,
           c.column_name, c.column_type
      FROM jsonb_array_elements(d365._get_cached(format(
               'EntityDefinitions(LogicalName=''%s'')/Attributes?$select=LogicalName,AttributeType,AttributeTypeName,MaxLength,RequiredLevel,Targets,IsValidForRead,AttributeOf,Format,IsPrimaryId',
               entity))) a
      LEFT JOIN d365._choice_options(entity) o ON o.attribute = a ->> 'LogicalName'
      CROSS JOIN LATERAL d365._fdw_column(a) c
     ORDER BY (a ->> 'IsPrimaryId')::boolean IS TRUE DESC, a ->> 'LogicalName';
END;
$$;
COMMENT ON FUNCTION d365.d365_describe(text) IS
    'Attributes of a Dataverse table: type, maximum length, required, lookup targets, choice options, and the column a foreign table gives it (metadata cached for an hour)';

-- IMPORT FOREIGN SCHEMA dataverse: one CREATE FOREIGN TABLE per table
-- (named by its entity set), columns from d365_describe.  Run by the
-- wrapper as the owner of d365's tables.  mode: all, limit to, except.
CREATE FUNCTION d365._fdw_import(server text, mode text, local_schema text, entity_sets text[])
RETURNS SETOF text
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t record;
    cols text;
    missing text;
BEGIN
    IF mode = 'limit to' THEN
        SELECT string_agg(quote_ident(s), ', ') INTO missing
          FROM unnest(entity_sets) s
         WHERE s NOT IN (SELECT e ->> 'EntitySetName' FROM d365._entities() e
                          WHERE e ->> 'EntitySetName' IS NOT NULL);
        IF missing IS NOT NULL THEN
            RAISE EXCEPTION 'Dataverse has no table with entity set %', missing
                USING ERRCODE = 'fdw_table_not_found',
                      HINT = 'Tables are named by their entity set (e.g. accounts); d365_tables() lists them.';
        END IF;
    END IF;
    FOR t IN SELECT e ->> 'LogicalName' AS logical_name, e ->> 'EntitySetName' AS entity_set,
                    e ->> 'PrimaryIdAttribute' AS primary_id
               FROM d365._entities() e
              WHERE e ->> 'EntitySetName' ~ '^[A-Za-z_][A-Za-z0-9_]*$'
                AND e ->> 'LogicalName' ~ '^[a-z][a-z0-9_]*$'
                AND CASE mode WHEN 'limit to' THEN e ->> 'EntitySetName' = ANY (entity_sets)
                              WHEN 'except' THEN NOT (e ->> 'EntitySetName' = ANY (entity_sets))
                              ELSE true END
              ORDER BY 2 LOOP
        SELECT string_agg(format('%I %s%s', d.column_name, d.column_type,
                                 CASE WHEN d.logical_name = t.primary_id THEN ' NOT NULL' ELSE '' END),
                          E',\n    ')
          INTO cols
          FROM d365.d365_describe(t.logical_name) d
         WHERE d.column_name IS NOT NULL AND d.column_name ~ '^[A-Za-z_][A-Za-z0-9_]*$';
        CONTINUE WHEN cols IS NULL;
        RETURN NEXT format(E'CREATE FOREIGN TABLE %I.%I (\n    %s\n) SERVER %I OPTIONS (entity_set %L, entity %L)',
                           local_schema, t.entity_set, cols, server, t.entity_set, t.logical_name);
    END LOOP;
END;
$$;

-- The wrapper.  Its handler and validator are called by PostgreSQL itself,
-- never by users.
CREATE FUNCTION d365._fdw_handler()
RETURNS fdw_handler
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_fdw_handler'
LANGUAGE C STRICT;

CREATE FUNCTION d365._fdw_validator(options text[], catalog oid)
RETURNS void
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'd365_fdw_validator'
LANGUAGE C STRICT;

CREATE FOREIGN DATA WRAPPER d365_fdw
    HANDLER d365._fdw_handler
    VALIDATOR d365._fdw_validator;
COMMENT ON FOREIGN DATA WRAPPER d365_fdw IS
    'Dataverse tables as read-only foreign tables, through d365sync''s connection (d365.settings)';

REVOKE ALL ON FUNCTION d365._entities(), d365.d365_tables(), d365._fdw_column(jsonb),
    d365._choice_options(text), d365.d365_describe(text),
    d365._fdw_import(text, text, text, text[]),
    d365._fdw_handler(), d365._fdw_validator(text[], oid) FROM PUBLIC;

-- ---------------------------------------------------------------------------
