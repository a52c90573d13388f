"""`llmpipe serve`'s pipeline.json: the workload flags reach it the way the stage parses
them (the launcher parses what it wrote with the stage's own parser)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmpipe_cli import launcher
from llmpipe_stage import config as stage_config


def written(tmp_path: Path, *flags: str) -> dict[str, object]:
    args = launcher.parse_args(["--stages", "2", "--prefill-chunk", "32", *flags])
    config_dir = launcher.write_config(tmp_path, stage_config.even_plan(4, 2), args, name="m")
    return dict(json.loads((config_dir / "pipeline.json").read_text())["workload"])


def test_prompt_tokens_in_flight_are_the_stages_default_unless_given(tmp_path: Path) -> None:
    assert "prefillTokensInFlight" not in written(tmp_path)
    assert written(tmp_path, "--prefill-in-flight", "0")["prefillTokensInFlight"] == 0
    assert written(tmp_path, "--prefill-in-flight", "96")["prefillTokensInFlight"] == 96
    with pytest.raises(stage_config.ConfigError, match="prefillTokensInFlight must be >= 0"):
        written(tmp_path, "--prefill-in-flight", "-5")


def test_draft_speculation_needs_a_draft_model_and_only_stage_0_gets_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        launcher.parse_args(["--speculate", "draft"])
    assert "--speculate draft needs --draft-model PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launcher.parse_args(["--draft-model", str(tmp_path)])
    assert "--draft-model is used only with --speculate draft" in capsys.readouterr().err
    args = launcher.parse_args(["--speculate", "draft", "--draft-model", str(tmp_path)])
    with pytest.raises(launcher.LaunchError, match=r"neither a \.gguf file nor a directory"):
        launcher.resolve_draft_model(args)
    (tmp_path / "config.json").write_text("{}")
    args.draft_model_dir = launcher.resolve_draft_model(args)
    flags = ("--speculate", "draft", "--draft-model", str(tmp_path))
    assert written(tmp_path / "run", *flags)["speculation"] == "draft"
    commands = [
        launcher.stage_command(
            args, index=i, config_dir=tmp_path, model_dir=tmp_path, count=2, tls_dir=None
        )
        for i in range(2)
    ]
    assert commands[0][commands[0].index("--draft-model-dir") + 1] == str(tmp_path.resolve())
    assert "--draft-model-dir" not in commands[1]


def test_planning_over_a_cluster_puts_the_draft_model_on_stage_0(tmp_path: Path) -> None:
    from llmpipe_operator.planning import cost, profiles
    from tests.support.models import TINY_DRAFT_CONFIG, TINY_LLAMA_CONFIG

    draft_dir = tmp_path / "draft"
    draft_dir.mkdir()
    (draft_dir / "config.json").write_text(json.dumps(TINY_DRAFT_CONFIG))
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        json.dumps({"nodes": [{"name": "a", "tier": "edge", "memory": "4Gi", "tflops": 1.0,
                               "memoryBandwidthGBps": 50, "uplinkMbps": 1000}]})
    )  # fmt: skip
    flags = ["--cluster", str(cluster), "--speculate", "draft", "--draft-model", str(draft_dir)]
    args = launcher.parse_args(flags)
    args.draft_model_dir = launcher.resolve_draft_model(args)
    plan = launcher.plan_for_cluster(args, dict(TINY_LLAMA_CONFIG))
    draft = profiles.from_config(TINY_DRAFT_CONFIG, dtype=args.dtype)
    workload = cost.Workload(max_sequences=args.max_sequences, max_context_tokens=args.max_context)
    assert plan["stages"][0]["draftMemoryBytes"] == cost.draft_bytes(draft, workload)


def test_speculation_is_auto_unless_given(tmp_path: Path) -> None:
    """`llmpipe serve` writes `auto` by default (prompt lookup for greedy requests), and
    the stage's own parser reads it back; `--speculate off` turns it off."""
    workload = written(tmp_path / "default")
    assert workload["speculation"] == "auto"
    assert written(tmp_path / "off", "--speculate", "off")["speculation"] == "off"
    assert written(tmp_path / "ngram", "--speculate", "ngram")["speculation"] == "ngram"
