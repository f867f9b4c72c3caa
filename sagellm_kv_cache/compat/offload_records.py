"""The records of the seed's handle-level offload registry (``offload_seed.py``) and the
checks of its arguments."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import KVInvalidInputError, KVInvalidTypeError
from ..handle import KVHandle

__all__ = [
    "CPU",
    "DEVICE",
    "NVME",
    "HandleRecord",
    "OffloadSpec",
    "SeedState",
    "check_cap",
    "check_id",
    "check_label",
    "check_ratio",
]

DEVICE, CPU, NVME = "device", "cpu", "nvme"


@dataclass(frozen=True, slots=True)
class OffloadSpec:
    """One move of a handle (the seed's ``KVOffloadSpec``)."""

    handle_id: str
    src_device: str
    dst_device: str
    trigger: str
    num_tokens: int
    num_blocks: int
    nbytes: int
    request_id: str = ""
    #: the live handle after a restore to the device (None otherwise)
    handle: KVHandle | None = None


@dataclass(slots=True)
class HandleRecord:
    """One registered handle: where its KV is and how it got there."""

    handle_id: str
    handle: KVHandle | None
    num_tokens: int
    original_device: str
    current_device: str
    order: int
    last_active: float
    location: str = DEVICE
    kv: Any = None  # host copy while on CPU
    path: Path | None = None  # file while on NVMe
    shape: tuple = ()
    dtype: Any = None
    nbytes: int = 0
    offload_count: int = 0
    restore_count: int = 0
    attrs: dict = field(default_factory=dict)


def check_id(handle_id: Any) -> str:
    if not isinstance(handle_id, str):
        raise KVInvalidTypeError(f"handle_id must be a str, got {type(handle_id).__name__}")
    return handle_id


def check_label(name: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise KVInvalidInputError(f"{name} must be a non-empty str, got {v!r}")
    return v


def check_ratio(name: str, v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise KVInvalidTypeError(f"{name} must be a number in [0, 1], got {type(v).__name__}")
    if not 0.0 <= v <= 1.0:
        raise KVInvalidInputError(f"{name} must be in [0, 1], got {v}")
    return float(v)


def check_cap(name: str, v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise KVInvalidInputError(f"{name} must be an int >= 0 or None, got {v!r}")
    return v


@dataclass(slots=True)
class SeedState:
    """What the seed's handle registry keeps per manager."""

    records: dict[str, HandleRecord] = field(default_factory=dict)
    order: int = 0
    nvme_dir: Path | None = None
    stats: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("offloads", "restores", "nvme_offloads", "nvme_restores"), 0
        )
    )
