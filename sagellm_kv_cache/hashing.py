"""Chained block hashes: the identity of a cached KV block.

A block's hash covers its own tokens *and* its parent's hash, so equal hashes
mean equal prefixes, not just equal blocks::

    tokens  | t0 .. t15 | t16 .. t31 | t32 .. t47 | t48 t49 (partial: not hashed)
    hash    |    h0     |     h1     |     h2     |
            h0 = H(root || bytes(t0..t15))
            h1 = H(h0   || bytes(t16..t31))
            h2 = H(h1   || bytes(t32..t47))
            root = H("sagellm-kv-cache/v1" || canonical(extra_keys))

* Only full blocks are hashed; a trailing partial block has no hash and is
  never cached.
* ``extra_keys`` (a cache salt, a model or LoRA name, a tenant id...) go into
  the root, so two requests with different extra keys never share a block.
* Tokens are encoded as little-endian int64; extra keys with a small
  canonical, type-tagged encoding. Nothing uses Python's ``hash()``, so the
  hashes are identical in every process whatever ``PYTHONHASHSEED`` is, which
  is what makes them usable across nodes (transfer, shared stores).

Why sha256 by default: a block hash is used as the *identity* of KV data that
may be shared across requests and tenants. With a non-cryptographic hash an
adversary can craft a prompt whose block collides with another tenant's and
be served that tenant's KV (a cross-request leak, cf. vLLM's move to sha256
for prefix caching). ``xxh3_128`` (needs the ``xxhash`` package) is offered
for trusted, single-tenant settings and simulation where speed matters more.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Callable, Sequence
from numbers import Integral
from typing import Any

from .errors import KVConfigError, KVInvalidInputError, KVInvalidTypeError

__all__ = [
    "HASH_FUNCTIONS",
    "BlockHash",
    "check_block_hashes",
    "compute_block_hash",
    "compute_block_hashes",
    "get_hash_fn",
    "pack_tokens",
    "root_hash",
]

#: A block hash. ``bytes`` for the token-level hashers; trace replay also uses
#: the integer ids that traces such as Mooncake's carry (already chained).
BlockHash = bytes | int

_ROOT_TAG = b"sagellm-kv-cache/v1"
_LITTLE = sys.byteorder == "little"


def _xxh3_128() -> Callable[[bytes], bytes]:
    try:
        import xxhash
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise KVConfigError(
            "hash_fn='xxh3_128' needs the xxhash package: pip install 'sagellm-kv-cache[fast]'"
        ) from exc
    return xxhash.xxh3_128_digest


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _blake2b(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


#: name -> factory of a ``bytes -> bytes`` digest function.
HASH_FUNCTIONS: dict[str, Callable[[], Callable[[bytes], bytes]]] = {
    "sha256": lambda: _sha256,
    "blake2b": lambda: _blake2b,
    "xxh3_128": _xxh3_128,
}


def get_hash_fn(name: str | Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """Return the digest function for ``name`` (or ``name`` itself if callable)."""
    if callable(name):
        return name
    try:
        factory = HASH_FUNCTIONS[name]
    except (KeyError, TypeError):
        raise KVConfigError(
            f"unknown hash_fn {name!r}; choose one of {sorted(HASH_FUNCTIONS)}"
        ) from None
    return factory()


def _encode_key(key: Any, out: list[bytes]) -> None:
    """Type-tagged, length-prefixed encoding: no pickle, no repr of objects."""
    if key is None:
        out.append(b"N")
    elif isinstance(key, bool):
        out.append(b"B1" if key else b"B0")
    elif isinstance(key, int):
        raw = str(key).encode()
        out.append(b"I" + struct.pack("<I", len(raw)) + raw)
    elif isinstance(key, str):
        raw = key.encode("utf-8")
        out.append(b"S" + struct.pack("<I", len(raw)) + raw)
    elif isinstance(key, bytes | bytearray | memoryview):
        raw = bytes(key)
        out.append(b"Y" + struct.pack("<I", len(raw)) + raw)
    elif isinstance(key, float):
        out.append(b"F" + struct.pack("<d", key))
    elif isinstance(key, tuple | list):
        out.append(b"T" + struct.pack("<I", len(key)))
        for k in key:
            _encode_key(k, out)
    else:
        raise KVInvalidTypeError(
            f"extra key of type {type(key).__name__} has no canonical encoding; "
            "use str, int, bytes, float, None or tuples of those"
        )


def root_hash(extra_keys: Any = None, hash_fn: str | Callable[[bytes], bytes] = "sha256") -> bytes:
    """The parent hash of a request's first block (covers ``extra_keys``)."""
    parts: list[bytes] = [_ROOT_TAG]
    _encode_key(extra_keys, parts)
    return get_hash_fn(hash_fn)(b"".join(parts))


