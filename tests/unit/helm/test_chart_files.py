"""The chart's files agree with their sources: the CRD copy, the values schema, the image tags.

Covers: helm/llmpipe/crds/ is byte-identical to crds/; every key in values.yaml is described
by values.schema.json (and values.yaml itself satisfies the schema's types and enums); the
chart's appVersion is the tag of the default runtime profile's stage image (the chart's
`policy` values, which the operator's built-in default policy repeats), so the images built as
the README says are the ones a default pipeline and a default install use.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from llmpipe_operator import policy
from tests.unit.helm.conftest import CHART, ROOT


def test_chart_crd_copy_is_identical_to_the_source() -> None:
    source = ROOT / "crds" / "llmpipeline.yaml"
    copy = CHART / "crds" / "llmpipeline.yaml"
    assert copy.read_bytes() == source.read_bytes(), (
        "helm/llmpipe/crds/llmpipeline.yaml differs from crds/llmpipeline.yaml: "
        "cp crds/llmpipeline.yaml helm/llmpipe/crds/"
    )


def test_chart_carries_only_the_crd_in_crds_dir() -> None:
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == ["llmpipeline.yaml"]


def _schema_paths(schema: dict[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for key, sub in schema.get("properties", {}).items():
        path = f"{prefix}{key}"
        paths.add(path)
        paths |= _schema_paths(sub, f"{path}.")
    return paths


def _value_paths(values: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> set[str]:
    """Keys of values.yaml, descending only where the schema describes sub-keys."""
    paths = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        paths.add(path)
        sub = schema.get("properties", {}).get(key, {})
        if isinstance(value, dict) and "properties" in sub:
            paths |= _value_paths(value, sub, f"{path}.")
    return paths


def _load_values_and_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    return values, schema


def test_every_value_is_described_by_the_schema() -> None:
    values, schema = _load_values_and_schema()
    missing = _value_paths(values, schema) - _schema_paths(schema)
    assert not missing, f"values.yaml keys without a schema entry: {sorted(missing)}"


def test_every_schema_entry_has_a_default_in_values() -> None:
    values, schema = _load_values_and_schema()
    # `global` is Helm's own key for subcharts; it has no default of ours.
    stale = _schema_paths(schema) - _value_paths(values, schema) - {"global"}
    assert not stale, f"schema entries with no default in values.yaml: {sorted(stale)}"


def test_schema_forbids_unknown_top_level_values() -> None:
    _, schema = _load_values_and_schema()
    assert schema["additionalProperties"] is False


def _check_types(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    names = {"string": str, "boolean": bool, "integer": int, "array": list, "object": dict}
    problems = []
    expected = schema.get("type")
    if expected in names and not isinstance(value, names[expected]):
        problems.append(f"{path}: {value!r} is not {expected}")
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{path}: {value!r} not in {schema['enum']}")
    if isinstance(value, dict):
        for key, sub in value.items():
            if key in schema.get("properties", {}):
                problems += _check_types(sub, schema["properties"][key], f"{path}.{key}")
    return problems


def test_default_values_satisfy_the_schema_types() -> None:
    values, schema = _load_values_and_schema()
    assert _check_types(values, schema, "values") == []


def test_app_version_is_the_default_stage_image_tag() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values, _ = _load_values_and_schema()
    default = values["policy"]["defaultProfile"]
    stage_image = values["policy"]["runtimeProfiles"][default]["image"]
    assert stage_image == policy.PROJECT_STAGE_IMAGE
    assert stage_image.rsplit(":", 1)[1] == chart["appVersion"], (
        f"default profile's stage image {stage_image} and chart appVersion "
        f"{chart['appVersion']} disagree: the README's docker build tags would not match"
    )


def test_operator_image_lives_next_to_the_stage_image() -> None:
    values, _ = _load_values_and_schema()
    crd_text = (ROOT / "crds" / "llmpipeline.yaml").read_text()
    registry = values["image"]["repository"].rsplit("/", 1)[0]
    assert f"{registry}/llmpipe-stage:" in crd_text


def test_chart_has_no_stray_files() -> None:
    # Everything in the chart directory is packaged; a stray file ships to users.
    allowed = {
        ".helmignore",
        "Chart.yaml",
        "values.yaml",
        "values.schema.json",
        "crds",
        "templates",
    }
    present = {p.name for p in CHART.iterdir()}
    assert present <= allowed, f"unexpected files in the chart: {sorted(present - allowed)}"
