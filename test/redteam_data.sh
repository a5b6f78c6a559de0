#!/usr/bin/env bash
# test/redteam_data.sh: attacks that need two sessions or the server log.
#
#   1. An application session holds FOR UPDATE on a contact the sync is
#      about to link (0.2: the sync waited for it, with no end): the sync
#      finishes, that contact stays pending, and the next sync after the
#      lock is gone links it to the same Dynamics record.
#   2. A duplicate application user loaded with psql's \copy, with
#      log_statement = 'all' (0.2: "Key (client_id)=(...) already exists"
#      came with the COPY's context, the line with the secret): neither the
#      client nor the server log sees the secret.
#   3. The same lock held while the pull applies a Dynamics change to that
#      contact (0.2: the pull waited as long as the lock): the pull gives up
#      after 10 seconds with a clear error and keeps its delta link, and the
#      next pull applies the change.
#   4. An installation of 0.2 whose contact table has two rows sharing a
#      Dynamics id and a link its state does not confirm is updated: the
#      update succeeds and warns, nothing is lost, the attachment says the
#      index is missing until the rows are fixed and the table attached
#      again, and the unconfirmed link is refused.
#
# scripts/test.sh runs it with the cluster and simulator it started; run by
# itself it starts its own (scripts/lib.sh, d365_start_standalone).  Prints
# "ok N - ..." / "not ok N - ..." and always exits 0.
set -uo pipefail

DB=d365rddata
SECRET=rd-secret-4711-never-shown
LOCKER=
. "$(dirname "$0")/lib.sh"
t_begin rddata
t_on_exit() {
    [ -n "$LOCKER" ] && kill "$LOCKER" 2>/dev/null
    psql -X -q -d postgres -c "ALTER SYSTEM RESET log_statement" -c "SELECT pg_reload_conf()" >/dev/null 2>&1
    timeout 60 dropdb --if-exists --force "$DB" >/dev/null 2>&1
}
t_standalone || exit 0
LOG=${D365_WORK:-$(dirname "${PGDATA:-/nonexistent/x}")}/postgres.log
PSQL_TIMEOUT=120

timeout 60 dropdb --if-exists --force "$DB" >/dev/null 2>&1
timeout 60 createdb "$DB" || { notok "set-up: createdb"; exit 0; }
"$D365_SIMCTL" reset >/dev/null
{ t_configure_sql; cat <<'SQL'; } | psqlq >"$TMPD/setup.log" 2>&1 || { notok "set-up failed" "$(tail -n 5 "$TMPD/setup.log")"; exit 0; }
UPDATE d365.settings SET contact_sync_enabled = true, min_score = 10;
CREATE TABLE rd_person (id integer PRIMARY KEY, name text, score integer);
INSERT INTO rd_person VALUES (1, 'Ada', 50), (2, 'Bob', 50);
SELECT d365.d365_attach_contacts('rd_person');
INSERT INTO d365.field_map VALUES ('name', 'firstname');
SQL

# -- 1. a writer holds FOR UPDATE on a contact the sync links
psqlq -c "BEGIN" -c "SELECT id FROM rd_person WHERE id = 1 FOR UPDATE" -c "SELECT pg_sleep(60)" \
    >/dev/null 2>&1 &
