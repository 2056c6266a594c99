"""Model aliases: named pointers at a model version, each with an optional weighted canary.

`production` is the active model: its model is the active pointer itself (models/ACTIVE here, the
Redis key in Redis mode), so `POST /models/{id}/activate` and a publish keep moving the same
pointer. Only production's canary is stored beside it. Every other alias is stored whole:

    models/ALIASES     {"<alias>": {"model": id, "canary": null | {"model": id, "weight": w},
                                    "updated_at": iso}, "production": {"canary": ..., "updated_at": ...}}

(JSON, replaced atomically, compare-and-set under the same flock on models/.lock as ACTIVE; an
upper-case name cannot be a model id). jobs/aliases.py keeps the same records in a Redis hash.

A compare-and-set compares the stored record as a whole (and, for production, the pointer): a
`set` that lost to any other change since its read fails, and the caller reads again or answers 409.

Which version serves a request: a hash of (routing key, alias) mapped to [0, 1) and compared with
the canary's weight, so the same key gets the same version on every replica; without a key, a
random draw per request.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from lm.checkpoint import validate_model_id
from lm.errors import AliasNotFound, ConfigError, InvalidModelId, PromotionConflict
from lm.files import atomic_write
from lm.registry import ACTIVE_FILE, LOCK_FILE, UNSET, FilePointer, _Unset

log = logging.getLogger(__name__)

PRODUCTION = "production"
ALIASES_FILE = "ALIASES"
MAX_ATTEMPTS = 20  # a set without expected_model retries a lost compare-and-set this often
CANARY_PREFIX = "canary:"  # a training job's `activate`: "canary:0.1" makes its model production's canary
_WEIGHT = re.compile(r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?")


@dataclass(frozen=True)
class Canary:
    model: str
    weight: float  # the share of routing keys it serves, 0.0-1.0


@dataclass(frozen=True)
class Alias:
    name: str
    model: str
    canary: Canary | None = None
    updated_at: str = ""
    stored: str = ""  # the record exactly as the store holds it ("" = none): what a compare-and-set compares
    event: dict[str, Any] | None = None  # what last happened to it by itself (an automatic abort); cleared by a set

    def record(self) -> dict[str, Any]:
        """What the store keeps: production's model lives in the active pointer, not here."""
        canary = None if self.canary is None else {"model": self.canary.model, "weight": self.canary.weight}
        record: dict[str, Any] = {"canary": canary, "updated_at": self.updated_at}
        if self.event is not None:
            record["event"] = self.event
        if self.name != PRODUCTION:
            record["model"] = self.model
        return record

    def serialized(self) -> str:
        return _canonical(self.record())

    def targets(self) -> set[str]:
        """The versions this alias names."""
        return {self.model} | ({self.canary.model} if self.canary is not None else set())

    def version_for(self, route_key: str | None) -> str:
        """The version that serves a request with this routing key (None: a random draw)."""
        if self.canary is None:
            return self.model
        share = random.random() if route_key is None else key_fraction(route_key, self.name)
        return self.canary.model if share < self.canary.weight else self.model


def key_fraction(route_key: str, alias: str) -> float:
    """(key, alias) as a number in [0, 1), the same in every process (blake2b, never Python's salted hash())."""
    digest = hashlib.blake2b(f"{alias}\n{route_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def validate_alias_name(name: str) -> str:
    """Alias names follow the model id rules (`[a-z0-9][a-z0-9._-]{0,63}`); ConfigError otherwise."""
    try:
        return validate_model_id(name)
    except InvalidModelId:
        raise ConfigError(
            f"invalid alias {name!r}: an alias is 1-64 characters of a-z, 0-9, '.', '_' and '-', "
            "starting with a letter or digit",
            "alias",
        ) from None


def make_canary(model: str, weight: float) -> Canary:
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"canary weight {weight} is outside 0.0-1.0", "canary.weight")
    return Canary(validate_model_id(model), float(weight))


def canary_weight(activate: object) -> float | None:
    """The weight of a job's `activate` when it is "canary:<weight>" (0 < weight <= 1); None for any other value
    (true, false, "always"); ConfigError for a "canary:" whose weight is not a number in (0, 1]."""
    if not isinstance(activate, str) or not activate.startswith(CANARY_PREFIX):
        return None
    text = activate.removeprefix(CANARY_PREFIX)
    weight = float(text) if _WEIGHT.fullmatch(text) else -1.0
    if not 0.0 < weight <= 1.0:
        raise ConfigError(
            f"activate {activate!r}: a canary's weight is a number in (0, 1], "
            'e.g. "canary:0.1" for 10% of the traffic',
            "activate",
        )
    return weight


def parse(name: str, stored: str, active: str | None = None) -> Alias | None:
    """A stored record (and for production, the active id) as an Alias; None for a malformed one."""
    try:
        record = json.loads(stored) if stored else {}
        model = active if name == PRODUCTION else record["model"]
        if model is None:
            return None
        canary = record.get("canary")
        return Alias(
            name,
            validate_model_id(model),
            None if canary is None else make_canary(canary["model"], float(canary["weight"])),
            str(record.get("updated_at", "")),
            stored,
            record.get("event") if isinstance(record.get("event"), dict) else None,
        )
    except (ValueError, KeyError, TypeError, ConfigError, InvalidModelId) as e:
        log.warning("alias %s: the stored record %r is not one (%s); ignoring it", name, stored, e)
        return None


