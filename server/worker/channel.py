"""Rank 0 tells the other ranks of its group what to run, and when to stop, through its TCPStore.

The store (not a collective) carries the jobs: a follower waits on it for as long as the queue is
empty without any collective timing out. Messages are JSON, images PNG (lossless), never pickles: the
store listens on a socket. Per run: ``run/<n>`` (the inputs), then ``run/<n>/step/<k>`` for each step,
rank 0's decision to go on (1) or stop (0: cancelled or handed back) that every rank applies at the
same step, so all stop together and none waits in a collective for a step that will not come.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from datetime import timedelta
from typing import Any

from PIL import Image

from pipelines.lora import LoraRequest
from pipelines.runner import EditInputs

STOP = "stop"


def encode_inputs(inputs: EditInputs) -> bytes:
    def png(image: Image.Image) -> str:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    fields = {k: v for k, v in vars(inputs).items() if k not in ("images", "loras")}
    fields["images"] = [png(image) for image in inputs.images]
    fields["loras"] = [vars(lora) for lora in inputs.loras]
    return json.dumps({"kind": "run", "inputs": fields}).encode()


def decode_inputs(fields: dict[str, Any]) -> EditInputs:
    images: list[Image.Image] = []
    for data in fields.pop("images"):
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        image.load()
        images.append(image)
    loras = [LoraRequest(**lora) for lora in fields.pop("loras")]
    return EditInputs(images=images, loras=loras, **fields)


class Channel:
    def __init__(self, store: Any, timeout_s: float) -> None:
        self.store = store
        self.timeout = timedelta(seconds=timeout_s)
        self.run_id = 0
        self._last_step: dict[int, int] = {}

    # --- rank 0 ---------------------------------------------------------------------------

    def send_run(self, inputs: EditInputs) -> int:
        self.run_id += 1
        if self.run_id > 2:  # every rank has read run n-2 by now: it stepped through it in lockstep
            self._forget(self.run_id - 2)
        self.store.set(f"run/{self.run_id}", encode_inputs(inputs))
        return self.run_id

    def send_stop(self) -> None:
        self.run_id += 1
        self.store.set(f"run/{self.run_id}", json.dumps({"kind": STOP}).encode())

    def decide(self, step: int, go_on: bool) -> bool:
        self.store.set(f"run/{self.run_id}/step/{step}", b"1" if go_on else b"0")
        self._last_step[self.run_id] = step
        return go_on

    def _forget(self, run_id: int) -> None:
        self.store.delete_key(f"run/{run_id}")
        for step in range(self._last_step.pop(run_id, -1) + 1):
            self.store.delete_key(f"run/{run_id}/step/{step}")

    # --- other ranks ----------------------------------------------------------------------

    def receive(self, stopping: threading.Event, poll_s: float = 0.05) -> EditInputs | None:
        """The next run's inputs; None when rank 0 says stop (or ``stopping`` is set). Polls with
        ``check`` (a blocking ``wait`` that times out logs a warning each time, for an idle queue)."""
        self.run_id += 1
        key = f"run/{self.run_id}"
        while not self.store.check([key]):  # raises once rank 0 (the store) is gone
            if stopping.wait(poll_s):
                return None
        message = json.loads(self.store.get(key))
        if message["kind"] == STOP:
            return None
        return decode_inputs(message["inputs"])

    def report_error(self, rank: int, kind: str, message: str) -> None:
        """A follower's run failed (it exits next): what, for rank 0 to fail the job with."""
        self.store.set(f"run/{self.run_id}/error/{rank}", json.dumps({"kind": kind, "message": message}).encode())

    def errors(self, world_size: int) -> dict[int, dict[str, str]]:
        """Rank 0: the errors followers reported for the current run."""
        keys = {rank: f"run/{self.run_id}/error/{rank}" for rank in range(1, world_size)}
        return {rank: json.loads(self.store.get(key)) for rank, key in keys.items() if self.store.check([key])}

    def decision(self, step: int) -> bool:
        """Rank 0's decision at ``step`` of the current run (waits for it, up to the group timeout)."""
        key = f"run/{self.run_id}/step/{step}"
        self.store.wait([key], self.timeout)
        return bool(self.store.get(key) == b"1")
