#!/usr/bin/env bash
# test/config_states.sh: configuration states a user can reach that must end
# in a clear message, never in a crashed backend.
#
# scripts/test.sh runs it with the cluster and simulator it started (PGHOST,
# PGPORT, PGUSER, D365_SIM_URL exported).  Each scenario runs in one psql
# session and then checks that the same session still answers.
# Prints "ok N - ..." / "not ok N - ..." lines with diagnostics as "# ...".
set -uo pipefail

DB=d365config
TMPD=$(mktemp -d /tmp/d365config.XXXXXX)
trap 'rm -rf "$TMPD"' EXIT
if [ -z "${D365_SIM_URL:-}" ]; then
    echo "# test/config_states.sh needs the simulator and a cluster: run it through scripts/test.sh"
    echo "not ok 1 - set-up: no simulator (D365_SIM_URL is not set)"
    exit 0
fi

psqlq() {
    timeout 60 psql -X -q -At -P pager=off -d "$DB" "$@"
}

diag() { sed 's/^/# /'; }

timeout 60 dropdb --if-exists "$DB" >/dev/null 2>&1
if ! timeout 60 createdb "$DB" >"$TMPD/setup.log" 2>&1 ||
   ! psqlq -v ON_ERROR_STOP=1 -v sim_url="$D365_SIM_URL" >>"$TMPD/setup.log" 2>&1 <<'SQL'
CREATE EXTENSION d365sync CASCADE;
UPDATE d365.settings
   SET org_url = :'sim_url', authority_url = :'sim_url',
       tenant_id = '11111111-1111-1111-1111-111111111111',
       client_id = '22222222-2222-2222-2222-222222222222',
       client_secret = 'sim-secret';
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
