-- test/catalog.sql: every object of schema d365 as sorted text lines, for
-- comparing two installations (test/upgrade.sh).  Names and definitions
-- only: nothing that differs between two databases (oids, instance ids).
\pset format unaligned
\pset tuples_only on
WITH
fn AS (
    SELECT format('function %s returns %s | kind %s | %s | %s | strict %s | secdef %s | leakproof %s | parallel %s | config %s | acl %s | comment %s | src %s | bin %s',
                  p.oid::regprocedure, pg_get_function_result(p.oid), p.prokind, l.lanname,
                  p.provolatile, p.proisstrict, p.prosecdef, p.proleakproof, p.proparallel,
                  p.proconfig, p.proacl, obj_description(p.oid, 'pg_proc'),
                  md5(p.prosrc), p.probin) AS line
      FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
     WHERE p.pronamespace = 'd365'::regnamespace
),
fnargs AS (
    SELECT format('function %s args %s', p.oid::regprocedure, pg_get_function_arguments(p.oid))
      FROM pg_proc p WHERE p.pronamespace = 'd365'::regnamespace
),
rel AS (
    SELECT format('relation %s kind %s | acl %s | comment %s | options %s | rls %s/%s',
                  c.oid::regclass, c.relkind, c.relacl, obj_description(c.oid, 'pg_class'),
                  c.reloptions, c.relrowsecurity, c.relforcerowsecurity)
      FROM pg_class c WHERE c.relnamespace = 'd365'::regnamespace
),
col AS (
    SELECT format('column %s #%s %s %s | notnull %s | default %s | generated %s | identity %s | collation %s | acl %s | comment %s',
                  c.oid::regclass,
                  row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum),
                  a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                  pg_get_expr(d.adbin, d.adrelid), a.attgenerated, a.attidentity,
                  a.attcollation, a.attacl, col_description(c.oid, a.attnum))
      FROM pg_class c
      JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
      LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
     WHERE c.relnamespace = 'd365'::regnamespace AND c.relkind IN ('r', 'v', 'm', 'f', 'p', 'c')
),
idx AS (
    SELECT format('index %s', pg_get_indexdef(i.indexrelid))
      FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
     WHERE c.relnamespace = 'd365'::regnamespace
),
con AS (
    SELECT format('constraint %s on %s: %s', n.conname, n.conrelid::regclass, pg_get_constraintdef(n.oid))
      FROM pg_constraint n
     WHERE n.connamespace = 'd365'::regnamespace
),
trg AS (
    SELECT format('trigger %s', pg_get_triggerdef(t.oid))
      FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
     WHERE NOT t.tgisinternal AND (c.relnamespace = 'd365'::regnamespace
            OR t.tgfoid IN (SELECT oid FROM pg_proc WHERE pronamespace = 'd365'::regnamespace))
),
vw AS (
    SELECT format('view %s: %s', c.oid::regclass, md5(pg_get_viewdef(c.oid)))
      FROM pg_class c WHERE c.relnamespace = 'd365'::regnamespace AND c.relkind IN ('v', 'm')
),
typ AS (
    SELECT format('type %s kind %s', t.oid::regtype, t.typtype)
      FROM pg_type t WHERE t.typnamespace = 'd365'::regnamespace
       AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = t.typrelid AND c.relkind <> 'c')
       AND t.typelem = 0
),
member AS (
    SELECT format('member %s', pg_describe_object(d.classid, d.objid, 0))
      FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
     WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e' AND e.extname = 'd365sync'
),
ext AS (
    SELECT format('extension %s schema %s config %s conditions %s', e.extversion,
                  e.extnamespace::regnamespace,
                  (SELECT array_agg(x::regclass::text ORDER BY x::regclass::text) FROM unnest(e.extconfig) x),
                  (SELECT array_agg(c ORDER BY c) FROM unnest(e.extcondition) c))
      FROM pg_extension e WHERE e.extname = 'd365sync'
),
nsp AS (
    SELECT format('schema %s acl %s comment %s', n.nspname, n.nspacl, obj_description(n.oid, 'pg_namespace'))
      FROM pg_namespace n WHERE n.nspname = 'd365'
),
-- the foreign data wrapper: its functions, who may use it, its options
fdw AS (
    SELECT format('foreign data wrapper %s owner %s handler %s validator %s acl %s options %s comment %s',
                  w.fdwname, w.fdwowner::regrole, w.fdwhandler::regprocedure,
                  w.fdwvalidator::regprocedure, w.fdwacl, w.fdwoptions,
                  obj_description(w.oid, 'pg_foreign_data_wrapper'))
      FROM pg_foreign_data_wrapper w
      JOIN pg_depend d ON d.classid = 'pg_foreign_data_wrapper'::regclass AND d.objid = w.oid
                      AND d.deptype = 'e'
      JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'd365sync'
),
-- the privileges pg_dump takes as the extension's own (not dumped as grants)
initpriv AS (
    SELECT format('initial privileges %s %s sub %s %s', i.classoid::regclass,
                  pg_describe_object(i.classoid, i.objoid, 0), i.objsubid, i.initprivs)
      FROM pg_init_privs i
      JOIN pg_depend d ON d.classid = i.classoid AND d.objid = i.objoid AND d.deptype = 'e'
      JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'd365sync'
)
SELECT line FROM (
    SELECT line FROM fn UNION ALL SELECT * FROM fnargs UNION ALL SELECT * FROM rel
    UNION ALL SELECT * FROM col UNION ALL SELECT * FROM idx UNION ALL SELECT * FROM con
    UNION ALL SELECT * FROM trg UNION ALL SELECT * FROM vw UNION ALL SELECT * FROM typ
    UNION ALL SELECT * FROM member UNION ALL SELECT * FROM ext UNION ALL SELECT * FROM nsp
    UNION ALL SELECT * FROM fdw UNION ALL SELECT * FROM initpriv
) s(line)
ORDER BY line COLLATE "C";
