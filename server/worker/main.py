"""A worker process: open the store, load and warm up the model, then serve jobs."""

from __future__ import annotations

import structlog
from PIL import Image

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
from server.worker.loop import Worker

log = structlog.get_logger(__name__)

# Above this many GB of weights a model is worth a memory plan, and too big to fall back to the CPU
# unasked (the real one is 57 GB in bf16; the tiny one a few MB).
LARGE_MODEL_GB = 2.0


def run_worker(settings: Settings, worker_id: str) -> int:
    try:
        variant = get_variant(settings.variant)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    store = JobStore.open(settings)
    worker = Worker(settings, store, build_storage(settings), variant, worker_id)
    worker.install_signal_handlers()
    # A worker that starts before its database waits for it (a restart mid-outage must not die).
    if not store.db.wait_until_migrated(stop=worker.stopping):
        return 0
    worker.start()
    try:
        runner, tiny = load_runner(settings, variant, worker)
    except Exception as exc:
        worker.presence.set(WorkerState.FAILED, str(exc)[:500])
        worker.heartbeat.stop()
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"{type(exc).__name__}: {exc}") from exc
    if tiny:
        log.warning("serving the TINY RANDOM model: outputs are noise. See README, 'Real weights'.")
    log.info("worker ready", worker_id=worker_id)
    worker.serve(runner)
    store.close()
    return 0


def load_runner(settings: Settings, variant: Variant, worker: Worker) -> tuple[EditRunner, bool]:
    """Load the model, apply the speed settings and the preset, warm up; (runner, is the tiny model)."""
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
    dtype = resolve_dtype(settings.dtype, device)
    speed = SpeedConfig.from_settings(settings)
    machine = Machine.here(device)
    try:
        plan = resolve(settings.memory_mode, settings.quantize, machine, sizes if large else None)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    log.info(
        "loading model",
        source=source,
        variant=variant.name,
        tiny=tiny,
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
    pipe = load_pipeline(source, variant, device=device, dtype=dtype, memory=plan, fp8_dynamic=fp8_dynamic)
    apply_speed(pipe, speed, device)
    loras = LoraManager(pipe, max_loaded=settings.lora_cache_size)
    if settings.preset != "default":
        use_lightning_scheduler(pipe)
        if settings.lightning_lora:
            # The operator's own setting: any local path, and the Hub, fetched through the guard.
            files = LoraFiles(settings, NetGuard.from_entries(settings.fetch_allow))
            path = files.local_file(settings.lightning_lora, trusted=True)
            # Always on: fused into the weights (no extra low-rank path on every layer every step),
            # where the weights are not quantized (torchao's 8-bit weights take no fused LoRA).
            fuse = plan.quantize == "none" and not fp8_dynamic
            loras.pin(LoraRequest(path=str(path), name=settings.lightning_lora), fuse=fuse)
        else:
            log.warning("lightning preset without QWEN_EDIT_LIGHTNING_LORA: few steps on the base model")
    runner = EditRunner(pipe, variant, device, loras)
    if settings.warmup:
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
