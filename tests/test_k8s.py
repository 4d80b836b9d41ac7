"""docker/k8s/: the kustomize base and overlays rendered with `kubectl kustomize`, validated offline
against the Kubernetes schemas (kubernetes-validate) and KEDA's (tests/schemas/), and checked
against the code they run, as tests/test_docker.py does for compose: every setting name, every
command line, the probes' paths, the Secrets wired in, KEDA's query on a real job store.

No cluster runs here: these checks catch what can be caught without one.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from server.cli import build_parser
from server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "docker" / "k8s"
KEDA_SCHEMA = json.loads((Path(__file__).parent / "schemas" / "keda.sh_v1alpha1.json").read_text())
TARGETS = ["base", "overlays/dev", "overlays/prometheus-scaling"]
# The oldest Kubernetes minor still commonly run, and the newest the package knows.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
SETTINGS = Settings.env_names()


def render(target: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl not found: it renders docker/k8s/ (`kubectl kustomize`); install kubectl")
    proc = subprocess.run([kubectl, "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {target: render(target) for target in TARGETS}


def test_every_resource_is_valid_against_its_schema(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for target, docs in rendered.items():
        assert docs, target
        for doc in docs:
            where = f"{target}: {doc['kind']}/{doc['metadata']['name']}"
            if doc["apiVersion"].startswith("keda.sh/"):
                jsonschema.validate(doc, {**KEDA_SCHEMA, "$ref": f"#/$defs/{doc['kind']}"})
                continue
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    pytest.fail(f"{where} is not valid Kubernetes {version}: {exc.message} at {list(exc.path)}")
            assert doc["metadata"].get("namespace", "qwen-edit") == "qwen-edit" or doc["kind"] == "Namespace", where


def test_the_schemas_refuse_what_is_wrong(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The validation is real: a misspelt field fails it, for Kubernetes' kinds and KEDA's."""
    docs = rendered["base"]
    scaled = json.loads(json.dumps(find(docs, "ScaledObject", "qwen-edit-worker")))
    scaled["spec"]["maxReplicas"] = 8  # KEDA calls it maxReplicaCount
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, {**KEDA_SCHEMA, "$ref": "#/$defs/ScaledObject"})
    api = json.loads(json.dumps(find(docs, "Deployment", "qwen-edit-api")))
    container(api)["readinesProbe"] = container(api).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(api, K8S_VERSIONS[0], strict=True)


def test_commands_and_settings_fit_the_code(rendered: dict[str, list[dict[str, Any]]]) -> None:
    parser = build_parser()
    for target, docs in rendered.items():
        for doc in docs:
            if doc["kind"] == "ConfigMap":
                assert {k for k in doc["data"] if k.startswith("QWEN_EDIT_")} <= SETTINGS, (target, doc["data"])
            if doc["kind"] not in ("Deployment", "StatefulSet", "Job"):
                continue
            for c in doc["spec"]["template"]["spec"]["containers"]:
                names = set(env_of(c))
                assert {n for n in names if n.startswith("QWEN_EDIT_")} <= SETTINGS, (target, names - SETTINGS)
                if c.get("image", "").startswith("qwen-edit"):
                    # The image's ENTRYPOINT is `qwen-edit`: its args are a command line of the real CLI.
                    assert "command" not in c
                    assert parser.parse_args(c["args"]).command in ("serve", "worker")

    docs = rendered["base"]
    api, worker = find(docs, "Deployment", "qwen-edit-api"), find(docs, "Deployment", "qwen-edit-worker")
    assert container(api)["args"] == ["serve", "--workers", "0"]  # API only: the GPUs are the workers'
    assert container(worker)["args"] == ["worker"]  # one worker per pod, restarted by Kubernetes
    config = find(docs, "ConfigMap", "qwen-edit-config")["data"]
    assert config["QWEN_EDIT_STORAGE_URL"].startswith("s3://")
    for deployment in (api, worker):
        c = container(deployment)
        assert {"configMapRef": {"name": "qwen-edit-config"}} in c["envFrom"]
        env = env_of(c)
        # PostgreSQL and S3 come from Secrets, under the names the settings and boto3 read.
        assert env["QWEN_EDIT_DATABASE_URL"]["secretKeyRef"]["name"] == "qwen-edit-database"
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert "QWEN_EDIT_API_KEYS" in env_of(container(api))


