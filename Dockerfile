# textgen: the HTTP API (`textgen serve`, the default command) and the training worker (`textgen worker`)
# in one image, with the shipped models baked in. docker-compose.yml runs both against Redis;
# docs/DOCKER.md explains every build argument and setting.
#
#   docker build -t textgen .                                     # CPU-only torch (the default)
#   docker build -t textgen:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# With the CUDA wheel, run with `--gpus all` (or a compose `deploy.resources.reservations.devices`
# entry) and TEXTGEN_DEVICE=auto picks the GPU; the same code runs on either.

# A slim Debian Python pinned by tag, the Python the project is tested on (3.11).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---------------------------------------------------------------------------------------------------
# build: a virtual environment with torch, the dependencies and textgen itself, copied whole into the
# runtime stage, so pip, its caches and the sources' build leftovers stay out of the final image.
FROM ${PYTHON_IMAGE} AS build

# The torch wheel index and version: the CPU-only wheel is about a tenth of the CUDA build's size.
# The version must stay inside pyproject.toml's torch range, or the next step would replace it.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# A C++ compiler and ninja for textgen's native module (lm/kernels/native.py), in this stage only: the
# runtime image gets the compiled module inside the environment, not the tools. Debian's packages
# of the pinned base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ ninja-build \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# torch first, from its own index: the largest layer, rebuilt only when the version or index changes.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The other dependencies, read from pyproject.toml alone, before any code is copied: a code change
# reuses this layer. torch is already there and satisfies pyproject's range, so it is not fetched again.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt

# The code, then textgen itself (its dependencies are all installed above), then its native module,
# compiled into the installed package (-P: the installed `lm`, not the copy in /src).
COPY README.md ./
COPY lm ./lm
COPY jobs ./jobs
COPY app ./app
COPY worker ./worker
COPY textgen ./textgen
RUN pip install --no-cache-dir --no-deps . \
    && python -P -m lm.kernels.native build \
    && python -P -m lm.kernels.native check \
    && textgen --version

# ---------------------------------------------------------------------------------------------------
# runtime: the environment, the shipped corpora and models, a non-root user.
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TEXTGEN_MODELS_DIR=/app/models \
    TEXTGEN_DATA_DIR=/app/data \
    TEXTGEN_PORT=8000

# A fixed uid/gid, so a bind-mounted or NFS models folder can be chowned to it on the host.
RUN groupadd --system --gid 10001 textgen \
    && useradd --system --uid 10001 --gid textgen --home-dir /app --no-create-home --shell /usr/sbin/nologin textgen

WORKDIR /app
COPY --from=build /opt/venv /opt/venv
# The shipped corpora (POST /train {"corpus": "shakespeare"}) stay root-owned: read-only to textgen.
COPY data ./data
# The shipped models, owned by textgen: Docker seeds an empty named volume mounted here with this
# folder (ownership included), and the API and workers write new models and job files into it.
COPY --chown=10001:10001 models ./models

# Numeric, so the runtime (and Kubernetes' runAsNonRoot) can tell it is not root without /etc/passwd.
USER 10001:10001
EXPOSE 8000

# Liveness only (/readyz is readiness: it answers 503 until a model is loaded). The slim image has no
# curl; Python's urllib exits non-zero on a refused connection or a non-2xx answer.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TEXTGEN_PORT', '8000'), timeout=3)"]

# `docker run textgen` serves the API on port 8000 (embedded mode without TEXTGEN_REDIS_URL);
# `docker run textgen textgen worker` runs a training worker (needs TEXTGEN_REDIS_URL).
CMD ["textgen", "serve", "--host", "0.0.0.0"]
