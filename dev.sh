#!/usr/bin/env bash
# One entry point for a fresh machine:
#   ./dev.sh serve [serve flags]   set up (venv, dependencies, models) and start the server on :8000
#   ./dev.sh test  [pytest args]   set up (with the test tools) and run the test suite
#   ./dev.sh setup [test]          only set up
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

# install_once NAME PIP_ARGS...: pip install, skipped while pyproject.toml and the arguments are unchanged
install_once() {
    local name=$1
    shift
    local stamp="$VENV/.installed-$name-$( (cat pyproject.toml; echo "$*") | sha256sum | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        "$VENV/bin/python" -m pip install -q "$@"
        rm -f "$VENV"/.installed-"$name"-*
        touch "$stamp"
    fi
}

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
    fi
    if [ "${1:-}" = test ]; then
        install_once test -e ".[test]"
        install_once sdk --no-deps compreface-sdk==0.6.0
        # the torch backend's tests (they skip without it); 2.13.0 is the CPU build this kind of
        # machine carries on disk (a looser pin would fetch the newest release with several GB of CUDA packages)
        install_once torch torch==2.13.0 || echo "torch not installed: the torch backend's tests will skip" >&2
        scripts/triton_env.sh
    else
        install_once serve -e .
    fi
    "$VENV/bin/python" -m server models build
}

cmd=${1:-help}
shift || true
case "$cmd" in
    setup) setup "${1:-}" ;;
    serve) setup; exec "$VENV/bin/python" -m server serve "$@" ;;
    test) setup test; exec "$VENV/bin/python" -m pytest "$@" ;;
    *) sed -n '2,5p' "$0"; exit 2 ;;
esac
