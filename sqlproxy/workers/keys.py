"""Which worker owns a cancel key: its index is the first byte of the secret it handed out.

A CancelRequest arrives on a new connection, which the kernel may give to any worker. The
secret is ours (the client never sees the server's), so we may put in it what we need: one
byte of worker index, the rest random as before (at least 3 random bytes with the 4-byte
secrets of protocol 3.0, more with the longer ones of 3.2).
"""

from __future__ import annotations

import os

__all__ = ["secret_for", "worker_of"]


def secret_for(worker: int, length: int) -> bytes:
    """A new cancel secret of ``length`` bytes (at least 4) owned by ``worker``."""
    if not 0 <= worker <= 255:
        raise ValueError(f"worker index {worker} does not fit in a byte")
    return bytes((worker,)) + os.urandom(max(4, length) - 1)


def worker_of(secret: bytes) -> int | None:
    """The worker that handed out ``secret`` (None for an empty one)."""
    return secret[0] if secret else None
