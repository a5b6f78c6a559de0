-- The first end-to-end call: token, WhoAmI, over http and https.
\ir sql/include/fresh.sql
\set ECHO all
SET search_path = d365, public;
\getenv sim_https D365_SIM_HTTPS_URL
\getenv sim_ca D365_SIM_CA
CREATE TEMP TABLE sim_req (j jsonb);

\set VERBOSITY default
-- not configured yet: a clear error naming what is missing
UPDATE d365.settings SET org_url = NULL, tenant_id = NULL, client_id = NULL, client_secret = NULL;
SELECT * FROM d365_whoami();

UPDATE d365.settings
   SET org_url = :'sim_url',
       authority_url = :'sim_url',
       tenant_id = '11111111-1111-1111-1111-111111111111',
       client_id = '22222222-2222-2222-2222-222222222222',
       client_secret = 'sim-secret';

SELECT * FROM d365_whoami();
-- one token serves many calls
SELECT user_id FROM d365_whoami();
SELECT user_id FROM d365_whoami();

\copy sim_req from program '"$D365_SIMCTL" requests --copy'
SELECT j->>'kind' AS kind, j->>'method' AS method,
       regexp_replace(j->>'path', '^/[^/]+/oauth2', '/<tenant>/oauth2') AS path,
       j->>'status' AS status, j->'headers'->>'authorization' AS authorization
  FROM sim_req ORDER BY (j->>'seq')::int;

-- one connection carried them all: it is kept alive between calls
SELECT count(DISTINCT j->>'conn') AS connections FROM sim_req;

-- what the token request carried (the secret is masked by the simulator)
SELECT j->'body'->>'grant_type' AS grant_type,
       j->'body'->>'client_id' AS client_id,
       j->'body'->>'client_secret' AS client_secret,
       j->'body'->>'scope' = :'sim_url' || '/.default' AS scope_is_org_default,
       j->>'path' = '/11111111-1111-1111-1111-111111111111/oauth2/v2.0/token' AS token_path
  FROM sim_req WHERE j->>'kind' = 'token';

-- the OData headers of a Web API request
SELECT j->'headers'->>'accept' AS accept,
       j->'headers'->>'odata-version' AS odata_version,
       j->'headers'->>'odata-maxversion' AS odata_maxversion
  FROM sim_req WHERE j->>'kind' = 'api' ORDER BY (j->>'seq')::int LIMIT 1;

-- a 401 (token revoked) triggers exactly one refresh, then the call succeeds
\! "$D365_SIMCTL" reset
\! "$D365_SIMCTL" expire-tokens
SELECT user_id FROM d365_whoami();
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --copy'
SELECT j->>'kind' AS kind, j->>'status' AS status, j->'headers'->>'authorization' AS authorization
  FROM sim_req ORDER BY (j->>'seq')::int;

-- wrong secret: the AADSTS code and a hint, never the secret
UPDATE d365.settings SET client_secret = 'wrong-secret-value';
SELECT * FROM d365_whoami();
DO $$
DECLARE m text; d text; h text; c text;
BEGIN
    PERFORM d365.d365_whoami();
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS m = MESSAGE_TEXT, d = PG_EXCEPTION_DETAIL,
                            h = PG_EXCEPTION_HINT, c = PG_EXCEPTION_CONTEXT;
    RAISE NOTICE 'secret appears in the error: %',
        concat_ws(' ', m, d, h, c) LIKE '%wrong-secret-value%';
END $$;

-- unknown tenant and unknown application
UPDATE d365.settings SET client_secret = 'sim-secret',
                         tenant_id = '99999999-9999-9999-9999-999999999999';
SELECT * FROM d365_whoami();
UPDATE d365.settings SET tenant_id = '11111111-1111-1111-1111-111111111111',
                         client_id = '33333333-3333-3333-3333-333333333333';
SELECT * FROM d365_whoami();
UPDATE d365.settings SET client_id = '22222222-2222-2222-2222-222222222222';

-- https: with the simulator's CA the call succeeds ...
UPDATE d365.settings SET org_url = :'sim_https', authority_url = :'sim_https';
SET d365sync.ca_file = :'sim_ca';
SELECT user_id FROM d365_whoami();
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --copy'
SELECT DISTINCT j->>'scheme' AS scheme FROM sim_req
 WHERE (j->>'seq')::int > (SELECT max((j->>'seq')::int) - 2 FROM sim_req);

-- ... and without it the TLS failure is a clear connection error
RESET d365sync.ca_file;
DO $$
DECLARE m text; d text; h text;
BEGIN
    PERFORM d365.d365_whoami();
EXCEPTION WHEN connection_failure THEN
    GET STACKED DIAGNOSTICS m = MESSAGE_TEXT, d = PG_EXCEPTION_DETAIL, h = PG_EXCEPTION_HINT;
    RAISE NOTICE 'message: %', m;
    RAISE NOTICE 'detail names the certificate: %', d ILIKE '%certificate%';
    RAISE NOTICE 'hint: %', h;
END $$;
