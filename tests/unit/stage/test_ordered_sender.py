"""`backend.OrderedSender`: a micro-batch to the next stage waits for the acknowledgement of
the previous one that carried any of its sequences, and only for that one."""

from __future__ import annotations

import asyncio

from llmpipe_stage.backend import OrderedSender


def test_a_sequences_sends_arrive_in_order_and_others_do_not_wait() -> None:
    events: list[str] = []

    def rpc(name: str, seconds: float):  # a call that takes `seconds` to be acknowledged
        async def call() -> None:
            events.append(f"{name} sent")
            await asyncio.sleep(seconds)
            events.append(f"{name} acked")

        return call

    async def main() -> None:
        sender = OrderedSender()
        # chunk 1 of sequence 7 is slow to cross (large); chunk 2 of 7 is quick; a decode
        # step of sequence 9 shares nothing with them
        await asyncio.gather(
            sender.send([7], rpc("chunk 1", 0.2)),
            sender.send([7, 8], rpc("chunk 2", 0.01)),
            sender.send([9], rpc("decode", 0.01)),
            sender.send([8], rpc("after chunk 2", 0.01)),
        )
        assert not sender._latest  # nothing left behind

    asyncio.run(main())
    assert events.index("chunk 2 sent") > events.index("chunk 1 acked")
    assert events.index("after chunk 2 sent") > events.index("chunk 2 acked")
    assert events.index("decode acked") < events.index("chunk 1 acked")  # went at once


def test_a_failed_send_does_not_hold_the_next_one_forever() -> None:
    sent: list[str] = []

    async def fails() -> None:
        raise ConnectionError("the hop failed")

    async def works() -> None:
        sent.append("second")

    async def main() -> None:
        sender = OrderedSender()
        first = asyncio.ensure_future(sender.send([3], fails))
        second = asyncio.ensure_future(sender.send([3], works))
        done = await asyncio.wait_for(
            asyncio.gather(first, second, return_exceptions=True), timeout=5
        )
        assert isinstance(done[0], ConnectionError) and done[1] is None

    asyncio.run(main())
    assert sent == ["second"]
