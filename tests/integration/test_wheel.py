"""The shipped package: the wheel built from this checkout holds the server, the index and the web page,
nothing of the benchmarks, tests or load tests, and runs from where it is installed (no import reaches
back into the checkout).

The wheel is built with the test environment's setuptools (no build isolation, no download); it is
unpacked into a folder that stands first on sys.path, and the commands run from a folder outside the
checkout, so that every `server` / `index` import resolves inside the unpacked wheel. The
dependencies come from the test environment (installing them afresh from PyPI is what
`pip install facerec-server-*.whl` does; docs/benchmarks.md gives that check's command).
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0:
        pytest.fail(f"pip wheel failed: {proc.stderr[-2000:]}")
    (wheel,) = out.glob("facerec_server-*.whl")
    site = out / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    return site


def run_from(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def test_wheel_holds_the_server_and_nothing_of_the_checkout_tools(unpacked):
    top = {p.name for p in unpacked.iterdir() if not p.name.endswith(".dist-info")}
    assert top == {"server", "index"}
    for page in ("index.html", "app.js", "style.css"):
        assert (unpacked / "server" / "http" / "ui" / page).is_file()
    shipped = [p.relative_to(unpacked).as_posix() for p in unpacked.rglob("*.py")]
    assert not [p for p in shipped if "bench" in p or p.startswith(("tests/", "loadtests/", "benchmarks/"))]


def test_cli_and_every_module_import_from_the_installed_wheel(unpacked, tmp_path):
    help_ = run_from(unpacked, "-m", "server", "--help", cwd=tmp_path)
    assert help_.returncode == 0, help_.stderr
    for command in ("serve", "models", "keys", "import"):
        assert command in help_.stdout
    # every shipped module imports from the wheel alone (the lazy GPU paths need packages that
    # are absent here: torch is optional, tritonclient is in the test extras)
    modules = sorted(
        ".".join(p.relative_to(unpacked).with_suffix("").parts).removesuffix(".__init__")
        for p in unpacked.rglob("*.py") if p.name != "__main__.py"
    )
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    module = importlib.import_module(name)\n"
        f"    assert module.__file__.startswith({str(unpacked)!r}), (name, module.__file__)\n"
        "print(len(sys.modules))\n"
    )
    proc = run_from(unpacked, "-c", script, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_shipped_code_never_reaches_into_the_checkout(unpacked):
    """Lazy imports too (a CLI command or a GPU path imported inside a function): no shipped module
    imports the repository's tests, load tests, benchmarks or tools, or edits sys.path to find them."""
    import ast

    offenders = []
    for path in unpacked.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(unpacked)}: import {n}" for n in names
                          if n.split(".")[0] in {"tests", "loadtests", "benchmarks", "tools"}]
            if (isinstance(node, ast.Attribute) and node.attr in {"insert", "append"}
                    and isinstance(node.value, ast.Attribute) and node.value.attr == "path"
                    and isinstance(node.value.value, ast.Name) and node.value.value.id == "sys"):
                offenders.append(f"{path.relative_to(unpacked)}:{node.lineno}: sys.path.{node.attr}")
    assert not offenders
