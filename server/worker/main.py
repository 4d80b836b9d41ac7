"""A worker process: open the store, load and warm up the model, then serve jobs."""

from __future__ import annotations

import dataclasses
import os

import structlog
from PIL import Image

from pipelines.layout import Layout, LayoutError
from pipelines.lightning import use_lightning_scheduler
from pipelines.loader import (
    ModelLoadError,
    check_model_folder,
    default_model_source,
    is_hub_id,
    load_pipeline,
    resolve_device,
    resolve_dtype,
)
from pipelines.lora import LoraManager, LoraRequest
from pipelines.parallel import RankContext, apply_layout, runnable
from pipelines.parallel_plan import sharded
from pipelines.plan import Machine, real_sizes, resolve
from pipelines.registry import Variant, get_variant
from pipelines.runner import EditInputs, EditRunner
from pipelines.speed import SpeedConfig, apply_speed, fp8_unavailable_reason
from server.jobs.contract import WorkerState
from server.jobs.store import JobStore
from server.media.loras import LoraFiles
from server.media.netguard import NetGuard
from server.settings import Settings
from server.storage.factory import build_storage
from server.worker.group import GroupRunner, WorkerGroup
from server.worker.loop import Worker
from server.worker.ranks import RankInfo, rank_device
from server.worker.safety import SafetyChecker

log = structlog.get_logger(__name__)

# Above this many GB of weights a model is worth a memory plan, and too big to fall back to the CPU
# unasked (the real one is 57 GB in bf16; the tiny one a few MB).
LARGE_MODEL_GB = 2.0


def run_worker(settings: Settings, worker_id: str, argv: list[str] | None = None) -> int:
    """A worker; under ``QWEN_EDIT_PARALLEL`` rank 0 of a group (``argv``: the command that starts
    the other ranks), or, started by rank 0, one of the others."""
    try:
        variant = get_variant(settings.variant)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    layout = settings.layout
    follower = RankInfo.from_env(os.environ, layout.world_size)
    if follower is not None:
        return run_follower(settings, variant, follower)
    store = JobStore.open(settings)
    worker = Worker(settings, store, build_storage(settings), variant, worker_id)
    worker.install_signal_handlers()
    # A worker that starts before its database waits for it (a restart mid-outage must not die).
    if not store.db.wait_until_migrated(stop=worker.stopping):
        return 0
    worker.start()
    group: WorkerGroup | None = None
    try:
        if layout.parallel:
            check_layout(settings, layout)
            group = WorkerGroup.lead(settings, layout, argv or ["worker"])
        runner, tiny = load_runner(settings, variant, worker, group)
        safety = SafetyChecker.load(settings)  # a checker asked for and not loadable stops the worker too
    except Exception as exc:
        if group is not None:
            group.stop(timeout_s=0)
        worker.presence.set(WorkerState.FAILED, str(exc)[:500])
        worker.heartbeat.stop()
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"{type(exc).__name__}: {exc}") from exc
    if tiny:
        log.warning("serving the TINY RANDOM model: outputs are noise. See README, 'Real weights'.")
    log.info("worker ready", worker_id=worker_id)
    worker.serve(runner, safety)
    if group is not None:
        broken = isinstance(runner, GroupRunner) and runner.broken is not None
        group.stop(timeout_s=0 if broken else 30)  # a broken group may sit in a collective: no waiting
    store.close()
    return 0


def run_follower(settings: Settings, variant: Variant, info: RankInfo) -> int:
    """Rank 1..N-1 of a group: join, load the same pipeline, run what rank 0 sends."""
    group = WorkerGroup.follow(settings, settings.layout, info)
    runner, _ = load_runner(settings, variant, None, group)
    log.info("group rank ready", rank=info.rank)
    group.serve_follower(runner)
    return 0


def check_layout(settings: Settings, layout: Layout) -> None:
    """Refuse, before any process starts, a layout this machine cannot run."""
    import torch

    on_gpu = settings.device != "cpu" and torch.cuda.is_available()
    why = runnable(layout, "cuda" if on_gpu else "cpu", settings.speed_attention_backend)
    if why:
        raise ModelLoadError(f"QWEN_EDIT_PARALLEL={layout}: {why}")
    visible = torch.cuda.device_count() if on_gpu else 0
    if on_gpu and visible < layout.world_size:
        raise ModelLoadError(f"QWEN_EDIT_PARALLEL={layout} needs {layout.world_size} GPUs a worker; {visible} visible")


