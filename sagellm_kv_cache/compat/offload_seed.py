"""The seed's handle-level methods of ``KVOffloadManager`` (a mixin of the manager).

The seed tracks whole handles across three tiers (accelerator -> CPU DRAM
-> NVMe) and moves them on demand; here the moves are real::

    register(h)        offload(id)           offload_to_nvme(id)
    device pool  ----------------------> host copy -----------------> file (raw bytes,
      ^  (h's KV read, blocks freed)      (CPU tensor)                  header, checksum)
      |                                       |                            |
      +---- restore(id): a new allocation <---+---- restore_from_nvme(id) -+
            in the device pool, KV written back bit-exact (verified first)

* ``offload`` copies the handle's KV to host memory, then frees the handle in
  the device pool (``manager.free``): its blocks become free or, when they
  were cached, stay cached and evictable. Blocks shared with another live
  handle stay where they are for it: an offload never takes KV from anyone
  else behind their back.
* ``restore`` allocates fresh device blocks for the same number of tokens and
  writes the KV back; the returned spec's ``handle`` is the new live handle
  (``get_handle_info`` / ``registered_handle`` find it by the original id).
  The old ``KVHandle`` object is freed by the offload and stays freed. If the
  device pool has no room, the error is raised and nothing changes.
* The NVMe tier is a directory of one file per handle (``nvme_dir``, default
  a temporary directory removed with the manager; format in
  ``handle_files.py``). A file that does not match is a typed error on
  restore, and the handle stays on NVMe.
* A pinned handle (``pool.pin``: the engine is running it) is never
  offloaded, neither explicitly (``KVHandlePinnedError``) nor by
  ``maybe_offload*``.
* The automatic triggers use the seed's thresholds (attributes, set them on
  the manager): ``offload_threshold`` 0.85 (device utilisation above which
  ``maybe_offload`` acts), ``idle_offload_secs`` None (``maybe_offload_idle``
  does nothing until it is set), ``nvme_offload_threshold`` 0.90,
  ``max_offloaded_handles`` None. ``maybe_offload`` without a utilisation
  measures the pool (blocks held by live handles / all blocks) and stops as
  soon as it is at or below the threshold; given a utilisation, it subtracts
  the blocks each offload frees. Candidates go least recently active first
  (``touch``), ties in registration order. ``seed_clock`` is the clock of
  ``touch`` and the idle test (``time.monotonic``; tests replace it).

Differences from the seed: no ``transfer_fn`` (the manager moves the bytes
itself); errors are the project's typed errors (``KVHandleNotFoundError``
for unknown ids, ``KVInvalidInputError`` for a handle in the wrong tier or a
bad device label, ``KVBudgetExceededError`` at ``max_offloaded_handles``),
each leaving every state as it was; registering a handle twice is an error,
not a warning.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import (
    KVBudgetExceededError,
    KVHandleNotFoundError,
    KVHandlePinnedError,
    KVInvalidHandleError,
    KVInvalidInputError,
    KVInvalidTypeError,
)
from ..handle import KVHandle
from .handle_files import read_handle_file, write_handle_file
from .offload_records import (
    CPU,
    DEVICE,
    NVME,
    HandleRecord,
    OffloadSpec,
    SeedState,
    check_cap,
    check_id,
    check_label,
    check_ratio,
)

if TYPE_CHECKING:
    from ..pool import KVPool

__all__ = ["OffloadSeedMixin", "OffloadSpec"]


class OffloadSeedMixin:
    offload_threshold: float = 0.85
    idle_offload_secs: float | None = None
    nvme_offload_threshold: float = 0.90
    max_offloaded_handles: int | None = None
    #: directory of the NVMe tier's files (None: a temporary one per manager)
    nvme_dir: str | os.PathLike | None = None
    #: host bytes for offloaded handles that count as utilisation 1.0 in
    #: ``maybe_cascade_to_nvme`` (None: no projection, cascade every candidate)
    cpu_capacity_bytes: int | None = None
    seed_clock = staticmethod(time.monotonic)

    if TYPE_CHECKING:  # provided by KVOffloadManager
        device: KVPool
        device_name: str
        block_size: int

        def free(self, handle: KVHandle) -> None: ...

    # -- state ---------------------------------------------------------------------
    def _seed_state(self) -> SeedState:
        st = self.__dict__.get("_seed_offload")
        if st is None:
            st = self.__dict__["_seed_offload"] = SeedState()
        return st

    def _rec(self, handle_id: Any) -> HandleRecord:
        rec = self._seed_state().records.get(check_id(handle_id))
        if rec is None:
            raise KVHandleNotFoundError(f"handle {handle_id!r} is not registered")
        return rec

    def _nvme_path(self, rec: HandleRecord) -> Path:
        st = self._seed_state()
        if st.nvme_dir is None:
            if self.nvme_dir is not None:
                st.nvme_dir = Path(self.nvme_dir)
                st.nvme_dir.mkdir(parents=True, exist_ok=True)
            else:
                st.nvme_dir = Path(tempfile.mkdtemp(prefix="sagellm-kv-nvme-"))
                weakref.finalize(self, shutil.rmtree, str(st.nvme_dir), True)
        name = hashlib.sha1(rec.handle_id.encode("utf-8")).hexdigest()
        return st.nvme_dir / f"{name}.kvh"

    # -- registry ------------------------------------------------------------------
    def register(self, handle: KVHandle, device: str | None = None) -> None:
        """Track ``handle`` (a live handle of the device pool) on ``device``
        (a label; default: the device tier's name). Raises
        ``KVInvalidInputError`` when it is registered already."""
        if not isinstance(handle, KVHandle):
            raise KVInvalidTypeError(f"expected a KVHandle, got {type(handle).__name__}")
        dev = self.device_name if device is None else check_label("device", device)
        try:
            live = self.device.get_handle(handle.handle_id)
        except KVInvalidHandleError:
            live = None
        if live is not handle:
            raise KVInvalidHandleError(
                f"handle {handle.handle_id} is not a live handle of this manager's device pool"
            )
        st = self._seed_state()
        if handle.handle_id in st.records:
            raise KVInvalidInputError(f"handle {handle.handle_id} is already registered")
        st.order += 1
        st.records[handle.handle_id] = HandleRecord(
            handle.handle_id, handle, handle.num_tokens, dev, dev, st.order, self.seed_clock()
        )

    def unregister(self, handle_id: str) -> None:
        """Stop tracking a handle. An offloaded one's host copy or file is dropped
        (its KV is gone); a device-resident one stays in the pool, the caller's."""
        rec = self._rec(handle_id)
        del self._seed_state().records[rec.handle_id]
        if rec.path is not None:
            rec.path.unlink(missing_ok=True)
        rec.kv = None

    def registered_ids(self) -> list[str]:
        """Ids of the registered handles, in registration order."""
        return list(self._seed_state().records)

    def registered_handle(self, handle_id: str) -> KVHandle | None:
        """The live device handle now holding this id's KV (None while offloaded)."""
        return self._rec(handle_id).handle

    def current_device(self, handle_id: str) -> str:
        return self._rec(handle_id).current_device

    def is_offloaded(self, handle_id: str) -> bool:
        """On CPU or NVMe (not in the device pool)."""
        return self._rec(handle_id).location != DEVICE

    def is_on_nvme(self, handle_id: str) -> bool:
        return self._rec(handle_id).location == NVME

    def offloaded_count(self) -> int:
        return sum(r.location != DEVICE for r in self._seed_state().records.values())

    def registered_count(self) -> int:
        return len(self._seed_state().records)

    def touch(self, handle_id: str) -> None:
        """Mark the handle active now (``maybe_offload*`` pick the least recent first)."""
        rec = self._rec(handle_id)
        rec.last_active = self.seed_clock()
        if rec.handle is not None:
            rec.handle.touch()

    def get_handle_info(self, handle_id: str) -> dict[str, Any]:
        rec = self._rec(handle_id)
        return {
            "handle_id": rec.handle_id,
            "current_device": rec.current_device,
            "original_device": rec.original_device,
            "offloaded": rec.location != DEVICE,
            "location": rec.location,
            "offload_count": rec.offload_count,
            "restore_count": rec.restore_count,
            "num_tokens": rec.num_tokens,
            "last_active": rec.last_active,
            "block_ids": list(rec.handle.block_ids) if rec.handle is not None else [],
            "nbytes": rec.nbytes,
            "path": str(rec.path) if rec.path is not None else None,
        }

    def get_offload_stats(self) -> dict[str, int]:
        """Counts of the handle-level moves (the seed's ``get_stats`` counters)."""
        out = dict(self._seed_state().stats)
        out["registered"] = self.registered_count()
        out["offloaded"] = self.offloaded_count()
        return out

    # -- moves -----------------------------------------------------------------------
    def _spec(
        self, rec: HandleRecord, src: str, dst: str, trigger: Any, request_id: str, handle=None
    ) -> OffloadSpec:
        nb = -(-rec.num_tokens // self.block_size)
        return OffloadSpec(
            rec.handle_id,
            src,
            dst,
            str(trigger),
            rec.num_tokens,
            nb,
            rec.nbytes,
            request_id,
            handle,
        )

    def _moved(
        self,
        rec: HandleRecord,
        location: str,
        dst: str,
        counter: str,
        trigger: Any,
        request_id: str,
        *,
        kv: Any = None,
        path: Path | None = None,
        handle: KVHandle | None = None,
    ) -> OffloadSpec:
        """Record a completed move of ``rec`` to ``location`` (labelled ``dst``): where its
        KV is now (``kv`` on CPU, ``path`` on NVMe, ``handle`` on the device), a file it
        left is removed, the move is counted; the seed's spec of it."""
        src = rec.current_device
        if rec.path is not None and rec.path != path:
            rec.path.unlink(missing_ok=True)
        rec.location, rec.current_device = location, dst
        rec.kv, rec.path, rec.handle = kv, path, handle
        self._seed_state().stats[counter] += 1
        return self._spec(rec, src, dst, trigger, request_id, handle)

    def offload(
        self,
        handle_id: str,
        *,
        dst_device: str = "cpu",
        trigger: str = "explicit",
        request_id: str = "",
    ) -> OffloadSpec:
        """Move the handle's KV out of the device pool (to host memory, or to a
        file when ``dst_device`` starts with ``"nvme"``) and free its blocks.
        An offloaded handle is left as it is (the spec names no move)."""
        rec = self._rec(handle_id)
        dst = check_label("dst_device", dst_device)
        h = rec.handle
        if rec.location != DEVICE or h is None:
            return self._spec(rec, rec.current_device, rec.current_device, trigger, request_id)
        if h.pin_count:
            raise KVHandlePinnedError(f"handle {rec.handle_id} is pinned; it is not offloaded")
        cap = self.max_offloaded_handles
        if cap is not None and self.offloaded_count() >= cap:
            raise KVBudgetExceededError(
                f"max_offloaded_handles ({cap}) reached; cannot offload {rec.handle_id}"
            )
        kv = None
        if self.device.storage is not None:
            kv = self.device.read_kv(h).to("cpu").contiguous()
        to_nvme = dst.startswith("nvme")
        path = self._write_file(rec, kv) if to_nvme and kv is not None else None
        self.free(h)  # nothing changed before this point; the copy is complete
        rec.attrs = {"dtype": h.dtype, "layout": h.layout, "metadata": dict(h.metadata)}
        if kv is not None:
            rec.shape, rec.dtype, rec.nbytes = (
                tuple(kv.shape),
                kv.dtype,
                kv.numel() * kv.element_size(),
            )
        rec.offload_count += 1
        if to_nvme:
            return self._moved(rec, NVME, dst, "nvme_offloads", trigger, request_id, path=path)
        return self._moved(rec, CPU, dst, "offloads", trigger, request_id, kv=kv)

    def restore(
        self,
        handle_id: str,
        *,
        dst_device: str | None = None,
        trigger: str = "explicit",
        request_id: str = "",
    ) -> OffloadSpec:
        """Bring an offloaded handle back into the device pool (a new allocation,
        KV bit-exact); ``dst_device`` is the label it gets (default: the one it
        was registered with). The spec's ``handle`` is the new live handle."""
        rec = self._rec(handle_id)
        dst = rec.original_device if dst_device is None else check_label("dst_device", dst_device)
        if rec.location == DEVICE:
            raise KVInvalidInputError(
                f"handle {rec.handle_id} is not offloaded (current device: {rec.current_device})"
            )
        kv = rec.kv if rec.location == CPU else self._read_file(rec)
        pool = self.device
        new = pool.alloc(
            rec.num_tokens,
            dtype=rec.attrs.get("dtype"),
            layout=rec.attrs.get("layout"),
            metadata=rec.attrs.get("metadata") or None,
        )
        try:
            if kv is not None and pool.storage is not None:
                pool.write_kv(new, kv.to(pool.storage.kv.device))
        except BaseException:
            pool.free(new)
            raise
        counter = "nvme_restores" if rec.location == NVME else "restores"
        rec.restore_count += 1
        rec.last_active = self.seed_clock()
        return self._moved(rec, DEVICE, dst, counter, trigger, request_id, handle=new)

    def offload_to_nvme(
        self,
        handle_id: str,
        *,
        dst_device: str = "nvme",
        trigger: str = "explicit",
        request_id: str = "",
    ) -> OffloadSpec:
        """Move a handle from host memory to the NVMe tier (it must be on CPU)."""
        rec = self._rec(handle_id)
        dst = check_label("dst_device", dst_device)
        if not dst.startswith("nvme"):
            raise KVInvalidInputError(f"dst_device for NVMe must start with 'nvme', got {dst!r}")
        if rec.location != CPU:
            raise KVInvalidInputError(
                f"handle {rec.handle_id} must be on CPU before NVMe "
                f"(current device: {rec.current_device})"
            )
        path = self._write_file(rec, rec.kv) if rec.kv is not None else None
        return self._moved(rec, NVME, dst, "nvme_offloads", trigger, request_id, path=path)

    def restore_from_nvme(
        self,
        handle_id: str,
        *,
        dst_device: str = "cpu",
        trigger: str = "explicit",
        request_id: str = "",
    ) -> OffloadSpec:
        """NVMe -> host memory (``dst_device`` "cpu..."), or straight back into the
        device pool for any other label (as ``restore``)."""
        rec = self._rec(handle_id)
        dst = check_label("dst_device", dst_device)
        if rec.location != NVME:
            raise KVInvalidInputError(
                f"handle {rec.handle_id} is not on NVMe (current device: {rec.current_device})"
            )
        if not dst.startswith("cpu"):
            return self.restore(handle_id, dst_device=dst, trigger=trigger, request_id=request_id)
        kv = self._read_file(rec) if rec.path is not None else None
        return self._moved(rec, CPU, dst, "nvme_restores", trigger, request_id, kv=kv)

    # -- NVMe files (handle_files.py) ------------------------------------------------------
    def _write_file(self, rec: HandleRecord, kv: Any) -> Path:
        path = self._nvme_path(rec)
        write_handle_file(path, kv, rec.handle_id)
        return path

    def _read_file(self, rec: HandleRecord) -> Any:
        """The KV in ``rec.path``, after checking every header field and the checksum."""
        if rec.path is None:  # a metadata-only pool moved no bytes
            return None
        return read_handle_file(rec.path, rec.shape, rec.dtype, rec.nbytes, rec.handle_id)

    # -- automatic triggers ----------------------------------------------------------------
    def _device_utilisation(self) -> float:
        s = self.device.get_stats()
        return s["used_blocks"] / s["total_blocks"]

    def blocks_freed_by_offload(self, h: KVHandle) -> int:
        """Device blocks an offload of ``h`` would free (those no one else holds)."""
        refs = self.device.block_pool.ref_counts
        return sum(1 for b in h.block_ids if refs[b] == 1)

    def _lru(self, location: str, label: str | None) -> list[HandleRecord]:
        recs = [
            r
            for r in self._seed_state().records.values()
            if r.location == location
            and (label is None or r.current_device == label)
            and not (r.handle is not None and r.handle.pin_count)
        ]
        recs.sort(key=lambda r: (r.last_active, r.order))
        return recs

    def _move_lru(
        self,
        location: str,
        label: str | None,
        cap: int | None,
        more: Callable[[HandleRecord], bool],
        move: Callable[[HandleRecord], OffloadSpec],
        *,
        counts_offloads: bool = True,
    ) -> list[OffloadSpec]:
        """``move`` the unpinned handles at ``location`` (labelled ``label``), least
        recently active first, while ``more(rec)``, at most ``cap`` of them (and, for
        moves off the device, while ``max_offloaded_handles`` allows)."""
        out: list[OffloadSpec] = []
        for rec in self._lru(location, label):
            if not more(rec) or (cap is not None and len(out) >= cap):
                break
            limit = self.max_offloaded_handles
            if counts_offloads and limit is not None and self.offloaded_count() >= limit:
                break
            out.append(move(rec))
        return out

    def maybe_offload(
        self,
        npu_kv_utilisation: float | None = None,
        *,
        npu_device: str | None = None,
        cpu_device: str = "cpu",
        max_to_offload: int | None = None,
    ) -> list[OffloadSpec]:
        """Offload least recently active handles while device utilisation is
        above ``offload_threshold`` (see the module docstring)."""
        given = check_ratio("npu_kv_utilisation", npu_kv_utilisation)
        cap = check_cap("max_to_offload", max_to_offload)
        check_label("cpu_device", cpu_device)
        util = self._device_utilisation() if given is None else given
        total = self.device.num_blocks

        def move(rec: HandleRecord) -> OffloadSpec:
            nonlocal util
            assert rec.handle is not None
            freed = self.blocks_freed_by_offload(rec.handle)
            spec = self.offload(rec.handle_id, dst_device=cpu_device, trigger="memory_pressure")
            util = self._device_utilisation() if given is None else util - freed / total
            return spec

        return self._move_lru(
            DEVICE, npu_device, cap, lambda rec: util > self.offload_threshold, move
        )

    def maybe_offload_idle(
        self,
        *,
        npu_device: str | None = None,
        cpu_device: str = "cpu",
        max_to_offload: int | None = None,
        idle_s: float | None = None,
    ) -> list[OffloadSpec]:
        """Offload device handles idle for more than ``idle_s`` (default:
        ``idle_offload_secs``; nothing happens while both are None)."""
        cap = check_cap("max_to_offload", max_to_offload)
        check_label("cpu_device", cpu_device)
        idle = self.idle_offload_secs if idle_s is None else idle_s
        if idle is None:
            return []
        if isinstance(idle, bool) or not isinstance(idle, int | float) or idle < 0:
            raise KVInvalidInputError(f"idle_s must be a number >= 0, got {idle!r}")
        now = self.seed_clock()
        return self._move_lru(
            DEVICE,
            npu_device,
            cap,
            lambda rec: now - rec.last_active > idle,
            lambda rec: self.offload(rec.handle_id, dst_device=cpu_device, trigger="idle_sequence"),
        )

    def maybe_cascade_to_nvme(
        self,
        cpu_kv_utilisation: float | None = None,
        *,
        cpu_device: str = "cpu",
        nvme_device: str = "nvme",
        max_to_cascade: int | None = None,
    ) -> list[OffloadSpec]:
        """Move least recently active host-resident handles to NVMe while host
        utilisation is above ``nvme_offload_threshold``. Without a utilisation,
        it is the host bytes held / ``cpu_capacity_bytes`` (0 when that is None)."""
        given = check_ratio("cpu_kv_utilisation", cpu_kv_utilisation)
        cap = check_cap("max_to_cascade", max_to_cascade)
        if not check_label("nvme_device", nvme_device).startswith("nvme"):
            raise KVInvalidInputError(f"nvme_device must start with 'nvme', got {nvme_device!r}")
        capacity = self.cpu_capacity_bytes
        if given is None:
            held = sum(r.nbytes for r in self._seed_state().records.values() if r.location == CPU)
            util = held / capacity if capacity else 0.0
        else:
            util = given

        def move(rec: HandleRecord) -> OffloadSpec:
            nonlocal util
            spec = self.offload_to_nvme(
                rec.handle_id, dst_device=nvme_device, trigger="nvme_pressure"
            )
            if capacity:
                util -= rec.nbytes / capacity
            return spec

        return self._move_lru(
            CPU,
            cpu_device,
            cap,
            lambda rec: util > self.nvme_offload_threshold,
            move,
            counts_offloads=False,
        )