def test_workers_hold_one_gpu_each_and_outlast_their_drain(rendered: dict[str, list[dict[str, Any]]]) -> None:
    worker = find(rendered["base"], "Deployment", "qwen-edit-worker")
    c = container(worker)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(c)["QWEN_EDIT_DEVICE"] == "cuda"
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain = float(env_of(c).get("QWEN_EDIT_WORKER_DRAIN_S") or Settings().worker_drain_s)
    assert grace > drain + 10, "the kubelet's SIGKILL would cut the drain short"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/weights"]["readOnly"] is True and env_of(c)["QWEN_EDIT_MODEL"] == "/weights"
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0  # no spare GPU to surge onto


def test_api_service_and_probes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from server.api.routes.ops import router

    docs = rendered["base"]
    api, service = find(docs, "Deployment", "qwen-edit-api"), find(docs, "Service", "qwen-edit-api")
    pod_labels = api["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["app.kubernetes.io/component"] == "api"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http"}]
    c = container(api)
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    port = int(re.search(r"QWEN_EDIT_PORT=(\d+)", dockerfile).group(1))  # type: ignore[union-attr]
    assert c["ports"] == [{"name": "http", "containerPort": port}]
    routes = {getattr(r, "path", None) for r in router.routes}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] == "http" and c[probe]["httpGet"]["path"] in routes
    # Never /readyz on the API pods: with workers scaled to zero no pod would be ready to take the
    # job that wakes them.
    assert {c[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe")} == {"/livez"}
    assert "/readyz" in routes


def test_secrets_referenced_are_the_ones_the_dev_overlay_makes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["overlays/dev"]
    secrets = {d["metadata"]["name"]: set(d["data"]) for d in docs if d["kind"] == "Secret"}
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            for c in doc["spec"]["template"]["spec"]["containers"]:
                for value in env_of(c).values():
                    if isinstance(value, dict) and "secretKeyRef" in value:
                        ref = value["secretKeyRef"]
                        assert ref["key"] in secrets.get(ref["name"], set()), (doc["metadata"]["name"], ref)
        if doc["kind"] == "TriggerAuthentication":
            for ref in doc["spec"]["secretTargetRef"]:
                assert ref["key"] in secrets.get(ref["name"], set()), ref
    config = find(docs, "ConfigMap", "qwen-edit-config")["data"]
    assert config["QWEN_EDIT_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert find(docs, "Service", "minio")["spec"]["ports"][0]["port"] == 9000
    database = find(docs, "Secret", "qwen-edit-database")
    import base64

    url = base64.b64decode(database["data"]["url"]).decode()
    assert url.startswith("postgresql://") and "@postgres:5432/" in url
    assert find(docs, "Service", "postgres")["spec"]["ports"][0]["port"] == 5432


def test_keda_scales_on_what_the_job_store_holds(rendered: dict[str, list[dict[str, Any]]], pg_url: str) -> None:
    """The ScaledObject's query, run as KEDA runs it, on a real store: it counts the jobs queued or
    running, and nothing finished."""
    import psycopg

    from server.jobs.store import JobStore
    from tests.test_overlap import _queued

    docs = rendered["base"]
    scaled = find(docs, "ScaledObject", "qwen-edit-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "qwen-edit-worker"
    assert scaled["spec"]["minReplicaCount"] == 0  # scale to zero
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "postgresql"
    auth = find(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "connection", "name": "qwen-edit-database", "key": "url"}]

    store = JobStore.open(Settings(database_url=pg_url))
    store.migrate()
    try:
        for _ in range(3):
            _queued(store)
        running = store.claim("w/0", ["edit"], 30)
        done = store.claim("w/0", ["edit"], 30)
        assert running and done and done.lease_token and store.complete(done.id, done.lease_token, [], 1)
    finally:
        store.close()
    with psycopg.connect(pg_url) as conn:
        (count,) = conn.execute(trigger["metadata"]["query"]).fetchone()  # type: ignore[misc]
    assert count == 2  # one queued, one running; the completed one does not ask for a GPU
    assert int(trigger["metadata"]["targetQueryValue"]) >= 1


def test_prometheus_scaling_reads_metrics_the_api_serves(rendered: dict[str, list[dict[str, Any]]], api: Any) -> None:
    docs = rendered["overlays/prometheus-scaling"]
    assert not [d for d in docs if d["kind"] == "TriggerAuthentication"]
    (trigger,) = find(docs, "ScaledObject", "qwen-edit-worker")["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    served = api.get("/metrics").text
    for name in set(re.findall(r"\b(qwen_edit_\w+)", trigger["metadata"]["query"])):
        assert re.search(rf"^{name}\b", served, flags=re.M), f"{name} is not in /metrics"
    annotations = find(docs, "Deployment", "qwen-edit-api")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
