"""API keys: configured as sha256 digests, checked in constant time against every digest; never logged."""

from __future__ import annotations

import hashlib
import hmac

from serve.errors import InvalidAPIKey


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyCheck:
    def __init__(self, digests: list[str]) -> None:
        self._digests = [bytes.fromhex(d) for d in digests]

    def __call__(self, authorization: str | None) -> None:
        """Raise InvalidAPIKey unless `authorization` is `Bearer <a configured key>`."""
        if not self._digests:
            return
        scheme, _, key = (authorization or "").partition(" ")
        digest = hashlib.sha256(key.strip().encode()).digest()
        ok = False
        for d in self._digests:  # no early exit: the time taken does not reveal which digest matched
            ok |= hmac.compare_digest(digest, d)
        if not (ok and scheme.lower() == "bearer"):
            raise InvalidAPIKey()
