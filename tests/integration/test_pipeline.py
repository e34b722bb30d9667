"""FacePipeline end to end: detect -> align -> embed on real photos, against dlib's own outputs."""
from __future__ import annotations

import numpy as np
import pytest
from skimage.data import astronaut

from server.vision.decode import decode_image


def test_astronaut_one_face_with_embedding(mtcnn_pipeline):
    faces = mtcnn_pipeline.faces(astronaut())
    assert len(faces) == 1
    f = faces[0]
    assert f.probability > 0.999
    x0, y0, x1, y1 = f.box
    assert abs(x0 - 181) <= 1 and abs(y0 - 62) <= 1 and abs(x1 - 268) <= 1 and abs(y1 - 172) <= 1
    assert f.landmarks.shape == (5, 2)
    assert f.embedding.shape == (128,) and np.isfinite(f.embedding).all()
    assert "detector" in f.timings_ms and "calculator" in f.timings_ms


def test_threshold_limit_and_order(pipeline, facedata):
    img = decode_image((facedata / "CompreFace/embedding-calculator/sample_images/015_6.jpg").read_bytes())
    faces = pipeline.faces(img)
    assert len(faces) >= 5
    areas = [f.area for f in faces]
    assert areas == sorted(areas, reverse=True)
    two = pipeline.faces(img, limit=2)
    assert [f.box for f in two] == [f.box for f in faces[:2]]
    assert all(np.allclose(a.embedding, b.embedding, atol=1e-5) for a, b in zip(two, faces))
    assert pipeline.faces(img, det_prob_threshold=1.0) == []
    assert all(f.probability > 0.85 for f in faces)
    assert pipeline.faces(img, embed=False)[0].embedding is None


def test_no_face_image(pipeline):
    rng = np.random.default_rng(1)
    assert pipeline.faces(np.zeros((480, 640, 3), np.uint8)) == []
    assert pipeline.faces(rng.integers(0, 40, (200, 300, 3), dtype=np.uint8)) == []


def test_embed_chip_whole_image(pipeline, reference_faces):
    # detect_faces=false: a dlib chip given as the whole image embeds like the chip itself
    chip = reference_faces["chip"][0]
    emb = pipeline.embed_chip(chip)
    assert emb.shape == (128,)
    assert np.abs(emb - reference_faces["descriptor"][0]).max() < 1e-4
    # any size is resized to 150x150
    assert np.linalg.norm(pipeline.embed_chip(np.repeat(np.repeat(chip, 2, 0), 2, 1)) - emb) < 0.1


def _load_reference_image(facedata, source: str) -> np.ndarray:
    if source.startswith("skimage"):
        return astronaut()
    return decode_image((facedata / source).read_bytes())


