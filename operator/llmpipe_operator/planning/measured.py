"""Measured node facts: the `llmpipe.io/measured` annotation and the rule that merges it.

The node probe (`llmpipe_stage.probe`, the chart's opt-in DaemonSet) measures what a node
offers; the operator writes the figures to the Node as `llmpipe.io/measured` (JSON) and the
measured links into `llmpipe.io/links`. This module owns that format and the decisions
around it, as pure functions:

- `parse` reads the annotation; a malformed one is ignored with a note, never fatal;
- `fact` applies the rule **labels win, measurement fills gaps**: a `llmpipe.io/*` label a
  person set is what the planner uses even when a measurement disagrees; an unlabelled
  fact takes the measurement; with neither, the conservative default of `planning.live`;
- `worth_writing` keeps noise out: new figures replace the written ones only when a figure
  moved by more than the margin (the re-plan margin by default), so a re-measurement that
  finds the same node does not rewrite the Node (which would wake the re-planner);
- `merge_links` writes measured links into `llmpipe.io/links` without overwriting a
  person's entries (an entry is the operator's only when it equals what the operator
  wrote last time, recorded in the measured annotation's `links`);
- `pair_rounds` orders the pairwise link measurements: rounds of disjoint pairs (circle
  method), each pair once, so a caller that measures a round at once never loads one node
  with two transfers, and a caller that measures one pair at a time (the default) covers
  every pair in n(n-1)/2 steps.

No I/O, no clock: times are parameters.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from llmpipe_operator.planning import inventory

ANNOTATION_MEASURED = "llmpipe.io/measured"
FORMAT_VERSION = 1

MEASURED_FIELDS: Mapping[str, str] = {
    "tflops": "llmpipe.io/tflops",
    "memoryBandwidthGBps": "llmpipe.io/memory-bandwidth-gbps",
}
"""Measured figure -> the label a person may set instead (which then wins)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Measured:
    """One node's measured figures (those present and positive)."""

    figures: Mapping[str, float]
    """`tflops`, `memoryBandwidthGBps` (the keys of MEASURED_FIELDS)."""
    links: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)
    """peer -> {mbps, rttMs}: what the operator last wrote into `llmpipe.io/links`."""
    measured_at: str = ""
    probe_version: str = ""
    timings: inventory.Timings | None = None
    """The fixed costs (probe version 2 and later; `inventory.TIMING_FIELDS`): no label
    stands for them, so a measurement is all the planner has besides the default."""


EMPTY = Measured(figures={})


def parse(text: str | None) -> tuple[Measured, str | None]:
    """(the figures, a note when the annotation is malformed and was ignored)."""
    if not text:
        return EMPTY, None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        return EMPTY, f"annotation {ANNOTATION_MEASURED} is not JSON ({error.msg}); ignored"
    if not isinstance(data, Mapping):
        return EMPTY, f"annotation {ANNOTATION_MEASURED} must be a JSON object; ignored"
    figures = {key: float(data[key]) for key in MEASURED_FIELDS if positive(data.get(key))}
    timings, _ = inventory.read_timings(data)  # an unusable figure is left out
    links = {
        str(peer): {"mbps": float(f["mbps"]), "rttMs": float(f.get("rttMs", 0))}
        for peer, f in (data.get("links") or {}).items()
        if isinstance(f, Mapping) and positive(f.get("mbps"))
    }
    return (
        Measured(
            figures=figures,
            links=links,
            measured_at=str(data.get("measuredAt", "")),
            probe_version=str(data.get("probeVersion", "")),
            timings=timings,
        ),
        None,
    )


def fact(labels: Mapping[str, str], measured: Measured, key: str) -> str | float | None:
    """The raw value the planner uses for `key` (a MEASURED_FIELDS key): the label's text
    when a person set it (labels win), else the measured figure, else None (the default)."""
    label = MEASURED_FIELDS[key]
    if label in labels:
        return labels[label]
    return measured.figures.get(key)


def render(
    facts: Mapping[str, Any], *, links: Mapping[str, Mapping[str, float]] | None = None
) -> str:
    """The annotation's JSON from a probe's facts (`GET /facts`) and the links written."""
    body: dict[str, Any] = {"version": FORMAT_VERSION}
    keys = ("probeVersion", "measuredAt", "device", "dtype", "tflops", "memoryBandwidthGBps")
    for key in (*keys, *inventory.TIMING_FIELDS, inventory.PRODUCTS_FIELD):
        if key in facts:
            body[key] = facts[key]
    if "method" in facts:
        body["method"] = facts["method"]
    if links:
        body["links"] = {peer: dict(v) for peer, v in sorted(links.items())}
    return json.dumps(body, sort_keys=True)


def worth_writing(old: Measured, new: Mapping[str, Any], *, margin: float) -> bool:
    """True when `new` (a probe's facts) has a figure `old` lacks, or one that moved by more
    than `margin` (relative): smaller moves are measurement noise, not a changed node."""
    for key in MEASURED_FIELDS:
        value = new.get(key)
        if not isinstance(value, int | float) or not positive(value):
            continue
        before = old.figures.get(key)
        if before is None or abs(float(value) - before) > margin * before:
            return True
    return _timings_moved(old.timings, new, margin=margin)


