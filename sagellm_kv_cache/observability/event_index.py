"""What a consumer of KV events keeps: a mirror of one pool's ``hash -> block id``.

``CacheIndex`` applies events in order and refuses a gap; ``replay`` builds
the map from a whole sequence. A KV-aware router keeps one per worker.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from ..errors import KVEventGapError, KVInvalidTypeError
from .event_types import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

__all__ = ["CacheIndex", "replay"]


class CacheIndex:
    """A consumer's mirror of one pool's cache: ``hash -> block id``.

    ``apply`` checks that sequence numbers follow each other without holes
    (``KVEventGapError`` otherwise); events of a ``snapshot_events()`` list
    carry the same number and reset the index with their ``AllBlocksCleared``.
    """

    __slots__ = ("_cleared_seq", "blocks", "last_seq")

    def __init__(self) -> None:
        self.blocks: dict[Hashable, int] = {}
        self.last_seq = 0
        self._cleared_seq = 0  # a snapshot's stored blocks repeat its clear's number

    def apply(self, event: KVEvent) -> None:
        """Apply one event. Raises ``KVEventGapError`` when events are missing before it."""
        seq = event.seq
        if isinstance(event, AllBlocksCleared):
            self.blocks.clear()
            self._cleared_seq = seq
        elif seq != self.last_seq + 1 and not (seq == self.last_seq == self._cleared_seq):
            raise KVEventGapError(
                f"event {seq} follows {self.last_seq}: events in between are missing",
                missing_from=self.last_seq + 1,
                missing_to=seq - 1,
            )
        elif isinstance(event, BlockStored):
            self.blocks.update(zip(event.block_hashes, event.block_ids))
        elif isinstance(event, BlockRemoved):
            pop = self.blocks.pop
            for h in event.block_hashes:
                pop(h, None)
        else:
            raise KVInvalidTypeError(f"not a KV event: {type(event).__name__}")
        self.last_seq = seq

    def apply_many(self, events: Iterable[KVEvent]) -> None:
        for e in events:
            self.apply(e)

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self.blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __call__(self, event: KVEvent) -> None:  # usable as a subscriber
        self.apply(event)


def replay(events: Iterable[KVEvent]) -> dict[Hashable, int]:
    """Rebuild ``hash -> block id`` from a gap-free event sequence (from seq 1
    or starting with ``AllBlocksCleared``)."""
    index = CacheIndex()
    index.apply_many(events)
    return index.blocks
