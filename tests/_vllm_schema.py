"""vLLM's KV-event schema, written here independently of ``vllm_wire`` (shared by the
vLLM event tests).

Declared as ``vllm/distributed/kv_events.py`` declares it up to vLLM 0.23 (the
six fields ``BlockStored`` had then; every struct ``array_like=True``, events
``tag=True``, the batch an ``EventBatch`` whose ``events`` a subclass narrows):
the tests publish with it as vLLM would, and decode our frames with it field
for field.
"""

from __future__ import annotations

from typing import Any

import msgspec


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class VEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class VBlockStored(VEvent, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class VBlockRemoved(VEvent, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None


class VAllBlocksCleared(VEvent, tag="AllBlocksCleared"):
    pass


class VKVEventBatch(EventBatch):
    events: list[VBlockStored | VBlockRemoved | VAllBlocksCleared]


V_DECODER = msgspec.msgpack.Decoder(VKVEventBatch)
