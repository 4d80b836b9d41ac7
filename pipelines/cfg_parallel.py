"""CFG-parallel: the cond and uncond transformer passes of a true-CFG step on two ranks.

Every rank of the group runs the same pipeline call on the same inputs. Per step the pipeline calls
the transformer with the prompt's embeddings, then with the negative prompt's, on the same latents.
At the first of these calls, the rank of CFG branch 0 runs the prompt's pass and the rank of branch 1
the negative prompt's; one all-gather over the two branches gives both ranks both noise predictions.
The first call returns the prompt's, the second (which follows at once, on the same latents) returns
the stashed negative one without running. The weights are not sharded: each rank holds them all.

Like ``pipelines.speed.BatchedCFG``, the prompt encodings are recorded where the pipeline makes them
(``encode_prompt``), and the transformer side is a diffusers ``ModelHook`` in the model's hook
registry, so it composes with group offloading, LoRA loading and the context-parallel hooks inside
the model. Calls it does not recognise (no CFG, other inputs) go through unchanged on every rank.

``exchange`` is the one collective: given this rank's prediction, the predictions of both branches in
branch order. ``torch_exchange`` makes it an all-gather over a ``torch.distributed`` group; tests
may hand in any function.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

Exchange = Callable[[Any], tuple[Any, Any]]


def torch_exchange(group: Any) -> Exchange:
    """An all-gather of one tensor over the two-rank CFG ``group``: (branch 0's, branch 1's)."""
    import torch
    import torch.distributed as dist

    def exchange(mine: Any) -> tuple[Any, Any]:
        mine = mine.contiguous()
        both = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(both, mine, group=group)
        return both[0], both[1]

    return exchange


class CFGParallel:
    NAME = "qwen_edit_cfg_parallel"

    def __init__(self, pipe: Any, branch: int, exchange: Exchange) -> None:
        if branch not in (0, 1):
            raise ValueError(f"the CFG branch is 0 (prompt) or 1 (negative prompt), got {branch}")
        self.branch = branch
        self.exchange = exchange
        self._encode = pipe.encode_prompt
        self._encoded: deque[Any] = deque(maxlen=2)
        self._stash: tuple[Any, Any, Any] | None = None  # (latents, negative embeds, negative prediction)
        self.split_calls = 0  # steps whose two passes ran on the two ranks
        self.hook = _CFGParallelHook(self)

    @classmethod
    def install(cls, pipe: Any, branch: int, exchange: Exchange) -> CFGParallel:
        from diffusers.hooks import HookRegistry

        from pipelines.speed import BatchedCFG, _keep_new_forward

        if isinstance(getattr(pipe, "_batched_cfg", None), BatchedCFG):
            raise ValueError("CFG-parallel and batched CFG both take the two CFG passes: use one")
        if isinstance(getattr(pipe, "_cfg_parallel", None), CFGParallel):
            raise ValueError("CFG-parallel is already installed on this pipeline")
        split = cls(pipe, branch, exchange)
        pipe.encode_prompt = split.encode_prompt
        HookRegistry.check_if_exists_or_initialize(pipe.transformer).register_hook(split.hook, cls.NAME)
        _keep_new_forward(split.hook.fn_ref)
        pipe._cfg_parallel = split
        return split

    @classmethod
    def uninstall(cls, pipe: Any) -> None:
        from diffusers.hooks import HookRegistry

        split = getattr(pipe, "_cfg_parallel", None)
        if isinstance(split, CFGParallel):
            pipe.encode_prompt = split._encode
            HookRegistry.check_if_exists_or_initialize(pipe.transformer).remove_hook(cls.NAME, recurse=False)
            del pipe._cfg_parallel

    def encode_prompt(self, *args: Any, **kwargs: Any) -> Any:
        out = self._encode(*args, **kwargs)
        self._encoded.append(out)
        self._stash = None
        return out

    def forward(self, forward: Any, *args: Any, **kwargs: Any) -> Any:
        hidden = kwargs.get("hidden_states")
        text = kwargs.get("encoder_hidden_states")
        if args or hidden is None or text is None:
            return forward(*args, **kwargs)
        stash = self._stash
        if stash is not None and stash[0] is hidden and stash[1] is text:
            self._stash = None  # the uncond call of a step already computed on the other rank
            return self._wrap(stash[2], kwargs)
        if len(self._encoded) == 2 and self._encoded[0][0] is text:
            (_pos, _pos_mask), (neg, neg_mask) = self._encoded
            mine_kwargs = dict(kwargs, return_dict=False)
            if self.branch == 1:
                mine_kwargs.update(encoder_hidden_states=neg, encoder_hidden_states_mask=neg_mask)
            mine = forward(**mine_kwargs)[0]
            cond, uncond = self.exchange(mine)
            self._stash = (hidden, neg, uncond)
            self.split_calls += 1
            return self._wrap(cond, kwargs)
        return forward(*args, **kwargs)

    @staticmethod
    def _wrap(sample: Any, kwargs: dict[str, Any]) -> Any:
        if kwargs.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=sample)
        return (sample,)


def _model_hook_base() -> type:
    from diffusers.hooks import ModelHook

    return ModelHook


class _CFGParallelHook(_model_hook_base()):  # type: ignore[misc]
    """The transformer side of CFGParallel, in diffusers' hook registry."""

    def __init__(self, owner: CFGParallel) -> None:
        super().__init__()
        self.owner = owner

    def new_forward(self, module: Any, *args: Any, **kwargs: Any) -> Any:
        return self.owner.forward(self.fn_ref.original_forward, *args, **kwargs)
