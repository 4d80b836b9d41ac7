"""Worker overlap (server/worker/overlap.py) in process: a real Worker with the fake runner, the
next job claimed ahead while one runs, outputs stored on their own threads. Order, attempts, cancel,
drain and hand-back stay as without overlap, and a job claimed ahead is never lost nor charged a try.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from benchmarks.jobs import store_job
from server.errors import INVALID_PARAMETER, JobError
from server.jobs.contract import Job, Status
from server.jobs.store import JobStore
from server.worker import overlap
from tests.support import FakeRunner, ThreadWorker, wait_for, wait_status
from tests.test_worker import finished, submit


def _queued(store: JobStore, max_attempts: int = 3) -> Job:
    job = store_job(max_attempts=max_attempts)
    store.create(job)
    return job


def warm_worker(app_settings: Any, api: Any, runner: FakeRunner) -> ThreadWorker:
    """A worker that has run one job, so it knows its time per step and claims the next job ahead
    while one runs (before anything is measured it waits for the first step instead)."""
    worker = ThreadWorker(app_settings, runner).start()
    assert finished(api, submit(api, "warm-up", num_inference_steps=1))["status"] == "completed"
    runner.calls.clear()
    return worker


def test_a_fresh_worker_leaves_the_next_job_to_an_idle_one(app_settings: Any, api: Any) -> None:
    """Before its first step a worker knows nothing of its speed: it does not claim ahead blind, so
    a job queued behind a long first job goes to another worker that can start it now."""
    runner, other_runner = FakeRunner(), FakeRunner()
    busy = ThreadWorker(app_settings, runner).start()
    other: ThreadWorker | None = None
    try:
        first = submit(api, "hang", num_inference_steps=30)
        wait_for(lambda: len(runner.calls) == 1, what="the first run")
        second = submit(api, "next")
        other = ThreadWorker(app_settings, other_runner, worker_id="test/1").start()
        assert finished(api, second)["status"] == "completed"  # while the first job still hangs
        assert [inputs.prompt for inputs in other_runner.calls] == ["next"]
        assert busy.store.get(first).status == Status.PROCESSING  # type: ignore[union-attr]
    finally:
        runner.release.set()
        busy.stop()
        if other is not None:
            other.stop()


def test_a_job_claimed_ahead_spends_its_attempt_only_when_it_begins(tmp_path: Path) -> None:
    store = JobStore.at(f"sqlite:///{tmp_path / 'jobs.db'}", run_dir=tmp_path / "run")
    store.migrate()
    try:
        job = _queued(store, max_attempts=1)
        ahead = store.claim("w/0", ["edit"], 30, spend_attempt=False)
        assert ahead is not None and ahead.id == job.id and ahead.attempts == 0
        assert ahead.lease_token and store.release(job.id, ahead.lease_token, refund=False)
        assert (again := store.get(job.id)) is not None and again.status == Status.CREATED and again.attempts == 0

        # A crash while it was ahead: its lease expires, the reaper requeues it, and even at one
        # allowed attempt it is not failed ("stopped 1 times"): it never ran.
        ahead = store.claim("w/0", ["edit"], 0.001, spend_attempt=False)
        assert ahead is not None and ahead.lease_token
        wait_for(lambda: store.reap() == 1, what="the lease to expire")
        assert (again := store.get(job.id)) is not None and again.status == Status.CREATED and again.attempts == 0

        ahead = store.claim("w/0", ["edit"], 30, spend_attempt=False)
        assert ahead is not None and ahead.lease_token
        began = store.begin(job.id, ahead.lease_token)
        assert began is not None and began.attempts == 1 and began.started_at >= ahead.created_at
        assert store.begin(job.id, "not-the-lease") is None
        assert store.release(job.id, ahead.lease_token)  # begun: the refund
        assert (again := store.get(job.id)) is not None and again.attempts == 0
    finally:
        store.close()


def _slow_output(release: threading.Event) -> Any:
    """An output step that holds each job's output until ``release``: the pipeline must go on."""

    def step(job: Job, images: list[Image.Image]) -> list[Image.Image]:
        release.wait(30)
        return images

    return step


