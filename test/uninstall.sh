#!/usr/bin/env bash
# test/uninstall.sh: the "Uninstall" section of docs/operations.md, run as
# printed, leaves nothing of d365sync in the database, and the
# application's own writes keep working.
#
# scripts/test.sh runs it with the cluster and simulator it started; run by
# itself it builds and starts its own (D365_SKIP_BUILD=1: uses what is
# installed).
#   1. a database in use as the README and the docs set it up: the
#      extension configured against the simulator, search_path and d365sync
#      settings for the database and for a role in it, an attached and
#      mapped table with linked contacts, the roles of docs/security.md with
#      rights on the contact table, and the activity trigger recipe of
#      docs/activities.md (its SQL block as printed);
#   2. runs every SQL block of the Uninstall section (the one marked
#      docs-test: error excepted) in order, stopping at the first error;
#   3. checks the catalog: no extension, schema, function, trigger, column,
#      setting or role of d365sync; and that the application's inserts,
#      updates and deletes (the activity trigger's table included) work;
#   4. without the recipe's DEPENDS ON EXTENSION lines, the section's first
#      query names the trigger function, and after the drop the
#      application's insert fails as it did before 0.3.
# Prints "ok N - ..." / "not ok N - ..." lines with diagnostics as "# ...".
set -uo pipefail

. "$(dirname "$0")/lib.sh"
t_begin uninstall
DB=d365uninst
t_on_exit() {
    [ -n "${KEEP:-}" ] ||
    for db in $DB ${DB}_old; do
        PSQL_DB=postgres psqlq -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1
    done
}
t_standalone || exit 0

# the SQL blocks of a section of a page, as printed (optionally without
# the lines matching a pattern)
section_sql() {   # section_sql PAGE HEADING [SKIP_REGEX]
    /usr/bin/python3 - "$T_REPO/$1" "$2" "${3:-}" <<'PY'
import re, sys
page, heading, skip = sys.argv[1], sys.argv[2], sys.argv[3]
lines = open(page, encoding="utf-8").read().split("\n")
start = lines.index(heading)
end = next((i for i in range(start + 1, len(lines)) if re.match(r"^#{1,2} ", lines[i])), len(lines))
i, out, error_next = start, [], False
while i < end:
    l = lines[i]
    if re.match(r"^<!--\s*docs-test:\s*error", l):
        error_next = True
    elif l.startswith("```sql"):
        j = i + 1
        while not lines[j].startswith("```"):
            j += 1
        if not error_next:
            out += [x for x in lines[i + 1:j] if not (skip and re.search(skip, x))]
        error_next = False
        i = j
    i += 1
print("\n".join(out))
PY
}

set_up() {   # set_up DB [SKIP_REGEX for the activity recipe]
    t_create_db "$1" 2>/dev/null
    PSQL_DB=$1 psqlq >"$TMPD/setup.log" 2>&1 <<SQL
SET client_min_messages = warning;
$(t_configure_sql)
UPDATE d365.settings SET contact_sync_enabled = true, min_score = 10, activity_sync_enabled = true;
ALTER DATABASE $1 SET search_path = public, d365;
ALTER DATABASE $1 SET d365sync.request_timeout_ms = '20000';
ALTER ROLE postgres IN DATABASE $1 SET d365sync.max_parallel = '2';
CREATE TABLE crm_person (id bigint PRIMARY KEY, email text, first_name text, last_name text,
                         score integer NOT NULL DEFAULT 0);
SELECT d365.d365_attach_contacts('crm_person');
INSERT INTO d365.field_map (column_name, dynamics_field) VALUES
    ('email', 'emailaddress1'), ('first_name', 'firstname'), ('last_name', 'lastname');
INSERT INTO crm_person VALUES (1, 'maria@example.com', 'Maria', 'Garcia', 80),
                              (2, 'li@example.com', 'Li', 'Wei', 40);
SELECT * FROM d365.d365_sync_contacts();
-- roles as docs/security.md makes them, with rights outside schema d365
CREATE ROLE d365_app NOLOGIN;
GRANT USAGE ON SCHEMA d365 TO d365_app;
GRANT EXECUTE ON FUNCTION d365.d365_log_activity(anyelement, text, text, jsonb, timestamptz) TO d365_app;
CREATE ROLE d365_operator NOLOGIN;
GRANT USAGE ON SCHEMA d365 TO d365_operator;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA d365 TO d365_operator;
GRANT SELECT, UPDATE ON crm_person TO d365_operator;
-- the activity trigger of docs/activities.md, as printed
SET search_path = public, d365;
$(section_sql docs/activities.md "## Logging from your own tables" "$2" | sed -n '/^CREATE TABLE crm_event/,$p')
SQL
}

