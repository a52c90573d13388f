"""Brute force over every ordered subset of nodes and every split: the reference optimum."""

from __future__ import annotations

import itertools

from llmpipe_operator.planning import cost, inventory, planner, profiles


def brute_force(
    profile: profiles.ModelProfile,
    cluster: inventory.Inventory,
    *,
    workload: planner.Workload,
    placement: planner.Placement,
) -> tuple[float, float] | None:
    """(objective, other objective) of the best chain, or None when nothing fits.

    Walks all chains with the planner's own cost model (`cost.evaluate`), which the cost
    tests check against hand-computed numbers separately.
    """
    names = [n.name for n in cluster.nodes]
    layers = profile.num_layers
    cap = placement.max_stages or len(names)
    best: tuple[float, float] | None = None
    for count in range(1, min(len(names), layers, cap) + 1):
        for chain in itertools.permutations(names, count):
            if placement.first_stage == "edge" and cluster.node(chain[0]).tier != "edge":
                continue
            if placement.last_stage == "edge" and cluster.node(chain[-1]).tier != "edge":
                continue
            for cuts in itertools.combinations(range(1, layers), count - 1):
                costed = cost.evaluate(
                    profile, cluster, workload, nodes=chain, bounds=(0, *cuts, layers)
                )
                if not costed.fits:
                    continue
                pair = (costed.bottleneck_seconds, costed.token_latency_seconds)
                if workload.objective == "latency":
                    pair = (pair[1], pair[0])
                if best is None or pair < best:
                    best = pair
    return best
