"""The OpenAI-compatible API of stage 0, driven by the `openai` package: models, completions,
chat completions, streaming (SSE), max_tokens, temperature/top_p/seed, stop strings, `n`
choices (whole and streamed), logprobs with their alternatives (chat's top_logprobs,
completions' logprobs N with echo); and /healthz, /readyz, /metrics on every
stage. A 2-stage Llama pipeline in real processes."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from transformers import AutoTokenizer

from tests.dataplane import pipelines


@pytest.fixture(scope="module")
def pipeline(model_dirs: dict[str, Path], start_pipeline) -> Iterator[pipelines.Pipeline]:
    yield start_pipeline(model_dirs["llama-gqa"], stages=2, max_context=256)


@pytest.fixture(scope="module")
def client(pipeline: pipelines.Pipeline) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{pipeline.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(model_dirs: dict[str, Path]):
    return AutoTokenizer.from_pretrained(model_dirs["llama-gqa"])


def greedy_text(model_dir: Path, tokenizer, prompt_ids: list[int], n: int) -> str:
    ids = pipelines.reference_tokens(model_dir, [prompt_ids], [n])[0]
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_text_equals_single_process_greedy(
    client: openai.OpenAI,
    tokenizer,
    model_dirs: dict[str, Path],
) -> None:
    prompt = "the river and the stone"
    result = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    expected = greedy_text(model_dirs["llama-gqa"], tokenizer, tokenizer.encode(prompt), 12)
    assert result.choices[0].text == expected
    assert result.usage is not None
    assert result.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert result.usage.completion_tokens == 12
    assert result.choices[0].finish_reason == "length"


def test_chat_uses_the_chat_template(
    client: openai.OpenAI,
    tokenizer,
    model_dirs: dict[str, Path],
) -> None:
    messages = [{"role": "user", "content": "hello, tell me a story"}]
    result = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0
    )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == greedy_text(
        model_dirs["llama-gqa"], tokenizer, ids, 10
    )


def test_streaming_chat_matches_the_whole_reply(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hello, tell me a story"}]
    whole = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=15, temperature=0
    )
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=15,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 1  # tokens arrive one by one, not at the end
    assert "".join(deltas) == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == whole.choices[0].finish_reason and set(finish[:-1]) == {None}
    assert chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streaming_completion(client: openai.OpenAI) -> None:
    whole = client.completions.create(
        model="tiny", prompt="a quiet night", max_tokens=8, temperature=0
    )
    parts = [
        c.choices[0].text
        for c in client.completions.create(
            model="tiny", prompt="a quiet night", max_tokens=8, temperature=0, stream=True
        )
    ]
    assert "".join(parts) == whole.choices[0].text


def test_stop_string_ends_the_text_before_it(client: openai.OpenAI) -> None:
    full = (
        client.completions.create(model="tiny", prompt="the sea", max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    stop = full.split()[3]  # a word the greedy continuation produces
    cut = client.completions.create(
        model="tiny", prompt="the sea", max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(stop)]
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny", prompt="the sea", max_tokens=12, temperature=0, stop=[stop], stream=True
        )
    )
    assert streamed == cut.choices[0].text


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return (
            client.completions.create(
                model="tiny", prompt="one day", max_tokens=20, temperature=1.0, seed=seed
            )
            .choices[0]
            .text
        )

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_n_choices_are_each_a_seeded_sample_of_their_own(client: openai.OpenAI) -> None:
    def sample(seed: int, n: int = 1) -> list[str]:
        reply = client.completions.create(
            model="tiny",
            prompt="one day",
            max_tokens=12,
            temperature=1.0,
            seed=seed,
            n=n,
            extra_body={"ignore_eos": True},
        )
        assert [c.index for c in reply.choices] == list(range(n))
        assert reply.usage is not None and reply.usage.completion_tokens == 12 * n
        return [c.text for c in reply.choices]

    three = sample(40, n=3)
    # choice i is what a request with seed + i samples alone, so the three differ
    assert three == [sample(40)[0], sample(41)[0], sample(42)[0]]
    assert len(set(three)) == 3


def test_n_greedy_choices_are_the_greedy_text(
    client: openai.OpenAI, tokenizer, model_dirs: dict[str, Path]
) -> None:
    messages = [{"role": "user", "content": "tell me about the sea"}]
    reply = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=9, temperature=0, n=2
    )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    expected = greedy_text(model_dirs["llama-gqa"], tokenizer, ids, 9)
    assert [c.message.content for c in reply.choices] == [expected, expected]


def test_streamed_n_choices_reassemble_into_the_whole_ones(client: openai.OpenAI) -> None:
    asked = dict(
        model="tiny",
        prompt="the hills",
        max_tokens=10,
        temperature=0.8,
        seed=5,
        n=3,
        extra_body={"ignore_eos": True},
    )
    whole = client.completions.create(**asked)
    parts = ["", "", ""]
    finishes: dict[int, str] = {}
    usage = None
    stream = client.completions.create(**asked, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts[choice.index] += choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert parts == [c.text for c in whole.choices]
    assert finishes == {0: "length", 1: "length", 2: "length"}
    assert usage is not None and usage.completion_tokens == 30


def test_chat_logprobs_score_the_generated_tokens(
    client: openai.OpenAI, tokenizer, model_dirs: dict[str, Path]
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    messages = [{"role": "user", "content": "a song of the wind"}]
    reply = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    scored = choice.logprobs.content
    assert "".join(t.token for t in scored) == choice.message.content
    assert all(t.top_logprobs == [] and bytes(t.bytes or []) == t.token.encode() for t in scored)
    # the reference: log-softmax of a single-process forward over prompt + reply
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    generated = pipelines.reference_tokens(model_dirs["llama-gqa"], [prompt], [6])[0]
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama-gqa"], dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated])).logits[0]  # [seq, vocab]
    logprobs = torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1 : -1]
    expected = logprobs.gather(1, torch.tensor(generated)[:, None])[:, 0].tolist()
    assert [t.logprob for t in scored] == pytest.approx(expected, abs=1e-3)


def reference_log_probs(model_dir: Path, ids: list[int]):
    """log-softmax of a single-process float32 forward over `ids`: [len(ids), vocab]."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def test_chat_top_logprobs_are_the_models_most_likely_tokens(
    client: openai.OpenAI, tokenizer, model_dirs: dict[str, Path]
) -> None:
    import torch

    messages = [{"role": "user", "content": "a song of the sea"}]
    reply = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True,
        top_logprobs=5,
    )  # fmt: skip
    scored = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert scored is not None and len(scored) == 6
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    generated = pipelines.reference_tokens(model_dirs["llama-gqa"], [prompt], [6])[0]
    log_probs = reference_log_probs(model_dirs["llama-gqa"], prompt + generated)
    for position, token in enumerate(scored):
        expected = torch.topk(log_probs[len(prompt) - 1 + position], 5)
        assert len(token.top_logprobs) == 5
        got = [alternative.logprob for alternative in token.top_logprobs]
        assert got == sorted(got, reverse=True)
        assert got == pytest.approx(expected.values.tolist(), abs=1e-3)
        # greedy: the chosen token is the likeliest, with the same text and score
        assert token.top_logprobs[0].token == token.token
        assert token.top_logprobs[0].logprob == token.logprob
        assert all(bytes(a.bytes or []) == a.token.encode() for a in token.top_logprobs)


