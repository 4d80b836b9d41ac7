"""Loading a Qwen-Image-Edit pipeline with ``from_pretrained``: the real weights or the tiny model,
through the same call.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Any

import structlog

from pipelines.memory import MemoryPlan
from pipelines.registry import Variant

log = structlog.get_logger(__name__)

WEIGHTS_DIR = Path("weights")


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message says what to do about it."""


def resolve_device(setting: str, *, real_weights: bool = False) -> str:
    """The torch device to run on. ``auto`` is the GPU where CUDA works; without one, the CPU only
    for the tiny model: the real 20 B weights on a CPU (about 115 GB of RAM in fp32, minutes a step)
    are a misconfiguration to report, not a fallback to take quietly."""
    import torch

    if setting != "auto":
        if setting.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(f"device {setting!r} was asked for, but CUDA is not available: {_cuda_problem()}")
        return setting
    if torch.cuda.is_available():
        return "cuda"
    if real_weights:
        raise ModelLoadError(
            f"no usable GPU for the real model ({_cuda_problem()}). Fix the CUDA setup, or set "
            "QWEN_EDIT_DEVICE=cpu to run the 20 B model on the CPU anyway (about 115 GB of RAM, very slow)"
        )
    return "cpu"


def _cuda_problem() -> str:
    """Why torch sees no GPU, in one line (a CPU-only build, a driver too old for the wheel...)."""
    import torch

    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    try:
        torch.cuda.init()
    except Exception as exc:
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot start CUDA: {str(exc).splitlines()[0]}"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no GPU (CUDA_VISIBLE_DEVICES, container GPUs?)"


def resolve_dtype(setting: str, device: str) -> Any:
    import torch

    if setting == "float16":
        # Qwen-Image's activations overflow fp16's range: the outputs turn to NaN (black images).
        raise ModelLoadError("QWEN_EDIT_DTYPE=float16 is not supported: Qwen-Image overflows in fp16; use bfloat16")
    if setting == "auto":
        # bf16 halves memory and runs on the tensor cores; CPUs compute it slowly, so use fp32 there.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, setting)


def default_model_source(variant: Variant, data_dir: Path, weights_dir: Path = WEIGHTS_DIR) -> tuple[str, bool]:
    """(source, is_tiny): ``weights/<repo name>`` when downloaded there, else the tiny model (built if missing)."""
    real = weights_dir / variant.hub_repo.split("/")[-1]
    if (real / "model_index.json").is_file():
        return str(real), False
    tiny = data_dir / "tiny" / variant.name
    tiny.parent.mkdir(parents=True, exist_ok=True)
    with open(tiny.parent / f".{variant.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several workers may start at once
        if not (tiny / "model_index.json").is_file():
            from weights.tiny import build_tiny_model

            log.warning("no weights found: building the tiny random model", folder=str(tiny), looked_in=str(real))
            build_tiny_model(tiny, variant.name)
    return str(tiny), True


def is_hub_id(source: str) -> bool:
    return not Path(source).exists() and source.count("/") == 1 and not source.startswith((".", "/", "~"))


def resolve_source(source: str) -> str:
    """A local folder, or a Hub id to its snapshot folder (downloading unless HF_HUB_OFFLINE=1)."""
    if not is_hub_id(source):
        return source
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from weights.manifest import ALLOW_PATTERNS, IGNORE_PATTERNS

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return str(
            snapshot_download(
                source, allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS, local_files_only=offline
            )
        )
    except (LocalEntryNotFoundError, OSError) as exc:
        if offline:
            raise ModelLoadError(
                f"{source!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it. "
                f"Run `qwen-edit weights download {source}` where the Hub is reachable and set QWEN_EDIT_MODEL "
                "to that folder, or unset HF_HUB_OFFLINE."
            ) from exc
        raise ModelLoadError(f"could not download {source!r} from the Hugging Face Hub: {exc}") from exc


def check_model_folder(source: str, variant: Variant) -> None:
    """Fail early, and clearly, when a local folder is not a model of ``variant``."""
    from weights.manifest import verify_folder

    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"model folder {source!r} does not exist")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{source!r} is not a diffusers model folder: it has no model_index.json")
    class_name = json.loads(index.read_text()).get("_class_name")
    if class_name != variant.pipeline:
        raise ModelLoadError(
            f"{source!r} holds a {class_name}, but variant {variant.name!r} needs a {variant.pipeline}; "
            "set QWEN_EDIT_VARIANT to match the weights"
        )
    report = verify_folder(path, hashes=False)  # sizes against the manifest (or the structure): fast
    if not report.ok:
        raise ModelLoadError(f"the model folder is incomplete or corrupt:\n{report.text()}")


def quiet_progress_bars() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def load_pipeline(
    source: str,
    variant: Variant,
    *,
    device: str,
    dtype: Any,
    memory: MemoryPlan | None = None,
    fp8_dynamic: bool = False,
    parallel_config: Any = None,
) -> Any:
    """Load ``variant`` from a folder or Hub id, placed per ``memory`` (default: all on ``device``).

    The components the plan keeps resident are loaded straight onto a GPU (never staged in host
    RAM); the transformer is quantized while it loads (weight-only fp8/int8, or fp8 with dynamic
    activations for ``fp8_dynamic``), before any placement."""
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pipelines.memory import apply_plan, quantization_config, resident_on

    plan = memory or MemoryPlan("full", "none", None, "default")
    source = resolve_source(source)
    check_model_folder(source, variant)
    quiet_progress_bars()
    cls = variant.pipeline_class()
    targets = resident_on(plan, device)
    qconfig = quantization_config(plan.quantize, fp8_dynamic)
    try:
        parts: dict[str, Any] = {}
        if qconfig is not None or targets["transformer"].startswith("cuda") or parallel_config is not None:
            extra = {"parallel_config": parallel_config} if parallel_config is not None else {}
            parts["transformer"] = QwenImageTransformer2DModel.from_pretrained(
                source,
                subfolder="transformer",
                dtype=dtype,
                quantization_config=qconfig,
                **_placed(targets["transformer"]),
                **extra,
            )
        if targets["text_encoder"].startswith("cuda"):
            parts["text_encoder"] = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                source, subfolder="text_encoder", dtype=dtype, device_map=targets["text_encoder"]
            )
        pipe = cls.from_pretrained(source, dtype=dtype, **parts)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load {variant.pipeline} from {source!r}: {exc}") from exc
    if bool(getattr(pipe.transformer.config, "zero_cond_t", False)) != variant.zero_cond_t:
        raise ModelLoadError(
            f"{source!r}: transformer zero_cond_t={pipe.transformer.config.zero_cond_t}, but variant "
            f"{variant.name!r} needs zero_cond_t={variant.zero_cond_t}; set QWEN_EDIT_VARIANT to match the weights"
        )
    pipe.set_progress_bar_config(disable=True)
    apply_plan(pipe, plan, device)
    return pipe


def _placed(target: str) -> dict[str, Any]:
    # Straight onto a GPU; on the CPU the plain load is already where the weights belong.
    return {"device_map": target} if target.startswith("cuda") else {}
