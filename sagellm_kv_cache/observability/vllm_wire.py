"""vLLM's KV-event wire format: msgpack payloads and ZMQ frames (needs ``[events]``).

Follows ``vllm/distributed/kv_events.py`` (``EventBatch``, ``KVCacheEvent``,
``BlockStored``, ``BlockRemoved``, ``AllBlocksCleared``, ``KVEventBatch``,
``ZmqEventPublisher``) and ``vllm/v1/core/kv_cache_utils.py``
(``maybe_convert_block_hash``). The structs below are declared the way vLLM
declares them (``msgspec.Struct``, ``omit_defaults=True``, ``gc=False``; events
``tag=True``, so the tag is the class name), which makes the bytes msgspec
writes for them the bytes vLLM writes.

Payload (one msgpack value per batch), ``encoding="array"`` (vLLM up to 0.23:
``array_like=True`` on the batch and on every event)::

    [ts, [event, ...], data_parallel_rank]                 KVEventBatch
    ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size,
     lora_id, medium, lora_name, extra_keys, group_idx, kv_cache_spec_kind,
     kv_cache_spec_sliding_window]             (all eleven fields, null when unset)
    ["BlockRemoved", block_hashes, medium, group_idx]
    ["AllBlocksCleared"]

``encoding="map"`` (vLLM after PR #42892, e.g. 0.26): the batch stays a
positional array, each event is a map tagged under ``"type"`` (fields with a
default, ``extra_keys`` onwards, left out while unset)::

    [ts, [{"type": "BlockStored", "block_hashes": [...], ...}, ...], data_parallel_rank]

``decode_batch`` accepts both, mixed within one batch, and also a batch
written as a map (``{"ts":..., "events":..., "data_parallel_rank":...}``);
unknown trailing fields / keys are ignored (forward compatible). A block hash
is an int (vLLM's default, ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``: the
hash's low 64 bits, unsigned) or raw bytes.

ZMQ frames (``ZmqEventPublisher``)::

    PUB  multipart  [topic (utf-8), seq (8 bytes, big-endian), payload]
                    seq counts batches from 0, +1 per batch, per publisher
    ROUTER replay   request  [identity, b"", start_seq (8 bytes, big-endian)]
                             (a REQ client sends [start_seq]; a DEALER [b"", start_seq])
                    replies  [identity, b"", seq, payload] for each buffered seq >= start_seq,
                             then [identity, b"", (-1).to_bytes(8, "big", signed=True), b""]

Nothing decoded here is evaluated: msgpack yields ints, bytes, str, lists,
maps, and every field is type-checked before use.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any

import msgspec

from ..errors import KVInvalidInputError

__all__ = [
    "END_SEQ",
    "MEDIUM_GPU",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "KVEventBatch",
    "decode_batch",
    "encode_batch",
    "external_block_hash",
    "pack_seq",
    "stream_event_to_vllm",
    "unpack_seq",
]

MEDIUM_GPU = "GPU"
#: Sequence frame of the replay end marker.
END_SEQ = (-1).to_bytes(8, "big", signed=True)
_U64 = (1 << 64) - 1

ExternalBlockHash = int | bytes


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Base of vLLM's events (positional, tagged by class name)."""


