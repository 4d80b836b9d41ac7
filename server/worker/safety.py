"""The optional safety checker: a transformers image-classification model (``QWEN_EDIT_SAFETY_MODEL``,
a folder or a Hub id) run by the worker on every output before it is stored. Its verdicts become
``has_nsfw_contents``; ``QWEN_EDIT_SAFETY_ACTION`` says what else happens to a flagged output:
``flag`` (nothing), ``blur`` (stored blurred) or ``refuse`` (the prediction fails, nothing stored).
Without the setting there is no checker and every flag is false.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from PIL import Image, ImageFilter

from server.errors import JobError
from server.settings import Settings

log = structlog.get_logger(__name__)

Classify = Callable[[list[Image.Image]], list[list[dict[str, Any]]]]  # images -> [{label, score}] each


class SafetyRefused(JobError):
    """An output was flagged and the operator chose ``refuse``."""


@dataclass(frozen=True)
class Checked:
    images: list[Image.Image]  # as they are to be stored (blurred where flagged, with ``blur``)
    flags: list[bool]  # one verdict per output


class SafetyChecker:
    def __init__(self, classify: Classify, unsafe_labels: Sequence[str], threshold: float, action: str) -> None:
        self.classify = classify
        self.unsafe = {label.lower() for label in unsafe_labels}
        self.threshold = threshold
        self.action = action

    @classmethod
    def load(cls, settings: Settings) -> SafetyChecker | None:
        """The configured checker, loaded (None without ``safety_model``). Fails loudly: a checker
        the operator asked for is never silently skipped."""
        if not settings.safety_model:
            return None
        from transformers import pipeline

        device = settings.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        classifier = pipeline("image-classification", model=settings.safety_model, device=device)
        labels = {str(label).lower() for label in classifier.model.config.id2label.values()}
        unsafe = labels & {label.lower() for label in settings.safety_labels}
        if not unsafe:
            raise ValueError(
                f"safety model {settings.safety_model!r} has no label among QWEN_EDIT_SAFETY_LABELS "
                f"({', '.join(settings.safety_labels)}); its labels: {', '.join(sorted(labels))}"
            )
        top_k = len(labels)

        def classify(images: list[Image.Image]) -> list[list[dict[str, Any]]]:
            found = classifier([image.convert("RGB") for image in images], top_k=top_k)
            return [list(scores) for scores in found]

        log.info("safety checker loaded", model=settings.safety_model, unsafe_labels=sorted(unsafe))
        return cls(classify, sorted(unsafe), settings.safety_threshold, settings.safety_action)

    def check(self, images: Sequence[Image.Image]) -> Checked:
        """Verdicts for ``images``; raises SafetyRefused where ``refuse`` applies."""
        scores = self.classify(list(images))
        flags = [
            any(str(s["label"]).lower() in self.unsafe and float(s["score"]) >= self.threshold for s in found)
            for found in scores
        ]
        if any(flags):
            log.warning("safety checker flagged outputs", flagged=[i for i, f in enumerate(flags) if f])
            if self.action == "refuse":
                raise SafetyRefused("The output was flagged by the safety checker; it is not returned.")
        kept = [
            blurred(image) if flag and self.action == "blur" else image
            for image, flag in zip(images, flags, strict=True)
        ]
        return Checked(images=kept, flags=flags)


def blurred(image: Image.Image) -> Image.Image:
    """So blurred that nothing is recognisable (a radius of a tenth of the longer side)."""
    return image.filter(ImageFilter.GaussianBlur(radius=max(image.size) / 10))
