"""The one-way flow of the code (HTTP -> core -> vision -> inference -> index/storage), kept by a test:
tools/modmap.py reads every module's imports (ast, nothing imported) and no import may climb from a
lower layer to a higher one."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def modmap():
    spec = importlib.util.spec_from_file_location("modmap", ROOT / "tools" / "modmap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_climbs_a_layer(modmap):
    graph = modmap.import_map()
    # the map is the real one: the request path is in it, import by import
    assert "server.core.service" in graph["server.http.routes.recognition"]
    assert "server.inference" in graph["server.vision.pipeline"]
    assert modmap.climbing(graph) == []


def test_a_climbing_import_is_caught(modmap, tmp_path):
    for package, source in {
        "server/__init__.py": "",
        "server/http/__init__.py": "",
        "server/http/gate.py": "from server.storage import base\n",
        "server/storage/__init__.py": "",
        "server/storage/base.py": "def helper():\n    from server.http.gate import x  # lazy imports count too\n",
        "index/__init__.py": "",
    }.items():
        path = tmp_path / package
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    graph = modmap.import_map(tmp_path)
    assert graph["server.http.gate"] == ["server.storage.base"]
    assert modmap.climbing(graph) == ["server.storage.base -> server.http.gate"]