LOCKER=$!
for i in $(seq 1 100); do
    held=$(psqlq -c "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                      WHERE a.datname = '$DB' AND a.query LIKE '%pg_sleep(60)%' AND l.granted
                        AND l.locktype = 'transactionid'" 2>/dev/null)
    [ "${held:-0}" -ge 1 ] && break
    sleep 0.1
done
out=$(PSQL_TIMEOUT=40 psqlq -c "SELECT created, failed FROM d365.d365_sync_contacts()" 2>&1)
rc=$?
links=$(psqlq -c "SELECT string_agg(id || ':' || (dynamics365_related_id IS NOT NULL), ',' ORDER BY id) FROM rd_person" 2>&1)
if [ $rc = 0 ] && [ "$links" = "1:false,2:true" ]; then
    ok "a sync does not wait for a row another session holds FOR UPDATE: it links the others and leaves that one pending ($out)"
else
    notok "a sync does not wait for a row another session holds FOR UPDATE: it links the others and leaves that one pending" \
        "exit $rc: $out" "links: $links"
fi
kill "$LOCKER" 2>/dev/null
wait "$LOCKER" 2>/dev/null
LOCKER=
psqlq -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '$DB' AND query LIKE '%pg_sleep(60)%' AND pid <> pg_backend_pid()" >/dev/null 2>&1
sleep 0.5
out=$(psqlq -c "SELECT created, failed FROM d365.d365_sync_contacts()" 2>&1)
same=$(psqlq -c "SELECT dynamics365_related_id = d365._contact_guid('1', 0) FROM rd_person WHERE id = 1" 2>&1)
count=$("$D365_SIMCTL" rows contact --copy | grep -c '"firstname":"Ada"')
if [ "$same" = t ] && [ "$count" = 1 ]; then
    ok "once the lock is gone the next sync links it to the record the first one created ($out; Dynamics holds $count Ada)"
else
    notok "once the lock is gone the next sync links it to the record the first one created" \
        "$out" "same id: $same" "Ada in Dynamics: $count"
fi

# -- 2. a duplicate application user in a \copy, with log_statement = all
psqlq -c "ALTER SYSTEM SET log_statement = 'all'" -c "SELECT pg_reload_conf()" >/dev/null
sleep 1
start=$(wc -l <"$LOG" 2>/dev/null || echo 0)
printf '44444444-4444-4444-4444-444444444444\tfirst-%s\ttrue\n' "$SECRET" >"$TMPD/users1.tsv"
printf '55555555-5555-5555-5555-555555555555\tother-%s\ttrue\n44444444-4444-4444-4444-444444444444\t%s\ttrue\n' \
    "$SECRET" "$SECRET" >"$TMPD/users2.tsv"
(cd "$TMPD" && psql -X -q -P pager=off -d "$DB" >"$TMPD/copy.log" 2>&1 <<'SQL'
\set VERBOSITY verbose
\set SHOW_CONTEXT always
\copy d365.app_users FROM 'users1.tsv'
\copy d365.app_users FROM 'users2.tsv'
INSERT INTO d365.app_users (client_id, client_secret)
SELECT '66666666-6666-6666-6666-666666666666', client_secret FROM d365.app_users;
UPDATE d365.app_users SET client_id = '44444444-4444-4444-4444-444444444444'
 WHERE client_id = '66666666-6666-6666-6666-666666666666';
SELECT count(*) AS users FROM d365.app_users;
SQL
)
sleep 1
tail -n +"$((start + 1))" "$LOG" >"$TMPD/log" 2>/dev/null
if grep -q 'exists already' "$TMPD/copy.log" && grep -q '^ *2$' "$TMPD/copy.log" \
   && ! grep -q "$SECRET" "$TMPD/copy.log"; then
    ok "a duplicate application user in a \\copy is refused without showing the secret to the client"
else
    notok "a duplicate application user in a \\copy is refused without showing the secret to the client" \
        "$(sed 's/^/  /' "$TMPD/copy.log" | head -n 20)"
fi
if grep -q 'COPY' "$TMPD/log" && ! grep -q "$SECRET" "$TMPD/log"; then
    ok "with log_statement = all the server log holds the COPY and no secret ($(wc -l <"$TMPD/log") lines)"
else
    notok "with log_statement = all the server log holds the COPY and no secret" \
        "$(grep -n "$SECRET\|COPY" "$TMPD/log" | head -n 10)"
fi
# d365_set_secret_from_file still changes an existing user's secret
printf 'new-secret\n' >"$TMPD/secret.txt"
chmod 644 "$TMPD/secret.txt"
out=$(psqlq -v f="$TMPD/secret.txt" 2>&1 <<'SQL'
SELECT d365.d365_set_secret_from_file(:'f', '44444444-4444-4444-4444-444444444444');
SELECT client_secret FROM d365.app_users WHERE client_id = '44444444-4444-4444-4444-444444444444';
SQL
)
if [ "$(tail -n 1 <<<"$out")" = new-secret ]; then
    ok "d365_set_secret_from_file changes the secret of an existing application user"
else
    notok "d365_set_secret_from_file changes the secret of an existing application user" "$out"
fi

# -- 3. the pull meets a row another session holds FOR UPDATE
psqlq -c "SELECT updated FROM d365.d365_pull_changes()" >/dev/null 2>&1
ada=$(psqlq -c "SELECT dynamics365_related_id FROM rd_person WHERE id = 1")
"$D365_SIMCTL" edit contact "{\"op\": \"update\", \"id\": \"$ada\", \"values\": {\"firstname\": \"Augusta\"}}" >/dev/null
psqlq -c "BEGIN" -c "SELECT id FROM rd_person WHERE id = 1 FOR UPDATE" -c "SELECT pg_sleep(60)" \
    >/dev/null 2>&1 &
LOCKER=$!
for i in $(seq 1 100); do
    held=$(psqlq -c "SELECT count(*) FROM pg_stat_activity WHERE datname = '$DB' AND query LIKE '%pg_sleep(60)%' AND state = 'active'" 2>/dev/null)
    [ "${held:-0}" -ge 1 ] && break
    sleep 0.1
done
out=$(PSQL_TIMEOUT=40 psqlq -c "SELECT updated, failed FROM d365.d365_pull_changes()" 2>&1)
rc=$?
kill "$LOCKER" 2>/dev/null
wait "$LOCKER" 2>/dev/null
LOCKER=
psqlq -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '$DB' AND query LIKE '%pg_sleep(60)%' AND pid <> pg_backend_pid()" >/dev/null 2>&1
sleep 0.5
out2=$(psqlq -c "SELECT updated, failed FROM d365.d365_pull_changes()" -c "SELECT name FROM rd_person WHERE id = 1" 2>&1)
if [ $rc = 0 ] && grep -q 'locked by another transaction' <<<"$out" && grep -qx 'Augusta' <<<"$out2"; then
    ok "a pull gives up on a row another session holds FOR UPDATE with a clear error, and the next pull applies the change"
else
    notok "a pull gives up on a row another session holds FOR UPDATE with a clear error, and the next pull applies the change" \
        "exit $rc: $out" "next pull: $out2"
fi

# -- 4. an update of 0.2 with duplicate and unconfirmed links
UDB=${DB}_upd
timeout 60 dropdb --if-exists --force "$UDB" >/dev/null 2>&1
timeout 60 createdb "$UDB" || { notok "set-up: createdb $UDB"; exit 0; }
"$D365_SIMCTL" reset >/dev/null
out=$(timeout 120 psql -X -q -At -P pager=off -v ON_ERROR_STOP=1 -d "$UDB" -v sim_url="$D365_SIM_URL" 2>&1 <<'SQL'
CREATE EXTENSION d365sync VERSION '0.2' CASCADE;
UPDATE d365.settings
   SET org_url = :'sim_url', authority_url = :'sim_url',
       tenant_id = '11111111-1111-1111-1111-111111111111',
       client_id = '22222222-2222-2222-2222-222222222222',
       client_secret = 'sim-secret', contact_sync_enabled = true, min_score = 10;
CREATE TABLE rd_person (id integer PRIMARY KEY, name text, score integer);
INSERT INTO rd_person VALUES (1, 'Ada', 50), (2, 'Bob', 50);
SELECT d365.d365_attach_contacts('rd_person');
INSERT INTO d365.field_map VALUES ('name', 'firstname');
SELECT created FROM d365.d365_sync_contacts();
-- what 0.2 let any writer do
INSERT INTO rd_person SELECT 3, 'Mallory', 50, dynamics365_related_id FROM rd_person WHERE id = 1;
INSERT INTO rd_person VALUES (4, 'Eve', 50, 'dddddddd-0000-4000-8000-000000000004');
ALTER EXTENSION d365sync UPDATE TO '0.3';
SELECT 'rows ' || count(*) FILTER (WHERE dynamics365_related_id IS NOT NULL) FROM rd_person;
SELECT 'attachment ' || value FROM d365.d365_status() WHERE item = 'attachment';
UPDATE rd_person SET dynamics365_related_id = NULL WHERE id = 3;
SELECT d365.d365_attach_contacts('rd_person');
SELECT 'attachment ' || value FROM d365.d365_status() WHERE item = 'attachment';
SELECT 'sync ' || created || ' ' || updated || ' ' || failed FROM d365.d365_sync_contacts();
SELECT 'refused ' || contact_key || ' ' || last_error_code FROM d365.contact_state WHERE last_error_code IS NOT NULL;
SQL
)
rc=$?
if [ $rc = 0 ] && grep -q 'WARNING:.*share a Dynamics 365 id' <<<"$out" \
   && grep -q "WARNING:.*2 row(s) of public.rd_person hold a link" <<<"$out" \
   && grep -qx 'rows 4' <<<"$out" \
   && grep -q '^attachment broken: the unique index on dynamics365_related_id of public.rd_person is missing' <<<"$out" \
   && grep -qx 'attachment ok' <<<"$out" && grep -qx 'sync 1 0 1' <<<"$out" \
   && grep -qx 'refused 4 d365sync.link' <<<"$out"; then
    ok "an update of 0.2 with links sharing an id warns, keeps every row, reports the missing index until fixed, and refuses the unconfirmed link"
else
    notok "an update of 0.2 with links sharing an id warns, keeps every row, reports the missing index until fixed, and refuses the unconfirmed link" \
        "exit $rc" "$(sed 's/^/  /' <<<"$out" | head -n 30)"
fi
timeout 60 dropdb --if-exists --force "$UDB" >/dev/null 2>&1
exit 0
