#!/usr/bin/env bash
# A private copy of the installed PostgreSQL 15 (server, headers, PGXS,
# pg_cron), for developers who build and test several checkouts at once:
#   bash scripts/pg-sandbox.sh DIR
#   export D365_PG_BIN=DIR/usr/lib/postgresql/15/bin
# PostgreSQL finds its share, lib and include directories relative to its
# binaries, so `make install` with that copy's pg_config installs d365sync
# into DIR only, and scripts/test.sh (through scripts/lib.sh) uses it.
set -euo pipefail
dir=${1:?usage: scripts/pg-sandbox.sh DIR}
. "$(dirname "$0")/lib.sh"
d365_install_packages
mkdir -p "$dir/usr/lib/postgresql" "$dir/usr/share/postgresql" "$dir/usr/include"
cp -a /usr/lib/postgresql/15 "$dir/usr/lib/postgresql/"
cp -a /usr/share/postgresql/15 "$dir/usr/share/postgresql/"
cp -a /usr/include/postgresql "$dir/usr/include/"
chmod 755 "$dir"
echo "export D365_PG_BIN=$dir/usr/lib/postgresql/15/bin"
