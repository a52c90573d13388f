"""The Argo CD health check in docs/argocd.md, run in Lua 5.1 against LLMPipeline statuses.

Covers: the script is taken verbatim from the doc's argocd-cm example; no status, a stale
observedGeneration, each phase, and Planned=False (InsufficientMemory) map to the health the
doc's table promises. Needs a Lua 5.1 interpreter (`apt-get install lua5.1`), the dialect of
Argo CD's gopher-lua; skipped without one.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from tests.unit.helm.conftest import ROOT

KEY = "resource.customizations.health.llmpipe.io_LLMPipeline"


def _script() -> str:
    text = (ROOT / "docs" / "argocd.md").read_text()
    for block in re.findall(r"```yaml\n(.*?)```", text, re.DOTALL):
        doc = yaml.safe_load(block)
        if doc.get("kind") == "ConfigMap":
            return str(doc["data"][KEY])
    raise AssertionError("docs/argocd.md has no argocd-cm example")


def _lua(value: Any) -> str:
    """A Python value as a Lua table constructor (what Argo CD hands the script as `obj`)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{_lua(k)}] = {_lua(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "{" + ", ".join(_lua(v) for v in value) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)  # a JSON string literal is a valid Lua string literal here


@pytest.fixture(scope="module")
def lua() -> str:
    path = shutil.which("lua5.1")
    if path is None:
        pytest.skip("lua5.1 not installed (apt-get install lua5.1)")
    return path


def _health(lua: str, obj: dict[str, Any]) -> tuple[str, str]:
    program = (
        f"local obj = {_lua(obj)}\n"
        f"local function check(obj)\n{_script()}\nend\n"
        "local hs = check(obj)\n"
        'io.write(hs.status, "\\n", hs.message)\n'
    )
    done = subprocess.run(
        [lua, "-"], input=program, capture_output=True, text=True, check=False, timeout=10
    )
    assert done.returncode == 0, done.stderr
    status, message = done.stdout.split("\n", 1)
    return status, message


def _pipeline(generation: int = 2, **status: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {"name": "p", "generation": generation}}
    if status:
        obj["status"] = {"observedGeneration": 2, **status}
    return obj


def _condition(kind: str, status: str, reason: str, message: str) -> dict[str, str]:
    return {"type": kind, "status": status, "reason": reason, "message": message}


def test_no_status_is_progressing(lua: str) -> None:
    assert _health(lua, _pipeline())[0] == "Progressing"


def test_stale_generation_is_progressing_even_if_ready(lua: str) -> None:
    status, message = _health(lua, _pipeline(generation=3, phase="Ready"))
    assert status == "Progressing" and "generation 3" in message


def test_ready_is_healthy_with_endpoint(lua: str) -> None:
    status, message = _health(
        lua, _pipeline(phase="Ready", ready="3/3", endpoint="http://p.default.svc:8000")
    )
    assert status == "Healthy"
    assert message == "Ready (3/3 stages ready), serving at http://p.default.svc:8000"


phases = pytest.mark.parametrize("phase", ["Pending", "Planning", "Deploying"])


@phases
def test_rollout_phases_are_progressing(lua: str, phase: str) -> None:
    status, message = _health(lua, _pipeline(phase=phase, ready="1/3"))
    assert (status, message) == ("Progressing", f"{phase} (1/3 stages ready)")


def test_infeasible_plan_is_degraded_naming_the_shortfall(lua: str) -> None:
    planned = _condition(
        "Planned", "False", "InsufficientMemory", "stage memory short by 2.1 GiB on jetson-1"
    )
    status, message = _health(lua, _pipeline(phase="Failed", conditions=[planned]))
    assert status == "Degraded"
    assert message == "InsufficientMemory: stage memory short by 2.1 GiB on jetson-1"


def test_degraded_phase_reports_the_degraded_condition(lua: str) -> None:
    conditions = [
        _condition("Planned", "True", "Planned", "3 stages"),
        _condition("Degraded", "True", "NodeLost", "node gpu-1 is NotReady"),
    ]
    status, message = _health(lua, _pipeline(phase="Degraded", conditions=conditions))
    assert (status, message) == ("Degraded", "Degraded: NodeLost: node gpu-1 is NotReady")


def test_unknown_phase_is_unknown(lua: str) -> None:
    assert _health(lua, _pipeline(phase="Exploded"))[0] == "Unknown"
