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