class BlockStored(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


# map-encoded events (vLLM PR #42892): the same fields (inherited), a map tagged under "type"
class _MapBlockStored(BlockStored, array_like=False, tag="BlockStored"):
    pass


class _MapBlockRemoved(BlockRemoved, array_like=False, tag="BlockRemoved"):
    pass


class _MapAllBlocksCleared(AllBlocksCleared, array_like=False, tag="AllBlocksCleared"):
    pass


class _MapEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[_MapBlockStored | _MapBlockRemoved | _MapAllBlocksCleared]
    data_parallel_rank: int | None = None


_TO_MAP = {
    BlockStored: _MapBlockStored,
    BlockRemoved: _MapBlockRemoved,
    AllBlocksCleared: _MapAllBlocksCleared,
}
_ENCODER = msgspec.msgpack.Encoder()
_RAW_DECODER = msgspec.msgpack.Decoder()
_ARRAY_DECODER = msgspec.msgpack.Decoder(KVEventBatch)


def pack_seq(seq: int) -> bytes:
    """The 8-byte big-endian sequence frame (signed: -1 is the replay end marker)."""
    return seq.to_bytes(8, "big", signed=True)


def unpack_seq(frame: bytes) -> int:
    """Inverse of ``pack_seq``; ``KVInvalidInputError`` unless exactly 8 bytes."""
    if len(frame) != 8:
        raise KVInvalidInputError(f"a sequence frame is 8 bytes, got {len(frame)}")
    return int.from_bytes(frame, "big", signed=True)


def external_block_hash(block_hash: Hashable, *, as_int: bool = True) -> ExternalBlockHash:
    """A pool hash as vLLM puts it on the wire.

    ``bytes`` become their low 64 bits as an unsigned int when ``as_int``
    (vLLM's ``maybe_convert_block_hash``), else stay bytes; ints (trace ids)
    pass unchanged (msgpack carries any int in [-2**63, 2**64)).
    """
    if isinstance(block_hash, bytes):
        return int.from_bytes(block_hash, "big") & _U64 if as_int else block_hash
    if isinstance(block_hash, int) and not isinstance(block_hash, bool):
        if not -(1 << 63) <= block_hash <= _U64:
            raise KVInvalidInputError(f"block hash {block_hash} does not fit in 64 bits")
        return block_hash
    raise KVInvalidInputError(
        f"block hash of type {type(block_hash).__name__} has no vLLM wire encoding"
    )


def stream_event_to_vllm(
    event: Any, *, medium: str | None = MEDIUM_GPU, int_hashes: bool = True
) -> BlockStored | BlockRemoved | AllBlocksCleared:
    """One ``observability.events`` event as vLLM's event.

    Our pool does not keep token ids per block, so ``token_ids`` is empty;
    block ids and the removal reason have no vLLM field and are dropped.
    """
    kind = getattr(event, "type", None)
    if kind == "block_stored":
        parent = event.parent_block_hash
        return BlockStored(
            block_hashes=[external_block_hash(h, as_int=int_hashes) for h in event.block_hashes],
            parent_block_hash=None
            if parent is None
            else external_block_hash(parent, as_int=int_hashes),
            token_ids=[],
            block_size=event.block_size or 0,
            lora_id=None,
            medium=medium,
            lora_name=None,
        )
    if kind == "block_removed":
        return BlockRemoved(
            block_hashes=[external_block_hash(h, as_int=int_hashes) for h in event.block_hashes],
            medium=medium,
        )
    if kind == "all_blocks_cleared":
        return AllBlocksCleared()
    raise KVInvalidInputError(f"not a KV event: {type(event).__name__}")


def encode_batch(
    ts: float,
    events: Iterable[BlockStored | BlockRemoved | AllBlocksCleared],
    data_parallel_rank: int | None = 0,
    *,
    encoding: str = "array",
) -> bytes:
    """msgpack payload of one ``KVEventBatch`` (see the module doc for both encodings)."""
    events = list(events)
    if encoding == "array":
        return _ENCODER.encode(KVEventBatch(float(ts), events, data_parallel_rank))
    if encoding == "map":
        mapped = [_TO_MAP[type(e)](**msgspec.structs.asdict(e)) for e in events]
        return _ENCODER.encode(_MapEventBatch(float(ts), mapped, data_parallel_rank))
    raise KVInvalidInputError(f"encoding must be 'array' or 'map', got {encoding!r}")


# -- decoding -----------------------------------------------------------------
_STORED_FIELDS = tuple(BlockStored.__struct_fields__)
_REMOVED_FIELDS = tuple(BlockRemoved.__struct_fields__)


def _hash(v: Any, where: str) -> ExternalBlockHash:
    if isinstance(v, bytes) or (isinstance(v, int) and not isinstance(v, bool)):
        return v
    raise KVInvalidInputError(f"{where}: a block hash is an int or bytes, got {v!r}")


def _opt(v: Any, kind: type, where: str) -> Any:
    if v is None or (isinstance(v, kind) and not isinstance(v, bool)):
        return v
    raise KVInvalidInputError(f"{where}: expected {kind.__name__} or null, got {v!r}")


def _event(raw: Any, i: int) -> BlockStored | BlockRemoved | AllBlocksCleared:
    where = f"event {i}"
    if isinstance(raw, list) and raw and isinstance(raw[0], str):
        tag, values = raw[0], raw[1:]
        fields = _STORED_FIELDS if tag == "BlockStored" else _REMOVED_FIELDS
        d = dict(zip(fields, values))
    elif isinstance(raw, dict) and isinstance(raw.get("type"), str):
        tag, d = raw["type"], raw
    else:
        raise KVInvalidInputError(f"{where}: not a tagged array or tagged map")
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    if tag not in ("BlockStored", "BlockRemoved"):
        raise KVInvalidInputError(f"{where}: unknown event type {tag!r}")
    hashes = d.get("block_hashes")
    if not isinstance(hashes, list):
        raise KVInvalidInputError(f"{where}: block_hashes must be a list")
    hashes = [_hash(h, where) for h in hashes]
    medium = _opt(d.get("medium"), str, f"{where} medium")
    group_idx = _opt(d.get("group_idx"), int, f"{where} group_idx")
    if tag == "BlockRemoved":
        return BlockRemoved(hashes, medium, group_idx)
    parent = d.get("parent_block_hash")
    tokens = d.get("token_ids")
    block_size = d.get("block_size")
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in tokens
    ):
        raise KVInvalidInputError(f"{where}: token_ids must be a list of ints")
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise KVInvalidInputError(f"{where}: block_size must be an int, got {block_size!r}")
    extra = d.get("extra_keys")
    if extra is not None and not isinstance(extra, list):
        raise KVInvalidInputError(f"{where}: extra_keys must be a list or null")
    return BlockStored(
        hashes,
        None if parent is None else _hash(parent, where),
        tokens,
        block_size,
        _opt(d.get("lora_id"), int, f"{where} lora_id"),
        medium,
        _opt(d.get("lora_name"), str, f"{where} lora_name"),
        None if extra is None else [None if k is None else tuple(k) for k in extra],
        group_idx,
        _opt(d.get("kv_cache_spec_kind"), str, f"{where} kv_cache_spec_kind"),
        _opt(d.get("kv_cache_spec_sliding_window"), int, f"{where} sliding_window"),
    )


def decode_batch(payload: bytes) -> KVEventBatch:
    """Decode one payload in either encoding into ``KVEventBatch`` (array structs).

    Raises:
        KVInvalidInputError: not msgpack, or not a valid batch (the message says where).
    """
    try:  # fast path: vLLM's positional encoding, typed by msgspec in C
        return _ARRAY_DECODER.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass
    try:
        raw = _RAW_DECODER.decode(payload)
    except msgspec.DecodeError as exc:
        raise KVInvalidInputError(f"payload is not msgpack: {exc}") from None
    if isinstance(raw, dict):
        raw = [raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")]
    if not isinstance(raw, list) or len(raw) < 2:
        raise KVInvalidInputError("payload is not a KVEventBatch [ts, events, dp_rank]")
    ts, events = raw[0], raw[1]
    rank = raw[2] if len(raw) > 2 else None
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise KVInvalidInputError(f"batch ts must be a number, got {ts!r}")
    if not isinstance(events, list):
        raise KVInvalidInputError("batch events must be a list")
    rank = _opt(rank, int, "data_parallel_rank")
    return KVEventBatch(float(ts), [_event(e, i) for i, e in enumerate(events)], rank)
