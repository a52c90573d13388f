"""scripts/build-k8s-tools: one builder per cache key at a time (run for real, no Go build:
the test holds the lock itself and makes the finished directory a builder would leave)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "build-k8s-tools"


def key_dir(cache: Path) -> Path:
    """The directory the script would build into for this checkout (from --dir's message)."""
    env = dict(os.environ, LLMPIPE_CACHE=str(cache))
    result = subprocess.run(
        [str(SCRIPT), "--dir"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 3, result.stderr
    # "not built yet (no <dir>/bin); run scripts/build-k8s-tools"
    return Path(result.stderr.split("(no ")[1].split(")")[0]).parent


def test_a_second_run_waits_for_the_running_build_and_uses_its_result(tmp_path: Path) -> None:
    if subprocess.run(["bash", "-c", "command -v go flock"], capture_output=True).returncode:
        pytest.skip("needs go and flock on PATH (the script checks for Go first)")
    built = key_dir(tmp_path)
    lock = built.parent / f".{built.name}.lock"
    built.parent.mkdir(parents=True)
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)

        def finish_build() -> None:
            time.sleep(2)
            (built / "bin").mkdir(parents=True)
            fcntl.flock(held, fcntl.LOCK_UN)

        builder = threading.Thread(target=finish_build)
        builder.start()
        started = time.monotonic()
        result = subprocess.run(
            [str(SCRIPT), "--env"],
            env=dict(os.environ, LLMPIPE_CACHE=str(tmp_path)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        waited = time.monotonic() - started
        builder.join()
    assert result.returncode == 0, result.stderr
    assert "another build" in result.stderr and "waiting for it" in result.stderr
    assert result.stdout.strip() == f"export LLMPIPE_K8S_BIN={built / 'bin'}"
    assert waited >= 1.5, "the second run answered before the first build finished"
    assert not (built.parent / f"{built.name}.partial").exists(), "it built beside the first"
