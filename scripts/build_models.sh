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

# Both train at once, one thread each, 20 minutes each on a 2-core machine, with the default recipe:
# sizes fitted to the corpus and the budget, the budget alone ending the run, the best epoch kept.
# The default model: 29 Shakespeare plays.
build shakespeare-char data/shakespeare/shakespeare.txt --time-budget 1200 --threads 1 &
# Classical Chinese poetry: the recipe keeps the 4,096 most frequent characters and ties a full-width embedding.
build tang-poetry-char data/tang-poetry/tang-poetry.txt --time-budget 1200 --threads 1 &
wait
textgen models activate shakespeare-char
textgen models list
