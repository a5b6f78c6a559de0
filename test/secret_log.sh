#!/usr/bin/env bash
# test/secret_log.sh: the client secret never reaches the server log, even
# with log_statement = 'all', when it is set the documented ways (from a
# file on the server with d365_set_secret_from_file, or with psql's \copy
# from a file on the client), and refused settings writes (which PostgreSQL
# would report with "Failing row contains (...)") print no row.  A control
# at the end sets the secret with a plain UPDATE and finds it in the log,
# so the search itself is shown to work.
#
# scripts/test.sh runs it with the cluster and simulator it started; run by
# itself it starts its own (scripts/lib.sh, d365_start_standalone).  Prints "ok N - ..." / "not ok N - ...".
set -uo pipefail

DB=d365secret
SECRET=sim-secret
. "$(dirname "$0")/lib.sh"
t_begin secret
t_on_exit() {
    psql -X -q -d postgres -c "ALTER SYSTEM RESET log_statement" -c "SELECT pg_reload_conf()" >/dev/null 2>&1
    timeout 60 dropdb --if-exists "$DB" >/dev/null 2>&1
}
t_standalone || exit 0
PSQL_STOP=0 PSQL_TIMEOUT=120 DIAG_MAX=30
# scripts/lib.sh writes the server log beside the data directory
LOG=${D365_WORK:-$(dirname "${PGDATA:-/nonexistent/x}")}/postgres.log
if [ ! -f "$LOG" ]; then
    echo "not ok 1 - set-up: no server log at $LOG"
    exit 0
fi
new_log() { tail -n +"$((start + 1))" "$LOG"; }    # to a file: grep -q would cut the pipe

timeout 60 dropdb --if-exists "$DB" >/dev/null 2>&1
timeout 60 createdb "$DB" || { echo "not ok 1 - set-up: createdb"; exit 0; }
psqlq -v sim_url="$D365_SIM_URL" >"$TMPD/setup.log" 2>&1 <<'SQL'
CREATE EXTENSION d365sync CASCADE;
UPDATE d365.settings
   SET org_url = :'sim_url', authority_url = :'sim_url',
       tenant_id = '11111111-1111-1111-1111-111111111111',
       client_id = '22222222-2222-2222-2222-222222222222';
ALTER SYSTEM SET log_statement = 'all';
SELECT pg_reload_conf();
SQL
sleep 1
start=$(wc -l <"$LOG")
printf '%s\n' "$SECRET" >"$TMPD/secret.txt"
chmod 644 "$TMPD/secret.txt"

# 1. from a file the server reads
out=$(psqlq -v f="$TMPD/secret.txt" 2>&1 <<'SQL'
SELECT d365.d365_set_secret_from_file(:'f');
SELECT organization_id IS NOT NULL AS works FROM d365.d365_whoami();
SQL
)
if grep -qx 't' <<<"$out"; then
    echo "ok 1 - d365_set_secret_from_file sets a secret that works"
else
    echo "not ok 1 - d365_set_secret_from_file sets a secret that works"; diag <<<"$out"
fi

# 1b. the same for an application user of d365.app_users
out=$(psqlq -v f="$TMPD/secret.txt" 2>&1 <<'SQL'
SELECT d365.d365_set_secret_from_file(:'f', '44444444-4444-4444-4444-444444444444');
SELECT u.client_secret = s.client_secret AS stored     -- the file's value, as test 1 set it
  FROM d365.app_users u, d365.settings s
 WHERE u.client_id = '44444444-4444-4444-4444-444444444444';
DELETE FROM d365.app_users;
SQL
)
if grep -qx 't' <<<"$out"; then
    echo "ok 2 - d365_set_secret_from_file sets an application user's secret"
else
    echo "not ok 2 - d365_set_secret_from_file sets an application user's secret"; diag <<<"$out"
fi

# 2. from a file on the client, through psql's \copy (as docs/security.md shows)
psqlq -c "UPDATE d365.settings SET client_secret = NULL" >/dev/null 2>&1
out=$(cd "$TMPD" && psqlq 2>&1 <<'SQL'
CREATE TEMP TABLE d365_secret (value text);
\copy d365_secret FROM 'secret.txt'
UPDATE d365.settings SET client_secret = (SELECT value FROM d365_secret);
DROP TABLE d365_secret;
SELECT organization_id IS NOT NULL AS works FROM d365.d365_whoami();
SQL
)
if grep -qx 't' <<<"$out"; then
    echo "ok 3 - psql's \\copy from a client file sets a secret that works"
else
    echo "not ok 3 - psql's \\copy from a client file sets a secret that works"; diag <<<"$out"
fi

# 3. refused settings writes, and a wrong tenant (a token error)
psqlq >"$TMPD/refused.log" 2>&1 <<'SQL'
\set VERBOSITY verbose
\set SHOW_CONTEXT always
UPDATE d365.settings SET min_score = NULL;
UPDATE d365.settings SET api_version = NULL;
UPDATE d365.settings SET contact_sync_enabled = NULL;
UPDATE d365.settings SET singleton = false;
UPDATE d365.settings SET authority_url = NULL;
INSERT INTO d365.settings (min_score) VALUES (NULL);
UPDATE d365.settings SET tenant_id = '99999999-9999-9999-9999-999999999999';
SELECT * FROM d365.d365_whoami();
SQL
n=$(grep -c '^ERROR' "$TMPD/refused.log")
if [ "$n" -ge 7 ] && ! grep -q "$SECRET" "$TMPD/refused.log"; then
    echo "ok 4 - $n refused writes and a token error show the client no secret"
else
    echo "not ok 4 - $n refused writes and a token error show the client no secret"; diag <"$TMPD/refused.log"
fi

sleep 1
new_log >"$TMPD/log"
if grep -q 'd365_set_secret_from_file' "$TMPD/log" && grep -q 'violates not-null' "$TMPD/log"; then
    logged=yes
else
    logged=no
fi
if [ "$logged" = yes ] && ! grep -q "$SECRET" "$TMPD/log"; then
    echo "ok 5 - with log_statement = all the server log holds every statement and no secret ($(wc -l <"$TMPD/log") lines)"
else
    echo "not ok 5 - with log_statement = all the server log holds every statement and no secret (statements logged: $logged)"
    grep -B2 -A2 "$SECRET" "$TMPD/log" | diag
fi

# control: the plain UPDATE the docs warn against does log the secret
psqlq -c "UPDATE d365.settings SET client_secret = '$SECRET'" >/dev/null 2>&1
sleep 1
new_log >"$TMPD/log"
if grep -q "$SECRET" "$TMPD/log"; then
    echo "ok 6 - control: a plain UPDATE of client_secret is found in the log (the search works)"
else
    echo "not ok 6 - control: a plain UPDATE of client_secret is found in the log (the search works)"
fi
exit 0
