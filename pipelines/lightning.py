"""The Lightning preset: 4 or 8 steps without CFG, on a FlowMatch scheduler with shift 3.

The Qwen-Image-Lightning LoRAs (lightx2v/Qwen-Image-Lightning on the Hub) were distilled with
this scheduler: the exponential time shift with base_shift = max_shift = ln 3 is a constant
shift of 3 whatever the image size.
"""

from __future__ import annotations

import math
from typing import Any

LIGHTNING_SCHEDULER: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": math.log(3),
    "max_image_seq_len": 8192,
    "max_shift": math.log(3),
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}


def use_lightning_scheduler(pipe: Any) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, **LIGHTNING_SCHEDULER)
