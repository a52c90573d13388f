"""The stage's configuration: the plan ConfigMap (`plan.json` + `pipeline.json`) and the flags.

Pure parsing: files in, frozen dataclasses out, with errors that name the file and field.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPES = ("bfloat16", "float16", "float32")
PIPELINE_DTYPES = ("auto", *DTYPES)
"""pipeline.json's model.dtype: `auto` lets each stage's device pick (`devices.place`)."""
STAGE_DEVICES = ("cpu", "cuda")
QUANTIZATIONS = ("none", "int8")
SPECULATIONS = ("auto", "off", "ngram", "draft")
"""pipeline.json's workload.speculation (`llmpipe_stage.speculation`); unset: `auto`."""
"""Weight quantization of a stage's projections (`none`: weights in `dtype`)."""


class ConfigError(ValueError):
    """A plan or pipeline file a stage cannot run; the text names the file and field."""


@dataclass(frozen=True)
class StagePlan:
    """One stage of the plan JSON of docs/design.md: layers [layer_start, layer_end)."""

    index: int
    layer_start: int
    layer_end: int
    has_embedding: bool
    has_head: bool
    node: str = ""
    device: str = ""
    """The plan's `cpu` or `cuda`; "" (a plan without devices, `llmpipe serve`): auto."""
    dtype: str = ""
    """The plan's dtype for this stage; "": pipeline.json's model.dtype."""


@dataclass(frozen=True)
class PipelineConfig:
    """Everything a stage reads from its config dir."""

    model_name: str
    dtype: str
    max_sequences: int
    """Sequences in flight at once; stage 0 queues the rest (the planner sized KV for it)."""
    max_context_tokens: int
    """Prompt plus completion tokens per sequence; longer prompts get HTTP 400."""
    stages: tuple[StagePlan, ...]
    addresses: tuple[str, ...]
    """gRPC address host:port of every stage, by index."""
    quantization: str = "none"
    """`int8`: weight-only int8 projections (activations in `dtype`)."""
    prefill_chunk_tokens: int = 0
    """workload.prefillChunkTokens: prompt tokens per pipelined prefill chunk; 0: off."""
    prefill_tokens_in_flight: int | None = None
    """workload.prefillTokensInFlight: token throttling's bound on the prompt tokens in
    flight (None: two chunks per stage; 0: no bound)."""
    speculation: str = "auto"
    """workload.speculation: `auto` (prompt-lookup drafts for greedy requests only: the
    default, docs/benchmarks.md shows it never measurably slower there), `ngram`
    (prompt-lookup drafts; greedy and sampled requests without logprobs), `draft` (a draft
    model's, run whole in stage 0: `--draft-model-dir`) or `off`."""
    max_draft_tokens: int = 8
    """workload.maxDraftTokens: the most draft tokens one step verifies (k adapts below)."""

    @property
    def num_stages(self) -> int:
        return len(self.stages)


