/*
 * d365sync upgrade from 0.1 to 0.2: ALTER EXTENSION d365sync UPDATE.
 *
 * Carries an installation of 0.1 to exactly what a fresh 0.2 install
 * creates (the upgrade test compares the two catalogs), keeping the user's
 * settings, field map, links, sync state, activity log and run history.
 */
\echo Use "ALTER EXTENSION d365sync UPDATE TO '0.2'" to load this file. \quit

-- Every function pins its search_path (pg_temp last), SECURITY INVOKER ones
-- included: superusers and pg_cron run them too.
ALTER FUNCTION d365._activity_completion(text,jsonb) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION d365._contact_record(text[],text[],integer[],text[],text[]) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION d365._contact_snapshot(text,jsonb) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION d365._get_all(text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION d365._incoming_apply(jsonb,boolean) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION d365._next_attempt(integer) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION d365._pull_record(jsonb) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION d365._send_activity(bigint,boolean) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION d365._type_problem(text,text,boolean,text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION d365._typed_jsonb(jsonb,regtype,text,name) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION d365._url_problem(text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION d365._utc(timestamp with time zone) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION d365.d365_pull_changes() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION d365.d365_sync_activities() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION d365.d365_sync_contact(anyelement) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION d365.d365_sync_contacts() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION d365.d365_update_contact(jsonb) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION d365.d365_whoami() SET search_path = pg_catalog, pg_temp;
