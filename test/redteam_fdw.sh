#!/usr/bin/env bash
# test/redteam_fdw.sh: a role that holds only USAGE on a d365_fdw server
# (and CREATE on a schema of its own) is hostile.  It names the columns of
# its foreign tables as it likes; a column without the option field is
# read as the Dataverse field of its name.  Such a name must never become
# part of a request (a condition written into $filter, a field of
# $select) unless it is a plain identifier, as the option field must be:
# a name holding d365sync's parameter marker (U+001F) crashed the backend
# when a condition on it was sent, and a name holding spaces and quotes
# rewrote the $filter sent to Dataverse.
#
# scripts/test.sh runs it with the cluster and simulator it started; run
# alone it starts its own (D365_SKIP_BUILD=1 uses the installed extension).
# Prints "ok N - ..." / "not ok N - ..." and always exits 0.
set -uo pipefail

DB=d365rtfdw
. "$(dirname "$0")/lib.sh"
t_begin rtfdw
t_on_exit() { simctl reset >/dev/null 2>&1; }
t_standalone || exit 0

simctl reset >/dev/null
t_create_db "$DB"
if ! psqlq >"$TMPD/setup.log" 2>&1 <<SQL
$(t_configure_sql)
CREATE SERVER dataverse FOREIGN DATA WRAPPER d365_fdw;
DROP ROLE IF EXISTS rt_fdw_user;
CREATE ROLE rt_fdw_user;
GRANT USAGE ON FOREIGN SERVER dataverse TO rt_fdw_user;
CREATE SCHEMA rt AUTHORIZATION rt_fdw_user;
SQL
then
    notok "set-up: the server and the hostile role" "$(tail -n 5 "$TMPD/setup.log")"
    exit 0
fi
simctl edit account '{"op": "create", "values": {"name": "Redteam Co", "numberofemployees": 7777}}' >/dev/null

started=$(psqlq -c "SELECT pg_postmaster_start_time()")

# as the hostile role: psql output of a statement, errors with their SQLSTATE
as_user() {
    PSQL_STOP=0 psqlq -v VERBOSITY=verbose 2>&1 <<SQL
\\set VERBOSITY verbose
SET ROLE rt_fdw_user;
$1
SQL
}

# -- 1. a column named with the parameter marker, and a condition on it sent
out=$(as_user "
CREATE FOREIGN TABLE rt.marker (accountid uuid, U&\"\\001F0\\001F\" integer)
  SERVER dataverse OPTIONS (entity_set 'accounts');
SELECT count(*) FROM rt.marker WHERE U&\"\\001F0\\001F\" = 7777;
SELECT 'still connected';")
now=$(psqlq -c "SELECT pg_postmaster_start_time()" 2>&1)
if grep -q 'HV007' <<<"$out" && grep -q 'is not a Dataverse field name' <<<"$out" &&
   grep -q 'still connected' <<<"$out" && [ "$now" = "$started" ]; then
    ok "a column named with the parameter marker is refused when read (HV007), the server did not restart"
else
    notok "a column named with the parameter marker is refused when read, the server did not restart" \
          "$out" "postmaster started $started, now $now"
fi

# -- 2. the same under EXPLAIN VERBOSE (which writes the request out)
out=$(as_user "EXPLAIN (VERBOSE, COSTS OFF) SELECT count(*) FROM rt.marker WHERE U&\"\\001F0\\001F\" = 7777;
SELECT 'still connected';")
now=$(psqlq -c "SELECT pg_postmaster_start_time()" 2>&1)
if grep -q 'HV007' <<<"$out" && grep -q 'still connected' <<<"$out" && [ "$now" = "$started" ]; then
    ok "EXPLAIN VERBOSE of it is refused the same way"
else
    notok "EXPLAIN VERBOSE of a column named with the parameter marker" "$out" "postmaster started $started, now $now"
fi

# -- 3. a column whose name rewrites the \$filter sent to Dataverse
seq0=$(simctl last-seq)
out=$(as_user "
CREATE FOREIGN TABLE rt.inject (accountid uuid, \"name eq 'x' or name\" text)
  SERVER dataverse OPTIONS (entity_set 'accounts');
SELECT count(*) FROM rt.inject WHERE \"name eq 'x' or name\" = 'Redteam Co';")
sent=$(simctl requests --since "$seq0" --kind api 2>/dev/null | grep -ci "or\(%20\| \|+\)name" || true)
if grep -q 'HV007' <<<"$out" && grep -q "name eq 'x' or name" <<<"$out" &&
   grep -q 'OPTIONS (ADD field' <<<"$out" && [ "$sent" = 0 ]; then
    ok "a column named with spaces and quotes is refused before any request (HV007, the hint names the option field)"
else
    notok "a column whose name would rewrite \$filter is refused before any request" "$out" "requests holding it: $sent"
fi

# -- 4. any name stays fine with the option field
out=$(as_user "
CREATE FOREIGN TABLE rt.fine (accountid uuid, \"Staff count\" integer OPTIONS (field 'numberofemployees'),
                             \"name eq 'x' or name\" text OPTIONS (field 'name'))
  SERVER dataverse OPTIONS (entity_set 'accounts');
SELECT \"name eq 'x' or name\", \"Staff count\" FROM rt.fine WHERE \"Staff count\" = 7777;")
if grep -q '^Redteam Co|7777$' <<<"$out" && ! grep -q 'ERROR' <<<"$out"; then
    ok "columns of any name read their field given by the option field"
else
    notok "columns of any name read their field given by the option field" "$out"
fi

# -- 5. a column named with the marker but given a field is read too
out=$(as_user "
ALTER FOREIGN TABLE rt.marker ALTER COLUMN U&\"\\001F0\\001F\" OPTIONS (ADD field 'numberofemployees');
SELECT count(*) FROM rt.marker WHERE U&\"\\001F0\\001F\" = 7777;")
if grep -qx '1' <<<"$out" && ! grep -q 'ERROR' <<<"$out"; then
    ok "the marker column reads with the option field"
else
    notok "the marker column reads with the option field" "$out"
fi

