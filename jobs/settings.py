"""The settings every process of the job system reads: one pydantic-settings class, `TEXTGEN_*` variables.

`textgen worker`, the local worker of embedded mode and the CLI's `train`, `generate`, `eval` and
`models` read these; `textgen serve` reads them as part of app/settings.py's `Settings`, which adds
the service's own. A malformed value is refused when the process starts (`textgen: error: ...`,
exit 2), the same way by every command. docs/API.md ("Settings") documents each field.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobs.records import DEFAULT_LEASE_S
from jobs.redis_client import DEFAULT_PREFIX


class JobSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TEXTGEN_", extra="ignore")

    models_dir: Path = Path("models")
    redis_url: str | None = None  # unset = embedded mode: jobs run in a local worker process
    redis_prefix: str = DEFAULT_PREFIX  # every Redis key and channel starts with this
    train_threads: int = Field(default=0, ge=0)  # torch threads per training job (0 = half the cores)
    job_lease_s: float = Field(default=DEFAULT_LEASE_S, gt=0)  # a job whose worker is silent this long moves
    native: bool = True  # textgen's C++ kernels when built: training's LSTM, the int8 step's loops, the draws
    log_level: str = "INFO"
