"""One job built straight for the store, for benchmarks and tests that seed or drive the store
without the API: an edit of two steps, no input images, created now. Any field can be set."""

from __future__ import annotations

from typing import Any

from server.jobs.contract import Job, JobParams, Status
from server.jobs.store import new_id, now_ms

MODEL = "wavespeed-ai/qwen-image/edit"


def store_job(*, steps: int = 2, seed: int = 1, **fields: Any) -> Job:
    """A queued ``edit`` job (``steps``: its steps and progress total); ``fields`` override any other."""
    now = now_ms()
    base: dict[str, Any] = {
        "id": new_id(),
        "model": MODEL,
        "variant": "edit",
        "status": Status.CREATED,
        "input": {"prompt": "x"},
        "params": JobParams(prompt="x", images=(), seed=seed, num_inference_steps=steps, true_cfg_scale=1.0),
        "base_url": "http://127.0.0.1",
        "output_format": "png",
        "base64_output": False,
        "seed": seed,
        "max_attempts": 3,
        "created_at": now,
        "updated_at": now,
        "progress_total": steps,
    }
    return Job(**{**base, **fields})