def pack_tokens(tokens: Any) -> bytes:
    """Encode token ids as little-endian 64-bit bytes, validating them.

    Accepts an ordered sequence of ints (``list``, ``tuple``, ``range``...), a
    1-D numpy integer array or a torch integer tensor. Token ids are
    non-negative int64 values (``0 <= t < 2**63``).

    Raises:
        KVInvalidTypeError: not an ordered sequence (a ``set``, a generator, a
            ``str``...), or a token that is not an int (floats, bools, strs).
        KVInvalidInputError: a negative token id, or one of ``2**63`` or more.
    """
    if type(tokens) is list or type(tokens) is tuple:
        kinds = set(map(type, tokens))  # one C-level pass; bools and floats show here
        if kinds <= _INT_ONLY:
            try:
                arr = array("Q", tokens)  # refuses negatives
            except OverflowError:
                arr = None
            if arr is not None:
                if not _LITTLE:  # pragma: no cover - big-endian hosts
                    arr.byteswap()
                data = arr.tobytes()
                if not data[7::8].translate(None, _BELOW_2_63):  # no top byte >= 0x80
                    return data
            raise KVInvalidInputError(
                f"token ids must be ints in [0, 2**63), got {min(tokens)}..{max(tokens)}"
            )
    return _pack_slow(tokens)


_INT_ONLY = frozenset((int,))
_BELOW_2_63 = bytes(range(128))  # the top byte of an id below 2**63


def _pack_slow(tokens: Any) -> bytes:
    mod = type(tokens).__module__
    if mod.startswith("numpy") or mod.startswith("torch"):
        import numpy as np

        if mod.startswith("torch"):
            if getattr(tokens, "is_meta", False):
                raise KVInvalidInputError("tokens are a meta-device tensor: it holds no values")
            tokens = tokens.detach().cpu().numpy()
        arr = np.asarray(tokens)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise KVInvalidTypeError(
                f"tokens must be a 1-D integer array, got dtype {arr.dtype} with {arr.ndim} dims"
            )
        if arr.size and (arr.min() < 0 or arr.max() >= 1 << 63):
            raise KVInvalidInputError(
                f"token ids must be ints in [0, 2**63), got {arr.min()}..{arr.max()}"
            )
        return np.ascontiguousarray(arr, dtype="<u8").tobytes()
    if isinstance(tokens, bytes | bytearray | str) or not isinstance(tokens, Sequence):
        raise KVInvalidTypeError(
            f"tokens must be an ordered sequence of ints (list, tuple, numpy or torch "
            f"array), got {type(tokens).__name__}"
        )
    ints: list[int] = []
    for i, t in enumerate(tokens):  # numpy ints are Integral; bools (any kind) are not ids
        if isinstance(t, bool) or not isinstance(t, Integral):
            raise KVInvalidTypeError(
                f"token {i} is {type(t).__name__} ({t!r}); token ids must be ints"
            )
        t = int(t)
        if not 0 <= t < 1 << 63:
            raise KVInvalidInputError(f"token {i} is {t}; token ids must be ints in [0, 2**63)")
        ints.append(t)
    return pack_tokens(ints)


