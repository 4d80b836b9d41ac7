"""Vendor-host mode end to end: the real Caddy (``qwen-edit vendor-host``, its local CA) answers for
api.wavespeed.ai and wavespeed.ai in front of the session's real server, and real clients run with
their built-in URL (the Python SDK with no base URL, huggingface_hub's ``provider="wavespeed"`` with
the Hub's mapping answered here, WaveSpeed's ComfyUI workflow replayed call for call) in a process whose name resolution points those names at the proxy.
A second proxy with a certificate from another CA (trustme's) serves the same way."""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import API_KEY, ROOT, ServerProc, free_port, png_bytes

pytestmark = pytest.mark.e2e
HOSTS = "api.wavespeed.ai,wavespeed.ai"
HERE = Path(__file__).resolve().parent / "vendor_host"


def _start_proxy(server: ServerProc, folder: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    log = open(folder / "caddy.log", "wb")  # noqa: SIM115 - owned by the process
    command = [sys.executable, "-m", "server.cli", "vendor-host", "--upstream", f"127.0.0.1:{server.port}"]
    command += ["--https-port", str(port), "--storage", str(folder / "caddy"), *extra]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, port


def _wait_tls(proc: subprocess.Popen[bytes], port: int, folder: Path, ca: Path | None = None) -> Path:
    """Until the proxy completes a TLS handshake for api.wavespeed.ai; the CA root clients must trust."""
    root = ca or folder / "caddy" / "pki" / "authorities" / "local" / "root.crt"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, (folder / "caddy.log").read_text()
        if root.exists():
            context = ssl.create_default_context(cafile=str(root))
            try:
                with httpx.Client(verify=context, timeout=5) as client:
                    # Connect to the proxy's port, but name the vendor's host (SNI and Host).
                    r = client.get(
                        f"https://127.0.0.1:{port}/livez",
                        extensions={"sni_hostname": "api.wavespeed.ai"},
                        headers={"Host": "api.wavespeed.ai"},
                    )
                if r.status_code == 200:
                    return root
            except (httpx.HTTPError, ssl.SSLError):
                pass
        time.sleep(0.2)
    raise TimeoutError((folder / "caddy.log").read_text())


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def proxy(server: ServerProc, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """The proxy with Caddy's local CA: (its port, the root clients trust)."""
    proc, port = _start_proxy(server, tmp_path)
    try:
        yield port, _wait_tls(proc, port, tmp_path)
    finally:
        _stop(proc)


def _client_env(tmp_path: Path, port: int, ca: Path, server: ServerProc) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(HERE / "pin_hosts.py", site / "sitecustomize.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WAVESPEED_", "HF_", "HUGGING"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]),
        QWEN_EDIT_TEST_PINNED_HOSTS=HOSTS,
        QWEN_EDIT_TEST_PROXY_PORT=str(port),
        # Trusting the proxy's CA, as the README says for Python: requests, then httpx and ssl.
        REQUESTS_CA_BUNDLE=str(ca),
        SSL_CERT_FILE=str(ca),
        # The Hub is out of reach: its provider-mapping call comes here.
        HF_ENDPOINT=server.url,
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HOME=str(tmp_path / "hf"),
    )
    return env


def test_real_clients_with_their_default_url_through_the_proxy(
    server: ServerProc, proxy: tuple[int, Path], tmp_path: Path
) -> None:
    port, ca = proxy
    image = tmp_path / "in.png"
    image.write_bytes(png_bytes((96, 96)))
    proc = subprocess.run(
        [sys.executable, str(HERE / "clients.py"), API_KEY, str(image)],
        env=_client_env(tmp_path, port, ca, server),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:] + server.log()
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["sdk_base_url"] == "https://api.wavespeed.ai"  # nothing was re-pointed
    # Every link the server handed out names the host the client called, so it came back the same way.
    assert report["sdk_upload"].startswith("https://api.wavespeed.ai/files/uploads/")
    assert report["sdk_outputs"][0].startswith("https://api.wavespeed.ai/files/outputs/")
    assert report["sdk_output_size"] == [256, 256]
    assert report["hf_output_size"][0] > 0
    # WaveSpeed's ComfyUI workflow: the model picked from the GUI catalogue, a random seed up to
    # 9999999998 used as sent, links on the API host.
    assert report["comfyui_model"] == "wavespeed-ai/qwen-image/edit"
    assert report["comfyui_seed_used"] == report["comfyui_seed_sent"]
    assert report["comfyui_upload"].startswith("https://api.wavespeed.ai/files/uploads/")
    assert report["comfyui_output"].startswith("https://api.wavespeed.ai/files/outputs/")
    assert report["comfyui_output_size"] == [256, 256]


def test_a_certificate_from_the_users_own_ca(server: ServerProc, tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert(*HOSTS.split(","))
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    ca.cert_pem.write_to_path(str(ca_file))
    proc, port = _start_proxy(server, tmp_path, "--cert", str(cert_file), "--key", str(key_file))
    try:
        _wait_tls(proc, port, tmp_path, ca=ca_file)  # verified against the user's CA alone
        context = ssl.create_default_context(cafile=str(ca_file))
        with httpx.Client(verify=context, timeout=10) as client:
            r = client.post(
                f"https://127.0.0.1:{port}/api/v3/media/upload/binary",
                files={"file": ("a.png", png_bytes(), "image/png")},
                headers={"Host": "wavespeed.ai", "Authorization": f"Bearer {API_KEY}"},
                extensions={"sni_hostname": "wavespeed.ai"},
            )
        assert r.status_code == 200, r.text
        assert r.json()["data"]["download_url"].startswith("https://wavespeed.ai/files/uploads/")
    finally:
        _stop(proc)
