"""Measured node facts: the `llmpipe.io/measured` format and the rules around it.

Covers: labels win over measurements and measurements fill the gaps (and defaults the
rest) when live Nodes become the planner's inventory; a malformed annotation is a note,
never an error; re-measurements within the margin are not written; measured links never
overwrite a person's `llmpipe.io/links` entry but replace the operator's own; the pair
schedule covers every pair once in rounds of disjoint pairs.
"""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmpipe_operator.planning import live, measured
from tests.unit.live.test_live_inventory import a_node

ALL = live.Eligibility()


def with_measured(builder, **figures):
    builder.obj["metadata"]["annotations"][measured.ANNOTATION_MEASURED] = json.dumps(
        {"version": 1, "probeVersion": "1", **figures}
    )
    return builder


def test_measurement_fills_a_gap_and_labels_win() -> None:
    measured_only = with_measured(a_node("m"), tflops=0.25, memoryBandwidthGBps=12.5)
    labelled = with_measured(
        a_node("l").label(live.LABEL_TFLOPS, "3"), tflops=0.25, memoryBandwidthGBps=12.5
    )
    nodes = {
        n.name: n
        for n in live.build_inventory(
            [measured_only.obj, labelled.obj, a_node("d").obj], eligibility=ALL
        ).inventory.nodes
    }
    assert (nodes["m"].tflops, nodes["m"].memory_bandwidth_gbps) == (0.25, 12.5)
    assert (nodes["l"].tflops, nodes["l"].memory_bandwidth_gbps) == (3.0, 12.5)
    defaults = live.NodeDefaults()
    assert (nodes["d"].tflops, nodes["d"].memory_bandwidth_gbps) == (
        defaults.tflops,
        defaults.memory_bandwidth_gbps,
    )


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_a_malformed_annotation_is_a_note_and_defaults_apply(text: str) -> None:
    node = a_node("x")
    node.obj["metadata"]["annotations"][measured.ANNOTATION_MEASURED] = text
    found = live.build_inventory([node.obj], eligibility=ALL)
    assert found.inventory.nodes[0].tflops == live.NodeDefaults().tflops
    assert any(measured.ANNOTATION_MEASURED in note for note in found.notes)


def test_nonpositive_figures_are_not_facts() -> None:
    figures, note = measured.parse(json.dumps({"tflops": 0, "memoryBandwidthGBps": -1}))
    assert note is None and figures.figures == {}


def test_labels_and_measured_fields_name_the_same_keys() -> None:
    assert measured.MEASURED_FIELDS == {
        "tflops": live.LABEL_TFLOPS,
        "memoryBandwidthGBps": live.LABEL_BANDWIDTH,
    }


def test_only_moves_beyond_the_margin_are_written() -> None:
    old, _ = measured.parse(json.dumps({"tflops": 1.0, "memoryBandwidthGBps": 50.0}))
    assert not measured.worth_writing(old, {"tflops": 1.05, "memoryBandwidthGBps": 48}, margin=0.1)
    assert measured.worth_writing(old, {"tflops": 0.8, "memoryBandwidthGBps": 50}, margin=0.1)
    assert measured.worth_writing(measured.EMPTY, {"tflops": 1.0}, margin=0.1)


def test_render_round_trips_through_parse() -> None:
    facts = {"probeVersion": "1", "measuredAt": "t", "tflops": 0.5, "memoryBandwidthGBps": 9.0}
    links = {"b": {"mbps": 90.0, "rttMs": 1.5}}
    figures, note = measured.parse(measured.render(facts, links=links))
    assert note is None
    assert figures.figures == {"tflops": 0.5, "memoryBandwidthGBps": 9.0}
    assert figures.links == links and figures.measured_at == "t"


def test_measured_links_keep_a_persons_entries() -> None:
    person = {"b": {"mbps": 40, "rttMs": 35}, "c": {"mbps": 100, "rttMs": 1}}
    written_before = {"c": {"mbps": 100, "rttMs": 1}}  # c is the operator's own entry
    merged = measured.merge_links(
        json.dumps(person),
        written_before=written_before,
        measured={
            "b": {"mbps": 900, "rttMs": 0.5},
            "c": {"mbps": 80, "rttMs": 2},
            "d": {"mbps": 5, "rttMs": 9},
        },
    )
    assert merged == {
        "b": {"mbps": 40, "rttMs": 35},  # a person's: kept
        "c": {"mbps": 80, "rttMs": 2},  # the operator's: replaced
        "d": {"mbps": 5, "rttMs": 9},  # a gap: filled
    }
    assert measured.person_links(json.dumps(person), written_before=written_before) == {"b"}
    with pytest.raises(ValueError, match="not JSON"):
        measured.merge_links("{", written_before={}, measured={})


@given(st.lists(st.text(min_size=1, max_size=3), unique=True, max_size=12))
def test_pair_rounds_cover_every_pair_once_with_disjoint_rounds(names: list[str]) -> None:
    rounds = measured.pair_rounds(names)
    pairs = [pair for r in rounds for pair in r]
    assert sorted(pairs) == sorted(itertools.combinations(sorted(names), 2))
    for r in rounds:
        members = [n for pair in r for n in pair]
        assert len(members) == len(set(members))
    if len(names) >= 2:
        assert len(rounds) == len(names) - (1 if len(names) % 2 == 0 else 0)


def a_measured_node(name: str, *, figures=None, links=None, person_links=None) -> dict:
    node = a_node(name)
    if figures is not None or links is not None:
        node.obj["metadata"]["annotations"][measured.ANNOTATION_MEASURED] = measured.render(
            figures or {}, links=links
        )
    if person_links is not None:
        node.links(**person_links)
    return node.obj


FACTS = {"probeVersion": "1", "measuredAt": "t1", "tflops": 0.5, "memoryBandwidthGBps": 10.0}


