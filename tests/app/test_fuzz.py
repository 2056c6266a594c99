"""Schemathesis against the service's own OpenAPI schema: every route, with and without keys.

Cases generated from the schema (valid and invalid) go to the app through ASGI; each answer must
not be a 5xx, must have a status the schema documents for the route, and must match the schema
documented for that status (the JSON error shape included). Training jobs go to Redis and no
worker takes them, so fuzzing POST /train trains nothing. Bounded in examples so that it runs in
well under a minute and a half.
"""

from __future__ import annotations

import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import get_client
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.main import create_app
from app.settings import Settings
from tests.app.conftest import MODEL_A
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis

API_KEY = "fuzz-user-key"
ADMIN_KEY = "fuzz-admin-key"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
FUZZ = settings(
    max_examples=12,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same cases on every run: a failure is reproducible, never flaky
    database=None,  # nothing saved between runs (derandomized cases need no replay)
)


@pytest.fixture(scope="module")
def fuzz_app(models_template: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A keyed app in Redis mode with small limits (so generated requests stay cheap)."""
    models = tmp_path_factory.mktemp("fuzz") / "models"
    shutil.copytree(models_template, models)
    settings_ = Settings(
        models_dir=models,
        threads=1,
        redis_url=redis_server.url,
        redis_prefix=f"fuzz-{secrets.token_hex(4)}:",
        default_model=MODEL_A,
        api_keys=[API_KEY],
        admin_keys=[ADMIN_KEY],
        max_tokens=32,
        max_prompt_chars=256,
        max_body_bytes=20_000,
        max_corpus_bytes=8_000,
        max_train_parameters=50_000,
        keepalive_s=0.2,
    )
    return create_app(settings_)


@pytest.fixture(scope="module")
def api_schema(fuzz_app: Any) -> Any:
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    client = get_client(fuzz_app)  # the app's lifespan runs from here; its model loads in the background
    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200:  # a generation before that is a documented 503, not a case
        assert time.monotonic() < deadline, "the fuzzed app never became ready"
        time.sleep(0.05)
    return schema


def fuzz(schema: Any, headers: dict[str, str]) -> list[str]:
    """Every operation, with valid and invalid cases; the failures, one line per operation and mode."""
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @FUZZ
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: Any) -> None:
                case.call_and_validate(headers=headers, checks=CHECKS, timeout=20)

            try:
                check()
            except Unsatisfiable:  # negative mode on a route without parameters: no invalid request exists
                continue
            except Exception as e:  # a FailureGroup naming the checks that failed, with the reproducing call
                failures.append(f"{operation.label} ({mode.value}): {e}")
    return failures


def test_every_route_with_the_admin_key(api_schema: Any) -> None:
    failures = fuzz(api_schema, {"Authorization": f"Bearer {ADMIN_KEY}"})
    assert not failures, "\n\n".join(failures)


def test_every_route_without_a_key(api_schema: Any) -> None:
    failures = fuzz(api_schema, {})
    assert not failures, "\n\n".join(failures)
