"""The debounce window: one re-plan per burst, at most one per window, urgent at once.

Covers: a flapping label within a window makes one re-plan; an urgent change closes the
burst at once and carries the changes already pending; invariants over random change
times (hypothesis): every change is re-planned exactly once, no non-urgent re-plan comes
sooner than one window after the previous, and no change waits longer than a window.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmpipe_operator.planning import replan
from llmpipe_operator.planning.replan import ChangeKind, NodeChange


def label_flap(i: int) -> NodeChange:
    return NodeChange("edge-1", ChangeKind.LABELS, f"flap {i}")


def test_a_flapping_label_makes_one_replan_per_window() -> None:
    debouncer = replan.Debouncer(10.0)
    for t in range(10):  # a flap every second for ten seconds
        debouncer.add(label_flap(t), now=float(t))
        assert not debouncer.due(float(t))
    assert debouncer.due_at() == 10.0
    assert debouncer.due(10.0)
    assert len(debouncer.take()) == 10
    assert debouncer.due_at() is None


def test_an_urgent_change_closes_the_burst_at_once() -> None:
    debouncer = replan.Debouncer(30.0)
    debouncer.add(label_flap(0), now=1.0)
    gone = NodeChange("orin-b", ChangeKind.REMOVED, "node orin-b removed")
    debouncer.add(gone, now=2.0, urgent=True)
    assert debouncer.due(2.0)
    assert debouncer.take() == (label_flap(0), gone)


def test_a_zero_window_replans_every_change() -> None:
    debouncer = replan.Debouncer(0.0)
    debouncer.add(label_flap(0), now=5.0)
    assert debouncer.due(5.0)


def test_a_negative_window_is_refused() -> None:
    with pytest.raises(ValueError, match="debounce window"):
        replan.Debouncer(-1.0)


events = st.lists(
    st.tuples(st.floats(0.0, 5.0), st.booleans()),  # (gap before the change, urgent)
    min_size=1,
    max_size=40,
)


@given(window=st.floats(0.5, 20.0), events=events, tick=st.floats(0.05, 1.0))
def test_debounce_invariants(window: float, events: list[tuple[float, bool]], tick: float) -> None:
    debouncer = replan.Debouncer(window)
    now, fired, seen_at = 0.0, [], {}
    for i, (gap, urgent) in enumerate(events):
        # the loop polls every `tick` seconds between changes
        target = now + gap
        while now + tick <= target:
            now += tick
            if debouncer.due(now):
                fired.append((now, debouncer.take()))
        now = target
        change = NodeChange("n", ChangeKind.LABELS, str(i))
        seen_at[change.text] = now
        debouncer.add(change, now=now, urgent=urgent)
        if debouncer.due(now):
            fired.append((now, debouncer.take()))
    while debouncer.due_at() is not None:
        now += tick
        if debouncer.due(now):
            fired.append((now, debouncer.take()))

    texts = [c.text for _, burst in fired for c in burst]
    assert sorted(texts, key=int) == [str(i) for i in range(len(events))]  # each exactly once
    urgent_texts = {str(i) for i, (_, urgent) in enumerate(events) if urgent}
    calm = [at for at, burst in fired if not urgent_texts & {c.text for c in burst}]
    for earlier, later in itertools.pairwise(calm):
        assert later - earlier >= window - 1e-9
    for at, burst in fired:
        for change in burst:
            assert at - seen_at[change.text] <= window + tick + 1e-9


def test_a_pending_burst_can_be_made_urgent() -> None:
    debouncer = replan.Debouncer(30.0)
    debouncer.make_urgent()  # nothing pending: nothing to close
    assert debouncer.due_at() is None
    debouncer.add(label_flap(0), now=1.0)
    debouncer.make_urgent()
    assert debouncer.due(1.0)
