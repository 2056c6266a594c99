"""Bodies of the training routes. The hyperparameters mirror `textgen train`'s flags (snake_case),
flat beside `text` / `corpus`, `name`, `base_model` and `activate`; their bounds come from
lm.train.BOUNDS, and an omitted one keeps TrainConfig's default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, WithJsonSchema
from pydantic_core import PydanticCustomError

from app.bodies import RequestBody
from lm.aliases import canary_weight
from lm.errors import ConfigError
from lm.train import BOUNDS

JobState = Literal["queued", "running", "paused", "succeeded", "failed", "cancelled"]


def _bounded(name: str, description: str) -> Any:
    lo, hi = BOUNDS[name]
    return Field(None, ge=lo, le=hi, description=f"{description} ({lo:g}..{hi:g})")


def _activate(value: object, info: ValidationInfo) -> object:
    """`activate` is true, false, "always" or "canary:<weight>": never 1 or 0 (which equal True and False); a
    form's "true" and "false" are the booleans (form fields are strings: `read_submission` validates them with
    context form)."""
    if isinstance(value, str) and info.context and info.context.get("form"):
        value = {"true": True, "false": False}.get(value.lower(), value)
    if value is True or value is False or value == "always":
        return value
    try:
        if canary_weight(value) is not None:
            return value
    except ConfigError as e:
        raise PydanticCustomError("value_error", str(e)) from None
    raise PydanticCustomError(
        "literal_error", 'Input should be true, false, "always" or "canary:<weight>" (a weight in (0, 1])'
    )


ACTIVATE_SCHEMA = {
    "anyOf": [
        {"type": "boolean"},
        {"type": "string", "enum": ["always"]},
        {"type": "string", "pattern": r"^canary:[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$", "examples": ["canary:0.1"]},
    ]
}
Activate = Annotated[bool | str, BeforeValidator(_activate), WithJsonSchema(ACTIVATE_SCHEMA)]


class TrainHyperparameters(RequestBody):
    """Every `textgen train` hyperparameter; null or omitted = the default of `textgen train` (the sizes:
    fitted to the corpus and the time budget, lm/train/sizing.py).

    Strict types (app/bodies.py) hold for JSON; a multipart form's fields are strings, which the
    route validates with `strict=False`.
    """

    model_config = ConfigDict(extra="forbid")

    tokenizer: Literal["char", "word", "bpe"] | None = Field(None, description="tokenizer kind (default char)")
    vocab_size: int | None = _bounded("vocab_size", "vocabulary cap (word, bpe)")
    embedding_dim: int | None = _bounded("embedding_dim", "embedding width")
    hidden_dim: int | None = _bounded("hidden_dim", "LSTM hidden units per layer")
    layers: int | None = _bounded("layers", "stacked LSTM layers")
    dropout: float | None = _bounded("dropout", "dropout probability")
    tie_weights: bool | None = Field(None, description="share input and output embeddings")
    seq_len: int | None = _bounded("seq_len", "tokens per truncated-BPTT window")
    batch_size: int | None = _bounded("batch_size", "parallel streams per step")
    lr: float | None = _bounded("lr", "learning rate")
    weight_decay: float | None = _bounded("weight_decay", "AdamW weight decay")
    grad_clip: float | None = _bounded("grad_clip", "gradient norm clip")
    warmup_steps: int | None = _bounded("warmup_steps", "linear warmup steps")
    epochs: int | None = _bounded(
        "epochs", "passes over the training split (default 10; under time_budget_s, a cap only when given)"
    )
    max_steps: int | None = _bounded("max_steps", "stop after this many optimizer steps")
    time_budget_s: float | None = _bounded("time_budget_s", "stop after this many seconds")
    patience: int | None = _bounded("patience", "stop after this many epochs without a better val loss")
    val_fraction: float | None = _bounded("val_fraction", "share of the corpus (its end) held out")
    seed: int | None = _bounded("seed", "random seed")
    threads: int | None = _bounded("threads", "torch threads (at most the worker's cap)")
    precision: Literal["auto", "bf16", "fp32"] | None = None
    device: Literal["auto", "cpu", "cuda"] | None = None
    data_format: Literal["text", "chat", "completion"] | None = Field(
        None,
        description="the corpus's format: plain text, OpenAI chat JSONL or prompt/completion JSONL (default: "
        "detected from the corpus; given, it must match)",
    )
    # AWD-LSTM's regularisers (docs/TRAINING.md, "The default recipe"); off unless set
    weight_drop: float | None = _bounded("weight_drop", "DropConnect on the LSTM's hidden-to-hidden weights")
    locked_dropout: bool | None = Field(None, description="one dropout mask for every step of a window")
    embedding_dropout: float | None = _bounded("embedding_dropout", "drop whole tokens' embeddings")
    ar: float | None = _bounded("ar", "activation regularisation: weight of mean(h^2)")
    tar: float | None = _bounded("tar", "temporal activation regularisation: weight of mean((h_t - h_t-1)^2)")
    ema: float | None = _bounded("ema", "keep an exponential moving average of the weights with this decay; 0: off")

    def given(self) -> dict[str, Any]:
        """The hyperparameters the request set (the others keep TrainConfig's defaults)."""
        return {name: value for name, value in self.model_dump().items() if value is not None and name in HYPER}


class TrainJobCreate(TrainHyperparameters):
    """POST /train as JSON (a multipart upload sends the same fields as form fields, and `file`)."""

    text: str | None = Field(None, description="the corpus itself (UTF-8 text)")
    corpus: str | None = Field(None, description="the name of a shipped corpus instead, e.g. 'shakespeare'")
    name: str | None = Field(None, description="id of the model to publish (default: from the corpus and job id)")
    base_model: str | None = Field(None, description="fine-tune this model; keeps its tokenizer and architecture")
    validation_text: str | None = Field(
        None,
        description="a validation text in the corpus's format (e.g. held-out conversations), instead of the "
        "corpus's last val_fraction",
    )
    keep_checkpoints: int | None = Field(
        None,
        ge=0,
        le=100,
        description="publish each epoch's model as `<name>-ckpt-step-<step>` and keep the last this many "
        "(default: TEXTGEN_KEEP_CHECKPOINTS, 3); 0: none",
    )
    activate: Activate = Field(
        True,
        description="make the new model active when it is published, if it passes the quality gate (its "
        'validation loss no worse than the active model\'s on the same held-out text); "always": without the gate; '
        '"canary:<weight>" (e.g. "canary:0.1"): if it passes the gate, make it production\'s canary at that weight '
        "instead of replacing production",
    )


HYPER = frozenset(TrainHyperparameters.model_fields)


class TrainJobPublic(BaseModel):
    id: str
    state: JobState
    created: str
    started: str | None
    finished: str | None
    queue_position: int | None = Field(None, description="1 = next to start; null unless queued")
    progress: dict[str, Any] | None = Field(
        None,
        description="the last progress: step, epoch, loss, tokens/s, ETA, elapsed_s (training time over every "
        "attempt) and attempt_elapsed_s (since the job last started)",
    )
    metrics: dict[str, Any] | None = Field(None, description="per-epoch losses; the final metrics once done")
    model_id: str | None = Field(None, description="the published model, once succeeded")
    activated: bool | None = Field(None, description="whether the new model became the active one (a canary did not)")
    error: str | None = Field(None, description="why the job failed")
    note: str | None = Field(
        None, description="e.g. why a published model was not activated, or that it became production's canary"
    )
    gate: dict[str, Any] | None = Field(
        None,
        description="the quality gate's verdict before activation: result (passed, held_back, skipped), reason, "
        "val_loss and active_val_loss on the same held-out tokens",
    )
    cancel_requested: bool = False
    pause_requested: bool = Field(False, description="asked to save its state and pause: it will within seconds")
    attempts: int
    worker: str | None
    params: dict[str, Any]


class TrainJobList(BaseModel):
    jobs: list[TrainJobPublic]
