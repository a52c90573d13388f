"""Completions' `logprobs` and `echo` fields and chat's `logprobs` and `top_logprobs`: what
is accepted, what is refused by name, and OpenAI's two logprobs objects (completions: first
echoed token unscored, offsets into the returned text; chat: token, logprob, bytes)."""

from __future__ import annotations

import math

import pytest

from llmpipe_stage import scoring


def test_logprobs_zero_and_echo_are_read() -> None:
    assert scoring.parse_scoring({}, chat=False, stream=False) == scoring.Scoring()
    asked = scoring.parse_scoring({"logprobs": 0, "echo": True}, chat=False, stream=False)
    assert asked == scoring.Scoring(logprobs=True, echo=True)
    assert scoring.parse_scoring({"echo": True}, chat=False, stream=True).echo
    assert scoring.parse_scoring({"logprobs": 0}, chat=False, stream=True).logprobs


@pytest.mark.parametrize(
    "body, chat, stream, message",
    [
        ({"logprobs": 5}, False, False, "only logprobs=0 is supported"),
        ({"logprobs": -1}, False, False, "non-negative integer"),
        ({"logprobs": True}, False, False, "non-negative integer"),
        ({"logprobs": 0, "echo": True}, False, True, "not supported with stream"),
        ({"echo": "yes"}, False, False, "echo must be a boolean"),
        ({"logprobs": 1}, True, False, "logprobs must be a boolean"),
        ({"logprobs": True, "top_logprobs": 3}, True, False, "only top_logprobs=0"),
        ({"logprobs": True, "top_logprobs": 21}, True, False, r"integer in \[0, 20\]"),
        ({"logprobs": True, "top_logprobs": True}, True, False, r"integer in \[0, 20\]"),
        ({"top_logprobs": 0}, True, False, "top_logprobs needs logprobs: true"),
    ],
)
def test_unsupported_requests_are_refused(
    body: dict, chat: bool, stream: bool, message: str
) -> None:
    with pytest.raises(scoring.ScoringError, match=message):
        scoring.parse_scoring(body, chat=chat, stream=stream)


def test_chat_logprobs_are_read() -> None:
    assert scoring.parse_scoring({}, chat=True, stream=True) == scoring.Scoring()
    assert scoring.parse_scoring({"logprobs": False}, chat=True, stream=True) == scoring.Scoring()
    asked = scoring.parse_scoring({"logprobs": True, "top_logprobs": 0}, chat=True, stream=False)
    assert asked == scoring.Scoring(logprobs=True)
    assert scoring.parse_scoring({"logprobs": True}, chat=True, stream=True).logprobs
    # echo is a completions field: on chat it is not read
    assert not scoring.parse_scoring({"echo": True}, chat=True, stream=False).echo


def test_chat_logprobs_object() -> None:
    got = scoring.chat_logprobs_object([" Paris", "\u00e9", "."], token_scores=[-0.5, -2.0, -0.25])
    assert got == {
        "content": [
            {
                "token": " Paris",
                "logprob": -0.5,
                "bytes": [32, 80, 97, 114, 105, 115],
                "top_logprobs": [],
            },
            {"token": "\u00e9", "logprob": -2.0, "bytes": [195, 169], "top_logprobs": []},
            {"token": ".", "logprob": -0.25, "bytes": [46], "top_logprobs": []},
        ]
    }
    with pytest.raises(ValueError):
        scoring.chat_logprobs_object(["a", "b"], token_scores=[-1.0])


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
