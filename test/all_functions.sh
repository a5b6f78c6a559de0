#!/usr/bin/env bash
# test/all_functions.sh: every function of schema d365, read from the
# catalog (not from a hand list), called with NULL, empty and zero
# arguments in five configuration states:
#   1. nothing configured          2. configured, no table attached
#   3. attached, nothing mapped    4. attached and mapped (synced once)
#   5. the attached table dropped
# Errors are fine; a crash is not.  Each call runs in its own transaction
# (rolled back, so no call changes the state for the next), with
# VERBOSITY verbose and SHOW_CONTEXT always; at the end the postmaster must
# be the one that started (no crash restart), the server log must show no
# backend killed by a signal, and the client secret must appear in no
# output.  Trigger functions cannot be called directly and are skipped.
#
# scripts/test.sh runs it with the cluster and simulator it started; run by
# itself it starts its own (test/lib.sh, t_standalone).
# Prints "ok N - ..." / "not ok N - ..." lines with diagnostics as "# ...".
set -uo pipefail

. "$(dirname "$0")/lib.sh"
t_begin allfn
t_standalone || exit 0
SECRET="sim-secret"
DB=postgres PSQL_STOP=0 PSQL_TIMEOUT=300    # psqlq: each call names its database

started=$(psqlq -d postgres -c "SELECT pg_postmaster_start_time()")
# scripts/lib.sh writes the server log beside the data directory
LOG=${D365_WORK:-$(dirname "${PGDATA:-/nonexistent/x}")}/postgres.log
log_lines=0
[ -f "$LOG" ] && log_lines=$(wc -l <"$LOG")

# The calls: for every function (not a trigger), all arguments NULL, all
# "empty" ('' / '{}' / 0 / false), all "other" ('x' / '[]' / -1 / true),
# and for several arguments each one NULL with the others empty.
# Polymorphic arguments are passed as text (anyarray as text[]).
GEN_SQL=$(cat <<'SQL'
WITH f AS (
    SELECT p.oid, p.oid::regprocedure AS sig, p.proname,
           coalesce(array_agg(CASE
               WHEN t.typname IN ('anyelement', 'anycompatible', 'anynonarray') THEN 'text'::regtype
               WHEN t.typname IN ('anyarray', 'anycompatiblearray') THEN 'text[]'::regtype
               ELSE t.oid::regtype END ORDER BY a.n) FILTER (WHERE a.n IS NOT NULL), '{}') AS types
      FROM pg_proc p
      LEFT JOIN LATERAL unnest(p.proargtypes::oid[]) WITH ORDINALITY a(typ, n) ON true
      LEFT JOIN pg_type t ON t.oid = a.typ
     WHERE p.pronamespace = 'd365'::regnamespace
       AND p.prorettype NOT IN ('trigger'::regtype, 'event_trigger'::regtype)
       AND p.prokind = 'f'
     GROUP BY p.oid),
v AS (
    SELECT f.oid, f.proname, f.types, k.kind, k.nullpos
      FROM f,
           LATERAL (SELECT 'null' AS kind, 0 AS nullpos
                    UNION ALL SELECT 'empty', 0
                    UNION ALL SELECT 'other', 0
                    UNION ALL SELECT 'one null', i FROM generate_series(1, cardinality(f.types)) i
                     WHERE cardinality(f.types) > 1) k),
lit AS (
    SELECT v.*, (SELECT string_agg(
                   CASE WHEN v.kind = 'null' OR (v.kind = 'one null' AND i = v.nullpos) THEN 'NULL'
                        ELSE quote_literal(CASE
                            WHEN typ::text LIKE '%[]' THEN CASE v.kind WHEN 'other' THEN '{NULL}' ELSE '{}' END
                            WHEN typ IN ('jsonb'::regtype, 'json'::regtype) THEN CASE v.kind WHEN 'other' THEN '[]' ELSE '{}' END
                            WHEN typ IN ('smallint'::regtype, 'integer'::regtype, 'bigint'::regtype,
                                         'numeric'::regtype, 'real'::regtype, 'double precision'::regtype,
                                         'oid'::regtype, 'regclass'::regtype, 'regtype'::regtype,
                                         'regproc'::regtype, 'regprocedure'::regtype)
                                THEN CASE v.kind WHEN 'other' THEN '-1' ELSE '0' END
                            WHEN typ = 'boolean'::regtype THEN CASE v.kind WHEN 'other' THEN 'true' ELSE 'false' END
                            WHEN typ = 'uuid'::regtype THEN CASE v.kind WHEN 'other' THEN 'ffffffff-ffff-ffff-ffff-ffffffffffff'
                                                                         ELSE '00000000-0000-0000-0000-000000000000' END
                            WHEN typ IN ('timestamp with time zone'::regtype, 'timestamp without time zone'::regtype, 'date'::regtype)
                                THEN CASE v.kind WHEN 'other' THEN 'infinity' ELSE 'epoch' END
                            WHEN typ = 'interval'::regtype THEN CASE v.kind WHEN 'other' THEN '-1 day' ELSE '0' END
                            ELSE CASE v.kind WHEN 'other' THEN 'x' ELSE '' END END)
                   END || '::' || typ::text, ', ' ORDER BY i)
                   FROM unnest(v.types) WITH ORDINALITY u(typ, i)) AS args
      FROM v)
SELECT format(E'BEGIN;\nSELECT %s -- %s\n  FROM d365.%I(%s) AS r;\nROLLBACK;',
              quote_literal(proname || ' ' || kind), 'call', proname, coalesce(args, ''))
  FROM lit ORDER BY proname, kind, nullpos;
SQL
)

