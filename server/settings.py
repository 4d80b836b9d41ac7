"""The one configuration object, read once at start-up from ``QWEN_EDIT_*`` variables (or .env)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    from pipelines.layout import Layout


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QWEN_EDIT_", env_file=".env", extra="ignore", populate_by_name=True)

    # --- network -------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    # Base of the absolute URLs we hand out (urls.get, outputs, uploads). Unset: the base URL
    # the client used for that request (honouring X-Forwarded-* from trusted proxies).
    public_url: str | None = None
    # Other base URLs clients reach this server under (another proxy, a second host name): links
    # of this server under them are read from storage when handed back as inputs. Comma-separated.
    public_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Proxies whose X-Forwarded-Proto / -Host / -For are believed (comma-separated IPs or CIDRs, "*": any).
    forwarded_allow_ips: str = "127.0.0.1"
    # Vendor-host mode (README): the hosted API's names that clients with a hard-coded URL call
    # (WaveSpeed's ComfyUI nodes, huggingface_hub's provider). A request that arrives under one of
    # them came through the TLS proxy of `qwen-edit vendor-host`: its links are https://<that name>,
    # and such links handed back as inputs are read from storage. Inert until a proxy answers for them.
    vendor_hosts: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["api.wavespeed.ai", "wavespeed.ai"])

    # --- state ---------------------------------------------------------------------------
    data_dir: Path = Path("data")
    # Unset: SQLite (WAL) at data_dir/jobs.db. PostgreSQL: postgresql://user@host/db
    database_url: str | None = None
    # Unset: data_dir/files.
    storage_dir: Path | None = None

    # --- model ---------------------------------------------------------------------------
    variant: str = "edit"
    # A folder or Hub id of the weights to serve (env QWEN_EDIT_MODEL). Unset: weights/<Hub repo name>
    # when present, else a tiny random model built into data_dir/tiny/<variant> (noise, for trying
    # things out). "model" on a job is the public model id; here it is where the weights are.
    weights: str | None = Field(None, validation_alias="qwen_edit_model")
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    default_steps: int = Field(50, ge=1, le=200)
    default_true_cfg_scale: float = Field(4.0, ge=1.0, le=20.0)
    # True CFG only runs with a negative prompt: " " turns it on with no negative text.
    default_negative_prompt: str = " "
    allow_overrides: bool = True  # per-request num_inference_steps / true_cfg_scale / negative_prompt
    max_steps: int = Field(100, ge=1)
    warmup: bool = True

    # --- workers -------------------------------------------------------------------------
    # Workers started by `qwen-edit serve` beside the API (0: API only, for scale-out).
    embedded_workers: int = Field(1, ge=0)
    worker_id: str | None = None  # stable per GPU slot; unset: <hostname>/<slot>
    lease_s: float = Field(60.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    poll_interval_s: float = Field(1.0, gt=0)
    # One request on several GPUs (pipelines/layout.py): "cfg=2", "ulysses=2", "ring=2", "tp=2", or
    # combinations ("cfg=2,ulysses=2": 4 GPUs). Each worker is then a group of that many processes,
    # one per GPU, and `--workers N` counts GPUs: N // group size groups. Empty: one GPU per worker.
    # auto: a group only where the model does not fit one GPU without streaming weights (decided at
    # start-up from the GPUs' free memory: server/worker/ranks.py).
    parallel: str = ""
    # How long a rank of a group waits on the others (a collective, a step's go-on) before it gives up.
    parallel_timeout_s: float = Field(600.0, gt=0)

    # --- API behaviour -------------------------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Keys that see (read, cancel, list, delete) every key's predictions; each is a valid API key too.
    admin_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    auth_disabled: bool = False
    sync_timeout_s: float = Field(120.0, gt=0)
    queue_cap: int = Field(1000, ge=1)
    max_body_bytes: int = 40 * 1024 * 1024
    max_image_bytes: int = 25 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_prompt_chars: int = 4000
    # Submit bodies this big or bigger are parsed, and their inline images decoded, probed and
    # stored, in helper processes (server/api/bigbody.py): in a thread those C calls would hold the
    # GIL, and every other request of the process would wait. 0 processes: in a thread, as before.
    body_offload_bytes: int = Field(1024 * 1024, ge=0)
    body_processes: int = Field(1, ge=0)
    # API processes on the one port (serve --api-workers); the embedded workers still run once.
    api_workers: int = Field(1, ge=1)
    fetch_timeout_s: float = Field(20.0, gt=0)
    upload_ttl_s: int = Field(3600, gt=0)

    # --- webhooks ------------------------------------------------------------------------
    webhook_secret: str | None = None  # whsec_…; unset: generated once and kept in the database
    webhook_max_attempts: int = Field(8, ge=1)
    webhook_timeout_s: float = 10.0
    webhook_first_retry_s: float = Field(2.0, gt=0)  # then doubling, capped at 10 minutes

    # --- scale-out storage (S3-compatible object storage) -----------------------------------
    # Unset: the local folder storage_dir. s3://bucket/prefix: S3 or any S3-compatible server;
    # credentials come from the usual AWS_* variables (or an instance role).
    storage_url: str | None = None
    s3_endpoint_url: str | None = None  # e.g. http://minio:9000; unset: AWS itself
    s3_region: str | None = None  # unset: AWS_DEFAULT_REGION / AWS_REGION
    # Output links: through the API (/files/..., the default) or presigned object-store URLs.
    storage_presign: bool = False
    storage_presign_ttl_s: int = Field(3600, gt=0)
    # `qwen-edit worker` told to stop: finish the running job for up to this long, then hand it back.
    worker_drain_s: float = Field(30.0, ge=0)
    # Overlap (server/worker/overlap.py): claim and load the next job while the pipeline runs this
    # one, and encode and store outputs on their own threads, so that the GPU never waits on them.
    worker_overlap: bool = True
    worker_output_threads: int = Field(2, ge=1, le=16)  # threads encoding and storing outputs

    # --- hardening: SSRF, per-key limits, retention ------------------------------------------
    # Outbound requests (image URLs, webhooks) never reach loopback, private, link-local, multicast,
    # reserved or cloud-metadata addresses, except these CIDRs / host names ("10.0.0.0/8,images.lan").
    fetch_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)
    rate_limit_per_minute: int = Field(default=0, ge=0)  # submits per API key per minute; 0: unlimited
    max_jobs_per_key: int = Field(default=0, ge=0)  # queued + running jobs per API key; 0: unlimited
    retention_s: float = Field(default=0, ge=0)  # delete finished jobs and their files after this long; 0: keep
    retention_interval_s: float = Field(default=600.0, gt=0)

    # --- speed (pipelines/speed.py; benchmarks/) -----------------------------------------
    # Cond and uncond passes of a true-CFG step as one batch-2 forward (same results). Off until a GPU
    # measures it faster: prompts of unequal length need a padding mask, which keeps PyTorch's SDPA
    # off its flash kernel (and flash/sage backends take none: there it runs two passes anyway).
    speed_batched_cfg: bool = False
    # diffusers attention dispatcher: default (leave alone), native, flash, _flash_3, sage, _native_cudnn …
    # Unavailable backends fall back to native with a warning.
    speed_attention_backend: str = "default"
    speed_compile: bool = False  # regional torch.compile of the transformer blocks (dynamic shapes)
    speed_fp8: bool = False  # torchao fp8 dynamic-activation linears (Ada/Hopper GPUs only)
    speed_step_cache: bool = False  # cache-dit DBCache: faster, slightly different images
    speed_step_cache_warmup_steps: int = Field(8, ge=0)
    speed_step_cache_threshold: float = Field(0.12, gt=0)
    # Condition cache (pipelines/cache.py): VAE latents and prompt encodings of repeated input images,
    # reused bit for bit. Entries (a 1 MP image's: ~0.5 MB of latents, ~10 MB per prompt encoding); 0: off.
    speed_condition_cache: int = Field(16, ge=0, le=1024)
    # Dynamic batching: a worker runs up to this many queued, compatible jobs (same variant, size,
    # steps, guidance and condition size; no LoRAs) as one pipeline call. 1: one job per call.
    batch_max_size: int = Field(1, ge=1, le=16)
    # After claiming a batchable job, wait up to this long for compatible jobs to join it: the p50
    # price paid for throughput. 0: batch only what is already queued.
    batch_wait_ms: int = Field(0, ge=0, le=10_000)

    # --- runtime: variants, memory modes, LoRAs, presets -------------------------------------
    # The variants served, worker slot i serving variants[i % len] (one base model per worker).
    # Unset: [variant]. Each endpoint of a variant with no worker answers 404 "not enabled".
    variants: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Weights (folder or Hub id) per variant, env QWEN_EDIT_MODELS:
    # "edit-plus=/models/Qwen-Image-Edit-2509,edit-2511=Qwen/Qwen-Image-Edit-2511". A variant not
    # listed: `weights` if it is `variant`, else weights/<repo name>, else the tiny model.
    weights_by_variant: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, validation_alias="qwen_edit_models"
    )
    # auto (from free GPU memory), full, text-encoder-offload, model-offload, group-block, group-leaf.
    memory_mode: str = "auto"
    quantize: str = "auto"  # auto (fp8 when memory needs it and the GPU has fp8), none, fp8, int8
    lora_cache_size: int = Field(4, ge=1)  # adapters kept loaded per worker (LRU)
    # Where clients' LoRAs may come from (server/media/loras.py). Local files: only inside these
    # folders (comma-separated; unset: data_dir/loras). Hub files (owner/repo/file.safetensors): only
    # with lora_hub. URLs: through the SSRF guard, at most lora_max_bytes, into a download cache of at
    # most lora_cache_bytes (least recently used files go first).
    lora_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    lora_hub: bool = False
    lora_max_bytes: int = Field(2 * 1024**3, gt=0)
    lora_cache_bytes: int = Field(20 * 1024**3, gt=0)
    lora_fetch_timeout_s: float = Field(120.0, gt=0)
    # lightning-4 / lightning-8: that many steps, CFG off, FlowMatch shift 3; with lightning_lora
    # (a file, URL or Hub file like lightx2v/Qwen-Image-Lightning/<file>.safetensors) always on.
    preset: Literal["default", "lightning-4", "lightning-8"] = "default"
    lightning_lora: str | None = None

    # --- account: prices, budgets (server/api/account.py) ---------------------------------------
    # What one completed prediction costs, per model id (or "*" for every model), in USD:
    # "wavespeed-ai/qwen-image/edit=0.03,*=0.02". Unset: no charge (every price is 0).
    prices: Annotated[dict[str, float], NoDecode] = Field(default_factory=dict)
    # Spending caps per API key (the key itself or its 16-hex id; "*" for every key), in USD: a
    # submit that would take a key over its cap is refused with 402. Unset: no cap.
    budgets: Annotated[dict[str, float], NoDecode] = Field(default_factory=dict)

    # --- safety checker (server/worker/safety.py) -------------------------------------------------
    # A transformers image-classification model (folder or Hub id, e.g. Falconsai/nsfw_image_detection)
    # run by the worker on every output; its verdicts are has_nsfw_contents. Unset: no checker (false).
    safety_model: str | None = None
    # flag: report only; blur: report and blur the flagged output; refuse: fail the prediction.
    safety_action: Literal["flag", "blur", "refuse"] = "flag"
    safety_threshold: float = Field(0.5, ge=0.0, le=1.0)  # an unsafe label's score from which an output is flagged
    safety_labels: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["nsfw", "porn", "hentai", "sexy", "unsafe"]
    )  # the classifier's labels that count as unsafe (case-insensitive)

    # --- logs ----------------------------------------------------------------------------
    log_level: str = "INFO"
    log_json: bool = False

    @field_validator(
        "api_keys",
        "admin_keys",
        "fetch_allow",
        "lora_dirs",
        "public_urls",
        "safety_labels",
        "vendor_hosts",
        mode="before",
    )
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("vendor_hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        return [host.lower().rstrip(".") for host in value]

    @field_validator("parallel")
    @classmethod
    def _check_parallel(cls, value: str) -> str:
        from pipelines.layout import Layout

        if value.strip().lower() == "auto":
            return "auto"
        return str(Layout.parse(value))  # a LayoutError is a ValueError: a clear start-up error

    @field_validator("dtype")
    @classmethod
    def _no_fp16(cls, value: str) -> str:
        if value == "float16":
            # Qwen-Image's activations overflow fp16's range: the outputs turn to NaN (black images).
            raise ValueError("float16 is not supported: Qwen-Image overflows in fp16; use bfloat16 (or auto)")
        return value

    @field_validator("variants", mode="before")
    @classmethod
    def _split_variants(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("weights_by_variant", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError("models must look like 'edit-plus=/path,edit-2511=owner/repo'")
            return {k.strip(): v.strip() for k, v in pairs}
        return value

    @field_validator("prices", "budgets", mode="before")
    @classmethod
    def _split_amounts(cls, value: object) -> object:
        if isinstance(value, str):
            pairs = [p.rsplit("=", 1) for p in value.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError("amounts must look like 'name=0.02,*=0.01'")
            return {k.strip(): v.strip() for k, v in pairs}
        return value

    @model_validator(mode="after")
    def _apply_preset(self) -> Settings:
        if self.preset != "default":
            self.default_steps = int(self.preset.rsplit("-", 1)[1])
            self.default_true_cfg_scale = 1.0  # Lightning is distilled without CFG
        return self

    @classmethod
    def env_names(cls) -> set[str]:
        """Every environment variable these settings read (``QWEN_EDIT_*``)."""
        names = set()
        for name, info in cls.model_fields.items():
            alias = info.validation_alias
            names.add(alias.upper() if isinstance(alias, str) else f"QWEN_EDIT_{name.upper()}")
        return names

    @property
    def layout(self) -> Layout:
        from pipelines.layout import Layout

        # "auto" before start-up resolved it (server/worker/ranks.resolve_auto): one GPU per worker.
        return Layout() if self.parallel == "auto" else Layout.parse(self.parallel)

    @property
    def worker_slots(self) -> int:
        """Workers (single processes, or groups of ``parallel``'s size) that ``embedded_workers`` GPUs make."""
        if self.embedded_workers == 0:
            return 0
        return max(1, self.embedded_workers // self.layout.world_size)

    def slot_variant(self, slot: int) -> str:
        variants = self.variants or [self.variant]
        return variants[slot % len(variants)]

    def for_slot(self, slot: int) -> Settings:
        """These settings as worker ``slot`` runs them: its variant (``variants``) and that variant's weights."""
        if not self.variants:
            return self
        variant = self.slot_variant(slot)
        return self.model_copy(update={"variant": variant, "weights": self.weights_for(variant)})

    def weights_for(self, variant: str) -> str | None:
        return self.weights_by_variant.get(variant) or (self.weights if variant == self.variant else None)

    @property
    def served_variants(self) -> list[str]:
        """Variants with a worker here (embedded), or the configured ones (scale-out: workers elsewhere)."""
        if self.embedded_workers == 0:
            return list(self.variants or [self.variant])
        return list(dict.fromkeys(self.slot_variant(i) for i in range(self.worker_slots)))

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            url = self.database_url
            # SQLAlchemy's default PostgreSQL driver is psycopg2; we ship psycopg 3.
            if url.startswith("postgresql://") or url.startswith("postgres://"):
                url = "postgresql+psycopg://" + url.split("://", 1)[1]
            return url
        return f"sqlite:///{(self.data_dir / 'jobs.db').resolve()}"

    @property
    def resolved_storage_dir(self) -> Path:
        return (self.storage_dir or self.data_dir / "files").resolve()

    @property
    def resolved_lora_dirs(self) -> list[Path]:
        return [p.resolve() for p in (self.lora_dirs or [self.data_dir / "loras"])]

    @property
    def run_dir(self) -> Path:
        """Sockets the processes of one machine wake each other with."""
        return (self.data_dir / "run").resolve()
