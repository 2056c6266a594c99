"""The worker's tests run jobs on the job system's fixtures (tests/jobs/conftest.py)."""

from tests.jobs.conftest import _one_torch_thread, file_store, models_dir, prefix, redis_store, store

__all__ = ["_one_torch_thread", "file_store", "models_dir", "prefix", "redis_store", "store"]
