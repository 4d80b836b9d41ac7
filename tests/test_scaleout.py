"""Scale-out on one real PostgreSQL: 3 `qwen-edit worker` processes and 2 API-only replicas
(`qwen-edit serve --workers 0`), then the faults a fleet meets: a worker killed mid-job, a worker
told to stop, the database down and back, an API replica killed or stopped.

Jobs run the real tiny diffusers pipeline, 200 of them in the bulk test (QWEN_EDIT_TEST_SCALEOUT_JOBS
changes that). They are a seed sweep of one edit (one image, one prompt, one step, no CFG): the
workers' condition caches spare them the 1 MP VAE and text-encoder passes after the first, and the
workers batch compatible jobs, so the claims race in batches as well as one by one. What is tested
is the queue, not the model: the CPU time a job costs is kept to the transformer's one step.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.jobs.contract import Job, Status
from server.jobs.store import JobStore
from server.settings import Settings
from tests.cluster import Cluster, cluster_env
from tests.support import (
    ServerProc,
    data_uri,
    database_refusing_connections,
    fresh_database,
    pg_available,
    png_bytes,
    wait_for,
)

N_JOBS = int(os.environ.get("QWEN_EDIT_TEST_SCALEOUT_JOBS", "200"))
IMAGE = data_uri(png_bytes((64, 64)))

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not pg_available(), reason="no PostgreSQL on 127.0.0.1:5432")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    with fresh_database() as url:
        env = cluster_env(
            root,
            tiny_models["edit"],
            url,
            QWEN_EDIT_LEASE_S="3",
            QWEN_EDIT_WORKER_DRAIN_S="120",
            QWEN_EDIT_BATCH_MAX_SIZE="4",
            OMP_NUM_THREADS="1",
        )
        c = Cluster(root, env)
        try:
            for _ in range(3):
                c.add_worker()
            c.add_api()
            c.add_api()
            c.wait_workers_ready(3)
            yield c
        finally:
            c.stop()


@pytest.fixture(scope="module")
def store(cluster: Cluster) -> Iterator[JobStore]:
    s = JobStore.open(Settings(database_url=cluster.env["QWEN_EDIT_DATABASE_URL"]), pool_size=2)
    yield s
    s.close()


def submit(api: ServerProc, **extra: Any) -> str:
    r = api.submit({"prompt": "x", "image": IMAGE, "size": "256*256", **extra})
    assert r.status_code == 200, r.text
    return str(r.json()["data"]["id"])


def wait_running(store: JobStore, pid: str, timeout: float = 300) -> Job:
    """The job once its pipeline runs (a denoising step done). PROCESSING alone is not that: a
    worker leases a job before it begins it, and one told to stop in between hands it back."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = store.get(pid)
        if job is not None and job.status == Status.PROCESSING and job.progress_step >= 1:
            return job
        time.sleep(0.1)
    raise TimeoutError(f"{pid} never ran a step")


def worker_of(cluster: Cluster, job: Job) -> Any:
    return next(w for w in cluster.workers if f"w{w.slot}" == job.lease_owner)


def story(cluster: Cluster, pid: str) -> list[tuple[str, str, str]]:
    """What the workers and replicas logged of a job, and every reap (a failure's message)."""
    logs = [
        *((f"w{w.slot}", w.log_path) for w in cluster.workers),
        *((f"api{n}", a.log_path) for n, a in enumerate(cluster.apis)),
    ]
    lines = []
    for name, path in logs:
        for line in path.read_text(errors="replace").splitlines() if path else []:
            if pid in line or "reaped" in line:
                try:
                    event = json.loads(line)
                except ValueError:
                    event = {"event": line}
                lines.append((str(event.get("timestamp")), name, str(event.get("event"))))
    return sorted(lines)


def test_jobs_run_exactly_once_across_replicas(cluster: Cluster, store: JobStore) -> None:
    a, b = cluster.apis
    ids = [
        submit((a, b)[i % 2], prompt="sweep", seed=i, true_cfg_scale=1.0, num_inference_steps=1) for i in range(N_JOBS)
    ]
    deadline = time.monotonic() + 120 + 5 * N_JOBS
    for pid in ids:
        assert a.wait(pid, timeout=max(1.0, deadline - time.monotonic()))["status"] == "completed"
    done = cluster.completions()
    for pid in ids:
        job = store.get(pid)
        assert job is not None and job.status == Status.COMPLETED
        assert job.attempts == 1 and len(job.outputs) == 1, (job, story(cluster, pid))
        assert done[pid] == 1  # exactly one worker completed it, once
        for api in (a, b):  # every result readable from either replica, files too
            data = api.result(pid)
            assert data["status"] == "completed" and len(data["outputs"]) == 1
            assert httpx.get(data["outputs"][0].replace(a.url, api.url), timeout=10).status_code == 200
    # The work was shared: more than one worker took part.
    assert sum(1 for w in cluster.workers if any(e.get("event") == "job completed" for e in w.events())) >= 2


