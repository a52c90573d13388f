"""The stage's gRPC clients: one stub per other stage, reused, and what a failed call means.

`Peers` owns the channels to the other stages (reopened when the TLS files change, see
`llmpipe_stage.tls`), frees sequences on every other stage, and asks every other stage
whether it is ready (stage 0's /readyz). No computation and no server code here: the
backend and the lifecycle (`llmpipe_stage.server`) call it.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from llmpipe_stage import tls
from llmpipe_stage.proto import stage_pb2, stage_pb2_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1 << 30
READY_BUDGET_S = 2.0
"""Stage 0's /readyz asks every stage within this long; the kubelet's probe waits 3 s."""
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A restarted neighbour is found again within a second instead of after minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def rpc_failure(error: grpc.aio.AioRpcError, peer: str) -> str:
    """A failed call to `peer` as a reason a user can read (unreachable or rejected)."""
    code = error.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return f"{peer} is unreachable ({code.name}: {error.details()})"
    return f"{peer} rejected the request ({code.name}: {error.details()})"


class Peers:
    """gRPC stubs to the other stages, created once and reused (channels reconnect).

    With TLS, a renewed certificate (the files changed) opens new channels for the calls
    that follow; the old ones finish the calls they carry, then close."""

    RETIRE_GRACE_S = 30.0

    def __init__(
        self, addresses: tuple[str, ...], *, index: int, tls_files: tls.TlsFiles | None = None
    ) -> None:
        self.addresses = addresses
        self.index = index
        self.tls_files = tls_files
        self._generation = tls_files.generation if tls_files is not None else 0
        self._stubs: dict[int, stage_pb2_grpc.StageStub] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._retiring: set[asyncio.Future[None]] = set()

    @property
    def others(self) -> list[int]:
        """Every stage index but this one."""
        return [i for i in range(len(self.addresses)) if i != self.index]

    def stub(self, index: int) -> stage_pb2_grpc.StageStub:
        if self.tls_files is not None:
            self.tls_files.refresh()
            if self.tls_files.generation != self._generation:
                self._generation = self.tls_files.generation
                self._retire_channels()
        if index not in self._stubs:
            channel = self._open(self.addresses[index])
            self._channels.append(channel)
            self._stubs[index] = stage_pb2_grpc.StageStub(channel)  # type: ignore[no-untyped-call]
        return self._stubs[index]

    def _open(self, address: str) -> grpc.aio.Channel:
        if self.tls_files is None:
            return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        credentials = tls.channel_credentials(self.tls_files.material)
        return grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)

    def _retire_channels(self) -> None:
        for channel in self._channels:
            task = asyncio.ensure_future(channel.close(grace=self.RETIRE_GRACE_S))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        self._channels, self._stubs = [], {}

    def describe(self, index: int) -> str:
        return f"stage {index} at {self.addresses[index]}"

    async def release(self, sequence_ids: list[int], *, timeout: float) -> None:
        """Tell every other stage to free these caches; a stage that is down is skipped."""
        others = self.others
        results = await asyncio.gather(
            *(
                self.stub(i).ReleaseSequences(
                    stage_pb2.Release(sequence_ids=sequence_ids), timeout=timeout
                )
                for i in others
            ),
            return_exceptions=True,
        )
        for i, result in zip(others, results, strict=True):
            if isinstance(result, grpc.aio.AioRpcError):
                log.info("release on %s failed: %s", self.describe(i), result.code().name)

    async def readiness(self, *, budget_s: float = READY_BUDGET_S) -> tuple[bool, str]:
        """Ask every other stage at once, all within one budget (the probe's timeout)."""
        others = self.others
        answers = await asyncio.gather(
            *(self.stub(i).Info(stage_pb2.InfoRequest(), timeout=budget_s) for i in others),
            return_exceptions=True,
        )
        for i, answer in zip(others, answers, strict=True):
            if isinstance(answer, grpc.aio.AioRpcError):
                return False, rpc_failure(answer, self.describe(i))
            if isinstance(answer, BaseException):
                raise answer
            if not answer.ready:
                return False, f"{self.describe(i)} is still loading"
        return True, "all stages ready"

    async def lost(self, *, budget_s: float = READY_BUDGET_S) -> str | None:
        """Why the chain has lost a stage, or None: a stage that refuses connections (its
        process died) or answers not ready (it restarted and is loading, so every cache
        it held is gone). A stage that is only slow to answer is not lost: the step
        timeout decides for it, so a loaded machine does not make stage 0 replay."""
        others = self.others
        answers = await asyncio.gather(
            *(self.stub(i).Info(stage_pb2.InfoRequest(), timeout=budget_s) for i in others),
            return_exceptions=True,
        )
        for i, answer in zip(others, answers, strict=True):
            if isinstance(answer, grpc.aio.AioRpcError):
                if answer.code() == grpc.StatusCode.UNAVAILABLE:
                    return rpc_failure(answer, self.describe(i))
                continue
            if isinstance(answer, BaseException):
                raise answer
            if not answer.ready:
                return f"{self.describe(i)} restarted (it is loading again)"
        return None

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
