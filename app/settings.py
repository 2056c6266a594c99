"""The service's settings: one pydantic-settings class, read from `TEXTGEN_*` environment variables.

`Settings` is the job system's settings (jobs/settings.py: the models folder, Redis, job leases,
training threads, the native kernels, the log level) and the service's own. Every field is
documented in docs/API.md ("Settings"). Tests build a `Settings(...)` and pass it to
`create_app()`; routes read it through `SettingsDep`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, IPvAnyNetwork, field_validator
from pydantic_settings import NoDecode

from jobs.settings import JobSettings

CommaList = Annotated[list[str], NoDecode]  # "a,b,c" in the environment, not JSON


class Settings(JobSettings):
    # where and what to serve (the models folder, Redis and the log level: JobSettings)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    default_model: str | None = None  # loaded at start when the registry has no active model

    # training jobs (docs/TRAINING.md; the lease, the threads and the Redis prefix: JobSettings)
    data_dir: Path = Path(__file__).resolve().parent.parent / "data"  # shipped corpora, POST /train {"corpus": ...}
    max_corpus_bytes: int = Field(default=50_000_000, ge=1)  # the largest training text POST /train accepts
    max_file_bytes: int = Field(default=50_000_000, ge=1)  # the largest file POST /v1/files accepts
    max_train_parameters: int = Field(default=100_000_000, ge=1)  # the largest model POST /train may ask for
    keep_checkpoints: int = Field(default=3, ge=0, le=100)  # a job's per-epoch checkpoints kept (the last K)
    reconcile_s: float = Field(default=2.0, gt=0)  # how often a replica checks the active pointer

    # auth: Bearer tokens; empty = open (a startup warning says so)
    api_keys: CommaList = []
    admin_keys: CommaList = []

    # limits
    max_tokens: int = Field(default=2048, ge=1)  # cap on a request's max_tokens
    max_prompt_chars: int = Field(default=16_384, ge=1)
    max_body_bytes: int = Field(default=1_000_000, ge=1)
    max_running: int = Field(default=64, ge=1)  # sequences decoded together, per loaded model version
    max_waiting: int = Field(default=64, ge=0)  # admitted sequences waiting for a running slot (whole process)
    max_running_per_key: int = Field(default=16, ge=0)  # sequences one API key may have admitted; 0 = no limit
    max_loaded_models: int = Field(default=2, ge=1)  # model versions loaded at once (the active one included)
    # which models an inference key may have loaded by naming them ("*": any); admin keys may load any
    load_on_demand: CommaList = []
    # automatic abort of a canary (app/canary.py): after this many canary requests in the rolling window...
    canary_min_requests: int = Field(default=100, ge=1)
    canary_window: int = Field(default=1000, ge=1)  # ...of each version's last requests, per replica
    canary_failure_margin: float = Field(default=0.05, ge=0, le=1)  # its failure rate may exceed the model's by this
    canary_ttft_margin_s: float = Field(default=0.5, ge=0)  # and its TTFT p99 the model's by this
    retry_after_s: int = Field(default=1, ge=1)  # the Retry-After header of a 429

    # runtime
    threads: int | None = Field(default=None, ge=1)  # the engines' torch threads; None = by measurement
    device: Literal["auto", "cpu", "cuda"] = "auto"
    keepalive_s: float = Field(default=15.0, gt=0)  # SSE comment on an idle stream after this many seconds

    # clients and connections (docs/API.md, "Clients and connections"; docs/RELIABILITY.md)
    # sequences one client address may have admitted on a server without keys; None = TEXTGEN_MAX_RUNNING; 0 = none
    max_running_per_client: int | None = Field(default=None, ge=0)
    # proxies (addresses or networks) whose X-Forwarded-For names the client; empty = the peer is the client
    trusted_proxies: Annotated[list[IPvAnyNetwork], NoDecode] = []
    stall_timeout_s: float = Field(default=10.0, gt=0)  # a stream whose client accepts no bytes this long is cancelled
    send_buffer_bytes: int = Field(default=65_536, ge=0)  # each connection's kernel send buffer; 0 = the kernel's
    head_timeout_s: float = Field(default=5.0, gt=0)  # a connection sends a whole request head within this, or closes
    idle_timeout_s: float = Field(default=5.0, gt=0)  # a keep-alive connection with no new request closes after this
    max_connections: int = Field(default=512, ge=1)  # open connections; a request on one more is answered 503

    # decode speed (docs/PERFORMANCE.md)
    decode: Literal["auto", "int8", "fused", "reference"] = "auto"  # the decode step; auto = by measurement
    int8_product: Literal["auto", "vnni", "onednn"] = "auto"  # int8's products; auto = by measurement
    tune_cache_dir: Path = Path.home() / ".cache" / "textgen"  # the measurements, kept across restarts
    stream_interval_ms: float = Field(default=20.0, ge=0)  # a stream's text is sent at most this often; 0 = every token
    prompt_cache_mb: float = Field(default=16.0, ge=0)  # prompt-state cache per loaded model version; 0 = off
    prefill_chunk: int = Field(default=256, ge=1)  # prompt tokens run between two decode steps
    prefill_thread: bool = True  # prompts run on a second engine thread while the batch decodes
    cors_origins: CommaList = []
    log_json: bool = False

    @field_validator("api_keys", "admin_keys", "cors_origins", "load_on_demand", "trusted_proxies", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("threads", "max_running_per_client", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """TEXTGEN_THREADS= (empty, as compose passes an unset variable) leaves the choice to measurement,
        TEXTGEN_MAX_RUNNING_PER_CLIENT= to its default."""
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.admin_keys)
