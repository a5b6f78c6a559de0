#!/usr/bin/env bash
# test/packaging.sh: the release files agree with each other.  META.json is
# valid and names the version the control file and the Makefile build;
# LICENSE is the PostgreSQL License META.json declares; CHANGELOG.md has an
# entry for the version.  Prints "ok N - ..." / "not ok N - ...".
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
n=0
ok() { n=$((n + 1)); echo "ok $n - $*"; }
notok() { n=$((n + 1)); echo "not ok $n - $*"; }

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
