"""`pipeline.json`, the stage container's second config file (beside the plan JSON of
docs/design.md): the model, the workload and every stage's gRPC address. Pure.

The operator writes it into each plan's ConfigMap (`manifests.plan_config`), `llmpipe
serve` into its run directory (`llmpipe_cli.launcher`); the stage reads it
(`llmpipe_stage.config.parse_pipeline`). One builder, so both writers agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def pipeline_document(
    *,
    model_name: str,
    dtype: str,
    max_sequences: int,
    max_context_tokens: int,
    addresses: Iterable[tuple[int, str]],
    quantization: str | None = None,
    prefill_chunk_tokens: int | None = None,
    speculation: str | None = None,
    prefill_tokens_in_flight: int | None = None,
) -> dict[str, Any]:
    """The `pipeline.json` document; `addresses` are (stage index, host:port) pairs.
    `prefill_chunk_tokens`: prompt tokens per pipelined prefill chunk (0: off; None: not
    written, which the stage reads as off). `speculation`: `auto`, `ngram`, `draft` or
    `off` (None: not written: the stage's default, `auto`). `prefill_tokens_in_flight`:
    token throttling's bound on the prompt tokens in flight (0: no bound; None: not
    written, the stage's default)."""
    model: dict[str, Any] = {"name": model_name, "dtype": dtype}
    if quantization is not None:
        model["quantization"] = quantization
    workload: dict[str, Any] = {
        "maxSequences": max_sequences,
        "maxContextTokens": max_context_tokens,
    }
    if prefill_chunk_tokens is not None:
        workload["prefillChunkTokens"] = prefill_chunk_tokens
    if speculation is not None:
        workload["speculation"] = speculation
    if prefill_tokens_in_flight is not None:
        workload["prefillTokensInFlight"] = prefill_tokens_in_flight
    return {
        "model": model,
        "workload": workload,
        "stages": [{"index": index, "address": address} for index, address in addresses],
    }
