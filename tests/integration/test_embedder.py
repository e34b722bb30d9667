"""dlib ResNet face descriptor: .dat reader, ONNX conversion, parity with the real dlib."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from server.inference.onnxruntime import OnnxRuntimeBackend
from server.modelbuild.dlib_format import DlibFormatError
from server.modelbuild.dlib_resnet import (
    INPUT_NAME,
    MODEL_NAME,
    OUTPUT_NAME,
    AddPrevLayer,
    AffineLayer,
    ConvLayer,
    FcLayer,
    PoolLayer,
    build_embedder_onnx,
    read_resnet,
)
from server.modelbuild.sources import EMBEDDER_DAT, dlib_model_file

REFERENCE_NPZ = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "dlib_reference_faces.npz"


@pytest.fixture(scope="module")
def dat_path() -> Path:
    return dlib_model_file(EMBEDDER_DAT)


@pytest.fixture(scope="module")
def model_bytes(dat_path) -> bytes:
    return build_embedder_onnx(dat_path).SerializeToString()


@pytest.fixture(scope="module")
def backend(tmp_path_factory, model_bytes):
    repo = tmp_path_factory.mktemp("models")
    path = repo / MODEL_NAME / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(model_bytes)
    b = OnnxRuntimeBackend(repo, threads=2, providers=["CPUExecutionProvider"])
    yield b
    b.close()


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    if not REFERENCE_NPZ.is_file():
        pytest.skip(f"dlib reference outputs not found at {REFERENCE_NPZ} (shared/ is not next to this checkout)")
    with np.load(REFERENCE_NPZ, allow_pickle=False) as data:
        return {"chip": data["chip"], "descriptor": data["descriptor"]}


def embed(backend: OnnxRuntimeBackend, chips: np.ndarray, batch: int = 32) -> np.ndarray:
    outs = [backend.run(MODEL_NAME, {INPUT_NAME: chips[i : i + batch]})[OUTPUT_NAME] for i in range(0, len(chips), batch)]
    return np.concatenate(outs)


# --- reader ----------------------------------------------------------------------------------
def test_reader_follows_the_known_architecture(dat_path):
    net = read_resnet(dat_path)
    convs = [l for l in net.layers if isinstance(l, ConvLayer)]
    assert len(convs) == 29
    assert sum(isinstance(l, AffineLayer) for l in net.layers) == 29
    assert sum(isinstance(l, AddPrevLayer) for l in net.layers) == 14
    assert convs[0].weights.shape == (32, 3, 7, 7) and convs[0].stride == (2, 2) and convs[0].pad == (0, 0)
    assert convs[-1].weights.shape == (256, 256, 3, 3)
    pools = [l for l in net.layers if isinstance(l, PoolLayer)]
    assert [p.kind for p in pools] == ["max"] + ["avg"] * 5 and pools[-1].is_global
    fc = net.layers[-1]
    assert isinstance(fc, FcLayer) and fc.weights.shape == (256, 128) and fc.bias is None
    np.testing.assert_allclose(net.input.mean, [122.782, 117.001, 104.298], atol=1e-4)
    assert net.input.size == (150, 150)
    assert net.loss.distance_threshold == pytest.approx(0.6) and net.loss.margin == pytest.approx(0.04)
    assert net.parameter_count() == 5_607_488
    assert all(np.isfinite(c.weights).all() and np.isfinite(c.bias).all() for c in convs)


@pytest.mark.parametrize("keep", [0, 100, 289, 300, 5_000_000, -1])
def test_truncated_file_raises_format_error(dat_path, tmp_path, keep):
    data = dat_path.read_bytes()
    bad = tmp_path / "truncated.dat"
    bad.write_bytes(data[:keep])
    with pytest.raises(DlibFormatError):
        read_resnet(bad)


def test_trailing_bytes_raise_format_error(dat_path, tmp_path):
    bad = tmp_path / "trailing.dat"
    bad.write_bytes(dat_path.read_bytes() + b"\x01\x00")
    with pytest.raises(DlibFormatError, match="trailing"):
        read_resnet(bad)


def test_other_network_is_rejected():
    # the 5-point shape predictor is a valid dlib file but not this network
    with pytest.raises(DlibFormatError):
        read_resnet(dlib_model_file("shape_predictor_5_face_landmarks.dat"))


# --- ONNX graph ------------------------------------------------------------------------------
def test_build_is_deterministic(dat_path, model_bytes):
    assert build_embedder_onnx(dat_path).SerializeToString() == model_bytes


def test_graph_passes_checker_and_has_the_agreed_interface(model_bytes):
    model = onnx.load_from_string(model_bytes)
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    (inp,) = model.graph.input
    (out,) = model.graph.output
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert inp.name == INPUT_NAME and dims(inp) == ["N", 150, 150, 3]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert out.name == OUTPUT_NAME and dims(out) == ["N", 128]
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 29 and ops.count("Transpose") == 1
    assert "BatchNormalization" not in ops  # affine layers are folded into the convs
    assert len({n.name for n in model.graph.node}) == len(ops)


# --- parity with dlib ------------------------------------------------------------------------
def test_matches_dlib_on_all_reference_chips(backend, reference):
    chips, want = reference["chip"], reference["descriptor"].astype(np.float32)
    assert chips.dtype == np.uint8 and len(chips) > 0
    got = embed(backend, chips)
    assert got.shape == want.shape and got.dtype == np.float32
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= 0.99999, f"min cosine {cos.min()}"
    assert np.abs(got - want).max() <= 1e-4, f"max abs diff {np.abs(got - want).max()}"
    # descriptors are raw, not L2-normalised (dlib's are about 1.25-1.65 long)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)


def test_uint8_and_float32_inputs_agree(backend, reference):
    chips = reference["chip"][:32]
    from_uint8 = backend.run(MODEL_NAME, {INPUT_NAME: chips})[OUTPUT_NAME]
    from_float = backend.run(MODEL_NAME, {INPUT_NAME: chips.astype(np.float32)})[OUTPUT_NAME]
    np.testing.assert_array_equal(from_uint8, from_float)


def test_dynamic_batch_gives_the_same_per_chip_output(backend, reference):
    chips = reference["chip"][:64]
    single = np.concatenate([backend.run(MODEL_NAME, {INPUT_NAME: c[None]})[OUTPUT_NAME] for c in chips])
    for batch in (7, 64):
        np.testing.assert_allclose(embed(backend, chips, batch), single, rtol=0, atol=1e-5)
