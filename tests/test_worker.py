"""The worker loop in process: a real Worker (claim loop, executor, heartbeat) on a real SQLite file
and a temp folder, fed by the in-process app, running a fake runner whose prompt words choose how
each job ends. Each failure class gets its code; the worker keeps serving after every one.
"""

from __future__ import annotations

from typing import Any

import pytest

from server.jobs.contract import Status
from server.worker.runs import Run, RunState
from tests.support import KEY1, MODEL_URL, FakeRunner, ThreadWorker, data_uri, png_bytes, wait_for, wait_status

IMAGE = data_uri(png_bytes())


def submit(client: Any, prompt: str, **extra: Any) -> str:
    r = client.post(MODEL_URL, json={"prompt": prompt, "image": IMAGE, "size": "256*256", **extra}, headers=KEY1)
    assert r.status_code == 200, r.text
    return str(r.json()["data"]["id"])


def result(client: Any, pid: str) -> dict[str, Any]:
    r = client.get(f"/api/v3/predictions/{pid}/result", headers=KEY1)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()["data"]
    return data


def finished(client: Any, pid: str, timeout: float = 30) -> dict[str, Any]:
    return wait_for(lambda: (d := result(client, pid))["status"] in ("completed", "failed") and d, timeout, pid)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "prompt,code,fragment",
    [
        ("raise", 1403, "RuntimeError: the fake pipeline raised"),
        # A ValueError from deep inside a library is the task's failure, not the client's input.
        ("valueerror", 1403, "ValueError: operands could not be broadcast"),
        ("invalid", 1401, "Invalid input: the prompt is too long"),
        ("oom", 5000, "ran out of memory"),
    ],
)
def test_each_failure_gets_its_code_and_the_worker_keeps_serving(
    stack: Any, prompt: str, code: int, fragment: str
) -> None:
    done = finished(stack, submit(stack, prompt))
    assert done["status"] == "failed" and done["code"] == code, done
    assert fragment in done["error"], done["error"]
    ok = finished(stack, submit(stack, "a normal edit"))
    assert ok["status"] == "completed" and len(ok["outputs"]) == 1


def test_progress_rises_step_by_step(stack: Any, fake_runner: FakeRunner) -> None:
    pid = submit(stack, "hang", num_inference_steps=4)
    wait_for(lambda: result(stack, pid).get("progress") == {"step": 0, "total": 4}, what="progress 0/4")
    fake_runner.release.set()
    done = finished(stack, pid)
    assert done["status"] == "completed" and done["progress"] == {"step": 4, "total": 4}


def test_cancel_while_running_ends_the_run_at_its_next_step(stack: Any, fake_worker: ThreadWorker) -> None:
    pid = submit(stack, "hang", num_inference_steps=50)
    wait_for(lambda: result(stack, pid)["status"] == "processing", what="running")
    r = stack.post(f"/api/v3/predictions/{pid}/cancel", headers=KEY1)
    assert r.status_code == 200 and r.json()["data"]["status"] == "processing"
    done = finished(stack, pid)
    assert done["status"] == "failed" and done["error"] == "Cancelled by the client while running."
    assert done["progress"]["step"] < 50


def test_lease_lost_mid_run_writes_nothing(stack: Any, fake_worker: ThreadWorker, fake_runner: FakeRunner) -> None:
    """A job reaped from under its worker (its lease expired) was handed to someone else: the old
    run stops and writes nothing, whatever it had computed."""
    store = fake_worker.store
    pid = submit(stack, "hang", num_inference_steps=3)
    first = wait_status(store, pid, {Status.PROCESSING})
    assert store.release(pid, first.lease_token)  # as a reaper requeueing it would
    # The old run stops without a write; the (single-job) worker is then free to claim the job anew.
    again = wait_for(
        lambda: (j := store.get(pid)) is not None and j.lease_token not in (None, first.lease_token) and j,
        what="the job claimed anew",
    )
    assert again.status == Status.PROCESSING and again.outputs == [] and again.error == ""
    fake_runner.release.set()
    assert finished(stack, pid)["status"] == "completed"


def test_hand_back_releases_the_job_without_spending_an_attempt(app_settings: Any, api: Any) -> None:
    runner = FakeRunner()
    worker = ThreadWorker(app_settings, runner).start()
    pid = submit(api, "hang", num_inference_steps=10)
    running = wait_status(worker.store, pid, {Status.PROCESSING})
    assert running.attempts == 1
    worker.worker.hand_back()  # a second stop request: no draining
    worker.thread.join(10)
    assert not worker.thread.is_alive()
    job = worker.store.get(pid)
    assert job is not None and job.status == Status.CREATED and job.attempts == 0
    worker.stop()