def test_worker_killed_mid_job_is_reclaimed(cluster: Cluster, store: JobStore) -> None:
    a, _ = cluster.apis
    pid = submit(a, num_inference_steps=12)
    running = wait_running(store, pid)
    victim = worker_of(cluster, running)
    victim.signal(signal.SIGKILL)
    assert victim.proc is not None and victim.proc.wait(10) == -signal.SIGKILL
    cluster.add_worker()  # its replacement (a new slot); it loads while the others carry on
    data = a.wait(pid, timeout=300)
    assert data["status"] == "completed", data
    job = store.get(pid)
    assert job is not None and job.attempts == 2 and len(job.outputs) == 1
    assert cluster.completions()[pid] == 1  # the dead worker never finished it


def test_worker_told_to_stop_finishes_its_job(cluster: Cluster, store: JobStore) -> None:
    a, _ = cluster.apis
    pid = submit(a, num_inference_steps=6)
    running = wait_running(store, pid)
    w = worker_of(cluster, running)
    assert w.stop(timeout=120) == 0  # SIGTERM: drains (finishes the job), then exits cleanly
    job = store.get(pid)
    assert job is not None and job.status == Status.COMPLETED and job.attempts == 1
    assert cluster.completions()[pid] == 1
    cluster.add_worker()


def test_worker_stopped_twice_hands_its_job_back(cluster: Cluster, store: JobStore) -> None:
    a, _ = cluster.apis
    cluster.wait_workers_ready(len(cluster.workers) - 2)  # the replacements are up
    pid = submit(a, num_inference_steps=16)
    running = wait_running(store, pid)
    w = worker_of(cluster, running)
    w.signal(signal.SIGTERM)
    wait_for(lambda: any(e.get("event") == "worker stopping" for e in w.events()), 30, "the first stop request")
    w.signal(signal.SIGTERM)  # a second request: no draining, hand the job back now
    assert w.proc is not None and w.proc.wait(60) == 0
    assert any(e.get("event") == "stopping: job handed back to the queue" for e in w.events())
    data = a.wait(pid, timeout=300)
    assert data["status"] == "completed", data
    job = store.get(pid)
    assert job is not None and job.attempts == 1  # a hand-back spends no attempt
    assert job.lease_owner != running.lease_owner


def test_database_down_answers_503_then_recovers(cluster: Cluster, store: JobStore) -> None:
    """The database goes away (every connection cut, new ones refused) and comes back: meanwhile
    each replica answers 503 with Retry-After; after, every pooled connection the database closed is
    replaced, and nothing accepted before or after is lost. The outage is of this test's database
    only, so tests running beside it on the same PostgreSQL are not touched."""
    a, b = cluster.apis
    accepted = [submit((a, b)[i % 2]) for i in range(4)]
    with database_refusing_connections(cluster.env["QWEN_EDIT_DATABASE_URL"]):
        for api in (a, b):
            r = api.submit({"prompt": "x", "image": IMAGE, "size": "256*256"})
            assert r.status_code == 503, r.text
            body = r.json()
            assert body["code"] == 503 and body["data"]["error"] == body["message"] and r.headers["Retry-After"]
            got = httpx.get(f"{api.url}/api/v3/predictions/{accepted[0]}/result", headers=api.headers, timeout=10)
            assert got.status_code == 503 and got.json()["code"] == 503
            assert httpx.get(f"{api.url}/readyz", timeout=10).status_code == 503
    accepted += [submit((a, b)[i % 2]) for i in range(2)]
    for pid in accepted:  # nothing accepted before or after is lost
        assert a.wait(pid, timeout=300)["status"] == "completed"
        assert b.result(pid)["status"] == "completed"


def test_api_replica_killed_or_stopped_loses_nothing(cluster: Cluster, store: JobStore) -> None:
    a, b = cluster.apis
    ids = [submit(b) for _ in range(3)]
    # A sync-mode request in flight on b while b is stopped: the job it submitted still runs.
    sync_result: list[Any] = []

    def sync_call() -> None:
        try:
            sync_result.append(
                httpx.post(
                    f"{b.url}/api/v3/wavespeed-ai/qwen-image/edit",
                    json={"prompt": "sync", "image": IMAGE, "size": "256*256", "enable_sync_mode": True},
                    headers=b.headers,
                    timeout=120,
                )
            )
        except httpx.HTTPError as exc:
            sync_result.append(exc)

    t = threading.Thread(target=sync_call)
    t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(j.params.prompt == "sync" for j in _all_jobs(store)):
        time.sleep(0.05)
    b.kill()  # SIGKILL: a crash, not a shutdown
    t.join(130)
    # The sync job is in the store and finishes without its replica.
    sync_jobs = [j for j in _all_jobs(store) if j.params.prompt == "sync"]
    assert len(sync_jobs) == 1
    ids.append(sync_jobs[0].id)
    # A new replica comes up; then it is stopped gracefully with more work queued.
    c = cluster.add_api()
    ids += [submit(c) for _ in range(2)]
    c.stop()
    for pid in ids:
        assert a.wait(pid, timeout=300)["status"] == "completed"
        job = store.get(pid)
        assert job is not None and job.attempts == 1 and cluster.completions()[pid] == 1


def _all_jobs(store: JobStore) -> list[Job]:
    from sqlalchemy import select

    from server.jobs.models import jobs

    with store.db.engine.connect() as conn:
        return [Job.from_row(r) for r in conn.execute(select(jobs)).all()]