def _timings_moved(old: inventory.Timings | None, new: Mapping[str, Any], *, margin: float) -> bool:
    """A fixed cost new or moved beyond `margin` (the product curve follows the compute
    figure, measured with it, so it is not compared on its own)."""
    for key, field in inventory.TIMING_FIELDS.items():
        value = new.get(key)
        if value is None or not positive(value):
            continue
        before = None if old is None else getattr(old, field)
        if not before or abs(float(value) - before) > margin * before:
            return True
    return False


def link_moved(old: Mapping[str, float] | None, new: Mapping[str, float], *, margin: float) -> bool:
    """A measured link worth rewriting: new, or its rate moved by more than `margin`."""
    if old is None:
        return True
    return abs(new["mbps"] - old["mbps"]) > margin * old["mbps"]


def merge_links(
    annotation: str | None,
    *,
    written_before: Mapping[str, Mapping[str, float]],
    measured: Mapping[str, Mapping[str, float]],
) -> dict[str, dict[str, float]]:
    """The `llmpipe.io/links` content after writing `measured` (peer -> {mbps, rttMs}).

    A person's entry stays (labels win): an entry is the operator's own only while it
    equals what the operator wrote last time (`written_before`). A malformed annotation is
    a person's too and stays untouched: the caller then writes nothing.
    """
    current = _links_of(annotation)
    merged = {peer: dict(v) for peer, v in current.items()}
    for peer, value in measured.items():
        existing = current.get(peer)
        if existing is None or _same(existing, written_before.get(peer)):
            merged[peer] = {"mbps": value["mbps"], "rttMs": value["rttMs"]}
    return merged


def person_links(
    annotation: str | None, *, written_before: Mapping[str, Mapping[str, float]]
) -> frozenset[str]:
    """Peers whose `llmpipe.io/links` entry a person set (not what the operator wrote)."""
    return frozenset(
        peer
        for peer, value in _links_of(annotation).items()
        if not _same(value, written_before.get(peer))
    )


def _links_of(annotation: str | None) -> dict[str, dict[str, float]]:
    if not annotation:
        return {}
    try:
        data = json.loads(annotation)
    except json.JSONDecodeError as error:
        raise ValueError(f"llmpipe.io/links is not JSON ({error.msg})") from error
    if not isinstance(data, Mapping):
        raise ValueError("llmpipe.io/links must be a JSON object")
    return {str(p): dict(v) for p, v in data.items() if isinstance(v, Mapping)}


def _same(a: Mapping[str, Any], b: Mapping[str, Any] | None) -> bool:
    if b is None:
        return False
    return all(
        math.isclose(float(a.get(k, 0)), float(b.get(k, 0)), rel_tol=1e-9)
        for k in ("mbps", "rttMs")
    )


def pair_rounds(names: Sequence[str]) -> list[list[tuple[str, str]]]:
    """Every unordered pair once, in rounds of pairs that share no node (circle method):
    n - 1 rounds for even n, n for odd n."""
    players: list[str | None] = [*sorted(names)]
    if len(players) < 2:
        return []
    if len(players) % 2:
        players.append(None)
    count = len(players)
    rounds = []
    for _ in range(count - 1):
        pairs = [(players[i], players[count - 1 - i]) for i in range(count // 2)]
        rounds.append([(a, b) if a < b else (b, a) for a, b in pairs if a and b])
        players = [players[0], players[-1], *players[1:-1]]
    return rounds


def positive(value: Any) -> bool:
    """A finite number > 0 (not a bool): what a figure must be to be used."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def node_annotations(
    node: Mapping[str, Any],
    *,
    facts: Mapping[str, Any] | None,
    links: Mapping[str, Mapping[str, float]],
    margin: float,
) -> dict[str, str] | None:
    """The annotations to write on `node` (a Node object) after a probe round, or None
    when nothing moved beyond `margin`.

    `facts` is the node's probe's `GET /facts` (None when its probe did not answer: the
    written figures stay); `links` the links measured from or to it this round.
    """
    annotations = (node.get("metadata") or {}).get("annotations") or {}
    old, note = parse(annotations.get(ANNOTATION_MEASURED))
    moved = {
        peer: dict(value)
        for peer, value in links.items()
        if link_moved(old.links.get(peer), value, margin=margin)
    }
    new_facts = facts is not None and (note is not None or worth_writing(old, facts, margin=margin))
    if not new_facts and not moved:
        return None
    kept = {
        **{key: old.figures[key] for key in old.figures},
        **inventory.timings_dict(old.timings),
    }
    base: dict[str, Any] = (
        dict(facts)
        if new_facts and facts is not None
        else {"probeVersion": old.probe_version, "measuredAt": old.measured_at, **kept}
    )
    written = {**{p: dict(v) for p, v in old.links.items()}, **moved}
    out = {ANNOTATION_MEASURED: render(base, links=written)}
    if moved:
        try:
            merged = merge_links(
                annotations.get(LINKS_ANNOTATION), written_before=old.links, measured=moved
            )
        except ValueError:
            return out  # a person's malformed links annotation: theirs to fix, left alone
        out[LINKS_ANNOTATION] = json.dumps(merged, sort_keys=True)
    return out


LINKS_ANNOTATION = "llmpipe.io/links"
"""The links annotation `planning.live` reads (a person's or the operator's entries)."""
