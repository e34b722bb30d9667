#!/usr/bin/env bash
# Builds the Triton test environment used by tests/integration/test_triton.py (idempotent, ~1 min on first run):
#
#   scripts/triton_env.sh            -> .venv-triton/ (override with TRITON_ENV=DIR, interpreter with PYTHON=...)
#
# What it holds, and why a second venv: the `nvidia-pytriton` wheel ships a CPU build of the real
# `tritonserver` (2.51) with the Python backend only, and pins numpy < 2; its Python-backend stub also
# needs a numpy < 2 interpreter (with numpy 2 every response tensor comes back empty). So:
#   .venv-triton/bin/python          numpy<2 + onnxruntime (runs our python-target model.py files)
#   .venv-triton/triton/backends/    python/ = libtriton_python.so, triton_python_backend_utils.py, the stub
#   .venv-triton/triton/env.json     paths the test fixture needs (binary, backend dir, LD_LIBRARY_PATH, PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
ENV_DIR=${TRITON_ENV:-.venv-triton}
PY=${PYTHON:-python3}
PYTRITON_SPEC="nvidia-pytriton==0.7.0"

# Same onnxruntime as the main venv when there is one, so both backends run identical kernels.
ORT_SPEC="onnxruntime>=1.18,<2"
if [ -x .venv/bin/python ]; then
    ort_version=$(.venv/bin/python -c "import onnxruntime; print(onnxruntime.__version__)" 2>/dev/null || true)
    [ -n "$ort_version" ] && ORT_SPEC="onnxruntime==$ort_version"
fi

stamp="$ENV_DIR/.installed-$(printf '%s %s %s' "$PYTRITON_SPEC" "$ORT_SPEC" "$(sha256sum "$0" | cut -c1-16)" \
    | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ -f "$ENV_DIR/triton/env.json" ]; then
    echo "triton env up to date: $ENV_DIR"
    exit 0
fi

if [ ! -x "$ENV_DIR/bin/python" ]; then
    "$PY" -m venv "$ENV_DIR"
fi
# a venv is never committed
echo '*' > "$ENV_DIR/.gitignore"
"$ENV_DIR/bin/python" -m pip install -q --upgrade pip
"$ENV_DIR/bin/python" -m pip install -q "$PYTRITON_SPEC" "numpy>=1.26,<2" "$ORT_SPEC"

"$ENV_DIR/bin/python" - "$ENV_DIR" <<'EOF'
"""Lay out the backend directory tritonserver expects and record the paths for the tests."""
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path

import pytriton

env_dir = Path(sys.argv[1]).resolve()
wheel = Path(pytriton.__file__).resolve().parent / "tritonserver"
libs = Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"
version = f"{sys.version_info.major}.{sys.version_info.minor}"
stub = wheel / "python_backend_stubs" / version / "triton_python_backend_stub"
if not stub.is_file():
    sys.exit(f"nvidia-pytriton has no Python backend stub for Python {version}")

out = env_dir / "triton"
backend_dir = out / "backends" / "python"
shutil.rmtree(out, ignore_errors=True)
backend_dir.mkdir(parents=True)
for src in (wheel / "backends" / "python" / "libtriton_python.so",
            wheel / "backends" / "python" / "triton_python_backend_utils.py", stub):
    shutil.copy2(src, backend_dir / src.name)
    os.chmod(backend_dir / src.name, 0o755)

# The stub embeds this interpreter's libpython: its own lib dir must come before any system libpython.
py_libdir = sysconfig.get_config_var("LIBDIR")
info = {
    "tritonserver": str(wheel / "bin" / "tritonserver"),
    "backend_directory": str(out / "backends"),
    "ld_library_path": [str(libs), py_libdir],
    "path": [str(env_dir / "bin")],
    "python": version,
}
(out / "env.json").write_text(json.dumps(info, indent=2) + "\n")
print(f"tritonserver: {info['tritonserver']}")
EOF

"$ENV_DIR/bin/python" -c "import numpy, onnxruntime; assert numpy.__version__ < '2', numpy.__version__; \
print('numpy', numpy.__version__, 'onnxruntime', onnxruntime.__version__)"
rm -f "$ENV_DIR"/.installed-*
touch "$stamp"
echo "triton env ready: $ENV_DIR"
