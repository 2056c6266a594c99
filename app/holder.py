"""The model holder: which model versions are loaded, which one is active, and who is using them.

Hot swap, as in docs/DESIGN.md: a new checkpoint is loaded and validated off the event loop
(shapes, a fixed-seed smoke generation, finite logits), then ONE reference is swapped. Each
loaded version has its own `Engine`. A request pins the version it starts on with a `Lease`
and releases it in `finally`; a version that is no longer active is stopped and freed when its
last lease ends. A checkpoint that fails validation is refused and the old model keeps serving.

Besides the active model, a request may name another model of the registry: it is loaded on
demand (by an admin key, or an inference key for the models TEXTGEN_LOAD_ON_DEMAND lists). At most
`max_loaded_models` versions run at once, the active one and versions still draining included: a
load frees the least recently used idle version first, and when every other version is busy, the
request gets 503 `models_busy` rather than a version past the bound. The active version is never
freed while it is active.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from app.engine import Engine, EngineOptions
from app.errors import ApiError
from app.metrics import Metrics
from app.settings import Settings
from lm.checkpoint import Checkpoint, validate_model_id
from lm.constrain import ConstraintCompiler
from lm.devices import resolve_device
from lm.errors import CheckpointError
from lm.registry import ModelInfo, Registry
from lm.sampler import SamplingParams, prompt_ids, stream_generate

log = logging.getLogger(__name__)

SMOKE_PARAMS = SamplingParams(max_tokens=8, temperature=1.0, seed=0)


@dataclass(eq=False)
class LoadedModel:
    """One loaded model version and its engine."""

    checkpoint: Checkpoint
    engine: Engine
    leases: int = 0
    retired: bool = False
    # this version's compiled constraints (structured outputs), an LRU per tokenizer
    constraints: ConstraintCompiler = field(init=False)

    def __post_init__(self) -> None:
        self.constraints = ConstraintCompiler(self.checkpoint.tokenizer)

    @property
    def model_id(self) -> str:
        return self.checkpoint.model_id

    @property
    def config(self) -> dict[str, Any]:
        return self.checkpoint.config

    @property
    def chat_template(self) -> dict[str, Any]:
        return self.checkpoint.config["chat_template"]


@dataclass(eq=False)
class Lease:
    """A request's pin on one model version; `release()` is idempotent."""

    loaded: LoadedModel
    holder: ModelHolder
    released: bool = field(default=False)

    @property
    def model_id(self) -> str:
        return self.loaded.model_id

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.holder._unpin(self.loaded)


def validate_checkpoint(checkpoint: Checkpoint) -> None:
    """Refuse a checkpoint that cannot serve: shapes, finite logits, a fixed-seed smoke generation.

    Loading already checked every tensor's shape against config.json (strict); this checks that
    the model actually runs and produces usable numbers. Raises CheckpointError.
    """
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    name = checkpoint.model_id
    if model.cfg.vocab_size != tokenizer.vocab_size:
        raise CheckpointError(f"{name}: model has {model.cfg.vocab_size} outputs, tokenizer {tokenizer.vocab_size}")
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids(tokenizer, "The ")], dtype=torch.long)  # (1, T)
        logits, (h, c) = model(ids)  # (1, T, V)
    if logits.shape[-1] != tokenizer.vocab_size:
        raise CheckpointError(f"{name}: logits have {logits.shape[-1]} entries, expected {tokenizer.vocab_size}")
    if not (torch.isfinite(logits).all() and torch.isfinite(h).all() and torch.isfinite(c).all()):
        raise CheckpointError(f"{name}: the model produces non-finite logits (NaN or inf weights?)")
    generation = stream_generate(model, tokenizer, "The ", SMOKE_PARAMS)
    text = "".join(generation)
    if generation.usage is None or generation.usage["completion_tokens"] < 1:
        raise CheckpointError(f"{name}: the smoke generation produced no tokens")
    log.debug("%s passed validation; smoke text %r", name, text)


