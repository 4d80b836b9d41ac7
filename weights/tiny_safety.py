"""A tiny, random, offline image classifier in the layout of the Hub's NSFW classifiers (a ViT
with ``normal`` / ``nsfw`` labels and its image processor), for trying and testing the safety
checker (``QWEN_EDIT_SAFETY_MODEL``) without downloading one.

Its weights are random, so its verdicts mean nothing; ``verdict`` pins them (``nsfw``: every image
flagged, ``normal``: none) by the classifier head's bias, so that tests know what to expect. The
folder is checked by loading it through the worker's own loading code (SafetyChecker.load).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

LABELS = {0: "normal", 1: "nsfw"}
Verdict = Literal["nsfw", "normal", "random"]


def build_tiny_safety(folder: Path, verdict: Verdict = "random", seed: int = 0) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )
    model = ViTForImageClassification(config).eval()
    if verdict != "random":
        with torch.no_grad():  # the head ignores the image and says ``verdict`` with ~0.99
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.tensor([5.0, 0.0] if verdict == "normal" else [0.0, 5.0]))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, do_normalize=True)
    processor.save_pretrained(folder)
    _check(folder)
    return folder


def _check(folder: Path) -> None:
    """Load and run the folder as the worker would."""
    from PIL import Image

    from server.settings import Settings
    from server.worker.safety import SafetyChecker

    checker = SafetyChecker.load(Settings(safety_model=str(folder), device="cpu"))
    assert checker is not None
    checker.check([Image.new("RGB", (40, 30), (120, 80, 40))])
