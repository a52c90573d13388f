"""A model file the stage's uid may not read is reported as "permission denied", naming
the file and the uid, not as a missing file (transformers writes model.safetensors with
mode 0600, so a hostPath model saved by root is unreadable by the stage's uid 10001).

The loader runs in a forked child that drops to uid 10001, as the stage container does;
the parent (root here) could read everything. Skipped where the tests cannot switch uid.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llmpipe_stage import loading

STAGE_UID = 10001

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to uid 10001")


def as_stage_user(action: Callable[[], object]) -> str:
    """Run `action` as uid 10001 in a child; the text of the LoadError it raised, or ''."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.close(read)
        message = ""
        try:
            os.setgid(STAGE_UID)
            os.setuid(STAGE_UID)
            action()
        except loading.LoadError as error:
            message = str(error)
        except (OSError, ValueError, RuntimeError) as error:  # shown by the parent
            message = f"unexpected {type(error).__name__}: {error}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(child, 0)
    return text


@pytest.fixture
def model_dir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="llmpipe-perm-"))
    root.chmod(0o755)  # reachable by the stage uid; pytest's tmp_path is 0700
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "model.safetensors").write_bytes(b"\0" * 16)
    for path in root.iterdir():
        path.chmod(0o644)
    yield root
    shutil.rmtree(root)


def test_an_unreadable_weights_file_says_permission_denied(model_dir: Path) -> None:
    weights = model_dir / "model.safetensors"
    weights.chmod(0o600)  # as save_pretrained leaves it, owned by root
    text = as_stage_user(lambda: loading.tensor_files(model_dir))
    assert text.startswith("permission denied:"), text
    assert str(weights) in text
    assert "uid 10001" in text
    assert "owner uid 0, mode -rw-------" in text


def test_an_unreadable_config_says_permission_denied(model_dir: Path) -> None:
    (model_dir / "config.json").chmod(0o600)
    text = as_stage_user(lambda: loading.load_config(model_dir))
    assert text.startswith("permission denied:"), text
    assert str(model_dir / "config.json") in text and "uid 10001" in text


def test_an_unlistable_model_directory_says_permission_denied(model_dir: Path) -> None:
    model_dir.chmod(0o700)
    text = as_stage_user(lambda: loading.load_config(model_dir))
    assert text.startswith(f"permission denied: {model_dir} is not readable by uid 10001"), text


def test_readable_files_pass_the_check(model_dir: Path) -> None:
    text = as_stage_user(lambda: loading.require_readable(model_dir / "model.safetensors"))
    assert text == ""
