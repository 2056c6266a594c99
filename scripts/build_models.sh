#!/usr/bin/env bash
# Rebuild the shipped models from the shipped corpora: `make models`.
# The exact command that trained each model is recorded in its config.json
# (training.command) and shown by `textgen models show ID`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

build() {  # build NAME ARGS...: retrain models/NAME from scratch
    local name=$1
    shift
    rm -rf "models/$name"
    textgen train "$@" --name "$name"
}

# Both train at once, one thread each, 20 minutes each on a 2-core machine.
# The default model: the default character recipe on 29 Shakespeare plays.
build shakespeare-char data/shakespeare/shakespeare.txt --time-budget 1200 --epochs 50 --threads 1 &
# Classical Chinese poetry: the 4000 most frequent characters (99.3% of the text), a tied 384-unit model.
build tang-poetry-char data/tang-poetry/tang-poetry.txt --vocab-size 4000 --embedding-dim 384 --hidden-dim 384 \
    --tie-weights --time-budget 1200 --epochs 50 --threads 1 &
wait
textgen models activate shakespeare-char
textgen models list
