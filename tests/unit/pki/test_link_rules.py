"""The stage's per-RPC rule (`llmpipe_stage.tls.allowed`, pure): each RPC only from the one
peer of the same plan that may send it; everything else is refused with a reason."""

from __future__ import annotations

import pytest

from llmpipe_common import pki
from llmpipe_stage import tls


def stage(index: int, *, plan: str = "p1", pipeline: str = "chat") -> pki.StageIdentity:
    return pki.StageIdentity("team-a", pipeline, plan, index)


STAGES = 4
ALLOWED = {
    # rpc: {(caller, callee) allowed}
    "Forward": {(0, 1), (1, 2), (2, 3)},
    "ReturnTokens": {(3, 0)},
    "Fail": {(1, 0), (2, 0), (3, 0)},
    "ReleaseSequences": {(0, 1), (0, 2), (0, 3), (0, 0)},
    "Info": {(0, 1), (0, 2), (0, 3), (0, 0)},
}


@pytest.mark.parametrize("rpc", sorted(ALLOWED))
def test_each_rpc_is_taken_only_from_its_sender(rpc: str) -> None:
    for caller in range(STAGES):
        for callee in range(STAGES):
            reason = tls.allowed(rpc, peer=stage(caller), me=stage(callee), num_stages=STAGES)
            if (caller, callee) in ALLOWED[rpc]:
                assert reason is None, (rpc, caller, callee, reason)
            else:
                assert reason is not None and rpc in reason, (rpc, caller, callee)


@pytest.mark.parametrize("rpc", sorted(ALLOWED))
def test_a_peer_of_another_plan_or_pipeline_is_refused(rpc: str) -> None:
    for other in (stage(0, plan="p2"), stage(0, pipeline="other"), stage(3, plan="p2")):
        for callee in range(STAGES):
            reason = tls.allowed(rpc, peer=other, me=stage(callee), num_stages=STAGES)
            assert reason is not None and "is not a stage of" in reason


def test_an_unknown_rpc_is_refused() -> None:
    assert tls.allowed("Evil", peer=stage(0), me=stage(1), num_stages=STAGES) == "unknown RPC Evil"


def test_local_pipeline_names_become_identity_labels() -> None:
    assert tls.dns_label("SmolLM2-135M-Instruct") == "smollm2-135m-instruct"
    assert tls.dns_label("my model_v1.5") == "my-model-v1.5"
    assert tls.dns_label("__") == "pipeline"
    with pytest.raises(pki.PkiError, match="not an llmpipe stage identity"):
        pki.StageIdentity("team-a", "SmolLM2", "p1", 0)
