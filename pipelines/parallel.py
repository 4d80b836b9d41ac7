"""A loaded pipeline made one rank of a parallel group (pipelines/layout.py): the device mesh, diffusers'
own context / tensor parallelism on the transformer, the CFG-parallel hook.

- Sequence parallel (Ulysses, Ring) is diffusers' ``ContextParallelConfig`` through the model's own
  ``_cp_plan``: the transformer's hooks split the image and text sequences over the inner group and
  attention runs as Ulysses all-to-all or a ring. Both sequences must divide by the degree: the text is
  right-padded with a mask here (``SequencePadding``, a model hook that runs before the split); image
  token counts are multiples of 4 when every side is a multiple of 32 (the group runner asks for such
  sizes). On GPUs, Ulysses alone and Ring alone use the library's "anything" modes instead, which
  take any length without a mask (flash and sage kernels, which ring needs, refuse masks); those
  modes gather sizes through CUDA tensors, so the CPU (and Ulysses x Ring) pads.
- Tensor parallel is diffusers' ``TensorParallelConfig`` through the model's ``_tp_plan``; the loader
  hands it to ``from_pretrained(..., parallel_config=...)``, which shards the weights while it reads
  them (``tensor_parallel_config``).
- On a machine without an accelerator diffusers' ``_resolve_parallel_config`` computes the rank's device
  as ``rank % torch.accelerator.device_count()``, a division by zero; there the same configuration is
  set up by hand on the CPU mesh (``_enable_context_parallel_on_cpu``: the config's ``setup``, the
  processors' ``_parallel_config``, ``apply_context_parallel``: the same three steps
  ``enable_parallelism`` takes). Ring attention needs attention kernels that return the log-sum-exp
  (flash, sage: GPUs) and PyTorch's tensor parallelism needs CUDA: on the CPU both are refused up front
  (``runnable``), with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog

from pipelines.hooks import OwnerForward
from pipelines.layout import Layout, LayoutError

log = structlog.get_logger(__name__)

# Attention backends whose kernels return the log-sum-exp ring attention merges with.
RING_BACKENDS = ("flash", "flash_hub", "_flash_3_hub", "sage", "sage_hub", "_native_cudnn", "_native_flash")


def runnable(layout: Layout, device: str, attention_backend: str = "default") -> str | None:
    """Why ``layout`` cannot run on ``device`` with this attention backend; None: it can."""
    on_gpu = device.startswith("cuda")
    if layout.tp > 1 and not on_gpu:
        return (
            "tp needs CUDA GPUs: PyTorch's tensor-parallel sharding (DTensor Colwise/RowwiseParallel, which diffusers' "
            "TensorParallelConfig uses) supports cuda, neuron and tpu devices, not the CPU"
        )
    if layout.ring > 1:
        if not on_gpu:
            return (
                "ring needs GPU attention kernels: ring attention merges partial results with their log-sum-exp, "
                "which PyTorch's CPU attention (diffusers' native backend) does not return; use ulysses on the CPU"
            )
        if attention_backend not in RING_BACKENDS:
            return (
                f"ring needs an attention backend that returns the log-sum-exp (QWEN_EDIT_SPEED_ATTENTION_BACKEND "
                f"one of {', '.join(RING_BACKENDS)}), not {attention_backend!r}"
            )
    return None


@dataclass
class RankContext:
    """What one rank of a group knows about the group once ``torch.distributed`` is initialised."""

    layout: Layout
    rank: int
    device: str
    mesh: Any  # torch.distributed DeviceMesh, named per Layout.mesh_shape

    @property
    def branch(self) -> int:
        return self.layout.cfg_rank(self.rank)

    @classmethod
    def create(cls, layout: Layout, rank: int, device: str) -> RankContext:
        from torch.distributed.device_mesh import init_device_mesh

        shape, names = layout.mesh_shape()
        mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", shape, mesh_dim_names=names)
        return cls(layout, rank, device, mesh)

    def parallel_config(self) -> Any:
        """diffusers' ParallelConfig for this rank's inner group (None: CFG-parallel alone)."""
        from diffusers import ContextParallelConfig, ParallelConfig, TensorParallelConfig

        layout = self.layout
        if layout.tp > 1:
            return ParallelConfig(
                tensor_parallel_config=TensorParallelConfig(tp_degree=layout.tp, mesh=self.mesh["tp"])
            )
        if layout.sequence > 1:
            anything = self.any_length
            cp = ContextParallelConfig(
                ulysses_degree=layout.ulysses,
                ring_degree=layout.ring,
                mesh=self.mesh["ring", "ulysses"],
                ulysses_anything=anything and layout.ring == 1,
                ring_anything=anything and layout.ulysses == 1,
            )
            return ParallelConfig(context_parallel_config=cp)
        return None

    @property
    def any_length(self) -> bool:
        """Whether diffusers' own "anything" mode takes sequences of any length: on GPUs, for Ulysses
        or Ring alone. Elsewhere the text is padded with a mask (``SequencePadding``)."""
        layout = self.layout
        return self.device.startswith("cuda") and layout.sequence > 1 and (layout.ring == 1 or layout.ulysses == 1)


def apply_layout(pipe: Any, ctx: RankContext, transformer_sharded: bool = False) -> list[str]:
    """Make ``pipe`` this rank's part of the group; what was applied. ``transformer_sharded``: the
    loader already applied the tensor-parallel config while reading the weights."""
    layout = ctx.layout
    why = runnable(layout, ctx.device, _backend_name(pipe.transformer))
    if why:
        raise LayoutError(f"parallel={layout}: {why}")
    layout.check_model(int(pipe.transformer.config.num_attention_heads))
    applied: list[str] = []
    config = ctx.parallel_config()
    if layout.sequence > 1:
        if not ctx.any_length:
            SequencePadding.install(pipe.transformer, layout.sequence)
        if ctx.device.startswith("cuda"):
            pipe.transformer.enable_parallelism(config=config)
        else:
            _enable_context_parallel_on_cpu(pipe.transformer, config, ctx)
        applied.append(f"ulysses={layout.ulysses},ring={layout.ring}")
    elif layout.tp > 1:
        if not transformer_sharded:
            pipe.transformer.enable_parallelism(config=config)
        applied.append(f"tp={layout.tp}")
    if layout.cfg > 1:
        from pipelines.cfg_parallel import CFGParallel, torch_exchange

        CFGParallel.install(pipe, ctx.branch, torch_exchange(ctx.mesh.get_group("cfg")))
        applied.append("cfg=2")
    log.info("parallel layout applied", layout=str(layout), rank=ctx.rank, branch=ctx.branch, applied=applied)
    return applied


def _backend_name(transformer: Any) -> str:
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        backend = getattr(processor, "_attention_backend", None)
        if backend is not None:
            return str(getattr(backend, "value", backend))
    return "default"


def _enable_context_parallel_on_cpu(transformer: Any, config: Any, ctx: RankContext) -> None:
    """``enable_parallelism``'s context-parallel steps with the CPU as the rank's device (see the module doc)."""
    import torch
    import torch.distributed as dist
    from diffusers.hooks.context_parallel import apply_context_parallel

    if transformer._parallel_config is not None:
        raise RuntimeError("parallelism is already applied to this transformer")
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=config.context_parallel_config.mesh)
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    apply_context_parallel(transformer, config.context_parallel_config, transformer._cp_plan)
    transformer._parallel_config = config


# --- sequence padding --------------------------------------------------------------------


class SequencePadding:
    """Pads the text sequence of each transformer call to a multiple of the sequence degree, with a
    mask that hides the padding, so diffusers' context-parallel split divides it evenly. Image
    tokens cannot be padded without moving their rotary positions: a count that does not divide
    fails here, clearly, instead of deep inside the split."""

    NAME = "qwen_edit_sequence_padding"

    def __init__(self, degree: int) -> None:
        self.degree = degree
        self.hook = OwnerForward(self)

    @classmethod
    def install(cls, transformer: Any, degree: int) -> SequencePadding:
        from diffusers.hooks import HookRegistry

        from pipelines.hooks import keep_new_forward

        padding = cls(degree)
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(padding.hook, cls.NAME)
        keep_new_forward(padding.hook.fn_ref)
        return padding

    def forward(self, forward: Any, *args: Any, **kwargs: Any) -> Any:
        from pipelines.speed import pad_text

        hidden = kwargs.get("hidden_states")
        text = kwargs.get("encoder_hidden_states")
        if args or hidden is None or text is None:
            return forward(*args, **kwargs)
        if hidden.shape[1] % self.degree:
            raise ValueError(
                f"{hidden.shape[1]} image tokens do not split over {self.degree} ranks: "
                "image sides must be multiples of 32 under sequence parallelism"
            )
        length = -(-text.shape[1] // self.degree) * self.degree
        if length != text.shape[1] or kwargs.get("encoder_hidden_states_mask") is not None:
            text, mask = pad_text(text, kwargs.get("encoder_hidden_states_mask"), length)
            kwargs = dict(kwargs, encoder_hidden_states=text, encoder_hidden_states_mask=mask)
        return forward(**kwargs)
