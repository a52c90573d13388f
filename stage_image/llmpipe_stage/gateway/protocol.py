"""What the HTTP side receives from the stage process: two narrow protocols.

`Status` is every stage's state as /healthz, /readyz and /metrics read it; `Generations`
is stage 0's pipeline as the OpenAI routes use it: submit a generation (an async iterator
of its token ids; closing it early cancels the generation and frees its sequence on every
stage), and whether the ring is moving. `Serving` bundles what the routes need once stage
0 has loaded. `llmpipe_stage.server` implements them (the coordinator is a `Generations`);
the gateway imports no server, handler, backend or coordinator code.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from llmpipe_stage.generation import SamplingParams, Scores


class Progress(Protocol):
    """How far the stage's start has come."""

    phase: str  # starting -> loading -> ready | failed
    loaded: int
    total: int
    error: str


class Status(Protocol):
    """One stage as its health, readiness and metrics endpoints see it."""

    @property
    def index(self) -> int: ...

    @property
    def layers(self) -> tuple[int, int]:
        """Half-open [start, end)."""
        ...

    @property
    def progress(self) -> Progress: ...

    @property
    def registry(self) -> CollectorRegistry: ...

    async def readiness(self) -> tuple[bool, str]:
        """Whether this stage serves (stage 0: and every other stage), and why not."""
        ...


class Generations(Protocol):
    """Stage 0's pipeline: submit a generation, cancel it, ask whether the ring moves."""

    def generate(
        self, prompt: list[int], params: SamplingParams, *, scores: Scores | None = None
    ) -> AsyncGenerator[int, None]:
        """The sequence's tokens as they come back; raises `generation.PipelineError`.
        Leaving early (closing the iterator) cancels the generation."""
        ...

    def progressing(self, *, within_s: float) -> bool:
        """Whether a token came back within `within_s` seconds, with no failure since."""
        ...

    @property
    def recovering(self) -> bool:
        """Whether generations are paused, waiting for the pipeline to be healthy again
        (a new one waits with them instead of being refused)."""
        ...


@dataclass(frozen=True)
class Serving:
    """What the OpenAI routes need once stage 0 has loaded."""

    generations: Generations
    tokenizer: Any
    """A transformers tokenizer (encode, decode, apply_chat_template, len)."""
    context_limit: int
    eos_token_ids: frozenset[int]
