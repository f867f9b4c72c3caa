"""The notifications a ``NixlBackend`` sends its peer (fixed structs, checked on
receipt), and whether NIXL can run here (``nixl_unavailable_reason``).

A group of messages is exposed with one descriptor notification; the reader
answers with one completion once its READ of the whole group is done::

    "D" | first tag u32 | count u32 | id u64 | md_len u32
        | count x (addr u64 | nbytes u64 | dev_id u32 | mem u8 (0 DRAM, 1 VRAM))
        | md_len bytes of the sender's agent metadata (after new registrations)
    "C" | id u64
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import Any

from ...errors import KVTransferFailedError

__all__ = [
    "DESC",
    "DONE",
    "ENTRY",
    "KIND_DESC",
    "KIND_DONE",
    "MAX_BATCH",
    "check_group",
    "desc_message",
    "nixl_unavailable_reason",
]

# kind u8 | first tag u32 | count u32 | id u64 | md_len u32, then count entries
DESC = struct.Struct("<BIIQI")
# addr u64 | nbytes u64 | dev_id u32 | mem u8 (0 DRAM, 1 VRAM)
ENTRY = struct.Struct("<QQIB")
#: most messages in one descriptor notification (and one READ)
MAX_BATCH = 64
KIND_DESC, KIND_DONE = ord("D"), ord("C")
DONE = struct.Struct("<BQ")  # kind u8 | id u64


def check_group(tags: Sequence[int], tensors: Sequence[Any]) -> None:
    """A group is 1..MAX_BATCH messages with consecutive tags, all host or all device."""
    n = len(tags)
    if (
        n == 0
        or n != len(tensors)
        or n > MAX_BATCH
        or list(tags) != list(range(tags[0], tags[0] + n))
    ):
        raise KVTransferFailedError(
            f"a NIXL group is 1..{MAX_BATCH} messages with consecutive tags, got {list(tags)[:4]}..."
        )
    if len({t.is_cuda for t in tensors}) != 1:
        raise KVTransferFailedError("a NIXL group mixes host and device memory")


def desc_message(tag: int, xid: int, entries: list[tuple[int, int, int, int]], md: bytes) -> bytes:
    """The descriptor notification of a group of messages (see the module docstring)."""
    body = b"".join(ENTRY.pack(*e) for e in entries)
    return DESC.pack(KIND_DESC, tag, len(entries), xid, len(md)) + body + md


def nixl_unavailable_reason() -> str | None:
    """Why the NIXL backend cannot run here (``None`` when it can): the import
    error of ``nixl_cu12``, or the error creating an agent with the UCX plugin."""
    try:
        from nixl_cu12 import nixl_agent, nixl_agent_config
    except Exception as exc:  # ImportError, or a missing shared library
        return f"import nixl_cu12 failed: {type(exc).__name__}: {exc}"
    try:
        agent = nixl_agent(
            f"skvx-probe-{os.getpid()}",
            nixl_agent_config(backends=["UCX"], num_threads=0, enable_prog_thread=False),
        )
        if "UCX" not in agent.backends:
            return "nixl_cu12 has no UCX plugin"
        del agent
    except Exception as exc:
        return f"creating a NIXL agent with UCX failed: {type(exc).__name__}: {exc}"
    return None
