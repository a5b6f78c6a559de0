#!/usr/bin/env bash
# test/generated.sh: the generated and the frozen SQL scripts are what they
# should be.  Needs no cluster.
#   - every committed upgrade script sql/d365sync--A--B.sql that has
#     hand-written steps in sql/upgrade/A--B.sql is exactly what
#     scripts/gen-sql.py makes of them and of B's functions (a stale one
#     fails with the command that regenerates it);
#   - every released install script sql/d365sync--X.Y.sql is the install
#     script of the commit tagged vX.Y (when this clone has the tag);
#   - the Makefile installs every committed script.
# Prints "ok N - ..." / "not ok N - ...".
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
. "$(dirname "$0")/lib.sh"
t_begin generated

# 1. the generated upgrade scripts are up to date
out=$(/usr/bin/python3 "$REPO/scripts/gen-sql.py" check 2>&1)
while IFS= read -r line; do
    case $line in
        "ok - "*) ok "${line#ok - }" ;;
        "not ok - "*) notok "${line#not ok - }" ;;
        *) notok "scripts/gen-sql.py check: $line" ;;
    esac
done <<<"$out"

# 2. a released install script is the one its release built
current=$(sed -n "s/^default_version = '\(.*\)'/\1/p" "$REPO/d365sync.control")
for f in "$REPO"/sql/d365sync--[0-9]*.sql; do
    v=$(basename "$f" .sql); v=${v#d365sync--}
    case $v in *--*) continue ;; esac
    [ "$v" = "$current" ] && continue
    if ! git -C "$REPO" rev-parse -q --verify "refs/tags/v$v" >/dev/null 2>&1; then
        ok "sql/d365sync--$v.sql is frozen # skip: this clone has no tag v$v"
        continue
    fi
    released=$TMPD/released.$v
    if git -C "$REPO" cat-file -e "v$v:sql/d365sync--$v.sql" 2>/dev/null; then
        git -C "$REPO" show "v$v:sql/d365sync--$v.sql" >"$released"
    elif git -C "$REPO" cat-file -e "v$v:sql/install" 2>/dev/null; then
        for p in $(git -C "$REPO" ls-tree --name-only "v$v" sql/install/ | LC_ALL=C sort); do
            git -C "$REPO" show "v$v:$p"
        done >"$released"
    else
        git -C "$REPO" show "v$v:sql/d365sync.sql" >"$released" 2>/dev/null
    fi
    if [ -s "$released" ] && cmp -s "$released" "$f"; then
        ok "sql/d365sync--$v.sql is the install script released as v$v"
    else
        notok "sql/d365sync--$v.sql differs from the install script released as v$v: a released script is never edited (git checkout v$v builds it)"
    fi
done

# 3. the Makefile installs every committed script
missing=
for f in $(git -C "$REPO" ls-files 'sql/d365sync--*.sql' 2>/dev/null || ls "$REPO"/sql/d365sync--*.sql); do
    name=$(basename "$f")
    grep -qF "sql/\$(EXTENSION)--${name#d365sync--}" "$REPO/Makefile" || missing="$missing $name"
done
if [ -z "$missing" ]; then
    ok "the Makefile's DATA lists every committed install and upgrade script"
else
    notok "the Makefile's DATA does not list:$missing"
fi
