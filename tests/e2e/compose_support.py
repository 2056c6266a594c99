"""Read the deployment files as Docker would, and run docker-compose.yml's services as local processes.

No Docker engine runs on the test machines, so the compose file is checked by doing what the engine
would do with it: interpolate its `${TEXTGEN_...}` variables, take each service's command, image
environment (the Dockerfile's ENV) and compose environment, map the container's paths, hostnames and
ports to local ones, and start the processes. `.dockerignore` is matched with Docker's rules.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# -- docker-compose.yml -------------------------------------------------------------------------------

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, $NAME, and $$ for a literal $
_VARIABLE = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?])([^}]*))?\}|(\w+))")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable substitution, as `docker compose` applies it to every value in the file."""

    def one(match: re.Match[str]) -> str:
        dollar, name, op, arg, bare = match.groups()
        if dollar:
            return "$"
        name = name or bare
        value = env.get(name)
        missing = value is None or (value == "" and op is not None and op.startswith(":"))
        if op is not None and op.endswith("-") and missing:
            return arg
        if op is not None and op.endswith("?") and missing:
            raise ValueError(f"{name}: {arg}")
        return value or ""

    return _VARIABLE.sub(one, text)


def _interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, env) for key, value in node.items()}
    return node


def load_compose(env: Mapping[str, str]) -> dict[str, Any]:
    """docker-compose.yml with its YAML anchors merged and its variables interpolated from `env` alone."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    return _interpolate_tree(raw, env)


def compose_variables() -> dict[str, str | None]:
    """Every variable the compose file reads, with its default (None when it has none)."""
    found: dict[str, str | None] = {}
    for match in _VARIABLE.finditer(COMPOSE_FILE.read_text(encoding="utf-8")):
        _, name, op, arg, bare = match.groups()
        if name or bare:
            found[name or bare] = arg if op is not None and op.endswith("-") else None
    return found


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's `environment:` as a dict (compose accepts a mapping or a list of KEY=VALUE)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def duration_s(text: str) -> float:
    """A compose duration ('1m30s', '60s', '500ms') in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


# -- Dockerfile ---------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the logical line, continuation lines joined


@dataclass
class Stage:
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name!r} has no {keyword}"
        return found[-1]

    def env(self) -> dict[str, str]:
        """The stage's ENV, in order (`ENV A=1 B=2` form only)."""
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for pair in shlex.split(instruction.args):
                key, _, value = pair.partition("=")
                values[key] = value
        return values

    def copies(self) -> dict[str, str]:
        """COPY sources from the build context -> their absolute destination (multi-stage copies skipped)."""
        workdir = "/"
        found: dict[str, str] = {}
        for instruction in self.instructions:
            if instruction.keyword == "WORKDIR":
                workdir = instruction.args.strip()
            elif instruction.keyword == "COPY":
                words = shlex.split(instruction.args)
                if any(word.startswith("--from=") for word in words):
                    continue
                *sources, dest = [word for word in words if not word.startswith("--")]
                for source in sources:
                    found[source.rstrip("/")] = os.path.normpath(os.path.join(workdir, dest))
        return found


def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    """The global ARGs (before the first FROM) and the stages, from the Dockerfile."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#") and not pending:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        if line.strip() or pending:
            logical.append(pending + line)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.strip().partition(" ")
        instruction = Instruction(keyword.upper(), args.strip())
        if instruction.keyword == "FROM":
            words = args.split()
            stages.append(Stage(words[2] if len(words) > 2 and words[1].upper() == "AS" else None))
        elif not stages and instruction.keyword == "ARG":
            name, _, default = instruction.args.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append(instruction)
    return global_args, stages


def exec_form(instruction: Instruction) -> list[str]:
    """The JSON array of a CMD or HEALTHCHECK CMD."""
    text = instruction.args
    if instruction.keyword == "HEALTHCHECK":
        text = text[text.index("CMD ") + 4 :]
    return list(json.loads(text))


# -- .dockerignore --------------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore pattern (Go filepath.Match plus `**`) as a regex over a relative path."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip().lstrip("/"))
        rules.append((negated, _pattern_regex(pattern)))
    return rules


def sent_to_docker(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether a file (relative to the repo root) is in the build context: the last matching rule wins,
    and a rule matches a file when it matches the file or one of its parent folders."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negated, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            excluded = not negated
    return not excluded


# -- the services as local processes --------------------------------------------------------------------


@dataclass
class Localizer:
    """Maps what a container sees to what this machine has: folders, host:port pairs, bare ports, programs."""

    paths: dict[str, Path]  # container path -> local folder (a volume, or a folder the image copied)
    hosts: dict[str, str]  # "redis:6379" -> "127.0.0.1:40123"
    ports: dict[str, str]  # "6379" -> "40123": a port number standing alone (`--port 6379`, `-p 6379`)

    def value(self, text: str) -> str:
        for container, local in self.hosts.items():
            text = text.replace(container, local)
        if self.ports:
            alone = re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, self.ports)) + r")(?![\w.])")
            text = alone.sub(lambda m: self.ports[m.group(1)], text)
        text = text.replace("0.0.0.0", "127.0.0.1")  # a container listens everywhere; a test, on loopback
        for container in sorted(self.paths, key=len, reverse=True):
            text = re.sub(rf"(?<![\w/]){re.escape(container)}(?=/|\b|$)", str(self.paths[container]), text)
        return text

    def argv(self, command: list[str]) -> list[str]:
        program, *args = command
        return [local_program(program), *(self.value(arg) for arg in args)]

    def env(self, *layers: Mapping[str, str]) -> dict[str, str]:
        """This machine's environment without TEXTGEN_ variables, then each layer, localized."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTGEN_")}
        for layer in layers:
            env.update({key: self.value(value) for key, value in layer.items() if key != "PATH"})
        return env


def local_program(program: str) -> str:
    """The local executable a container's command names: textgen and python from this venv."""
    venv_bin = Path(sys.executable).parent
    if program == "python":
        return sys.executable
    if (venv_bin / program).exists():
        return str(venv_bin / program)
    found = shutil.which(program)
    assert found, f"{program} is not installed here; run `make system-deps`"
    return found


def healthcheck_argv(test: list[str] | str, localizer: Localizer) -> list[str]:
    """A compose healthcheck's `test` as a local command: CMD runs as is, CMD-SHELL under sh -c."""
    if isinstance(test, str):
        return ["sh", "-c", localizer.value(test)]
    kind, *command = test
    if kind == "CMD-SHELL":
        return ["sh", "-c", localizer.value(command[0])]
    assert kind == "CMD", f"unsupported healthcheck {test!r}"
    return localizer.argv(command)


def run_healthcheck(test: list[str] | str, localizer: Localizer, env: Mapping[str, str]) -> bool:
    argv = healthcheck_argv(test, localizer)
    try:
        done = subprocess.run(argv, env=dict(env), capture_output=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0
