#!/usr/bin/env bash
# test/fdw.sh: foreign tables on 50,000 Dataverse rows -- a full scan in
# bounded memory, a selective query that fetches only its rows, and a
# cancel in the middle of a scan.
#
# scripts/test.sh runs it with the cluster and simulator it started; run
# alone it starts its own:
#   bash test/fdw.sh                    # builds and installs first
#   D365_SKIP_BUILD=1 bash test/fdw.sh  # uses the installed extension
# Prints "ok N - ..." / "not ok N - ..." and always exits 0.
set -uo pipefail

DB=d365fdw
BG_PID=
. "$(dirname "$0")/lib.sh"
t_begin fdw
t_on_exit() {
    [ -z "$BG_PID" ] || { kill "$BG_PID" 2>/dev/null; wait "$BG_PID" 2>/dev/null; }
    simctl reset >/dev/null 2>&1
}
t_standalone || exit 0

simctl reset >/dev/null
t_create_db "$DB"
if ! psqlq >"$TMPD/setup.log" 2>&1 <<SQL
$(t_configure_sql)
CREATE SERVER dataverse FOREIGN DATA WRAPPER d365_fdw;
CREATE SCHEMA dv;
IMPORT FOREIGN SCHEMA dataverse LIMIT TO (accounts) FROM SERVER dataverse INTO dv;
SQL
then
    notok "set-up: creating the server and importing failed" "$(tail -n 5 "$TMPD/setup.log")"
    exit 0
fi
# 50,000 accounts: numberofemployees is i % 100, so each value is 1 % of them
simctl generate account '{"count": 50000, "values": {"name": "Bulk {i}", "accountnumber": "N-{i}",
    "description": "A row of the 50,000-row read test, long enough to weigh something: {i}",
    "numberofemployees": {"mod": 100}, "revenue": {"mod": 1000}}}' >/dev/null
simctl clear-requests >/dev/null

# -- 1. a full scan of every column streams in the memory of one page: the
# backend's peak resident memory after the first page (a 5,000-row scan)
# hardly grows over the 50,000 rows, ten pages, that follow
out=$(psqlq 2>&1 <<'SQL'
CREATE FUNCTION pg_temp.hwm() RETURNS bigint LANGUAGE sql AS
$$ SELECT substring(pg_read_file('/proc/' || pg_backend_pid() || '/status') FROM 'VmHWM:\s+(\d+)')::bigint $$;
SELECT pg_temp.hwm() AS start \gset
SELECT count(*) FROM (SELECT a FROM dv.accounts a LIMIT 5000) x WHERE length(a::text) > 0;
SELECT pg_temp.hwm() AS first \gset
SELECT count(*), sum(length(a::text)) > 10000000 FROM dv.accounts a;
SELECT :first - :start, pg_temp.hwm() - :first;
SQL
)
rows=$(sed -n 2p <<<"$out")
page=$(sed -n 3p <<<"$out" | cut -d'|' -f1)
grew=$(sed -n 3p <<<"$out" | cut -d'|' -f2)
if [ "$rows" = "50002|t" ] && [ -n "$grew" ] && [ -n "$page" ] && [ "$grew" -lt "$page" ]; then
    ok "a scan of 50,002 rows (over 10 MB of text) streams: peak memory grew ${grew} kB over the ${page} kB one page took"
else
    notok "a scan of 50,000 rows in bounded memory" "$out"
