"""CFG-parallel: the cond and uncond transformer passes of a true-CFG step on two ranks.

Every rank of the group runs the same pipeline call on the same inputs. Per step the pipeline calls
the transformer with the prompt's embeddings, then with the negative prompt's, on the same latents.
At the first of these calls, the rank of CFG branch 0 runs the prompt's pass and the rank of branch 1
the negative prompt's; one all-gather over the two branches gives both ranks both noise predictions.
The first call returns the prompt's, the second (which follows at once, on the same latents) returns
the stashed negative one without running. The weights are not sharded: each rank holds them all.

Like ``pipelines.speed.BatchedCFG``, it is a ``pipelines.hooks.CFGPair``: the prompt encodings are
recorded where the pipeline makes them, and the transformer side is a diffusers ``ModelHook``, so it
composes with group offloading, LoRA loading and the context-parallel hooks inside the model. Calls
it does not recognise (no CFG, other inputs) go through unchanged on every rank.

``exchange`` is the one collective: given this rank's prediction, the predictions of both branches in
branch order. ``torch_exchange`` makes it an all-gather over a ``torch.distributed`` group; tests
may hand in any function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipelines.hooks import CFGPair

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


class CFGParallel(CFGPair):
    """The two passes of a CFG step on two ranks (the shared mechanics: ``pipelines.hooks.CFGPair``)."""

    NAME = "qwen_edit_cfg_parallel"
    ATTR = "_cfg_parallel"

    def __init__(self, pipe: Any, branch: int, exchange: Exchange) -> None:
        if branch not in (0, 1):
            raise ValueError(f"the CFG branch is 0 (prompt) or 1 (negative prompt), got {branch}")
        super().__init__(pipe)
        self.branch = branch
        self.exchange = exchange
        self.split_calls = 0  # steps whose two passes ran on the two ranks

    @classmethod
    def install(cls, pipe: Any, branch: int, exchange: Exchange) -> CFGParallel:
        from pipelines.speed import BatchedCFG

        if BatchedCFG.installed(pipe) is not None:
            raise ValueError("CFG-parallel and batched CFG both take the two CFG passes: use one")
        if cls.installed(pipe) is not None:
            raise ValueError("CFG-parallel is already installed on this pipeline")
        split = cls(pipe, branch, exchange)
        split._attach(pipe)
        return split

    def _pair(self, forward: Any, hidden: Any, kwargs: dict[str, Any]) -> tuple[Any, Any]:
        (_pos, _pos_mask), (neg, neg_mask) = self._encoded
        mine_kwargs = dict(kwargs, return_dict=False)
        if self.branch == 1:
            mine_kwargs.update(encoder_hidden_states=neg, encoder_hidden_states_mask=neg_mask)
        mine = forward(**mine_kwargs)[0]
        self.split_calls += 1
        return self.exchange(mine)  # (cond, uncond): branch 0's and branch 1's
