"""Per-device load metrics for placement (the seed's ``DeviceLoadMetrics`` / ``LoadMetricsCollector``).

A collector holds one mutable ``DeviceLoadMetrics`` per device. Its figures come
from two places:

* the device's own pool, when one is attached (``attach_pool``): ``refresh()``
  reads ``KVPool.get_stats()`` (blocks in use, capacity, block size) and
  ``prefix_blocks()`` asks the pool how many leading blocks of a request it
  holds (``match_prefix``: a peek, nothing taken, nothing touched);
* the caller (an engine's scheduler, the simulator): request counts and wait
  times through ``update_request_count`` / ``update_wait_time``.

Every update validates first (typed errors, the metrics unchanged on error).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import KVInvalidInputError, KVInvalidTypeError

__all__ = ["DeviceLoadMetrics", "LoadMetricsCollector"]


def _count(value: Any, name: str) -> int:
    """An integer >= 0 (numpy integers too, never bools)."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise KVInvalidTypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value.__index__())
    if value < 0:
        raise KVInvalidInputError(f"{name} must be >= 0, got {value}")
    return value


def _amount(value: Any, name: str) -> float:
    """A finite number >= 0 (never bools)."""
    if isinstance(value, bool) or not hasattr(value, "__float__"):
        raise KVInvalidTypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not v >= 0 or v == float("inf"):
        raise KVInvalidInputError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


@dataclass(slots=True)
class DeviceLoadMetrics:
    """The load of one device: requests, KV occupancy, memory, waits.

    Example:
        >>> m = DeviceLoadMetrics.create("cuda:0", kv_tokens_capacity=4096)
        >>> m.update_kv_usage(1024)
        >>> m.kv_utilization()
        0.25
    """

    #: the device's id (a str or int, hashable)
    device: Hashable
    #: requests running on the device
    active_requests: int = 0
    #: requests waiting for it
    queue_length: int = 0
    #: tokens of the KV blocks in use (a whole block counts ``block_size`` tokens)
    kv_tokens_used: int = 0
    #: tokens of KV the device holds when full (0: unknown)
    kv_tokens_capacity: int = 0
    #: device memory in use, in megabytes (as the caller reports it)
    memory_used_mb: float = 0.0
    #: device memory, in megabytes (0: unknown)
    memory_capacity_mb: float = 0.0
    #: mean queue wait of its requests, in milliseconds
    avg_wait_time_ms: float = 0.0
    #: longest queue wait, in milliseconds
    max_wait_time_ms: float = 0.0
    #: tokens per KV block, converts ``kv_tokens_*`` to blocks (1 unless a pool is attached)
    block_size: int = 1
    #: when a figure last changed, seconds since the epoch (``time.time()``)
    updated_at: float = field(default_factory=time.time)

    @classmethod
    def create(
        cls, device: Hashable, kv_tokens_capacity: int = 0, memory_capacity_mb: float = 0.0
    ) -> DeviceLoadMetrics:
        """New metrics for ``device`` with these capacities and nothing used."""
        return cls(
            device=device,
            kv_tokens_capacity=_count(kv_tokens_capacity, "kv_tokens_capacity"),
            memory_capacity_mb=_amount(memory_capacity_mb, "memory_capacity_mb"),
        )

    def update_kv_usage(self, kv_tokens_used: int) -> None:
        """Set the KV tokens in use."""
        self._set(kv_tokens_used=_count(kv_tokens_used, "kv_tokens_used"))

    def update_request_count(self, active: int, queued: int) -> None:
        """Set the running (``active``) and waiting (``queued``) request counts."""
        self._set(active_requests=_count(active, "active"), queue_length=_count(queued, "queued"))

    def update_memory_usage(self, memory_used_mb: float) -> None:
        """Set the memory in use (MB)."""
        self._set(memory_used_mb=_amount(memory_used_mb, "memory_used_mb"))

    def update_wait_time(self, avg_ms: float, max_ms: float) -> None:
        """Set the average and longest queue wait (ms)."""
        self._set(
            avg_wait_time_ms=_amount(avg_ms, "avg_ms"), max_wait_time_ms=_amount(max_ms, "max_ms")
        )

    def _set(self, **fields: Any) -> None:
        """Set checked ``fields`` (the callers check every value first: nothing changes
        on bad input) and stamp ``updated_at``."""
        for name, value in fields.items():
            setattr(self, name, value)
        self.updated_at = time.time()

    def kv_utilization(self) -> float:
        """KV tokens used / capacity (0.0 when the capacity is unknown)."""
        cap = self.kv_tokens_capacity
        return self.kv_tokens_used / cap if cap else 0.0

    def memory_utilization(self) -> float:
        """Memory used / capacity (0.0 when the capacity is unknown)."""
        cap = self.memory_capacity_mb
        return self.memory_used_mb / cap if cap else 0.0

    def total_requests(self) -> int:
        """Running plus waiting requests."""
        return self.active_requests + self.queue_length

    def kv_blocks_used(self) -> int:
        """Blocks in use (``kv_tokens_used`` // ``block_size``)."""
        return self.kv_tokens_used // self.block_size

    def is_overloaded(self, kv_threshold: float = 0.9, memory_threshold: float = 0.9) -> bool:
        """Whether KV or memory utilization is above its threshold."""
        return self.kv_utilization() > kv_threshold or self.memory_utilization() > memory_threshold

    def available_kv_tokens(self) -> int:
        """KV tokens not in use (never negative)."""
        return max(0, self.kv_tokens_capacity - self.kv_tokens_used)

    def to_dict(self) -> dict[str, Any]:
        """Every field, plus ``kv_utilization``."""
        return {**asdict(self), "kv_utilization": self.kv_utilization()}

    def __repr__(self) -> str:
        return (
            f"DeviceLoadMetrics(device={self.device!r}, active={self.active_requests}, "
            f"queued={self.queue_length}, kv_util={self.kv_utilization():.2f})"
        )


