#!/usr/bin/env bash
# test/docs_snippets.sh: every SQL snippet of README.md and docs/*.md runs as
# printed, and pg_cron runs d365sync's jobs with the documented set-up.
#
# scripts/test.sh runs it after pg_regress, with d365sync installed; run alone
# it builds and installs first (D365_SKIP_BUILD=1 skips that):
#   bash test/docs_snippets.sh
#
# It starts its own simulator (accepting the credentials the docs show) and
# two throwaway clusters configured as docs/operations.md says, with a stock
# Debian pg_hba.conf (peer on the socket, scram on loopback TCP).  The rules
# (which fences run, the directives, how the Dynamics URLs are replaced) are
# described in docs/README.md; test/docs_snippets.py does the work.
#
# Prints one "ok ..." / "not ok ..." line per page and one for the pg_cron
# check, diagnostics as "# ..." lines, and always exits 0.
set -uo pipefail

DOCS_REPO=$(cd "$(dirname "$0")/.." && pwd)
. "$DOCS_REPO/scripts/lib.sh"

if [ -z "${D365_SIM_URL:-}" ] && [ "${D365_SKIP_BUILD:-}" != 1 ]; then
    d365_build >/dev/null 2>&1 || { echo "not ok docs snippets - set-up: the build failed"; exit 0; }
fi
export PG_BIN
timeout 300 /usr/bin/python3 "$DOCS_REPO/test/docs_snippets.py" "$DOCS_REPO" ||
    echo "not ok docs snippets - the runner stopped (exit status $?)"
exit 0
