"""Prometheus metrics for `/metrics`, named after vLLM's (`vllm:…` → `inflightd:…`) so that the
dashboards and alerts written for vLLM carry over with a prefix change.

Per-request distributions (TTFT, TPOT, end-to-end, queue time) are histograms observed when a
request ends. Queue depth, KV usage and the engine's own counters (preemptions, prefix-cache
tokens) are read from an engine snapshot at scrape time, so they are exact and cost nothing
between scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..engine.outputs import EngineSnapshot
from ..engine.sequence import FinishReason

P = "inflightd:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TTFT_BUCKETS = (0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 600.0)


class _EngineCollector(Collector):
    def __init__(self, snapshot: Callable[[], EngineSnapshot | None]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        if s is None:  # still loading
            return
        yield GaugeMetricFamily(P + "num_requests_running", "Requests in the running batch.", s.num_running)
        yield GaugeMetricFamily(P + "num_requests_waiting", "Requests waiting to be admitted.", s.num_waiting)
        used = s.num_blocks - s.num_free_blocks
        yield GaugeMetricFamily(
            P + "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", used / max(s.num_blocks, 1)
        )
        yield GaugeMetricFamily(P + "kv_cache_blocks_total", "KV-cache blocks allocated at start.", s.num_blocks)
        yield CounterMetricFamily(
            P + "num_preemptions", "Sequences preempted (recomputed later) for lack of KV blocks.", s.num_preemptions
        )
        yield CounterMetricFamily(
            P + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_query_tokens
        )
        yield CounterMetricFamily(
            P + "prefix_cache_hits", "Prompt tokens served from the prefix cache.", s.prefix_hit_tokens
        )
        yield CounterMetricFamily(P + "engine_steps", "Engine steps run.", s.steps)


class Metrics:
    def __init__(self, snapshot: Callable[[], EngineSnapshot | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram(
            P + "time_to_first_token_seconds", "Arrival to first output token.", buckets=_TTFT_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            P + "time_per_output_token_seconds", "Mean time per output token after the first, per request.",
            buckets=_TPOT_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            P + "e2e_request_latency_seconds", "Arrival to last token.", buckets=_E2E_BUCKETS, registry=r
        )
        self.queue = Histogram(
            P + "request_queue_time_seconds", "Arrival to first scheduled.", buckets=_TTFT_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter(
            P + "request_success", "Requests ended, by finish reason.", ["finished_reason"], registry=r
        )
        self.rejected = Counter(
            P + "request_rejected", "Requests refused before reaching the engine, by HTTP status.", ["status"],
            registry=r,
        )
        for reason in FinishReason:
            self.requests.labels(reason.value)
        r.register(_EngineCollector(snapshot))

    def observe_end(
        self, finish_reason: FinishReason, prompt_tokens: int, completion_tokens: int, ttft_ms: float, tpot_ms: float,
        queue_ms: float, e2e_s: float,
    ) -> None:
        self.requests.labels(finish_reason.value).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        if completion_tokens > 0:
            self.ttft.observe(ttft_ms / 1e3)
            self.e2e.observe(e2e_s)
        if completion_tokens > 1:
            self.tpot.observe(tpot_ms / 1e3)
        self.queue.observe(queue_ms / 1e3)

    def observe_abort(self, prompt_tokens: int, completion_tokens: int) -> None:
        """A request its client abandoned: no timing, but its tokens were spent."""
        self.requests.labels(FinishReason.ABORT.value).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
