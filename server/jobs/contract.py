"""The job contract: what the API writes on a job row and the worker reads back, typed.

Every process that touches a job speaks these frozen types; only the store turns them into rows
(``to_json``) and back (``from_json``). The stored JSON keeps the shape the first releases wrote, so
old rows still read:

    params = {"prompt", "images": [{"key": ...} | {"url": ...}], "width", "height", "seed",
              "num_inference_steps", "true_cfg_scale", "negative_prompt", "loras": [{"path", "scale"}]}
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from typing import Any

from pipelines.registry import Variant


class Status(enum.StrEnum):
    """The only four words a client ever sees."""

    CREATED = "created"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED})
IN_FLIGHT = frozenset({Status.CREATED, Status.PROCESSING})


# A worker refreshes its registry row this often, from the moment it starts loading; readiness and
# /metrics trust a row only while it is fresher than PRESENCE_FRESH_S (a worker that died is not ready).
PRESENCE_EVERY_S = 2.0
PRESENCE_FRESH_S = 10.0


class WorkerState(enum.StrEnum):
    """What a worker last said of itself (the ``workers`` table)."""

    LOADING = "loading"  # opening the store, loading and warming up the model
    READY = "ready"  # claiming and running jobs
    STOPPED = "stopped"  # exited cleanly
    FAILED = "failed"  # could not load its model; ``detail`` says why


@dataclass(frozen=True, slots=True)
class ImageRef:
    """One input image: bytes this server holds (``key`` in storage) or a remote ``url``."""

    key: str | None = None
    url: str | None = None

    def __post_init__(self) -> None:
        if (self.key is None) == (self.url is None):
            raise ValueError("an ImageRef is either a storage key or a URL")

    def to_json(self) -> dict[str, str]:
        return {"key": self.key} if self.key is not None else {"url": str(self.url)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageRef:
        return cls(key=str(data["key"])) if "key" in data else cls(url=str(data["url"]))


@dataclass(frozen=True, slots=True)
class LoraRef:
    """One LoRA as the client named it: a URL, a file in a LoRA folder, or a Hub file."""

    path: str
    scale: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "scale": self.scale}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoraRef:
        return cls(path=str(data["path"]), scale=float(data.get("scale", 1.0)))


@dataclass(frozen=True, slots=True)
class JobParams:
    """What the worker runs: the resolved seed, sizes, guidance and input references."""

    prompt: str
    images: tuple[ImageRef, ...]
    seed: int
    num_inference_steps: int
    true_cfg_scale: float
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    loras: tuple[LoraRef, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "images": [ref.to_json() for ref in self.images],
            "width": self.width,
            "height": self.height,
            "seed": self.seed,
            "num_inference_steps": self.num_inference_steps,
            "true_cfg_scale": self.true_cfg_scale,
            "negative_prompt": self.negative_prompt,
            "loras": [lora.to_json() for lora in self.loras],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobParams:
        return cls(
            prompt=str(data.get("prompt", "")),
            images=tuple(ImageRef.from_json(ref) for ref in data.get("images") or []),
            seed=int(data.get("seed", 0)),
            num_inference_steps=int(data.get("num_inference_steps", 1)),
            true_cfg_scale=float(data.get("true_cfg_scale", 1.0)),
            negative_prompt=data.get("negative_prompt"),
            width=data.get("width"),
            height=data.get("height"),
            loras=tuple(LoraRef.from_json(lora) for lora in data.get("loras") or []),
        )

    def stored_keys(self) -> set[str]:
        """The storage keys of the inputs this job holds (inline images, uploads)."""
        return {ref.key for ref in self.images if ref.key is not None}

    def batch_key(self, variant: Variant) -> str | None:
        """A digest of what jobs must share to run in one pipeline call (dynamic batching); None
        for jobs that always run alone. The worker splits further by what only the decoded inputs
        tell (the condition size: ``EditRunner.batch_signature``)."""
        if variant.multi_image or len(self.images) != 1 or self.loras:
            return None
        shared = [
            variant.name,
            self.width,
            self.height,
            self.num_inference_steps,
            self.true_cfg_scale,
            self.negative_prompt,
        ]
        return hashlib.sha256(json.dumps(shared).encode()).hexdigest()[:32]


@dataclass
class Job:
    """One prediction, as the store holds it."""

    id: str
    model: str  # the public model id, e.g. wavespeed-ai/qwen-image/edit
    variant: str
    status: Status
    input: dict[str, Any]  # what the client sent (inline images replaced by links)
    params: JobParams
    base_url: str
    output_format: str
    base64_output: bool
    seed: int
    max_attempts: int
    created_at: int
    updated_at: int
    priority: int = 0
    outputs: list[str] = field(default_factory=list)
    error: str = ""
    error_code: int | None = None
    attempts: int = 0
    lease_token: str | None = None
    lease_owner: str | None = None
    lease_expires_at: int | None = None
    cancel_requested: bool = False
    progress_step: int = 0
    progress_total: int = 0
    inference_ms: int = 0
    webhook_url: str | None = None
    api_key_id: str | None = None
    batch_key: str | None = None
    started_at: int | None = None
    finished_at: int | None = None
    nsfw: list[bool] | None = None  # the safety checker's verdict per output; None: not checked

    def to_row(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        values["status"] = self.status.value
        values["params"] = self.params.to_json()
        return values

    @classmethod
    def from_row(cls, row: Any) -> Job:
        return cls.from_values(dict(row._mapping))

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> Job:
        """The job of ``to_row()``'s values (a row read, or a ``Handoff``'s)."""
        values = {**values, "status": Status(values["status"]), "params": JobParams.from_json(values["params"] or {})}
        return cls(**values)

    def ended(self, ending: Ending) -> Job:
        """This job (as created) with what its end wrote: the finished row."""
        return replace(self, **{f.name: getattr(ending, f.name) for f in fields(Ending)})


@dataclass(frozen=True)
class Ending:
    """What a job's end wrote on its row: every column that changes after the job is created. With
    the job as created, it is the finished row, so whoever waits for the job (a sync request) is told
    the result with the news of the end, instead of reading the row again."""

    status: Status
    outputs: list[str]
    error: str
    error_code: int | None
    inference_ms: int
    nsfw: list[bool] | None
    attempts: int
    progress_step: int
    progress_total: int
    started_at: int | None
    finished_at: int | None
    updated_at: int
    lease_token: str | None
    lease_owner: str | None
    lease_expires_at: int | None
    cancel_requested: bool

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_row(cls, row: Any) -> Ending:
        values = {name: row._mapping[name] for name in cls.columns()}
        values["status"] = Status(values["status"])
        values["cancel_requested"] = bool(values["cancel_requested"])
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.columns()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ending:
        values = {name: data[name] for name in cls.columns()}  # KeyError: not an ending
        values["status"] = Status(values["status"])
        if not values["status"].terminal:
            raise ValueError(f"an ending cannot be {values['status']}")
        return cls(**values)


# PostgreSQL refuses a NOTIFY payload of 8000 bytes or more; both notifiers carry at most this.
MAX_MESSAGE_BYTES = 7900


@dataclass(frozen=True)
class Done:
    """The ``done`` message (a job ended), from whoever ended it to every API process: the job's id,
    whether its end queued a webhook delivery (the webhook dispatchers wake for those only: their
    outbox claim is a write), and its ``Ending`` where the message has room for it (an error message
    of several kilobytes may not): without one, a listener reads the row."""

    job_id: str
    webhook: bool = False
    ending: Ending | None = None

    def message(self) -> str:
        body: dict[str, Any] = {"id": self.job_id, "webhook": self.webhook}
        if self.ending is not None:
            full = json.dumps({**body, "ending": self.ending.to_json()}, separators=(",", ":"))
            if len(full.encode()) <= MAX_MESSAGE_BYTES:
                return full
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def parse(cls, payload: str) -> Done | None:
        """A message as sent; None for what is not one (a bare wake-up, a stray datagram). Older
        releases sent the id alone, with " webhook" after it when a delivery was due: still read."""
        if not payload.startswith("{"):
            job_id, _, due = payload.partition(" ")
            return cls(job_id, webhook=due == "webhook") if job_id else None
        try:
            body = json.loads(payload)
            job_id = body["id"]
        except (ValueError, KeyError, TypeError):
            return None
        ending = None
        if isinstance(body.get("ending"), dict):
            try:
                ending = Ending.from_json(body["ending"])
            except (ValueError, KeyError, TypeError):
                ending = None  # the listener reads the row
        return cls(str(job_id), webhook=bool(body.get("webhook")), ending=ending)


# A job handed to a worker starts with a lease this long at most: its heartbeat renews it to the
# worker's own lease within half a second. A job handed to a worker that died meanwhile is reaped
# (and queued again) once it runs out, instead of after a whole lease.
HANDOFF_LEASE_S = 10.0


@dataclass(frozen=True)
class Handoff:
    """A job handed to an idle worker (PostgreSQL): the submit that picked the worker inserted the
    job leased to it, and sends it the job on the worker's own channel, so that the worker starts it
    without a claim. ``job`` is the row as inserted, but for ``lease_owner`` (the submit's statement
    writes the picked worker's id there; the worker knows its own)."""

    job: Job

    def message(self) -> str | None:
        """The message, or None when it would not fit a NOTIFY (then the job is queued, not handed)."""
        text = json.dumps({"handoff": self.job.to_row()}, separators=(",", ":"))
        return text if len(text.encode()) <= MAX_MESSAGE_BYTES else None

    @classmethod
    def parse(cls, payload: str) -> Handoff | None:
        """A handoff as sent; None for anything else (a bare wake-up, a variant's name)."""
        if not payload.startswith('{"handoff"'):
            return None
        try:
            return cls(Job.from_values(json.loads(payload)["handoff"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"a handoff that does not parse: {exc}") from exc


@dataclass(frozen=True)
class WorkerInfo:
    """One row of the worker registry."""

    id: str
    host: str
    pid: int
    variant: str
    state: WorkerState
    detail: str
    started_at: int
    heartbeat_at: int

    def to_row(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        values["state"] = self.state.value
        return values

    @classmethod
    def from_row(cls, row: Any) -> WorkerInfo:
        values = dict(row._mapping)
        values["state"] = WorkerState(values["state"])
        return cls(**values)
