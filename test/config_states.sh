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
TMPD=$(mktemp -d /tmp/d365config.XXXXXX)
STANDALONE=0
trap 'rm -rf "$TMPD"; [ "$STANDALONE" = 0 ] || d365_stop_all' EXIT
if [ -z "${D365_SIM_URL:-}" ]; then
    # run by itself: a build, a cluster and a simulator of its own
    STANDALONE=1
    . "$(dirname "$0")/../scripts/lib.sh"
    d365_start_standalone "$TMPD/start.log" || exit 0
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
