"""The gateway's pure request handling: sampling fields and context-limit checks, and how
stop strings are found and held back while streaming."""

from __future__ import annotations

import pytest

from llmpipe_stage import gateway


def parse(body: dict[str, object], prompt: int = 10, limit: int = 64) -> gateway.Generation:
    return gateway.parse_generation(body, list(range(prompt)), context_limit=limit, default_max=16)


def test_defaults_follow_openai() -> None:
    generation = parse({})
    assert generation.params.max_new_tokens == 16
    assert generation.params.temperature == 1.0 and generation.params.top_p == 1.0
    assert generation.stop == () and not generation.stream


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"temperature": 3}, "temperature must be a number in [0.0, 2.0]"),
        ({"top_p": -0.1}, "top_p must be a number in [0.0, 1.0]"),
        ({"max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"max_tokens": 60}, "lower max_tokens to 54 or less"),
        ({"seed": "x"}, "seed must be an integer"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "up to 4 non-empty strings"),
        ({"n": 2}, "only n=1"),
    ],
)
def test_bad_fields_are_400_naming_the_field(body: dict[str, object], says: str) -> None:
    with pytest.raises(gateway.RequestError) as raised:
        parse(body)
    assert says in str(raised.value) and raised.value.status == 400


def test_a_prompt_at_the_limit_is_refused_naming_it() -> None:
    with pytest.raises(gateway.RequestError, match="context limit is 64 tokens"):
        parse({}, prompt=64)


def test_stop_strings() -> None:
    assert gateway.find_stop("hello world. bye", ("world",), start=0) == 6
    assert gateway.find_stop("hello world. bye", ("bye", "."), start=0) == 11
    assert gateway.find_stop("hello", ("x",), start=0) == -1
    # While streaming, a possible beginning of a stop string is not sent yet.
    assert gateway.held_back("the river sto", ("stop",)) == 3
    assert gateway.held_back("the river", ("stop",)) == 0
