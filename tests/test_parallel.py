"""pipelines/layout.py, parallel.py, cfg_parallel.py, parallel_plan.py in process: layouts parsed and
refused, CFG-parallel on two in-process "ranks" (threads) giving a single process's pixels, the
sequence padding, the per-GPU plan and ``qwen-edit plan --gpus``. The group's processes run end to
end in tests/test_parallel_e2e.py."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipelines.layout import Layout, LayoutError
from pipelines.parallel import SequencePadding, runnable
from pipelines.parallel_plan import layouts_for, per_gpu, sharded, speedup
from pipelines.plan import real_sizes
from pipelines.registry import get_variant
from server.cli import main as cli


@pytest.mark.parametrize(
    ("text", "world", "inner"),
    [("", 1, 1), ("none", 1, 1), ("cfg=2", 2, 1), ("ulysses=2", 2, 2), ("tp=4", 4, 4), ("cfg=2,ulysses=2", 4, 2)],
)
def test_layouts_parse(text: str, world: int, inner: int) -> None:
    layout = Layout.parse(text)
    assert (layout.world_size, layout.inner) == (world, inner)
    assert Layout.parse(str(layout)) == layout  # the canonical text reads back


def test_ranks_are_laid_out_cfg_major() -> None:
    layout = Layout.parse("cfg=2,ulysses=2")
    assert [layout.cfg_rank(r) for r in range(4)] == [0, 0, 1, 1]
    assert [layout.inner_rank(r) for r in range(4)] == [0, 1, 0, 1]
    assert layout.mesh_shape() == ((2, 1, 2), ("cfg", "ring", "ulysses"))
    assert Layout.parse("cfg=2,tp=2").mesh_shape() == ((2, 2), ("cfg", "tp"))


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("cfg=3", "cfg is 1 or 2"),
        ("tp=2,ulysses=2", "does not combine"),
        ("ulysses=8", "must be one of"),
        ("ulysses=3", "must be one of"),
        ("pipeline=2", "is not one of"),
        ("cfg=two", "not a whole number"),
        ("cfg=2,cfg=2", "given twice"),
        ("tp=0", "at least 1"),
    ],
)
def test_bad_layouts_are_refused_clearly(text: str, says: str) -> None:
    with pytest.raises(LayoutError, match=says):
        Layout.parse(text)


def test_head_sharded_layouts_need_heads_that_divide() -> None:
    Layout.parse("ulysses=2").check_model(24)
    Layout.parse("cfg=2").check_model(1)  # CFG-parallel splits no heads
    with pytest.raises(LayoutError, match="--heads"):
        Layout.parse("ulysses=2").check_model(1)
    with pytest.raises(LayoutError, match="divide by 4"):
        Layout.parse("tp=4").check_model(6)


def test_what_the_cpu_cannot_run_is_refused_with_the_reason() -> None:
    assert runnable(Layout.parse("cfg=2,ulysses=2"), "cpu") is None
    assert "CUDA" in (runnable(Layout.parse("tp=2"), "cpu") or "")
    assert "log-sum-exp" in (runnable(Layout.parse("ring=2"), "cpu") or "")
    assert "attention backend" in (runnable(Layout.parse("ring=2"), "cuda:0") or "")
    assert runnable(Layout.parse("ring=2"), "cuda:0", "flash") is None
    assert runnable(Layout.parse("tp=2"), "cuda:0") is None


# --- CFG-parallel --------------------------------------------------------------------------


class _Pair:
    """Two threads' all-gather: each hands in its tensor and gets both, in branch order."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=120)
        self.slots: list[Any] = [None, None]

    def exchange(self, branch: int) -> Any:
        def exchange(mine: Any) -> tuple[Any, Any]:
            self.slots[branch] = mine.clone()
            self.barrier.wait()
            both = (self.slots[0], self.slots[1])
            self.barrier.wait()  # neither overwrites its slot before the other has read both
            return both

        return exchange