def test_a_second_sigterm_inside_the_first_ones_handler_still_hands_the_job_back(
    app_settings: Any, api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python runs a signal's handler between bytecodes, so a second SIGTERM's can run inside the
    first's. Seen in CI: the first had logged "worker stopping" and not yet marked the worker
    stopping, the second drained again, and the hand-back it asked for was lost."""
    import signal

    from server.worker import loop
    from server.worker.supervisor import DRAIN_SIGNAL, HANDBACK_SIGNAL

    runner = FakeRunner()
    worker = ThreadWorker(app_settings, runner).start()
    pid = submit(api, "hang", num_inference_steps=10)
    wait_status(worker.store, pid, {Status.PROCESSING})
    signals = (signal.SIGTERM, signal.SIGINT, DRAIN_SIGNAL, HANDBACK_SIGNAL)
    before = {sig: signal.getsignal(sig) for sig in signals}
    try:
        worker.worker.install_signal_handlers()
        on_sigterm = signal.getsignal(signal.SIGTERM)
        assert callable(on_sigterm)

        class SecondSignalWhileLogging:
            """The module's logger, with the second SIGTERM arriving as the first one logs."""

            def __init__(self, real: Any) -> None:
                self.real, self.fired = real, False

            def __getattr__(self, name: str) -> Any:
                return getattr(self.real, name)

            def info(self, event: str, **kw: Any) -> None:
                self.real.info(event, **kw)
                if event == "worker stopping" and not self.fired:
                    self.fired = True
                    on_sigterm(signal.SIGTERM, None)

        monkeypatch.setattr(loop, "log", SecondSignalWhileLogging(loop.log))
        on_sigterm(signal.SIGTERM, None)
        worker.thread.join(10)
        assert not worker.thread.is_alive()
        job = worker.store.get(pid)
        assert job is not None and job.status == Status.CREATED and job.attempts == 0  # handed back
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        worker.stop()


def test_drain_finishes_the_job_in_hand(app_settings: Any, api: Any) -> None:
    runner = FakeRunner(slow_step_s=0.05)
    worker = ThreadWorker(app_settings, runner).start()
    pid = submit(api, "slow", num_inference_steps=6)
    wait_status(worker.store, pid, {Status.PROCESSING})
    queued = submit(api, "after the drain began")
    worker.worker.drain()
    worker.thread.join(30)
    done = worker.store.get(pid)
    assert done is not None and done.status == Status.COMPLETED and done.attempts == 1
    left = worker.store.get(queued)
    assert left is not None and left.status == Status.CREATED  # no new claims while draining
    worker.stop()


def test_dynamic_batching_runs_compatible_jobs_in_one_call(tmp_path: Any) -> None:
    from fastapi.testclient import TestClient

    from server.api.app import create_app
    from tests.support import settings_for

    settings = settings_for(tmp_path / "data", batch_max_size=4, batch_wait_ms=0)
    runner = FakeRunner()
    with TestClient(create_app(settings)) as client:
        ids = [submit(client, f"sweep {i}", seed=i) for i in range(4)]
        worker = ThreadWorker(settings, runner).start()
        try:
            outs = [finished(client, pid) for pid in ids]
        finally:
            worker.stop()
    assert all(o["status"] == "completed" for o in outs)
    assert runner.batches == [4]


def test_run_states_never_weaken_and_settle_once() -> None:
    from benchmarks.jobs import store_job

    job = store_job(
        id="j", model="m", status=Status.PROCESSING, input={}, base_url="", created_at=0, updated_at=0, lease_token="t"
    )
    run = Run(job=job, total=2)
    assert not run.stopping
    run.stop(RunState.CANCEL_REQUESTED)
    run.stop(RunState.HANDING_BACK)  # weaker: the cancel stands
    assert run.state is RunState.CANCEL_REQUESTED and run.stopping
    run.stop(RunState.LEASE_LOST)
    assert run.state is RunState.LEASE_LOST
    assert run.settle() is RunState.LEASE_LOST and run.settle() is None
    run.stop(RunState.CANCEL_REQUESTED)
    assert run.settled and not run.stopping


def test_a_store_outage_never_kills_the_worker_or_the_api(tmp_path: Any, pg_url: str) -> None:
    """PostgreSQL refuses every connection while a job runs: the API answers 503 meanwhile, the
    worker finishes the run and keeps its output until the store is back, then the job completes
    and both go on as if nothing happened."""
    from fastapi.testclient import TestClient

    from server.api.app import create_app
    from tests.support import database_refusing_connections, settings_for

    settings = settings_for(tmp_path / "data", database_url=pg_url, lease_s=30.0)
    runner = FakeRunner(slow_step_s=0.2)
    with TestClient(create_app(settings)) as client:
        worker = ThreadWorker(settings, runner).start()
        try:
            pid = submit(client, "slow", num_inference_steps=5)
            wait_status(worker.store, pid, {Status.PROCESSING})
            with database_refusing_connections(pg_url):
                wait_for(lambda: runner.finished == 1, what="the run to end while the store is down")
                assert client.get("/readyz").status_code == 503
                r = client.get(f"/api/v3/predictions/{pid}/result", headers=KEY1)
                assert r.status_code == 503 and r.json()["code"] == 503
                assert worker.thread.is_alive() and worker.worker.board.unsettled()  # the result waits
            done = finished(client, pid)
            assert done["status"] == "completed" and len(done["outputs"]) == 1
            assert client.get(done["outputs"][0]).status_code == 200
            assert finished(client, submit(client, "after the outage"))["status"] == "completed"
            assert worker.thread.is_alive()
        finally:
            worker.stop()
