"""The draft-model drafter: a small model of the same tokenizer, whole inside stage 0.

`--speculate draft` (pipeline.json `workload.speculation: draft`) makes stage 0 propose a
sequence's next k tokens with a small model instead of by prompt lookup. The small model
runs every one of its layers in stage 0's process, on stage 0's device and dtype, in the
compute thread (the coordinator asks for drafts through the executor, never in the event
loop). Its proposals are greedy (the draft model's argmax at each position), so its q is
a point mass and the last stage's rule (`llmpipe_stage.sampling.accept_draft`) keeps
sampled requests' distribution exact as it does for prompt lookup; greedy output is the
target model's own whatever the draft proposes.

It keeps one KV cache per sequence (a whole-model `StageRuntime`, `max_sequences` slots).
What its cache holds is remembered as token ids; before each proposal the cache is rolled
back to the longest prefix it shares with the sequence's context (what the pipeline
accepted), the rest of the context (the tokens accepted since, at least the last one) is
run as one step, and k - 1 more one-token steps follow. So a rejected draft costs nothing
to undo (the length is set back, as on the pipeline's stages) and the catch-up is the
newly accepted tokens only, not the whole prefix.

The draft model must share the target's tokenizer: `check_same_tokenizer` compares the
vocabulary sizes of both configs and tokenizers, the special tokens' ids and the ids of a
fixed text, and refuses with a message that names the first difference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmpipe_stage import loading
from llmpipe_stage.runtime import StageRuntime
from llmpipe_stage.wire import Step

PROBE_TEXT = "The quick brown fox jumps over the lazy dog. def f(x):\n    return x + 1\n"
"""A fixed text both tokenizers must encode to the same ids."""


class DraftModelError(ValueError):
    """A draft model stage 0 cannot use (another tokenizer, unreadable files)."""


def check_same_tokenizer(
    target_config: Any, draft_config: Any, target_tokenizer: Any, draft_tokenizer: Any
) -> None:
    """Raise DraftModelError unless the draft model's vocabulary is the target's."""
    target_vocab, draft_vocab = int(target_config.vocab_size), int(draft_config.vocab_size)
    if target_vocab != draft_vocab:
        raise DraftModelError(
            f"the draft model's vocabulary has {draft_vocab} tokens but the model's has "
            f"{target_vocab}: a draft model needs the same tokenizer"
        )
    if len(target_tokenizer) != len(draft_tokenizer):
        raise DraftModelError(
            f"the draft model's tokenizer has {len(draft_tokenizer)} tokens but the "
            f"model's has {len(target_tokenizer)}: a draft model needs the same tokenizer"
        )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        mine, theirs = getattr(target_tokenizer, name, None), getattr(draft_tokenizer, name, None)
        if mine != theirs:
            raise DraftModelError(
                f"the draft model's tokenizer has {name} {theirs} but the model's has "
                f"{mine}: a draft model needs the same tokenizer"
            )
    mine_ids = target_tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
    their_ids = draft_tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
    if mine_ids != their_ids:
        raise DraftModelError(
            f"the draft model's tokenizer encodes {PROBE_TEXT!r} as {their_ids[:12]}... but "
            f"the model's as {mine_ids[:12]}...: a draft model needs the same tokenizer"
        )


class DraftModel:
    """The small model's runtime and what each sequence's draft cache holds."""

    def __init__(self, runtime: StageRuntime) -> None:
        self.runtime = runtime
        self.cached: dict[int, list[int]] = {}
        """Sequence id -> the token ids its draft cache holds, in order."""
        self.proposed = 0
        self.steps = 0

    @classmethod
    def load(
        cls,
        model_dir: Path,
        *,
        target_dir: Path,
        dtype: torch.dtype,
        device: torch.device,
        context_limit: int,
        max_sequences: int,
        target_tokenizer: Any | None = None,
    ) -> DraftModel:
        """Read the whole draft model onto `device` after checking its tokenizer against
        the target's (DraftModelError otherwise). Runs in the compute thread."""
        from transformers import AutoTokenizer

        try:
            config = loading.load_config(model_dir)
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError) as error:
            raise DraftModelError(f"cannot read the draft model in {model_dir}: {error}") from None
        if target_tokenizer is None:
            target_tokenizer = AutoTokenizer.from_pretrained(str(target_dir))
        check_same_tokenizer(loading.load_config(target_dir), config, target_tokenizer, tokenizer)
        whole = loading.build_whole(model_dir, dtype=dtype, device=device)
        limit = min(loading.context_limit(whole.config), context_limit)
        return cls(StageRuntime(whole, context_limit=limit, max_sequences=max_sequences))

    def propose(self, sequence_id: int, context: list[int], k: int) -> list[int]:
        """The draft model's greedy k tokens after `context` (the sequence's prompt and
        accepted tokens); [] if the context no longer fits its cache."""
        if k < 1 or not context:
            return []
        held = self.cached.get(sequence_id, [])
        keep = 0
        limit = min(len(held), len(context) - 1)  # at least the last token runs again
        while keep < limit and held[keep] == context[keep]:
            keep += 1
        if len(context) + k - 1 > self.runtime.context_limit:
            return []
        runtime = self.runtime
        feed = context[keep:]
        step = Step(sequence_id, keep, len(feed), rollback=True)
        draft: list[int] = []
        with torch.inference_mode():
            hidden = runtime.run([step], runtime.embed(feed))
            draft.append(runtime.greedy(hidden[-1:])[0])
            position = len(context)
            while len(draft) < k:
                hidden = runtime.run([Step(sequence_id, position, 1)], runtime.embed(draft[-1:]))
                draft.append(runtime.greedy(hidden)[0])
                position += 1
        self.cached[sequence_id] = [*context, *draft[:-1]]
        self.proposed += len(draft)
        self.steps += 1
        return draft

    def release(self, sequence_ids: list[int]) -> None:
        """Free these sequences' draft caches."""
        self.runtime.release(sequence_ids)
        for sid in sequence_ids:
            self.cached.pop(sid, None)
