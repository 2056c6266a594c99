"""Automatic abort: a canary that fails more, or answers slower, than its alias's model is cleared.

Each replica watches the requests it serves through an alias with a canary: a rolling window of
the last TEXTGEN_CANARY_WINDOW requests per version (failed or not, time to first token). Once the
canary has TEXTGEN_CANARY_MIN_REQUESTS of them, the replica aborts the canary (a compare-and-set,
so the replicas that see it too at the same moment do it once) when

- its failed-request rate exceeds the model's by more than TEXTGEN_CANARY_FAILURE_MARGIN, or
- its TTFT p99 exceeds the model's by more than TEXTGEN_CANARY_TTFT_MARGIN_S (once the model has as
  many requests in its window too).

The abort is logged, counted in `textgen_canary_aborts_total{alias, reason}`, kept on the alias as
its `event` (`{"kind": "canary_aborted", "reason", "canary"}`), and reaches every replica as any
alias change does. The windows start again whenever the alias's split changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from app.metrics import Metrics
from app.settings import Settings
from jobs.errors import StoreUnavailable
from lm.aliases import Alias, Canary
from lm.errors import AliasNotFound, PromotionConflict

log = logging.getLogger(__name__)


@dataclass
class Window:
    """One version's last requests under one split."""

    size: int
    failed: deque[bool] = field(init=False)
    ttft: deque[float] = field(init=False)

    def __post_init__(self) -> None:
        self.failed = deque(maxlen=self.size)
        self.ttft = deque(maxlen=self.size)

    def failure_rate(self) -> float:
        return sum(self.failed) / len(self.failed) if self.failed else 0.0

    def ttft_p99(self) -> float:
        ordered = sorted(self.ttft)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


@dataclass
class Split:
    """The windows of one alias's split: its model and its canary."""

    alias: Alias
    model: Window
    canary: Window
    aborting: bool = False


class CanaryWatch:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        aliases: Callable[[], dict[str, Alias]],
        abort: Callable[[str, Canary, str], Awaitable[Any]],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.aliases = aliases  # the aliases this replica serves now
        self.abort = abort  # (alias, the canary it must still have, reason): the compare-and-set abort
        self.splits: dict[str, Split] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def record(self, alias_name: str | None, model_id: str, *, failed: bool, ttft_s: float | None) -> None:
        """One generation request that `model_id` served through an alias has ended (not cancelled by its client)."""
        if alias_name is None:
            return
        alias = self.aliases().get(alias_name)
        if alias is None or alias.canary is None:
            self.splits.pop(alias_name, None)
            return
        split = self.splits.get(alias.name)
        if split is None or (split.alias.model, split.alias.canary) != (alias.model, alias.canary):
            size = self.settings.canary_window
            split = self.splits[alias.name] = Split(alias, Window(size), Window(size))
        window = split.canary if model_id == alias.canary.model else split.model
        window.failed.append(failed)
        if ttft_s is not None:
            window.ttft.append(ttft_s)
        reason = self._verdict(split)
        if reason is not None and not split.aborting:
            split.aborting = True
            task = asyncio.get_running_loop().create_task(self._abort(split, reason))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _verdict(self, split: Split) -> str | None:
        """Why the canary must go ("failures", "ttft"), or None."""
        least = self.settings.canary_min_requests
        canary, model = split.canary, split.model
        if len(canary.failed) < least:
            return None
        if canary.failure_rate() - model.failure_rate() > self.settings.canary_failure_margin:
            return "failures"
        slower = len(canary.ttft) >= least and len(model.ttft) >= least
        if slower and canary.ttft_p99() - model.ttft_p99() > self.settings.canary_ttft_margin_s:
            return "ttft"
        return None

    async def _abort(self, split: Split, reason: str) -> None:
        alias, canary = split.alias, split.canary
        detail = (
            f"failure rate {canary.failure_rate():.3f} vs {split.model.failure_rate():.3f}"
            if reason == "failures"
            else f"TTFT p99 {canary.ttft_p99():.3f}s vs {split.model.ttft_p99():.3f}s"
        )
        try:
            assert alias.canary is not None
            await self.abort(alias.name, alias.canary, reason)
        except (PromotionConflict, AliasNotFound) as e:
            log.info("alias %s: not aborting the canary: %s (changed meanwhile)", alias.name, e)
            return
        except StoreUnavailable as e:
            split.aborting = False  # try again on a later request
            log.warning("alias %s: could not abort the canary now: %s", alias.name, e)
            return
        self.metrics.canary_aborts.labels(alias=alias.name, reason=reason).inc()
        assert alias.canary is not None
        log.warning(
            "alias %s: canary %s aborted automatically (%s: %s); %s serves it all",
            alias.name,
            alias.canary.model,
            reason,
            detail,
            alias.model,
        )
