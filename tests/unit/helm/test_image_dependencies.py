"""Each image installs every package its entry point imports, and the operator image no torch.

The images cannot be built here, so this checks what `pip install .[operator]` and
`pip install .[stage]` (the Dockerfile's two installs) would bring, against what the code
imports. Covers: starting from each entry point (`llmpipe_operator.__main__`,
`llmpipe_stage.__main__`, plus the operator's `llmpipe plan` CLI) and following first-party
imports (lazy ones inside functions too), every third-party module comes from a
distribution that the base dependencies plus that extra pull in (transitively, per the
installed metadata); and nothing reachable from the operator's entry points imports torch,
transformers or grpc.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
import tomllib
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import pytest

from tests.unit.helm.conftest import ROOT

FIRST_PARTY = {
    "llmpipe_operator": ROOT / "operator",
    "llmpipe_stage": ROOT / "stage_image",
    "llmpipe_cli": ROOT,
    "llmpipe_common": ROOT,
}
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _module_file(module: str) -> Path | None:
    base = FIRST_PARTY.get(module.split(".")[0])
    if base is None:
        return None
    path = base.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _imports(module: str, file: Path) -> Iterable[str]:
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            yield target
            # `from pkg import module` may name a submodule.
            yield from (f"{target}.{alias.name}" for alias in node.names)


def third_party_imports(entry: str) -> set[str]:
    """Top-level third-party modules reachable from `entry` through first-party imports."""
    seen: set[str] = set()
    todo = [entry]
    found: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        file = _module_file(module)
        if file is None:
            continue
        # A module's parent packages run first.
        todo += [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
        for name in _imports(module, file):
            top = name.split(".")[0]
            if top in FIRST_PARTY:
                todo.append(name)
            elif top and top not in sys.stdlib_module_names and top != "__future__":
                found.add(top)
    return found


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def installed_closure(requirements: Iterable[str]) -> set[str]:
    """Distribution names pip would install for these requirements (from installed metadata)."""
    todo = [_requirement_name(r) for r in requirements]
    closure: set[str] = set()
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_requirement_name(r) for r in requires if "extra ==" not in r]
    return closure


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    return dict(metadata.packages_distributions())


def _distributions(module: str) -> set[str]:
    names = _packages_distributions().get(module, [])
    return {n.lower().replace("_", "-") for n in names}


images = pytest.mark.parametrize(
    ("extra", "entries"),
    [
        ("operator", ["llmpipe_operator.__main__", "llmpipe_cli.plan"]),
        ("stage", ["llmpipe_stage.__main__"]),
    ],
    ids=["operator-image", "stage-image"],
)


@images
def test_image_installs_what_its_entry_points_import(extra: str, entries: list[str]) -> None:
    closure = installed_closure(
        [*PROJECT["dependencies"], *PROJECT["optional-dependencies"][extra]]
    )
    imported = set().union(*(third_party_imports(entry) for entry in entries))
    assert imported, "found no third-party imports: the scan is broken"
    missing = {m: _distributions(m) for m in imported if not (_distributions(m) & closure)}
    assert missing == {}, f"imported by the {extra} image but not installed by .[{extra}]"


def test_operator_entry_points_never_reach_torch() -> None:
    imported = third_party_imports("llmpipe_operator.__main__") | third_party_imports(
        "llmpipe_cli.plan"
    )
    assert not imported & {"torch", "transformers", "grpc", "safetensors"}


def test_scan_follows_first_party_imports() -> None:
    # The stage's entry point reaches torch only through its server module.
    assert "torch" in third_party_imports("llmpipe_stage.__main__")
    assert "kopf" in third_party_imports("llmpipe_operator.__main__")
