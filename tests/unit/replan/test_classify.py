"""Node changes: what a Node object reduces to, which differences count, how they read.

Covers: every change kind the issue names (added, removed, NotReady, cordoned, labels,
annotations, allocatable memory) plus their reversals and taints; that heartbeats and
foreign annotations are not changes; precedence when one update carries several changes;
urgency (planned node taken away) and relevance (placement may admit the node).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmpipe_operator.planning import replan
from llmpipe_operator.planning.replan import ChangeKind, NodeState

from .builders import a_node


def classify(old: dict | None, new: dict | None) -> replan.NodeChange | None:
    return replan.classify_change(
        None if old is None else replan.node_state(old),
        None if new is None else replan.node_state(new),
    )


def test_node_state_keeps_only_planning_facts() -> None:
    node = (
        a_node("orin-b")
        .memory("7Gi")
        .label("llmpipe.io/tier", "edge")
        .annotation("llmpipe.io/links", '{"gpu-1": {"mbps": 40}}')
        .annotation("node.alpha.kubernetes.io/ttl", "0")
        .taint("gpu", "NoSchedule", "yes")
        .cordoned()
        .build()
    )
    state = replan.node_state(node)
    assert state == NodeState(
        name="orin-b",
        ready=True,
        unschedulable=True,
        allocatable_memory="7Gi",
        labels={"llmpipe.io/tier": "edge"},
        annotations={"llmpipe.io/links": '{"gpu-1": {"mbps": 40}}'},
        taints=(("gpu", "yes", "NoSchedule"),),
    )


def test_a_node_without_a_ready_condition_is_not_ready() -> None:
    node = a_node("fresh").build()
    node["status"]["conditions"] = []
    assert replan.node_state(node).ready is False


changes = pytest.mark.parametrize(
    ("before", "after", "kind", "text"),
    [
        (None, a_node("n").build(), ChangeKind.ADDED, "node n added"),
        (a_node("n").build(), None, ChangeKind.REMOVED, "node n removed"),
        (a_node("n").build(), a_node("n").not_ready().build(), ChangeKind.NOT_READY,
         "node n NotReady"),
        (a_node("n").not_ready().build(), a_node("n").build(), ChangeKind.READY, "node n Ready"),
        (a_node("n").build(), a_node("n").cordoned().build(), ChangeKind.CORDONED,
         "node n cordoned"),
        (a_node("n").cordoned().build(), a_node("n").build(), ChangeKind.UNCORDONED,
         "node n uncordoned"),
        (a_node("n").memory("8Gi").build(), a_node("n").memory("6Gi").build(),
         ChangeKind.MEMORY, "node n allocatable memory 8Gi -> 6Gi"),
        (a_node("n").label("a", "1").label("b", "2").build(),
         a_node("n").label("a", "1").label("b", "3").label("c", "4").build(),
         ChangeKind.LABELS, "node n labels changed (b, c)"),
        (a_node("n").build(), a_node("n").annotation("llmpipe.io/links", "{}").build(),
         ChangeKind.ANNOTATIONS, "node n annotations changed (llmpipe.io/links)"),
        (a_node("n").build(), a_node("n").taint("dedicated", "NoExecute").build(),
         ChangeKind.TAINTS, "node n taints changed"),
    ],
    ids=["added", "removed", "not-ready", "ready", "cordoned", "uncordoned", "memory",
         "labels", "annotations", "taints"],
)  # fmt: skip


@changes
def test_each_change_kind_is_named(before, after, kind, text) -> None:
    change = classify(before, after)
    assert change is not None
    assert (change.kind, change.text) == (kind, text)
    assert change.node == "n"


def test_heartbeats_and_foreign_annotations_are_not_changes() -> None:
    before = a_node("n").heartbeat("t0").annotation("kwok.x-k8s.io/node", "fake").build()
    after = a_node("n").heartbeat("t1").annotation("kwok.x-k8s.io/node", "other").build()
    assert classify(before, after) is None


def test_the_most_telling_change_wins() -> None:
    before = a_node("n").build()
    after = a_node("n").not_ready().taint("node.kubernetes.io/not-ready").memory("1Gi").build()
    change = classify(before, after)
    assert change is not None and change.kind is ChangeKind.NOT_READY


def test_nothing_to_nothing_is_no_change() -> None:
    assert replan.classify_change(None, None) is None


node_states = st.builds(
    NodeState,
    name=st.just("n"),
    ready=st.booleans(),
    unschedulable=st.booleans(),
    allocatable_memory=st.sampled_from([None, "4Gi", "8Gi"]),
    labels=st.dictionaries(st.sampled_from(["a", "b"]), st.sampled_from(["1", "2"])),
    annotations=st.dictionaries(st.just("llmpipe.io/links"), st.sampled_from(["{}", "[]"])),
    taints=st.sampled_from([(), (("k", "", "NoSchedule"),)]),
)


@given(node_states, node_states)
def test_a_change_is_reported_exactly_when_the_planning_facts_differ(old, new) -> None:
    change = replan.classify_change(old, new)
    assert (change is None) == (old == new)


@pytest.mark.parametrize("kind", sorted(replan.URGENT_KINDS))
def test_a_planned_node_taken_away_is_urgent(kind: ChangeKind) -> None:
    change = replan.NodeChange("orin-b", kind, "")
    assert replan.is_urgent(change, {"orin-b", "gpu-1"})
    assert not replan.is_urgent(change, {"gpu-1"})


@pytest.mark.parametrize("kind", sorted(set(ChangeKind) - replan.URGENT_KINDS))
def test_other_changes_wait_for_the_debounce_window(kind: ChangeKind) -> None:
    assert not replan.is_urgent(replan.NodeChange("orin-b", kind, ""), {"orin-b"})


def test_relevance_follows_the_plan_and_the_placement() -> None:
    def relevant(change, planned, before, after) -> bool:
        return replan.is_relevant(
            change, planned_nodes=planned, eligible_before=before, eligible_after=after
        )

    tflops = replan.NodeChange("x", ChangeKind.LABELS, "", label_keys=("llmpipe.io/tflops",))
    arch = replan.NodeChange("x", ChangeKind.LABELS, "", label_keys=("kubernetes.io/arch",))
    memory = replan.NodeChange("x", ChangeKind.MEMORY, "")
    gone = replan.NodeChange("x", ChangeKind.REMOVED, "")
    assert relevant(tflops, {"x"}, True, True)  # what the planner reads, on a planned node
    assert relevant(tflops, set(), True, True)  # ... on a node it may use
    assert relevant(memory, set(), True, True)
    assert relevant(arch, set(), False, True)  # became eligible (nodeSelector now matches)
    assert relevant(arch, {"x"}, True, False)  # stopped being eligible
    assert relevant(gone, {"x"}, False, False)  # a planned node that was already NotReady
    assert not relevant(arch, {"x"}, True, True)  # a label the planner does not read
    assert not relevant(memory, set(), False, False)  # never admitted by the placement


def test_one_update_can_carry_several_changes() -> None:
    before = a_node("n").build()
    after = a_node("n").label("kubernetes.io/arch", "arm64").build()
    after["metadata"]["annotations"]["llmpipe.io/links"] = "{}"
    change = classify(before, after)
    assert change is not None and change.kind is ChangeKind.LABELS
    assert change.all_kinds == {ChangeKind.LABELS, ChangeKind.ANNOTATIONS}
    # the links annotation makes it relevant although the label alone would not
    assert replan.is_relevant(change, planned_nodes=(), eligible_before=True, eligible_after=True)
