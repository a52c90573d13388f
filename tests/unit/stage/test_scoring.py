"""Completions' `logprobs` and `echo` fields: what is accepted, what is refused by name, and
the OpenAI logprobs object (first echoed token unscored, offsets into the returned text)."""

from __future__ import annotations

import math

import pytest

from llmpipe_stage import scoring


def test_logprobs_zero_and_echo_are_read() -> None:
    assert scoring.parse_scoring({}, chat=False, stream=False) == scoring.Scoring()
    asked = scoring.parse_scoring({"logprobs": 0, "echo": True}, chat=False, stream=False)
    assert asked == scoring.Scoring(logprobs=True, echo=True)
    assert scoring.parse_scoring({"echo": True}, chat=False, stream=True).echo


@pytest.mark.parametrize(
    "body, chat, stream, message",
    [
        ({"logprobs": 5}, False, False, "only logprobs=0 is supported"),
        ({"logprobs": -1}, False, False, "non-negative integer"),
        ({"logprobs": True}, False, False, "non-negative integer"),
        ({"logprobs": 0}, False, True, "not supported with stream"),
        ({"echo": "yes"}, False, False, "echo must be a boolean"),
        ({"logprobs": True}, True, False, "not supported on chat"),
    ],
)
def test_unsupported_requests_are_refused(
    body: dict, chat: bool, stream: bool, message: str
) -> None:
    with pytest.raises(scoring.ScoringError, match=message):
        scoring.parse_scoring(body, chat=chat, stream=stream)


def test_logprobs_object_with_echo() -> None:
    got = scoring.logprobs_object(
        ["The", " sky", " is", " blue"],
        prompt_scores=[-1.5, -0.25],
        token_scores=[-0.125],
        echo=True,
    )
    assert got == {
        "tokens": ["The", " sky", " is", " blue"],
        "token_logprobs": [None, -1.5, -0.25, -0.125],
        "top_logprobs": None,
        "text_offset": [0, 3, 7, 10],
    }
    plain = scoring.logprobs_object(
        [" blue"], prompt_scores=None, token_scores=[math.nan], echo=False
    )
    assert plain["token_logprobs"] == [None]
