"""server/worker/ranks.py, channel.py, group.py in process: which GPUs a group gets, the job and the
step decisions over a real TCPStore, rank 0's runner (lockstep, sizes, a broken group), the settings.
Real processes: tests/test_parallel_e2e.py."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import ValidationError

from pipelines.layout import Layout
from pipelines.lora import LoraRequest
from pipelines.runner import EditInputs, EditResult, RunCancelled
from server.settings import Settings
from server.worker.channel import Channel, decode_inputs, encode_inputs
from server.worker.group import GroupRunner, group_inputs
from server.worker.ranks import RankInfo, group_gpus, rank_device
from server.worker.supervisor import worker_env


def test_each_group_gets_its_own_gpus() -> None:
    assert [group_gpus(s, 2, 4, None) for s in range(4)] == ["0,1", "2,3", "4,5", "6,7"]
    assert group_gpus(0, 2, 1, None) is None  # one group: nothing to choose
    assert [group_gpus(s, 2, 2, "3,5,6,7") for s in range(2)] == ["3,5", "6,7"]
    assert group_gpus(0, 2, 1, "") == ""  # GPUs hidden on purpose stay hidden
    with pytest.raises(ValueError, match="lists 1"):
        group_gpus(0, 2, 1, "4")


def test_serve_workers_count_gpus_and_make_groups() -> None:
    settings = Settings(embedded_workers=8, parallel="cfg=2")
    assert settings.worker_slots == 4
    assert [worker_env(settings, s, {})["CUDA_VISIBLE_DEVICES"] for s in range(4)] == ["0,1", "2,3", "4,5", "6,7"]
    assert Settings(embedded_workers=1, parallel="cfg=2,ulysses=2").worker_slots == 1
    assert Settings(embedded_workers=0, parallel="cfg=2").worker_slots == 0
    assert Settings(embedded_workers=3).worker_slots == 3


def test_the_layout_setting_is_checked_at_start_up() -> None:
    assert Settings(parallel=" CFG=2 , Ulysses=2").parallel == "cfg=2,ulysses=2"
    with pytest.raises(ValidationError, match="does not combine"):
        Settings(parallel="tp=2,ring=2")


def test_rank_devices_and_identity() -> None:
    assert rank_device("cuda", 1) == "cuda:1" and rank_device("cpu", 1) == "cpu"
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        rank_device("cuda:3", 0)
    info = RankInfo(1, 2, "127.0.0.1", 4567)
    assert RankInfo.from_env(info.env(), 2) == info
    assert RankInfo.from_env({}, 2) is None


def test_cpu_groups_refuse_what_gloo_cannot_run(tmp_path: Path) -> None:
    from pipelines.loader import ModelLoadError
    from server.worker.main import check_layout

    check_layout(Settings(device="cpu"), Layout.parse("cfg=2,ulysses=2"))
    with pytest.raises(ModelLoadError, match="tp needs CUDA"):
        check_layout(Settings(device="cpu"), Layout.parse("tp=2"))
    with pytest.raises(ModelLoadError, match="ring needs GPU"):
        check_layout(Settings(device="cpu"), Layout.parse("ring=2"))


def test_the_tiny_model_takes_more_heads(tmp_path: Path) -> None:
    import json

    from server.cli import main as cli
    from weights.tiny import build_tiny_pipeline

    assert cli(["weights", "tiny", str(tmp_path / "m"), "--heads", "2"]) == 0
    assert json.loads((tmp_path / "m" / "transformer" / "config.json").read_text())["num_attention_heads"] == 2
    with pytest.raises(ValueError, match="heads"):
        build_tiny_pipeline("edit", heads=0)


# --- the channel ---------------------------------------------------------------------------


@pytest.fixture
def stores() -> Any:
    from torch.distributed import TCPStore

    master = TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=10), wait_for_workers=False)
    client = TCPStore("127.0.0.1", master.port, None, False, timedelta(seconds=10))
    return master, client


def _inputs(**kw: Any) -> EditInputs:
    values: dict[str, Any] = {
        "images": [Image.new("RGB", (40, 30), (1, 2, 3))],
        "prompt": "make it blue",
        "seed": 5,
        "num_inference_steps": 3,
        "loras": [LoraRequest(path="/x.safetensors", scale=0.5, name="owner/repo/x.safetensors")],
    }
    values.update(kw)
    return EditInputs(**values)


def test_inputs_travel_losslessly_without_pickles() -> None:
    inputs = _inputs(width=288, height=256, negative_prompt="blurry")
    data = encode_inputs(inputs)
    assert data.startswith(b"{")  # JSON
    back = decode_inputs(__import__("json").loads(data)["inputs"])
    assert back.images[0].tobytes() == inputs.images[0].tobytes()
    assert {k: v for k, v in vars(back).items() if k != "images"} == {
        k: v for k, v in vars(inputs).items() if k != "images"
    }


def test_rank_0_sends_runs_and_step_decisions(stores: Any) -> None:
    leader, follower = Channel(stores[0], 10), Channel(stores[1], 10)
    stopping = threading.Event()
    for n in range(3):  # old runs' keys are dropped as new ones come
        leader.send_run(_inputs(seed=n))
        assert follower.receive(stopping).seed == n  # type: ignore[union-attr]
        assert leader.decide(0, True) and follower.decision(0)
        assert not leader.decide(1, False) and not follower.decision(1)
    assert not stores[0].check(["run/1"]) and stores[0].check(["run/3"])
    leader.send_stop()
    assert follower.receive(stopping) is None
    stopping.set()
    assert Channel(stores[1], 10).receive(stopping) is None  # a follower told to stop waits no more


# --- rank 0's runner -----------------------------------------------------------------------


class _Inner:
    """An EditRunner stand-in: checks input, steps, returns an image of the size it ran at."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.ran: list[EditInputs] = []

    def check_inputs(self, inputs: EditInputs) -> None:
        pass

    def __call__(self, inputs: EditInputs, on_step: Any = None) -> EditResult:
        self.ran.append(inputs)
        for step in range(inputs.num_inference_steps + 1):
            if not on_step(step, inputs.num_inference_steps):
                raise RunCancelled()
        if self.fail is not None:
            raise self.fail
        return EditResult(images=[Image.new("RGB", (inputs.width or 64, inputs.height or 64))], seconds=0.1)


