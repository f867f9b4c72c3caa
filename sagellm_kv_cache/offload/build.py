"""Building the offload chain: a lower tier shaped like the device pool, capacities to configs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from ..errors import KVConfigError
from ..storage import KVStorage
from .tiers import LowerTier, TierConfig, TierKind

if TYPE_CHECKING:
    from ..pool import KVPool
    from ..storage import ModelShape

__all__ = ["DISK_TIER_NAMES", "make_tier", "pool_and_tiers", "tier_configs"]

#: tier names ``from_capacities`` makes disk tiers (others are host tiers)
DISK_TIER_NAMES = ("disk", "nvme", "ssd")


def make_tier(device: KVPool, config: TierConfig, pin_host_memory: bool) -> LowerTier:
    """A lower tier holding blocks of ``device``'s geometry (metadata-only with it).

    Raises:
        KVConfigError: a disk directory under a metadata-only pool, or a disk
            tier without one under a pool that holds KV.
    """
    storage = device.storage
    block_size = device.block_size
    if storage is None:
        if config.directory is not None:
            raise KVConfigError(
                f"tier {config.name}: a metadata-only device pool cannot back a disk directory"
            )
        return LowerTier(config, block_size, clock=device.clock)
    if config.kind == TierKind.DISK.value and config.directory is None:
        raise KVConfigError(f"disk tier {config.name} needs a directory when the pool holds KV")
    dims = (*storage.kv.shape[:2], 1, *storage.kv.shape[3:])
    geometry = f"{storage.dtype}|{storage.layout}|{'x'.join(map(str, dims))}"
    shape = storage.shape

    def host_storage(n: int) -> KVStorage:
        return KVStorage(n, block_size, shape, "cpu", storage.layout, pin_memory=pin_host_memory)

    return LowerTier(
        config,
        block_size,
        storage_factory=host_storage,
        block_nbytes=storage.bytes_per_block,
        geometry=geometry,
        block_dims=dims,
        storage_dtype=storage.storage_dtype,
        clock=device.clock,
    )


def tier_configs(
    capacities: Mapping[str, int], eviction_policy: str, disk_dir: str | None
) -> list[TierConfig]:
    """``TierConfig``s of the lower tiers ``{"cpu": blocks, "disk": blocks}`` (top down);
    a disk tier gets ``disk_dir`` as its directory."""
    configs = []
    for name, n in capacities.items():
        is_disk = name.lower() in DISK_TIER_NAMES
        configs.append(
            TierConfig(
                name=name,
                num_blocks=n,
                kind="disk" if is_disk else "host",
                eviction_policy=eviction_policy,
                directory=disk_dir if is_disk else None,
            )
        )
    return configs


def pool_and_tiers(
    capacities: Mapping[str, int],
    *,
    block_size: int,
    model_shape: ModelShape | str | None,
    device: str,
    eviction_policy: str,
    disk_dir: str | None,
    clock: Callable[[], float] | None,
) -> tuple[KVPool, list[TierConfig]]:
    """The device pool and lower tier configs of ``{"gpu": blocks, "cpu": blocks, ...}``
    (first = device, named after its key); disk tiers get ``disk_dir`` when the pool
    holds KV (``model_shape`` given)."""
    from ..pool import KVPool

    items = list(capacities.items())
    if not items:
        raise KVConfigError("capacities needs at least the device tier")
    (dev_name, dev_blocks), lower = items[0], dict(items[1:])
    pool = KVPool(
        num_blocks=dev_blocks,
        block_size=block_size,
        model_shape=model_shape,
        device=device,
        eviction_policy=eviction_policy,
        clock=clock,
        tier=dev_name,
    )
    directory = disk_dir if model_shape is not None else None
    return pool, tier_configs(lower, eviction_policy, directory)
