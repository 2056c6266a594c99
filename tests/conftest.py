"""Fixtures shared by every part of the suite."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.redis_server import RedisServer


@pytest.fixture(scope="session", autouse=True)
def _decode_measurements_in_the_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Engines measure their decode step once per model shape (lm/decode/tune.py) and keep the timings:
    in one folder for the whole session (servers started as processes inherit it), not the user's cache."""
    before = os.environ.get("TEXTGEN_TUNE_CACHE_DIR")
    os.environ["TEXTGEN_TUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("decode-measurements"))
    yield
    if before is None:
        del os.environ["TEXTGEN_TUNE_CACHE_DIR"]
    else:
        os.environ["TEXTGEN_TUNE_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server on a free port for the whole session; each test keeps to a key prefix of its own."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()
