"""Service settings: environment (`LDM_*`) over an optional YAML file over defaults.

Nothing is read at import time: `load_settings()` (or `Settings(...)`) reads the environment and the
YAML file named by `LDM_CONFIG_FILE` when called, so tests and tools build their own settings.
Every field carries a description; the README's configuration table is generated from them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, Field, SecretStr, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
#: Redis connections of an API process kept for calls other than streams and waiting calls (submits, reads, quotas)
CONNECTIONS_SPARE = 8


def _digests(value: Any) -> Any:
    """A list of SHA-256 hex digests from YAML (a list) or the environment (comma- or space-separated), lowercased.
    Anything else is refused, so a plain key pasted by mistake never becomes a setting that "works"."""
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        return value
    digests = tuple(str(item).strip().lower() for item in items)
    bad = [i for i, d in enumerate(digests) if not SHA256_HEX.match(d)]
    if bad:
        raise ValueError(f"entries {bad} are not SHA-256 hex digests (64 hex digits): configure the digest of a "
                         "key (`ldm keys hash`), never the key itself")
    return digests


def _digest(value: Any) -> Any:
    if value is None or value == "":
        return None
    return _digests([value])[0]


Digests = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_digests)]


def _names(value: Any) -> Any:
    """A comma- or space-separated list (an env variable) or a list, as lower-case entries."""
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    return tuple(str(item).strip().lower() for item in items) if isinstance(items, list | tuple) else value


class Settings(BaseSettings):
    """Everything the API, the worker and `ldm serve` can be configured with."""

    # hide_input_in_errors: a bad value is never echoed (a plain key pasted for a digest, a Redis URL's password)
    model_config = SettingsConfigDict(env_prefix="LDM_", extra="forbid", frozen=True, hide_input_in_errors=True)

    config_file: Path | None = Field(
        default=None,
        description="YAML file of settings (keys are these field names); the environment overrides it.")

    # --- Redis
    redis_url: str | None = Field(
        default=None,
        description="Redis to use: redis://[:password@]host:6379/0, rediss://... (TLS; ?ssl_ca_certs=<pem> for a "
        "private CA) or unix:///path/redis.sock?db=0; unset = start an embedded Redis (one-box mode).")
    data_dir: Path = Field(
        default=Path("runs/service"), description="Folder of the embedded Redis's data (append-only file) and log.")
    embedded_redis_port: int = Field(
        default=0, ge=0, le=65535,
        description="0 = the embedded Redis listens on a unix socket in its 0700 data folder only (no TCP); a port = "
        "on 127.0.0.1 instead, with a random password made at start (in its 0600 redis.conf).")
    key_prefix: str = Field(
        default="ldm", pattern=r"^[A-Za-z0-9_.-]+$", description="Prefix of every Redis key (ldm:jobs:<model>, ...).")
    redis_timeout_s: float = Field(
        default=5.0, gt=0, description="Socket timeout of one Redis command; longer than any blocking read.")
    redis_connect_timeout_s: float = Field(
        default=2.0, gt=0, description="Timeout of one connection attempt to Redis.")
    redis_retries: int = Field(
        default=3, ge=0, le=10,
        description="Retries of a Redis operation after a connection error, then 503 / UNAVAILABLE.")
    redis_backoff_s: float = Field(
        default=0.1, gt=0, description="First retry delay; doubles with each retry (capped at 2 s).")
    redis_max_connections: int = Field(
        default=128, ge=4,
        description="Most Redis connections one process opens: one pool, shared by the REST and gRPC front ends of "
        "an API process (a worker has its own). A call finding them all busy waits for one (redis_pool_timeout_s), "
        "then answers 503 / UNAVAILABLE; the pool never grows past this.")
    redis_pool_timeout_s: float = Field(
        default=5.0, gt=0, description="Longest a Redis call waits for a free connection of the pool.")

    # --- front ends
    rest_host: str = Field(default="127.0.0.1", description="Address the REST API listens on.")
    rest_port: int = Field(default=8000, ge=0, le=65535, description="Port of the REST API.")
    grpc_host: str = Field(default="127.0.0.1", description="Address the gRPC server listens on.")
    grpc_port: int = Field(default=50051, ge=0, le=65535, description="Port of the gRPC server.")
    grpc_max_message_bytes: int = Field(
        default=64 * 2**20, ge=4 * 2**20,
        description="Largest gRPC message the server receives or sends (an Inpaint request carries an image and a "
        "mask; a Generate answer carries all n PNGs).")
    grpc_max_request_bytes: int = Field(
        default=64 * 2**10, ge=4 * 2**10,
        description="Largest request message of a gRPC method that carries no image (Generate, GetJob, WatchJob, "
        "...). The methods with images may carry max_image_bytes more per image: Img2Img, Upscale and "
        "SemanticToImage one, Inpaint two (image and mask); each method's limit is checked before its message is "
        "parsed (RESOURCE_EXHAUSTED), and the server receives no message longer than the largest of them (nor "
        "than grpc_max_message_bytes).")
    grpc_max_concurrent_rpcs: int = Field(
        default=512, ge=1,
        description="Most gRPC calls the server runs at once (streams included); beyond, grpc answers "
        "RESOURCE_EXHAUSTED at once.")
    rest_max_concurrency: int = Field(
        default=1024, ge=1,
        description="Most connections and requests the REST server (uvicorn limit_concurrency) holds at once; "
        "beyond, it answers 503 at once.")
    grpc_health_interval_s: float = Field(
        default=2.0, gt=0, description="How often the gRPC health service checks that Redis is reachable.")
    grpc_shutdown_grace_s: float = Field(
        default=10.0, ge=0, description="On shutdown, how long running gRPC calls may finish before they are aborted.")
    max_body_bytes: int = Field(
        default=48 * 2**20, ge=1,
        description="Largest REST request body in bytes (413 beyond); room for an image and a mask in base64.")
    sse_keepalive_s: float = Field(
        default=15.0, gt=0,
        description="A progress event stream (SSE) quiet for this long sends a keep-alive comment.")
    tls_cert_file: Path | None = Field(
        default=None,
        description="PEM certificate (chain) both front ends serve TLS with (REST becomes https, gRPC a secure "
        "port); set with tls_key_file. Unset = plain HTTP/gRPC (loopback, or TLS ended by a proxy in front).")
    tls_key_file: Path | None = Field(
        default=None, description="PEM private key of tls_cert_file; set both or neither.")
    grpc_reflection: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="gRPC server reflection (lets grpcurl list the API): auto = on without API keys, off once keys "
        "are configured (it would describe the API to anyone who reaches the port); on or off = always.")

    # --- authentication and quotas (service/auth.py, service/quotas.py; README "Operations and security")
    api_key_hashes: Digests = Field(
        default=(),
        description="SHA-256 hex digests of the accepted API keys (comma-separated); `ldm keys new` makes a key and "
        "its digest. Plain keys are never configured. Any key configured (here or in api_key_file) turns "
        "authentication on.")
    api_key_file: Path | None = Field(
        default=None,
        description="File of API key digests, one a line: `<digest> [label] [role=admin] [max_priority=high|normal|"
        "low]`, or `revoked <digest> [label]`; # comments. A key sees only the jobs it submitted; `role=admin` sees "
        "and cancels every key's jobs (operators); `max_priority` is the highest priority its jobs may ask for "
        "(default normal). Re-read when it changes, so keys and roles change without a restart; set, it turns "
        "authentication on (an empty file lets no one in).")
    revoked_key_hashes: Digests = Field(
        default=(),
        description="SHA-256 hex digests of revoked keys (comma-separated): answered 403 instead of 401.")
    auth_disabled: bool = Field(
        default=False,
        description="Serve without API keys on any address. Without keys and without this, the front ends serve "
        "loopback only and refuse to start on another address.")
    metrics_token_hash: Annotated[str | None, BeforeValidator(_digest)] = Field(
        default=None,
        description="SHA-256 hex digest of the bearer token the API's /metrics then requires; unset = /metrics is "
        "open (keep it off the public network).")
    key_rate_limit_per_s: float = Field(
        default=2.0, ge=0,
        description="Jobs per second one API key may submit, sustained (a token bucket in Redis); 0 = no limit. "
        "Beyond: 429 / RESOURCE_EXHAUSTED with Retry-After.")
    key_rate_burst: int = Field(
        default=20, ge=1, description="Jobs one API key may submit at once before its rate limit applies.")
    key_max_jobs_in_flight: int = Field(
        default=32, ge=0,
        description="Queued plus running jobs one API key may have; 0 = no cap. Beyond: 429 / RESOURCE_EXHAUSTED.")

    key_work_per_s: float = Field(
        default=20.0, ge=0,
        description="Work one API key may submit per second, sustained, in work units: images x width x height x "
        "steps / 1024² (one 1024x1024 image at one step is 1 unit; 8 such images at 50 steps, 400); a token "
        "bucket in Redis beside the rate limit; 0 = no limit. Beyond: 429 / RESOURCE_EXHAUSTED with Retry-After.")
    key_work_burst: float = Field(
        default=800.0, gt=0,
        description="Work units one API key may submit at once before key_work_per_s applies. A request costing more "
        "is accepted only from a full bucket, which it leaves in debt.")
    key_max_stored_bytes: int = Field(
        default=2**30, ge=0,
        description="Bytes of result PNGs one API key may have stored (each kept result_ttl_s); 0 = no cap. Over it "
        "a submission answers 429 / RESOURCE_EXHAUSTED, Retry-After = until enough has expired.")
    key_max_event_streams: int = Field(
        default=8, ge=1,
        description="Progress streams (SSE /v1/jobs/{id}/events, gRPC WatchJob) one API key may hold open at once "
        "on one API process; beyond: 429 / RESOURCE_EXHAUSTED.")
    max_event_streams: int = Field(
        default=64, ge=1,
        description="Progress streams all callers may hold open at once on one API process; beyond: 429 / "
        "RESOURCE_EXHAUSTED.")
    key_max_waiting_calls: int = Field(
        default=8, ge=1,
        description="Synchronous calls (REST /v1/txt2img ..., /v1/images/*, /sdapi/v1/*2img; every gRPC call that "
        "generates) one API key may have waiting for their images at once on one API process; beyond: 429 / "
        "RESOURCE_EXHAUSTED, before anything is queued.")
    max_waiting_calls: int = Field(
        default=48, ge=1,
        description="Synchronous calls all callers may have waiting at once on one API process; beyond: 429 / "
        "RESOURCE_EXHAUSTED.")

    # --- the queue
    queue_max_depth: int = Field(
        default=256, ge=1,
        description="Accepted, unfinished jobs per model beyond which a submit answers 429 / RESOURCE_EXHAUSTED.")
    queue_retry_after_s: int = Field(
        default=2, ge=1, description="Retry-After (seconds) sent with a full-queue answer.")
    result_ttl_s: int = Field(
        default=3600, ge=1, description="How long result PNGs, job records and events are kept after a job ends.")
    idempotency_ttl_s: int = Field(
        default=86400, ge=1, description="How long an Idempotency-Key keeps answering with the same job (keys are "
        "per API key: two keys' equal Idempotency-Keys name two jobs).")
    visibility_timeout_s: float = Field(
        default=60.0, gt=0,
        description="A claimed job whose worker shows no sign of life (no step, no keep-alive) for this long is "
        "taken over by another worker.")
    max_attempts: int = Field(
        default=3, ge=1, description="Deliveries of a job to workers before it fails into the dead-letter stream.")
    job_deadline_s: float = Field(
        default=600.0, gt=0,
        description="A job not started this long after submission fails (deadline exceeded) instead of running "
        "(a request may ask for less: `deadline_s`, or a gRPC deadline); also the longest a synchronous endpoint "
        "waits.")

    # --- workers
    max_batch: int = Field(default=8, ge=1, le=256, description="Most jobs a worker claims and batches at once.")
    batching: Literal["static", "continuous"] = Field(
        default="static", description="How a worker batches: static = a batch of compatible jobs runs to its end; "
        "continuous = jobs join and leave the running batch at every sampler step (same model, task and size).")
    step_cost_budget: float = Field(
        default=0.0, ge=0, description="Continuous batching: the most a step may cost, in steps of one sample as the "
        "worker measures them; new samples join only while the step stays within it (0 = no budget: up to "
        "max_batch). Bounds how much joining slows the samples running where a step of k samples costs more than "
        "one (a CPU); docs/continuous-batching.md.")
    admission_order: Literal["fifo", "shortest"] = Field(
        default="fifo", description="Continuous batching: which waiting job takes a free slot: fifo = arrival "
        "order; shortest = least work left (images x steps) first, except that a job waiting priority_aging_s or "
        "more goes first (no starvation).")
    priority_aging_s: float = Field(
        default=30.0, gt=0, description="Priority aging: a queued job's priority rises one level (low -> normal -> "
        "high) per this many seconds waited, so a low job waits at most about 2x this for its turn behind a steady "
        "stream of high ones (docs/continuous-batching.md).")
    max_wait_ms: int = Field(
        default=20, ge=1, description="Longest a worker blocks waiting for jobs before looking again (milliseconds).")
    heartbeat_interval_s: float = Field(
        default=5.0, gt=0, description="Worker heartbeat period; a worker silent for 3 periods counts as gone.")
    worker_device: str | None = Field(
        default=None, description="Device of a worker (cpu, cuda, cuda:1, ...); unset = cuda when present, else cpu.")
    worker_dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        default="auto", description="Weights and activations of a worker: auto = fp16 on cuda, fp32 on cpu.")
    worker_winograd: Literal["balanced", "all", "off"] = Field(
        default="balanced", description="Which 3x3 convolutions a CPU worker computes by Winograd's F(2x2, 3x3) "
        "(fp32 on the CPU; the same images to float rounding): balanced = the UNet's of 256-640 channels and the "
        "VAE's of at least 256 (filters made on each call: no memory cost); all = the UNet's "
        "the 1280-channel ones too (the SD-1.5 step 7 % faster at 256 px for +1.5 GB of peak memory); off = none "
        "(bit-identical to PyTorch's eager convolution). docs/benchmarks.md has the figures.")
    worker_gpu_mode: Literal["graphs", "compile", "eager"] = Field(
        default="graphs", description="How a GPU worker runs its UNet: graphs = one CUDA graph per (batch, latent "
        "size) bucket, replayed (the same images as eager; steps with LoRA adapters run eagerly); compile = "
        "torch.compile (each bucket compiles once; keep TORCHINDUCTOR_CACHE_DIR on a volume to keep that across "
        "restarts); eager = the modules as they are. docs/benchmarks.md has the figures.")
    worker_finish_overlap: bool = Field(
        default=True, description="A worker encodes a finished job's PNGs and stores it in Redis while it runs its "
        "next step or batch (service/worker/finisher.py); false = each job is stored before the next step starts "
        "(the same images either way).")
    worker_torch_threads: int = Field(
        default=0, ge=0, description="CPU threads of a worker's torch ops; 0 = PyTorch's default (one per core).")
    worker_tokenizer_dir: Path | None = Field(
        default=None,
        description="Tokenizer folder (vocab.json + merges.txt) for a worker's single-file SD checkpoint, which "
        "carries none.")
    worker_tokenizer_2_dir: Path | None = Field(
        default=None,
        description="SDXL's second tokenizer folder (OpenCLIP bigG's `tokenizer_2/`) for a worker's single-file SDXL "
        "checkpoint; the refiner's one encoder takes this one.")
    worker_refiner: str | None = Field(
        default=None,
        description="SDXL refiner a worker holds beside its SDXL base model (a checkpoint file or diffusers folder, "
        "loaded once, on the worker's device): requests ask for it with `refiner` (A1111: refiner_checkpoint) by its "
        "file or folder name without suffix, and it finishes their txt2img images from `refiner_switch` on; unset = "
        "no refiner. A single file's encoder takes LDM_WORKER_TOKENIZER_2_DIR.")
    worker_metrics_host: str = Field(
        default="127.0.0.1", description="Address a worker serves its /metrics on (0.0.0.0 to be scraped from "
        "another host).")
    worker_metrics_port: int = Field(
        default=0, ge=0, le=65535,
        description="Port of a worker's /metrics; 0 = a free port (the worker logs its URL).")
    lora_dir: Path | None = Field(
        default=None,
        description="Folder of the LoRA adapters requests may name (`loras: [{\"name\": \"style\", \"weight\": 0.8}]`, "
        "or `<lora:style:0.8>` in an A1111-syntax prompt): `<name>.safetensors` files, kohya/A1111 or diffusers/PEFT. "
        "Names only, never paths; unset = requests with loras are refused. Read by the front ends (unknown names: 422) "
        "and the workers.")
    lora_cache_mb: float = Field(
        default=1024, gt=0,
        description="Most megabytes of LoRA tensors a worker keeps loaded (least recently used evicted first).")
    max_loras: int = Field(default=8, ge=0, description="Most LoRA adapters one request may ask for.")
    prompt_syntax: Literal["a1111", "plain"] = Field(
        default="a1111",
        description="How CLIP-family text encoders read prompts: a1111 = AUTOMATIC1111's syntax ((word), (word:1.3), "
        "[word], BREAK, prompts past 75 tokens in chunks, <lora:name:weight> tags); plain = as diffusers (the text as "
        "is, truncated at 77 tokens). docs/lora-and-prompts.md.")
    embeddings_dir: Path | None = Field(
        default=None,
        description="Folder of textual-inversion embeddings a worker loads at start (A1111 .pt/.safetensors, "
        "diffusers learned_embeds); a prompt uses one by its file stem (or <stem>, or its token).")
    default_model: str = Field(
        default="tiny-shapes", pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$",
        description="Model used when a request names none.")

    # --- request limits
    min_width: int = Field(default=32, ge=8, description="Smallest image width in pixels.")
    max_width: int = Field(default=1024, ge=8, description="Largest image width in pixels.")
    min_height: int = Field(default=32, ge=8, description="Smallest image height in pixels.")
    max_height: int = Field(default=1024, ge=8, description="Largest image height in pixels.")
    size_multiple: int = Field(
        default=8, ge=1,
        description="Width and height must be multiples of this (the autoencoder's downsampling factor).")
    max_steps: int = Field(default=1000, ge=1, description="Most sampler steps a request may ask for.")
    max_n: int = Field(default=8, ge=1, description="Most images one request may ask for.")
    max_guidance_scale: float = Field(default=30.0, ge=0, description="Largest classifier-free guidance scale.")
    max_prompt_bytes: int = Field(
        default=2048, ge=1, description="Longest prompt or negative prompt, in UTF-8 bytes.")
    max_image_bytes: int = Field(
        default=16 * 2**20, ge=1,
        description="Largest encoded input image or mask (img2img, inpaint, upscale), in bytes.")
    max_image_pixels: int = Field(
        default=4096 * 4096, ge=1,
        description="Largest decoded input image, in pixels (guards against decompression bombs).")
    webhook_allowed_hosts: Annotated[tuple[str, ...], NoDecode, BeforeValidator(_names)] = Field(
        default=(), description="Hosts a job's webhook_url may name (comma-separated): `hooks.example.com` exactly, "
        "`.example.com` any subdomain, an IP address or CIDR (the only way to allow private, loopback or link-local "
        "addresses). Empty: webhooks are off.")
    webhook_secret: SecretStr | None = Field(
        default=None, description="The Standard Webhooks signing secret (`whsec_` + base64 key, or any text); "
        "deliveries are unsigned without one.")
    webhook_max_attempts: int = Field(default=6, ge=1, description="Delivery attempts of one event before it is "
                                      "dead-lettered.")
    webhook_backoff_s: float = Field(default=1.0, gt=0, description="Wait before the first retry of a delivery; "
                                     "doubled at each further one (at most 10 minutes).")
    webhook_timeout_s: float = Field(default=10.0, gt=0, description="Seconds one delivery attempt may take.")
    a1111_preview_every: int = Field(
        default=0, ge=0, le=1000, description="Live previews of /sdapi/v1 jobs that do not say (their `preview_every` "
        "extension field): every this many steps, shown by GET /sdapi/v1/progress as `current_image`; 0 = none "
        "(`current_image` null). Made by static and continuous-batching workers alike.")

    @property
    def heartbeat_ttl_s(self) -> float:
        """A worker's registry entry lives this long after its last heartbeat."""
        return 3 * self.heartbeat_interval_s

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.min_width > self.max_width or self.min_height > self.max_height:
            raise ValueError("min_width/min_height must not exceed max_width/max_height")
        if 0 < self.step_cost_budget < 1:
            raise ValueError(f"step_cost_budget must be 0 (no budget) or at least 1 (a step of one sample), got "
                             f"{self.step_cost_budget}")
        if self.max_wait_ms / 1000 >= self.redis_timeout_s:
            raise ValueError("max_wait_ms must be shorter than redis_timeout_s (a blocking read would time out)")
        held = self.max_event_streams + self.max_waiting_calls
        if held + CONNECTIONS_SPARE > self.redis_max_connections:
            raise ValueError(f"max_event_streams + max_waiting_calls ({held}) + {CONNECTIONS_SPARE} must not exceed "
                             f"redis_max_connections ({self.redis_max_connections}): each stream and waiting call "
                             "holds a Redis connection while it waits for events, and the rest need some")
        for name in ("rest_max_concurrency", "grpc_max_concurrent_rpcs"):
            if getattr(self, name) <= held:
                raise ValueError(f"{name} ({getattr(self, name)}) must exceed max_event_streams + max_waiting_calls "
                                 f"({held}), or streams would crowd out every other call")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both tls_cert_file and tls_key_file (LDM_TLS_CERT_FILE, LDM_TLS_KEY_FILE) or neither")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Precedence: explicit arguments, then `LDM_*` variables, then the YAML file, then defaults."""
        return init_settings, env_settings, _YamlFileSource(settings_cls)


class _YamlFileSource(PydanticBaseSettingsSource):
    """The YAML file named by `config_file` (from the arguments or `LDM_CONFIG_FILE`), read when settings are built.

    Unknown keys are errors (the model forbids extras), so a typo in the file does not pass silently.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the whole file at once

    def __call__(self) -> dict[str, Any]:
        path = self.current_state.get("config_file")
        if not path:
            return {}
        data = yaml.safe_load(Path(path).read_text())
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path}: expected a mapping of setting names to values")
        data.pop("config_file", None)
        return data


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment and the YAML file (`LDM_CONFIG_FILE`), with `overrides` on top."""
    return Settings(**overrides)
