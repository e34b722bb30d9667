"""The Grafana dashboard (deploy/grafana/facerec-dashboard.json): every query names a real series.

Our series come from a Metrics object with every family exercised once (prometheus_client's text
exposition lists each sample name: histograms as _bucket/_sum/_count, counters as _total); Triton's
from its documentation (TRITON_SERIES). Each panel has a title and the ${datasource} variable, and
the ConfigMap the kustomize overlays generate for Grafana's sidecar carries the same JSON.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics
from tests.unit.test_deploy import K8S, OVERLAYS, find, render

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "facerec-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Triton Inference Server's documented series, docs/user_guide/metrics.md of
# github.com/triton-inference-server/server ("Inference Request Metrics": counts and the default
# counter latencies in microseconds, per model with labels model and version; "GPU Metrics": per GPU
# with label gpu_uuid, collected through DCGM when --allow-gpu-metrics is on).
TRITON_SERIES = {
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
    "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
    "nv_gpu_utilization", "nv_gpu_memory_total_bytes", "nv_gpu_memory_used_bytes", "nv_gpu_power_usage",
    "nv_gpu_power_limit", "nv_energy_consumption",
}

# ----------------------------------------------------------------------------- PromQL names
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "atan2", "inf", "nan"}
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_OFFSET = re.compile(r"\boffset\s+-?(?:\d+(?:ms|[smhdwy]))+")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NUMBERS = re.compile(r"(?<![\w:])(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)")
_IDENT = re.compile(r"(?<![\w:$])([A-Za-z_:][\w:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The series an expression selects: identifiers that are not functions (followed by "("),
    keywords, label names (inside {...} or a by/without/on/ignoring list), durations or numbers."""
    text = _STRINGS.sub(" ", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery durations ($__rate_interval)
    text = _OFFSET.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _NUMBERS.sub(" ", text)
    return {m.group(1) for m in _IDENT.finditer(text) if not m.group(2) and m.group(1).lower() not in KEYWORDS}


def test_metric_names_parser():
    expr = ('histogram_quantile(0.99, sum by (le, route) (rate(facerec_x_bucket{namespace=~"$ns", code="60"}'
            '[$__rate_interval]))) / 1e6 / clamp_min(sum(rate(nv_y{a="b"}[5m])) by (model), 1e-9) '
            '+ on (pod) group_left (mode) up offset 5m > bool 2.5')
    assert metric_names(expr) == {"facerec_x_bucket", "nv_y", "up"}
    assert metric_names('max by (collection, mode) (facerec_index_mode{pod=~"$pod"})') == {"facerec_index_mode"}


# ----------------------------------------------------------------------------- the dashboard
def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    """Top-level panels and those inside collapsed rows."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out += panel.get("panels", [])
    return out


def expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    out = [(p["title"], t["expr"]) for p in all_panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)  # Grafana's, not PromQL
            out.append((f"${var['name']}", inner.group(1) if inner else query))
    return out


def exported_series() -> set[str]:
    """Every sample name /metrics can carry: each family of a Metrics object exercised once."""
    metrics = Metrics()
    metrics.add_model("face_embedder")
    metrics.observe_request("GET", "/api/v1/recognition/subjects", 200, 0.01)
    metrics.observe_error("/api/v1/recognition/recognize", 503, 60)
    metrics.set_detector("yunet")
    metrics.watch_admission(lambda: (1, 2, 4))
    metrics.watch_index(lambda: {"c0": {"faces": 3, "mode": "flat", "memory_bytes": 1024}})
    families = list(text_string_to_metric_families(metrics.render()[0].decode()))
    empty = [f.name for f in families if not f.samples]
    assert not empty, f"families without samples (exercise them above): {empty}"
    return {s.name for f in families for s in f.samples}


def unknown_series(dashboard: dict, known: set[str]) -> list[tuple[str, str]]:
    return sorted((where, name) for where, expr in expressions(dashboard) for name in metric_names(expr)
                  if name not in known)


@pytest.fixture(scope="module")
def known() -> set[str]:
    ours = exported_series()
    assert not ours & TRITON_SERIES
    return ours | TRITON_SERIES


def test_every_query_names_a_real_series(known):
    dashboard = load()
    names = {n for _, expr in expressions(dashboard) for n in metric_names(expr)}
    assert unknown_series(dashboard, known) == []
    # the panels the dashboard promises are there: requests, errors by code, admission, batcher, index, Triton
    for series in ("facerec_http_request_duration_seconds_bucket", "facerec_http_errors_total",
                   "facerec_inference_requests_running", "facerec_inference_requests_waiting",
                   "facerec_batch_queue_delay_seconds_bucket", "facerec_batch_size_rows_sum",
                   "facerec_inference_seconds_bucket", "facerec_index_faces", "facerec_index_mode",
                   "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us", "nv_gpu_utilization"):
        assert series in names, series


def test_a_wrong_series_name_is_caught(known):
    dashboard = load()
    broken = copy.deepcopy(dashboard)
    target = all_panels(broken)[1]["targets"][0]
    target["expr"] = target["expr"].replace("facerec_http_request_duration_seconds_count",
                                            "facerec_http_requests_duration_seconds_count")
    assert unknown_series(broken, known) == [(all_panels(broken)[1]["title"], "facerec_http_requests_duration_seconds_count")]
    triton = next(p for p in all_panels(broken) if p.get("title", "").startswith("Triton requests"))
    triton["targets"][0]["expr"] = triton["targets"][0]["expr"].replace("nv_inference_request_success", "nv_inference_requests")
    assert ("Triton requests/s by model", "nv_inference_requests") in unknown_series(broken, known)


def test_panels_have_titles_datasources_and_ids():
    dashboard = load()
    assert dashboard["schemaVersion"] >= 39 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "pod"} <= set(variables)
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel.get("title"), panel
        assert panel.get("datasource") == DATASOURCE, panel["title"]
        for target in panel.get("targets", []):
            assert target.get("datasource") == DATASOURCE, panel["title"]
            assert target["expr"].strip() and target.get("refId"), panel["title"]
        if panel["type"] != "row":
            assert panel.get("targets"), panel["title"]
            pos = panel["gridPos"]
            assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == DATASOURCE
    # our selectors use the variables; Triton's pods are other pods, so only the namespace applies there
    for where, expr in expressions(dashboard):
        if where.startswith("$"):
            continue
        for selector in re.findall(r"\b(facerec_\w+)\{([^}]*)\}", expr):
            assert 'namespace=~"$namespace"' in selector[1] and 'pod=~"$pod"' in selector[1], (where, expr)
        for selector in re.findall(r"\b(nv_\w+)\{([^}]*)\}", expr):
            assert 'namespace=~"$namespace"' in selector[1], (where, expr)
    # Triton's panels sit in a row of their own (no data on the CPU overlay)
    (triton_row,) = [p for p in dashboard["panels"] if p["type"] == "row" and "Triton" in p["title"]]
    assert triton_row["panels"] and all(
        "nv_" in t["expr"] for p in triton_row["panels"] for t in p["targets"])
    outside = [p for p in dashboard["panels"] if p is not triton_row]
    assert not any("nv_" in t["expr"] for p in outside for t in p.get("targets", []))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlays_ship_the_dashboard_for_grafanas_sidecar(overlay):
    docs = render(K8S / "overlays" / overlay)
    config_map = find(docs, "ConfigMap", "facerec-grafana-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "facerec"
    assert config_map["data"] == {"facerec-dashboard.json": DASHBOARD.read_text()}
    assert json.loads(config_map["data"]["facerec-dashboard.json"]) == load()
