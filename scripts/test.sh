#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine, as root:
#   bash scripts/test.sh
# Installs the packages, builds and installs d365sync, starts a throwaway
# PostgreSQL cluster (pg_cron preloaded) and the Dataverse simulator, runs
# the pg_regress suites, the simulator's self-test and the shell test suites
# in test/, prints the regression diffs on failure, stops everything it
# started and ends with
# "N passed, N failed".  Exit status 0 only when nothing failed.
#
# d365sync is installed into the system's PostgreSQL 15 unless D365_PG_BIN
# names another one (a private copy: bash scripts/pg-sandbox.sh DIR, then
# export D365_PG_BIN=DIR/usr/lib/postgresql/15/bin).
set -uo pipefail
. "$(dirname "$0")/lib.sh"
trap d365_stop_all EXIT

d365_install_packages || exit 1
d365_build || exit 1
d365_start_cluster contrib_regression || exit 1
d365_start_sim || exit 1

passed=0
failed=0

d365_log "running pg_regress"
cd "$D365_REPO"
rm -f regression.diffs regression.out
make -s installcheck PG_CONFIG="$PG_CONFIG" with_llvm=no 2>&1 | tee "$D365_WORK/regress.log"
p=$(grep -cE '\.\.\. ok|^ok ' "$D365_WORK/regress.log")
f=$(grep -cE '\.\.\. FAILED|^not ok ' "$D365_WORK/regress.log")
passed=$((passed + p))
failed=$((failed + f))
if [ "$p" -eq 0 ] && [ "$f" -eq 0 ]; then
    echo "pg_regress ran no test"; failed=$((failed + 1))
fi
if [ -s regression.diffs ]; then
    echo "---------------- regression.diffs ----------------"
    cat regression.diffs
    echo "--------------------------------------------------"
fi

# The simulator's own self-test (it starts a simulator of its own).
d365_log "running the simulator self-test"
/usr/bin/python3 "$D365_REPO/sim/selftest.py" 2>&1 | tee "$D365_WORK/selftest.log" | grep -E "FAIL|passed, "
if line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$D365_WORK/selftest.log" | tail -n 1); then
    passed=$((passed + $(echo "$line" | cut -d' ' -f1)))
    failed=$((failed + $(echo "$line" | cut -d' ' -f3)))
else
    echo "the simulator self-test did not report"; failed=$((failed + 1))
fi

# Shell suites: each test/*.sh prints "ok NAME" / "not ok NAME" lines.
for t in "$D365_REPO"/test/*.sh; do
    [ -e "$t" ] || continue
    [ "$(basename "$t")" = lib.sh ] && continue    # the suites' shared library
    d365_log "running $(basename "$t")"
    bash "$t" 2>&1 | tee "$D365_WORK/shell.log"
    p=$(grep -c '^ok ' "$D365_WORK/shell.log")
    f=$(grep -c '^not ok ' "$D365_WORK/shell.log")
    passed=$((passed + p))
    failed=$((failed + f))
    # a suite that stopped before its first line must not count as green
    if [ "$p" -eq 0 ] && [ "$f" -eq 0 ]; then
        echo "not ok $(basename "$t") - the suite reported no test"; failed=$((failed + 1))
    fi
done

if [ "$failed" -gt 0 ]; then
    echo "---------------- postgres.log (tail) ----------------"
    tail -n 40 "$D365_WORK/postgres.log"
    echo "---------------- simulator log (tail) ---------------"
    tail -n 20 "$D365_WORK/sim.log"
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
