"""API keys on stage 0's OpenAI endpoint, with real stage processes: a missing or wrong key
is 401 in OpenAI's error shape, a right key (any of several) is 200, the `openai` client
works with `api_key=`, the probes stay open, /metrics is open unless --protect-metrics,
rewriting the key files rotates the keys without a restart, and `llmpipe serve
--api-key-file` serves the same way."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.dataplane import pipelines


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Laid out like a mounted Secret: one file per data key, one or more keys per file."""
    path = tmp_path_factory.mktemp("api-keys")
    (path / "alice").write_text("key-alice\n")
    (path / "team").write_text("# the team's keys\nkey-team-1\nkey-team-2\n")
    return path


@pytest.fixture(scope="module")
def pipeline(
    model_dirs: dict[str, Path], start_pipeline, keys_dir: Path
) -> Iterator[pipelines.Pipeline]:
    yield start_pipeline(
        model_dirs["llama-gqa"], stages=2, extra_args=("--api-keys", str(keys_dir))
    )


def call(
    url: str, *, key: str | None = None, body: dict[str, object] | None = None
) -> tuple[int, dict[str, str], bytes]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


COMPLETION = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}


@pytest.mark.parametrize("key", [None, "", "key-alic", "key-alicex", "KEY-ALICE", "nope"])
def test_a_missing_or_wrong_key_is_401_in_the_openai_shape(
    pipeline: pipelines.Pipeline, key: str | None
) -> None:
    for path, body in (
        ("/v1/completions", COMPLETION),
        ("/v1/models", None),
        ("/v1/unknown", None),
        ("/v1/../v1/models", None),
    ):
        status, headers, data = call(f"{pipeline.base_url}{path}", key=key, body=body)
        assert status == 401, (path, key)
        error = json.loads(data)["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        assert ("missing API key" if not key else "invalid API key") in error["message"]
        assert headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("key", ["key-alice", "key-team-1", "key-team-2"])
def test_every_right_key_is_200(pipeline: pipelines.Pipeline, key: str) -> None:
    status, _, data = call(f"{pipeline.base_url}/v1/completions", key=key, body=COMPLETION)
    assert status == 200 and json.loads(data)["usage"]["completion_tokens"] == 3


def test_the_probes_and_metrics_stay_open(pipeline: pipelines.Pipeline) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        status, _, _ = call(f"{pipeline.base_url}{path}")
        assert status == 200, path


def test_the_openai_client_works_with_api_key(pipeline: pipelines.Pipeline) -> None:
    client = openai.OpenAI(base_url=f"{pipeline.base_url}/v1", api_key="key-team-2", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=5,
        temperature=0,
        stream=True,
    )
    assert any(c.choices and c.choices[0].finish_reason for c in stream)
    wrong = openai.OpenAI(base_url=f"{pipeline.base_url}/v1", api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        wrong.completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert raised.value.status_code == 401 and "invalid API key" in str(raised.value)


def test_rewriting_the_key_files_rotates_without_a_restart(
    pipeline: pipelines.Pipeline, keys_dir: Path
) -> None:
    pid = pipeline.processes[0].pid
    url = f"{pipeline.base_url}/v1/completions"
    (keys_dir / "alice").write_text("key-alice-rotated\n")
    assert call(url, key="key-alice-rotated", body=COMPLETION)[0] == 200
    assert call(url, key="key-alice", body=COMPLETION)[0] == 401
    (keys_dir / "team").unlink()  # a data key removed from the Secret
    assert call(url, key="key-team-1", body=COMPLETION)[0] == 401
    assert call(url, key="key-alice-rotated", body=COMPLETION)[0] == 200
    assert pipeline.processes[0].pid == pid and pipeline.processes[0].poll() is None


def test_protect_metrics_puts_metrics_behind_the_keys(
    model_dirs: dict[str, Path], start_pipeline, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("metrics-key\n")
    protected = start_pipeline(
        model_dirs["qwen2-tied"],
        stages=1,
        extra_args=("--api-keys", str(keys), "--protect-metrics"),
    )
    assert call(f"{protected.base_url}/metrics")[0] == 401
    status, _, data = call(f"{protected.base_url}/metrics", key="metrics-key")
    assert status == 200 and b"llmpipe_kv_cache_bytes" in data
    assert call(f"{protected.base_url}/readyz")[0] == 200


def test_llmpipe_serve_with_an_api_key_file(tmp_path: Path) -> None:
    http_port, grpc_port = pipelines.free_port_blocks(2, 4)
    key_file = tmp_path / "keys"
    key_file.write_text("serve-key\n")
    args = ["--model", "demo", "--stages", "1", "--port", str(http_port)]
    args += ["--grpc-port", str(grpc_port), "--threads", "1", "--api-key-file", str(key_file)]
    args += ["--run-dir", str(tmp_path / "run")]
    with pipelines.serving(args, timeout=180, cache=tmp_path / "cache") as served:
        output = served.output
        assert f"Authorization: Bearer <a key from {key_file}>" in output, output
        base = f"http://127.0.0.1:{http_port}/v1"
        client = openai.OpenAI(base_url=base, api_key="serve-key", max_retries=0)
        reply = client.completions.create(model="llmpipe-demo", prompt="hello", max_tokens=3)
        assert reply.usage is not None and reply.usage.completion_tokens >= 1
        assert call(f"{base}/models")[0] == 401
    assert served.exit_code == 0
