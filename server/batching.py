"""Which queued jobs may share one pipeline call (dynamic batching, ``batch_max_size``).

The API stamps each job with a key of everything that must match at claim time; the worker
claims compatible jobs by that key and then splits them by what only the decoded inputs tell
(the condition size, from each input's aspect ratio: ``EditRunner.batch_signature``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipelines.registry import Variant


def batch_key(variant: Variant, params: dict[str, Any]) -> str | None:
    """A short digest of the settings a batch must share; None for jobs that always run alone."""
    if variant.multi_image or len(params["images"]) != 1 or params.get("loras"):
        return None
    shared = [
        variant.name,
        params.get("width"),
        params.get("height"),
        params["num_inference_steps"],
        params["true_cfg_scale"],
        params.get("negative_prompt"),
    ]
    return hashlib.sha256(json.dumps(shared).encode()).hexdigest()[:32]