def _field(data: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in data:
        raise ConfigError(f"{where}: missing field {key!r}")
    value = data[key]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(f"{where}: field {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _optional_choice(
    data: Mapping[str, Any], key: str, allowed: tuple[str, ...], where: str
) -> str:
    if key not in data:
        return ""
    value = data[key]
    if value not in allowed:
        raise ConfigError(f"{where}: field {key!r} must be one of {allowed}, got {value!r}")
    return str(value)


def parse_plan(data: Mapping[str, Any], where: str = "plan.json") -> tuple[StagePlan, ...]:
    """The stages of the plan JSON (docs/design.md), checked to be contiguous half-open
    layer ranges."""
    raw_stages = _field(data, "stages", list, where)
    if not raw_stages:
        raise ConfigError(f"{where}: 'stages' is empty")
    stages: list[StagePlan] = []
    for position, raw in enumerate(raw_stages):
        at = f"{where}: stages[{position}]"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{at} must be an object")
        stage = StagePlan(
            index=_field(raw, "index", int, at),
            layer_start=_field(raw, "layerStart", int, at),
            layer_end=_field(raw, "layerEnd", int, at),
            has_embedding=_field(raw, "hasEmbedding", bool, at),
            has_head=_field(raw, "hasHead", bool, at),
            node=str(raw.get("node", "")),
            device=_optional_choice(raw, "device", STAGE_DEVICES, at),
            dtype=_optional_choice(raw, "dtype", DTYPES, at),
        )
        if stage.index != position:
            raise ConfigError(f"{at}: index is {stage.index}, expected {position}")
        if stage.layer_start >= stage.layer_end:
            raise ConfigError(f"{at}: empty layer range [{stage.layer_start}, {stage.layer_end})")
        expected_start = 0 if position == 0 else stages[-1].layer_end
        if stage.layer_start != expected_start:
            raise ConfigError(
                f"{at}: layerStart is {stage.layer_start}, expected "
                f"{expected_start} (ranges must be contiguous)"
            )
        if stage.has_embedding != (position == 0):
            raise ConfigError(f"{at}: hasEmbedding must be true on stage 0 only")
        if stage.has_head != (position == len(raw_stages) - 1):
            raise ConfigError(f"{at}: hasHead must be true on the last stage only")
        stages.append(stage)
    return tuple(stages)


def parse_pipeline(
    plan: Mapping[str, Any], pipeline: Mapping[str, Any], where: str = "pipeline.json"
) -> PipelineConfig:
    stages = parse_plan(plan)
    model = _field(pipeline, "model", dict, where)
    workload = _field(pipeline, "workload", dict, where)
    dtype = _field(model, "dtype", str, f"{where}: model")
    if dtype not in PIPELINE_DTYPES:
        raise ConfigError(f"{where}: model.dtype {dtype!r} is not one of {PIPELINE_DTYPES}")
    quantization = model.get("quantization", "none")
    if quantization not in QUANTIZATIONS:
        raise ConfigError(
            f"{where}: model.quantization {quantization!r} is not one of {QUANTIZATIONS}"
        )
    raw_addresses = _field(pipeline, "stages", list, where)
    addresses = []
    for position, raw in enumerate(raw_addresses):
        at = f"{where}: stages[{position}]"
        if not isinstance(raw, Mapping) or _field(raw, "index", int, at) != position:
            raise ConfigError(f"{at}: must be {{'index': {position}, 'address': 'host:port'}}")
        address = _field(raw, "address", str, at)
        if ":" not in address:
            raise ConfigError(f"{at}: address {address!r} is not host:port")
        addresses.append(address)
    if len(addresses) != len(stages):
        raise ConfigError(
            f"{where} lists {len(addresses)} stage addresses but plan.json has {len(stages)} stages"
        )
    config = PipelineConfig(
        model_name=_field(model, "name", str, f"{where}: model"),
        dtype=dtype,
        max_sequences=_field(workload, "maxSequences", int, f"{where}: workload"),
        max_context_tokens=_field(workload, "maxContextTokens", int, f"{where}: workload"),
        stages=stages,
        addresses=tuple(addresses),
        quantization=quantization,
        prefill_chunk_tokens=(
            _field(workload, "prefillChunkTokens", int, f"{where}: workload")
            if "prefillChunkTokens" in workload
            else 0
        ),
    )
    if config.max_sequences < 1 or config.max_context_tokens < 2:
        raise ConfigError(f"{where}: workload needs maxSequences >= 1 and maxContextTokens >= 2")
    speculation = workload.get("speculation", "auto")
    if speculation not in SPECULATIONS:
        raise ConfigError(f"{where}: workload.speculation must be one of {SPECULATIONS}")
    max_draft = workload.get("maxDraftTokens", 8)
    if not isinstance(max_draft, int) or isinstance(max_draft, bool) or not 1 <= max_draft <= 64:
        raise ConfigError(f"{where}: workload.maxDraftTokens must be an integer in [1, 64]")
    config = dataclasses.replace(config, speculation=speculation, max_draft_tokens=max_draft)
    if config.prefill_chunk_tokens < 0:
        raise ConfigError(f"{where}: workload.prefillChunkTokens must be >= 0 (0: off)")
    if "prefillTokensInFlight" in workload:
        in_flight = _field(workload, "prefillTokensInFlight", int, f"{where}: workload")
        if in_flight < 0:
            raise ConfigError(f"{where}: workload.prefillTokensInFlight must be >= 0 (0: no bound)")
        config = dataclasses.replace(config, prefill_tokens_in_flight=in_flight)
    return config


def read_config_dir(config_dir: Path) -> PipelineConfig:
    """Read `plan.json` and `pipeline.json` from the mounted ConfigMap directory."""
    loaded = []
    for name in ("plan.json", "pipeline.json"):
        path = config_dir / name
        try:
            loaded.append(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ConfigError(
                f"{path} does not exist (--config-dir must hold plan.json and pipeline.json)"
            ) from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} is not valid JSON: {error}") from None
    return parse_pipeline(loaded[0], loaded[1])


def even_plan(num_layers: int, num_stages: int) -> dict[str, Any]:
    """A plan JSON (docs/design.md) splitting layers as evenly as possible (for
    `serve --stages N`)."""
    if not 1 <= num_stages <= num_layers:
        raise ConfigError(
            f"cannot split {num_layers} layers into {num_stages} stages "
            f"(need 1 <= stages <= layers)"
        )
    base, extra = divmod(num_layers, num_stages)
    stages, start = [], 0
    for index in range(num_stages):
        end = start + base + (1 if index < extra else 0)
        stages.append(
            {
                "index": index,
                "node": "localhost",
                "layerStart": start,
                "layerEnd": end,
                "hasEmbedding": index == 0,
                "hasHead": index == num_stages - 1,
                "memoryBytes": 0,
                "computeSeconds": 0.0,
                "transferSeconds": 0.0,
            }
        )
        start = end
    return {
        "objective": "throughput",
        "bottleneckSeconds": 0.0,
        "tokenLatencySeconds": 0.0,
        "estTokensPerSecond": 0.0,
        "stages": stages,
    }
