"""Who is who in a worker group: each rank's identity (passed to the follower processes in their
environment), its device, and which GPUs a group's slot owns."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from server.settings import Settings

log = structlog.get_logger(__name__)

RANK_ENV = "QWEN_EDIT_GROUP_RANK"
STORE_ENV = "QWEN_EDIT_GROUP_STORE"  # host:port of rank 0's TCPStore


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    store_host: str
    store_port: int

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, env: Mapping[str, str], world_size: int) -> RankInfo | None:
        """A follower's identity from its environment; None in a leader (or a lone worker)."""
        rank, store = env.get(RANK_ENV), env.get(STORE_ENV)
        if rank is None or store is None:
            return None
        host, _, port = store.rpartition(":")
        return cls(int(rank), world_size, host, int(port))

    def env(self) -> dict[str, str]:
        return {RANK_ENV: str(self.rank), STORE_ENV: f"{self.store_host}:{self.store_port}"}


def rank_device(device: str, rank: int) -> str:
    """The device of ``rank``: GPU ``rank`` of the group's visible GPUs, or the CPU."""
    if device.startswith("cuda"):
        if ":" in device:
            raise ValueError(
                f"QWEN_EDIT_DEVICE={device!r} names one GPU, but a parallel group uses one GPU per rank: "
                "set it to cuda (or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES"
            )
        return f"cuda:{rank}"
    return device


def group_gpus(slot: int, world_size: int, slots: int, visible: str | None) -> str | None:
    """CUDA_VISIBLE_DEVICES of group ``slot``: its ``world_size`` GPUs of those visible (all GPUs
    when unset); None: leave it as it is (one group, nothing to choose)."""
    if visible is None and slots <= 1:
        return None
    if visible == "":
        return ""  # no GPU visible: the group runs on the CPU
    listed = [g.strip() for g in visible.split(",") if g.strip()] if visible else None
    if listed is None:
        return ",".join(str(slot * world_size + i) for i in range(world_size))
    if len(listed) < world_size:
        raise ValueError(f"a group of {world_size} GPUs, but CUDA_VISIBLE_DEVICES lists {len(listed)}: {visible!r}")
    start = (slot * world_size) % len(listed)
    return ",".join(listed[(start + i) % len(listed)] for i in range(world_size))


def visible_gpus_free_gb(environ: Mapping[str, str] = os.environ) -> list[float]:
    """Free memory (GB) of each GPU this machine's workers may use, from nvidia-smi: the API process
    must not start CUDA itself (it would hold memory on a GPU that a worker needs). Empty: none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,memory.free", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    free = {int(i): int(mib) * 1024**2 / 1e9 for i, mib in (line.split(",") for line in out.strip().splitlines())}
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [free[i] for i in sorted(free)]
    picked = [v.strip() for v in visible.split(",") if v.strip()]
    return [free[int(v)] for v in picked if v.isdigit() and int(v) in free]


def resolve_auto(settings: Settings, gpus_free_gb: list[float] | None = None) -> Settings:
    """``QWEN_EDIT_PARALLEL=auto`` decided once, at start-up, for every worker: a group where the
    model does not fit one GPU without streaming weights and the GPUs' shards do
    (pipelines/parallel_plan.py), else one process per GPU."""
    if settings.parallel != "auto":
        return settings
    from pipelines.loader import WEIGHTS_DIR, is_hub_id
    from pipelines.parallel_plan import auto_layout
    from pipelines.plan import real_sizes
    from pipelines.registry import get_variant

    gpus = visible_gpus_free_gb() if gpus_free_gb is None else gpus_free_gb
    if settings.embedded_workers:
        gpus = gpus[: settings.embedded_workers]  # --workers counts the GPUs to use
    variant = get_variant(settings.variant)
    if len(gpus) < 2:
        resolved, why = "none", f"{len(gpus)} GPU(s) to use: nothing to split over"
    elif settings.weights is None and not (WEIGHTS_DIR / variant.hub_repo.split("/")[-1]).is_dir():
        resolved, why = "none", "no weights downloaded (the tiny model): nothing to split"
    else:
        folder = None if settings.weights is None or is_hub_id(settings.weights) else settings.weights
        layout, why = auto_layout(gpus, real_sizes(variant, folder))
        resolved = str(layout)
    log.info("parallel layout chosen", parallel=resolved, reason=why)
    return settings.model_copy(update={"parallel": resolved})