# -- 1.-3. with the recipe as printed
set_up $DB ""
marked=$(PSQL_DB=$DB psqlq -c "SELECT count(*) FROM pg_depend d
                                 WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'x'
                                   AND (d.objid = 'crm_event_to_d365()'::regprocedure
                                        OR d.objid = (SELECT oid FROM pg_trigger WHERE tgname = 'crm_event_to_d365'))" 2>&1)
linked=$(PSQL_DB=$DB psqlq -c "SELECT count(*) FROM crm_person WHERE dynamics365_related_id IS NOT NULL" 2>&1)
if [ "$marked" = 2 ] && [ "$linked" = 2 ]; then
    ok "set-up: a database in use, with the activity trigger of docs/activities.md marked as the extension's"
else
    notok "set-up: a database in use, with the activity trigger of docs/activities.md marked as the extension's" \
          "marked: $marked, linked: $linked" "$(tail -n 20 "$TMPD/setup.log")"
fi

section_sql docs/operations.md "## Uninstall" >"$TMPD/uninstall.sql"
if [ "$(grep -c . "$TMPD/uninstall.sql")" -gt 20 ] &&
   PSQL_DB=$DB psqlq -f "$TMPD/uninstall.sql" >"$TMPD/uninstall.log" 2>&1; then
    ok "the Uninstall section's SQL runs as printed ($(grep -c ';' "$TMPD/uninstall.sql") statements)"
else
    notok "the Uninstall section's SQL runs as printed" "$(cat "$TMPD/uninstall.log")"
fi

left=$(PSQL_DB=$DB psqlq -F' ' <<'SQL' 2>&1
SELECT 'extension', count(*) FROM pg_extension WHERE extname = 'd365sync';
SELECT 'schema', count(*) FROM pg_namespace WHERE nspname = 'd365';
SELECT 'functions naming d365', count(*) FROM pg_proc
 WHERE prosrc LIKE '%d365%' AND pronamespace <> 'pg_catalog'::regnamespace;
SELECT 'triggers', count(*) FROM pg_trigger WHERE NOT tgisinternal;
SELECT 'link columns', count(*) FROM pg_attribute WHERE attname LIKE 'dynamics365%' AND NOT attisdropped;
SELECT 'settings', count(*) FROM pg_db_role_setting, unnest(setconfig) c
 WHERE c LIKE '%d365%' AND setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database());
SELECT 'roles', count(*) FROM pg_roles WHERE rolname IN ('d365_app', 'd365_operator');
SELECT 'rights on tables', count(*) FROM pg_class WHERE relacl::text LIKE '%d365%';
SELECT 'objects depending on the extension', count(*) FROM pg_depend
 WHERE refclassid = 'pg_extension'::regclass AND refobjid NOT IN (SELECT oid FROM pg_extension);
SQL
)
expected=$(printf '%s\n' 'extension 0' 'schema 0' 'functions naming d365 0' 'triggers 0' \
    'link columns 0' 'settings 0' 'roles 0' 'rights on tables 0' 'objects depending on the extension 0')
if [ "$left" = "$expected" ]; then
    ok "nothing of d365sync is left: extension, schema, functions, triggers, link columns, settings, roles, rights"
else
    notok "nothing of d365sync is left" "$(diff <(echo "$expected") <(echo "$left"))"
fi

out=$(PSQL_DB=$DB psqlq 2>&1 <<'SQL'
INSERT INTO crm_person VALUES (3, 'ana@example.com', 'Ana', 'Lopez', 90);
UPDATE crm_person SET email = 'maria.garcia@example.com' WHERE id = 1;
DELETE FROM crm_person WHERE id = 2;
INSERT INTO crm_event (person_id, kind, title) VALUES (1, 'call', 'After the uninstall');
TRUNCATE crm_event;
SELECT count(*) FROM crm_person;
SHOW search_path;
SQL
)
if [ "$out" = "$(printf '2\n"$user", public')" ]; then
    ok "the application's inserts, updates, deletes and truncates work, the activity trigger's table included"
else
    notok "the application's inserts, updates, deletes and truncates work" "$out"
fi

# -- 4. the recipe without its DEPENDS ON EXTENSION lines (as before 0.3)
set_up ${DB}_old "DEPENDS ON EXTENSION"
found=$(PSQL_DB=${DB}_old psqlq -c "$(section_sql docs/operations.md "## Uninstall" | sed -n '/^SELECT p.oid::regprocedure/,/;$/p')" 2>&1)
PSQL_DB=${DB}_old PSQL_STOP=0 psqlq -f "$TMPD/uninstall.sql" >"$TMPD/uninstall_old.log" 2>&1
out=$(PSQL_DB=${DB}_old PSQL_STOP=0 psqlq -c "INSERT INTO crm_event (person_id, kind, title) VALUES (1, 'call', 'x')" 2>&1)
if [ "$found" = "crm_event_to_d365()" ] && echo "$out" | grep -q 'schema "d365" does not exist'; then
    ok "unmarked, the section's first query names the trigger function, which breaks the application's inserts once d365sync is dropped"
else
    notok "unmarked, the section's first query names the trigger function, which breaks the application's inserts once d365sync is dropped" \
          "found: $found" "insert: $out"
fi
