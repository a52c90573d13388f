"""The speculative accept/reject rule on exact distributions (`llmpipe_stage.sampling`):
one position's output distribution, computed exactly from the rule's acceptance and
residual, equals the target p for point-mass and spread drafter distributions q; the rule
over several positions, drawn many times with a seeded generator, matches p's joint
distribution; and the edge cases (a token q never proposes, a residual with no mass, a
certain draft) behave. The distribution through a real model is in
tests/dataplane/test_speculative_sampling.py."""

from __future__ import annotations

import itertools

import pytest
import torch

from llmpipe_stage import sampling

VOCAB = 6


def a_distribution(seed: int, *, vocab: int = VOCAB, zeros: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weights = torch.rand(vocab, generator=generator, dtype=torch.float64) ** 3
    weights[:zeros] = 0.0
    return weights / weights.sum()


def output_distribution(p: torch.Tensor, q: torch.Tensor | None, token: int | None) -> torch.Tensor:
    """Exactly what one position emits: the draft token x ~ q (or `token` for sure when q is
    None) is kept with probability acceptance(x), else a draw from residual(x)."""
    proposals = [(token, 1.0)] if q is None else [(x, float(q[x])) for x in range(len(p))]
    out = torch.zeros_like(p)
    for x, weight in proposals:
        assert x is not None
        if weight == 0.0:
            continue
        keep = sampling.acceptance(p, x, q)
        out[x] += weight * keep
        out += weight * (1 - keep) * sampling.residual(p, x, q)
    return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("token", range(VOCAB))
def test_a_point_mass_draft_leaves_p_unchanged(seed: int, token: int) -> None:
    p = a_distribution(seed)
    assert torch.allclose(output_distribution(p, None, token), p, atol=1e-12)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("zeros", [0, 2])
def test_a_spread_draft_leaves_p_unchanged(seed: int, zeros: int) -> None:
    p = a_distribution(seed, zeros=zeros)
    q = a_distribution(seed + 100, zeros=0 if zeros else 3)
    assert torch.allclose(output_distribution(p, q, None), p, atol=1e-12)


def test_a_wrong_rule_would_change_p() -> None:
    """The exact check above can fail: accepting every draft token emits the draft."""
    p = a_distribution(0)
    always = torch.zeros_like(p)
    always[3] = 1.0
    assert not torch.allclose(always, p, atol=1e-3)
    resample_from_p = p * (1 - p[3])  # on rejection draw from p, not the residual
    resample_from_p[3] += p[3]
    assert not torch.allclose(resample_from_p, p, atol=1e-3)


def test_edge_cases() -> None:
    p = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    q = torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64)
    assert sampling.acceptance(p, 1, q) == 0.0  # q never proposes it: never accepted
    assert sampling.acceptance(p, 1) == 1.0  # certain under p: always accepted
    assert sampling.acceptance(p, 0) == 0.0
    assert torch.equal(sampling.residual(p, 0), p)  # p minus a token p never gives
    assert torch.equal(sampling.residual(p, 1), p)  # no mass left: p itself
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):  # whatever the draft, a certain p emits its token
        assert sampling.accept_draft(torch.stack([p, p]), [0], generator)[0] == 1
        assert sampling.accept_draft(torch.stack([p, p]), [1], generator) == [1, 1]


def test_the_rule_over_positions_matches_the_joint_distribution() -> None:
    """Two draft positions whose targets depend on the tokens before them (p2 given x1,
    p3 given x1 x2), a fixed draft, 40,000 seeded draws of the first two emitted tokens:
    each cell's frequency is within 4.5 standard deviations of its exact probability.
    (Developed against the wrong rules above: always accept puts every draw on the draft.)"""
    p1 = a_distribution(1)
    p2 = {x: a_distribution(10 + x) for x in range(VOCAB)}
    draft = [2, 4]
    generator = torch.Generator().manual_seed(7)
    draws = 40_000
    counts = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    for _ in range(draws):
        # the emitted prefix decides the next rows; a rejection at x1 ends the step there
        x1_rows = torch.stack([p1, p2[draft[0]], a_distribution(99)])
        tokens = sampling.accept_draft(x1_rows, draft, generator)
        first = tokens[0]
        # rejected at the first: the second comes from a fresh, plain step
        second = sampling.draw(p2[first], generator) if len(tokens) == 1 else tokens[1]
        counts[first, second] += 1
    exact = p1[:, None] * torch.stack([p2[x] for x in range(VOCAB)])
    for x1, x2 in itertools.product(range(VOCAB), repeat=2):
        expected = float(exact[x1, x2])
        sd = (draws * expected * (1 - expected)) ** 0.5
        assert abs(counts[x1, x2] - draws * expected) <= 4.5 * sd + 1, (x1, x2)
