"""The `llmpipe plan` outputs recorded in README.md and docs/planning.md are what the
command prints today: each console block that starts with `$ llmpipe plan` is run from
the checkout (the planner is pure, so its output is exact) and compared line by line."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[3]
BLOCK = re.compile(r"```console\n(\$ llmpipe plan .*?)```", re.DOTALL)


def recorded() -> list[tuple[str, str, str]]:
    """(where, command line, recorded output) for every recorded `llmpipe plan` run."""
    runs = []
    for doc in ("README.md", "docs/planning.md"):
        text = (ROOT / doc).read_text()
        for match in BLOCK.finditer(text):
            lines = match.group(1).splitlines()
            command = lines.pop(0).removeprefix("$ ")
            while command.endswith("\\"):
                command = command[:-1] + lines.pop(0).strip()
            line = text.count("\n", 0, match.start()) + 2
            runs.append((f"{doc}:{line}", command, "\n".join(lines)))
    return runs


RUNS = recorded()


def test_the_docs_record_plan_runs() -> None:
    assert len(RUNS) >= 3, RUNS


@pytest.mark.parametrize(("where", "command", "output"), RUNS, ids=[r[0] for r in RUNS])
def test_recorded_plan_output_is_what_the_command_prints(
    where: str, command: str, output: str
) -> None:
    argv = shlex.split(command)[2:]  # after "llmpipe plan"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'operator'}:{ROOT / 'stage_image'}")
    result = subprocess.run(
        [sys.executable, "-m", "llmpipe_cli", "plan", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    printed = (result.stdout + result.stderr).rstrip("\n").splitlines()
    expected = output.rstrip("\n").splitlines()
    assert printed == expected, f"{where}: rerun `{command}` and record its output"