def load_runner(
    settings: Settings, variant: Variant, worker: Worker | None, group: WorkerGroup | None = None
) -> tuple[EditRunner, bool]:
    """Load the model, apply the speed settings, the parallel layout and the preset, warm up; (runner,
    is the tiny model). In a group every rank loads; rank 0 warms up (the others run it with it)."""
    if settings.weights:
        source, tiny = settings.weights, False
    else:
        source, tiny = default_model_source(variant, settings.data_dir)
    # The model's sizes from its folder's configs (or the variant's, for a Hub id), on the meta
    # device: whether it is big enough to plan for, and to refuse a silent CPU fallback for.
    if not is_hub_id(source):
        check_model_folder(source, variant)  # a missing or wrong folder says so before anything else
    try:
        sizes = None if tiny else real_sizes(variant, None if is_hub_id(source) else source)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"could not read the model's configs in {source!r}: {exc}") from exc
    large = sizes is not None and sizes.transformer + sizes.text_encoder > LARGE_MODEL_GB
    device = resolve_device(settings.device, real_weights=large)
    ctx: RankContext | None = None
    if group is not None:
        device = rank_device(device, group.rank)
        ctx = RankContext.create(group.layout, group.rank, device)
    dtype = resolve_dtype(settings.dtype, device)
    speed = SpeedConfig.from_settings(settings)
    if ctx is not None and ctx.layout.cfg > 1 and speed.batched_cfg:
        log.warning("batched CFG is off under cfg=2: the two passes run on two ranks instead")
        speed = dataclasses.replace(speed, batched_cfg=False)
    machine = Machine.here(device)
    try:
        planned = sharded(sizes, ctx.layout) if ctx is not None and sizes is not None else sizes  # a rank's share
        plan = resolve(settings.memory_mode, settings.quantize, machine, planned if large else None)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    log.info(
        "loading model",
        source=source,
        variant=variant.name,
        tiny=tiny,
        # This model's own size from its configs (None: the built-in tiny model, a few MB), not a plan's.
        weights=None if sizes is None else _gb(sizes.transformer + sizes.text_encoder + sizes.vae),
        device=device,
        gpu_free_gb=None if machine.gpu_free_gb is None else round(machine.gpu_free_gb, 1),
        dtype=str(dtype),
        memory_mode=plan.mode,
        quantize=plan.quantize,
        estimated_peak_gb=plan.estimated_peak_gb,
        host_ram_gb=plan.host_ram_gb,
        memory_reason=plan.reason,
    )
    fp8_dynamic = speed.fp8 and fp8_unavailable_reason(device) is None
    tp = ctx is not None and ctx.layout.tp > 1
    pipe = load_pipeline(
        source,
        variant,
        device=device,
        dtype=dtype,
        memory=plan,
        fp8_dynamic=fp8_dynamic,
        parallel_config=ctx.parallel_config() if ctx is not None and tp else None,
    )
    apply_speed(pipe, speed, device)
    if ctx is not None:
        try:
            apply_layout(pipe, ctx, transformer_sharded=tp)
        except LayoutError as exc:
            raise ModelLoadError(str(exc)) from exc
    # LoRA adapters on tensor-parallel (DTensor) weights are not supported: a tp group takes none.
    loras = None if tp else LoraManager(pipe, max_loaded=settings.lora_cache_size)
    if settings.preset != "default":
        use_lightning_scheduler(pipe)
        if settings.lightning_lora and loras is None:
            raise ModelLoadError("QWEN_EDIT_LIGHTNING_LORA cannot be fused into tensor-parallel (tp) weights yet")
        if settings.lightning_lora and loras is not None:
            # The operator's own setting: any local path, and the Hub, fetched through the guard.
            files = LoraFiles(settings, NetGuard.from_entries(settings.fetch_allow))
            path = files.local_file(settings.lightning_lora, trusted=True)
            # Always on: fused into the weights (no extra low-rank path on every layer every step),
            # where the weights are not quantized (torchao's 8-bit weights take no fused LoRA).
            fuse = plan.quantize == "none" and not fp8_dynamic
            loras.pin(LoraRequest(path=str(path), name=settings.lightning_lora), fuse=fuse)
        else:
            log.warning("lightning preset without QWEN_EDIT_LIGHTNING_LORA: few steps on the base model")
    runner: EditRunner = EditRunner(pipe, variant, device, loras)
    if group is not None and group.rank == 0:
        runner = GroupRunner(runner, group)  # type: ignore[assignment]
    if settings.warmup and worker is not None:
        worker.presence.set(WorkerState.LOADING, "warming up")
        runner(warmup_inputs(settings, device))
    log.info(
        "model ready",
        source=source,
        tiny=tiny,
        device=device,
        memory_mode=plan.mode,
        preset=settings.preset,
        lightning_lora=settings.lightning_lora or None,
    )
    return runner, tiny


def _gb(size: float) -> str:
    return f"{size:.1f} GB" if size >= 0.1 else f"{size * 1000:.1f} MB"


def warmup_inputs(settings: Settings, device: str) -> EditInputs:
    """A first run as the jobs will be: the configured guidance (so batched CFG, a step cache or a
    compiled graph meet their real shapes before /readyz says ready), at a real size on a GPU."""
    side = 1024 if device.startswith("cuda") else 256
    return EditInputs(
        images=[Image.new("RGB", (side, side), (128, 128, 128))],
        prompt="warm up",
        seed=0,
        num_inference_steps=2,  # the scheduler's terminal shift needs two
        true_cfg_scale=settings.default_true_cfg_scale,
        negative_prompt=settings.default_negative_prompt,
        width=side,
        height=side,
    )
