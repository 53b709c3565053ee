"""The one settings object. Built from `INFERQ_*` environment variables (and CLI flags on top), then passed down
explicitly: nothing here is constructed at import time."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from platformdirs import user_data_dir
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from common.engine_config import EngineConfig, engine_config_from, engine_field

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERQ_", extra="ignore")

    # --- edge -------------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated bearer keys (KEY: admin, ROLE:KEY); any turns auth on."
    )
    auth: Literal["auto", "on", "off"] = Field(
        default="auto", description="auto: on once any API key or user exists (or INFERQ_API_KEYS is set)."
    )
    login_token_ttl_s: float = Field(default=86_400.0, ge=1, description="Lifetime of a POST /users/me/token token.")
    login_attempts_per_minute: int = Field(
        default=120,
        ge=0,
        description=("Logins (POST /users/me/token) per minute in all, every replica together; 0: unlimited."),
    )
    login_attempts_per_minute_per_address: int = Field(
        default=30, ge=0, description=("Logins per minute from one client address (an IPv6 /64); 0: unlimited.")
    )
    rate_limit_requests_per_minute: int = Field(default=60, ge=0, description="Per-key default; 0: unlimited.")
    rate_limit_tokens_per_minute: int = Field(default=150_000, ge=0, description="Per-key default; 0: unlimited.")
    rate_limit_requests_per_day: int = Field(default=3_500, ge=0, description="Per-key default; 0: unlimited.")
    edge_id: str | None = Field(default=None, description="Token-event subject segment; random per process.")
    max_request_bytes: int = Field(default=8 * 1024 * 1024, description="Larger request bodies get a 413.")

    # --- broker -----------------------------------------------------------------------------------------
    nats_url: str | None = Field(default=None, description="Use this NATS server instead of an embedded one.")
    # Credentials for a NATS server that requires them (distributed mode); the embedded one is loopback-only.
    nats_user: str | None = Field(default=None, description="NATS user (with nats_password).")
    nats_password: str | None = Field(default=None, repr=False, description="NATS password.")
    nats_nkey_file: Path | None = Field(default=None, description="NATS nkey seed file (needs the nkeys package).")
    nats_creds_file: Path | None = Field(default=None, description="NATS JWT credentials file (.creds).")
    data_dir: Path = Field(default_factory=lambda: Path(user_data_dir("inferq")))
    queue_max_requests: int = Field(default=1024, ge=1, description="Per-model queue cap; full means 429.")
    queue_max_age_s: float = Field(default=600.0, gt=0, description="Backstop: queued requests older than this expire.")
    duplicate_window_s: float = Field(default=120.0, gt=0, description="Idempotency window for request ids.")
    results_max_age_s: float = Field(
        default=86_400.0, gt=0, description="How long fire-and-forget results (inf.results.>) are kept."
    )
    results_max_bytes: int = Field(default=1024**3, ge=1024, description="Cap on stored results; oldest go first.")
    journal_max_age_s: float = Field(
        default=600.0,
        gt=0,
        description=(
            "How long interactive token events stay replayable (SSE Last-Event-ID resume, Idempotency-Key attach)."
        ),
    )
    journal_max_bytes: int = Field(
        default=64 * 1024**2, ge=1024, description="Cap on the in-memory token journal; the oldest events go first."
    )

    # --- files and batches ------------------------------------------------------------------------------
    max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1, description="Larger uploads to /v1/files get a 413.")
    batch_max_lines: int = Field(default=50_000, ge=1, description="A batch input file with more lines fails.")
    batch_runner: bool = Field(default=True, description="Run batch jobs in this api process (any replica may).")
    batch_jobs_per_runner: int = Field(default=2, ge=1, description="Batches one runner works on at once.")
    batch_line_concurrency: int = Field(default=8, ge=1, description="Lines of one batch in flight at once.")
    batch_job_ack_wait_s: float = Field(default=30.0, ge=1, description="A silent runner loses its batch after this.")
    response_job_ack_wait_s: float = Field(
        default=10.0, ge=1, description="A silent replica loses the background responses it runs after this."
    )
    response_ttl_s: float = Field(
        default=30 * 86_400.0,
        ge=1,
        description="Stored /v1/responses responses and their event logs expire this long after creation (30 days).",
    )
    batch_orphan_sweep_s: float = Field(
        default=30.0, gt=0, description="How often runners re-queue batches that never got a ticket."
    )
    batch_line_timeout_s: float = Field(
        default=600.0, gt=0, description="Longest a batch line may wait in the batch lane for a worker."
    )
    batch_line_max_attempts: int = Field(
        default=3,
        ge=1,
        description=(
            "Runs of a batch line whose workers stopped under it (each run already resumed on up to 3 workers) "
            "before the line fails with worker_crashed: as many tries as the OpenAI SDKs give a request that "
            "answered 503 (1 + max_retries 2)."
        ),
    )

    # --- liveness ---------------------------------------------------------------------------------------
    heartbeat_interval_s: float = Field(default=1.0, gt=0, description="Worker heartbeat when otherwise silent.")
    worker_silence_timeout_s: float = Field(default=3.0, gt=0, description="Edge gives up on a silent worker.")
    queue_timeout_s: float = Field(default=60.0, gt=0, description="Longest a request may wait to be accepted.")
    registry_ttl_s: float = Field(default=10.0, ge=1, description="A worker silent this long leaves the registry.")

    # --- routing (docs/routing.md) ------------------------------------------------------------------------
    affinity: bool = Field(
        default=True, description="Route a conversation to the worker that served it (its own subject); off: shared."
    )
    affinity_max_waiting: int = Field(
        default=2, ge=1, description="Requests waiting on a worker's own subject beyond which the shared queue is used."
    )
    affinity_prefix_tokens: int = Field(
        default=256, ge=1, description="Leading prompt tokens that key a completion prompt without a better key."
    )

    # --- engine -----------------------------------------------------------------------------------------
    engine: Literal["torch", "sim"] = Field(
        default="torch", description="torch: the real engine; sim: deterministic tokens without a model (load tests)."
    )
    sim_tokens_per_s: float = Field(default=20.0, gt=0, description="Per-sequence token rate of the sim engine.")
    model: str = Field(
        default=DEFAULT_MODEL,
        description="Packaged name, HF directory, .gguf path or hub id; comma-separated: one worker each (serve).",
    )
    served_model_name: str | None = Field(default=None, description="Model id clients use; derived if unset.")
    # The engine's own knobs: defaults, bounds and descriptions come from EngineConfig (common/engine_config.py).
    device: str = engine_field("device")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = engine_field("dtype")
    max_num_seqs: int = engine_field("max_num_seqs")
    max_num_batched_tokens: int = engine_field("max_num_batched_tokens")
    max_model_len: int | None = engine_field("max_model_len")
    kv_cache_tokens: int | None = engine_field("kv_cache_tokens")
    kv_cache_gib: float = engine_field("kv_cache_gib")
    torch_threads: int | None = engine_field("torch_threads")
    num_speculative_tokens: int = engine_field("num_speculative_tokens")
    prompt_lookup_min: int = engine_field("prompt_lookup_min")
    prompt_lookup_max: int = engine_field("prompt_lookup_max")
    speculative_max_rows: int = engine_field("speculative_max_rows")
    model_impl: Literal["auto", "fast", "generic"] = engine_field("model_impl")
    weight_quant: Literal["auto", "none", "fp16", "int8", "int4"] = engine_field("weight_quant")
    weight_quant_max_rows: int = engine_field("weight_quant_max_rows")
    small_step_threads: int | None = engine_field("small_step_threads")
    small_step_rows: int = engine_field("small_step_rows")
    compile_decode: bool | Literal["auto"] = engine_field("compile_decode", default="auto")
    prefix_caching: bool = engine_field("prefix_caching")
    prefix_cache_max_mib: float = engine_field("prefix_cache_max_mib")
    workers_per_model: int | Literal["auto"] = Field(
        default=1,
        description=(
            "Engine workers `inferq serve` starts per model, sharing its queue. `auto`: chosen from the machine "
            "(ops/layout.py): on a CPU one single-thread worker per core within half the available memory, as a "
            "small model runs faster so at high concurrency (docs/benchmarks.md); 1 on a GPU, for several models "
            "or the sim engine. The default stays 1: each worker holds its own weights and KV cache, and one "
            "keeps the default start within its memory target (docs/benchmarks.md)."
        ),
    )

    @field_validator("workers_per_model")
    @classmethod
    def _workers_in_range(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 64:
            raise ValueError("workers_per_model must be 1-64 or 'auto'")
        return value

    # --- cluster ----------------------------------------------------------------------------------------
    nats_replicas: int = Field(
        default=1, ge=1, le=5, description="JetStream replicas of every stream and bucket: 3 on a 3-node cluster."
    )
    nats_inbox_prefix: str = Field(
        default="_INBOX",
        pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$",
        description="Reply-inbox prefix, e.g. _INBOX.worker for per-user permissions.",
    )

    nats_tls_ca_file: Path | None = Field(
        default=None,
        description=(
            "CA bundle to verify the NATS server's certificate with; setting it (or a client certificate) turns TLS on."
        ),
    )
    nats_tls_cert_file: Path | None = Field(default=None, description="Client certificate (PEM) for NATS mutual TLS.")
    nats_tls_key_file: Path | None = Field(default=None, description="Private key (PEM) of nats_tls_cert_file.")

    # --- supervision (`inferq serve`) -------------------------------------------------------------------
    restart_backoff_initial_s: float = Field(
        default=0.5,
        gt=0,
        description=("First delay before `inferq serve` restarts a crashed process; doubles with each crash in a row."),
    )
    restart_backoff_max_s: float = Field(default=30.0, gt=0, description="Longest delay between restarts.")
    crash_loop_crashes: int = Field(
        default=5,
        ge=1,
        description=("A process crashing this often within crash_loop_window_s is not restarted again (a crash loop)."),
    )
    crash_loop_window_s: float = Field(default=60.0, gt=0, description="The crash-loop window, in seconds.")
    supervisor_status_file: Path | None = Field(
        default=None,
        description=("Set by `inferq serve` for its children: the JSON record of restarts the api's /metrics reports."),
    )

    # --- telemetry --------------------------------------------------------------------------------------
    otel_exporter: Literal["none", "console", "otlp"] = Field(
        default="none", description="Where OpenTelemetry spans go: none (no tracing), console, or otlp (HTTP)."
    )
    otel_endpoint: str | None = Field(
        default=None, description="OTLP/HTTP traces URL (http://collector:4318/v1/traces); default: OTEL_* env."
    )
    metrics_scrape_timeout_s: float = Field(
        default=0.5, gt=0, description="How long GET /metrics waits for the workers' snapshots."
    )

    # --- deployments ------------------------------------------------------------------------------------
    deploy_agent: bool = Field(default=True, description="inferq serve also runs a deployment agent.")
    deploy_nats_url: str | None = Field(
        default=None,
        description="NATS URL given to workers launched over SSH (as that host reaches it); default: nats_url.",
    )
    deploy_remote_inferq: str = Field(default="inferq", description="The inferq executable on SSH hosts.")
    deploy_log_history: int = Field(default=200, ge=1, description="Output lines kept per deployment.")
    deploy_start_timeout_s: float = Field(
        default=900.0, gt=0, description="A deployment whose worker has not registered by then fails."
    )
    deploy_probe_timeout_s: float = Field(default=120.0, gt=0, description="Longest wait for the probe generation.")
    deploy_ssh_connect_timeout_s: float = Field(default=20.0, gt=0, description="SSH connect and login timeout.")
    deploy_client_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Comma-separated models clients may deploy (admins: any model, path or SSH host); default: the packaged "
            "models."
        ),
    )
    deploy_max_per_owner: int = Field(
        default=2,
        ge=0,
        description=("Deployments a client may have running at once (admins: unlimited); 0: unlimited."),
    )
    deploy_ssh_known_hosts: Path | None = Field(
        default=None, description="known_hosts file to verify SSH hosts against; unset: host keys are not checked."
    )

    # --- logging ----------------------------------------------------------------------------------------
    log_level: str = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    @field_validator("api_keys", "deploy_client_models", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _join_models(cls, value: object) -> object:
        return ",".join(value) if isinstance(value, list) else value

    @property
    def models(self) -> list[str]:
        return [model.strip() for model in self.model.split(",") if model.strip()]

    def secret_values(self) -> list[str]:
        """Configured secrets, which logging masks wherever they appear: each INFERQ_API_KEYS entry (and its key
        after a `ROLE:` prefix) and the NATS password."""
        values = [self.nats_password or ""]
        for entry in self.api_keys:
            values += [entry, entry.partition(":")[2]]
        return [value for value in values if value]

    @property
    def nats_store_dir(self) -> Path:
        return self.data_dir / "nats"

    @property
    def model_cache_dir(self) -> Path:
        return self.data_dir / "models"

    def engine_config(self) -> EngineConfig:
        """The torch engine's configuration: this object's engine knobs, checked together."""
        return engine_config_from(self)