class ModelHolder:
    def __init__(self, settings: Settings, metrics: Metrics, registry: Registry | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.registry = registry or Registry(settings.models_dir)
        self.device = resolve_device(settings.device)
        self.active: LoadedModel | None = None
        self._others: OrderedDict[str, LoadedModel] = OrderedDict()  # loaded by name, least recent first
        self._loaded: set[LoadedModel] = set()  # every version whose engine runs, retired ones included
        self._lock = asyncio.Lock()  # one load or swap at a time
        self.not_ready_reason = "the service is starting"

    # -- startup and shutdown ---------------------------------------------------------------------

    async def load_initial(self) -> None:
        """Load the registry's active model (or TEXTGEN_DEFAULT_MODEL); on failure, say why in /readyz."""
        model_id = await asyncio.to_thread(self.registry.active_id) or self.settings.default_model
        if model_id is None:
            self.not_ready_reason = (
                f"no active model in {self.settings.models_dir}: train one or POST /models/{{id}}/activate"
            )
            log.warning("not ready: %s", self.not_ready_reason)
            return
        self.not_ready_reason = f"loading model {model_id}"
        try:
            await self.activate(model_id, persist=False)  # serve it; the pointer is not ours to rewrite here
        except Exception as e:
            message = e.message if isinstance(e, ApiError) else str(e)
            self.not_ready_reason = f"could not load model {model_id}: {message}"
            log.error("not ready: %s", self.not_ready_reason)

    async def close(self) -> None:
        """Stop every engine, retired ones still draining included; their sequences get a Failed event."""
        loaded = list(self._loaded)
        self.active = None
        self._others.clear()
        self._loaded.clear()
        for m in loaded:
            m.engine.stop()
        for m in loaded:
            await asyncio.to_thread(m.engine.join, 5.0)

    # -- leases -----------------------------------------------------------------------------------

    async def lease(self, model_id: str | None = None, *, may_load: bool = True) -> Lease:
        """Pin a model version for one request: the active one, or `model_id` (loaded on demand if
        `may_load`, else 403 while it is not loaded)."""
        active = self.active
        if model_id is None or (active is not None and model_id == active.model_id):
            if active is None:
                raise ApiError(503, f"no model is loaded: {self.not_ready_reason}", code="model_not_ready")
            return self._pin(active)
        loaded = self._others.get(model_id)
        if loaded is not None:
            self._others.move_to_end(model_id)
            return self._pin(loaded)
        if not may_load:
            await self.info(model_id)  # 404 for a model that does not exist
            raise ApiError(
                403,
                f"model {model_id!r} is not loaded, and this key may not load it by naming it; "
                "an admin key may (or TEXTGEN_LOAD_ON_DEMAND lists the models any key may load)",
                param="model",
                code="model_not_loaded",
            )
        return await self._load_other(model_id)

    def _pin(self, loaded: LoadedModel) -> Lease:
        loaded.leases += 1
        return Lease(loaded, self)

    def _unpin(self, loaded: LoadedModel) -> None:
        loaded.leases -= 1
        if loaded.retired and loaded.leases == 0:
            self._free(loaded)

    async def _load_other(self, model_id: str) -> Lease:
        await self.info(model_id)  # 404 before any loading
        async with self._lock:
            if self.active is not None and self.active.model_id == model_id:
                return self._pin(self.active)
            loaded = self._others.get(model_id)
            if loaded is None:
                self._make_room(1)
                loaded = await self._load(model_id)
                self._others[model_id] = loaded
            return self._pin(loaded)

    def _make_room(self, versions: int) -> None:
        """Free idle versions loaded by name, least recently used first, until `versions` more fit under
        max_loaded_models; 503 when the versions in the way are all busy (or draining)."""
        limit = self.settings.max_loaded_models
        if (self.active is not None) + versions > limit:
            raise ApiError(
                503,
                f"the server runs at most TEXTGEN_MAX_LOADED_MODELS={limit} model versions at once, the active "
                "one included, so it serves no other model by name; use the active model",
                param="model",
                code="models_busy",
            )
        for model_id, loaded in list(self._others.items()):
            if len(self._loaded) + versions <= limit:
                return
            if loaded.leases == 0:
                del self._others[model_id]
                self._retire(loaded)
        if len(self._loaded) + versions > limit:
            raise ApiError(
                503,
                f"the server runs at most TEXTGEN_MAX_LOADED_MODELS={limit} model versions at once, and the "
                "loaded ones are all in use; retry shortly, or use a loaded model",
                param="model",
                code="models_busy",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )

    def _evict(self) -> None:
        """After a swap: retire versions loaded by name while more than max_loaded_models are in service,
        idle ones first (a busy one finishes its requests, then goes)."""
        while self._others and len(self._others) + (self.active is not None) > self.settings.max_loaded_models:
            idle = [model_id for model_id, loaded in self._others.items() if loaded.leases == 0]
            self._retire(self._others.pop(idle[0] if idle else next(iter(self._others))))

    # -- registry operations ----------------------------------------------------------------------

    async def info(self, model_id: str) -> ModelInfo:
        validate_model_id(model_id)  # InvalidModelId -> 404, before the id touches a path
        return await asyncio.to_thread(self.registry.get, model_id)

    async def activate(self, model_id: str, *, persist: bool = True) -> LoadedModel:
        """Load + validate `model_id`, point the registry at it (`persist`), swap it in; the old version drains.
        A checkpoint that cannot serve (unreadable config.json included) counts as a refused swap."""
        try:
            return await self._activate(model_id, persist)
        except CheckpointError:
            self.metrics.swaps.labels(result="refused").inc()
            raise

    async def _activate(self, model_id: str, persist: bool) -> LoadedModel:
        await self.info(model_id)
        async with self._lock:
            current = self.active
            if current is not None and current.model_id == model_id:
                if persist:
                    await asyncio.to_thread(self.registry.activate, model_id)
                return current
            loaded = self._others.pop(model_id, None) or await self._load(model_id)
            try:
                if persist:
                    await asyncio.to_thread(self.registry.activate, model_id)
            except Exception:
                self._retire(loaded)
                raise
            self.active = loaded  # the swap: new requests lease the new version from here on
            self.metrics.model.info({"model_id": model_id})
            self.metrics.swaps.labels(result="ok").inc()
            log.info("active model: %s (was %s)", model_id, current.model_id if current else None)
            if current is not None:
                self._retire(current)
            self._evict()
            return loaded

    async def delete(self, model_id: str) -> None:
        await self.info(model_id)
        async with self._lock:
            await asyncio.to_thread(self.registry.delete, model_id)  # ActiveModelError for the active one
            loaded = self._others.pop(model_id, None)
            if loaded is not None:
                self._retire(loaded)

    def decode_plan(self, model_id: str) -> dict[str, Any] | None:
        """The decode plan of a loaded version (lm/decode/tune.py), None when it is not loaded."""
        loaded = self.active if self.active is not None and self.active.model_id == model_id else None
        loaded = loaded or self._others.get(model_id)
        return loaded.engine.plan.to_dict() if loaded is not None else None

    def loaded_ids(self) -> set[str]:
        ids = set(self._others)
        if self.active is not None:
            ids.add(self.active.model_id)
        return ids

    # -- loading ----------------------------------------------------------------------------------

    async def _load(self, model_id: str) -> LoadedModel:
        """Load and validate in a worker thread, then start the version's engine."""
        checkpoint = await asyncio.to_thread(self._load_and_validate, model_id)
        engine = Engine(
            checkpoint.model,
            checkpoint.tokenizer,
            model_id=checkpoint.model_id,
            max_running=self.settings.max_running,
            device=self.device,
            metrics=self.metrics,
            options=EngineOptions.from_settings(self.settings),
        )
        engine.start()
        # the engine measures which decode step serves fastest here (or reads it from the cache) before
        # it takes requests: the version goes in once that is done, so no request waits for it
        await asyncio.to_thread(engine.ready.wait)
        loaded = LoadedModel(checkpoint, engine)
        self._loaded.add(loaded)
        return loaded

    def _load_and_validate(self, model_id: str) -> Checkpoint:
        checkpoint = self.registry.load(model_id)
        validate_checkpoint(checkpoint)
        checkpoint.model.to(self.device).eval()
        log.info("loaded %s on %s", model_id, self.device)
        return checkpoint

    def _retire(self, loaded: LoadedModel) -> None:
        loaded.retired = True
        if loaded.leases == 0:
            self._free(loaded)

    def _free(self, loaded: LoadedModel) -> None:
        """The engine thread ends on its own; the model goes with the last reference."""
        log.info("unloading %s", loaded.model_id)
        self._loaded.discard(loaded)
        loaded.engine.stop()
