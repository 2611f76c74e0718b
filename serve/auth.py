"""API keys: configured as sha256 digests, checked in constant time against every digest; never logged.

A key is known by its label (configured, or `key-` and the first 8 hex digits of its digest), which traffic
records and feedback carry instead of the key.
"""

from __future__ import annotations

import hashlib
import hmac

from serve.errors import InvalidAPIKey


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_label(digest: str, labels: dict[str, str] | None = None) -> str:
    """The name a key is recorded by: its configured label, else `key-` and its digest's first 8 hex digits."""
    return (labels or {}).get(digest) or f"key-{digest[:8]}"


class KeyCheck:
    def __init__(self, digests: list[str], labels: dict[str, str] | None = None) -> None:
        self._digests = [bytes.fromhex(d) for d in digests]
        self._labels = [key_label(d, labels) for d in digests]

    def __call__(self, authorization: str | None) -> str | None:
        """The key's label; raise InvalidAPIKey unless `authorization` is `Bearer <a configured key>`.

        None when no keys are configured (no authentication).
        """
        if not self._digests:
            return None
        scheme, _, key = (authorization or "").partition(" ")
        digest = hashlib.sha256(key.strip().encode()).digest()
        ok = False
        label = None
        for d, name in zip(self._digests, self._labels, strict=True):
            match = hmac.compare_digest(digest, d)  # no early exit: the time taken does not reveal which matched
            ok |= match
            label = name if match else label
        if not (ok and scheme.lower() == "bearer"):
            raise InvalidAPIKey()
        return label