def test_completion_logprobs_n_lists_alternatives_for_the_echoed_prompt_too(
    client: openai.OpenAI, tokenizer, model_dirs: dict[str, Path]
) -> None:
    import torch

    prompt = "the wind over the water"
    reply = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=3, echo=True
    )
    scored = reply.choices[0].logprobs
    assert scored is not None and scored.top_logprobs is not None and scored.tokens is not None
    prompt_ids = tokenizer.encode(prompt)
    generated = pipelines.reference_tokens(model_dirs["llama-gqa"], [prompt_ids], [4])[0]
    ids = prompt_ids + generated
    assert len(scored.top_logprobs) == len(ids) and scored.top_logprobs[0] is None
    log_probs = reference_log_probs(model_dirs["llama-gqa"], ids)
    for position in range(1, len(ids)):
        top = scored.top_logprobs[position]
        chosen_text, chosen = scored.tokens[position], scored.token_logprobs[position]
        row = log_probs[position - 1]
        expected = torch.topk(row, 3).values.tolist()
        # the three likeliest, and the chosen token besides when it is not among them
        # (two tokens of one text show once)
        assert 1 <= len(top) <= 4 and top[chosen_text] == chosen
        assert chosen == pytest.approx(float(row[ids[position]]), abs=1e-3)
        likeliest = sorted(top.values(), reverse=True)[:3]
        assert likeliest[0] == pytest.approx(expected[0], abs=1e-3)
        assert all(v >= expected[2] - 1e-3 or v == chosen for v in top.values())


