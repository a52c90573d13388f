"""Stage 0's request parsing (pure, no server): malformed bodies are RequestErrors (400),
never crashes, whatever the bytes; booleans must be booleans; numbers are range-checked;
prompts are bounded in characters before tokenizing; the context limit names the fix; stop
strings are found and held back while streaming."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmpipe_stage import api_requests as api
from llmpipe_stage import api_responses


def completion(body: dict[str, Any], *, chat: bool = False, chars: int = 1000) -> Any:
    return api.parse_completion(body, chat=chat, model_name="tiny", max_prompt_chars=chars)


def fit(body: dict[str, Any], prompt: int = 10, limit: int = 64) -> api.Generation:
    request = completion({"prompt": "x", **body})
    return api.fit_context(
        request, list(range(prompt)), context_limit=limit, vocab_size=100, default_max=16
    )


def test_defaults_follow_openai() -> None:
    generation = fit({})
    assert generation.max_tokens == 16 and generation.options.n == 1
    assert generation.options.temperature == 1.0 and generation.options.top_p == 1.0
    assert generation.options.stop == () and not generation.options.stream


def test_fields_set_to_their_neutral_values_are_accepted() -> None:
    neutral = {
        "tools": [],
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "best_of": 1,
        "response_format": {"type": "text"},
        "suffix": "",
    }
    assert fit(neutral).options.n == 1
    listed = {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"}
    assert fit(listed).max_tokens == 16


def test_n_choices_up_to_the_limit() -> None:
    assert fit({"n": 3}).options.n == 3
    assert fit({"n": api.MAX_CHOICES}).options.n == api.MAX_CHOICES


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"temperature": 3}, "temperature must be a number in [0.0, 2.0]"),
        ({"temperature": "0.5"}, "temperature must be a number"),
        ({"temperature": True}, "temperature must be a number"),
        ({"top_p": -0.1}, "top_p must be a number in [0.0, 1.0]"),
        ({"max_tokens": 0}, "max_tokens must be an integer in [1, "),
        ({"max_tokens": 2.0}, "max_tokens must be an integer"),
        ({"max_tokens": 60}, "lower max_tokens to 54 or less"),
        ({"seed": "x"}, "seed must be an integer"),
        ({"seed": 2**64}, "seed must be an integer in"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "up to 4 non-empty strings"),
        ({"stop": [""]}, "up to 4 non-empty strings"),
        ({"stop": "x" * 257}, "of at most 256 characters"),
        ({"n": 17}, "at most 16 choices per request"),
        ({"n": 0}, "n must be an integer in [1, "),
        ({"n": True}, "n must be an integer"),
        ({"stream": "false"}, "stream must be true or false (a JSON boolean), got 'false'"),
        ({"stream": 1}, "stream must be true or false"),
        ({"stream_options": "yes"}, "stream_options must be an object, got 'yes'"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage must be"),
        ({"ignore_eos": "no"}, "ignore_eos must be true or false"),
        (
            {"return_token_ids": []},
            "return_token_ids must be true or false (a JSON boolean), got an array",
        ),
        ({"model": 7}, "model must be a string"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool calls are not"),
        ({"functions": [{"name": "f"}]}, "function calls are not supported"),
        ({"response_format": {"type": "json_object"}}, "response_format is not supported"),
        ({"logit_bias": {"50": 100}}, "logit_bias is not supported"),
        ({"presence_penalty": 0.5}, "presence_penalty is not supported (only 0)"),
        ({"frequency_penalty": True}, "frequency_penalty is not supported"),
        ({"best_of": 3}, "best_of is not supported"),
        ({"suffix": "}"}, "suffix (insertion) is not supported"),
    ],
)
def test_bad_fields_are_400_naming_the_field(body: dict[str, Any], says: str) -> None:
    with pytest.raises(api.RequestError) as raised:
        fit(body)
    assert says in str(raised.value) and raised.value.status == 400


def test_booleans_are_read_as_booleans() -> None:
    options = fit({"stream": False, "stream_options": {"include_usage": True}}).options
    assert options.stream is False and options.include_usage is True
    assert fit({"stream": True, "ignore_eos": True}).options.stream is True


def test_an_unknown_model_is_404() -> None:
    with pytest.raises(api.RequestError, match="does not exist") as raised:
        completion({"model": "other", "prompt": "x"})
    assert raised.value.status == 404


def test_a_prompt_at_the_limit_is_refused_naming_it() -> None:
    with pytest.raises(api.RequestError, match="context limit is 64 tokens"):
        fit({}, prompt=64)


def test_token_id_prompts_are_checked_against_the_vocabulary() -> None:
    request = completion({"prompt": [1, 2, 100]})
    with pytest.raises(api.RequestError, match=r"in \[0, 100\)"):
        api.fit_context(request, [1, 2, 100], context_limit=64, vocab_size=100, default_max=16)
    with pytest.raises(api.RequestError, match="list of token ids"):
        completion({"prompt": [1, True]})


def test_prompts_are_bounded_in_characters_before_tokenizing() -> None:
    with pytest.raises(api.RequestError, match=r"the prompt is 1001 characters; .* at most 1000"):
        completion({"prompt": "a" * 1001})
    messages = [{"role": "user", "content": "a" * 600}, {"role": "user", "content": "b" * 600}]
    with pytest.raises(api.RequestError, match="at most 1000") as raised:
        completion({"messages": messages}, chat=True)
    assert raised.value.param == "messages"
    assert completion({"prompt": "a" * 1000}).text == "a" * 1000


def test_chat_messages_take_strings_or_text_parts() -> None:
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    request = completion({"messages": [{"role": "user", "content": parts}]}, chat=True)
    assert request.messages == (("user", "one\ntwo"),)
    for bad in (
        [],
        [{"role": "user"}],
        [{"role": "robot", "content": "x"}],
        [{"role": "user", "content": [{"type": "image_url"}]}],
        ["hello"],
    ):
        with pytest.raises(api.RequestError, match="messages must be"):
            completion({"messages": bad}, chat=True)


def test_the_number_of_messages_is_bounded() -> None:
    many = [{"role": "user", "content": ""}] * (api.MAX_MESSAGES + 1)
    with pytest.raises(api.RequestError, match="at most 4096 are taken"):
        completion({"messages": many}, chat=True)


def test_unpaired_surrogates_are_refused() -> None:
    body = api.parse_body(b'{"prompt": "a\\ud800b"}')
    with pytest.raises(api.RequestError, match="unpaired UTF-16 surrogate"):
        completion(body)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nests deeper than 32 levels"),
        (b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}", "nests deeper than 32 levels"),
        (b'{"prompt": "\xff\xfe"}', "not valid UTF-8 (byte 12"),
        (b'{"temperature": NaN}', "NaN is not valid JSON"),
        (b'{"max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, got an array"),
        (b'"text"', "must be a JSON object, got a string"),
    ],
)
def test_malformed_bodies_are_request_errors(data: bytes, says: str) -> None:
    with pytest.raises(api.RequestError) as raised:
        api.parse_body(data)
    assert says in str(raised.value) and raised.value.status == 400


def test_error_messages_stay_short_whatever_was_sent() -> None:
    with pytest.raises(api.RequestError) as raised:
        fit({"temperature": "x" * 100_000})
    assert len(str(raised.value)) < 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
FIELDS = [
    *("model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature"),
    *("top_p", "seed", "n", "stop", "stream", "stream_options", "ignore_eos", "return_token_ids"),
    *("logprobs", "top_logprobs", "echo", "tools", "response_format", "presence_penalty"),
]
bodies = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=8)


@settings(max_examples=400, deadline=None)
@given(body=bodies, chat=st.booleans())
def test_any_json_body_parses_or_is_a_request_error(body: dict[str, Any], chat: bool) -> None:
    data = json.dumps(body).encode()
    try:
        request = completion(api.parse_body(data), chat=chat)
        api.fit_context(request, [1, 2, 3], context_limit=64, vocab_size=100, default_max=16)
    except api.RequestError as error:
        assert error.status in (400, 404) and str(error)
        return
    # What got through is well-typed: the gateway relies on it.
    options = request.options
    assert isinstance(options.stream, bool) and isinstance(options.include_usage, bool)
    assert 0.0 <= options.temperature <= 2.0 and 0.0 <= options.top_p <= 1.0
    assert options.max_tokens is None or options.max_tokens >= 1
    assert 1 <= options.n <= api.MAX_CHOICES


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=200))
def test_any_bytes_parse_or_are_a_request_error(data: bytes) -> None:
    try:
        assert isinstance(api.parse_body(data), dict)
    except api.RequestError as error:
        assert error.status == 400


def test_stop_strings() -> None:
    assert api_responses.find_stop("hello world. bye", ("world",), start=0) == 6
    assert api_responses.find_stop("hello world. bye", ("bye", "."), start=0) == 11
    assert api_responses.find_stop("hello", ("x",), start=0) == -1
    # While streaming, a possible beginning of a stop string is not sent yet.
    assert api_responses.held_back("the river sto", ("stop",)) == 3
    assert api_responses.held_back("the river", ("stop",)) == 0
