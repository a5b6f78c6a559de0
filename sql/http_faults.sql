-- The HTTP layer under faults: retries, throttling, timeouts, bad bodies.
\ir sql/include/fresh.sql
\set ECHO all
SET search_path = d365, public;
UPDATE d365.settings
   SET org_url = :'sim_url', authority_url = :'sim_url',
       tenant_id = '11111111-1111-1111-1111-111111111111',
       client_id = '22222222-2222-2222-2222-222222222222',
       client_secret = 'sim-secret';
CREATE TEMP TABLE sim_req (j jsonb);
\set VERBOSITY default

-- a 503 is retried and the call succeeds
\! "$D365_SIMCTL" fault '{"path_regex": "WhoAmI", "status": 503, "json": {"error": {"code": "0x80040216", "message": "Service unavailable"}}, "times": 1}'
SELECT user_id FROM d365_whoami();
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT j->>'path' AS path, j->>'status' AS status FROM sim_req ORDER BY (j->>'seq')::int;

-- a 429 with Retry-After is honoured, then retried
\! "$D365_SIMCTL" reset
\! "$D365_SIMCTL" fault '{"path_regex": "WhoAmI", "status": 429, "headers": {"Retry-After": "1"}, "json": {"error": {"code": "0x80072322", "message": "Number of requests exceeded the limit of 6000 over time window of 300 seconds."}}, "times": 1}'
SELECT clock_timestamp() AS t0 \gset
SELECT user_id FROM d365_whoami();
SELECT clock_timestamp() - :'t0'::timestamptz >= interval '1 second' AS waited_retry_after;

-- a persistent 5xx gives up after d365sync.max_retries, with status and code
\! "$D365_SIMCTL" reset
SET d365sync.max_retries = 1;
\! "$D365_SIMCTL" fault '{"path_regex": "WhoAmI", "status": 500, "json": {"error": {"code": "0x80040216", "message": "An unexpected error occurred."}}, "times": null}'
SELECT user_id FROM d365_whoami();
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT count(*) AS attempts FROM sim_req;

-- a non-JSON error page (a proxy's, say) is described, not parsed
\! "$D365_SIMCTL" reset
\! "$D365_SIMCTL" fault '{"path_regex": "WhoAmI", "status": 400, "content_type": "text/html", "body": "<html><body>Bad Request</body></html>", "times": 1}'
SELECT user_id FROM d365_whoami();

-- malformed JSON in a 200 response is a clear error, not a crash
\! "$D365_SIMCTL" fault '{"path_regex": "WhoAmI", "status": 200, "body": "{\"value\": [", "content_type": "application/json", "times": 1}'
SELECT user_id FROM d365_whoami();

-- a response larger than d365sync.max_response_size is refused
\! "$D365_SIMCTL" fault '{"path_regex": "WhoAmI", "status": 200, "content_type": "application/json", "body_size": 300000, "times": 1}'
SET d365sync.max_response_size = '128kB';
SELECT user_id FROM d365_whoami();
RESET d365sync.max_response_size;

-- a slow response is cut by statement_timeout with SQLSTATE 57014
\! "$D365_SIMCTL" fault '{"path_regex": "WhoAmI", "delay_ms": 5000, "times": 1}'
SET statement_timeout = '500ms';
DO $$
BEGIN
    PERFORM d365.d365_whoami();
EXCEPTION WHEN query_canceled THEN
    RAISE NOTICE 'cancelled with SQLSTATE %', SQLSTATE;
END $$;
RESET statement_timeout;

-- ... and by d365sync.request_timeout_ms (curl's own timeout), with a hint
\! "$D365_SIMCTL" fault '{"path_regex": "WhoAmI", "delay_ms": 3000, "times": 2}'
SET d365sync.request_timeout_ms = 300;
DO $$
DECLARE m text; d text; h text;
BEGIN
    PERFORM d365.d365_whoami();
EXCEPTION WHEN connection_failure THEN
    GET STACKED DIAGNOSTICS m = MESSAGE_TEXT, d = PG_EXCEPTION_DETAIL, h = PG_EXCEPTION_HINT;
    RAISE NOTICE 'message: %', m;
    RAISE NOTICE 'detail says timed out: %', d ILIKE '%timed out%';
    RAISE NOTICE 'hint: %', h;
END $$;
RESET d365sync.request_timeout_ms;

-- the backend is still healthy and the connection reusable
\! "$D365_SIMCTL" clear-faults
SELECT user_id FROM d365_whoami();

-- nothing listening: a connection error after the retries
SET d365sync.max_retries = 0;
UPDATE d365.settings SET org_url = 'http://127.0.0.1:9', authority_url = 'http://127.0.0.1:9';
\set VERBOSITY terse
SELECT user_id FROM d365_whoami();
RESET d365sync.max_retries;
