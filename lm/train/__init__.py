"""Training: the recipe, the loop, the resumable state and the evaluation.

    config.py     TrainConfig (every hyperparameter and its default), BOUNDS, planned_parameters
    sizing.py     fit_recipe: the sizes not given, fitted to the corpus and the time budget
    loop.py       train(): truncated BPTT, AdamW, validation, early stopping, time budgets
    state.py      per-epoch resumable state (safetensors + JSON), so a stopped job resumes
    evaluate.py   the loss of a model on a text, each token's log-probability (prompt scoring), and the
                  samples progress events carry

The names a caller needs are here: `from lm.train import TrainConfig, train, evaluate`.
"""

from lm.train.config import BOUNDS, PRECISIONS, TOKENIZERS, TrainConfig, planned_parameters
from lm.train.evaluate import evaluate, evaluate_ids, sample_text, score_ids
from lm.train.loop import TrainEvent, TrainResult, keep_freed_memory, lr_at, train
from lm.train.state import STATE_JSON

__all__ = [
    "BOUNDS",
    "PRECISIONS",
    "STATE_JSON",
    "TOKENIZERS",
    "TrainConfig",
    "TrainEvent",
    "TrainResult",
    "evaluate",
    "evaluate_ids",
    "keep_freed_memory",
    "lr_at",
    "planned_parameters",
    "sample_text",
    "score_ids",
    "train",
]
