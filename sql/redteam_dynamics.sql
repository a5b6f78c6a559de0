-- What Dynamics 365 sends is data, never code or a reason to fail others,
-- and the application's token goes nowhere but the Web API: attacks
-- through the answers (U+0000 in strings, an id that is not a GUID, an
-- absurd expires_in or Retry-After) and through request paths, each kept
-- as a regression test.  The simulator serves the rows and the faults.
\set SHOW_CONTEXT never
\ir sql/include/person.sql
\set ECHO all
\set VERBOSITY terse
SET search_path = public, d365;
CREATE TEMP TABLE sim_req (j jsonb);

-- 1. U+0000 in a string of a change-tracking page fails that row alone
-- (0.2: every pull failed with "unsupported Unicode escape sequence" and
-- the delta link never moved).
SELECT updated, failed FROM d365_pull_changes();
\setenv RD_ADA :ada
\! "$D365_SIMCTL" edit contact "{\"op\": \"update\", \"id\": \"$RD_ADA\", \"values\": {\"lastname\": \"Love\\u0000lace\"}}" >/dev/null
\copy (SELECT json_build_object('op', 'update', 'id', dynamics365_related_id, 'values', json_build_object('lastname', 'Baumeister')) FROM person WHERE id = 2) to program '"$D365_SIMCTL" edit contact -'
SELECT updated, failed FROM d365_pull_changes();
SELECT id, last_name FROM person WHERE id IN (1, 2) ORDER BY id;
SELECT last_error_code, last_error FROM d365.contact_state WHERE contact_key = '1';
-- the delta link moved on: the row is not read again
SELECT updated, failed FROM d365_pull_changes();

-- 2. In a pushed payload PostgreSQL refuses U+0000 itself (jsonb holds
-- none): that call fails, nothing else
SELECT d365_update_contact(jsonb_build_object('contactid', :'ada') || '{"lastname": "Love\u0000lace"}');
SELECT d365_update_contact(jsonb_build_object('contactid', :'ada', 'lastname', 'King')) AS applied;

-- 3. U+0000 in the answer to a matching look-up: the value is compared as
-- U+FFFD, the contacts of that look-up are matched or created as usual
-- (0.2: the whole contacts run failed).
UPDATE d365.field_map SET match = true WHERE column_name = 'email';
\! "$D365_SIMCTL" edit contact '{"op": "create", "id": "dddddddd-0000-4000-8000-000000000007", "values": {"firstname": "N\u0000ul", "emailaddress1": "nul@example.com"}}' >/dev/null
INSERT INTO person (id, first_name, email, score) VALUES
    (7, 'Nul', 'nul@example.com', 50), (8, 'Fresh', 'fresh@example.com', 50);
\! "$D365_SIMCTL" clear-requests
SELECT created, updated, failed FROM d365_sync_contacts();
SELECT id, dynamics365_related_id = 'dddddddd-0000-4000-8000-000000000007' AS matched_nul
  FROM person WHERE id IN (7, 8) ORDER BY id;
TRUNCATE sim_req;
\copy sim_req from program '"$D365_SIMCTL" requests --kind api --copy'
SELECT j->>'method' AS method, j->'body' AS body FROM sim_req
 WHERE j->>'method' = 'PATCH' AND j->>'path' LIKE '%dddddddd-0000-4000-8000-000000000007%';

-- 4. A look-up answer naming an id that is not a GUID fails that contact
-- alone (0.2: "invalid input syntax for type uuid" failed the whole run).
INSERT INTO person (id, first_name, email, score) VALUES
    (9, 'Odd', 'odd@example.com', 50), (10, 'Even', 'even@example.com', 50);
\! "$D365_SIMCTL" fault '{"method": "GET", "path_regex": "filter=", "status": 200, "json": {"value": [{"contactid": "not-a-guid", "emailaddress1": "odd@example.com", "firstname": "Odd"}]}}'
SELECT created, updated, failed FROM d365_sync_contacts();
SELECT id, dynamics365_related_id IS NOT NULL AS linked FROM person WHERE id IN (9, 10) ORDER BY id;
SELECT contact_key, last_error_code, last_error FROM d365.contact_state WHERE contact_key = '9';
\! "$D365_SIMCTL" clear-faults
UPDATE d365.field_map SET match = false WHERE column_name = 'email';