def _canonical(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


class AliasStore(Protocol):
    def all(self) -> dict[str, Alias]:
        """Every alias, production (the active pointer and its canary) included while a model is active."""
        ...

    def compare_and_set(self, expected: Alias | None, new: Alias, *, delete: bool = False) -> bool:
        """Store `new` (or delete it) if its alias is still `expected` (None: absent), record and
        (production) pointer alike; False when another writer got there first."""
        ...


class FileAliases:
    """models/ALIASES beside models/ACTIVE, under the pointer's flock."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = Path(models_dir)
        self.file = self.models_dir / ALIASES_FILE
        self.pointer = FilePointer(self.models_dir)

    def _records(self) -> dict[str, str]:
        try:
            data = json.loads(self.file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except ValueError:
            log.warning("%s is not JSON; treating it as no aliases", self.file)
            return {}
        return {name: _canonical(record) for name, record in data.items()} if isinstance(data, dict) else {}

    def all(self) -> dict[str, Alias]:
        records = self._records()
        active = self.pointer.get()
        if active is not None:
            records.setdefault(PRODUCTION, "")
        found = {name: parse(name, stored, active) for name, stored in records.items()}
        return {name: alias for name, alias in sorted(found.items()) if alias is not None}

    def compare_and_set(self, expected: Alias | None, new: Alias, *, delete: bool = False) -> bool:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        with open(self.models_dir / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            records = self._records()
            if records.get(new.name, "") != (expected.stored if expected is not None else ""):
                return False
            if new.name == PRODUCTION:
                if self.pointer.get() != (expected.model if expected is not None else None):
                    return False
                if not delete:
                    atomic_write(self.models_dir / ACTIVE_FILE, (new.model + "\n").encode("utf-8"))
            if delete:
                records.pop(new.name, None)
            else:
                records[new.name] = new.serialized()
            data = {name: json.loads(stored) for name, stored in sorted(records.items())}
            atomic_write(self.file, (json.dumps(data, indent=1) + "\n").encode("utf-8"))
        return True


# ---------------------------------------------------------------------------- changes, with compare-and-set


def fresh(name: str, model: str, canary: Canary | None, event: dict[str, Any] | None = None) -> Alias:
    """A new record for `name`, stamped now."""
    alias = Alias(name, model, canary, datetime.now(UTC).isoformat(timespec="milliseconds"), event=event)
    return Alias(name, model, canary, alias.updated_at, alias.serialized(), event)


def set_alias(
    store: AliasStore, name: str, model: str, canary: Canary | None, expected_model: str | None | _Unset = UNSET
) -> Alias:
    """Point `name` at `model` (+ canary). With `expected_model`, only while the alias still names that
    model (None: only while it does not exist), else PromotionConflict; without, the last writer wins."""
    for _ in range(MAX_ATTEMPTS):
        current = store.all().get(name)
        if not isinstance(expected_model, _Unset) and (current.model if current else None) != expected_model:
            raise PromotionConflict(
                f"alias {name!r} names {current.model if current else None!r}, not the expected {expected_model!r}"
            )
        new = fresh(name, model, canary)
        if store.compare_and_set(current, new):
            log.info("alias %s -> %s (canary %s)", name, model, canary)
            return new
    raise PromotionConflict(f"alias {name!r} kept changing (or its stored record is not one); not set")


def change_alias(
    store: AliasStore,
    name: str,
    how: str,
    expected_canary: Canary | None = None,
    reason: str | None = None,
) -> Alias:
    """`promote` (the canary becomes the model) or `abort` (the canary is cleared), compare-and-set against
    the alias as read: PromotionConflict when it changed meanwhile, has no canary, or (with
    `expected_canary`) has another one. An automatic abort gives its `reason`, kept as the alias's event."""
    current = store.all().get(name)
    if current is None:
        raise AliasNotFound(f"no alias named {name!r}")
    if current.canary is None:
        raise PromotionConflict(f"alias {name!r} has no canary to {how}")
    if expected_canary is not None and current.canary != expected_canary:
        raise PromotionConflict(f"alias {name!r} has another canary now: {current.canary.model}")
    model = current.canary.model if how == "promote" else current.model
    event = None
    if reason is not None:
        canary = {"model": current.canary.model, "weight": current.canary.weight}
        kind = "canary_aborted" if how == "abort" else "canary_promoted"
        event = {"kind": kind, "reason": reason, "canary": canary}
    new = fresh(name, model, None, event)
    if not store.compare_and_set(current, new):
        raise PromotionConflict(f"alias {name!r} changed during the {how}; read it again")
    log.info("alias %s: canary %s; %s serves it all", name, "promoted" if how == "promote" else "aborted", model)
    return new


def delete_alias(store: AliasStore, name: str) -> None:
    """Remove an alias; PromotionConflict for production (it is the active model), AliasNotFound if absent."""
    if name == PRODUCTION:
        raise PromotionConflict("production is the active model and cannot be deleted; set it instead")
    current = store.all().get(name)
    if current is None:
        raise AliasNotFound(f"no alias named {name!r}")
    if not store.compare_and_set(current, current, delete=True):
        raise PromotionConflict(f"alias {name!r} changed while it was being deleted; read it again")
    log.info("alias %s deleted", name)