def test_the_next_job_runs_while_the_last_one_is_still_being_stored(app_settings: Any, api: Any) -> None:
    runner = FakeRunner()
    release = threading.Event()
    worker = ThreadWorker(app_settings, runner)
    worker.worker.output_steps.append(_slow_output(release))
    worker.start()
    try:
        ids = [submit(api, f"edit {i}", seed=i) for i in range(3)]
        # All three went through the pipeline while the first output is still held.
        wait_for(lambda: len(runner.calls) == 3, what="three pipeline runs")
        assert worker.store.get(ids[0]).status == Status.PROCESSING  # type: ignore[union-attr]
        release.set()
        outs = [finished(api, pid) for pid in ids]
    finally:
        release.set()
        worker.stop()
    assert [o["status"] for o in outs] == ["completed"] * 3
    assert [inputs.prompt for inputs in runner.calls] == ["edit 0", "edit 1", "edit 2"]  # queue order kept
    assert [worker.store.get(pid).attempts for pid in ids] == [1, 1, 1]  # type: ignore[union-attr]


def test_a_job_claimed_ahead_waits_unspent_and_runs_next(app_settings: Any, api: Any) -> None:
    runner = FakeRunner()
    worker = warm_worker(app_settings, api, runner)
    try:
        first = submit(api, "hang", num_inference_steps=3)
        wait_for(lambda: len(runner.calls) == 1, what="the first run")
        second = submit(api, "second")
        ahead = wait_status(worker.store, second, {Status.PROCESSING})
        assert ahead.attempts == 0 and len(runner.calls) == 1  # claimed and loaded, not begun
        runner.release.set()
        done = [finished(api, first), finished(api, second)]
    finally:
        runner.release.set()
        worker.stop()
    assert [d["status"] for d in done] == ["completed", "completed"]
    assert worker.store.get(second).attempts == 1  # type: ignore[union-attr]


def test_cancelling_a_job_claimed_ahead_fails_it_without_running_it(app_settings: Any, api: Any) -> None:
    runner = FakeRunner()
    worker = warm_worker(app_settings, api, runner)
    try:
        first = submit(api, "hang", num_inference_steps=3)
        wait_for(lambda: len(runner.calls) == 1, what="the first run")
        second = submit(api, "never runs")
        wait_status(worker.store, second, {Status.PROCESSING})
        assert api.post(f"/api/v3/predictions/{second}/cancel", headers={"Authorization": "Bearer test-key-1"})
        # The heartbeat notices the cancel; the job fails at the latest when its turn comes.
        runner.release.set()
        cancelled = finished(api, second)
        assert finished(api, first)["status"] == "completed"
    finally:
        runner.release.set()
        worker.stop()
    assert cancelled["status"] == "failed" and cancelled["error"] == "Cancelled by the client before it started."
    assert [inputs.prompt for inputs in runner.calls] == ["hang"]


def test_drain_finishes_the_job_in_hand_and_returns_the_one_ahead_unspent(app_settings: Any, api: Any) -> None:
    runner = FakeRunner()
    worker = warm_worker(app_settings, api, runner)
    first = submit(api, "hang", num_inference_steps=3)
    wait_for(lambda: len(runner.calls) == 1, what="the first run")
    second = submit(api, "ahead")
    wait_status(worker.store, second, {Status.PROCESSING})
    worker.worker.drain()
    back = wait_status(worker.store, second, {Status.CREATED})  # at once, not after the drain
    assert back.attempts == 0 and back.lease_token is None
    runner.release.set()
    worker.thread.join(30)
    assert not worker.thread.is_alive()
    done = worker.store.get(first)
    assert done is not None and done.status == Status.COMPLETED and done.attempts == 1 and done.outputs
    assert [inputs.prompt for inputs in runner.calls] == ["hang"]
    worker.stop()