def test_streamed_top_logprobs_are_the_whole_reply_s(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "the fields at noon"}]
    asked = dict(
        model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True,
        top_logprobs=3,
    )  # fmt: skip
    whole = client.chat.completions.create(**asked).choices[0].logprobs.content  # type: ignore[union-attr]
    streamed = []
    for chunk in client.chat.completions.create(**asked, stream=True):
        for choice in chunk.choices:
            if choice.logprobs is not None and choice.logprobs.content:
                streamed.extend(choice.logprobs.content)
    shown = [[(a.token, a.logprob) for a in t.top_logprobs] for t in streamed]
    assert shown == [[(a.token, a.logprob) for a in t.top_logprobs] for t in whole or []]
    assert all(len(t) == 3 for t in shown)


def test_streamed_logprobs_are_the_whole_reply_s(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "the mountain at dawn"}]
    asked = dict(model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True)
    whole = client.chat.completions.create(**asked).choices[0]
    assert whole.logprobs is not None and whole.logprobs.content is not None
    streamed = []
    text = ""
    for chunk in client.chat.completions.create(**asked, stream=True):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs is not None and choice.logprobs.content:
                streamed.extend(choice.logprobs.content)
    assert text == whole.message.content
    assert [t.token for t in streamed] == [t.token for t in whole.logprobs.content]
    assert [t.logprob for t in streamed] == pytest.approx(
        [t.logprob for t in whole.logprobs.content], abs=1e-6
    )


def test_streamed_completion_logprobs_offsets_index_the_text(client: openai.OpenAI) -> None:
    text, tokens, offsets = "", [], []
    stream = client.completions.create(
        model="tiny", prompt="a long road", max_tokens=10, temperature=0, logprobs=0, stream=True
    )
    for chunk in stream:
        choice = chunk.choices[0]
        text += choice.text
        if choice.logprobs is not None:
            tokens.extend(choice.logprobs.tokens or [])
            offsets.extend(choice.logprobs.text_offset or [])
    assert len(tokens) == 10 and "".join(tokens) == text
    assert [text[at : at + len(t)] for at, t in zip(offsets, tokens, strict=True)] == tokens


def test_streamed_echo_puts_the_prompt_in_front(client: openai.OpenAI, tokenizer) -> None:
    asked = dict(model="tiny", prompt="the old river", max_tokens=6, temperature=0, echo=True)
    whole = client.completions.create(**asked).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**asked, stream=True))
    prompt = tokenizer.decode(tokenizer.encode("the old river"))
    assert streamed == whole and whole.startswith(prompt) and len(whole) > len(prompt)


def test_tiny_top_p_keeps_only_the_most_likely_token(client: openai.OpenAI) -> None:
    greedy = (
        client.completions.create(model="tiny", prompt="the forest", max_tokens=10, temperature=0)
        .choices[0]
        .text
    )
    nucleus = (
        client.completions.create(
            model="tiny", prompt="the forest", max_tokens=10, temperature=1.0, top_p=1e-6, seed=3
        )
        .choices[0]
        .text
    )
    assert nucleus == greedy


def test_health_ready_and_metrics_on_every_stage(
    client: openai.OpenAI,
    pipeline: pipelines.Pipeline,
) -> None:
    client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0)
    for index, port in enumerate(pipeline.http_ports):
        base = f"http://127.0.0.1:{port}"
        assert pipelines.http_json(f"{base}/healthz")[1]["phase"] == "ready"
        assert pipelines.http_json(f"{base}/readyz")[0] == 200
        text = urllib.request.urlopen(f"{base}/metrics").read().decode()
        label = f'{{stage="{index}"}}'
        assert re.search(rf"llmpipe_stage_compute_seconds_count{re.escape(label)} [1-9]", text)
        assert re.search(rf"llmpipe_bytes_sent_total{re.escape(label)} [1-9]", text)
    stage0 = urllib.request.urlopen(f"{pipeline.base_url}/metrics").read().decode()
    assert re.search(r"llmpipe_generated_tokens_total [1-9]", stage0)
    assert re.search(r"llmpipe_time_to_first_token_seconds_count [1-9]", stage0)
    assert "llmpipe_queue_depth 0.0" in stage0
    assert "llmpipe_tokens_per_second" in stage0
