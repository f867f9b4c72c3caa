"""Which node holds which block hash: the directory of a global KV pool.

The directory is kept current by the pools themselves: ``DirectoryHook`` is a
``PoolHook`` attached to each node's pool, so a block registered in the
prefix cache (``on_blocks_cached``) enters the directory under its node and
an evicted or invalidated one (``on_evict_many``) or a cleared pool
(``on_cleared``) leaves it, in the same call that changed the pool. A node in
another process feeds it with its pool's own KV events
(``observability.events.KVEventStream`` on that pool, shipped as JSON lines):
``apply_events(rank, events)`` applies them in sequence, a gap refused. Such
entries may be stale by the time they are used, which fetchers treat as a miss.

Lock order: a pool's lock, then the directory's; the directory never calls a pool.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import KVEventGapError, KVInvalidTypeError
from ..hashing import check_block_hashes
from ..hooks import PoolHook
from ..transfer._args import check_rank

if TYPE_CHECKING:  # pragma: no cover
    from ..pool import KVPool

__all__ = ["BlockDirectory", "DirectoryHook"]

_EVENT_KINDS = ("block_stored", "block_removed", "all_blocks_cleared")


class BlockDirectory:
    """Block hash -> the set of node ranks that hold it cached."""

    def __init__(self) -> None:
        self._holders: dict[Hashable, set[int]] = {}
        self._per_node: dict[int, int] = {}
        self._last_seq: dict[int, int] = {}  # per node fed by events: the last applied
        self._lock = threading.Lock()

    def add(self, rank: int, block_hashes: Iterable[Hashable]) -> None:
        """Record that node ``rank`` holds ``block_hashes`` cached."""
        self._checked(self._add, rank, block_hashes)

    def _checked(
        self, apply: Callable[[int, Sequence[Hashable]], None], rank: int, block_hashes: Any
    ) -> None:
        """``apply(rank, hashes)`` under the lock once both are checked (a bad one: nothing)."""
        check_rank("rank", rank)
        hashes = check_block_hashes(block_hashes)
        with self._lock:
            apply(rank, hashes)

    def _add(self, rank: int, hashes: Sequence[Hashable]) -> None:
        holders = self._holders
        n = 0
        for h in hashes:
            s = holders.get(h)
            if s is None:
                holders[h] = {rank}
                n += 1
            elif rank not in s:
                s.add(rank)
                n += 1
        self._per_node[rank] = self._per_node.get(rank, 0) + n

    def discard(self, rank: int, block_hashes: Iterable[Hashable]) -> None:
        """Record that node ``rank`` no longer holds ``block_hashes`` (unknown ones are ignored)."""
        self._checked(self._discard, rank, block_hashes)

    def _discard(self, rank: int, hashes: Sequence[Hashable]) -> None:
        holders = self._holders
        n = 0
        for h in hashes:
            s = holders.get(h)
            if s is not None and rank in s:
                n += 1
                if len(s) == 1:
                    del holders[h]
                else:
                    s.discard(rank)
        if n:
            self._per_node[rank] -= n

    def clear_node(self, rank: int) -> None:
        """Forget every entry of node ``rank``."""
        check_rank("rank", rank)
        with self._lock:
            self._clear(rank)

    def _clear(self, rank: int) -> None:
        self._discard(rank, [h for h, s in self._holders.items() if rank in s])

    def apply_events(self, rank: int, events: Iterable[Any]) -> int:
        """Apply node ``rank``'s KV events (``BlockStored`` adds, ``BlockRemoved``
        discards, ``AllBlocksCleared`` forgets the node), in order.

        Sequence numbers must follow the last one applied for ``rank`` without a
        hole (the first batch may start anywhere; a ``snapshot_events()`` list,
        whose events share its clear's number, is accepted at any point).

        Returns:
            the last sequence number applied for ``rank``.

        Raises:
            KVEventGapError: events are missing; KVInvalidTypeError: not a KV event.
            Nothing is applied then.
        """
        check_rank("rank", rank)
        events = list(events)
        with self._lock:
            last = self._last_seq.get(rank)
            cleared = None
            steps: list[tuple[str, Any]] = []
            for e in events:
                kind = getattr(e, "type", None)
                if kind not in _EVENT_KINDS:
                    raise KVInvalidTypeError(f"not a KV event: {type(e).__name__}")
                seq = e.seq
                if kind == "all_blocks_cleared":
                    cleared = seq
                elif last is not None and seq != last + 1 and not (seq == last == cleared):
                    raise KVEventGapError(
                        f"node {rank}: event {seq} follows {last}: events in between are missing",
                        missing_from=last + 1,
                        missing_to=seq - 1,
                    )
                last = seq
                hashes = [] if kind == "all_blocks_cleared" else check_block_hashes(e.block_hashes)
                steps.append((kind, hashes))
            for kind, hashes in steps:  # all checked: now apply
                if kind == "block_stored":
                    self._add(rank, hashes)
                elif kind == "block_removed":
                    self._discard(rank, hashes)
                else:
                    self._clear(rank)
            if last is not None:
                self._last_seq[rank] = last
            return -1 if last is None else last

    def holders(self, block_hash: Hashable) -> list[int]:
        """Ranks holding ``block_hash``, ascending."""
        with self._lock:
            return sorted(self._holders.get(block_hash, ()))

    def longest_prefix(
        self, block_hashes: Sequence[Hashable], exclude: Iterable[int] = ()
    ) -> tuple[int | None, int]:
        """``(rank, num_blocks)``: the node holding the longest leading run of
        ``block_hashes`` (ties: the lowest rank), ranks in ``exclude`` left out;
        ``(None, 0)`` when no node holds the first block."""
        hashes = check_block_hashes(block_hashes)
        skip = set(exclude)
        with self._lock:
            alive: set[int] | None = None
            best: set[int] = set()
            k = 0
            for h in hashes:
                s = self._holders.get(h)
                if not s:
                    break
                alive = (s - skip) if alive is None else (alive & s)
                if not alive:
                    break
                best, k = set(alive), k + 1
        return (min(best), k) if best else (None, 0)

    def num_blocks(self, rank: int | None = None) -> int:
        """Entries of node ``rank``, or distinct hashes over all nodes."""
        with self._lock:
            return len(self._holders) if rank is None else self._per_node.get(rank, 0)

    def __len__(self) -> int:
        return self.num_blocks()

    def __contains__(self, block_hash: object) -> bool:
        with self._lock:
            return block_hash in self._holders


class DirectoryHook(PoolHook):
    """Keeps ``directory`` current with one node's pool (attach with ``pool.add_hook``)."""

    def __init__(self, directory: BlockDirectory, rank: int) -> None:
        self.directory = directory
        self.rank = check_rank("rank", rank)

    def sync(self, pool: KVPool) -> None:
        """Enter the blocks ``pool`` holds cached now; call it once the hook is attached.

        The snapshot is read and entered under the directory's lock: an eviction
        the pool makes meanwhile reaches ``on_evict_many`` only after the entry
        (its discard waits for the lock), and one made before the snapshot is not
        in it; cached blocks are entered once either way. The pool's lock is not
        taken (the order is a pool's lock, then the directory's).
        """
        d = self.directory
        with d._lock:
            hashes = list(pool.block_pool.cached)  # one C-level pass under the GIL
            if hashes:
                d._add(self.rank, hashes)

    # the pool validated these hashes already: no second check per event
    def on_blocks_cached(self, block_ids, block_hashes, parent_hash, timestamp) -> None:
        d = self.directory
        with d._lock:
            d._add(self.rank, block_hashes)

    def on_evict_many(self, block_ids, block_hashes, reason, timestamp) -> None:
        d = self.directory
        with d._lock:
            d._discard(self.rank, block_hashes)

    def on_cleared(self, timestamp: float) -> None:
        self.directory.clear_node(self.rank)