def test_hand_back_returns_both_the_running_job_and_the_one_ahead(app_settings: Any, api: Any) -> None:
    runner = FakeRunner()
    worker = warm_worker(app_settings, api, runner)
    first = submit(api, "hang", num_inference_steps=10)
    wait_for(lambda: len(runner.calls) == 1, what="the first run")
    second = submit(api, "ahead")
    wait_status(worker.store, second, {Status.PROCESSING})
    worker.worker.hand_back()
    worker.thread.join(30)
    assert not worker.thread.is_alive()
    for pid in (first, second):
        job = worker.store.get(pid)
        assert job is not None and job.status == Status.CREATED and job.attempts == 0, job
    worker.stop()


def test_an_output_step_may_fail_a_job_and_the_worker_goes_on(app_settings: Any, api: Any) -> None:
    def checker(job: Job, images: list[Image.Image]) -> list[Image.Image]:
        if job.params.prompt == "refused":
            raise JobError("The output was refused by the output check.", INVALID_PARAMETER)
        return [image.convert("L").convert("RGB") for image in images]

    worker = ThreadWorker(app_settings, FakeRunner())
    worker.worker.output_steps.append(checker)
    worker.start()
    try:
        refused = finished(api, submit(api, "refused"))
        ok = finished(api, submit(api, "fine", seed=3))
        stored = api.get(ok["outputs"][0])
    finally:
        worker.stop()
    assert refused["status"] == "failed" and refused["code"] == INVALID_PARAMETER
    assert refused["error"] == "The output was refused by the output check."
    assert ok["status"] == "completed" and stored.status_code == 200
    r, g, b = Image.open(io.BytesIO(stored.content)).convert("RGB").getpixel((0, 0))  # type: ignore[misc]
    assert r == g == b  # what the output step returned is what was stored


def test_a_job_ahead_whose_input_fails_fails_at_once_and_the_run_goes_on(
    app_settings: Any, api: Any, image_host: tuple[str, dict[str, Any]]
) -> None:
    host, _routes = image_host
    runner = FakeRunner()
    worker = warm_worker(app_settings, api, runner)
    try:
        first = submit(api, "hang", num_inference_steps=3)
        wait_for(lambda: len(runner.calls) == 1, what="the first run")
        r = api.post(
            "/api/v3/wavespeed-ai/qwen-image/edit",
            json={"prompt": "x", "image": f"{host}/missing.png"},
            headers={"Authorization": "Bearer test-key-1"},
        )
        missing = r.json()["data"]["id"]
        failed = finished(api, missing)  # while the first job still runs: no need to wait for it
        assert worker.store.get(first).status == Status.PROCESSING  # type: ignore[union-attr]
        runner.release.set()
        assert finished(api, first)["status"] == "completed"
    finally:
        runner.release.set()
        worker.stop()
    assert failed["status"] == "failed" and failed["code"] == 1402 and "404" in failed["error"]
    assert worker.store.get(missing).attempts == 1  # type: ignore[union-attr]
    assert len(runner.calls) == 1


def test_an_idle_worker_finishes_a_quick_run_on_its_own_thread(
    app_settings: Any, api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finishing a run (output steps, encode, store, settle) goes to an output thread while how
    long it takes is unknown (the first run); once it is known to be quick, an idle worker (no job
    ahead) finishes on the pipeline thread: a hand-off would only delay the answer. A worker with a
    job ahead always hands over (test_the_next_job_runs_while_the_last_one_is_still_being_stored)."""
    monkeypatch.setattr(overlap, "INLINE_FINISH_S", 60.0)  # "quick" on any machine, however loaded
    threads: list[str] = []

    def step(job: Job, images: list[Image.Image]) -> list[Image.Image]:
        threads.append(threading.current_thread().name)
        return images

    worker = ThreadWorker(app_settings, FakeRunner())
    worker.worker.output_steps.append(step)
    worker.start()
    try:
        done = [finished(api, submit(api, f"edit {i}", seed=i))["status"] for i in range(3)]
    finally:
        worker.stop()
    assert done == ["completed"] * 3
    assert threads[0].startswith("outputs") and threads[1:] == [worker.thread.name] * 2