# set_state DB N: a database in state N
set_state() {
    local db=$1 n=$2
    timeout 60 dropdb --if-exists "$db" >/dev/null 2>&1
    timeout 60 createdb "$db" || return 1
    {
        echo "\\set ON_ERROR_STOP 1"
        echo "CREATE EXTENSION d365sync CASCADE;"
        if [ "$n" -ge 2 ]; then
            cat <<SQL
UPDATE d365.settings
   SET org_url = '$D365_SIM_URL', authority_url = '$D365_SIM_URL',
       tenant_id = '11111111-1111-1111-1111-111111111111',
       client_id = '22222222-2222-2222-2222-222222222222',
       client_secret = '$SECRET', contact_sync_enabled = true, min_score = 1;
SQL
        fi
        if [ "$n" -ge 3 ]; then
            cat <<'SQL'
CREATE TABLE person (id integer PRIMARY KEY, first_name text, email text, kids smallint,
                     score integer NOT NULL DEFAULT 10);
INSERT INTO person VALUES (1, 'Ada', 'ada@example.com', 1, 50), (2, 'Bob', NULL, NULL, 50);
SELECT d365.d365_attach_contacts('person');
SQL
        fi
        if [ "$n" -ge 4 ]; then
            cat <<'SQL'
INSERT INTO d365.field_map VALUES ('first_name', 'firstname'), ('email', 'emailaddress1'),
                                  ('kids', 'numberofchildren');
SELECT created FROM d365.d365_sync_contacts();
SELECT d365.d365_log_activity(1, 'phonecall', 'Called');
SQL
        fi
        if [ "$n" -ge 5 ]; then
            echo "DROP TABLE person CASCADE;"
        fi
    } | psqlq -d "$db" >"$TMPD/setup$n.log" 2>&1
}

names=("" "nothing configured" "configured, no table attached" "attached, nothing mapped"
       "attached and mapped" "the attached table dropped")
t=0
total=0
for n in 1 2 3 4 5; do
    db=d365allfn$n
    t=$((t + 1))
    if ! set_state "$db" "$n"; then
        echo "not ok $t - state $n (${names[$n]}): set-up failed"
        diag <"$TMPD/setup$n.log"
        continue
    fi
    psqlq -d "$db" -c "$GEN_SQL" >"$TMPD/calls$n.sql" 2>"$TMPD/gen$n.log"
    calls=$(grep -c '^SELECT ' "$TMPD/calls$n.sql")
    total=$((total + calls))
    {
        echo "SET statement_timeout = '60s';"
        echo "\\set VERBOSITY verbose"
        echo "\\set SHOW_CONTEXT always"
        cat "$TMPD/calls$n.sql"
        echo "SELECT 'still here';"
    } | timeout 900 psql -X -P pager=off -d "$db" >"$TMPD/out$n.log" 2>&1
    rc=$?
    now=$(psqlq -d postgres -c "SELECT pg_postmaster_start_time()" 2>/dev/null)
    if [ "$rc" -ne 0 ] || [ "$calls" -lt 50 ] || [ "$now" != "$started" ] ||
       ! grep -q 'still here' "$TMPD/out$n.log" ||
       grep -qE 'server closed the connection|terminated by signal|connection to server was lost' "$TMPD/out$n.log"; then
        echo "not ok $t - state $n (${names[$n]}): $calls calls, no crash"
        echo "psql exit $rc, postmaster started $started, now $now" | diag
        grep -B3 -E 'server closed|terminated|lost' "$TMPD/out$n.log" | diag
    else
        echo "ok $t - state $n (${names[$n]}): $calls calls, no crash"
    fi
    t=$((t + 1))
    if grep -q "$SECRET" "$TMPD/out$n.log"; then
        echo "not ok $t - state $n: the client secret appears in no output"
        grep -B2 "$SECRET" "$TMPD/out$n.log" | diag
    else
        echo "ok $t - state $n: the client secret appears in no output ($(grep -c '^ERROR' "$TMPD/out$n.log") errors read)"
    fi
    timeout 60 dropdb --if-exists "$db" >/dev/null 2>&1
done

t=$((t + 1))
if [ -f "$LOG" ]; then
    tail -n +"$((log_lines + 1))" "$LOG" >"$TMPD/server.log"
    if grep -qE 'terminated by signal|was terminated|all server processes terminated' "$TMPD/server.log"; then
        echo "not ok $t - the server log shows no backend killed during the $total calls"
        grep -E 'terminated' "$TMPD/server.log" | diag
    else
        echo "ok $t - the server log shows no backend killed during the $total calls"
    fi
else
    echo "not ok $t - the server log shows no backend killed (no server log at $LOG)"
fi
exit 0
