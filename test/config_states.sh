#!/usr/bin/env bash
# test/config_states.sh: configuration states a user can reach that must end
# in a clear message, never in a crashed backend.
#
# scripts/test.sh runs it with the cluster and simulator it started (PGHOST,
# PGPORT, PGUSER, D365_SIM_URL exported); run by itself it builds and
# starts its own (D365_SKIP_BUILD=1: uses what is installed).  Each scenario
# runs in one psql session and then checks that the same session still
# answers.
# Prints "ok N - ..." / "not ok N - ..." lines with diagnostics as "# ...".
set -uo pipefail

DB=d365config
. "$(dirname "$0")/lib.sh"
t_begin config
t_standalone || exit 0
PSQL_STOP=0

timeout 60 dropdb --if-exists "$DB" >/dev/null 2>&1
if ! timeout 60 createdb "$DB" >"$TMPD/setup.log" 2>&1 ||
   ! { t_configure_sql; cat <<'SQL'; } | psqlq -v ON_ERROR_STOP=1 >>"$TMPD/setup.log" 2>&1
CREATE TABLE person (id integer PRIMARY KEY, email text, score integer NOT NULL DEFAULT 0);
SELECT d365.d365_attach_contacts('person');
SQL
then
    diag <"$TMPD/setup.log"
    echo "not ok 1 - set-up: database $DB"
    exit 0
fi

# 1. A pull with a table attached but no field mapped: there is no path to
#    read, which must be a clear failure of the run, not a crash.
out=$(psqlq 2>&1 <<'SQL'
SELECT updated, unchanged, failed, unlinked FROM d365.d365_pull_changes();
SELECT kind, message FROM d365.sync_run ORDER BY id DESC LIMIT 1;
SELECT 'still here';
SQL
)
if grep -q 'WARNING:  no contact field is mapped for incoming changes' <<<"$out" &&
   grep -q '^0|0|0|0$' <<<"$out" &&
   grep -q '^pull|failed: no contact field is mapped for incoming changes$' <<<"$out" &&
   grep -q '^still here$' <<<"$out"; then
    echo "ok 1 - pull without a field map: a WARNING and a failed run, the session lives on"
else
    echo "not ok 1 - pull without a field map: a WARNING and a failed run, the session lives on"
    diag <<<"$out"
fi

timeout 60 dropdb --if-exists "$DB" >/dev/null 2>&1
exit 0
