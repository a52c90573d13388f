"""The README keeps its promises: the two Quickstart commands, links that resolve, values
that exist.

Covers: the Quickstart block holds exactly `make serve` and `make test`; every relative
link points to a file in the repository; every chart value the Configuration table names
is a key of values.yaml, and every top-level key of values.yaml is in the table; the image
tags in the README's docker commands are the chart's defaults.
"""

from __future__ import annotations

import re

import yaml

from tests.unit.helm.conftest import CHART, ROOT

README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.DOTALL | re.MULTILINE)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def test_quickstart_is_exactly_the_two_commands() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", _section("Quickstart"), re.DOTALL)
    assert len(blocks) == 1
    commands = [line.split("#")[0].strip() for line in blocks[0].splitlines()]
    assert commands == ["make serve", "make test"]


def test_relative_links_resolve() -> None:
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, "expected links to docs/"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert missing == [], f"README links to missing files: {missing}"


def test_configuration_table_matches_values() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    table = _section("Configuration")
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    named = set()
    for cell in rows:
        for name in re.findall(r"`([^`]+)`", cell):
            if name.startswith("."):
                continue  # `.name` continues the previous path, e.g. serviceAccount.name
            named.add(name.split(".")[0].rstrip("*"))
    assert named <= set(values), f"README names unknown values: {named - set(values)}"
    undocumented = set(values) - named - {"nameOverride", "fullnameOverride"}
    assert undocumented == set(), f"values missing from the README table: {undocumented}"


def test_docker_tags_are_the_chart_defaults() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    operator_tag = f"{values['image']['repository']}:{chart['appVersion']}"
    assert f"docker build --target operator -t {operator_tag} ." in README
    assert f"ghcr.io/llmpipe/llmpipe-stage:{chart['appVersion']}" in README
