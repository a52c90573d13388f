"""A request's `n` choices at stage 0's gateway: their streams merged as pieces arrive (each
stream's order kept, every stream closed when the reader stops early) and their seeds
(the request's plus the choice's index, wrapped into int64)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from llmpipe_stage.gateway import openai_api

Piece = openai_api.Piece


async def pieces(name: str, delays: list[float], closed: list[str]) -> AsyncIterator[Piece]:
    try:
        for i, delay in enumerate(delays):
            await asyncio.sleep(delay)
            yield f"{name}{i}", None, list(range(i + 1))
    finally:
        closed.append(name)


def test_merged_streams_keep_each_order_and_interleave_by_arrival() -> None:
    async def main() -> tuple[list[tuple[int, str]], list[str]]:
        closed: list[str] = []
        streams = [
            pieces("a", [0.0, 0.05, 0.05], closed),
            pieces("b", [0.02, 0.0, 0.1], closed),
        ]
        got = [(i, text) async for i, (text, _, _) in openai_api.merged(streams)]
        return got, closed

    got, closed = asyncio.run(main())
    assert [t for i, t in got if i == 0] == ["a0", "a1", "a2"]
    assert [t for i, t in got if i == 1] == ["b0", "b1", "b2"]
    assert got[:3] == [(0, "a0"), (1, "b0"), (1, "b1")]  # b's first two come before a1
    assert sorted(closed) == ["a", "b"]


def test_leaving_a_merge_early_closes_every_stream() -> None:
    async def main() -> list[str]:
        closed: list[str] = []
        streams = [pieces("a", [0.0] * 5, closed), pieces("b", [10.0], closed)]
        merge = openai_api.merged(streams)
        first = await anext(merge)
        assert first[0] == 0
        await merge.aclose()  # a client went away: b is still sleeping
        return closed

    assert sorted(asyncio.run(main())) == ["a", "b"]


def test_choice_seeds_differ_by_index_and_stay_in_int64() -> None:
    assert openai_api.choice_seed(None, 3) is None
    assert [openai_api.choice_seed(7, i) for i in range(3)] == [7, 8, 9]
    assert openai_api.choice_seed(2**63 - 1, 1) == -(2**63)
