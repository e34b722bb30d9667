"""Face plugins: face_plugins parsing, status/versions, head pose, and the ONNX model slots.

The slot tests build tiny ONNX models here (onnx.helper), install them into a temporary model
repository and run them through the real OnnxRuntimeBackend.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from server.inference.base import BackendError
from server.inference.onnxruntime import OnnxRuntimeBackend
from server.config import Settings
from server.vision.types import Face
from server.vision.plugins import PluginRegistry, estimate_pose, face_crops, parse_face_plugins
from server.vision.plugins.crops import CROP_SCALE
from server.vision.plugins.pose import HEAD_MODEL_MM, camera_matrix, line_of_sight_rotation, rotation_from_angles
from server.vision.plugins.slots import MASK_VALUES

# The widely used 112x112 ArcFace alignment template of a frontal face (insightface).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


# ------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    "value, expected",
    [
        (None, []),
        ("", []),
        ("age", ["age"]),
        ("age,gender", ["age", "gender"]),
        ("age gender", ["age", "gender"]),
        (" landmarks , pose,,calculator ", ["landmarks", "pose", "calculator"]),
        ("mask,unknown,landmarks2d106,pose", ["mask", "pose"]),
        ("gender,age,gender", ["gender", "age"]),
        ("AGE, Gender", ["age", "gender"]),
        ("nothing,known", []),
    ],
)
def test_parse_face_plugins(value, expected):
    assert parse_face_plugins(value) == expected


# ---------------------------------------------------------------------------- status / versions
def _registry(model_dir: Path) -> tuple[PluginRegistry, "CountingBackend"]:
    backend = CountingBackend(OnnxRuntimeBackend(model_dir, threads=1))
    return PluginRegistry(Settings(model_dir=model_dir), backend), backend


def test_status_without_models(tmp_path):
    registry, _ = _registry(tmp_path)
    status = registry.status()
    assert set(status) == {"age", "gender", "landmarks", "calculator", "mask", "pose"}
    for p in ("landmarks", "calculator", "pose"):
        assert status[p]["available"] is True and status[p]["version"]
    for p, folder in (("age", "face_age"), ("gender", "face_gender"), ("mask", "face_mask")):
        assert status[p]["available"] is False
        assert status[p]["version"] is None
        assert folder in status[p]["reason"]


def test_versions_follow_compreface_dto(tmp_path):
    registry, _ = _registry(tmp_path)
    selected = ["calculator", "age", "pose", "landmarks", "mask"]
    assert registry.versions(selected) == {
        "detector": "yunet.FaceDetector",
        "calculator": "dlib.Calculator@resnet_v1",
    }
    full = registry.versions(selected, include_all=True)
    assert set(full) == {"detector", "calculator", "pose", "landmarks"}  # age/mask unavailable
    assert registry.versions([]) == {"detector": "yunet.FaceDetector"}


def test_run_leaves_out_unavailable_plugins(tmp_path):
    registry, backend = _registry(tmp_path)
    image = np.zeros((200, 300, 3), np.uint8)
    lm = ARCFACE_TEMPLATE + [94, 44]
    faces = [Face(box=(100, 50, 200, 150), probability=0.99, landmarks=lm)]
    out = registry.run(image, faces, ["age", "gender", "mask", "calculator", "landmarks", "pose"])
    assert len(out) == 1
    assert set(out[0]) == {"landmarks", "pose", "execution_time"}
    assert set(out[0]["execution_time"]) == {"pose"}
    assert backend.calls == []
    assert registry.run(image, [], ["pose"]) == []


def test_landmarks_are_rounded_ints_and_empty_without_detection(tmp_path):
    registry, _ = _registry(tmp_path)
    image = np.zeros((100, 100, 3), np.uint8)
    lm = np.array([[10.4, 20.6], [30.5, 20.0], [20.2, 30.9], [12.0, 40.1], [28.7, 40.0]])
    faces = [Face((0, 0, 50, 60), 0.9, lm), Face((0, 0, 100, 100), 1.0, np.zeros((0, 2)))]
    out = registry.run(image, faces, ["landmarks", "pose"])
    assert out[0]["landmarks"] == [[10, 21], [30, 20], [20, 31], [12, 40], [29, 40]]
    assert all(type(v) is int for pt in out[0]["landmarks"] for v in pt)
    assert "pose" in out[0]
    assert out[1]["landmarks"] == [] and "pose" not in out[1]  # detect_faces=false: no points, no pose


# ---------------------------------------------------------------------------------------- pose
W, H = 640, 480


def _project(pitch: float, yaw: float, roll: float, t=(0.0, 0.0, 600.0)) -> np.ndarray:
    # the angles are relative to the line of sight to the nose tip (the model's origin, at t)
    r = line_of_sight_rotation(np.array(t, np.float64)) @ rotation_from_angles(pitch, yaw, roll)
    rvec, _ = cv2.Rodrigues(r)
    pts, _ = cv2.projectPoints(HEAD_MODEL_MM, rvec, np.array(t, np.float64), camera_matrix(W, H), np.zeros(4))
    return pts.reshape(-1, 2)


def _assert_pose(pose, pitch, yaw, roll, tol):
    assert pose is not None
    assert abs(pose["pitch"] - pitch) < tol, pose
    assert abs(pose["yaw"] - yaw) < tol, pose
    assert abs(pose["roll"] - roll) < tol, pose
    assert all(type(v) is float for v in pose.values())


@pytest.mark.parametrize(
    "pitch, yaw, roll, t",
    [
        (0, 0, 0, (0, 0, 600)),
        (10, -25, 15, (40, -20, 500)),
        (-20, 30, -10, (-60, 30, 700)),
        (5, 45, 0, (0, 0, 400)),
        (25, 10, 30, (100, 80, 900)),
    ],
)
def test_pose_recovers_known_rotation(pitch, yaw, roll, t):
    _assert_pose(estimate_pose(_project(pitch, yaw, roll, t), (W, H)), pitch, yaw, roll, 0.01)


def test_pose_recovers_rotation_from_noisy_landmarks():
    rng = np.random.default_rng(7)
    for pitch, yaw, roll in [(0, 0, 0), (12, -20, 8), (-15, 25, -12)]:
        pts = _project(pitch, yaw, roll) + rng.uniform(-0.5, 0.5, (5, 2))  # face ~100 px wide
        _assert_pose(estimate_pose(pts, (W, H)), pitch, yaw, roll, 2.5)


def test_pose_sign_conventions():
    base = _project(0, 0, 0)
    eyes_mid = lambda p: (p[0] + p[1]) / 2  # noqa: E731
    turned = _project(0, 20, 0)  # yaw > 0: the nose moves towards image-right of the eyes
    assert (turned[2, 0] - eyes_mid(turned)[0]) > (base[2, 0] - eyes_mid(base)[0]) + 5
    up = _project(20, 0, 0)  # pitch > 0: nose closer to the eye line (looks up)
    assert (up[2, 1] - eyes_mid(up)[1]) < (base[2, 1] - eyes_mid(base)[1]) - 5
    ccw = _project(0, 0, 20)  # roll > 0: the image-right eye is higher
    assert ccw[1, 1] < ccw[0, 1] - 5


def test_frontal_face_has_small_angles():
    # the template's 2D shape, anywhere in the frame (a corner adds a few degrees of perspective)
    for scale, centre in [(1.0, (320, 240)), (3.0, (320, 240)), (2.0, (250, 200)), (2.0, (60, 60)),
                          (2.0, (600, 440))]:
        pts = (ARCFACE_TEMPLATE - 56.0) * scale + centre
        pose = estimate_pose(pts, (W, H))
        assert pose is not None
        assert abs(pose["yaw"]) < 6 and abs(pose["pitch"]) < 4 and abs(pose["roll"]) < 2, pose


def _mirror(pts: np.ndarray, width: int) -> np.ndarray:
    m = pts.copy()
    m[:, 0] = width - m[:, 0]  # continuous coordinates: x -> W - x keeps the centre fixed
    return m[[1, 0, 2, 4, 3]]  # "left" is image-left, so left/right labels swap


@pytest.mark.parametrize("pitch, yaw, roll", [(10, -25, 15), (-12, 18, -7), (0, 30, 0)])
def test_mirroring_flips_yaw_and_roll(pitch, yaw, roll):
    pts = _project(pitch, yaw, roll, (30, 10, 600))
    a = estimate_pose(pts, (W, H))
    b = estimate_pose(_mirror(pts, W), (W, H))
    assert abs(a["pitch"] - b["pitch"]) < 0.5
    assert abs(a["yaw"] + b["yaw"]) < 0.5
    assert abs(a["roll"] + b["roll"]) < 0.5


def test_mirroring_a_real_looking_face():
    pts = (ARCFACE_TEMPLATE - 56.0) * 2.0 + (300, 220)
    pts[2, 0] += 12  # nose shifted right: face turned to its left
    a = estimate_pose(pts, (W, H))
    b = estimate_pose(_mirror(pts, W), (W, H))
    assert a["yaw"] > 5 and b["yaw"] < -5
    assert abs(a["yaw"] + b["yaw"]) < 2 and abs(a["roll"] + b["roll"]) < 2


@pytest.mark.parametrize("start", [(0, 0, 0), (8, -15, 5)])
def test_rotating_the_image_changes_roll(start):
    pts = _project(*start, t=(40, -30, 600))
    m = cv2.getRotationMatrix2D((W / 2, H / 2), 20, 1.0)  # +20 degrees about the image centre
    rotated = pts @ m[:, :2].T + m[:, 2]
    a = estimate_pose(pts, (W, H))
    b = estimate_pose(rotated, (W, H))
    assert abs((b["roll"] - a["roll"]) - 20) < 1.0
    assert abs(b["yaw"] - a["yaw"]) < 2.5 and abs(b["pitch"] - a["pitch"]) < 2.5


def test_pose_needs_four_points():
    pts = _project(5, 10, -5)
    one_missing = pts.copy()
    one_missing[4] = np.nan
    _assert_pose(estimate_pose(one_missing, (W, H)), 5, 10, -5, 0.05)
    two_missing = one_missing.copy()
    two_missing[3] = np.nan
    assert estimate_pose(two_missing, (W, H)) is None
    assert estimate_pose(np.zeros((0, 2)), (W, H)) is None


# ---------------------------------------------------------------------------------------- crops
def test_crop_geometry():
    image = np.zeros((300, 400, 3), np.uint8)
    image[100:160, 200:260] = (200, 100, 50)  # the face box, exactly
    crop = face_crops(image, [(200, 100, 260, 160)], (90, 90))[0]
    assert crop.shape == (90, 90, 3) and crop.dtype == np.float32
    inner = int(90 / CROP_SCALE)  # 60 px of face centred in a 90 px square
    lo = (90 - inner) // 2
    assert np.allclose(crop[lo + 1:lo + inner - 1, lo + 1:lo + inner - 1], (200, 100, 50))
    assert np.all(crop[:lo - 1] == 0) and np.all(crop[:, lo + inner + 1:] == 0)
    small = face_crops(image, [(200, 100, 260, 160)], (32, 48))[0]  # H=32, W=48, INTER_AREA
    assert small.shape == (32, 48, 3)
    assert np.allclose(small.mean(axis=(0, 1)), np.array([200, 100, 50]) / CROP_SCALE**2, rtol=0.02)


def test_crop_pads_outside_the_image_with_black():
    image = np.full((200, 200, 3), 90, np.uint8)
    crop = face_crops(image, [(0, 0, 60, 60)], (90, 90))[0]  # square spans -15..75
    assert np.all(crop[:15] == 0) and np.all(crop[:, :15] == 0)
    assert np.all(crop[15:, 15:] == 90)


# ---------------------------------------------------------------------------------- model slots
class CountingBackend:
    """The real backend, recording which model ran on which input shapes."""

    name = "counting"

    def __init__(self, inner: OnnxRuntimeBackend) -> None:
        self.inner = inner
        self.calls: list[tuple[str, dict[str, tuple[int, ...]]]] = []

    def run(self, model, inputs):
        self.calls.append((model, {k: tuple(v.shape) for k, v in inputs.items()}))
        return self.inner.run(model, inputs)

    def close(self) -> None:
        self.inner.close()


def _const(name: str, value) -> onnx.TensorProto:
    arr = np.asarray(value)
    dtype = TensorProto.INT64 if arr.dtype.kind == "i" else TensorProto.FLOAT
    return helper.make_tensor(name, dtype, arr.shape, arr.flatten().tolist())


def _save(repo: Path, name: str, nodes, inits, output: str, out_cols, hw=(64, 64), metadata=None,
          input_dims=None) -> None:
    dims = input_dims or ["N", hw[0], hw[1], 3]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", out_cols])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for k, v in (metadata or {}).items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    (repo / name / "1").mkdir(parents=True)
    onnx.save(model, str(repo / name / "1" / "model.onnx"))


def _mean_nodes() -> tuple[list, list]:
    """image -> m [N,1], the mean over H, W and channels."""
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["m4"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["m4", "shape_n1"], ["m"]),
    ]
    return nodes, [_const("shape_n1", np.array([-1, 1], np.int64))]


GENDER_SLOPE = 0.05
GENDER_PIVOT = 95.0
MASK_SLOPE = 0.05
BUCKETS = [[0, 2], [4, 6], [8, 12], [15, 20]]
BUCKET_W = np.array([[0.04, -0.01, 0.0, -0.03], [-0.02, 0.05, 0.01, 0.0], [0.0, -0.02, 0.03, 0.05]])


def _install_models(repo: Path, age_kind: str = "years") -> None:
    if age_kind == "years":  # age = mean intensity * 100 / 255
        nodes, inits = _mean_nodes()
        nodes.append(helper.make_node("Mul", ["m", "k"], ["age"]))
        _save(repo, "face_age", nodes, inits + [_const("k", np.float32(100 / 255))], "age", 1)
    else:  # 4 buckets from the channel means, non-square input
        nodes = [
            helper.make_node("ReduceMean", ["image"], ["c"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["c", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["age_buckets"], axis=-1),
        ]
        _save(repo, "face_age", nodes, [_const("w", BUCKET_W.astype(np.float32))], "age_buckets", 4,
              hw=(32, 48), metadata={"age_buckets": json.dumps(BUCKETS), "version": "test-1"})
    nodes, inits = _mean_nodes()  # logits (female, male) = slope * (pivot - m, m - pivot)
    nodes += [
        helper.make_node("Sub", ["m", "pivot"], ["d"]),
        helper.make_node("Mul", ["d", "dir"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["gender"], axis=-1),
    ]
    inits += [_const("pivot", np.float32(GENDER_PIVOT)),
              _const("dir", np.array([[-GENDER_SLOPE, GENDER_SLOPE]], np.float32))]
    _save(repo, "face_gender", nodes, inits, "gender", 2, hw=(48, 48))
    nodes = [  # logits = slope * channel means (R, G, B) -> without / with / incorrect
        helper.make_node("ReduceMean", ["image"], ["c"], axes=[1, 2], keepdims=0),
        helper.make_node("Mul", ["c", "s"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["mask"], axis=-1),
    ]
    _save(repo, "face_mask", nodes, [_const("s", np.float32(MASK_SLOPE))], "mask", 3, hw=(40, 40))


# Four 60 px faces, each on a uniform patch that covers its whole 90 px crop; the last one sits in
# the corner so a third of its crop is black padding.
FACE_SCENE = [
    ((170, 120, 230, 180), (200, 40, 30)),  # mean 90, red
    ((370, 120, 430, 180), (30, 180, 90)),  # mean 100, green
    ((570, 120, 630, 180), (20, 40, 210)),  # mean 90, blue
    ((0, 0, 60, 60), (90, 150, 120)),  # corner: crop spans -15..75
]


def _scene() -> tuple[np.ndarray, list[Face]]:
    image = np.zeros((300, 800, 3), np.uint8)
    faces = []
    for box, colour in FACE_SCENE:
        cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
        image[max(0, cy - 55):cy + 55, max(0, cx - 55):cx + 55] = colour
        lm = (ARCFACE_TEMPLATE - 56.0) * 0.55 + (cx, cy)
        faces.append(Face(box=box, probability=0.99, landmarks=lm))
    return image, faces


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_slots_run_installed_models(tmp_path):
    _install_models(tmp_path)
    registry, backend = _registry(tmp_path)
    status = registry.status()
    for p in ("age", "gender", "mask"):
        assert status[p]["available"] is True, status[p]
    assert registry.versions(["calculator", "age", "gender", "mask", "pose"]) == {
        "detector": "yunet.FaceDetector",
        "calculator": "dlib.Calculator@resnet_v1",
        "age": "onnx.AgeDetector",
        "gender": "onnx.GenderDetector",
        "mask": "onnx.MaskDetector",
    }

    image, faces = _scene()
    out = registry.run(image, faces, ["age", "gender", "mask", "pose", "calculator"])

    # one backend call per plugin, all four crops in it, at each model's own input size
    assert sorted(backend.calls) == [
        ("face_age", {"image": (4, 64, 64, 3)}),
        ("face_gender", {"image": (4, 48, 48, 3)}),
        ("face_mask", {"image": (4, 40, 40, 3)}),
    ]
    boxes = [f.box for f in faces]
    # the crops the models saw are what the scene says: uniform colour, corner face 25/36 covered
    coverage = np.array([1, 1, 1, (75 / 90) ** 2])
    colours = np.array([c for _, c in FACE_SCENE], np.float64)
    crops64 = face_crops(image, boxes, (64, 64)).astype(np.float64)
    assert np.allclose(crops64.mean(axis=(1, 2)), colours * coverage[:, None], rtol=0.01)

    ages = crops64.mean(axis=(1, 2, 3)) * 100 / 255
    m48 = face_crops(image, boxes, (48, 48)).astype(np.float64).mean(axis=(1, 2, 3))
    gender_p = _softmax(np.stack([GENDER_PIVOT - m48, m48 - GENDER_PIVOT], 1) * GENDER_SLOPE)
    c40 = face_crops(image, boxes, (40, 40)).astype(np.float64).mean(axis=(1, 2))
    mask_p = _softmax(c40 * MASK_SLOPE)
    for i, res in enumerate(out):
        assert res["age"] == {"probability": 1.0, "high": int(round(ages[i])), "low": int(round(ages[i]))}
        g = int(gender_p[i].argmax())
        assert res["gender"]["value"] == ("female", "male")[g]
        assert res["gender"]["probability"] == pytest.approx(gender_p[i, g], abs=1e-5)
        k = int(mask_p[i].argmax())
        assert res["mask"]["value"] == MASK_VALUES[k]
        assert res["mask"]["probability"] == pytest.approx(mask_p[i, k], abs=1e-5)
        assert set(res["execution_time"]) == {"age", "gender", "mask", "pose"}
        assert all(isinstance(v, float) and v >= 0 for v in res["execution_time"].values())
        assert "pose" in res and "calculator" not in res and "embedding" not in res
    # the scene was built so that every label and several ages differ
    assert [r["age"]["low"] for r in out] == [35, 39, 35, 33]
    assert [r["gender"]["value"] for r in out] == ["female", "male", "female", "female"]
    assert [r["mask"]["value"] for r in out] == ["without_mask", "with_mask", "mask_weared_incorrect", "with_mask"]

    # only what was asked for runs
    backend.calls.clear()
    only_gender = registry.run(image, faces, ["gender"])
    assert [c[0] for c in backend.calls] == ["face_gender"]
    assert all(set(r) == {"gender", "execution_time"} for r in only_gender)


def test_age_bucket_slot(tmp_path):
    _install_models(tmp_path, age_kind="buckets")
    registry, backend = _registry(tmp_path)
    assert registry.status()["age"] == {"available": True, "version": "onnx.AgeDetector@test-1"}
    image, faces = _scene()
    out = registry.run(image, faces, ["age"])
    assert backend.calls == [("face_age", {"image": (4, 32, 48, 3)})]  # H=32, W=48 from the model
    c = face_crops(image, [f.box for f in faces], (32, 48)).astype(np.float64).mean(axis=(1, 2))
    p = _softmax(c @ BUCKET_W)
    for i, res in enumerate(out):
        k = int(p[i].argmax())
        assert res["age"]["low"] == BUCKETS[k][0] and res["age"]["high"] == BUCKETS[k][1]
        assert res["age"]["probability"] == pytest.approx(p[i, k], abs=1e-5)
    assert len({r["age"]["low"] for r in out}) >= 2


def test_models_breaking_the_contract_are_unavailable(tmp_path):
    nodes, inits = _mean_nodes()
    nodes.append(helper.make_node("Identity", ["m"], ["years"]))
    _save(tmp_path, "face_age", nodes, inits, "years", 1)  # wrong output name
    nodes, inits = _mean_nodes()
    nodes.append(helper.make_node("Concat", ["m", "m"], ["gender"], axis=1))
    _save(tmp_path, "face_gender", nodes, inits, "gender", 2, input_dims=["N", "H", "W", 3])  # dynamic H, W
    nodes = [helper.make_node("ReduceMean", ["image"], ["c"], axes=[1, 2], keepdims=0),
             helper.make_node("Softmax", ["c"], ["mask"], axis=-1)]
    _save(tmp_path, "face_mask", nodes, [], "mask", 3)
    (tmp_path / "face_mask" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    registry, backend = _registry(tmp_path)
    status = registry.status()
    assert status["age"]["available"] is False and "age" in status["age"]["reason"]
    assert status["gender"]["available"] is False and "fixed H, W" in status["gender"]["reason"]
    assert status["mask"]["available"] is False and "cannot read" in status["mask"]["reason"]
    image, faces = _scene()
    out = registry.run(image, faces, ["age", "gender", "mask"])
    assert all(r == {"execution_time": {}} for r in out)
    assert backend.calls == []


def test_age_buckets_without_metadata_are_unavailable(tmp_path):
    nodes = [helper.make_node("ReduceMean", ["image"], ["c"], axes=[1, 2], keepdims=0),
             helper.make_node("Softmax", ["c"], ["age_buckets"], axis=-1)]
    _save(tmp_path, "face_age", nodes, [], "age_buckets", 3)
    registry, _ = _registry(tmp_path)
    assert "metadata" in registry.status()["age"]["reason"]


def test_output_width_is_checked(tmp_path):
    nodes = [helper.make_node("ReduceMean", ["image"], ["c"], axes=[1, 2], keepdims=0),
             helper.make_node("Softmax", ["c"], ["gender"], axis=-1)]
    _save(tmp_path, "face_gender", nodes, [], "gender", 3)  # declares 3 columns, gender needs 2
    _save(tmp_path, "face_mask", [helper.make_node("ReduceMean", ["image"], ["c4"], axes=[1, 2], keepdims=0),
                                  helper.make_node("Slice", ["c4", "st", "en", "ax"], ["mask"])],
          [_const("st", np.array([0], np.int64)), _const("en", np.array([2], np.int64)),
           _const("ax", np.array([1], np.int64))], "mask", "K")  # dynamic width: found at run time
    registry, _ = _registry(tmp_path)
    assert "expected 2" in registry.status()["gender"]["reason"]
    assert registry.status()["mask"]["available"] is True
    image, faces = _scene()
    with pytest.raises(BackendError, match="expected 3"):
        registry.run(image, faces, ["mask"])


def _chip_mask_model(repo: Path, meta: dict, hw=(40, 40)) -> None:
    """An operator's mask model in the dlib_chip form: uint8 chips, logits = slope * channel means."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["chips"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["f"], ["c"], axes=[1, 2], keepdims=0),
         helper.make_node("Mul", ["c", "s"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["mask"], axis=-1)],
        "chip_mask",
        [helper.make_tensor_value_info("chips", TensorProto.UINT8, ["N", hw[0], hw[1], 3])],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 3])],
        initializer=[_const("s", np.float32(MASK_SLOPE))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    (repo / "face_mask" / "1").mkdir(parents=True)
    onnx.save(model, str(repo / "face_mask" / "1" / "model.onnx"))


@pytest.mark.parametrize("meta,hw,reason", [
    ({"face_input": "dlib_chip"}, (40, 40), "chip_padding"),
    ({"face_input": "dlib_chip", "chip_padding": "wide"}, (40, 40), "chip_padding"),
    ({"face_input": "dlib_chip", "chip_padding": "0.2"}, (40, 48), "square"),
    ({"face_input": "sideways"}, (40, 40), "face_input"),
])
def test_dlib_chip_contract_errors(tmp_path, meta, hw, reason):
    _chip_mask_model(tmp_path, meta, hw)
    registry, _ = _registry(tmp_path)
    state = registry.status()["mask"]
    assert state["available"] is False and reason in state["reason"]