def _edit(pipe: Any, image: Image.Image) -> np.ndarray:
    from pipelines.runner import EditInputs, EditRunner

    inputs = EditInputs(images=[image], prompt="make it blue", seed=3, num_inference_steps=2, width=256, height=256)
    out = EditRunner(pipe, get_variant("edit"), "cpu")(inputs).images[0]
    return np.asarray(out, dtype=np.int16)


def _count_passes(pipe: Any) -> list[int]:
    calls = [0]
    pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.e2e  # two rank processes run the tiny pipeline
def test_cfg_parallel_on_two_ranks_gives_a_single_process_s_pixels() -> None:
    """Two pipelines of the same weights in two threads, each running the whole call; per step each
    runs one transformer pass (its branch) and they swap predictions: the image is the same as one
    process running both passes (bit for bit on the CPU: the same passes, moved)."""
    from pipelines.cfg_parallel import CFGParallel
    from weights.tiny import build_tiny_pipeline

    image = Image.new("RGB", (64, 48), (200, 40, 40))
    single = build_tiny_pipeline("edit")
    single_passes = _count_passes(single)
    want = _edit(single, image)

    pair = _Pair()
    pipes = [build_tiny_pipeline("edit") for _ in range(2)]
    splits = [CFGParallel.install(pipe, branch, pair.exchange(branch)) for branch, pipe in enumerate(pipes)]
    passes = [_count_passes(pipe) for pipe in pipes]
    got: list[Any] = [None, None]
    errors: list[BaseException] = []

    def rank(branch: int) -> None:
        try:
            got[branch] = _edit(pipes[branch], image)
        except BaseException as exc:
            errors.append(exc)
            pair.barrier.abort()

    threads = [threading.Thread(target=rank, args=(b,)) for b in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    assert np.abs(got[0] - want).max() <= 1 and np.abs(got[1] - want).max() <= 1
    assert [s.split_calls for s in splits] == [2, 2]  # both steps split
    assert passes[0][0] == passes[1][0] == single_passes[0] // 2  # each rank: half the passes

    CFGParallel.uninstall(pipes[0])  # back to a plain pipeline
    assert not hasattr(pipes[0], "_cfg_parallel") and pipes[0].encode_prompt == splits[0]._encode


def test_cfg_parallel_and_batched_cfg_do_not_stack() -> None:
    from pipelines.cfg_parallel import CFGParallel
    from pipelines.speed import BatchedCFG
    from weights.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("edit")
    BatchedCFG.install(pipe)
    with pytest.raises(ValueError, match="use one"):
        CFGParallel.install(pipe, 0, lambda t: (t, t))
    with pytest.raises(ValueError, match="branch"):
        CFGParallel(pipe, 2, lambda t: (t, t))


# --- sequence padding ----------------------------------------------------------------------


def test_text_is_padded_with_a_mask_to_the_sequence_degree() -> None:
    import torch

    seen: dict[str, Any] = {}

    def forward(**kwargs: Any) -> Any:
        seen.update(kwargs)
        return kwargs["hidden_states"]

    padding = SequencePadding(2)
    hidden, text = torch.zeros(1, 16, 4), torch.ones(1, 7, 4)
    padding.forward(forward, hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=None)
    assert seen["encoder_hidden_states"].shape == (1, 8, 4)
    assert seen["encoder_hidden_states_mask"].tolist() == [[True] * 7 + [False]]
    assert seen["encoder_hidden_states"][0, 7].abs().sum() == 0

    seen.clear()
    even = torch.ones(1, 8, 4)
    padding.forward(forward, hidden_states=hidden, encoder_hidden_states=even, encoder_hidden_states_mask=None)
    assert seen["encoder_hidden_states"] is even and seen["encoder_hidden_states_mask"] is None  # nothing to do

    with pytest.raises(ValueError, match="multiples of 32"):
        padding.forward(forward, hidden_states=torch.zeros(1, 9, 4), encoder_hidden_states=even)


# --- the plan ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real() -> Any:
    return real_sizes(get_variant("edit"))


def test_tp_shards_the_block_weights_and_nothing_else(real: Any) -> None:
    half = sharded(real, Layout.parse("tp=2"))
    assert half.transformer_linear == pytest.approx(real.transformer_linear / 2)
    assert half.transformer == pytest.approx(real.transformer - real.transformer_linear / 2)
    assert half.text_encoder == real.text_encoder and half.vae == real.vae  # every rank runs them whole
    assert sharded(real, Layout.parse("cfg=2,ulysses=2")) == real  # these split work, not weights
    # Sequence parallel splits the activations only; TP the weights.
    assert per_gpu(Layout.parse("ulysses=2"), real, "full") < per_gpu(Layout(), real, "full")
    assert per_gpu(Layout.parse("tp=2"), real, "full") < per_gpu(Layout.parse("ulysses=2"), real, "full") - 15


def test_speedups_are_below_the_ideal_and_ordered() -> None:
    assert 1.8 < speedup(Layout.parse("cfg=2")) < 2
    assert speedup(Layout.parse("tp=2")) < speedup(Layout.parse("ulysses=2")) < speedup(Layout.parse("cfg=2"))
    assert 3.2 < speedup(Layout.parse("cfg=2,ulysses=2")) < 4


@pytest.mark.parametrize(
    ("gpus", "gb", "chosen"),
    [(2, 141, "none"), (2, 40, "tp=2"), (4, 24, "tp=4"), (1, 24, "none")],
)
def test_auto_prefers_a_group_that_fits_over_offloading(real: Any, gpus: int, gb: float, chosen: str) -> None:
    got, rows = layouts_for(gpus, gb, real)
    assert got == chosen
    assert all(r.gpus <= gpus and r.groups == gpus // r.gpus for r in rows)
    if chosen != "none":
        row = next(r for r in rows if r.layout == chosen)
        assert row.memory_mode in ("full", "text-encoder-offload") and row.peak_gb <= gb * 0.9


def test_plan_cli_shows_parallel_layouts(capsys: pytest.CaptureFixture[str], real: Any) -> None:
    assert cli(["plan", "--gpu-memory-gb", "40", "--gpus", "2", "--host-ram-gb", "256"]) == 0
    out = capsys.readouterr().out
    assert "auto would choose: tp=2" in out and "cfg=2" in out and "unmeasured" in out
    assert cli(["plan", "--gpu-memory-gb", "40", "--gpus", "0"]) == 2


def test_the_benchmark_reports_a_refused_layout_with_its_reason(tmp_path: Any) -> None:
    """The benchmark's table path (each measured layout spawns real ranks: a GPU run, or --smoke)."""
    from benchmarks.parallel import main as bench

    assert bench(["--smoke", "--layouts", "tp=2", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "parallel.md").read_text()
    assert "| tp=2 | 2 |" in table and "tp needs CUDA" in table


def test_gpus_use_the_library_s_any_length_modes_and_the_cpu_pads() -> None:
    from pipelines.parallel import RankContext

    class Mesh:
        def __getitem__(self, names: Any) -> str:
            return f"mesh{names}"

    def cp(layout: str, device: str) -> Any:
        ctx = RankContext(Layout.parse(layout), 0, device, Mesh())
        return ctx, ctx.parallel_config().context_parallel_config

    ctx, config = cp("ulysses=2", "cuda:0")
    assert ctx.any_length and config.ulysses_anything and not config.ring_anything
    ctx, config = cp("cfg=2,ring=2", "cuda:0")
    assert ctx.any_length and config.ring_anything and config.mesh == "mesh('ring', 'ulysses')"
    ctx, config = cp("ulysses=2", "cpu")  # "anything" gathers sizes through CUDA tensors
    assert not ctx.any_length and not config.ulysses_anything
    ctx, config = cp("ulysses=2,ring=2", "cuda:0")  # the library takes one or the other
    assert not ctx.any_length and not (config.ulysses_anything or config.ring_anything)
    assert RankContext(Layout.parse("cfg=2"), 0, "cpu", Mesh()).parallel_config() is None
