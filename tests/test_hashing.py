"""Chained block hashes: definition, determinism, validation."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from sagellm_kv_cache.errors import KVConfigError, KVInvalidInputError, KVInvalidTypeError
from sagellm_kv_cache.hashing import compute_block_hash, compute_block_hashes, root_hash


def reference_hashes(tokens, block_size, extra_keys=None):
    """The definition, written out longhand: H(parent || int64-le tokens)."""
    parent = root_hash(extra_keys)
    out = []
    for i in range(len(tokens) // block_size):
        block = tokens[i * block_size : (i + 1) * block_size]
        parent = hashlib.sha256(parent + struct.pack(f"<{block_size}q", *block)).digest()
        out.append(parent)
    return out


def test_matches_longhand_definition_and_ignores_partial_block():
    tokens = list(range(50))
    hashes = compute_block_hashes(tokens, 16)
    assert len(hashes) == 3
    assert hashes == reference_hashes(tokens, 16)
    assert all(len(h) == 32 for h in hashes)


def test_root_covers_a_tag_and_extra_keys():
    assert root_hash() == hashlib.sha256(b"sagellm-kv-cache/v1" + b"N").digest()
    assert root_hash("tenant-a") != root_hash("tenant-b")


def test_chaining_a_changed_first_block_changes_every_later_hash():
    a = compute_block_hashes(list(range(64)), 16)
    b = compute_block_hashes([999, *range(1, 64)], 16)
    assert all(x != y for x, y in zip(a, b))


def test_same_block_under_different_prefix_differs():
    a = compute_block_hashes([1] * 16 + [7] * 16, 16)
    b = compute_block_hashes([2] * 16 + [7] * 16, 16)
    assert a[1] != b[1]


def test_shared_prefix_shares_hashes():
    a = compute_block_hashes(list(range(32)) + [5] * 16, 16)
    b = compute_block_hashes(list(range(32)) + [6] * 16, 16)
    assert a[:2] == b[:2] and a[2] != b[2]


def test_extra_keys_salt_every_block():
    a = compute_block_hashes(list(range(32)), 16, extra_keys=("lora", "x"))
    b = compute_block_hashes(list(range(32)), 16, extra_keys=("lora", "y"))
    assert a[0] != b[0] and a[1] != b[1]


def test_extend_from_parent_equals_hashing_the_whole():
    whole = compute_block_hashes(list(range(48)), 16)
    tail = compute_block_hashes(list(range(32, 48)), 16, parent_hash=whole[1])
    assert tail == whole[2:]
    assert compute_block_hash(whole[0], list(range(16, 32))) == whole[1]


def test_numpy_and_torch_inputs_hash_like_lists():
    tokens = list(range(40))
    ref = compute_block_hashes(tokens, 8)
    assert compute_block_hashes(np.array(tokens, dtype=np.int32), 8) == ref
    assert compute_block_hashes(torch.tensor(tokens), 8) == ref


@pytest.mark.parametrize("fn,size", [("blake2b", 16), ("xxh3_128", 16)])
def test_other_hash_functions(fn, size):
    pytest.importorskip("xxhash") if fn == "xxh3_128" else None
    hashes = compute_block_hashes(list(range(32)), 16, hash_fn=fn)
    assert len(hashes) == 2 and all(len(h) == size for h in hashes)
    assert hashes != compute_block_hashes(list(range(32)), 16)


def test_same_in_every_process_whatever_pythonhashseed():
    code = (
        "from sagellm_kv_cache.hashing import compute_block_hashes;"
        "print(compute_block_hashes(list(range(64)), 16, extra_keys=('salt', 1))[-1].hex())"
    )
    outs = set()
    for seed in ("0", "1", "12345"):
        res = subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr
        outs.add(res.stdout)
    assert len(outs) == 1


@pytest.mark.parametrize(
    "tokens,error",
    [
        ([1, 2, "3"], KVInvalidTypeError),
        ([1.5] * 16, KVInvalidTypeError),
        ("abc", KVInvalidTypeError),
        (np.zeros(16, dtype=np.float32), KVInvalidTypeError),
        ([2**70] * 16, KVInvalidInputError),
    ],
)
def test_bad_tokens_raise_typed_errors(tokens, error):
    with pytest.raises(error):
        compute_block_hashes(tokens, 16)


def test_bad_block_size_and_hash_fn():
    with pytest.raises(KVInvalidInputError):
        compute_block_hashes([1, 2], 0)
    with pytest.raises(KVInvalidTypeError):
        compute_block_hashes([1, 2], 2.0)
    with pytest.raises(KVConfigError):
        compute_block_hashes([1, 2], 2, hash_fn="md5")
    with pytest.raises(TypeError):  # typed errors are also builtins
        compute_block_hashes([object()] * 2, 2)
