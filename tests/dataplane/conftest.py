"""Dataplane fixtures: the tiny models (once per session) and a pipeline starter that
always stops its processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dataplane import pipelines


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    return {name: pipelines.write_family(root / name, name) for name in pipelines.FAMILIES}


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The shipped default model's GGUF file, fetched once into the user cache if missing
    (scripts/test fetches it before the tests; nothing here skips for lack of it)."""
    from llmpipe_stage import models

    return models.ensure_default_model()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path) -> Path:
    """Its converted model directory (float32), converted once per content hash and cached."""
    from llmpipe_stage import gguf_convert, models

    return gguf_convert.ensure_converted(smollm2_gguf, models.CACHE_DIR / "gguf")


@pytest.fixture(scope="module")
def start_pipeline(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., pipelines.Pipeline]]:
    started: list[pipelines.Pipeline] = []

    def start(model_dir: Path, *, stages: int, **options: Any) -> pipelines.Pipeline:
        run_dir = tmp_path_factory.mktemp(f"pipeline-{stages}")
        pipeline = pipelines.Pipeline.start(model_dir, run_dir, stages=stages, **options)
        started.append(pipeline)
        return pipeline

    yield start
    for pipeline in started:
        pipeline.stop()
