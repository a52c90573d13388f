"""docs/crd-reference.md is exactly what scripts/gen-crd-docs prints from the CRD.

Covers: the committed reference is in sync with crds/llmpipeline.yaml; the generator lists
every spec field of the schema (so a field cannot be silently dropped), the printer columns
and the CEL rules' messages.
"""

from __future__ import annotations

import runpy
from typing import Any

import yaml

from tests.unit.helm.conftest import ROOT

GENERATOR = runpy.run_path(str(ROOT / "scripts" / "gen-crd-docs"))
CRD = yaml.safe_load((ROOT / "crds" / "llmpipeline.yaml").read_text())
VERSION = CRD["spec"]["versions"][0]


def test_committed_reference_matches_the_crd() -> None:
    expected = GENERATOR["render"](CRD)
    actual = (ROOT / "docs" / "crd-reference.md").read_text()
    assert actual == expected, "docs/crd-reference.md is out of date: run scripts/gen-crd-docs"


def _field_paths(schema: dict[str, Any], prefix: str) -> list[str]:
    paths = [prefix]
    for name, sub in schema.get("properties", {}).items():
        paths += _field_paths(sub, f"{prefix}.{name}")
    items = schema.get("items", {})
    if "properties" in items:
        paths += _field_paths(items, f"{prefix}[]")
    return paths


def test_reference_lists_every_spec_field() -> None:
    text = GENERATOR["render"](CRD)
    spec = VERSION["schema"]["openAPIV3Schema"]["properties"]["spec"]
    missing = [p for p in _field_paths(spec, "spec") if f"| `{p}` |" not in text]
    assert missing == []


def test_reference_lists_printer_columns_and_rule_messages() -> None:
    text = GENERATOR["render"](CRD)
    for column in VERSION["additionalPrinterColumns"]:
        assert f"| {column['name']} |" in text
    assert "model.source must set exactly one of pvc, hostPath, huggingFace or gguf" in text


def test_generator_escapes_pipes_in_table_cells() -> None:
    schema = {"type": "string", "description": "a | b", "enum": ["x"]}
    rows = list(GENERATOR["_rows"]("spec.f", schema, True))
    assert rows == ["| `spec.f` | string | yes |  | one of `x` | a \\| b |"]
