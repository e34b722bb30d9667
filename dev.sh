#!/usr/bin/env bash
# One entry point for a fresh machine:
#   ./dev.sh serve [serve flags]   set up (venv, dependencies, models) and start the server on :8000
#   ./dev.sh test  [pytest args]   set up and run the test suite
#   ./dev.sh setup                 only set up
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
    fi
    # reinstall only when pyproject.toml changed since the last install
    local stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
        "$VENV/bin/python" -m pip install -q -e ".[test]"
        rm -f "$VENV"/.installed-*
        touch "$stamp"
    fi
    "$VENV/bin/python" -m server models build
}

cmd=${1:-help}
shift || true
case "$cmd" in
    setup) setup ;;
    serve) setup; exec "$VENV/bin/python" -m server serve "$@" ;;
    test) setup; exec "$VENV/bin/python" -m pytest "$@" ;;
    *) sed -n '2,5p' "$0"; exit 2 ;;
esac
