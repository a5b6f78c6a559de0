#!/usr/bin/env bash
# test/packaging.sh: the release files agree with each other.  META.json is
# valid and names the version the control file and the Makefile build;
# LICENSE is the PostgreSQL License META.json declares; CHANGELOG.md has an
# entry for the version.  Prints "ok N - ..." / "not ok N - ...".
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
. "$REPO/test/lib.sh"

control=$(sed -n "s/^default_version = '\(.*\)'/\1/p" "$REPO/d365sync.control")
make_version=$(sed -n 's/^EXTVERSION = //p' "$REPO/Makefile")
if meta=$(/usr/bin/python3 -c '
import json, sys
m = json.load(open(sys.argv[1]))
for k in ("name", "abstract", "version", "maintainer", "license", "provides", "meta-spec"):
    assert k in m, k
p = m["provides"]["d365sync"]
print(m["version"], p["version"], m["license"], p["file"])
' "$REPO/META.json" 2>&1); then
    read -r version pversion license file <<<"$meta"
    if [ "$version" = "$control.0" ] && [ "$pversion" = "$version" ] && [ "$make_version" = "$control" ] \
        && [ -e "$REPO/$file" ]; then
        ok "META.json names version $version, as d365sync.control ($control) and the Makefile ($make_version)"
    else
        notok "META.json version $version / $pversion / file $file against control $control and Makefile $make_version"
    fi
else
    notok "META.json is not valid: $meta"
    license=
fi
if [ "$license" = "postgresql" ] && head -n 1 "$REPO/LICENSE" | grep -qx "PostgreSQL License"; then
    ok "LICENSE is the PostgreSQL License that META.json declares"
else
    notok "LICENSE and META.json's license ($license) disagree"
fi
if grep -q "^## $control\b" "$REPO/CHANGELOG.md"; then
    ok "CHANGELOG.md has an entry for $control"
else
    notok "CHANGELOG.md has no entry for $control"
fi
# -Werror in development and CI builds only
pgc=${PG_CONFIG:-pg_config}
dev=$(make -C "$REPO" -n -B d365sync.o PG_CONFIG="$pgc" D365_WERROR=1 CI= 2>&1)
ci=$(make -C "$REPO" -n -B d365sync.o PG_CONFIG="$pgc" D365_WERROR= CI=true 2>&1)
user=$(make -C "$REPO" -n -B d365sync.o PG_CONFIG="$pgc" D365_WERROR= CI= 2>&1)
if grep -q -- '-Wall' <<<"$user" && ! grep -qE -- '-Werror( |$)' <<<"$user" \
    && grep -qE -- '-Werror( |$)' <<<"$dev" && grep -qE -- '-Werror( |$)' <<<"$ci"; then
    ok "a user's build warns, a development (D365_WERROR=1) or CI (CI=true) build fails on warnings"
else
    notok "-Werror is not where it belongs: $(grep -o -- '-W[a-z-]*' <<<"$user" | tr '\n' ' ')"
fi
# where the README's commands install: the system's PostgreSQL, said aloud,
# unless D365_PG_BIN names a private copy (make is stubbed: only the choice
# of PostgreSQL and what is said about it are checked here)
announce() {
    env -u D365_PG_BIN ${1:+D365_PG_BIN=$1} bash -c '
        . "$0/scripts/lib.sh"
        make() { echo "make $*" >&2; }
        d365_build 2>&1; echo "PG_CONFIG=$PG_CONFIG"' "$REPO"
}
sys=$(announce)
priv=$(announce /tmp/d365-priv/usr/lib/postgresql/15/bin)
if grep -q 'into the system PostgreSQL (/usr/lib/postgresql/15/bin)' <<<"$sys" &&
   grep -q 'scripts/pg-sandbox.sh' <<<"$sys" && grep -qx 'PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config' <<<"$sys" &&
   grep -q 'into /tmp/d365-priv/usr/lib/postgresql/15/bin/.. (D365_PG_BIN)' <<<"$priv" &&
   grep -q 'make .*PG_CONFIG=/tmp/d365-priv/usr/lib/postgresql/15/bin/pg_config.* install' <<<"$priv" &&
   grep -q 'scripts/pg-sandbox.sh' "$REPO/README.md" && grep -q 'D365_PG_BIN' "$REPO/README.md"; then
    ok "the scripts say they install into the system PostgreSQL unless D365_PG_BIN names a private copy (README: pg-sandbox.sh)"
else
    notok "installing into the system PostgreSQL is not an explicit, documented choice"
    diag "$sys" "$priv"
fi
