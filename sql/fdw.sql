-- Live reads: Dataverse tables as foreign tables (d365_fdw).  Discovery,
-- IMPORT FOREIGN SCHEMA, each condition sent to Dataverse (read back from
-- the simulator's request log) with the same answer as PostgreSQL's, what
-- stays local, ORDER BY and LIMIT, a join with a local table, and who may
-- create servers and read foreign tables.
\ir sql/include/configured.sql
\set ECHO all
SET search_path = d365, public;
\getenv simctl D365_SIMCTL
SELECT format('%s --url %s', :'simctl', :'sim_url') AS simctl \gset
CREATE TEMP TABLE sim_req (j jsonb);
-- the Web API requests since the last call (decoded, without the service
-- root), and a fresh log
CREATE FUNCTION pg_temp.sent(simctl text) RETURNS SETOF text LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE sim_req;
    EXECUTE format('COPY sim_req FROM PROGRAM %L', simctl || ' requests --copy --kind api');
    EXECUTE format('COPY sim_req FROM PROGRAM %L', simctl || ' clear-requests');
    DELETE FROM sim_req WHERE j ->> 'path' LIKE '%/EntityDefinitions%';
    RETURN QUERY
    SELECT (SELECT convert_from(string_agg(CASE WHEN m[1] IS NOT NULL
                                                 THEN decode(substr(m[1], 2), 'hex')
                                                 ELSE convert_to(m[2], 'UTF8') END,
                                           ''::bytea ORDER BY n), 'UTF8')
              FROM regexp_matches(regexp_replace(j ->> 'path', '^/api/data/v9\.2/', ''),
                                  '(%[0-9A-Fa-f]{2})|([^%]+)', 'g') WITH ORDINALITY r(m, n))
      FROM sim_req ORDER BY (j ->> 'seq')::int;
END;
$$;

-- accounts to read (beside the simulator's two seed accounts)
\! "$D365_SIMCTL" edit account '{"op":"create","id":"a0000000-0000-4000-8000-000000000001","values":{"name":"Alpha Widgets","revenue":1000,"numberofemployees":10,"accountnumber":"A-1"}}'
\! "$D365_SIMCTL" edit account '{"op":"create","id":"a0000000-0000-4000-8000-000000000002","values":{"name":"alpha gadgets","revenue":5000.5,"numberofemployees":50,"accountnumber":"A-2"}}'
\! "$D365_SIMCTL" edit account '{"op":"create","id":"a0000000-0000-4000-8000-000000000003","values":{"name":"ALPHA","numberofemployees":200,"accountnumber":"A-3"}}'
\! "$D365_SIMCTL" edit account '{"op":"create","id":"a0000000-0000-4000-8000-000000000004","values":{"name":"Beta_Co","revenue":250,"accountnumber":"B-4"}}'
\! "$D365_SIMCTL" edit account '{"op":"create","id":"a0000000-0000-4000-8000-000000000005","values":{"name":"O\u0027Brien & Sons","revenue":75,"numberofemployees":5,"accountnumber":"O-5"}}'
\! "$D365_SIMCTL" edit account '{"op":"create","id":"a0000000-0000-4000-8000-000000000006","values":{"name":"100% Natural","revenue":10,"numberofemployees":3,"accountnumber":"N-6"}}'

-- discovery
SELECT * FROM d365_tables() WHERE logical_name IN ('account', 'contact', 'new_pageview');
SELECT logical_name, attribute_type, max_length, required, targets, options, column_name, column_type
  FROM d365_describe('account')
 WHERE logical_name IN ('accountid', 'name', 'revenue', 'numberofemployees', 'primarycontactid',
                        'ownerid', 'statecode', 'createdon');
SELECT * FROM d365_describe('Account; DROP');

-- a server and the import
CREATE SERVER dataverse FOREIGN DATA WRAPPER d365_fdw;
CREATE SCHEMA dv;
IMPORT FOREIGN SCHEMA dataverse LIMIT TO (accounts, contacts) FROM SERVER dataverse INTO dv;
SELECT c.relname, ft.ftoptions FROM pg_foreign_table ft JOIN pg_class c ON c.oid = ft.ftrelid
 ORDER BY 1;
SELECT attname, format_type(atttypid, atttypmod), attnotnull FROM pg_attribute
 WHERE attrelid = 'dv.accounts'::regclass AND attnum > 0 ORDER BY attnum;
CREATE SCHEMA dv_rest;
IMPORT FOREIGN SCHEMA dataverse EXCEPT (accounts, contacts, emails) FROM SERVER dataverse INTO dv_rest;
SELECT c.relname, ft.ftoptions FROM pg_foreign_table ft JOIN pg_class c ON c.oid = ft.ftrelid
 WHERE c.relnamespace = 'dv_rest'::regnamespace ORDER BY 1;
SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
 WHERE attrelid = 'dv_rest.new_pageviews'::regclass AND attnum > 0 ORDER BY attnum LIMIT 4;
SET client_min_messages = warning;
DROP SCHEMA dv_rest CASCADE;
RESET client_min_messages;
IMPORT FOREIGN SCHEMA dataverse LIMIT TO (nosuchthings) FROM SERVER dataverse INTO dv;
IMPORT FOREIGN SCHEMA crm FROM SERVER dataverse INTO dv;
SELECT count(*) >= 0 AS cleared FROM pg_temp.sent(:'simctl');

-- a plain scan: the columns used, nothing else
SELECT name, revenue, numberofemployees FROM dv.accounts ORDER BY name COLLATE "C";
SELECT * FROM pg_temp.sent(:'simctl');
SELECT count(*) FROM dv.accounts;
SELECT * FROM pg_temp.sent(:'simctl');

-- comparisons of numbers: sent, exact (no local Filter in the plan), and
-- <> keeps PostgreSQL's NULL semantics
EXPLAIN (VERBOSE, COSTS OFF) SELECT name FROM dv.accounts WHERE numberofemployees = 50;
SELECT name FROM dv.accounts WHERE numberofemployees = 50;
SELECT name FROM dv.accounts WHERE numberofemployees <> 10 ORDER BY name COLLATE "C";
SELECT name FROM dv.accounts WHERE numberofemployees < 10 ORDER BY name COLLATE "C";
SELECT name FROM dv.accounts WHERE numberofemployees <= 10 ORDER BY name COLLATE "C";
SELECT name FROM dv.accounts WHERE 50 < numberofemployees ORDER BY name COLLATE "C";
SELECT name FROM dv.accounts WHERE revenue >= 1000 ORDER BY name COLLATE "C";
SELECT * FROM pg_temp.sent(:'simctl');

-- IN and NOT IN, IS [NOT] NULL, AND / OR / NOT (NOT pushed into the
-- comparisons, so that a NULL never turns into true)
SELECT name FROM dv.accounts WHERE numberofemployees IN (5, 10, 200) ORDER BY name COLLATE "C";
SELECT name FROM dv.accounts WHERE numberofemployees NOT IN (5, 10) ORDER BY name COLLATE "C";
SELECT name FROM dv.accounts WHERE revenue IS NULL ORDER BY name COLLATE "C";
SELECT name FROM dv.accounts WHERE revenue IS NOT NULL AND numberofemployees IS NULL;
SELECT name FROM dv.accounts WHERE NOT (revenue > 100 OR numberofemployees < 10) ORDER BY name COLLATE "C";
SELECT name FROM dv.accounts WHERE revenue < 100 OR numberofemployees >= 200 ORDER BY name COLLATE "C";
SELECT * FROM pg_temp.sent(:'simctl');

-- strings: Dataverse compares case-insensitively, so =, IN and LIKE
-- 'prefix%' are sent and checked again here (Filter in the plan); other
-- string comparisons stay local
EXPLAIN (VERBOSE, COSTS OFF) SELECT name FROM dv.accounts WHERE name LIKE 'alpha%';
SELECT name FROM dv.accounts WHERE name LIKE 'alpha%';
SELECT name FROM dv.accounts WHERE name = 'alpha';
SELECT name FROM dv.accounts WHERE name IN ('ALPHA', 'beta_co');
SELECT name FROM dv.accounts WHERE name = 'O''Brien & Sons';
SELECT * FROM pg_temp.sent(:'simctl');
SELECT name FROM dv.accounts WHERE name LIKE 'Beta\_%';
SELECT name FROM dv.accounts WHERE name LIKE '100\%%';
SELECT name FROM dv.accounts WHERE name COLLATE "C" > 'alpha' AND name COLLATE "C" < 'b' ORDER BY name COLLATE "C";
SELECT name FROM dv.accounts WHERE name <> 'ALPHA' AND accountnumber LIKE 'A%' ORDER BY name COLLATE "C";
SELECT name FROM dv.accounts WHERE name ILIKE 'alpha%' ORDER BY name COLLATE "C";
SELECT * FROM pg_temp.sent(:'simctl');

-- U+0000, which text cannot hold, reads as U+FFFD
\! "$D365_SIMCTL" edit account '{"op":"create","id":"a0000000-0000-4000-8000-0000000000ff","values":{"name":"Nul\u0000Byte","numberofemployees":999}}'
SELECT name, name = 'Nul' || U&'\FFFD' || 'Byte' AS replaced FROM dv.accounts WHERE numberofemployees = 999;
\! "$D365_SIMCTL" edit account '{"op":"delete","id":"a0000000-0000-4000-8000-0000000000ff"}'
SELECT * FROM pg_temp.sent(:'simctl');

-- uuids, timestamps (in UTC), lookups
SELECT name FROM dv.accounts WHERE accountid = 'a0000000-0000-4000-8000-000000000005';
SELECT count(*) FROM dv.accounts WHERE createdon > '2001-02-03 04:05:06.5+01';
SELECT count(*) FROM dv.accounts WHERE _parentaccountid_value IS NULL;
SELECT * FROM pg_temp.sent(:'simctl');

-- ORDER BY: sent when Dataverse sorts the same way (nulls first ascending,
-- last descending; never strings); LIMIT becomes $top when nothing is
-- left to check locally
EXPLAIN (VERBOSE, COSTS OFF) SELECT name FROM dv.accounts ORDER BY revenue NULLS FIRST LIMIT 3;
SELECT name, revenue FROM dv.accounts ORDER BY revenue NULLS FIRST, numberofemployees NULLS FIRST LIMIT 3;
SELECT name, revenue FROM dv.accounts ORDER BY revenue DESC NULLS LAST LIMIT 2;
SELECT * FROM pg_temp.sent(:'simctl');
EXPLAIN (VERBOSE, COSTS OFF) SELECT name FROM dv.accounts ORDER BY revenue LIMIT 3;
SELECT name, revenue FROM dv.accounts ORDER BY revenue LIMIT 3;
SELECT name FROM dv.accounts ORDER BY name LIMIT 1;
SELECT count(*) FROM (SELECT name FROM dv.accounts WHERE numberofemployees > 1 LIMIT 2) x;
SELECT count(*) FROM (SELECT name FROM dv.accounts WHERE numberofemployees > 1 LIMIT 2 OFFSET 1) x;
SELECT count(*) FROM (SELECT name FROM dv.accounts WHERE name LIKE 'A%' LIMIT 1) x;
SELECT * FROM pg_temp.sent(:'simctl');

-- a join with a local table: one request, hashed, not one per local row
CREATE TABLE public.tier (account uuid PRIMARY KEY, tier text);
INSERT INTO tier SELECT ('a0000000-0000-4000-8000-00000000000' || g)::uuid,
                        CASE WHEN g % 2 = 0 THEN 'gold' ELSE 'silver' END
  FROM generate_series(1, 6) g;
INSERT INTO tier SELECT gen_random_uuid(), 'none' FROM generate_series(1, 200);
ANALYZE tier;
EXPLAIN (COSTS OFF) SELECT t.tier, a.name FROM tier t JOIN dv.accounts a ON a.accountid = t.account;
SELECT t.tier, a.name FROM tier t JOIN dv.accounts a ON a.accountid = t.account
 WHERE a.revenue > 50 ORDER BY a.name COLLATE "C";
SELECT * FROM pg_temp.sent(:'simctl');
-- a few local rows against a large Dataverse table: the join clause is sent
-- with each local row's value (one small request per row) instead of
-- reading the whole table; the costs decide
CREATE TABLE public.few (account uuid, note text);
INSERT INTO few VALUES ('a0000000-0000-4000-8000-000000000002', 'two'),
                       ('a0000000-0000-4000-8000-000000000005', 'five'), (NULL, 'none');
ANALYZE few;
ALTER FOREIGN TABLE dv.accounts OPTIONS (ADD rows '100000');
EXPLAIN (VERBOSE, COSTS OFF)
SELECT f.note, a.name FROM few f LEFT JOIN dv.accounts a ON a.accountid = f.account;
SELECT f.note, a.name FROM few f LEFT JOIN dv.accounts a ON a.accountid = f.account ORDER BY 1;
SELECT * FROM pg_temp.sent(:'simctl');
ALTER FOREIGN TABLE dv.accounts OPTIONS (DROP rows);
EXPLAIN (COSTS OFF)
SELECT f.note, a.name FROM few f LEFT JOIN dv.accounts a ON a.accountid = f.account;
DROP TABLE few;

-- a join that cannot hash: the foreign table is read once, on the outer side
EXPLAIN (COSTS OFF)
SELECT count(*) FROM tier t JOIN dv.accounts a ON a.numberofemployees > length(t.tier);
SELECT count(*) FROM tier t JOIN dv.accounts a ON a.numberofemployees > length(t.tier);
SELECT * FROM pg_temp.sent(:'simctl');

-- a correlated subquery runs once per outer row: each run sends the outer
-- row's value (one small request, not a scan of the table)
EXPLAIN (VERBOSE, COSTS OFF)
SELECT t.tier, (SELECT a.name FROM dv.accounts a WHERE a.accountid = t.account) FROM tier t;
SELECT t.tier, (SELECT a.name FROM dv.accounts a WHERE a.accountid = t.account) AS name
  FROM tier t WHERE t.tier <> 'none' ORDER BY t.account;
SELECT * FROM pg_temp.sent(:'simctl');
-- parameters of a generic prepared plan, NULL included; an uncorrelated
-- subquery's value
PREPARE big(int) AS
    SELECT name FROM dv.accounts WHERE numberofemployees > $1 OR revenue IS NULL ORDER BY name COLLATE "C";
SET plan_cache_mode = force_generic_plan;
EXECUTE big(40);
EXECUTE big(NULL);
RESET plan_cache_mode;
DEALLOCATE big;
SELECT name FROM dv.accounts WHERE numberofemployees = (SELECT max(x) FROM (VALUES (3), (5)) v(x));
SELECT * FROM pg_temp.sent(:'simctl');

-- a foreign table of a Dataverse table that does not exist: Dataverse's error
CREATE FOREIGN TABLE dv.ghosts (id uuid) SERVER dataverse OPTIONS (entity_set 'ghosts');
SELECT * FROM dv.ghosts;

-- options: nothing can point d365's credentials elsewhere
CREATE SERVER elsewhere FOREIGN DATA WRAPPER d365_fdw OPTIONS (org_url 'http://127.0.0.2');
CREATE SERVER elsewhere FOREIGN DATA WRAPPER d365_fdw OPTIONS (page_size '0');
CREATE SERVER elsewhere FOREIGN DATA WRAPPER d365_fdw OPTIONS (colour 'red');
CREATE FOREIGN TABLE dv.bad (id uuid) SERVER dataverse OPTIONS (entity_set 'accounts?$top=1');
CREATE FOREIGN TABLE dv.bad (id uuid) SERVER dataverse OPTIONS (entity_set '../../x');
CREATE FOREIGN TABLE dv.bad (id uuid OPTIONS (field 'a/b')) SERVER dataverse OPTIONS (entity_set 'accounts');
CREATE FOREIGN TABLE dv.bad (id uuid) SERVER dataverse OPTIONS (rows '10');
CREATE USER MAPPING FOR CURRENT_USER SERVER dataverse OPTIONS (client_secret 'x');

-- who may do what: only a role with USAGE on the wrapper creates servers;
-- reading needs SELECT on the foreign table; a table whose owner lost USAGE
-- on the server reads nothing
SET client_min_messages = warning;
DROP ROLE IF EXISTS regress_fdw_reader;
DROP ROLE IF EXISTS regress_fdw_owner;
RESET client_min_messages;
CREATE ROLE regress_fdw_reader;
CREATE ROLE regress_fdw_owner;
GRANT USAGE ON SCHEMA dv TO regress_fdw_reader, regress_fdw_owner;
GRANT CREATE ON SCHEMA dv TO regress_fdw_owner;
SET ROLE regress_fdw_reader;
CREATE SERVER mine FOREIGN DATA WRAPPER d365_fdw;
SELECT name FROM dv.accounts LIMIT 1;
SELECT * FROM d365.d365_tables();
RESET ROLE;
GRANT SELECT ON dv.accounts TO regress_fdw_reader;
SET ROLE regress_fdw_reader;
SELECT name FROM dv.accounts WHERE numberofemployees = 200;
RESET ROLE;
GRANT USAGE ON FOREIGN SERVER dataverse TO regress_fdw_owner;
SET ROLE regress_fdw_owner;
CREATE FOREIGN TABLE dv.my_accounts (name text) SERVER dataverse OPTIONS (entity_set 'accounts');
SELECT count(*) FROM dv.my_accounts;
RESET ROLE;
REVOKE USAGE ON FOREIGN SERVER dataverse FROM regress_fdw_owner;
SET ROLE regress_fdw_owner;
SELECT count(*) FROM dv.my_accounts;
RESET ROLE;
-- a domain's CHECK is code of the domain's owner: a foreign table of such
-- a type never makes a reader (here the superuser) run it
GRANT USAGE ON FOREIGN SERVER dataverse TO regress_fdw_owner;
SET ROLE regress_fdw_owner;
CREATE FUNCTION dv.spy(text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    RAISE NOTICE 'spy runs as %', current_user;
    RETURN true;
END;
$$;
CREATE DOMAIN dv.spied AS text CHECK (dv.spy(VALUE));
CREATE TYPE dv.spied_pair AS (a dv.spied, b text);
CREATE FOREIGN TABLE dv.evil (name dv.spied) SERVER dataverse OPTIONS (entity_set 'accounts');
CREATE FOREIGN TABLE dv.evil2 (name dv.spied_pair) SERVER dataverse OPTIONS (entity_set 'accounts');
CREATE FOREIGN TABLE dv.evil3 (name dv.spied[]) SERVER dataverse OPTIONS (entity_set 'accounts');
RESET ROLE;
SELECT count(name) FROM dv.evil WHERE name = 'ALPHA';
SELECT count(name) FROM dv.evil2;
SELECT count(name) FROM dv.evil3;
SELECT count(*) FROM dv.evil;
DROP FOREIGN TABLE dv.evil, dv.evil2, dv.evil3;
DROP TYPE dv.spied_pair;
DROP DOMAIN dv.spied;
DROP FUNCTION dv.spy(text);
REVOKE USAGE ON FOREIGN SERVER dataverse FROM regress_fdw_owner;
DROP FOREIGN TABLE dv.my_accounts;
REVOKE ALL ON SCHEMA dv FROM regress_fdw_reader, regress_fdw_owner;
REVOKE ALL ON dv.accounts FROM regress_fdw_reader;
DROP ROLE regress_fdw_reader;
DROP ROLE regress_fdw_owner;

-- a custom table: its lookup joins to accounts, a multi-select choice reads
-- as Dataverse sends it, date-only and choice conditions are sent
SELECT count(*) >= 0 AS cleared FROM pg_temp.sent(:'simctl');
SELECT logical_name, attribute_type, options, column_name, column_type
  FROM d365_describe('new_project') WHERE logical_name IN ('new_services', 'new_startdate');
IMPORT FOREIGN SCHEMA dataverse LIMIT TO (new_projects) FROM SERVER dataverse INTO dv;
\! "$D365_SIMCTL" edit new_project '{"op":"create","id":"b0000000-0000-4000-8000-000000000001","values":{"new_name":"Rollout","new_services":"100000000,100000002","new_stage":100000001,"new_startdate":"2026-03-01","new_budget":12500.5,"new_AccountId@odata.bind":"/accounts(a0000000-0000-4000-8000-000000000002)"}}'
\! "$D365_SIMCTL" edit new_project '{"op":"create","id":"b0000000-0000-4000-8000-000000000002","values":{"new_name":"Pilot","new_stage":100000000,"new_startdate":"2025-11-15"}}'
SELECT p.new_name, p.new_services, p.new_stage, p.new_startdate, p.new_budget, a.name AS account
  FROM dv.new_projects p LEFT JOIN dv.accounts a ON a.accountid = p._new_accountid_value
 ORDER BY p.new_startdate NULLS FIRST;
SELECT new_name FROM dv.new_projects
 WHERE new_startdate >= '2026-01-01' AND new_stage IN (100000001, 100000002);
SELECT * FROM pg_temp.sent(:'simctl');

-- ANALYZE reads the table once and gives the planner its rows and values
SELECT count(*) >= 0 AS cleared FROM pg_temp.sent(:'simctl');
ANALYZE dv.accounts;
SELECT reltuples, relpages FROM pg_class WHERE oid = 'dv.accounts'::regclass;
SELECT attname, n_distinct, null_frac FROM pg_stats
 WHERE schemaname = 'dv' AND tablename = 'accounts' AND attname IN ('numberofemployees', 'revenue')
 ORDER BY 1;
SELECT * FROM pg_temp.sent(:'simctl');
-- the table's rows option, when set, stays the planner's estimate
ALTER FOREIGN TABLE dv.accounts OPTIONS (ADD rows '123456');
EXPLAIN SELECT accountid FROM dv.accounts;
ALTER FOREIGN TABLE dv.accounts OPTIONS (DROP rows);
EXPLAIN SELECT accountid FROM dv.accounts;

-- read-only
UPDATE dv.accounts SET name = 'x' WHERE numberofemployees = 200;
DELETE FROM dv.accounts;
