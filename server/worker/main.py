"""A worker process: open the store, load and warm up the model, then serve jobs."""

from __future__ import annotations

import structlog
from PIL import Image

from pipelines.lightning import use_lightning_scheduler
from pipelines.loader import ModelLoadError, default_model_source, load_pipeline, resolve_device, resolve_dtype
from pipelines.lora import LoraManager, LoraRequest
from pipelines.memory import resolve_plan
from pipelines.registry import Variant, get_variant
from pipelines.runner import EditInputs, EditRunner
from pipelines.speed import SpeedConfig, apply_speed
from server.jobs.contract import WorkerState
from server.jobs.store import JobStore
from server.media.loras import LoraFiles
from server.media.netguard import NetGuard
from server.settings import Settings
from server.storage.factory import build_storage
from server.worker.loop import Worker

log = structlog.get_logger(__name__)


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
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    try:
        plan = resolve_plan(settings.memory_mode, settings.quantize, device)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    log.info(
        "loading model",
        source=source,
        variant=variant.name,
        device=device,
        dtype=str(dtype),
        tiny=tiny,
        memory_mode=plan.mode,
        quantize=plan.quantize,
        memory_reason=plan.reason,
    )
    pipe = load_pipeline(source, variant, device=device, dtype=dtype, memory=plan)
    apply_speed(pipe, SpeedConfig.from_settings(settings), device)
    loras = LoraManager(pipe, max_loaded=settings.lora_cache_size)
    if settings.preset != "default":
        use_lightning_scheduler(pipe)
        if settings.lightning_lora:
            # The operator's own setting: any local path, and the Hub, fetched through the guard.
            files = LoraFiles(settings, NetGuard.from_entries(settings.fetch_allow))
            path = files.local_file(settings.lightning_lora, trusted=True)
            loras.pin(LoraRequest(path=str(path), name=settings.lightning_lora))
        else:
            log.warning("lightning preset without QWEN_EDIT_LIGHTNING_LORA: few steps on the base model")
    runner = EditRunner(pipe, variant, device, loras)
    if settings.warmup:
        worker.presence.set(WorkerState.LOADING, "warming up")
        runner(
            EditInputs(
                images=[Image.new("RGB", (256, 256), (128, 128, 128))],
                prompt="warm up",
                seed=0,
                num_inference_steps=2,  # the scheduler's terminal shift needs two
                width=256,
                height=256,
            )
        )
    return runner, tiny