def test_descriptors_close_to_dlib_pipeline(pipeline, facedata, reference_faces):
    """Our MTCNN-based alignment vs dlib's HOG-based one: same faces, nearby descriptors
    (../shared/docs/models.md §4)."""
    ref = reference_faces
    by_source: dict[str, list[int]] = {}
    for i, s in enumerate(ref["source"]):
        by_source.setdefault(str(s), []).append(i)
    dists = []
    for source, idx in sorted(by_source.items())[:60]:
        img = _load_reference_image(facedata, source)
        faces = pipeline.faces(img, det_prob_threshold=0.5)
        if not faces:
            continue
        centres = np.array([[(f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2] for f in faces])
        for i in idx:
            l, t, r, b = ref["rect"][i]
            inside = (centres[:, 0] > l) & (centres[:, 0] < r) & (centres[:, 1] > t) & (centres[:, 1] < b)
            if inside.sum() != 1:
                continue
            emb = faces[int(np.argmax(inside))].embedding
            dists.append(float(np.linalg.norm(emb - ref["descriptor"][i])))
    dists = np.array(dists)
    assert len(dists) >= 40, f"only {len(dists)} faces matched"
    # planning measured mean 0.056, max 0.384 for MTCNN box re-map + sp5 (dlib's decision threshold is 0.6)
    assert np.mean(dists) < 0.1, np.mean(dists)
    assert np.percentile(dists, 95) < 0.25
    assert dists.max() < 0.5


def test_face_filling_a_tight_crop_is_found_by_the_padded_retry(mtcnn_pipeline):
    """MTCNN alone misses a face cropped inside its own box (no room around it); the pipeline's
    padded retry finds it, with a box inside the image and the same person's descriptor."""
    from server.vision.pipeline import FacePipeline

    pipeline = mtcnn_pipeline
    img = astronaut()
    full = pipeline.faces(img)[0]
    x0, y0, x1, y1 = full.box
    dx, dy = round(0.075 * (x1 - x0)), round(0.075 * (y1 - y0))
    crop = np.ascontiguousarray(img[y0 + dy:y1 - dy, x0 + dx:x1 - dx])
    assert not (pipeline.detector.detect(crop).probs > 0.85).any()  # the case the retry exists for

    assert pipeline.pad_retry > 0  # on by default (Settings.detect_pad_retry)
    (face,) = pipeline.faces(crop)
    h, w = crop.shape[:2]
    assert face.probability > 0.95
    assert 0 <= face.box[0] < face.box[2] <= w - 1 and 0 <= face.box[1] < face.box[3] <= h - 1
    a, b = (v / np.linalg.norm(v) for v in (face.embedding, full.embedding))
    assert np.linalg.norm(a - b) < 0.25  # same face (dlib's threshold is 0.6)

    off = FacePipeline(pipeline.backend, pipeline.shape_predictor, pipeline.detector, pad_retry=0.0)
    assert off.faces(crop) == []
    assert pipeline.faces(np.full((90, 70, 3), 128, np.uint8)) == []  # nothing to find: still nothing


def test_mtcnn_points_from_a_5_point_shape_land_near_mtcnn_landmarks(pipeline):
    """The fallback's landmarks: MTCNN's points in dlib's chip (fitted template) mapped through the
    chip transform of the 5-point shape land within a few px of MTCNN's own on the astronaut."""
    from server.vision.alignment import mtcnn_box_to_rect, mtcnn_points

    img = astronaut()
    (face,) = pipeline.faces(img, embed=False)
    shape = pipeline.shape_predictor.predict_many(img, [mtcnn_box_to_rect(face.box)])[0]
    placed = mtcnn_points(shape)
    assert placed.shape == (5, 2) and placed.dtype == np.float32
    err = np.linalg.norm(placed - face.landmarks, axis=1)
    width = face.box[2] - face.box[0]  # ~90 px; measured: 3.9-6.7 px off (a template fitted over many faces)
    assert err.max() < 0.1 * width and err.mean() < 0.07 * width, err
    assert placed[0, 0] < placed[1, 0] and placed[3, 0] < placed[4, 0]  # image-left before image-right
    assert placed[:2, 1].max() < placed[2, 1] < placed[3:, 1].min()  # eyes above the nose above the mouth


def test_mmod_fallback_finds_the_profile_face_mtcnn_misses(mtcnn_pipeline, facedata, model_dir):
    """orl s2/6: a face MTCNN never detects (any threshold, padded or not). With
    detect_fallback=mmod the pipeline returns dlib's CNN rect (real dlib: [11, 33, 58, 81]) and a
    descriptor that verifies against the same person's other photos."""
    from server.config import Settings
    from server.vision.pipeline import FacePipeline

    def load(i: int) -> np.ndarray:
        return decode_image((facedata / f"orl-att-faces/att_faces/s2/{i}.pgm").read_bytes())

    pipeline = mtcnn_pipeline
    img = load(6)
    assert pipeline.fallback is None  # off by default: CompreFace's detector is MTCNN alone
    assert pipeline.faces(img, det_prob_threshold=0.0) == []
    on = FacePipeline.from_settings(Settings(model_dir=model_dir, detect_fallback="mmod", detector="mtcnn"),
                                    backend=pipeline.backend)
    (face,) = on.faces(img)
    assert face.box == (11, 33, 58, 81)
    assert face.probability > 0.95  # sigmoid(4 x dlib's confidence 1.04)
    x0, y0, x1, y1 = face.box
    assert ((face.landmarks >= (x0 - 5, y0 - 5)) & (face.landmarks <= (x1 + 5, y1 + 5))).all()
    others = np.stack([pipeline.faces(load(i))[0].embedding for i in (1, 2, 3, 4, 5)])
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    assert np.linalg.norm(unit(others) - unit(face.embedding), axis=1).mean() < 0.6  # dlib's threshold
    # a face MTCNN finds never reaches the fallback: identical results with it on
    a, b = on.faces(astronaut()), pipeline.faces(astronaut())
    assert [f.box for f in a] == [f.box for f in b] and np.array_equal(a[0].embedding, b[0].embedding)
    assert on.faces(np.zeros((120, 160, 3), np.uint8)) == []  # nothing to find: still nothing
    with pytest.raises(ValueError, match="detect_fallback"):
        FacePipeline.from_settings(Settings(model_dir=model_dir, detect_fallback="hog"),
                                   backend=pipeline.backend)