class _Group:
    def __init__(self, layout: str, store: Any, lost: bool = False) -> None:
        self.layout = Layout.parse(layout)
        self.channel = Channel(store, 10)
        self.lost = lost
        self.aborted: str | None = None

    def lost_rank(self) -> bool:
        return self.lost

    def abort(self, why: str) -> None:
        self.aborted = why
        raise SystemExit(4)  # the real one ends the process


def test_rank_0_runs_in_lockstep_at_a_size_that_splits(stores: Any) -> None:
    group = _Group("ulysses=2", stores[0])
    inner = _Inner()
    runner = GroupRunner(inner, group)  # type: ignore[arg-type]
    assert runner.batch_signature(_inputs()) is None  # a group runs one job at a time
    result = runner(_inputs(width=270, height=256))
    assert (inner.ran[0].width, inner.ran[0].height) == (288, 256)  # generated where tokens split
    assert result.images[0].size == (270, 256)  # handed back at the size asked for
    follower = Channel(stores[1], 10)
    sent = follower.receive(threading.Event())
    assert sent is not None and (sent.width, sent.height) == (288, 256)
    assert [follower.decision(step) for step in range(4)] == [True] * 4
    assert group_inputs(_inputs(width=270, height=256), Layout.parse("cfg=2")).width == 270  # cfg splits no tokens


def test_a_cancel_reaches_every_rank_at_the_same_step(stores: Any) -> None:
    group = _Group("cfg=2", stores[0])
    runner = GroupRunner(_Inner(), group)  # type: ignore[arg-type]
    with pytest.raises(RunCancelled):
        runner(_inputs(), lambda step, _total: step < 2)
    follower = Channel(stores[1], 10)
    assert follower.receive(threading.Event()) is not None
    assert [follower.decision(step) for step in range(3)] == [True, True, False]
    assert runner.broken is None  # a cancel leaves the group in step


def test_a_failed_run_marks_the_group_for_a_restart(stores: Any) -> None:
    runner = GroupRunner(_Inner(fail=RuntimeError("boom")), _Group("cfg=2", stores[0]))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="boom"):
        runner(_inputs())
    assert runner.broken == "RuntimeError: boom"


def test_a_killed_rank_sends_the_job_back_and_a_failed_one_fails_it(stores: Any) -> None:
    import torch

    killed = _Group("cfg=2", stores[0], lost=True)
    with pytest.raises(SystemExit):
        GroupRunner(_Inner(fail=RuntimeError("Connection reset by peer")), killed)(_inputs())  # type: ignore[arg-type]
    assert killed.aborted is not None  # not failed: the restarted group reruns it

    failed = _Group("cfg=2", stores[0], lost=True)
    runner = GroupRunner(_Inner(fail=RuntimeError("Connection reset by peer")), failed)  # type: ignore[arg-type]
    follower = Channel(stores[1], 10)

    def rank_1_runs_out_of_memory(step: int, total: int) -> bool:
        if step == 0:
            assert follower.receive(threading.Event()) is not None
            follower.report_error(1, "OutOfMemoryError", "CUDA out of memory. Tried to allocate 2 GiB")
        return True

    with pytest.raises(torch.cuda.OutOfMemoryError, match="rank 1: OutOfMemoryError: CUDA out of memory"):
        runner(_inputs(), rank_1_runs_out_of_memory)
    assert failed.aborted is None and runner.broken is not None


# --- auto ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpus", "weights", "chosen"),
    [
        ([40.0, 40.0], "Qwen/Qwen-Image-Edit", "tp=2"),  # 41 GB of transformer: shards fit, one card does not
        ([141.0, 141.0], "Qwen/Qwen-Image-Edit", "none"),  # fits one card: a worker per GPU
        ([40.0], "Qwen/Qwen-Image-Edit", "none"),
        ([40.0, 40.0], None, "none"),  # no weights downloaded: the tiny model
    ],
)
def test_auto_is_decided_once_at_start_up(gpus: list[float], weights: str | None, chosen: str) -> None:
    from server.worker.ranks import resolve_auto

    settings = resolve_auto(Settings(parallel="auto", qwen_edit_model=weights, embedded_workers=2), gpus)
    assert settings.parallel == chosen
    assert worker_env(settings, 0, {}).get("QWEN_EDIT_PARALLEL") == chosen  # the workers get the decision
    assert Settings(parallel="auto").layout == Layout()  # undecided: one GPU per worker


def test_free_gpu_memory_comes_from_nvidia_smi_not_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from server.worker import ranks

    out = "0, 40000\n1, 81000\n2, 20000\n"
    monkeypatch.setattr(ranks.shutil, "which", lambda _name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(ranks.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=out))
    assert [round(g) for g in ranks.visible_gpus_free_gb({})] == [42, 85, 21]
    assert [round(g) for g in ranks.visible_gpus_free_gb({"CUDA_VISIBLE_DEVICES": "2,0"})] == [21, 42]
    monkeypatch.setattr(ranks.shutil, "which", lambda _name: None)
    assert ranks.visible_gpus_free_gb({}) == []
