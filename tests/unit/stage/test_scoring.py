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
    top = scoring.parse_scoring({"logprobs": 5, "echo": True}, chat=False, stream=False)
    assert top == scoring.Scoring(logprobs=True, echo=True, top=5)
    assert scoring.parse_scoring({"logprobs": 2}, chat=False, stream=True).top == 2


@pytest.mark.parametrize(
    "body, chat, stream, message",
    [
        ({"logprobs": 6}, False, False, r"integer in \[0, 5\]"),
        ({"logprobs": -1}, False, False, r"integer in \[0, 5\]"),
        ({"logprobs": True}, False, False, r"integer in \[0, 5\]"),
        ({"logprobs": 0, "echo": True}, False, True, "not supported with stream"),
        ({"echo": "yes"}, False, False, "echo must be a boolean"),
        ({"logprobs": 1}, True, False, "logprobs must be a boolean"),
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
    top = scoring.parse_scoring({"logprobs": True, "top_logprobs": 20}, chat=True, stream=True)
    assert top == scoring.Scoring(logprobs=True, top=20)
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


def test_chat_logprobs_object_with_alternatives() -> None:
    got = scoring.chat_logprobs_object(
        [" Paris", "."],
        token_scores=[-0.5, -0.25],
        top=[[(" Paris", -0.5), (" Lyon", -1.5)], [(".", -0.25), ("!", -math.inf)]],
    )
    assert got["content"][0]["top_logprobs"] == [
        {"token": " Paris", "logprob": -0.5, "bytes": [32, 80, 97, 114, 105, 115]},
        {"token": " Lyon", "logprob": -1.5, "bytes": [32, 76, 121, 111, 110]},
    ]
    assert got["content"][1]["top_logprobs"][1] == {
        "token": "!",
        "logprob": -math.inf,
        "bytes": [33],
    }
    with pytest.raises(ValueError):  # one list of alternatives per token
        scoring.chat_logprobs_object([" a", " b"], token_scores=[-1.0, -1.0], top=[[]])


def test_completions_alternatives_are_a_dict_per_position() -> None:
    got = scoring.logprobs_object(
        ["The", " sky", " blue"],
        prompt_scores=[-1.5],
        token_scores=[-0.125],
        echo=True,
        top=[None, [(" sky", -1.5), (" sea", -2.0)], [(" blue", -0.125), (" blue", -9.0)]],
    )
    assert got["top_logprobs"] == [
        None,  # the first echoed token is not scored
        {" sky": -1.5, " sea": -2.0},
        {" blue": -0.125},  # two tokens with one text: the likelier is kept
    ]
