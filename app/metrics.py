"""Prometheus metrics, all named `textgen_*`, in a registry of their own per app.

A registry per app (not prometheus-client's global one) lets tests build many apps in one
process without "duplicated timeseries" errors. The engine thread updates the generation
metrics directly: prometheus-client's metrics are thread-safe.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from lm.decode.tune import Plan

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
VERSION_LABELS = ("model", "alias")  # alias "" = the request named the version itself


@dataclass(frozen=True)
class VersionSeries:
    """One (model, alias)'s latency series, resolved once per request: the engine thread observes into them."""

    ttft: Any  # a Histogram child
    inter_token: Any


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "textgen_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.ttft = Histogram(
            "textgen_time_to_first_token_seconds",
            "From admission to the first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "textgen_inter_token_latency_seconds",
            "Between two consecutive tokens of one sequence",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "textgen_e2e_latency_seconds",
            "From admission to the end of a sequence",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("textgen_prompt_tokens", "Prompt tokens fed to the model", registry=r)
        self.generated_tokens = Counter("textgen_generated_tokens", "Tokens generated", registry=r)
        self.running = Gauge("textgen_running_sequences", "Sequences in a decode batch", registry=r)
        self.waiting = Gauge("textgen_waiting_sequences", "Admitted sequences waiting for a decode slot", registry=r)
        self.batch_size = Histogram(
            "textgen_batch_size", "Sequences advanced by one decode step", buckets=BATCH_BUCKETS, registry=r
        )
        self.model = Info("textgen_model", "The active model version", registry=r)
        self.decode_step = Info(
            "textgen_decode_step",
            "The decode step the last started engine runs: its kind, loops, product, threads, and how it was chosen",
            registry=r,
        )
        self.decode_speed = Gauge(
            "textgen_decode_step_tokens_per_second",
            "What the chosen decode step measured at each batch size when its engine started (step alone)",
            ["batch"],
            registry=r,
        )
        self.swaps = Counter("textgen_model_swaps", "Model activations by result", ["result"], registry=r)
        self.dropped = Counter(
            "textgen_generations_dropped",
            "Generations stopped before their end: the client disconnected, or accepted no bytes for "
            "TEXTGEN_STALL_TIMEOUT_S (stalled)",
            ["reason"],
            registry=r,
        )
        for reason in ("disconnected", "stalled"):
            self.dropped.labels(reason=reason)  # both series exist from the start, at 0
        self.rejected = Counter("textgen_requests_rejected", "Requests refused with 429 for overload", registry=r)
        # the prompt-state cache (app/prompt_cache.py): a hit reuses the state after a cached prefix
        self.prompt_cache_hits = Counter(
            "textgen_prompt_cache_hits", "Prompts that started from a cached prefix state", registry=r
        )
        self.prompt_cache_misses = Counter(
            "textgen_prompt_cache_misses", "Prompts prefilled from the start", registry=r
        )
        self.prompt_cache_tokens = Counter(
            "textgen_prompt_cache_tokens", "Prompt tokens not run because their state was cached", registry=r
        )
        self.prompt_cache_bytes = Gauge(
            "textgen_prompt_cache_bytes", "Bytes held by the prompt-state caches of all loaded versions", registry=r
        )

        # per version (and the alias that routed to it): only loaded versions have series (`forget_version`)
        self.version_requests = Counter(
            "textgen_version_requests",
            "Generation requests by the version that served them, the alias, and outcome (ok, failed, cancelled)",
            [*VERSION_LABELS, "outcome"],
            registry=r,
        )
        self.version_finish = Counter(
            "textgen_version_finish_reasons",
            "Finished sequences by version, alias and finish reason",
            [*VERSION_LABELS, "reason"],
            registry=r,
        )
        self.version_ttft = Histogram(
            "textgen_version_time_to_first_token_seconds",
            "From admission to the first generated token, by version and alias",
            VERSION_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.version_inter_token = Histogram(
            "textgen_version_inter_token_latency_seconds",
            "Between two consecutive tokens of one sequence, by version and alias",
            VERSION_LABELS,
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.canary_aborts = Counter(
            "textgen_canary_aborts",
            "Canaries aborted automatically, by alias and reason (failures, ttft)",
            ["alias", "reason"],
            registry=r,
        )
        self._version_series: dict[str, set[tuple[Any, tuple[str, ...]]]] = {}  # model -> (metric, labels)

    def _labelled(self, metric: Any, *labels: str) -> Any:
        self._version_series.setdefault(labels[0], set()).add((metric, labels))
        return metric.labels(*labels)

    def version(self, model: str, alias: str | None) -> VersionSeries:
        """The latency series of `model` served through `alias` (None: named directly)."""
        labels = (model, alias or "")
        return VersionSeries(
            self._labelled(self.version_ttft, *labels), self._labelled(self.version_inter_token, *labels)
        )

    def version_done(self, model: str, alias: str | None, outcome: str, reasons: list[str]) -> None:
        """One generation request ended: its outcome and its sequences' finish reasons."""
        labels = (model, alias or "")
        self._labelled(self.version_requests, *labels, outcome).inc()
        for reason in reasons:
            self._labelled(self.version_finish, *labels, reason).inc()

    def forget_version(self, model: str) -> None:
        """Drop an unloaded version's series, so that label values stay bounded by the loaded versions."""
        for metric, labels in self._version_series.pop(model, set()):
            with contextlib.suppress(KeyError):
                metric.remove(*labels)

    def observe_plan(self, plan: Plan) -> None:
        """The chosen decode step (lm/decode/tune.py) and its measured speed."""
        self.decode_step.info(
            {
                "kind": plan.kind,
                "loops": plan.loops,
                "product": plan.product,
                "threads": str(plan.threads),
                "vnni_rows": str(plan.vnni_rows),
                "source": plan.source,
            }
        )
        self.decode_speed.clear()
        for batch, rate in plan.chosen_tokens_per_s().items():
            self.decode_speed.labels(batch=str(batch)).set(rate)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestMetricsMiddleware:
    """Counts every HTTP request by its route template (not its raw path: ids would explode the labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(route=route_label(scope), status=str(status)).inc()


def route_label(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


def now() -> float:
    return time.perf_counter()
