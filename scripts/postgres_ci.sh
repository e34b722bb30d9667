#!/usr/bin/env bash
# Makes PostgreSQL's server binaries available for tests/integration/test_postgres.py (idempotent, for CI):
#
#   scripts/postgres_ci.sh          # as root on Debian/Ubuntu: apt-get install postgresql if missing
#
# The tests start their own throw-away server (tests/support/pg_cluster.py: initdb in a temp dir, run as the
# `postgres` user when root, 127.0.0.1 on an ephemeral port, stopped and deleted afterwards), so
# nothing is started here and the package's default cluster is not used. Without the binaries the
# PostgreSQL tests skip and say why. FR_TEST_DATABASE_URL=postgresql://... uses an existing server.
set -euo pipefail

find_initdb() {
    command -v initdb 2>/dev/null && return 0
    ls -1d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1
}

if [ -n "$(find_initdb)" ]; then
    echo "postgresql: $("$(find_initdb)" --version)"
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "postgresql: not installed and cannot install it here (needs root + apt-get); its tests will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# the package's post-install creates (and on systemd hosts starts) a default cluster; the tests do not use it
apt-get install -y -qq --no-install-recommends postgresql >/dev/null
echo "postgresql: $("$(find_initdb)" --version)"
