"""In-process pieces of the stage runtime: the wire format (round trips, rejected messages),
the generated gRPC code (regenerating yields identical files), the plan/pipeline parser,
slice loading (only the stage's tensors), and the batched runtime against `generate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llmpipe_stage import config, loading, prefill, runtime, wire
from llmpipe_stage.proto import build, stage_pb2
from tests.dataplane import pipelines

dtypes = pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])


@dtypes
def test_tensor_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    tensor = torch.randn(3, 5).to(dtype)
    message = wire.encode_tensor(tensor)
    assert len(message.data) == tensor.numel() * tensor.element_size()
    back = wire.decode_tensor(stage_pb2.Tensor.FromString(message.SerializeToString()))
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), tensor.view(torch.uint8))


def test_hidden_state_on_the_wire_is_hidden_size_times_dtype_plus_a_small_header() -> None:
    hidden = torch.zeros(1, 4096, dtype=torch.float16)
    message = wire.encode_activations([wire.Step(123456789, 100, 1)], hidden)
    size = len(message.SerializeToString())
    assert 4096 * 2 < size < 4096 * 2 + 64


def test_decode_rejects_unknown_dtype_and_negative_shape() -> None:
    with pytest.raises(wire.WireError, match="unknown tensor dtype"):
        wire.decode_tensor(stage_pb2.Tensor(dtype=0, shape=[1], data=b"\0" * 4))
    with pytest.raises(wire.WireError, match="negative"):
        wire.decode_tensor(stage_pb2.Tensor(dtype=stage_pb2.FLOAT32, shape=[-1], data=b""))


def test_decode_rejects_a_sequence_twice_in_one_micro_batch() -> None:
    message = wire.encode_activations([wire.Step(1, 0, 1), wire.Step(1, 1, 1)], torch.zeros(2, 8))
    with pytest.raises(wire.WireError, match="twice"):
        wire.decode_activations(message, hidden_size=8, dtype=torch.float32)


def test_regenerating_the_grpc_code_yields_the_committed_files(tmp_path: Path) -> None:
    generated = build.generate(tmp_path)
    assert {p.name for p in generated} == {"stage_pb2.py", "stage_pb2.pyi", "stage_pb2_grpc.py"}
    for path in generated:
        committed = build.PROTO_DIR / path.name
        assert path.read_text() == committed.read_text(), f"{path.name}: run `make proto`"


def plan_with(**changes: object) -> dict[str, object]:
    plan = config.even_plan(4, 2)
    plan["stages"][1].update(changes)  # type: ignore[index]
    return plan


@pytest.mark.parametrize(
    ("plan", "says"),
    [
        (plan_with(layerStart=3), "expected 2 (ranges must be contiguous)"),
        (plan_with(layerEnd=2), "empty layer range"),
        (plan_with(hasHead=False), "hasHead must be true on the last stage only"),
        (plan_with(hasEmbedding=True), "hasEmbedding must be true on stage 0 only"),
        (plan_with(index=5), "index is 5, expected 1"),
        ({"stages": []}, "'stages' is empty"),
        (plan_with(layerStart="2"), "field 'layerStart' must be int"),
    ],
)
def test_bad_plans_are_rejected_naming_the_field(plan: dict[str, object], says: str) -> None:
    with pytest.raises(config.ConfigError) as raised:
        config.parse_plan(plan)
    assert says in str(raised.value)


def test_config_dir_round_trip_and_errors(tmp_path: Path) -> None:
    (tmp_path / "plan.json").write_text(json.dumps(config.even_plan(4, 2)))
    with pytest.raises(config.ConfigError, match=r"pipeline\.json does not exist"):
        config.read_config_dir(tmp_path)
    pipeline = {
        "model": {"name": "m", "dtype": "float32"},
        "workload": {"maxSequences": 4, "maxContextTokens": 64},
        "stages": [{"index": 0, "address": "a:1"}, {"index": 1, "address": "b:2"}],
    }
    (tmp_path / "pipeline.json").write_text(json.dumps(pipeline))
    parsed = config.read_config_dir(tmp_path)
    assert parsed.addresses == ("a:1", "b:2") and parsed.num_stages == 2
    pipeline["model"] = {"name": "m", "dtype": "int8"}
    (tmp_path / "pipeline.json").write_text(json.dumps(pipeline))
    with pytest.raises(config.ConfigError, match="dtype 'int8' is not one of"):
        config.read_config_dir(tmp_path)


def test_the_last_stages_chunk_acknowledgements_round_trip_and_are_checked() -> None:
    sampled = wire.Sampled([7], chunks=[(3, 16), (5, 9)])
    ids, back = wire.decode_tokens(wire.encode_tokens([4], sampled))
    assert ids == [4] and back.tokens == [7] and back.chunks == [(3, 16), (5, 9)]
    only = wire.decode_tokens(wire.encode_tokens([], wire.Sampled([], chunks=[(3, 16)])))
    assert only == ([], wire.Sampled([], chunks=[(3, 16)]))
    broken = stage_pb2.Tokens(chunk_sequence_ids=[3, 5], chunk_lengths=[16])
    with pytest.raises(wire.WireError, match="2 chunk sequence ids but 1 chunk lengths"):
        wire.decode_tokens(broken)


def test_alternatives_round_trip_and_are_checked() -> None:
    sampled = wire.Sampled(
        [7, 9],
        logprobs=[-0.5, float("nan")],
        prompt_logprobs={4: [-1.25, -2.0]},
        alternatives=[[(7, -0.5), (3, -1.75)], []],  # the second sequence asked for none
        prompt_alternatives={4: [[(1, -0.25)], [(2, -2.0)]]},
    )
    ids, back = wire.decode_tokens(wire.encode_tokens([4, 6], sampled))
    assert ids == [4, 6]
    assert back.alternatives == [[(7, -0.5), (3, -1.75)], []]
    assert back.prompt_alternatives == {4: [[(1, -0.25)], [(2, -2.0)]]}
    none = wire.decode_tokens(wire.encode_tokens([4], wire.Sampled([7], logprobs=[-0.5])))[1]
    assert none.alternatives is None and none.prompt_alternatives == {}
    short = stage_pb2.Tokens(sequence_ids=[4, 6], token_ids=[7, 9])
    short.alternatives.add(token_ids=[7], logprobs=[-0.5])
    with pytest.raises(wire.WireError, match="2 tokens but 1 alternatives"):
        wire.decode_tokens(short)
    uneven = stage_pb2.Tokens(sequence_ids=[4], token_ids=[7])
    uneven.alternatives.add(token_ids=[7, 3], logprobs=[-0.5])
    with pytest.raises(wire.WireError, match="alternatives of 2 tokens but 1"):
        wire.decode_tokens(uneven)
    prompt = stage_pb2.Tokens(sequence_ids=[4], token_ids=[7])
    prompt.prompt_logprobs.add(sequence_id=4, logprobs=[-1.0, -2.0]).alternatives.add()
    with pytest.raises(wire.WireError, match="2 prompt scores but 1 alternatives"):
        wire.decode_tokens(prompt)


def test_token_throttling_admits_chunks_within_the_room_and_one_when_idle() -> None:
    assert prefill.in_flight_limit(None, chunk=16, num_stages=3) == 96  # two per stage
    assert prefill.in_flight_limit(40, chunk=16, num_stages=3) == 40
    assert prefill.in_flight_limit(0, chunk=16, num_stages=3) is None  # off
    assert prefill.in_flight_limit(None, chunk=0, num_stages=3) is None  # chunking off
    assert prefill.in_flight_limit(None, chunk=16, num_stages=1) is None
    budget = prefill.TokenBudget(16, room=20)
    assert budget.take(100) == 16 and not budget.throttled
    fresh = prefill.TokenBudget(16, room=4)
    assert fresh.take(100) == 0 and fresh.throttled  # a whole chunk or nothing
    assert fresh.take(3) == 3 and not fresh.throttled  # a prompt's short last chunk fits
    idle = prefill.TokenBudget(16, room=4, idle=True)  # nothing in flight: one chunk goes
    assert idle.take(100) == 16 and idle.take(100) == 0 and not idle.throttled  # budget spent
    assert prefill.TokenBudget(16).take(100) == 16  # no bound


def test_pipeline_json_sets_the_prompt_tokens_in_flight(tmp_path: Path) -> None:
    plan = config.even_plan(4, 2)
    pipeline: dict[str, object] = {
        "model": {"name": "m", "dtype": "float32"},
        "workload": {"maxSequences": 4, "maxContextTokens": 64},
        "stages": [{"index": 0, "address": "a:1"}, {"index": 1, "address": "b:2"}],
    }
    assert config.parse_pipeline(plan, pipeline).prefill_tokens_in_flight is None  # default
    pipeline["workload"] = {"maxSequences": 4, "maxContextTokens": 64, "prefillTokensInFlight": 0}
    assert config.parse_pipeline(plan, pipeline).prefill_tokens_in_flight == 0
    pipeline["workload"] = {"maxSequences": 4, "maxContextTokens": 64, "prefillTokensInFlight": -1}
    with pytest.raises(config.ConfigError, match="prefillTokensInFlight must be >= 0"):
        config.parse_pipeline(plan, pipeline)


def test_even_plan_covers_every_layer_once() -> None:
    for layers in range(1, 9):
        for stages in range(1, layers + 1):
            ranges = [
                (s["layerStart"], s["layerEnd"]) for s in config.even_plan(layers, stages)["stages"]
            ]
            assert [i for a, b in ranges for i in range(a, b)] == list(range(layers))
    with pytest.raises(config.ConfigError, match="cannot split 2 layers into 3 stages"):
        config.even_plan(2, 3)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pipelines.write_family(tmp_path_factory.mktemp("qwen"), "qwen2-tied")


def test_a_middle_stage_loads_only_its_own_layers(qwen_dir: Path) -> None:
    middle = loading.build_slice(
        qwen_dir,
        layer_start=1,
        layer_end=3,
        has_embedding=False,
        has_head=False,
        dtype=torch.float32,
    )
    loaded = sum(p.numel() * p.element_size() for p in middle.layers.parameters())
    with safe_open(str(qwen_dir / "model.safetensors"), framework="pt") as handle:
        expected = sum(
            torch.Size(handle.get_slice(k).get_shape()).numel() * 4
            for k in handle.keys()  # noqa: SIM118 - a safetensors handle, not a dict
            if k.startswith(("model.layers.1.", "model.layers.2."))
        )
    assert loaded == expected
    assert middle.embed is None and middle.head_weight is None


def test_tied_head_uses_the_embedding_matrix(qwen_dir: Path) -> None:
    last = loading.build_slice(
        qwen_dir,
        layer_start=3,
        layer_end=4,
        has_embedding=False,
        has_head=True,
        dtype=torch.float32,
    )
    with safe_open(str(qwen_dir / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" not in handle.keys()  # noqa: SIM118
        assert last.head_weight is not None
        assert torch.equal(last.head_weight, handle.get_tensor("model.embed_tokens.weight"))


def test_batched_decode_of_uneven_sequences_equals_generate(qwen_dir: Path) -> None:
    """Three sequences of different lengths decode as one batch over two slices."""
    slices = [
        runtime.StageRuntime(
            loading.build_slice(
                qwen_dir,
                layer_start=a,
                layer_end=b,
                has_embedding=a == 0,
                has_head=b == 4,
                dtype=torch.float32,
            ),
            context_limit=256,
        )
        for a, b in [(0, 2), (2, 4)]
    ]
    prompts = [[5, 6, 7, 8, 9], [20, 21], list(range(30, 42))]
    expected = pipelines.reference_tokens(qwen_dir, prompts, [8, 8, 8])

    def step(steps: list[wire.Step], ids: list[int]) -> list[int]:
        hidden = slices[0].embed(ids)
        for part in slices:
            hidden = part.run(steps, hidden)
        return slices[-1].sample(steps, hidden)

    got = [step([wire.Step(i, 0, len(p))], p) for i, p in enumerate(prompts)]
    for k in range(7):
        steps = [wire.Step(i, len(p) + k, 1) for i, p in enumerate(prompts)]
        for row, token in enumerate(step(steps, [g[-1] for g in got])):
            got[row].append(token)
    assert got == expected
    assert slices[0].release([0, 1, 2]) == [0, 1, 2] and not slices[0].caches


def test_equal_length_prompts_prefill_as_one_batch_and_equal_generate(qwen_dir: Path) -> None:
    """Prompts of equal length in one micro-batch run as one [batch, length] forward (as
    `generate` prefills), next to a prompt of another length; tokens still equal generate."""
    stage = runtime.StageRuntime(
        loading.build_slice(
            qwen_dir,
            layer_start=0,
            layer_end=4,
            has_embedding=True,
            has_head=True,
            dtype=torch.float32,
        ),
        context_limit=256,
    )
    prompts = [[5, 6, 7, 8, 9], [50, 51, 52, 53, 54], [20, 21], [90, 3, 44, 17, 2]]
    expected = pipelines.reference_tokens(qwen_dir, prompts, [6, 6, 6, 6])
    forwards: list[int] = []
    original = stage._forward

    def counting(steps: list[wire.Step], hidden: torch.Tensor) -> torch.Tensor:
        forwards.append(len(steps))
        return original(steps, hidden)

    stage._forward = counting  # type: ignore[method-assign]
    steps = [wire.Step(i, 0, len(p)) for i, p in enumerate(prompts)]
    hidden = stage.run(steps, stage.embed([t for p in prompts for t in p]))
    got = [[t] for t in stage.sample(steps, hidden)]
    assert sorted(forwards) == [1, 3]  # the three 5-token prompts in one forward
    for k in range(5):
        steps = [wire.Step(i, len(p) + k, 1) for i, p in enumerate(prompts)]
        hidden = stage.run(steps, stage.embed([g[-1] for g in got]))
        for row, token in enumerate(stage.sample(steps, hidden)):
            got[row].append(token)
    assert got == expected


def test_a_step_that_skips_positions_is_refused(qwen_dir: Path) -> None:
    first = runtime.StageRuntime(
        loading.build_slice(
            qwen_dir,
            layer_start=0,
            layer_end=1,
            has_embedding=True,
            has_head=False,
            dtype=torch.float32,
        ),
        context_limit=16,
    )
    with pytest.raises(runtime.StepError, match="step at position 3 but 0 tokens"):
        first.run([wire.Step(9, 3, 1)], first.embed([4]))
    with pytest.raises(runtime.StepError, match="exceed the context limit of 16"):
        first.run([wire.Step(9, 0, 17)], first.embed([4] * 17))
    assert not first.caches
