"""Stage 0's response side (pure, no server, no torch, no tokenizer): the text a stream
sends token by token (stop strings cut it, a possible stop prefix and an incomplete
character are held back, the finish reason follows EOS), and OpenAI's body shapes."""

from __future__ import annotations

import json

from llmpipe_stage import api_responses as responses

PIECES = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: ".", 6: "\ufffd", 7: "é", 0: ""}


def decode(ids: list[int]) -> str:
    """A toy vocabulary: token id -> text piece (6 stands for half a character)."""
    text = "".join(PIECES[i] for i in ids)
    return text.replace("\ufffdé", "é")


def run(stream: responses.TextStream, tokens: list[int]) -> list[str]:
    sent = []
    for token in tokens:
        piece = stream.push(token)
        if piece is not None:
            sent.append(piece)
        if stream.stopped:
            return sent
    sent.append(stream.rest())
    return sent


def test_pieces_join_to_the_whole_text_and_finish_is_length() -> None:
    stream = responses.TextStream(decode=decode)
    assert "".join(run(stream, [1, 2, 3, 4])) == "Hello world"
    assert stream.finish == "length" and not stream.stopped and stream.ids == [1, 2, 3, 4]


def test_a_stop_string_cuts_the_text_before_it() -> None:
    stream = responses.TextStream(decode=decode, stops=("wor",))
    assert "".join(run(stream, [1, 2, 3, 4])) == "Hello "
    assert stream.stopped and stream.finish == "stop" and stream.ids == [1, 2, 3]


def test_a_possible_start_of_a_stop_string_is_held_back_until_it_is_not() -> None:
    stream = responses.TextStream(decode=decode, stops=("lo!",))
    assert stream.push(1) == "He"  # "l" may begin "lo!"
    assert stream.push(2) == "l"  # "Hello": the final "lo" may begin it
    assert stream.push(3) == "lo wor"


def test_an_incomplete_character_is_held_back() -> None:
    stream = responses.TextStream(decode=decode)
    assert stream.push(1) == "Hel"
    assert stream.push(6) is None
    assert stream.push(7) == "é"


def test_eos_finishes_with_stop_unless_ignored() -> None:
    stream = responses.TextStream(decode=decode, eos_token_ids=frozenset({0}))
    run(stream, [1, 0])
    assert stream.finish == "stop"
    ignoring = responses.TextStream(decode=decode, eos_token_ids=frozenset({0}), ignore_eos=True)
    run(ignoring, [1, 0])
    assert ignoring.finish == "length"


def test_without_streaming_the_text_is_decoded_once_at_the_end() -> None:
    calls: list[list[int]] = []

    def counting(ids: list[int]) -> str:
        calls.append(list(ids))
        return decode(ids)

    stream = responses.TextStream(decode=counting, incremental=False)
    assert run(stream, [1, 2, 3]) == ["Hello wor"]
    assert calls == [[1, 2, 3]]


def test_stream_chunks_and_bodies_have_openai_shapes() -> None:
    reply = responses.Reply(id="cmpl-1", object="text_completion", created=7, model="tiny")
    usage = responses.usage(3, 2)
    assert usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    body = reply.body([responses.stream_choice("hi", None, chat=False)])
    assert body["choices"] == [{"index": 0, "text": "hi", "finish_reason": None, "logprobs": None}]
    assert responses.stream_choice(None, None, chat=True, role=True)["delta"] == {
        "role": "assistant",
        "content": "",
    }
    assert responses.stream_choice("", "stop", chat=True)["delta"] == {}
    assert responses.stream_choice("x", None, chat=True, index=2)["index"] == 2
    event = responses.event(body)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[6:]) == body
    error = json.loads(responses.stream_error("stage 1 is unreachable")[6:])
    assert error["error"]["type"] == "service_unavailable" and error["error"]["code"] == 503


def test_a_whole_completion_choice_carries_token_ids_only_when_asked() -> None:
    chat = responses.completion_choice("Paris", "stop", chat=True, logprobs=None, token_ids=None)
    assert chat == {
        "index": 0,
        "finish_reason": "stop",
        "logprobs": None,
        "message": {"role": "assistant", "content": "Paris"},
    }
    text = responses.completion_choice(
        "x", "length", chat=False, logprobs=None, token_ids=[4], index=3
    )
    assert text["text"] == "x" and text["token_ids"] == [4] and text["index"] == 3


def sentencepiece_like(pieces: dict[int, bytes]):
    """A decode that, like a SentencePiece tokenizer, drops the text's leading space and
    shows an incomplete UTF-8 character as U+FFFD."""

    def decode(ids: list[int]) -> str:
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace").lstrip(" ")

    return decode


def test_token_texts_join_into_the_decoded_text() -> None:
    pieces = {1: b" the", 2: b" caf", 3: b"\xc3", 4: b"\xa9", 5: b" is", 6: b" open"}
    decode = sentencepiece_like(pieces)
    ids = [1, 2, 3, 4, 5, 6]
    texts = responses.token_texts(decode, ids)
    assert "".join(texts) == decode(ids) == "the café is open"
    # the space a token alone would lose is kept; the split character goes to its end
    assert texts == ["the", " caf", "", "é", " is", " open"]
    assert [decode([i]) for i in ids][4] == "is"  # what decoding alone would have shown
