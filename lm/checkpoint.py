"""The checkpoint format: one immutable folder per model, no pickle anywhere.

    models/<model_id>/
        model.safetensors   the state dict (a tied head weight is stored once, as embedding.weight)
        config.json         architecture, tokenizer kind, training recipe, metrics, versions
        tokenizer.json      everything needed to encode/decode exactly as in training

A checkpoint is written into ``models/.tmp-<id>-<random>/``, every file and the folder
are fsynced, and the folder is renamed into place: a reader sees the whole checkpoint
or none of it. Loading rebuilds the model from config.json alone and loads the tensors
with ``load_state_dict(strict=True)``; every problem is a CheckpointError naming the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import safetensors
import tokenizers
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

import lm
from lm.errors import CheckpointError, ConfigError, InvalidModelId
from lm.files import fsync
from lm.model import LSTMLanguageModel, ModelConfig, count_parameters
from lm.tokenizers import TOKENIZER_FILE, Tokenizer, tokenizer_from_dict

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_ID_RE = r"[a-z0-9][a-z0-9._-]{0,63}"
_MODEL_ID = re.compile(MODEL_ID_RE)
RESERVED_IDS = frozenset({"jobs", "files"})  # models/jobs/: the training jobs; models/files/: uploaded files
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TIED_KEY = "head.weight"  # with tie_weights it is the same tensor as embedding.weight
REQUIRED_KEYS = (
    "format_version",
    "model_id",
    "created_at",
    "architecture",
    "tokenizer",
    "training",
    "metrics",
    "parameters",
)
DEFAULT_CHAT_TEMPLATE = {
    "system": "System: ",
    "user": "User: ",
    "assistant": "Assistant: ",
    "separator": "\n",
    "stop": ["\nUser:"],
}


@dataclass
class Checkpoint:
    model_id: str
    model: LSTMLanguageModel
    tokenizer: Tokenizer
    config: dict  # config.json contents


def validate_model_id(model_id: str) -> str:
    """Return the id unchanged, or raise InvalidModelId; call before the id touches a path."""
    if not isinstance(model_id, str) or not _MODEL_ID.fullmatch(model_id):
        raise InvalidModelId(
            f"invalid model id {model_id!r}: use 1-64 characters from a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        )
    if ".." in model_id:
        raise InvalidModelId(f"invalid model id {model_id!r}: '..' is not allowed in a model id")
    if model_id in RESERVED_IDS:
        raise InvalidModelId(f"invalid model id {model_id!r}: that name is reserved for the models folder")
    return model_id


# ---------------------------------------------------------------------------- save


def save_checkpoint(
    models_dir: Path,
    model_id: str,
    model: LSTMLanguageModel,
    tokenizer: Tokenizer,
    *,
    training: dict,
    metrics: dict,
    chat_template: dict | None = None,
) -> Path:
    """Write models_dir/<model_id>/ atomically and return its path; CheckpointError if the id is taken."""
    validate_model_id(model_id)
    if model.cfg.vocab_size != tokenizer.vocab_size:
        raise CheckpointError(
            f"cannot save {model_id!r}: the model has {model.cfg.vocab_size} output tokens "
            f"but the tokenizer has {tokenizer.vocab_size}"
        )
    models_dir = Path(models_dir)
    target = models_dir / model_id
    _refuse_existing(target)
    config = _build_config(model_id, model, tokenizer, training=training, metrics=metrics, chat_template=chat_template)
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = models_dir / f".tmp-{model_id}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _write_files(tmp, model, tokenizer, config)
        _rename_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync(models_dir)  # the rename is durable
    log.info("saved checkpoint %s (%d parameters)", target, config["parameters"])
    return target


def _build_config(
    model_id: str,
    model: LSTMLanguageModel,
    tokenizer: Tokenizer,
    *,
    training: dict,
    metrics: dict,
    chat_template: dict | None = None,
) -> dict:
    """The config.json contents (see docs/lm-api.md); non-finite metrics become null (strict JSON)."""
    return {
        "format_version": FORMAT_VERSION,
        "model_id": model_id,
        "created_at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "architecture": model.cfg.to_dict(),
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
        "training": _finite(training),
        "metrics": _finite(metrics),
        "chat_template": chat_template if chat_template is not None else dict(DEFAULT_CHAT_TEMPLATE),
        "parameters": count_parameters(model),
        "versions": {
            "textgen": lm.__version__,
            "torch": torch.__version__,
            "safetensors": safetensors.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }


def _finite(value: object) -> object:
    """Replace NaN/inf floats (e.g. an overflowed perplexity) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _refuse_existing(target: Path) -> None:
    if target.exists():
        raise CheckpointError(
            f"a checkpoint named {target.name!r} already exists; pick another id", detail=f"in {target.parent}"
        )


def _rename_into_place(tmp: Path, target: Path) -> None:
    _refuse_existing(target)  # rename() would silently replace an empty folder
    try:
        os.rename(tmp, target)
    except OSError:
        _refuse_existing(target)  # another writer won the race for this id
        raise


