"""API keys for stage 0's OpenAI endpoint: read from files, re-read when they change,
checked in constant time. No aiohttp, no torch: the gateway asks `KeyRing.allows`.

Where the keys live (`--api-keys PATH`): a file, or a directory such as a mounted Secret
(one file per data key; the hidden `..data` entries Kubernetes adds are skipped). Each file
holds one key per line; blank lines and lines starting with `#` are ignored, and
surrounding whitespace is stripped, so a Secret may hold one key per data key, several
keys in one data key, or both. Kubernetes swaps a mounted Secret's files when the Secret
changes; the ring notices (file identity, size and modification time, checked at every
request, and a full re-read at least every `REREAD_S` seconds) and uses the new keys
without a restart. Keys that cannot be read allow nobody (fail closed).
"""

from __future__ import annotations

import hmac
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

REREAD_S = 5.0
"""A rewrite within one file-timestamp tick keeps size and mtime; re-reading anyway bounds
how long such a change goes unnoticed."""


def parse_keys(data: bytes) -> list[bytes]:
    """One key per line; blank lines and `#` comments are not keys."""
    keys = []
    for line in data.splitlines():
        key = line.strip()
        if key and not key.startswith(b"#"):
            keys.append(key)
    return keys


def bearer_token(header: str | None) -> bytes | None:
    """The credentials of `Authorization: Bearer <key>` (scheme case-insensitive), or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token.encode("utf-8", errors="surrogateescape")


def matches(token: bytes, keys: tuple[bytes, ...]) -> bool:
    """Whether token is one of keys, comparing against every key in constant time per key
    (no early exit, so the timing says nothing about which key or how much matched)."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(token, key)
    return found


class KeyRing:
    """The keys under a path, kept current as the files change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._signature: object = None
        self._read_at = float("-inf")
        self._keys: tuple[bytes, ...] = ()
        self.error = ""
        """Why no key could be read (empty when the keys are fine)."""

    def _files(self) -> list[Path]:
        if self.path.is_dir():
            return sorted(
                p for p in self.path.iterdir() if not p.name.startswith(".") and p.is_file()
            )
        return [self.path]

    def _stat(self) -> object:
        try:
            files = self._files()
            return tuple(
                (str(p), s.st_ino, s.st_size, s.st_mtime_ns) for p in files for s in [p.stat()]
            )
        except OSError as error:
            return ("error", str(error))

    def keys(self) -> tuple[bytes, ...]:
        signature = self._stat()
        now = time.monotonic()
        if signature != self._signature or now - self._read_at > REREAD_S:
            self._reload(signature, now)
        return self._keys

    def _reload(self, signature: object, now: float) -> None:
        keys: list[bytes] = []
        error = ""
        try:
            for path in self._files():
                keys.extend(parse_keys(path.read_bytes()))
            if not keys:
                error = f"{self.path} holds no API key"
        except OSError as failure:
            keys, error = [], f"cannot read API keys from {self.path}: {failure}"
        if error and error != self.error:
            log.error("%s; every API request is refused until it does", error)
        elif not error and (signature != self._signature) and self._signature is not None:
            log.info("API keys re-read from %s: %d keys", self.path, len(keys))
        self._keys, self._signature, self._read_at, self.error = tuple(keys), signature, now, error

    def allows(self, authorization: str | None) -> bool:
        """Whether an `Authorization` header value carries one of the keys."""
        token = bearer_token(authorization)
        keys = self.keys()  # read even without a token: the ring stays current either way
        return token is not None and matches(token, keys)
