"""pipelines/plan.py: sizes from the real architecture, estimates held against the module structure
the placement really installs, auto's choices, and ``qwen-edit plan``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.memory import MemoryPlan, apply_plan, offload_groups_gb
from pipelines.plan import CANDIDATES, Machine, choose, estimate, real_sizes, resolve, sizes_of
from pipelines.registry import get_variant
from server.cli import main as cli
from weights.tiny import build_tiny_pipeline

GB = 1e9


@pytest.fixture(scope="module")
def real() -> object:
    return real_sizes(get_variant("edit"))


def test_real_sizes_come_from_the_real_architecture(real: object) -> None:
    s = real
    # Parameter counts of the Hub repository (MODEL.md): 20.43 B, 8.29 B, 0.127 B, in bf16.
    assert s.transformer == pytest.approx(2 * 20.43, rel=0.005)  # type: ignore[attr-defined]
    assert s.text_encoder == pytest.approx(2 * 8.29, rel=0.005)  # type: ignore[attr-defined]
    assert s.vae == pytest.approx(2 * 0.127, rel=0.01)  # type: ignore[attr-defined]
    # 60 equal blocks, and almost all of it their Linear weights (what 8-bit halves).
    assert s.transformer_block * 60 == pytest.approx(s.transformer - s.transformer_rest, rel=1e-6)  # type: ignore[attr-defined]
    assert s.transformer_linear / s.transformer > 0.99  # type: ignore[attr-defined]
    # The text encoder's largest leaf is its 152 064 x 3584 vocabulary embedding (or LM head).
    assert s.text_encoder_leaf == pytest.approx(152064 * 3584 * 2 / GB, rel=1e-6)  # type: ignore[attr-defined]
    # 2511 adds zero_cond_t, no parameters.
    assert real_sizes(get_variant("edit-2511")).transformer == pytest.approx(s.transformer)  # type: ignore[attr-defined]


def test_a_model_folder_is_planned_from_its_own_configs(tiny_models: dict[str, Path]) -> None:
    pipe = build_tiny_pipeline("edit")
    folder = real_sizes(get_variant("edit"), str(tiny_models["edit"]))
    built = sizes_of(pipe.transformer.bfloat16(), pipe.text_encoder.bfloat16(), pipe.vae.bfloat16())
    assert folder.transformer == pytest.approx(built.transformer)
    assert folder.text_encoder == pytest.approx(built.text_encoder)
    assert folder.vae == pytest.approx(built.vae)


def _largest(module: object) -> float:
    return max(offload_groups_gb(module), default=0.0)


@pytest.mark.parametrize("mode", ["text-encoder-offload", "group-block", "group-leaf"])
def test_estimates_hold_against_the_groups_really_installed(mode: str) -> None:
    """The estimate's granularity is the placement's: the largest group each component streams is
    exactly the piece the estimate counts for it."""
    pipe = build_tiny_pipeline("edit")
    s = sizes_of(pipe.transformer, pipe.text_encoder, pipe.vae)
    apply_plan(pipe, MemoryPlan(mode, "none", None, "test"), "cpu")  # type: ignore[arg-type]
    te, tr, vae = _largest(pipe.text_encoder), _largest(pipe.transformer), _largest(pipe.vae)
    assert te == pytest.approx(s.text_encoder_leaf)  # leaf by leaf in every streamed mode
    if mode == "text-encoder-offload":
        assert (tr, vae) == (0.0, 0.0)  # resident
    elif mode == "group-block":
        # One block at a time; the embedders and norms as one more group; the VAE resident.
        assert tr == pytest.approx(max(s.transformer_block, s.transformer_rest))
        assert vae == 0.0
    else:
        assert tr == pytest.approx(s.transformer_leaf) and vae == pytest.approx(s.vae_leaf)
    # Every byte of a streamed component (parameters and buffers) is in exactly one group.
    for name in ("text_encoder",) + (("transformer",) if mode != "text-encoder-offload" else ()):
        module = getattr(pipe, name)
        tensors = [*module.parameters(), *module.buffers()]
        assert sum(offload_groups_gb(module)) == pytest.approx(sum(t.numel() * t.element_size() for t in tensors) / GB)


def test_block_level_would_move_the_text_encoder_whole() -> None:
    """Why the text encoder streams leaf by leaf: Qwen2.5-VL's layers are not direct ModuleList
    children, so block-level offloading makes the whole model one group (16.6 GB at real size)."""
    import torch
    from diffusers.hooks import apply_group_offloading

    pipe = build_tiny_pipeline("edit")
    whole = sum(p.numel() * p.element_size() for p in pipe.text_encoder.parameters()) / GB
    apply_group_offloading(
        pipe.text_encoder,
        onload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
    )
    assert _largest(pipe.text_encoder) == pytest.approx(whole, rel=0.01)


def test_estimates_at_real_size(real: object) -> None:
    s = real
    full = estimate("full", "none", s)  # type: ignore[arg-type]
    assert full.peak_gb == pytest.approx(40.86 + 16.58 + 0.25 + 4.0, abs=0.1)
    # group-block: the resident rest, a block and the prefetched next, two text-encoder leaves,
    # the VAE, activations. Not the 6.6 GB of a model that moved the text encoder as one group.
    gb = estimate("group-block", "none", s)  # type: ignore[arg-type]
    assert gb.peak_gb == pytest.approx(0.08 + 2 * 0.68 + 2 * 1.09 + 0.25 + 4.0, abs=0.05)
    assert gb.host_ram_gb == pytest.approx(40.86 + 16.58 + 3.0, abs=0.1)
    # 8-bit halves the blocks' Linear weights, device or host.
    assert estimate("full", "int8", s).peak_gb == pytest.approx(full.peak_gb - 40.78 / 2, abs=0.05)  # type: ignore[arg-type]
    assert estimate("group-block", "fp8", s).host_ram_gb < gb.host_ram_gb - 20  # type: ignore[arg-type]
    # Nothing resident on the GPU is staged in host RAM.
    assert full.host_ram_gb == pytest.approx(3.0)
    peaks = [estimate(m, "none", s).peak_gb for m in ("full", "text-encoder-offload", "group-block", "group-leaf")]  # type: ignore[arg-type]
    assert peaks == sorted(peaks, reverse=True)


CARDS = [
    # (what, free GB, compute capability, torchao installed, host RAM GB, expected (mode, quantize))
    ("H200", 139.0, (9, 0), True, 1000.0, ("full", "none")),
    ("H100 80 GB", 79.0, (9, 0), True, 1000.0, ("full", "none")),
    ("L40S", 47.5, (8, 9), True, 200.0, ("full", "fp8")),
    ("L40S, no torchao", 47.5, (8, 9), False, 200.0, ("group-block", "none")),
    ("A6000 48 GB: int8, no fp8 units", 47.5, (8, 6), True, 200.0, ("full", "int8")),
    ("A100 40 GB", 39.5, (8, 0), True, 200.0, ("text-encoder-offload", "int8")),
    ("RTX 5090", 31.5, (12, 0), True, 128.0, ("text-encoder-offload", "fp8")),
    ("RTX 4090", 23.5, (8, 9), True, 128.0, ("group-block", "fp8")),
    ("RTX 4090, no torchao", 23.5, (8, 9), False, 128.0, ("group-block", "none")),
    ("8 GB card", 7.5, (8, 6), True, 128.0, ("group-leaf", "none")),
]


@pytest.mark.parametrize(
    ("free", "cc", "torchao", "ram", "expected"), [c[1:] for c in CARDS], ids=[c[0] for c in CARDS]
)
def test_auto_choices(
    real: object, free: float, cc: tuple[int, int], torchao: bool, ram: float, expected: tuple[str, str]
) -> None:
    machine = Machine(free, cc, ram, torchao)
    plan, verdicts = choose(machine, real)  # type: ignore[arg-type]
    assert (plan.mode, plan.quantize) == expected
    assert plan.estimated_peak_gb is not None and plan.estimated_peak_gb <= free * 0.9
    # Every candidate has its verdict; the chosen one is the first that fits.
    assert [(e.mode, e.quantize) for e, _ in verdicts] == list(CANDIDATES)
    chosen = [why for e, why in verdicts if (e.mode, e.quantize) == expected]
    assert chosen == ["chosen: the fastest that fits"]
    if not torchao:
        assert all("torchao is not installed" in why for e, why in verdicts if e.quantize != "none")


def test_host_ram_rules_modes_out(real: object) -> None:
    # A 24 GB card in a 64 GB workstation (~60 GB available): bf16 group-block needs ~60.5 GB of host
    # RAM, the fp8 transformer ~40 GB.
    plan, verdicts = choose(Machine(23.5, (8, 9), 60.0, True), real)  # type: ignore[arg-type]
    assert (plan.mode, plan.quantize) == ("group-block", "fp8")
    why = dict(((e.mode, e.quantize), w) for e, w in verdicts)
    assert why[("group-block", "none")].startswith("host RAM 60.5 GB > 60.0 GB")
    # Without torchao nothing fits the host: the mode that misses least, saying what is short.
    plan, _ = choose(Machine(23.5, (8, 9), 60.0, False), real)  # type: ignore[arg-type]
    assert (plan.mode, plan.quantize) == ("group-block", "none")
    assert "host RAM 60.5 GB > 60.0 GB available" in plan.reason and "may not run" in plan.reason


def test_too_small_a_card_gets_the_smallest_mode_and_says_so(real: object) -> None:
    plan, verdicts = choose(Machine(4.0, (8, 6), 256.0, True), real)  # type: ignore[arg-type]
    assert (plan.mode, plan.quantize) == ("group-leaf", "none")
    assert "no mode fits" in plan.reason and "> 3.6 GB usable on the GPU" in plan.reason
    assert ("chosen: nothing fits, the least bad") in [w for _, w in verdicts]


def test_resolve_settings(real: object) -> None:
    h100 = Machine(79.0, (9, 0), 1000.0, True)
    assert resolve("auto", "auto", h100, real) == choose(h100, real)[0]  # type: ignore[arg-type]
    explicit = resolve("group-block", "int8", h100, real)  # type: ignore[arg-type]
    assert (explicit.mode, explicit.quantize) == ("group-block", "int8")
    assert explicit.estimated_peak_gb == estimate("group-block", "int8", real).peak_gb  # type: ignore[arg-type]
    no_torchao = Machine(79.0, (9, 0), 1000.0, False)
    with pytest.raises(ValueError, match=r"install torchao"):
        resolve("full", "fp8", no_torchao, real)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a newer GPU"):
        resolve("full", "fp8", Machine(39.5, (8, 0), 1000.0, True), real)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown memory mode"):
        resolve("everything", "auto", h100, real)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown quantize"):
        resolve("full", "int3", h100, real)  # type: ignore[arg-type]
    # No GPU, or the tiny model: nothing to plan.
    cpu = resolve("auto", "auto", Machine(None), real)  # type: ignore[arg-type]
    assert (cpu.mode, cpu.quantize, cpu.estimated_peak_gb) == ("full", "none", None)
    assert resolve("group-leaf", "auto", h100, None).mode == "group-leaf"


def test_plan_cli(capsys: pytest.CaptureFixture[str], real: object) -> None:
    import importlib.util

    assert (
        cli(["plan", "--gpu-memory-gb", "39.5", "--compute-capability", "8.0", "--host-ram-gb", "200", "--json"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    expected, _ = choose(Machine(39.5, (8, 0), 200.0, importlib.util.find_spec("torchao") is not None), real)  # type: ignore[arg-type]
    assert (out["chosen"]["mode"], out["chosen"]["quantize"]) == (expected.mode, expected.quantize)
    assert [(m["mode"], m["quantize"]) for m in out["modes"]] == list(CANDIDATES)
    assert all(m["peak_gb"] > 0 and m["host_ram_gb"] > 0 and m["verdict"] for m in out["modes"])
    assert out["sizes_gb"]["transformer"] == pytest.approx(40.86, abs=0.01)
    assert cli(["plan", "--gpu-memory-gb", "23.5", "--compute-capability", "8.9"]) == 0
    text = capsys.readouterr().out
    assert "auto chooses: " in text and "group-block" in text and "host RAM" in text
    assert cli(["plan", "--gpu-memory-gb", "24", "--compute-capability", "nine"]) == 2
    assert "X.Y" in capsys.readouterr().err


def test_the_readme_table_is_the_planner_s(real: object) -> None:
    """README's memory-mode table shows what estimate() says, row by row."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Memory modes") : readme.index("### Steps, guidance")]
    rows = [
        [c.strip().strip("`") for c in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| `") and line.count("|") == 6
    ]
    assert len(rows) == 8
    for mode, quants, peak, host, _ in rows:
        for quant in quants.split("` / `"):
            est = estimate(mode, quant, real)  # type: ignore[arg-type]
            assert (float(peak), float(host)) == (round(est.peak_gb, 1), round(est.host_ram_gb, 1)), (mode, quant)