def _write_files(folder: Path, model: LSTMLanguageModel, tokenizer: Tokenizer, config: dict) -> None:
    save_file(_state_to_save(model), str(folder / MODEL_FILE), metadata={"format": "pt"})
    tokenizer.save(folder / TOKENIZER_FILE)
    text = json.dumps(config, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    (folder / CONFIG_FILE).write_text(text, encoding="utf-8")
    for name in (MODEL_FILE, TOKENIZER_FILE, CONFIG_FILE):
        (folder / name).chmod(0o644)  # safetensors creates 0600 files; readers may run as another user
        fsync(folder / name)
    fsync(folder)


def _state_to_save(model: LSTMLanguageModel) -> dict[str, Tensor]:
    """CPU, contiguous tensors; a tied head weight is dropped (safetensors refuses shared storage)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_weights:
        del state[TIED_KEY]
    return state


# ---------------------------------------------------------------------------- load


def _refused(file: Path, reason: str, cause: Exception | None = None) -> CheckpointError:
    """The file named as `<model folder>/<file>` (a message may reach an API client); its full path
    and the library's own words in `detail`, for the log."""
    shown = f"{file.parent.name}/{file.name}" if file.parent.name else file.name
    detail = f"{file}: {reason}" + (f" ({cause})" if cause is not None else "")
    return CheckpointError(f"{shown}: {reason}", detail=detail)


def read_config(path: Path) -> dict:
    """config.json of a checkpoint folder (or the file itself), checked for shape; CheckpointError otherwise."""
    path = Path(path)
    file = path / CONFIG_FILE if path.is_dir() or not path.name.endswith(".json") else path
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _refused(file, "missing; this folder is not a complete checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _refused(file, "not valid JSON", e) from None
    _check_config(file, config)
    config.setdefault("chat_template", dict(DEFAULT_CHAT_TEMPLATE))
    return config


def _check_config(file: Path, config: object) -> None:
    if not isinstance(config, dict):
        raise _refused(file, f"expected a JSON object, found {type(config).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise _refused(file, f"missing keys {missing}")
    if config["format_version"] != FORMAT_VERSION:
        raise _refused(
            file,
            f"format_version {config['format_version']!r} is not supported "
            f"(this textgen reads version {FORMAT_VERSION})",
        )
    for key in ("architecture", "tokenizer", "training", "metrics"):
        if not isinstance(config[key], dict):
            raise _refused(file, f"{key!r} must be an object")


def load_checkpoint(path: Path) -> Checkpoint:
    """Rebuild the model from config.json, load its tensors strictly; the model comes back in eval mode."""
    path = Path(path)
    if not path.is_dir():
        raise _refused(path, "no such checkpoint folder")
    config = read_config(path)
    model = LSTMLanguageModel(_model_config(path / CONFIG_FILE, config))
    tokenizer = _load_tokenizer(path / TOKENIZER_FILE, config)
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise _refused(
            path / TOKENIZER_FILE,
            f"has {tokenizer.vocab_size} tokens but {CONFIG_FILE} architecture.vocab_size is {model.cfg.vocab_size}",
        )
    _load_weights(path / MODEL_FILE, model)
    model.eval()
    log.info("loaded checkpoint %s", path)
    return Checkpoint(model_id=_model_id(path, config), model=model, tokenizer=tokenizer, config=config)


def _model_config(file: Path, config: dict) -> ModelConfig:
    try:
        return ModelConfig.from_dict(config["architecture"])
    except (ConfigError, TypeError) as e:
        raise _refused(file, f"invalid architecture ({e})") from None


def _load_tokenizer(file: Path, config: dict) -> Tokenizer:
    try:
        tokenizer = tokenizer_from_dict(json.loads(file.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise _refused(file, "missing; the checkpoint cannot encode or decode text") from None
    except Exception as e:  # JSON errors, malformed dicts, and the tokenizers library's plain Exception
        raise _refused(file, "not a valid tokenizer", e) from None
    if tokenizer.kind != config["tokenizer"].get("kind"):
        raise _refused(
            file, f"is a {tokenizer.kind!r} tokenizer but {CONFIG_FILE} says {config['tokenizer'].get('kind')!r}"
        )
    return tokenizer


def _load_weights(file: Path, model: LSTMLanguageModel) -> None:
    if not file.exists():
        raise _refused(file, "missing; the checkpoint has no weights")
    try:
        state = load_file(str(file))
    except Exception as e:  # safetensors raises SafetensorError / OSError on truncated or corrupt files
        raise _refused(file, "truncated or corrupt", e) from None
    if model.cfg.tie_weights and TIED_KEY not in state and "embedding.weight" in state:
        state[TIED_KEY] = state["embedding.weight"]  # re-tie: the head shares the embedding
    _check_tensors(file, state, model.state_dict())
    model.load_state_dict(state, strict=True)


def _check_tensors(file: Path, found: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    """Name the first problem precisely (load_state_dict's own message lists everything at once)."""
    missing = sorted(set(expected) - set(found))
    if missing:
        raise _refused(file, f"missing tensors {missing}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise _refused(file, f"unexpected tensors {unexpected} for the architecture in {CONFIG_FILE}")
    for name, want in expected.items():
        got = found[name]
        if got.shape != want.shape:
            raise _refused(
                file, f"tensor {name!r} has shape {tuple(got.shape)}, but {CONFIG_FILE} implies {tuple(want.shape)}"
            )
        if not got.dtype.is_floating_point:
            raise _refused(file, f"tensor {name!r} has dtype {got.dtype}, expected a float")


def _model_id(path: Path, config: dict) -> str:
    """The folder name is the id a registry knows the model by; fall back to config.json's."""
    if _MODEL_ID.fullmatch(path.name) and path.name not in RESERVED_IDS:
        return path.name
    return str(config["model_id"])
