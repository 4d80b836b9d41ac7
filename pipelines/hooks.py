"""The diffusers hook plumbing shared by the speed and parallel features.

* ``keep_new_forward``: a hook whose ``new_forward`` survives the removal of the hook beneath it.
* ``model_hook_base``: diffusers' ``ModelHook``, imported when a hook class is defined.
* ``CFGPair``: the two true-CFG transformer passes of a step taken at the first (cond) call, the
  second (uncond) call answered from a stash. ``pipelines.speed.BatchedCFG`` runs the pair as one
  batch-2 forward, ``pipelines.cfg_parallel.CFGParallel`` on two ranks; each says how in ``_pair``.
"""

from __future__ import annotations

from collections import deque
from typing import Any, ClassVar


def keep_new_forward(fn_ref: Any) -> None:
    """Make a hook's ``new_forward`` survive the removal of the hook beneath it.

    diffusers' ``HookRegistry.remove_hook`` (0.42) repoints the next hook's ``fn_ref.forward`` at
    what the removed hook wrapped. For a hook with a ``new_forward`` that replaces the new_forward
    itself, so the hook is silently skipped from then on, and loading a LoRA does exactly that: it
    takes group offloading off and puts it back. With this reference, a new ``forward`` becomes what
    the ``new_forward`` wraps (``original_forward``), which is what the removal means."""
    from diffusers.hooks.hooks import HookFunctionReference

    class _NewForwardReference(HookFunctionReference):
        @property  # type: ignore[override]
        def forward(self) -> Any:
            return self._new_forward

        @forward.setter
        def forward(self, value: Any) -> None:
            self.original_forward = value

    new_forward = fn_ref.__dict__.pop("forward")
    fn_ref.__class__ = _NewForwardReference
    fn_ref._new_forward = new_forward


def model_hook_base() -> type:
    from diffusers.hooks import ModelHook

    return ModelHook


class CFGPair:
    """The pipeline encodes the prompt, then the negative prompt, then per step calls the
    transformer with the prompt's embeddings and then with the negative's, on the same latents. The
    two encodings are recorded where the pipeline makes them (``encode_prompt``); at the cond call
    ``_pair`` computes both predictions, the cond one is returned and the uncond one kept for the
    call that follows. The transformer side is a diffusers ``ModelHook`` in the model's registry, so
    it composes with group offloading, LoRA loading and the hooks inside the model. Calls it does not
    recognise (no CFG, other inputs), or a pair ``_pair`` declines, go through unchanged."""

    NAME: ClassVar[str]  # the hook's name in the transformer's registry
    ATTR: ClassVar[str]  # the pipeline attribute that holds the installed one

    def __init__(self, pipe: Any) -> None:
        self._encode = pipe.encode_prompt
        self._encoded: deque[Any] = deque(maxlen=2)
        self._stash: tuple[Any, Any, Any] | None = None  # (latents, negative embeds, uncond prediction)
        self.hook = OwnerForward(self)

    @classmethod
    def installed(cls, pipe: Any) -> Any:
        """The one installed on ``pipe``, or None."""
        found = getattr(pipe, cls.ATTR, None)
        return found if isinstance(found, cls) else None

    def _attach(self, pipe: Any) -> None:
        from diffusers.hooks import HookRegistry

        pipe.encode_prompt = self.encode_prompt
        HookRegistry.check_if_exists_or_initialize(pipe.transformer).register_hook(self.hook, self.NAME)
        keep_new_forward(self.hook.fn_ref)
        setattr(pipe, self.ATTR, self)

    @classmethod
    def uninstall(cls, pipe: Any) -> None:
        from diffusers.hooks import HookRegistry

        pair = cls.installed(pipe)
        if pair is not None:
            pipe.encode_prompt = pair._encode
            HookRegistry.check_if_exists_or_initialize(pipe.transformer).remove_hook(cls.NAME, recurse=False)
            delattr(pipe, cls.ATTR)

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
            self._stash = None  # the uncond call of a step whose pair is already computed
            return self._wrap(stash[2], kwargs)
        if len(self._encoded) == 2 and self._encoded[0][0] is text:
            pair = self._pair(forward, hidden, kwargs)
            if pair is not None:
                cond, uncond = pair
                self._stash = (hidden, self._encoded[1][0], uncond)
                return self._wrap(cond, kwargs)
        return forward(*args, **kwargs)

    def _pair(self, forward: Any, hidden: Any, kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
        """The cond and uncond predictions of this step (the encodings are ``self._encoded``), or
        None to run the cond call alone."""
        raise NotImplementedError

    @staticmethod
    def _wrap(sample: Any, kwargs: dict[str, Any]) -> Any:
        if kwargs.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=sample)
        return (sample,)


class OwnerForward(model_hook_base()):  # type: ignore[misc]
    """A diffusers ``ModelHook`` whose forward is its owner's: ``owner.forward(original_forward,
    *args, **kwargs)`` (a CFGPair here, parallel.py's SequencePadding), in the model's registry."""

    def __init__(self, owner: Any) -> None:
        super().__init__()
        self.owner = owner

    def new_forward(self, module: Any, *args: Any, **kwargs: Any) -> Any:
        return self.owner.forward(self.fn_ref.original_forward, *args, **kwargs)
