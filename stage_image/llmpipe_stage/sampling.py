"""The last stage's sampling distribution and the speculative accept/reject rule. Pure torch.

`probabilities` is the one place temperature and top_p turn logits into the distribution p a
token is drawn from: plain decoding draws from it (`runtime.Sampler.pick`), and so does the
verification of a sampled request's draft, so both keep the same semantics.

`accept_draft` is standard speculative sampling. A drafter proposed tokens x_1..x_k, x_j
drawn from its distribution q_j given the tokens before it; p_j is the target model's
distribution at the same position. Token x_j is accepted with probability
min(1, p_j(x_j) / q_j(x_j)); at the first rejection the token is drawn from the residual
normalize(max(p_j - q_j, 0)) and the rest of the draft is dropped; with all k accepted one
more is drawn from p_{k+1}. Each emitted token then has exactly the distribution p gives it
after the tokens before it: P(x) = q(x) min(1, p(x)/q(x)) + (1 - sum_y min(p(y), q(y)))
residual(x) = min(q(x), p(x)) + max(p(x) - q(x), 0) = p(x). A drafter that proposes
deterministically (prompt lookup, a draft model decoding greedily) has q a point mass on its
token: x is accepted with probability p(x) and the residual is p with x removed. No I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def probabilities(logits: torch.Tensor, *, temperature: float, top_p: float) -> torch.Tensor:
    """logits: [vocab] (float32) -> the distribution [vocab] to draw from (temperature > 0).

    Safe for every temperature > 0, however small: the largest logit is subtracted first,
    so the scaled logits are <= 0 (never +inf) and the most likely token keeps weight
    exp(0) = 1; a tiny temperature sends every other weight to 0, which is greedy, instead
    of inf / inf = nan. top_p keeps the smallest set of most likely tokens whose mass
    reaches top_p (always the most likely one), unnormalised: draws normalise."""
    # A subnormal temperature could be flushed to 0 (0 / 0 = nan): use the least normal.
    temperature = max(temperature, torch.finfo(torch.float32).tiny)
    # scaled: [vocab], max 0, the others <= 0 or -inf
    scaled = (logits - logits.max()) / temperature
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop = before >= top_p  # keep the smallest set reaching top_p ...
        drop[0] = False  # ... and always the most likely token (top_p 0 is greedy)
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs


def draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    """One token from weights [vocab] (>= 0, not necessarily normalised)."""
    return int(torch.multinomial(weights, 1, generator=generator).item())


def acceptance(p: torch.Tensor, token: int, q: torch.Tensor | None = None) -> float:
    """min(1, p(token) / q(token)) for p normalised; q None: a point mass on token."""
    p_token = float(p[token])
    q_token = 1.0 if q is None else float(q[token])
    if q_token <= 0.0:  # a draft q never proposes; accepting it would be wrong
        return 0.0
    return min(1.0, p_token / q_token)


def residual(p: torch.Tensor, token: int, q: torch.Tensor | None = None) -> torch.Tensor:
    """normalize(max(p - q, 0)) [vocab] after `token` was rejected (q None: a point mass
    on it). Rounding can leave no mass (p and q equal up to float error, where a rejection
    has probability ~0): then p itself."""
    if q is None:
        rest = p.clone()
        rest[token] = 0.0
    else:
        rest = torch.clamp(p - q, min=0.0)
    total = float(rest.sum())
    if total <= 0.0:
        return p / p.sum()
    return rest / total


def accept_draft(
    probs: torch.Tensor,
    draft: Sequence[int],
    generator: torch.Generator,
    *,
    draft_probs: torch.Tensor | None = None,
) -> list[int]:
    """The tokens one verify step emits for a sampled sequence: the accepted prefix of the
    draft plus one token drawn by the rule (module docstring), between 1 and k + 1.

    probs: [k + 1, vocab], row j the target distribution after the last accepted token and
    draft[:j] (`probabilities`, so temperature and top_p apply before the rule);
    draft_probs: [k, vocab] the drafter's q_j, None for a drafter that proposes one token
    for sure (a point mass). Uses `generator` for every draw (a seeded request stays
    reproducible)."""
    k = len(draft)
    p = probs / probs.sum(dim=-1, keepdim=True)  # [k + 1, vocab]
    out: list[int] = []
    for j, token in enumerate(draft):
        q = None if draft_probs is None else draft_probs[j]
        u = float(torch.rand((), generator=generator))
        if u < acceptance(p[j], token, q):
            out.append(token)
            continue
        out.append(draw(residual(p[j], token, q), generator))
        return out
    out.append(draw(p[k], generator))
    return out
