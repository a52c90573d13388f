"""The import-linter contracts in pyproject.toml cover every module of every package: each
module is named in at least one contract (itself or a package above it, below the top
level), so no module sits outside the layers unnoticed; and every name a contract lists is
a module that exists (a renamed module cannot leave a contract guarding nothing)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = {
    "llmpipe_operator": ROOT / "operator" / "llmpipe_operator",
    "llmpipe_stage": ROOT / "stage_image" / "llmpipe_stage",
    "llmpipe_cli": ROOT / "llmpipe_cli",
    "llmpipe_common": ROOT / "llmpipe_common",
}
WHOLE = {"llmpipe_common"}
"""Packages a contract may cover as a whole (one role, all of it pure)."""


def contracts() -> list[dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert set(config["root_packages"]) == set(PACKAGES)
    return list(config["contracts"])


def named(contract: dict) -> set[str]:
    names = set(contract.get("source_modules", []))
    for layer in contract.get("layers", []):
        names |= {part.strip() for part in layer.split("|")}
    return names


def modules() -> set[str]:
    found = set()
    for package, directory in PACKAGES.items():
        for path in directory.rglob("*.py"):
            parts = path.relative_to(directory).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.add(".".join((package, *parts)))
    return found


def test_every_module_is_in_a_contract() -> None:
    names = set().union(*(named(c) for c in contracts()))
    uncovered = []
    for module in sorted(modules()):
        parts = module.split(".")
        ancestors = {".".join(parts[:n]) for n in range(2, len(parts) + 1)}
        if parts[0] in WHOLE:
            ancestors.add(parts[0])
        if len(parts) > 1 and not ancestors & names:
            uncovered.append(module)
    assert uncovered == []


def test_every_name_in_a_contract_exists() -> None:
    existing = modules()
    for contract in contracts():
        for name in named(contract) - set(PACKAGES):
            assert name in existing, f"{contract['name']!r} names {name}, which is not a module"