def check_block_hashes(block_hashes: Any, name: str = "block_hashes") -> list:
    """``block_hashes`` as a list, each hashable and not ``None`` (a typed error otherwise).

    A block hash is the key of a cached block: ``bytes`` from the token
    hashers or an int/str/tuple id from a trace. ``None`` means "no hash" in
    the pool's bookkeeping, so it is never a key. One C-level pass (a set: it hashes
    every entry and then answers "is ``None`` there" in O(1)).
    """
    if type(block_hashes) is list:
        hashes = block_hashes
    elif isinstance(block_hashes, str | bytes | bytearray) or not isinstance(
        block_hashes, Sequence
    ):
        raise KVInvalidTypeError(
            f"{name} must be a list of block hashes, got {type(block_hashes).__name__}"
        )
    else:
        hashes = list(block_hashes)
    try:
        distinct = set(hashes)
    except TypeError:
        bad = next(h for h in hashes if not _hashable(h))
        raise KVInvalidTypeError(
            f"{name}: {type(bad).__name__} {bad!r:.60} is not hashable; a block hash is "
            "bytes, an int, a str or a tuple of those"
        ) from None
    if None in distinct:
        raise KVInvalidInputError(f"{name}[{hashes.index(None)}] is None; None is not a block hash")
    return hashes


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def _check_parent(parent_hash: Any) -> bytes:
    if not isinstance(parent_hash, bytes):
        raise KVInvalidTypeError(
            f"parent_hash must be bytes (a block hash), got {type(parent_hash).__name__}"
        )
    return parent_hash


def compute_block_hash(
    parent_hash: bytes | None,
    block_tokens: Sequence[int],
    hash_fn: str | Callable[[bytes], bytes] = "sha256",
    *,
    extra_keys: Any = None,
) -> bytes:
    """Hash of one block given its parent's hash (``None``: the first block)."""
    if parent_hash is None:
        parent_hash = root_hash(extra_keys, hash_fn)
    return get_hash_fn(hash_fn)(_check_parent(parent_hash) + pack_tokens(block_tokens))


def compute_block_hashes(
    tokens: Any,
    block_size: int = 16,
    *,
    parent_hash: bytes | None = None,
    extra_keys: Any = None,
    hash_fn: str | Callable[[bytes], bytes] = "sha256",
) -> list[bytes]:
    """Chained hashes of every *full* block of ``tokens``.

    Args:
        tokens: token ids (sequence of ints, numpy or torch integer 1-D array).
        block_size: tokens per block.
        parent_hash: hash to chain from (to extend a prefix); default: the root
            for ``extra_keys``.
        extra_keys: salt / namespace mixed into the root (ignored when
            ``parent_hash`` is given, which already covers it).
        hash_fn: ``"sha256"`` (default), ``"blake2b"``, ``"xxh3_128"`` or a callable.

    Returns:
        ``len(tokens) // block_size`` hashes, one per full block.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise KVInvalidTypeError(f"block_size must be an int, got {type(block_size).__name__}")
    if block_size <= 0:
        raise KVInvalidInputError(f"block_size must be positive, got {block_size}")
    fn = get_hash_fn(hash_fn)
    data = pack_tokens(tokens)
    parent = _check_parent(parent_hash) if parent_hash is not None else root_hash(extra_keys, fn)
    step = block_size * 8
    end = len(data) - step + 1
    out: list[bytes] = []
    append = out.append
    if fn is _sha256:
        # Inline hashlib: one Python call per block instead of two.
        sha = hashlib.sha256
        for off in range(0, end, step):
            parent = sha(parent + data[off : off + step]).digest()
            append(parent)
    else:
        for off in range(0, end, step):
            parent = fn(parent + data[off : off + step])
            append(parent)
    return out
