"""Unit tests of the API's parsing rules and arithmetic (no server): Spring's parameter
conversions, base64 leniency, CompreFace's rounding and similarity formula."""
from __future__ import annotations

import base64
import math

import numpy as np
import pytest

from server.http import errors
from server.http.params import Params, decode_base64, image_params, parse_int, parse_uuid, validate_subject_dto
from server.config import Settings
from server.core.service import FaceService, check_embeddings, l2_normalise, round5


def params(**kw: str) -> Params:
    return Params(list(kw.items()))


def code_of(fn, *args, **kwargs) -> tuple[int, int, str]:
    with pytest.raises((errors.ApiError, *errors.EXCEPTIONS)) as info:  # the core's errors: as the API answers them
        fn(*args, **kwargs)
    err = errors.api_error(info.value)
    return err.status, err.code, err.message


@pytest.mark.parametrize("text, value", [("0", 0), (" 12 ", 12), ("-3", -3), ("0x10", 16), ("+7", 7),
                                         ("1.5", None), ("abc", None), ("", None), ("2147483648", None)])
def test_parse_int_like_spring(text, value):
    assert parse_int(text) == value


@pytest.mark.parametrize("text, value", [("true", True), ("True", True), ("ON", True), ("yes", True), ("1", True),
                                         ("false", False), ("False", False), ("off", False), ("no", False),
                                         ("0", False), ("", False), (" ", False)])
def test_booleans_like_spring(text, value):
    assert params(status=text).boolean("status", False) is value


def test_bad_values_are_400_code_26():
    assert code_of(params(status="maybe").boolean, "status", False)[:2] == (400, 26)
    assert code_of(params(limit="x").integer, "limit", 0)[:2] == (400, 26)
    assert code_of(params(det_prob_threshold="0.5.1").number, "det_prob_threshold")[:2] == (400, 26)
    assert code_of(parse_uuid, "image_id", "123")[:2] == (400, 26)


def test_first_value_wins_and_empty_means_default():
    p = Params([("limit", "2"), ("limit", "5"), ("prediction_count", "")])
    assert p.integer("limit", 0) == 2 and p.integer("prediction_count", 1) == 1
    assert params(det_prob_threshold="0.5d").number("det_prob_threshold") == 0.5  # Double.valueOf
    assert params(det_prob_threshold="").number("det_prob_threshold") is None


def test_image_params_constraints_are_joined():
    status, code, message = code_of(image_params, params(limit="-1", prediction_count="0"), prediction_count=True)
    assert (status, code) == (400, 26)
    assert message == "Limit should be equal or greater than 0; prediction_count should be equal or greater than 1; "
    p = image_params(params(limit="3", face_plugins="age", status="True", detect_faces="false"),
                     prediction_count=True, detect_faces=True)
    assert (p.limit, p.face_plugins, p.status, p.detect_faces, p.prediction_count) == (3, "age", True, False, 1)


def test_paging_like_spring_data():
    assert params().page() == (0, 20)
    assert params(page="-1", size="0").page() == (0, 20)
    assert params(page="x", size="y").page() == (0, 20)
    assert params(page="3", size="5000").page() == (3, 2000)


def test_uuid_is_canonical():
    u = "6B135F5B-A365-4522-B1F1-4C9AC2DD0728"
    assert parse_uuid("image_id", u) == u.lower()


def test_subject_dto_rules():
    assert validate_subject_dto({"subject": "x" * 50}) == "x" * 50
    assert validate_subject_dto({"subject": 42}) == "42"  # Jackson coerces scalars
    assert code_of(validate_subject_dto, {"subject": ["a"]})[:2] == (400, 0)


def test_base64_leniency():
    data = bytes(range(256)) * 3
    std = base64.b64encode(data).decode()
    assert decode_base64("file", std).data == data
    assert decode_base64("file", " \n".join([std[:100], std[100:]])).data == data
    assert decode_base64("file", base64.urlsafe_b64encode(data).decode().rstrip("=")).data == data
    assert code_of(decode_base64, "file", "data:image/png;base64," + std)[1:] == (21, "Provided value is not Base64")
    assert decode_base64("file", "").data == b""
    assert decode_base64("file", "abcde").data == b""  # undecodable length: an empty image (code 28 later)


@pytest.mark.parametrize("value, rounded", [(0.123455, 0.12346), (0.123454, 0.12345), (0.999995, 1.0),
                                            (1.0, 1.0), (0.5, 0.5), (0.000004, 0.0), (0.000005, 0.00001),
                                            (0.97857999801635742, 0.97858)])
def test_round5_is_bigdecimal_half_up(value, rounded):
    assert round5(value) == rounded


def test_similarity_formula_and_normalisation():
    settings = Settings(similarity_c0=1.1817961, similarity_c1=5.291995557)  # facenet's coefficients
    service = FaceService(settings, storage=None, index=None, pipeline=None, plugins=None)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=128), rng.normal(size=128)
    d = np.linalg.norm(a / np.linalg.norm(a) - b / np.linalg.norm(b))
    expected = (math.tanh((1.1817961 - d) * 5.291995557) + 1) / 2
    assert service.similarities(a * 3.0, (b * 0.2)[None])[0] == pytest.approx(expected, rel=1e-12)
    assert service.similarities(a, a[None])[0] == pytest.approx((math.tanh(1.1817961 * 5.291995557) + 1) / 2)
    assert np.allclose(np.linalg.norm(l2_normalise(np.stack([a, b])), axis=1), 1.0, atol=1e-6)


def test_client_embeddings_are_checked():
    assert check_embeddings([[0.5] * 128]).shape == (1, 128)
    assert code_of(check_embeddings, [[0.5] * 127])[:2] == (400, 0)
    assert code_of(check_embeddings, [[math.nan] + [0.5] * 127])[:2] == (400, 0)
    assert code_of(check_embeddings, [[0.0] * 128])[:2] == (400, 0)


def test_batcher_errors_map_to_503():
    from server.inference.scope import DeadlineExceeded, Overloaded

    err = errors.api_error(Overloaded("face_embedder", 3))
    assert (err.status, err.code, err.headers) == (503, 60, {"Retry-After": "3"})
    assert err.message == "Server is overloaded, please retry after 3 s"
    response = errors.error_response(err)
    assert response.headers["retry-after"] == "3" and response.status_code == 503
    err = errors.api_error(DeadlineExceeded("face_embedder"))
    assert (err.status, err.code, err.message) == (503, 61, "Request timed out waiting for inference")