-- 5. An expires_in of 2^63-1 (0.2: the renewal time overflowed and every
-- call fetched a token) or below zero (0.2: refused) is clamped.
\! "$D365_SIMCTL" config '{"token_lifetime": 9223372036854775807}'
\c
SET search_path = public, d365;
\! "$D365_SIMCTL" clear-requests
SELECT organization_id IS NOT NULL AS ok FROM d365_whoami();
SELECT organization_id IS NOT NULL AS ok FROM d365_whoami();
SELECT organization_id IS NOT NULL AS ok FROM d365_whoami();
CREATE TEMP TABLE sim_req (j jsonb);
\copy sim_req from program '"$D365_SIMCTL" requests --kind token --copy'
SELECT count(*) AS token_requests FROM sim_req;
\! "$D365_SIMCTL" config '{"token_lifetime": 3599}'
\c
SET search_path = public, d365;
\! "$D365_SIMCTL" fault '{"path_regex": "oauth2", "status": 200, "json": {"token_type": "Bearer", "access_token": "not-a-token", "expires_in": -1}}'
SELECT organization_id IS NOT NULL AS ok FROM d365_whoami();
\! "$D365_SIMCTL" clear-faults

-- 6. An absurd Retry-After is read as a day (no overflow), longer than the
-- longest wait: the request fails at once, with the throttling reported
\! "$D365_SIMCTL" fault '{"path_regex": "WhoAmI", "status": 429, "headers": {"Retry-After": "99999999999999999999999999"}}'
SELECT organization_id IS NOT NULL AS ok FROM d365_whoami();
SELECT organization_id IS NOT NULL AS ok FROM d365_whoami();
\! "$D365_SIMCTL" clear-faults

-- 7. Requests with the application's token stay under the Web API: no dot
-- segments, encoded or not, no absolute URL elsewhere (0.2:
-- d365._get_all('../../../_sim/stats') read the simulator's control API).
SELECT count(*) FROM d365._get_all('../../../_sim/stats');
SELECT count(*) FROM d365._get_all('%2e%2e/%2E%2E/%2e%2e/_sim/stats');
SELECT count(*) FROM d365._get_all('WhoAmI/./../../../../_sim/stats');
SELECT count(*) FROM d365._get_all('..%2f..%2f..%2f_sim/stats');
SELECT count(*) FROM d365._get_all(:'sim_url' || '/api/data/v9.2/../../_sim/stats');
SELECT count(*) FROM d365._get_all(:'sim_url' || '/_sim/stats');
SELECT count(*) FROM d365._get_all(E'Who\\Am I');
-- a stored delta link is checked the same way
INSERT INTO d365.pull_state (entity, delta_link)
VALUES ('contact', :'sim_url' || '/api/data/v9.2/../../_sim/stats')
ON CONFLICT (entity) DO UPDATE SET delta_link = EXCLUDED.delta_link;
SELECT updated FROM d365_pull_changes();
DELETE FROM d365.pull_state;
-- paths of the Web API itself, and filters holding dots and slashes, work
SELECT count(*) = 1 AS ok FROM d365._get_all('WhoAmI');
SELECT count(*) >= 1 AS ok FROM d365._get_all('contacts?$select=contactid&$filter=' || d365._uri_escape('emailaddress1 eq ''a.b/c@example.com'' or statecode eq 0'));

-- 8. U+0000 in a list Dynamics returns (metadata, owners) is read as
-- U+FFFD (0.2: the whole list failed)
\! "$D365_SIMCTL" fault '{"path_regex": "WhoAmI", "status": 200, "json": {"fullname": "Sam\u0000Manager"}}'
SELECT r ->> 'fullname' = 'Sam' || U&'\FFFD' || 'Manager' AS replaced FROM d365._get_all('WhoAmI') r;
\! "$D365_SIMCTL" clear-faults
