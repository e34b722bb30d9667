"""Property-based fuzzing of every operation in /openapi.json with schemathesis (real server, real models).

Schemathesis reads our OpenAPI document and generates requests from it (valid and invalid
parameters, bodies and ids, multipart and base64 forms); every answer must be
- no server error (never a 5xx),
- a status the document declares for the operation,
- of a declared content type, and
- a body that matches the declared schema (CompreFace's {"message", "code"} for errors).
Requests carry a key of the service their path belongs to (else every answer would be the
gate's 400 / 404 and the routes would never be reached).

Bounded for CI: FR_FUZZ_EXAMPLES examples per operation (default 30), derandomized (the same
examples every run), no per-example deadline; about a minute on 2 cores.
"""
from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from server.http.openapi import document
from server.config import Settings
from tests.support.api_server import ADMIN_TOKEN, astronaut, encode, live_server

MAX_EXAMPLES = int(os.environ.get("FR_FUZZ_EXAMPLES", "30"))
TIMEOUT_S = 30.0
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES: dict[str, int] = {}  # per operation, for the summary test


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    with live_server(tmp_path_factory.mktemp("fuzz"), model_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def keys(server) -> dict[str, str]:
    out = {t: server.create_key(t) for t in ("recognition", "detection", "verification")}
    # a real example, so that generated ids and subjects sometimes meet stored data
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT_S) as c:
        r = c.post("/api/v1/recognition/faces", params={"subject": "Fuzz"},
                   files={"file": ("a.jpg", encode(astronaut(), "JPEG"))}, headers={"x-api-key": out["recognition"]})
        assert r.status_code == 201, r.text
    return out


# The document the server serves (with its admin routes): built here, so the tests are known at
# collection time; test_served_document_is_the_one_fuzzed checks that the server serves the same.
DOCUMENT = document(Settings(admin_token=ADMIN_TOKEN), admin=True)
schema = schemathesis.openapi.from_dict(DOCUMENT)


def auth_headers(path: str, keys: dict[str, str]) -> dict[str, str]:
    for service in ("recognition", "detection", "verification"):
        if path.startswith(f"/api/v1/{service}"):
            return {"x-api-key": keys[service]}
    if path.startswith("/api/v1/admin"):
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    return {}


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_openapi_operations(case, server, keys):
    if case.path == "/api/v1/admin/keys/{key}" and case.method == "DELETE":
        keys_in_use = set(keys.values())  # never let a generated id delete the keys under test
        if str(case.path_parameters.get("key", "")).lower() in keys_in_use:
            return
    EXAMPLES[f"{case.method} {case.path}"] = EXAMPLES.get(f"{case.method} {case.path}", 0) + 1
    case.call_and_validate(base_url=server.base_url, headers=auth_headers(case.path, keys), checks=CHECKS,
                           timeout=TIMEOUT_S)


def test_served_document_is_the_one_fuzzed(server):
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT_S) as c:
        assert c.get("/openapi.json").json() == DOCUMENT


def test_fuzzing_reached_every_operation(server, keys):
    """Runs after the fuzz tests (file order): each documented operation got examples."""
    if not EXAMPLES:
        pytest.skip("the fuzz tests did not run in this session (deselected)")
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT_S) as c:
        doc = c.get("/openapi.json").json()
    documented = {f"{m.upper()} {p}" for p, ops in doc["paths"].items() for m in ops}
    assert documented <= set(EXAMPLES), documented - set(EXAMPLES)
    # schemathesis also tries undocumented methods on each path (coverage phase): counted, not listed
    print(f"\nfuzzing: {sum(EXAMPLES.values())} requests; {sum(EXAMPLES[d] for d in documented)} on the "
          f"{len(documented)} documented operations")
    # and the server is still fine
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT_S) as c:
        assert c.get("/health").json() == {"status": "OK"}
        assert c.get("/ready").status_code == 200

