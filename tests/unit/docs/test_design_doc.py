"""The design lives in the repo: docs/design.md states the contract between the parts, and
no tracked file cites a design or style document outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DESIGN = ROOT / "docs" / "design.md"
# Names of the documents the project started from, which live outside the repository.
OUTSIDE = re.compile(r"(?<![\w/])DESIGN\.md|STYLE\.md|\.\./shared/")


def tracked_text_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.decode()
    paths = [ROOT / name for name in out.split("\0") if name]
    return [p for p in paths if p.is_file() and p.suffix not in {".gguf", ".safetensors"}]


def test_design_doc_covers_the_contract() -> None:
    text = DESIGN.read_text()
    for heading in (
        "## Names",
        "### Cluster file",
        "### Model profile",
        "### Plan",
        "## Cost model v2",
        "## Wire protocol",
        "## Test tiers",
    ):
        assert heading in text, f"docs/design.md lacks {heading!r}"
    assert "Exactness guarantee" in text


def test_no_file_cites_a_document_outside_the_repo() -> None:
    offenders = []
    for path in tracked_text_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == [], "files cite documents outside the repo:\n" + "\n".join(offenders)
