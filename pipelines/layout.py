"""How one request's work is laid out over a group of ranks (one process per GPU).

``QWEN_EDIT_PARALLEL`` names the degrees, comma-separated: ``cfg=2``, ``ulysses=2``, ``ring=2``,
``tp=2``, or combinations such as ``cfg=2,ulysses=2`` (4 ranks). The group's ranks form a mesh
``cfg x inner``: rank ``r`` runs CFG branch ``r // inner`` and is rank ``r % inner`` of its branch's
inner group, which splits the transformer by sequence (Ulysses / Ring: diffusers'
``ContextParallelConfig``) or by weights (``tp``: diffusers' ``TensorParallelConfig``).

What is checked here, before any process starts:
- ``cfg`` is 1 or 2 (a true-CFG step has exactly two passes);
- sequence parallelism (Ulysses, Ring) and tensor parallelism do not combine (diffusers 0.42 refuses
  a ``ParallelConfig`` with both);
- the inner degree is 2 or 4: each image's token count is a multiple of 4 when its sides are
  multiples of 32 (the pipeline makes condition images so; the group runner generates outputs so), and
  the text is padded with a mask to the degree's multiple;
- ``ulysses`` and ``tp`` divide the model's attention heads (``check_model``).
"""

from __future__ import annotations

from dataclasses import dataclass

KNOWN = ("cfg", "ulysses", "ring", "tp")
INNER_DEGREES = (1, 2, 4)


class LayoutError(ValueError):
    """A parallel layout that cannot run (bad syntax, a combination diffusers refuses, a model it does not fit)."""


@dataclass(frozen=True)
class Layout:
    cfg: int = 1
    ulysses: int = 1
    ring: int = 1
    tp: int = 1

    @classmethod
    def parse(cls, text: str | None) -> Layout:
        """``"cfg=2,ulysses=2"`` to a checked layout; empty or ``none``: one process."""
        text = (text or "").strip().lower()
        if text in ("", "none", "off", "1"):
            return cls()
        degrees: dict[str, int] = {}
        for part in (p.strip() for p in text.split(",") if p.strip()):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in KNOWN:
                raise LayoutError(
                    f"parallel layout {text!r}: {part!r} is not one of {', '.join(k + '=N' for k in KNOWN)}"
                )
            if name in degrees:
                raise LayoutError(f"parallel layout {text!r}: {name} given twice")
            try:
                degrees[name] = int(value)
            except ValueError:
                raise LayoutError(f"parallel layout {text!r}: {name}={value!r} is not a whole number") from None
        layout = cls(**degrees)
        layout.check()
        return layout

    def check(self) -> None:
        for name in KNOWN:
            if getattr(self, name) < 1:
                raise LayoutError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.cfg > 2:
            raise LayoutError("cfg is 1 or 2: a true-CFG step has two transformer passes (cond and uncond)")
        if self.tp > 1 and self.sequence > 1:
            raise LayoutError(
                "tp does not combine with ulysses/ring: diffusers 0.42 takes one of context or tensor parallelism "
                "per model; combine either with cfg=2 instead"
            )
        if self.inner not in INNER_DEGREES:
            raise LayoutError(
                f"ulysses x ring x tp is {self.inner}; it must be one of {', '.join(map(str, INNER_DEGREES))} "
                "(image token counts are multiples of 4, not of larger degrees)"
            )

    @property
    def sequence(self) -> int:
        """Ranks that split each pass's joint text + image sequence (Ulysses x Ring)."""
        return self.ulysses * self.ring

    @property
    def inner(self) -> int:
        """Ranks that share one CFG branch's transformer passes."""
        return self.sequence * self.tp

    @property
    def world_size(self) -> int:
        return self.cfg * self.inner

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def cfg_rank(self, rank: int) -> int:
        """Which CFG branch rank ``rank`` computes: 0 the prompt's, 1 the negative prompt's."""
        return rank // self.inner

    def inner_rank(self, rank: int) -> int:
        return rank % self.inner

    def mesh_shape(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """The device mesh's shape and dimension names: ``cfg x ring x ulysses`` or ``cfg x tp``."""
        if self.tp > 1:
            return (self.cfg, self.tp), ("cfg", "tp")
        return (self.cfg, self.ring, self.ulysses), ("cfg", "ring", "ulysses")

    def check_model(self, num_attention_heads: int) -> None:
        """Head-sharded modes need the heads to split evenly."""
        for name in ("ulysses", "tp"):
            degree = getattr(self, name)
            if degree > 1 and num_attention_heads % degree:
                raise LayoutError(
                    f"{name}={degree} needs the transformer's attention heads ({num_attention_heads}) to divide by "
                    f"{degree}"
                    + (
                        " (build the tiny model with `qwen-edit weights tiny --heads N`)"
                        if num_attention_heads < 4
                        else ""
                    )
                )

    def __str__(self) -> str:
        parts = [f"{name}={getattr(self, name)}" for name in KNOWN if getattr(self, name) > 1]
        return ",".join(parts) or "none"