def _pool_matcher(pool: Any) -> Callable[[Sequence[Hashable]], int]:
    """How many leading blocks ``pool`` holds for a list of hashes (a peek, no side effect)."""
    fn = getattr(pool, "match_prefix", None)
    if fn is None:
        raise KVInvalidTypeError(f"{type(pool).__name__} has no match_prefix(block_hashes=...)")
    if hasattr(pool, "get_stats") and hasattr(pool, "block_pool"):  # a KVPool

        def match(hashes: Sequence[Hashable]) -> int:
            return len(fn(block_hashes=hashes)[0])

        return match

    def match_any(hashes: Sequence[Hashable]) -> int:  # a BlockPool: a list of ids
        out = fn(hashes)
        return out if isinstance(out, int) else len(out)

    return match_any


class LoadMetricsCollector:
    """Per-device ``DeviceLoadMetrics``, optionally fed by each device's own pool.

    Example:
        >>> from sagellm_kv_cache import KVPool
        >>> c = LoadMetricsCollector()
        >>> c.attach_pool("gpu0", KVPool(num_blocks=8, block_size=16, metadata_only=True))
        >>> c.get_metrics("gpu0").kv_tokens_capacity
        128
    """

    def __init__(self) -> None:
        self._metrics: dict[Hashable, DeviceLoadMetrics] = {}
        self._pools: dict[Hashable, Any] = {}
        self._matchers: dict[Hashable, Callable[[Sequence[Hashable]], int]] = {}
        #: the last ``metrics_of`` answer (devices, metrics), until a device is (re)registered
        self._last_of: tuple[list[Hashable], list[DeviceLoadMetrics]] | None = None
        #: devices answered together by one ``match_many`` (``attach_match_many``)
        self._group: tuple[list[Hashable], Callable[[Sequence[Hashable]], list[int]]] | None = None
        #: bumped whenever a device, pool or peek is (re)registered, detached or reset: what
        #: a caller looked up once (``metrics_of``, ``matcher_of``) is current while it holds
        self.version = 0

    # -- devices ---------------------------------------------------------------
    def register_device(
        self, device: Hashable, kv_tokens_capacity: int = 0, memory_capacity_mb: float = 0.0
    ) -> None:
        """Track ``device`` (re-registering resets its metrics and keeps its pool)."""
        _check_device(device)
        self._metrics[device] = DeviceLoadMetrics.create(
            device, kv_tokens_capacity, memory_capacity_mb
        )
        self._changed()

    def attach_pool(
        self,
        device: Hashable,
        pool: Any,
        *,
        match_fn: Callable[[Sequence[Hashable]], int] | None = None,
    ) -> None:
        """Feed ``device``'s metrics from ``pool`` (registers the device if new).

        Args:
            device: the device id.
            pool: a ``KVPool`` (anything with ``get_stats()`` and ``match_prefix``).
            match_fn: optional faster peek ``hashes -> leading cached blocks``
                (the simulator passes its metadata pool's ``BlockPool.match_prefix``).
        """
        _check_device(device)
        if not hasattr(pool, "get_stats"):
            raise KVInvalidTypeError(f"{type(pool).__name__} has no get_stats()")
        matcher = match_fn if match_fn is not None else _pool_matcher(pool)
        if not callable(matcher):
            raise KVInvalidTypeError("match_fn must be callable")
        stats = pool.get_stats()
        if device not in self._metrics:
            self._metrics[device] = DeviceLoadMetrics.create(device)
        self._pools[device] = pool
        self._matchers[device] = matcher
        self._changed()
        self._apply(self._metrics[device], stats)

    def attach_match_many(
        self,
        devices: Sequence[Hashable],
        match_many: Callable[[Sequence[Hashable]], list[int]],
    ) -> None:
        """One peek for several attached devices at once.

        ``match_many(hashes)`` returns, in ``devices`` order, what each device's
        own peek would (its leading cached blocks); ``prefix_blocks_many`` over
        exactly these devices then makes one call instead of one per device (the
        simulator answers all its instances so).
        """
        devices = list(devices)
        for d in devices:
            if d not in self._matchers:
                raise KVInvalidInputError(f"device {d!r} has no attached pool")
        if not callable(match_many):
            raise KVInvalidTypeError("match_many must be callable")
        self._group = (devices, match_many)
        self._changed()

    def unregister_device(self, device: Hashable) -> None:
        """Stop tracking ``device`` (its pool too)."""
        self._require(device)
        del self._metrics[device]
        self._pools.pop(device, None)
        self._matchers.pop(device, None)
        if self._group is not None and device in self._group[0]:
            self._group = None
        self._changed()

    def list_devices(self) -> list[Hashable]:
        """Registered devices, in registration order."""
        return list(self._metrics)

    def get_metrics(self, device: Hashable) -> DeviceLoadMetrics:
        """The live metrics object of ``device`` (KVInvalidInputError if unknown)."""
        return self._require(device)

    def get_all_metrics(self) -> dict[Hashable, DeviceLoadMetrics]:
        """``{device: metrics}`` (a new dict over the live objects)."""
        return dict(self._metrics)

    def has_pool(self, device: Hashable) -> bool:
        return device in self._matchers

    def get_pool(self, device: Hashable) -> Any:
        """The pool attached to ``device`` (None without one)."""
        return self._pools.get(device)

    def metrics_of(self, devices: Sequence[Hashable]) -> list[DeviceLoadMetrics]:
        """The live metrics of ``devices``, in order (KVInvalidInputError naming the
        first one not registered)."""
        last = self._last_of
        if last is not None and last[0] == devices:  # a router asks for the same list
            return last[1][:]
        metrics = self._metrics
        try:
            out = [metrics[d] for d in devices]
            self._last_of = (list(devices), out)
            return out[:]
        except (KeyError, TypeError):
            bad = next(d for d in devices if not _known(metrics, d))
            raise KVInvalidInputError(
                f"device {bad!r} is not registered with the collector"
            ) from None

    # -- updates ---------------------------------------------------------------
    def update_kv_usage(self, device: Hashable, kv_tokens_used: int) -> None:
        self._require(device).update_kv_usage(kv_tokens_used)

    def update_request_count(self, device: Hashable, active: int, queued: int) -> None:
        self._require(device).update_request_count(active, queued)

    def update_memory_usage(self, device: Hashable, memory_used_mb: float) -> None:
        self._require(device).update_memory_usage(memory_used_mb)

    def update_wait_time(self, device: Hashable, avg_ms: float, max_ms: float) -> None:
        self._require(device).update_wait_time(avg_ms, max_ms)

    def refresh(self, devices: Sequence[Hashable] | None = None) -> None:
        """Read each attached pool's ``get_stats()`` into its device's KV figures."""
        for d in self._metrics if devices is None else devices:
            pool = self._pools.get(d)
            if pool is not None:
                self._apply(self._metrics[d], pool.get_stats())

    def prefix_blocks(self, device: Hashable, block_hashes: Sequence[Hashable]) -> int:
        """Leading blocks of ``block_hashes`` cached on ``device``'s pool (0 without a pool)."""
        m = self._matchers.get(device)
        return m(block_hashes) if m is not None else 0

    def prefix_blocks_many(
        self, devices: Sequence[Hashable], block_hashes: Sequence[Hashable]
    ) -> list[int]:
        """``prefix_blocks`` of each of ``devices`` (one call when they are the
        ``attach_match_many`` group)."""
        return self.matcher_of(devices)(block_hashes)

    def matcher_of(self, devices: Sequence[Hashable]) -> Callable[[Sequence[Hashable]], list[int]]:
        """``hashes -> prefix_blocks_many(devices, hashes)``, looked up once: the
        ``attach_match_many`` peek when ``devices`` are its group, else one peek per
        device (0 for a device without a pool). Current until ``version`` changes."""
        group = self._group
        if group is not None and group[0] == devices:
            return group[1]
        fns = self._matchers
        peeks = [fns.get(d) for d in devices]

        def match_each(block_hashes: Sequence[Hashable]) -> list[int]:
            return [0 if fn is None else fn(block_hashes) for fn in peeks]

        return match_each

    def reset(self) -> None:
        """Forget every device and pool."""
        self._metrics.clear()
        self._pools.clear()
        self._matchers.clear()
        self._group = None
        self._changed()

    # -- helpers ---------------------------------------------------------------
    def _changed(self) -> None:
        self._last_of = None
        self.version += 1

    @staticmethod
    def _apply(m: DeviceLoadMetrics, stats: dict[str, Any]) -> None:
        bs = int(stats.get("block_size", 1)) or 1
        m.block_size = bs
        if "total_blocks" in stats:
            m.kv_tokens_capacity = int(stats["total_blocks"]) * bs
        elif "max_tokens" in stats:
            m.kv_tokens_capacity = int(stats["max_tokens"])
        m.kv_tokens_used = int(stats.get("used_blocks", 0)) * bs
        m.updated_at = time.time()

    def _require(self, device: Hashable) -> DeviceLoadMetrics:
        try:
            return self._metrics[device]
        except (KeyError, TypeError):
            raise KVInvalidInputError(f"device {device!r} is not registered") from None

    def __repr__(self) -> str:
        return f"LoadMetricsCollector(devices={len(self._metrics)})"


def _known(metrics: dict, device: Any) -> bool:
    try:
        return device in metrics
    except TypeError:  # unhashable
        return False


def _check_device(device: Any) -> None:
    if device is None or isinstance(device, bool):
        raise KVInvalidTypeError(f"device must be a str or int id, got {device!r}")
    try:
        hash(device)
    except TypeError:
        raise KVInvalidTypeError(f"device must be hashable, got {type(device).__name__}") from None
