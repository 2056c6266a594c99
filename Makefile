# The few commands a person needs. Everything installs itself into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install dev native run test lint format models bench clean system-deps

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# The CPU wheel: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e '.[native]'
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PIP) install --quiet -e '.[dev]'
	touch $@

# textgen's native module (lm/kernels/native.py: the int8 decode step's loops and the training LSTM kernel):
# compiled against the installed torch when this source has no build yet (about 30 s). Without a C++
# compiler `make run` still serves, with the same arithmetic from Python (slower), and training uses
# nn.LSTM; `make test` then fails tests/lm/test_native.py, which says why.
native: $(VENV)/.installed
	@$(PY) -m lm.kernels.native check >/dev/null 2>&1 || $(PY) -m lm.kernels.native build || \
		echo "textgen: could not compile lm/kernels/csrc/*.cpp (it needs g++); decoding will run its loops in Python, training nn.LSTM"

install: $(VENV)/.installed native
dev: $(VENV)/.dev-installed native

run: install
	$(VENV)/bin/textgen serve --host $(HOST) --port $(PORT)

# System packages the suite drives as real processes (redis-server for the Redis paths, chromium for the page).
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "installing redis-server"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	@# Debian's chromium for the playground's browser tests (tests/e2e/test_ui.py); no browser download.
	@test -x /usr/bin/chromium || { \
		echo "installing chromium"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@# Debian's docker-compose (v1, on the system Python) validates docker-compose.yml; no Docker engine needed.
	@command -v docker-compose >/dev/null 2>&1 || { \
		echo "installing docker-compose"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			docker-compose >/dev/null; }

# The whole suite, after the linters: a lint failure fails `make test` (and CI) too.
test: dev system-deps lint
	$(PY) -m pytest

LINTED := lm jobs app worker textgen tests bench scripts
lint: dev
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: dev
	$(VENV)/bin/ruff format $(LINTED)
	$(VENV)/bin/ruff check --fix $(LINTED)

# Rebuild the shipped models from the shipped corpora (scripts/build_models.sh; the exact
# command that trained each model is in its config.json, training.command).
models: install
	bash scripts/build_models.sh

# Serving benchmarks: each starts `textgen serve` in its own process and drives it from another.
SERVE_BENCHES := decode_step serve_stream constrained_load constraints startup prompt_cache memory hot_swap soak
.PHONY: bench-serve $(addprefix bench-,$(SERVE_BENCHES))
$(addprefix bench-,$(SERVE_BENCHES)): bench-%: dev
	$(PY) bench/$*.py
bench-serve: $(addprefix bench-,$(SERVE_BENCHES))

bench: dev bench-serve
	$(PY) bench/train_interference.py
	$(PY) bench/lstm_bound.py
	$(PY) bench/train_quality.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .import_linter_cache build *.egg-info lm/kernels/_build
