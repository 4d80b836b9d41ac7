"""Where a pipeline's weights live while it runs: placement per memory plan (pipelines/plan.py).

Each component gets the granularity the plan's estimate assumes:

| mode                 | transformer                  | text encoder   | VAE            |
|----------------------|------------------------------|----------------|----------------|
| full                 | resident                     | resident       | resident       |
| text-encoder-offload | resident                     | leaf by leaf   | resident       |
| model-offload        | one component at a time (diffusers' enable_model_cpu_offload)  |
| group-block          | block by block, 1 prefetched | leaf by leaf   | resident       |
| group-leaf           | leaf by leaf                 | leaf by leaf   | leaf by leaf   |

(Block-level offloading streams only a module's *direct* ``ModuleList`` children, and Qwen2.5-VL's
layers sit two levels down: at block level it would stream as one 16.6 GB group. Hence leaf level
for it.) Streams prefetch the next group where the device is a GPU; ``low_cpu_mem_usage`` pins
host tensors as they are used instead of a pinned copy of every group up front. The weights of
resident components are loaded straight onto the device (pipelines/loader.py): ``resident_on``
says which.
"""

from __future__ import annotations

from typing import Any

import structlog

from pipelines.plan import MODES, QUANTIZE, MemoryMode, MemoryPlan, Quantize

log = structlog.get_logger(__name__)

__all__ = [
    "MODES",
    "QUANTIZE",
    "MemoryMode",
    "MemoryPlan",
    "Quantize",
    "apply_plan",
    "offload_groups_gb",
    "resident_on",
    "streamed",
]

_RESIDENT: dict[str, tuple[str, ...]] = {
    "full": ("transformer", "text_encoder", "vae"),
    "text-encoder-offload": ("transformer", "vae"),
    "model-offload": (),
    "group-block": ("vae",),
    "group-leaf": (),
}


def resident_on(plan: MemoryPlan, device: str) -> dict[str, str]:
    """Each component's device at load time: ``device`` for the resident ones, else the CPU."""
    resident = _RESIDENT[plan.mode]
    return {name: device if name in resident else "cpu" for name in ("transformer", "text_encoder", "vae")}


def streamed(plan: MemoryPlan) -> dict[str, str]:
    """The offload granularity of each streamed component ("block_level" / "leaf_level")."""
    if plan.mode == "text-encoder-offload":
        return {"text_encoder": "leaf_level"}
    if plan.mode == "group-block":
        return {"transformer": "block_level", "text_encoder": "leaf_level"}
    if plan.mode == "group-leaf":
        return {"transformer": "leaf_level", "text_encoder": "leaf_level", "vae": "leaf_level"}
    return {}


def offload_groups_gb(module: Any) -> list[float]:
    """The size (GB) of each group diffusers' group offloading installed in ``module``: what moves to
    the device at once. The planner's estimates assume the largest of these (tests hold them to it)."""
    seen: dict[int, float] = {}
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = registry.get_hook("group_offloading") if registry is not None else None
        group = getattr(hook, "group", None)
        if group is None or id(group) in seen:
            continue
        tensors = {id(t): t for m in group.modules for t in (*m.parameters(), *m.buffers())}
        tensors.update({id(t): t for t in (*group.parameters, *group.buffers)})
        seen[id(group)] = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e9
    return list(seen.values())


def apply_plan(pipe: Any, plan: MemoryPlan, device: str) -> None:
    """Place ``pipe`` per ``plan``. Group offloading uses CUDA streams when ``device`` is a GPU; with
    ``device="cpu"`` the same hooks run (onload to the CPU), which is how the tests exercise them."""
    import torch
    from diffusers.hooks import apply_group_offloading

    on_gpu = device.startswith("cuda")
    if plan.mode == "model-offload":
        if not on_gpu:
            raise RuntimeError("model-offload needs a GPU (diffusers' enable_model_cpu_offload refuses the CPU)")
        pipe.enable_model_cpu_offload(device=device)
    else:
        for name, offload_type in streamed(plan).items():
            apply_group_offloading(
                getattr(pipe, name),
                onload_device=torch.device(device),
                offload_device=torch.device("cpu"),
                offload_type=offload_type,
                num_blocks_per_group=1 if offload_type == "block_level" else None,
                use_stream=on_gpu,
                low_cpu_mem_usage=True,
            )
        for name in _RESIDENT[plan.mode]:
            getattr(pipe, name).to(device)  # a no-op where the loader put it there already
    # The estimate is the planned model's (None where nothing was planned: the CPU, a tiny model);
    # the sizes are those of the components actually loaded.
    loaded = {
        name: _size_of(getattr(pipe, name))
        for name in ("transformer", "text_encoder", "vae")
        if hasattr(getattr(pipe, name, None), "parameters")
    }
    log.info(
        "memory plan applied",
        mode=plan.mode,
        quantize=plan.quantize,
        device=device,
        loaded=loaded,
        **({} if plan.estimated_peak_gb is None else {"estimated_peak_gb": plan.estimated_peak_gb}),
        **({} if plan.host_ram_gb is None else {"host_ram_gb": plan.host_ram_gb}),
    )


def _size_of(module: Any) -> str:
    """A component's parameter bytes, for the log ("40.9 GB", "0.1 MB")."""
    try:
        nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    except (RuntimeError, TypeError, NotImplementedError):  # an exotic tensor subclass: not worth a crash
        return "?"
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


# Only the blocks' linear layers are quantized: the embedders, norms and output layer stay in bf16.
KEEP_IN_BF16 = ("time_text_embed", "img_in", "txt_in", "txt_norm", "norm_out", "proj_out")


def _torchao_config(quantize: str, fp8_dynamic: bool) -> Any:
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            Int8WeightOnlyConfig,
            PerRow,
        )
    except ImportError as exc:
        raise RuntimeError("quantization needs torchao: pip install 'qwen-edit-server[quant]'") from exc
    if fp8_dynamic:
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    if quantize == "fp8":
        return Float8WeightOnlyConfig()
    return Int8WeightOnlyConfig()


def quantization_config(quantize: str, fp8_dynamic: bool) -> Any:
    """The transformer's load-time torchao quantization (weight-only fp8 / int8, or fp8 with dynamic
    activations for the speed setting), for its ``from_pretrained``: quantized while it loads,
    before any placement. None: bf16 as stored."""
    if quantize == "none" and not fp8_dynamic:
        return None
    from diffusers import TorchAoConfig

    return TorchAoConfig(_torchao_config(quantize, fp8_dynamic), modules_to_not_convert=list(KEEP_IN_BF16))


def quantize_transformer(transformer: Any, quantize: str, fp8_dynamic: bool = False) -> None:
    """The same quantization on a transformer already built (the benchmarks' random weights), in place."""
    from torchao.quantization import quantize_

    quantize_(
        transformer,
        _torchao_config(quantize, fp8_dynamic),
        filter_fn=lambda mod, fqn: mod.__class__.__name__ == "Linear" and not fqn.startswith(KEEP_IN_BF16),
    )
