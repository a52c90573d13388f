"""`llmpipe profile` and `llmpipe plan`: outputs (table, the JSON of docs/design.md, YAML), the
three ways to name a model (directory, config.json, profile JSON), flags reaching the
planner, a draft model's memory on stage 0, and exit codes 0 / 2 (bad input, message names
the problem) / 3 (infeasible)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmpipe_cli import main as cli
from llmpipe_cli import modelfiles
from llmpipe_cli import plan as plan_cli
from llmpipe_operator.planning import cost, planner, profiles

ROOT = Path(__file__).parents[3]
CLUSTERS = ROOT / "examples" / "clusters"
MODELS = ROOT / "examples" / "models"
JETSON = str(CLUSTERS / "jetson-cloud.yaml")
LLAMA2 = str(MODELS / "Llama-2-7B" / "config.json")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_table_reads_at_a_glance(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "plan", "--cluster", JETSON, "--model", LLAMA2)
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.startswith("STAGE"))
    for column in (
        "NODE",
        "TIER",
        "LAYERS",
        "MEMORY USED / AVAILABLE",
        "COMPUTE ms",
        "TRANSFER ms",
    ):
        assert column in header
    plan = planner.Plan.from_dict(
        json.loads(plan_json(capsys, "--cluster", JETSON, "--model", LLAMA2))
    )
    rows = [line for line in out.splitlines() if line[:1].isdigit()]
    assert len(rows) == len(plan.stages)
    marked = [row for row in rows if "<- bottleneck" in row]
    assert len(marked) == 1 and marked[0].split()[1] == plan.stages[plan.bottleneck_stage].node
    assert f"estimated throughput: {plan.est_tokens_per_second:.1f} tokens/s" in out
    assert f"token latency: {plan.token_latency_seconds * 1e3:.2f} ms" in out
    assert "exact optimum over 5 eligible nodes" in out


def plan_json(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out, err = run(capsys, "plan", *argv, "-o", "json")
    assert code == 0, err
    return out


def test_json_output_is_exactly_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    data = json.loads(
        plan_json(capsys, "--cluster", JETSON, "--model", LLAMA2, "--objective", "latency")
    )
    assert set(data) == {
        "objective",
        "bottleneckSeconds",
        "tokenLatencySeconds",
        "estTokensPerSecond",
        "estTimeToFirstTokenSeconds",
        "prefillChunkTokens",
        "estChunkedTimeToFirstTokenSeconds",
        "stages",
    }
    assert data["objective"] == "latency"
    code, out, _ = run(
        capsys,
        "plan",
        "--cluster",
        JETSON,
        "--model",
        LLAMA2,
        "--objective",
        "latency",
        "-o",
        "yaml",
    )
    assert code == 0 and yaml.safe_load(out) == data


def test_flags_reach_the_planner(capsys: pytest.CaptureFixture[str]) -> None:
    data = json.loads(
        plan_json(
            capsys,
            "--cluster",
            JETSON,
            "--model",
            LLAMA2,
            "--first-stage",
            "edge",
            "--last-stage",
            "edge",
            "--max-stages",
            "3",
            "--max-sequences",
            "8",
            "--max-context",
            "1024",
            "--runtime-overhead",
            "1Gi",
        )
    )
    stages = data["stages"]
    edge = {"orin-agx", "orin-nx", "orin-nano"}
    assert stages[0]["node"] in edge and stages[-1]["node"] in edge
    assert len(stages) <= 3
    kv = 8 * 1024 * 2 * 32 * 128 * 2  # S * C * kv bytes per token per layer
    first = stages[0]
    layers = first["layerEnd"] - first["layerStart"]
    assert first["memoryBytes"] > kv * layers + 2**30
    assert data["estTokensPerSecond"] == pytest.approx(8 / data["bottleneckSeconds"])


def test_profile_prints_the_design_profile_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "profile", str(MODELS / "Qwen2.5-7B"))
    assert code == 0
    profile = json.loads(out)
    assert profile["name"] == "Qwen2.5-7B" and profile["numLayers"] == 28
    assert profile["weightBytesPerParam"] == 2
    code, out, _ = run(capsys, "profile", LLAMA2, "--dtype", "fp32", "-o", "yaml")
    assert code == 0 and yaml.safe_load(out)["weightBytesPerParam"] == 4


def test_a_profile_json_works_as_the_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run(capsys, "profile", LLAMA2)
    assert code == 0
    (tmp_path / "llama2.profile.json").write_text(out)
    via_profile = plan_json(
        capsys, "--cluster", JETSON, "--model", str(tmp_path / "llama2.profile.json")
    )
    via_config = plan_json(capsys, "--cluster", JETSON, "--model", LLAMA2)
    assert json.loads(via_profile) == json.loads(via_config)


def test_a_saved_model_directory_is_profiled_from_its_headers(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(
        tmp_path / "tiny"
    )
    code, out, _ = run(capsys, "profile", str(tmp_path / "tiny"))
    assert code == 0
    profile = json.loads(out)
    assert profile["name"] == "tiny" and profile["weightBytesPerParam"] == 2
    cluster = tmp_path / "two.yaml"
    cluster.write_text(
        yaml.safe_dump(
            {
                "nodes": [
                    {
                        "name": "a",
                        "tier": "edge",
                        "memory": "1Gi",
                        "tflops": 1,
                        "memoryBandwidthGBps": 10,
                        "uplinkMbps": 100,
                    },
                ]
            }
        )
    )
    data = json.loads(
        plan_json(capsys, "--cluster", str(cluster), "--model", str(tmp_path / "tiny"))
    )
    assert data["stages"][0]["layerEnd"] == 4


def test_infeasible_exits_3_and_names_the_shortfall(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys,
        "plan",
        "--cluster",
        str(CLUSTERS / "pi-nuc-homelab.yaml"),
        "--model",
        str(MODELS / "Llama-3-70B"),
    )
    assert code == plan_cli.EXIT_INFEASIBLE == 3
    assert out == ""
    assert err.startswith("llmpipe plan: infeasible: needs 131.4 GiB of weights")
    assert "short by" in err


BAD_CLUSTER: dict[str, Any] = {
    "nodes": [
        {
            "name": "pi",
            "tier": "edge",
            "memory": "4Gi",
            "tflops": 0.1,
            "memoryBandwidthGBps": -1,
            "uplinkMbps": 100,
        }
    ]
}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "--cluster", "missing.yaml", "--model", LLAMA2], "missing.yaml: No such file"),
        (["plan", "--cluster", JETSON, "--model", "nowhere"], "nowhere: no such file or directory"),
        (
            ["plan", "--cluster", "BAD", "--model", LLAMA2],
            "node 'pi': field 'memoryBandwidthGBps' must be > 0",
        ),
        (["plan", "--cluster", "NOTYAML", "--model", LLAMA2], "not valid YAML"),
        (["plan", "--cluster", JETSON, "--model", JETSON], "not valid JSON"),
        (
            ["plan", "--cluster", JETSON, "--model", LLAMA2, "--dtype", "int3"],
            "unsupported dtype 'int3'",
        ),
        (["plan", "--cluster", JETSON, "--model", LLAMA2, "--max-stages", "0"], "must be >= 1"),
        (
            ["plan", "--cluster", JETSON, "--model", LLAMA2, "--runtime-overhead", "lots"],
            "not a Kubernetes quantity",
        ),
        (
            ["plan", "--cluster", JETSON, "--model", LLAMA2, "--objective", "speed"],
            "invalid choice",
        ),
        (["plan", "--model", LLAMA2], "--cluster"),
        (["profile", str(MODELS)], "no config.json"),
    ],
)
def test_bad_input_exits_2_with_a_message(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], message: str
) -> None:
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(BAD_CLUSTER))
    (tmp_path / "notyaml.yaml").write_text("nodes: [unclosed\n")
    swap = {"BAD": str(tmp_path / "bad.yaml"), "NOTYAML": str(tmp_path / "notyaml.yaml")}
    code, out, err = run(capsys, *[swap.get(a, a) for a in argv])
    assert code == plan_cli.EXIT_BAD_INPUT == 2
    assert out == ""
    assert message in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plan", "--help")
    assert code == 0 and "--first-stage" in out


@pytest.mark.parametrize("cluster", sorted(p.name for p in CLUSTERS.glob("*.yaml")))
def test_every_example_cluster_plans_tinyllama(
    capsys: pytest.CaptureFixture[str], cluster: str
) -> None:
    data = json.loads(
        plan_json(
            capsys, "--cluster", str(CLUSTERS / cluster), "--model", str(MODELS / "TinyLlama-1.1B")
        )
    )
    assert data["stages"][-1]["layerEnd"] == 22


def test_the_committed_fleet_is_what_the_generator_writes() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_fleet", CLUSTERS / "generate_fleet.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = yaml.safe_load((CLUSTERS / "fleet-200.yaml").read_text())
    assert committed == module.fleet()
    assert len(committed["nodes"]) == 200


@pytest.mark.parametrize(
    ("model", "code"),
    [("TinyLlama-1.1B", 0), ("Llama-3-70B", 3), ("no-such-model", 2)],
)
def test_exit_codes_of_the_real_process(model: str, code: int) -> None:
    """The codes reach the shell: 0 planned, 3 infeasible, 2 bad input."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'operator'}"}
    argv = [
        "plan",
        "--cluster",
        str(CLUSTERS / "pi-nuc-homelab.yaml"),
        "--model",
        str(MODELS / model),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "llmpipe_cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == code, done.stderr
    assert ("llmpipe plan:" in done.stderr) == (code != 0)


def test_profile_of_a_gguf_file_is_that_of_its_dequantized_weights(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from llmpipe_stage import gguf_convert
    from tests.support import gguf_files

    tensors = gguf_files.random_tensors(tied=True)
    path = gguf_files.write_gguf(tmp_path / "tiny.Q8_0.gguf", tensors, quant="Q8_0")
    for dtype in ("float32", "bfloat16"):
        converted = tmp_path / dtype
        gguf_convert.convert(path, converted, dtype=dtype)
        code, out, err = run(capsys, "profile", str(path), "--dtype", dtype)
        assert code == 0, err
        assert f"dequantized to {dtype}" in err and "quantized" in err
        code, expected, _ = run(capsys, "profile", str(converted))
        gguf_profile, dir_profile = json.loads(out), json.loads(expected)
        # exact: the same byte sizes as the converted safetensors headers
        for key in ("layerBytes", "embedBytes", "headBytes", "kvBytesPerTokenPerLayer"):
            assert gguf_profile[key] == dir_profile[key], (dtype, key)
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    code, _, err = run(capsys, "profile", str(tmp_path / "broken.gguf"))
    assert code == plan_cli.EXIT_BAD_INPUT and "broken.gguf" in err


def test_live_cluster_flags_say_what_is_wrong(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, "plan", "--cluster", JETSON, "--model", LLAMA2, "--selector", "a=b")
    assert code == 2 and "--selector applies to --kubeconfig" in err
    missing = tmp_path / "nowhere.yaml"
    code, _, err = run(capsys, "plan", "--kubeconfig", str(missing), "--model", LLAMA2)
    assert code == 2 and str(missing) in err
    code, _, err = run(capsys, "plan", "--model", LLAMA2)
    assert code == 2 and "--cluster" in err and "--kubeconfig" in err


TINYLLAMA = str(MODELS / "TinyLlama-1.1B" / "config.json")
"""Llama-2's tokenizer and vocabulary: a draft model for it."""


def test_a_draft_model_is_planned_into_stage_0s_memory_and_shown(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ("--cluster", JETSON, "--model", LLAMA2, "--draft-model", TINYLLAMA)
    data = json.loads(plan_json(capsys, *argv))
    config = json.loads(Path(TINYLLAMA).read_text())
    draft = profiles.from_config(config, dtype="bfloat16")  # stage 0's 2 bytes under auto
    workload = planner.Workload()  # the CLI's defaults: 4 sequences of 2,048 tokens
    expected = draft.total_weight_bytes + (
        workload.kv_tokens * draft.kv_bytes_per_token_per_layer * draft.num_layers
    )
    first, *rest = data["stages"]
    assert first["draftMemoryBytes"] == expected
    assert all("draftMemoryBytes" not in s for s in rest)
    model = modelfiles.load_profile(Path(LLAMA2))
    assert first["memoryBytes"] == (
        cost.memory_bytes(model, workload, 0, first["layerEnd"]) + expected
    )
    code, out, err = run(capsys, "plan", *argv)
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("0 "))
    assert "embed+draft" in row
    assert f"draft model on stage 0: {cost.human_bytes(expected)} of its memory" in out


def test_a_draft_model_too_large_for_stage_0_is_named(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    small = {
        "nodes": [
            {"name": f"pi-{i}", "tier": "edge", "memory": "3Gi", "tflops": 0.1,
             "memoryBandwidthGBps": 4, "uplinkMbps": 100}
            for i in range(4)
        ]
    }  # fmt: skip
    cluster = tmp_path / "pis.yaml"
    cluster.write_text(yaml.safe_dump(small))
    code, out, err = run(
        capsys, "plan", "--cluster", str(cluster), "--model", TINYLLAMA, "--draft-model", LLAMA2
    )
    assert (code, out) == (plan_cli.EXIT_INFEASIBLE, "")
    assert "for stage 0's draft model (weights + KV cache)" in err