fi
pages=$(simctl requests --kind api | python3 -c '
import json, sys
reqs = [r for r in json.load(sys.stdin)["requests"] if "/accounts?" in r["path"]]
print(len(reqs), sum(1 for r in reqs if "skiptoken" in r["path"]),
      all("odata.maxpagesize=5000" in (r["headers"].get("prefer") or "") for r in reqs))')
if [ "$pages" = "12 10 True" ]; then
    ok "the scans asked for pages of 5,000 rows and followed @odata.nextLink (12 requests, 10 next links)"
else
    notok "paging with odata.maxpagesize and @odata.nextLink" "requests, next links, maxpagesize: $pages"
fi

# -- 2. a selective query (1 % of the rows) fetches only those rows
simctl clear-requests >/dev/null
simctl reset-stats >/dev/null
out=$(psqlq -c "SELECT count(*), min(numberofemployees), max(numberofemployees)
                  FROM dv.accounts WHERE numberofemployees = 7 AND revenue IS NOT NULL" 2>&1)
sent=$(simctl requests --kind api | python3 -c '
import json, sys, urllib.parse
for r in json.load(sys.stdin)["requests"]:
    print(urllib.parse.unquote(r["path"]))')
if [ "$out" = "500|7|7" ] &&
   [ "$sent" = '/api/data/v9.2/accounts?$select=numberofemployees&$filter=revenue ne null and numberofemployees eq 7' ]; then
    ok "a query for 1 % of the rows sends its condition and gets its 500 rows in one request"
else
    notok "a selective query fetches only its rows" "result: $out" "sent: $sent"
fi

# -- ANALYZE reads the rows once: the planner then expects about 500 rows
# (1 %) of the query above, not the 5 of a table it knows nothing about
out=$(psqlq -c "ANALYZE dv.accounts" \
            -c "SELECT reltuples FROM pg_class WHERE oid = 'dv.accounts'::regclass" \
            -c "EXPLAIN SELECT * FROM dv.accounts WHERE numberofemployees = 7" 2>&1)
est=$(sed -n 's/.*Foreign Scan.* rows=\([0-9]*\).*/\1/p' <<<"$out")
if [ "$(sed -n 1p <<<"$out")" = 50002 ] && [ -n "$est" ] && [ "$est" -ge 300 ] && [ "$est" -le 700 ]; then
    ok "ANALYZE counts the 50,002 rows and the planner expects $est rows of the 1 % query"
else
    notok "ANALYZE of a foreign table" "$out"
fi

# -- 3. a page answered with 429 (service protection) is asked for again
# after Retry-After, as the sync's requests are: the scan is whole
simctl clear-requests >/dev/null
simctl fault '{"method": "GET", "path_regex": "accounts\\?.*skiptoken", "skip": 3, "status": 429,
               "headers": {"Retry-After": "1"},
               "json": {"error": {"code": "0x80072321", "message": "Combined execution time of incoming requests exceeded limit"}}}' >/dev/null
out=$(psqlq -c "SELECT count(*) FROM dv.accounts" 2>&1)
statuses=$(simctl requests --kind api | python3 -c '
import json, sys
print(" ".join(str(r["status"]) for r in json.load(sys.stdin)["requests"] if "/accounts?" in r["path"]))')
simctl clear-faults >/dev/null
if [ "$out" = 50002 ] && [ "$statuses" = "200 200 200 200 429 200 200 200 200 200 200 200" ]; then
    ok "a page throttled with 429 is fetched again after Retry-After and the scan is whole"
else
    notok "a 429 mid-scan" "result: $out" "statuses: $statuses"
fi

# -- 4. a cancel in the middle of a scan returns at once: pages of 1,000
# rows, the third held back by Dataverse for 30 s
psqlq -c "ALTER SERVER dataverse OPTIONS (ADD page_size '1000')" >/dev/null
simctl clear-requests >/dev/null
simctl fault '{"method": "GET", "path_regex": "accounts\\?.*skiptoken", "skip": 1, "delay_ms": 30000}' >/dev/null
PGAPPNAME=fdw_scan psql -X -q -At -d "$DB" >"$TMPD/scan.out" 2>&1 \
    -c "SELECT count(*) FROM dv.accounts" &
BG_PID=$!
wait_sql "SELECT count(*) = 1 FROM pg_stat_activity WHERE application_name = 'fdw_scan' AND wait_event_type = 'Extension'" 20
sleep 0.5
t0=$(now_ms)
psqlq -c "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'fdw_scan'" >/dev/null
wait "$BG_PID"
t1=$(now_ms)
BG_PID=
got=$(cat "$TMPD/scan.out")
npages=$(simctl requests --kind api | python3 -c '
import json, sys
print(sum(1 for r in json.load(sys.stdin)["requests"] if "/accounts?" in r["path"]))')
if grep -q "canceling statement due to user request" <<<"$got" && [ $((t1 - t0)) -lt 3000 ] &&
   [ "$npages" = 3 ]; then
    ok "a cancel during the third page's request returns in $((t1 - t0)) ms"
else
    notok "a cancel mid-scan returns promptly" "after $((t1 - t0)) ms, $npages page requests:" "$got"
fi
simctl clear-faults >/dev/null
# the session that was cancelled is usable, and the next scan is whole
out=$(psqlq -c "SELECT count(*) FROM dv.accounts" 2>&1)
if [ "$out" = 50002 ]; then
    ok "after the cancel the next scan reads every row"
else
    notok "a scan after a cancel" "$out"
fi
