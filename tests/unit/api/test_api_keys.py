"""API keys (pure, real files): key files and mounted-Secret directories, one key per line;
the Bearer header; every key is compared; a rewritten file or a swapped Secret is seen at
the next check without a restart; unreadable or empty keys allow nobody."""

from __future__ import annotations

import os
from pathlib import Path

from llmpipe_stage import api_keys


def test_keys_are_lines_without_blanks_or_comments() -> None:
    data = b"# rotated 2026-12\n  key-one  \n\nkey-two\r\n#old\n"
    assert api_keys.parse_keys(data) == [b"key-one", b"key-two"]


def test_bearer_header() -> None:
    assert api_keys.bearer_token("Bearer abc") == b"abc"
    assert api_keys.bearer_token("bearer   abc ") == b"abc"
    for header in (None, "", "Bearer", "Bearer ", "Basic abc", "abc"):
        assert api_keys.bearer_token(header) is None


def test_every_key_matches_and_nothing_else() -> None:
    keys = (b"first", b"second")
    assert api_keys.matches(b"first", keys) and api_keys.matches(b"second", keys)
    for token in (b"firs", b"first ", b"", b"FIRST", b"secondfirst"):
        assert not api_keys.matches(token, keys)
    assert not api_keys.matches(b"first", ())


def test_a_file_is_reread_when_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("old-key\n")
    ring = api_keys.KeyRing(path)
    assert ring.allows("Bearer old-key") and not ring.allows("Bearer new-key")
    path.write_text("new-key-longer\n")
    assert ring.allows("Bearer new-key-longer") and not ring.allows("Bearer old-key")


def test_a_same_size_rewrite_in_the_same_tick_is_seen_by_the_periodic_reread(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys"
    path.write_text("aaaa\n")
    ring = api_keys.KeyRing(path)
    assert ring.allows("Bearer aaaa")
    stat = path.stat()
    path.write_text("bbbb\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    ring._read_at -= api_keys.REREAD_S + 1  # the re-read period has passed
    assert ring.allows("Bearer bbbb") and not ring.allows("Bearer aaaa")


def test_a_mounted_secret_directory_and_its_swap(tmp_path: Path) -> None:
    """The layout kubelet writes: data keys are links into a `..data` directory that is
    replaced atomically when the Secret changes."""
    secret = tmp_path / "secret"
    secret.mkdir()

    def publish(version: str, files: dict[str, str]) -> None:
        target = secret / f"..{version}"
        target.mkdir()
        for name, text in files.items():
            (target / name).write_text(text)
        link = secret / "..data_tmp"
        link.symlink_to(target.name)
        link.replace(secret / "..data")
        for name in files:
            if not (secret / name).is_symlink():
                (secret / name).symlink_to(f"..data/{name}")

    publish("v1", {"alice": "key-a\n", "team": "key-b\nkey-c\n"})
    ring = api_keys.KeyRing(secret)
    assert all(ring.allows(f"Bearer key-{k}") for k in "abc")
    publish("v2", {"alice": "key-a2\n", "team": "key-c\n"})
    assert ring.allows("Bearer key-a2") and ring.allows("Bearer key-c")
    assert not ring.allows("Bearer key-a") and not ring.allows("Bearer key-b")


def test_missing_or_empty_keys_allow_nobody(tmp_path: Path) -> None:
    ring = api_keys.KeyRing(tmp_path / "absent")
    assert not ring.allows("Bearer anything") and "cannot read API keys" in ring.error
    empty = tmp_path / "empty"
    empty.write_text("# no keys yet\n")
    ring = api_keys.KeyRing(empty)
    assert not ring.allows("Bearer ") and not ring.allows("Bearer #")
    assert "holds no API key" in ring.error
