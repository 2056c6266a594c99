"""Waiting out a store outage: retry a call with exponential backoff while Redis is unreachable.

A worker must not lose a job because Redis restarted: the calls that record a job's state are
retried until Redis answers, or until the caller has a reason to stop waiting (`give_up`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from jobs.errors import StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_WAIT_S = 0.5
MAX_WAIT_S = 10.0


def until_available(
    action: Callable[[], T],
    *,
    give_up: Callable[[], bool] | None = None,
    first_s: float = FIRST_WAIT_S,
    max_s: float = MAX_WAIT_S,
    who: str = "",
) -> T:
    """`action()`, retried after first_s, 2 first_s, ... (at most max_s apart) while it raises
    StoreUnavailable. Raises the last StoreUnavailable once `give_up()` says so."""
    wait = first_s
    while True:
        try:
            return action()
        except StoreUnavailable as e:
            if give_up is not None and give_up():
                raise
            log.warning("%s%s; retrying in %.1fs", f"{who}: " if who else "", e, wait)
            time.sleep(wait)
            wait = min(wait * 2, max_s)
