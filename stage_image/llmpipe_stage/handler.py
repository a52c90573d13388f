"""The stage's RPC layer (the gRPC servicer): authorize, validate, forward; never compute.

Every RPC first checks the caller's certificate against the link rules (`tls.allowed`),
then the message (`wire` decoding, the sequence positions in `backend.Ledger`), then hands
it to the backend: a micro-batch to the `Worker`'s queue, token ids and failures to stage
0's coordinator, releases to the caches. While the stage is loading, `Info` and
`ReleaseSequences` answer and the rest are refused; `attach` hands the servicer the
backend that `llmpipe_stage.server` built once the slice was loaded. Imports run one way:
server -> handler -> backend.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NoReturn

import grpc
import torch

from llmpipe_stage import tls, wire
from llmpipe_stage.backend import Head, Ledger, LoadProgress, Worker
from llmpipe_stage.proto import stage_pb2, stage_pb2_grpc

log = logging.getLogger(__name__)

OVERTAKE_WAIT_S = 2.0
"""How long a step that starts past its sequence's cached tokens waits for the earlier
chunk. Senders keep a sequence's micro-batches in order (`backend.OrderedSender`), so this
is a defence (a sender of another build, a retried call), not the mechanism. Past it the
step is refused as out of order: a forged or stale step does not hold a caller for the
whole hop deadline, and a real gap makes stage 0 pause and replay the sequence, so nothing
is lost."""


class Refusal(Exception):
    """An RPC this stage refuses: the gRPC status and the reason the caller gets."""

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class Identity:
    """What the servicer knows from the process's first second, before loading."""

    index: int
    num_stages: int
    layers: tuple[int, int]
    """This stage's half-open layer range [start, end)."""
    model_name: str
    dtype: torch.dtype
    tls: tls.TlsFiles | None
    """None: plaintext, no per-RPC checks (`--plaintext`)."""


class StageServicer(stage_pb2_grpc.StageServicer):
    """The RPC layer: authorize, validate, enqueue or delegate; never compute."""

    def __init__(self, identity: Identity, *, progress: LoadProgress, ledger: Ledger) -> None:
        self.identity = identity
        self.progress = progress
        self.ledger = ledger
        self.peer_identities = tls.PeerIdentities()
        self._backend: Head | Worker | None = None  # set once, by attach, after loading

    def attach(self, backend: Head | Worker) -> None:
        """The loaded stage's backend; the RPCs that need the slice are served from now on."""
        self._backend = backend

    # -- checks ------------------------------------------------------------------------------
    async def _authorize(self, rpc: str, context: grpc.aio.ServicerContext) -> int | None:
        """PERMISSION_DENIED unless the caller's certificate names the one stage that may
        send `rpc` here (`tls.allowed`); returns the caller's stage index (None: plaintext)."""
        files = self.identity.tls
        if files is None:
            return None
        peer = self.peer_identities.of(context)
        if peer is None:
            reason = "the caller presented no llmpipe stage certificate"
        else:
            refused = tls.allowed(
                rpc, peer=peer, me=files.material.identity, num_stages=self.identity.num_stages
            )
            if refused is None:
                return peer.index
            reason = refused
        log.warning("stage %d: refused %s: %s", self.identity.index, rpc, reason)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
        raise Refusal(grpc.StatusCode.PERMISSION_DENIED, reason)  # abort raised already

    def _worker(self) -> Worker:
        """The downstream backend a micro-batch goes to, or why there is none."""
        index = self.identity.index
        if index == 0:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                "stage 0 takes token ids (ReturnTokens), not activations",
            )
        if not isinstance(self._backend, Worker) or not self.progress.ready:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, f"stage {index} is {self.progress.phase}")
        return self._backend

    def _head(self, what: str) -> Head:
        """Stage 0's backend (the coordinator owns the sequences), or why there is none."""
        if not isinstance(self._backend, Head):
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION, f"stage {self.identity.index} {what}"
            )
        return self._backend

    @staticmethod
    async def _refuse(refusal: Refusal, context: grpc.aio.ServicerContext) -> NoReturn:
        await context.abort(refusal.code, refusal.reason)
        raise refusal  # abort raised already; this line keeps the type checker honest

    # -- the RPCs ----------------------------------------------------------------------------
    async def Forward(
        self, request: stage_pb2.Activations, context: grpc.aio.ServicerContext
    ) -> stage_pb2.Ack:
        await self._authorize("Forward", context)
        try:
            worker = self._worker()
            steps, hidden = wire.decode_activations(
                request, hidden_size=worker.hidden_size, dtype=self.identity.dtype
            )
            # A prompt's chunks are sent back to back; a later one may arrive first.
            wait = min(OVERTAKE_WAIT_S, worker.timeouts.forward_s / 2)
            await self.ledger.wait_in_order(steps, timeout=wait)
            self.ledger.check(steps, context_limit=worker.runtime.context_limit)
        except wire.WireError as error:
            await self._refuse(Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(error)), context)
        except Refusal as refusal:
            await self._refuse(refusal, context)
        worker.enqueue(steps, hidden)
        return stage_pb2.Ack()

    async def ReturnTokens(
        self, request: stage_pb2.Tokens, context: grpc.aio.ServicerContext
    ) -> stage_pb2.Ack:
        await self._authorize("ReturnTokens", context)
        try:
            head = self._head("does not take token ids")
            ids, sampled = wire.decode_tokens(request)
        except wire.WireError as error:
            await self._refuse(Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(error)), context)
        except Refusal as refusal:
            await self._refuse(refusal, context)
        head.coordinator.on_tokens(ids, sampled)
        return stage_pb2.Ack()

    async def Fail(
        self, request: stage_pb2.Failure, context: grpc.aio.ServicerContext
    ) -> stage_pb2.Ack:
        caller = await self._authorize("Fail", context)
        try:
            if caller is not None and request.stage_index != caller:
                raise Refusal(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"stage {caller} reported a failure as stage {request.stage_index}",
                )
            head = self._head("does not own sequences")
        except Refusal as refusal:
            await self._refuse(refusal, context)
        head.coordinator.on_failure(list(request.sequence_ids), request.reason)
        return stage_pb2.Ack()

    async def ReleaseSequences(
        self, request: stage_pb2.Release, context: grpc.aio.ServicerContext
    ) -> stage_pb2.Ack:
        await self._authorize("ReleaseSequences", context)
        ids = list(request.sequence_ids)
        if self._backend is None:
            self.ledger.release(ids)  # nothing cached yet; a late step is dropped on arrival
        else:
            await self._backend.release(ids)
        return stage_pb2.Ack()

    async def Info(
        self, request: stage_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> stage_pb2.StageInfo:
        await self._authorize("Info", context)
        backend = self._backend
        identity = self.identity
        return stage_pb2.StageInfo(
            stage_index=identity.index,
            num_stages=identity.num_stages,
            layer_start=identity.layers[0],
            layer_end=identity.layers[1],
            ready=self.progress.ready,
            model_name=identity.model_name,
            hidden_size=0 if backend is None else backend.hidden_size,
            dtype=wire.WIRE_DTYPES[identity.dtype],
            cached_sequence_ids=[] if backend is None else list(backend.runtime.caches),
        )
