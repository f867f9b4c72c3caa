"""Digests of source pieces, kept so a repeated in-process move hashes only its
destination.

A cached block is immutable (DESIGN.md), so the digest of a piece of cached
blocks, computed once, still describes their bytes the next time they move.
A piece is keyed by where it lies in its pool (pool, layer, K/V, first block,
number of blocks) and versioned by the blocks' hashes; pieces that hold an
uncached block are never kept. The digest is only ever *compared* with one
computed from the destination bytes, and when they differ the source piece
is hashed again before a mismatch is declared, so a stale entry costs time,
never a wrong verdict.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

__all__ = ["PieceDigests", "digest"]

Key = tuple[Any, ...]


def digest(algo: str, buf: Any) -> int:
    """One-shot checksum of ``buf`` (``wire.Checksum`` semantics)."""
    if algo == "xxh3_64":
        import xxhash

        return int(xxhash.xxh3_64_intdigest(buf))
    if algo == "crc32":
        import zlib

        return zlib.crc32(buf)
    return 0


class PieceDigests:
    """A bounded LRU of ``key -> (version, digest)``; thread-safe."""

    def __init__(self, max_entries: int = 1 << 16) -> None:
        self.max_entries = max_entries
        self._d: OrderedDict[Key, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Key, version: Any) -> int | None:
        with self._lock:
            hit = self._d.get(key)
            if hit is None or hit[0] != version:
                return None
            self._d.move_to_end(key)
            return hit[1]

    def put(self, key: Key, version: Any, value: int) -> None:
        with self._lock:
            self._d[key] = (version, value)
            self._d.move_to_end(key)
            while len(self._d) > self.max_entries:
                self._d.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._d)
