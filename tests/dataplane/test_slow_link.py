"""A slow link between stages, emulated as docs/design.md's test tiers say: stage 1 runs in a
network namespace of its own, reached over a veth pair whose egress from stage 0 is shaped
by `tc tbf` (rate shaping works here; netem does not). Over that link the tokens still
equal single-process `generate`, and the bytes stage 0 sends are the hidden states'
(tokens x hidden_size x dtype bytes plus a small header per message). Needs root with
`ip` and `tc`; skipped otherwise."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dataplane import pipelines

RATE_MBIT = 2


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def shaped_namespace() -> Iterator[tuple[str, str, str]]:
    """(namespace, address of the root side, address inside the namespace)."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        pytest.skip("needs root with ip and tc to build a shaped network namespace")
    tag = f"{os.getpid() % 10000}"
    namespace, outside, inside = f"lp-{tag}", f"lpa{tag}", f"lpb{tag}"
    subnet = random.randint(0, 250)
    near, far = f"10.232.{subnet}.1", f"10.232.{subnet}.2"
    try:
        run("ip", "netns", "add", namespace)
        run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        run("ip", "link", "set", inside, "netns", namespace)
        run("ip", "addr", "add", f"{near}/24", "dev", outside)
        run("ip", "link", "set", outside, "up")
        run("ip", "netns", "exec", namespace, "ip", "addr", "add", f"{far}/24", "dev", inside)
        run("ip", "netns", "exec", namespace, "ip", "link", "set", inside, "up")
        run("ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up")
        # Stage 0 -> stage 1 traffic leaves through `outside`: shape it.
        run(
            "tc",
            "qdisc",
            "add",
            "dev",
            outside,
            "root",
            "tbf",
            "rate",
            f"{RATE_MBIT}mbit",
            "burst",
            "16kb",
            "latency",
            "400ms",
        )
    except subprocess.CalledProcessError as error:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
        pytest.skip(f"cannot build the shaped namespace here: {error.stderr.strip()}")
    yield namespace, near, far
    subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
    subprocess.run(["ip", "link", "del", outside], capture_output=True, check=False)


def test_tokens_are_exact_and_bytes_match_over_a_shaped_link(
    shaped_namespace: tuple[str, str, str],
    model_dirs: dict[str, Path],
    tmp_path: Path,
) -> None:
    namespace, near, far = shaped_namespace
    model_dir = model_dirs["llama-gqa"]
    pipeline = pipelines.Pipeline.start(
        model_dir,
        tmp_path,
        stages=2,
        max_context=1024,
        hosts=[near, far],
        prefixes=[[], ["ip", "netns", "exec", namespace]],
    )
    try:
        prompt, new = [3 + i % 280 for i in range(400)], 6  # 400 x 64 x 4 bytes = 100 KiB
        started = time.monotonic()
        status, body = pipelines.http_json(
            f"{pipeline.base_url}/v1/completions",
            {
                "model": "tiny",
                "prompt": prompt,
                "max_tokens": new,
                "temperature": 0,
                "return_token_ids": True,
            },
        )
        took = time.monotonic() - started
        assert status == 200, body
        got = body["choices"][0]["token_ids"]
        assert got == pipelines.reference_tokens(model_dir, [prompt], [new])[0]

        metrics = urllib.request.urlopen(f"{pipeline.base_url}/metrics").read().decode()
        sent = float(re.search(r'llmpipe_bytes_sent_total\{stage="0"\} (\S+)', metrics)[1])
        hops = len(got)  # the prompt once, then one message per further token
        payload = (len(prompt) + len(got) - 1) * 64 * 4
        assert payload < sent < payload + 64 * hops
        # stage 0 timed each of its hops over the shaped link (llmpipe_stage_send_seconds)
        timed = re.search(r'llmpipe_stage_send_seconds_count\{stage="0"\} (\S+)', metrics)
        assert timed is not None and float(timed[1]) == hops
        print(
            f"\n{len(prompt)}-token prompt + {len(got)} tokens over a {RATE_MBIT} Mbit/s "
            f"link: {took:.2f} s, {sent:.0f} bytes sent by stage 0 "
            f"(link time for them: {sent * 8 / (RATE_MBIT * 1e6):.2f} s)"
        )
    finally:
        pipeline.stop()
