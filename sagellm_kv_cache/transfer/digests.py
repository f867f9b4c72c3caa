"""Digests of source pieces, kept so a repeated move of the same cached blocks
hashes only what arrived (in-process: the destination; over a network: the
receiver's side), not the source again.

A cached block is immutable (DESIGN.md), so the digest of a piece of cached
blocks, computed once, still describes their bytes the next time they move.
A piece is keyed by where it lies in its pool (pool, layer, K/V, first block,
number of blocks) and versioned by the blocks' hashes; pieces that hold an
uncached block are never kept. The digest is only ever *compared* with one
computed from the bytes that arrived, and when they differ the source piece
is hashed again (in-process at once; a sender on its retry, which hashes
every piece afresh), so a stale entry costs time, never a wrong verdict.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .plan import bytes_of
from .wire import digest

if TYPE_CHECKING:  # pragma: no cover
    from .plan import Plan

__all__ = ["PieceDigests", "SourcePieces"]

Key = tuple[Any, ...]


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


class SourcePieces:
    """The source-piece digests of one plan: kept ones where allowed, else hashed
    (and kept when the piece holds only cached blocks)."""

    def __init__(self, cache: PieceDigests, plan: Plan, algo: str, use_kept: bool = True) -> None:
        self.cache = cache
        self.plan = plan
        self.algo = algo
        self.use_kept = use_kept
        src = plan.source
        self._where = (src.data_ptr(), tuple(src.shape), str(src.dtype), algo)
        self._versions: dict[tuple[int, int], tuple[Any, ...] | None] = {}

    def prepare(self, slices: Iterable[tuple[int, int, int, int]]) -> None:
        """Work out the versions of these pieces now (``of`` may then run on threads)."""
        for _, _, a, b in slices:
            self._version(a, b)

    def _version(self, a: int, b: int) -> tuple[Any, ...] | None:
        if (a, b) not in self._versions:
            by_block = self.plan.hash_by_block()
            hashes = tuple(by_block.get(x) for x in range(a, b))
            self._versions[(a, b)] = None if any(h is None for h in hashes) else hashes
        return self._versions[(a, b)]

    def of(self, layer: int, k: int, a: int, b: int, view: Any) -> int:
        """The digest of source piece ``kv[layer, k, a:b]`` (``view``)."""
        version = self._version(a, b)
        key = (self._where, layer, k, a, b)
        if self.use_kept and version is not None:
            kept = self.cache.get(key, version)
            if kept is not None:
                return kept
        return self.refresh(layer, k, a, b, view)

    def refresh(self, layer: int, k: int, a: int, b: int, view: Any) -> int:
        """Hash the piece's bytes now (and keep the digest when it may be kept)."""
        value = digest(self.algo, bytes_of(view))
        version = self._version(a, b)
        if version is not None:
            self.cache.put((self._where, layer, k, a, b), version, value)
        return value
