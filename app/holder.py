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
freed while it is active, nor is any version an alias or a canary names (lm/aliases.py).

Aliases: a request's `model` may name an alias (a request that names no model names `production`,
the active model); the routing key picks the alias's model or its canary (`Alias.version_for`), and
the lease remembers the alias. Alias targets are loaded whatever the key, since an admin named them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from app.canary import CanaryWatch
from app.engine import Engine, EngineOptions
from app.errors import ApiError
from app.metrics import Metrics
from app.settings import Settings
from jobs.errors import StoreUnavailable
from lm import aliases as alias_changes
from lm.aliases import PRODUCTION, Alias, AliasStore, Canary, FileAliases
from lm.checkpoint import Checkpoint, validate_model_id
from lm.constrain import ConstraintCompiler
from lm.devices import resolve_device
from lm.errors import ActiveModelError, CheckpointError
from lm.registry import UNSET, ModelInfo, Registry, _Unset
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
    alias: str | None = None  # the alias the request named (or production, for no model), when one was resolved

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
    def __init__(
        self, settings: Settings, metrics: Metrics, registry: Registry | None = None, aliases: AliasStore | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.registry = registry or Registry(settings.models_dir)
        self.alias_store: AliasStore = aliases if aliases is not None else FileAliases(settings.models_dir)
        self.aliases: dict[str, Alias] = {}  # as last read from the store (app/reconcile.py follows it)
        self._claimed: set[str] = set()  # the versions an alias change is loading: not to be freed meanwhile
        self.canary = CanaryWatch(settings, metrics, lambda: self.aliases, self._abort_canary)  # automatic abort
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

    async def lease(self, model_id: str | None = None, *, may_load: bool = True, route_key: str | None = None) -> Lease:
        """Pin a model version for one request: the active one (or production's canary), an alias's version
        for `route_key`, or `model_id` (loaded on demand if `may_load`, else 403 while it is not loaded)."""
        name = PRODUCTION if model_id is None else model_id
        alias = self.aliases.get(name)
        if name == PRODUCTION or alias is not None:
            version = alias.version_for(route_key) if alias is not None else None
            if name == PRODUCTION and (alias is None or version == alias.model):
                version = None  # production's model is whatever is active on this replica right now
            lease = await self._lease_version(version, may_load=True)
            lease.alias = name
            return lease
        return await self._lease_version(model_id, may_load=may_load)

    async def _lease_version(self, model_id: str | None, *, may_load: bool) -> Lease:
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
            if loaded.leases == 0 and model_id not in self.pinned_ids():
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
        pinned = self.pinned_ids()
        while len(self._others) + (self.active is not None) > self.settings.max_loaded_models:
            free = [model_id for model_id in self._others if model_id not in pinned]
            if not free:
                return  # every other version is an alias's or a canary's: they stay
            idle = [model_id for model_id in free if self._others[model_id].leases == 0]
            self._retire(self._others.pop(idle[0] if idle else free[0]))

    def pinned_ids(self) -> set[str]:
        """The versions that stay loaded: those an alias or a canary names, and those being set as one."""
        ids = set(self._claimed)
        for alias in self.aliases.values():
            ids |= alias.targets()
        return ids

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
                self._step_down(current)
            self._evict()
            return loaded

    def _step_down(self, previous: LoadedModel) -> None:
        """The version that was active: kept loaded by name while an alias names it, else retired."""
        if previous.model_id in self.pinned_ids() and previous.model_id not in self._others:
            self._others[previous.model_id] = previous
        else:
            self._retire(previous)

    async def delete(self, model_id: str) -> None:
        await self.info(model_id)
        named = sorted(
            a.name
            for a in self.aliases.values()
            if model_id in a.targets() - ({a.model} if a.name == PRODUCTION else set())
        )
        if named:
            raise ActiveModelError(f"{model_id!r} is named by the alias {named[0]!r}; change that alias first")
        async with self._lock:
            await asyncio.to_thread(self.registry.delete, model_id)  # ActiveModelError for the active one
            loaded = self._others.pop(model_id, None)
            if loaded is not None:
                self._retire(loaded)

    # -- aliases ----------------------------------------------------------------------------------

    async def read_aliases(self) -> dict[str, Alias]:
        """The aliases as the store holds them now; while it is unreachable, as this replica last read them."""
        try:
            return await asyncio.to_thread(self.alias_store.all)
        except StoreUnavailable as e:
            log.warning("aliases: %s; answering the last ones read", e)
            return dict(self.aliases)

    async def set_alias(
        self, name: str, model: str, canary: Canary | None, expected_model: str | None | _Unset = UNSET
    ) -> Alias:
        """Load and validate every version the alias will name (404, 422 when one is refused: nothing changes),
        compare-and-set it in the store (409), then serve it here; production's model is swapped in (a refused
        checkpoint counts as a refused swap there)."""
        try:
            return await self._set_alias(name, model, canary, expected_model)
        except CheckpointError:
            if name == PRODUCTION:
                self.metrics.swaps.labels(result="refused").inc()
            raise

    async def _set_alias(
        self, name: str, model: str, canary: Canary | None, expected_model: str | None | _Unset
    ) -> Alias:
        targets = [model] + ([canary.model] if canary is not None else [])
        for target in targets:
            await self.info(target)
        async with self._lock:
            self._claimed = set(targets)
            try:
                for target in targets:
                    if name != PRODUCTION or target != model:  # production's model: loaded by the swap below
                        await self._ensure_loaded(target)
                if name == PRODUCTION:
                    return await self._swap_production(model, canary, expected_model)
                alias = await asyncio.to_thread(
                    alias_changes.set_alias, self.alias_store, name, model, canary, expected_model
                )
                self.aliases[name] = alias
                return alias
            finally:
                self._claimed = set()
                self._evict()

    async def change_alias(
        self, name: str, how: str, expected_canary: Canary | None = None, reason: str | None = None
    ) -> Alias:
        """`promote` or `abort` the alias's canary (compare-and-set; 409 when it changed or has none, or
        is not `expected_canary` when one is given)."""
        async with self._lock:
            change = alias_changes.change_alias
            alias = await asyncio.to_thread(change, self.alias_store, name, how, expected_canary, reason)
            self.aliases[name] = alias
            if name == PRODUCTION and (self.active is None or self.active.model_id != alias.model):
                await self._serve_as_active(alias.model)
            self._evict()
            return alias

    async def _abort_canary(self, name: str, canary: Canary, reason: str) -> None:
        await self.change_alias(name, "abort", expected_canary=canary, reason=reason)

    async def delete_alias(self, name: str) -> None:
        async with self._lock:
            await asyncio.to_thread(alias_changes.delete_alias, self.alias_store, name)
            self.aliases.pop(name, None)
            self._evict()

    async def follow_aliases(self, aliases: dict[str, Alias], refused: set[str]) -> None:
        """Serve the aliases the store holds: load what they name (production's model is the reconcile's),
        skipping `refused` versions and adding to it those that fail validation."""
        self.aliases = aliases
        for alias in aliases.values():
            for target in alias.targets() - refused:
                if alias.name == PRODUCTION and target == alias.model:
                    continue
                try:
                    async with self._lock:
                        await self._ensure_loaded(target)
                except CheckpointError as e:
                    refused.add(target)
                    log.error("alias %s: refused model %s: %s", alias.name, target, e)
                except ApiError as e:
                    log.warning("alias %s: not loading %s now: %s", alias.name, target, e.message)
        async with self._lock:
            self._evict()

    async def _ensure_loaded(self, model_id: str) -> None:
        """Under the lock: load `model_id` by name unless it runs already."""
        if self.active is not None and self.active.model_id == model_id:
            return
        if model_id in self._others:
            self._others.move_to_end(model_id)
            return
        self._make_room(1)
        self._others[model_id] = await self._load(model_id)

    async def _swap_production(self, model: str, canary: Canary | None, expected_model: str | None | _Unset) -> Alias:
        """Under the lock: load and validate production's new model, compare-and-set, then swap it in."""
        current = self.active
        loaded = None
        if current is None or current.model_id != model:
            loaded = self._others.get(model)
            if loaded is None:
                self._make_room(1)
                loaded = await self._load(model)
                self._others[model] = loaded  # by name until the swap: a lost compare-and-set leaves it to the LRU
        try:
            alias = await asyncio.to_thread(
                alias_changes.set_alias, self.alias_store, PRODUCTION, model, canary, expected_model
            )
        except Exception:
            self._evict()
            raise
        if loaded is not None:
            self._others.pop(model, None)
        self.aliases[PRODUCTION] = alias
        if loaded is not None:
            self._swap_in(loaded)
        return alias

    async def _serve_as_active(self, model: str) -> None:
        """Under the lock: the pointer already names `model`; swap it in (it is loaded: it was the canary)."""
        loaded = self._others.pop(model, None)
        if loaded is None:
            self._make_room(1)
            loaded = await self._load(model)
        self._swap_in(loaded)

    def _swap_in(self, loaded: LoadedModel) -> None:
        current = self.active
        self.active = loaded  # the swap: new requests lease the new version from here on
        self.metrics.model.info({"model_id": loaded.model_id})
        self.metrics.swaps.labels(result="ok").inc()
        log.info("active model: %s (was %s)", loaded.model_id, current.model_id if current else None)
        if current is not None:
            self._step_down(current)

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
        if loaded.model_id not in self.loaded_ids():
            self.metrics.forget_version(loaded.model_id)
