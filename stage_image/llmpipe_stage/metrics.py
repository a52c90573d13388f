"""Prometheus metrics of one stage process (served at /metrics on every stage).

One registry per process; names are prefixed `llmpipe_`. Stage 0 fills the request-level
series (tokens, time to first token, queue depth, paused and resumed sequences); every
stage fills compute time, bytes sent and cached sequences.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from llmpipe_stage.runtime import StageRuntime

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class StageMetrics:
    def __init__(self, *, stage_index: int) -> None:
        self.registry = CollectorRegistry()
        labels = {"stage": str(stage_index)}
        r = self.registry
        self.tokens = Counter("llmpipe_generated_tokens", "Tokens generated (stage 0)", registry=r)
        self.tokens_per_second = Gauge(
            "llmpipe_tokens_per_second",
            "Generated tokens per second over the last 10 s",
            registry=r,
        )
        self.ttft = Histogram(
            "llmpipe_time_to_first_token_seconds",
            "Request arrival to first generated token (stage 0)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "llmpipe_queue_depth", "Requests waiting for a free sequence slot (stage 0)", registry=r
        )
        self.in_flight = Gauge(
            "llmpipe_sequences_in_flight", "Sequences being generated (stage 0)", registry=r
        )
        self.requests = Counter(
            "llmpipe_requests", "Finished requests by outcome", ["outcome"], registry=r
        )
        self.paused = Gauge(
            "llmpipe_sequences_paused",
            "Sequences parked until every stage is ready again (stage 0)",
            registry=r,
        )
        self.resumed = Counter(
            "llmpipe_resumed_sequences",
            "Sequences that continued after a pause (stage 0)",
            registry=r,
        )
        self.resume_failures = Counter(
            "llmpipe_resume_failed_sequences",
            "Parked sequences failed: no healthy pipeline within the resume bound (stage 0)",
            registry=r,
        )
        self.prefill_chunks = Counter(
            "llmpipe_prefill_chunks",
            "Prompt chunks sent down the pipeline by chunked prefill, the last included "
            "(stage 0; prompts sent whole are not counted)",
            registry=r,
        )
        self.prefill_in_flight = Gauge(
            "llmpipe_prefill_tokens_in_flight",
            "Prompt tokens sent down the pipeline that the last stage has not run yet "
            "(stage 0, with token throttling on)",
            registry=r,
        )
        self.prefill_throttled = Counter(
            "llmpipe_prefill_throttled",
            "Times a prompt chunk waited because the prompt tokens in flight were at the "
            "bound (stage 0, token throttling)",
            registry=r,
        )
        self.draft_tokens = Counter(
            "llmpipe_draft_tokens",
            "Draft tokens sent for verification by speculative decoding (stage 0)",
            registry=r,
        )
        self.accepted_tokens = Counter(
            "llmpipe_accepted_draft_tokens",
            "Draft tokens the last stage accepted (stage 0; the acceptance rate is "
            "accepted / draft)",
            registry=r,
        )
        self.pause = Histogram(
            "llmpipe_pause_seconds",
            "A stage failure to the first token after the resume, per sequence (stage 0)",
            buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300),
            registry=r,
        )
        self.compute = Histogram(
            "llmpipe_stage_compute_seconds",
            "Time this stage spends computing one micro-batch",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.batch_tokens = Histogram(
            "llmpipe_stage_batch_tokens",
            "Tokens per micro-batch on this stage",
            ["stage"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096),
            registry=r,
        ).labels(**labels)
        self.send = Histogram(
            "llmpipe_stage_send_seconds",
            "Time one hop to the next stage takes (Forward, or ReturnTokens from the last), "
            "until the receiver accepted it",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.bytes_sent = Counter(
            "llmpipe_bytes_sent", "Serialized bytes sent to other stages", ["stage"], registry=r
        ).labels(**labels)
        self.cached_sequences = Gauge(
            "llmpipe_kv_cache_sequences",
            "Sequences whose KV cache this stage holds",
            ["stage"],
            registry=r,
        ).labels(**labels)
        self.cache_bytes = Gauge(
            "llmpipe_kv_cache_bytes", "Bytes of KV cache held", ["stage"], registry=r
        ).labels(**labels)
        self._recent: deque[tuple[float, int]] = deque()
        self._recent_total = 0

    def count_tokens(self, n: int) -> None:
        """Called once per ring step; keeps a running 10 s window (O(1) amortised)."""
        now = time.monotonic()
        self.tokens.inc(n)
        self._recent.append((now, n))
        self._recent_total += n
        while self._recent[0][0] < now - 10.0:
            self._recent_total -= self._recent.popleft()[1]
        span = min(10.0, max(1.0, now - self._recent[0][0]))
        self.tokens_per_second.set(self._recent_total / span)

    def measure_caches(self, runtime: StageRuntime) -> None:
        """Both cache gauges together, so the bytes fall to 0 when the last sequence goes.
        Call it where the caches change (the compute thread is their only writer)."""
        self.cached_sequences.set(len(runtime.caches))
        self.cache_bytes.set(runtime.cache_bytes())

    def render(self) -> bytes:
        return generate_latest(self.registry)
