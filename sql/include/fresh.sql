\set ECHO none
-- Shared set-up of the regression suites (\ir sql/include/... from each
-- suite; pg_regress feeds psql on stdin from the top of the tree): a fresh
-- d365sync in this database, the simulator back to its seed state, and the
-- simulator's URL in :sim_url.  Every suite can so run alone or in any order.
SET client_min_messages = warning;
DROP EXTENSION IF EXISTS d365sync CASCADE;
RESET client_min_messages;
CREATE EXTENSION d365sync;
\getenv sim_url D365_SIM_URL
\! "$D365_SIMCTL" reset