def test_a_first_probe_round_writes_figures_and_links() -> None:
    out = measured.node_annotations(
        a_measured_node("a"), facts=FACTS, links={"b": {"mbps": 95.0, "rttMs": 2.0}}, margin=0.1
    )
    assert out is not None
    figures, _ = measured.parse(out[measured.ANNOTATION_MEASURED])
    assert figures.figures == {"tflops": 0.5, "memoryBandwidthGBps": 10.0}
    assert json.loads(out[live.ANNOTATION_LINKS]) == {"b": {"mbps": 95.0, "rttMs": 2.0}}


def test_a_round_within_the_margin_writes_nothing() -> None:
    node = a_measured_node("a", figures=FACTS, links={"b": {"mbps": 95.0, "rttMs": 2.0}})
    again = {**FACTS, "measuredAt": "t2", "tflops": 0.52}
    links = {"b": {"mbps": 99.0, "rttMs": 2.2}}
    assert measured.node_annotations(node, facts=again, links=links, margin=0.1) is None
    assert measured.node_annotations(node, facts=None, links={}, margin=0.1) is None


def test_a_slower_node_is_rewritten_and_a_persons_link_stays() -> None:
    node = a_measured_node(
        "a",
        figures=FACTS,
        links={"b": {"mbps": 95.0, "rttMs": 2.0}},
        person_links={"b": {"mbps": 40, "rttMs": 30}},
    )
    slower = {**FACTS, "measuredAt": "t2", "tflops": 0.2}
    out = measured.node_annotations(
        node, facts=slower, links={"b": {"mbps": 50.0, "rttMs": 2.0}}, margin=0.1
    )
    assert out is not None
    assert measured.parse(out[measured.ANNOTATION_MEASURED])[0].figures["tflops"] == 0.2
    assert json.loads(out[live.ANNOTATION_LINKS]) == {"b": {"mbps": 40, "rttMs": 30}}
    inventory = live.build_inventory(
        [{**node, "metadata": {**node["metadata"], "annotations": out}}], eligibility=ALL
    ).inventory
    assert inventory.nodes[0].tflops == 0.2


def test_the_links_annotation_names_match() -> None:
    assert measured.LINKS_ANNOTATION == live.ANNOTATION_LINKS


# fixed costs (probe version 2) ------------------------------------------------------------

FIXED = {
    "layerStepSeconds": 1.4e-4,
    "layerTokenSeconds": 4e-6,
    "stepSeconds": 2.9e-4,
    "hopSeconds": 6.7e-4,
    "productSecondsPerByte": {"1": 4.8e-11, "8": 1.8e-10, "32": 2e-10},
}


def test_measured_fixed_costs_reach_the_planner_and_a_compute_label_drops_the_curve() -> None:
    plain = with_measured(a_node("m"), tflops=0.05, **FIXED)
    labelled = with_measured(a_node("l").label(live.LABEL_TFLOPS, "3"), tflops=0.05, **FIXED)
    nodes = {
        n.name: n
        for n in live.build_inventory([plain.obj, labelled.obj], eligibility=ALL).inventory.nodes
    }
    timings = nodes["m"].timings
    assert timings is not None
    assert (timings.layer_seconds, timings.layer_token_seconds) == (1.4e-4, 4e-6)
    assert (timings.step_seconds, timings.hop_seconds) == (2.9e-4, 6.7e-4)
    assert timings.products == ((1.0, 4.8e-11), (8.0, 1.8e-10), (32.0, 2e-10))
    # the label states the compute rate: the roofline of the labels, the fixed costs stay
    assert nodes["l"].timings is not None and nodes["l"].timings.products == ()
    assert nodes["l"].timings.layer_seconds == 1.4e-4


def test_unusable_fixed_costs_are_left_out() -> None:
    bad = {"layerStepSeconds": -1, "hopSeconds": "fast", "productSecondsPerByte": {"x": 1}}
    found, note = measured.parse(json.dumps({"tflops": 0.1, "stepSeconds": 1e-3, **bad}))
    assert note is None and found.timings is not None
    assert found.timings.step_seconds == 1e-3
    assert found.timings.layer_seconds is None and found.timings.hop_seconds is None
    assert found.timings.products == ()
    none, _ = measured.parse(json.dumps({"tflops": 0.1}))
    assert none.timings is None  # a version 1 probe's figures: the defaults apply


def test_fixed_costs_round_trip_and_count_as_moved() -> None:
    facts = {"probeVersion": "2", "tflops": 0.05, "memoryBandwidthGBps": 10.0, **FIXED}
    old, _ = measured.parse(measured.render(facts))
    assert old.timings is not None and old.timings.hop_seconds == 6.7e-4
    assert old.timings.products[1] == (8.0, 1.8e-10)
    assert not measured.worth_writing(old, facts, margin=0.1)
    slower = {**facts, "layerStepSeconds": 1.4e-4 * 1.5}
    assert measured.worth_writing(old, slower, margin=0.1)
    v1, _ = measured.parse(measured.render({"tflops": 0.05, "memoryBandwidthGBps": 10.0}))
    assert measured.worth_writing(v1, facts, margin=0.1)  # a v2 probe brings new figures


def test_a_time_factor_slows_the_fixed_costs_too() -> None:
    node = with_measured(a_node("m"), tflops=0.05, **FIXED)
    slowed = live.build_inventory([node.obj], eligibility=ALL, time_factors={"m": 2.0})
    timings = slowed.inventory.nodes[0].timings
    assert timings is not None
    assert timings.layer_seconds == pytest.approx(2.8e-4)
    assert timings.hop_seconds == pytest.approx(1.34e-3)
    assert timings.products[0] == pytest.approx((1.0, 9.6e-11))
