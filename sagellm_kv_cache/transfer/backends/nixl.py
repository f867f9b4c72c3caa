"""NIXL transport for ``KVTransferEngine``: one-sided READs over UCX.

The engine's ``expose``/``fetch`` pair maps onto NIXL like this::

    sender (rank s)                                  receiver (rank d)
    expose_many(d, tags, bufs)                       fetch_many(s, tags, outs)
      register bufs' storage (once, cached)            register outs' storage (once)
      notif "D" (first tag, id, n x (addr,  ------->   descriptors arrive in the inbox
        nbytes, dev, mem)) [+ the agent's metadata     ONE READ outs <- bufs of s
        if new memory]                                 (n descriptors), completion notif id
      wait: notif "C" id arrives  <-----------------   wait: READ state DONE

``expose`` / ``fetch`` are the one-message case. The engine hands a window
of direct-mode messages over as one group (``batch_messages``, up to
``MAX_BATCH``), so a transfer of up to that many messages costs one READ,
one descriptor notification and one completion.

* Memory is registered once per tensor storage (a pool's whole KV tensor, a
  reused staging buffer) and stays registered while transfers use it; a
  sender that registered new memory sends its refreshed agent metadata to
  each peer in front of the next descriptor, so the peer can address it.
  When a transfer fails, its messages are abandoned (all of them: the
  engine's tags carry the transfer in their upper 16 bits) and the memory
  they used is deregistered as soon as no live message needs it and no READ
  of ours may still write into it (an exposed buffer's deregistration also
  revokes the peer's access).
* First contact between two ranks exchanges agent metadata through the
  control store (key ``<root>/md/<group>/<rank>``), waited on with
  ``connect_timeout_s``. A backend talks to the backends of the same
  ``group`` on its peers, so backends may be built in any order; two live
  backends of one group on one rank are refused (``KVConfigError``).
  After that the data plane needs no store round trip: descriptors and
  completions travel as NIXL notifications, which are ordered per pair.
* Every wait is bounded by the caller's remaining time. A READ in state
  ``ERR`` raises ``KVTransferFailedError``; a descriptor or completion that
  does not arrive in time raises ``KVTransferTimeoutError`` (a killed peer
  shows up this way: NIXL does not report dead peers to the other side).
  A timed-out READ may still land later, so its buffer, request and
  registration are kept until NIXL reports it finished (checked on every
  poll) or ``close()``.

``nixl_cu12`` is imported when the backend is constructed, never by
``import sagellm_kv_cache``; without it the constructor raises
``KVConfigError`` naming the import error.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ...errors import KVCacheError, KVConfigError, KVTransferFailedError, KVTransferTimeoutError
from ..protocol import store_wait
from .base import TransferBackend, default_store
from .nixl_desc import (
    DESC,
    DONE,
    ENTRY,
    KIND_DESC,
    KIND_DONE,
    MAX_BATCH,
    check_group,
    desc_message,
    nixl_unavailable_reason,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["NixlBackend", "nixl_unavailable_reason"]

_KEY_ROOT = "skvx-nixl"
_MEM_TYPES = ("DRAM", "VRAM")


def _transfer_of(tag: int) -> int:
    """The transfer a message belongs to (``engine._tag``: seq in the upper 16 bits)."""
    return tag >> 16


@contextlib.contextmanager
def _typed(what: str, peer: int):
    """NIXL raises its own exception types (``nixlRemoteDisconnectError``...);
    the engine's callers get ``KVTransferFailedError`` with the NIXL status."""
    try:
        yield
    except KVCacheError:
        raise
    except Exception as exc:
        raise KVTransferFailedError(
            f"{what}: {type(exc).__name__}: {str(exc)[:300]}", peer=peer
        ) from None


class _Work:
    """A group of messages in flight; ``wait`` polls the agent until ``_done_locked``."""

    __slots__ = ("backend", "done", "peer", "tag")

    def __init__(self, backend: NixlBackend, peer: int, tag: int) -> None:
        self.backend = backend
        self.peer = peer
        self.tag = tag
        self.done = False

    def memory(self) -> list[Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _done_locked(self) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def _timeout_message(self, timeout_s: float) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def wait(self, timeout_s: float) -> None:
        if self.done:
            return
        deadline = time.monotonic() + max(timeout_s, 0.0)
        pause = 0.00005  # doubling to 2 ms: a busy spin would starve the transport
        b = self.backend
        while True:
            try:
                with b._lock, _typed(f"messages {self.tag:#x} with rank {self.peer}", self.peer):
                    b._poll_locked()
                    if self._done_locked():
                        self.done = True
                        return
            except KVCacheError:
                b._abandon(self)
                raise
            if time.monotonic() >= deadline:
                b._abandon(self)
                raise KVTransferTimeoutError(self._timeout_message(timeout_s), peer=self.peer)
            time.sleep(pause)
            pause = min(pause * 2, 0.002)


class _ExposeWork(_Work):
    """Sender side: done when the peer's completion notification arrives."""

    __slots__ = ("id", "tensors")

    def __init__(
        self, backend: NixlBackend, peer: int, tag: int, xid: int, tensors: list[Any]
    ) -> None:
        super().__init__(backend, peer, tag)
        self.id = xid
        self.tensors = tensors  # alive until the peer has read them

    def memory(self) -> list[Any]:
        return self.tensors

    def _done_locked(self) -> bool:
        b = self.backend
        if self.id not in b._completed:
            return False
        b._completed.discard(self.id)
        b._live.pop(self.id, None)
        return True

    def _timeout_message(self, timeout_s: float) -> str:
        return f"rank {self.peer} did not read message {self.tag:#x} within {timeout_s:.3f} s"


class _FetchWork(_Work):
    """Receiver side: one READ posted as soon as the sender's descriptors are here."""

    __slots__ = ("handle", "local", "outs")

    def __init__(
        self, backend: NixlBackend, peer: int, tag: int, outs: list[Any], local: Any
    ) -> None:
        super().__init__(backend, peer, tag)
        self.outs = outs  # alive until the READ is done (or close())
        self.local = local  # the local transfer descriptor list
        self.handle: Any = None

    def memory(self) -> list[Any]:
        return self.outs

    def _done_locked(self) -> bool:
        b = self.backend
        if self.handle is None:
            b._try_post_locked(self)
        if self.handle is None:
            return False
        state = b._agent.check_xfer_state(self.handle)
        if state == "ERR":
            raise KVTransferFailedError(
                f"NIXL READ of message {self.tag:#x} from rank {self.peer} failed",
                peer=self.peer,
            )
        if state != "DONE":
            return False
        b._pending.pop((self.peer, self.tag), None)
        with contextlib.suppress(Exception):
            b._agent.release_xfer_handle(self.handle)
        self.handle = None
        return True

    def _timeout_message(self, timeout_s: float) -> str:
        what = "no descriptor" if self.handle is None else "the READ did not complete"
        return f"message {self.tag:#x} from rank {self.peer}: {what} within {timeout_s:.3f} s"


class NixlBackend(TransferBackend):
    """Engine transport over NIXL (UCX): the receiver READs the sender's memory.

    Args:
        store: control store for the metadata exchange and the engine's
            control plane (default: the default process group's store).
        rank / world_size: this process's place (default: from
            ``torch.distributed``); needed when no process group exists.
        agent_name: NIXL agent name (default: unique per rank and process).
        connect_timeout_s: bound on waiting for a peer's first metadata.
        num_threads: UCX worker threads (0: NIXL's default).
        batch_messages: most direct-mode messages per READ (1..``MAX_BATCH``).
            With the default, ``MAX_BATCH``, a transfer of up to that many
            small messages is one READ and one completion notification; a
            large one has groups that double at the start and halve at the
            end (``pipeline.group_sizes``: 1 GiB in 16 MiB slabs is READs of
            1, 2, 4, 8, 17, 16, 8, 4, 2, 1 and 1 messages), so each side hashes
            one group while the READ of another runs.
        progress_thread: run NIXL's own progress thread. Off by default: the
            engine polls the agent itself, and over shared memory the thread
            cost a 1 GiB READ 1.6x its time here (each idle agent's thread
            slows the others' READs too).
        group: name shared by the backends (one per rank) that talk to each
            other; give each live backend of a process its own.
        agent: a ready ``nixl_agent``-like object instead of a new UCX agent
            (tests use a fake one).

    The network interface is UCX's choice; restrict it with ``UCX_NET_DEVICES``
    (the launcher and tests set ``lo``). CUDA tensors are handed to NIXL as
    VRAM, which is not exercised here (no GPU); the engine then keeps its
    staged path for them (``direct_cuda`` is False).
    """

    name = "nixl"
    direct_cuda = False
    batch_messages = MAX_BATCH
    groups_in_flight = 1

    def __init__(
        self,
        *,
        store: Any = None,
        rank: int | None = None,
        world_size: int | None = None,
        agent_name: str | None = None,
        connect_timeout_s: float = 30.0,
        num_threads: int = 0,
        group: str = "default",
        agent: Any = None,
        batch_messages: int = MAX_BATCH,
        progress_thread: bool = False,
    ) -> None:
        if agent is None:
            try:
                from nixl_cu12 import nixl_agent, nixl_agent_config
            except Exception as exc:
                raise KVConfigError(
                    f"the NIXL backend needs nixl_cu12 (pip install 'sagellm-kv-cache[nixl]'): "
                    f"{type(exc).__name__}: {exc}"
                ) from None
        if not isinstance(group, str) or not group or "/" in group:
            raise KVConfigError(f"group must be a non-empty name without '/', got {group!r}")
        if (
            isinstance(batch_messages, bool)
            or not isinstance(batch_messages, int)
            or not 1 <= batch_messages <= MAX_BATCH
        ):
            raise KVConfigError(f"batch_messages must be an int in 1..{MAX_BATCH}")
        if rank is None or world_size is None or store is None:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise KVConfigError(
                    "the NIXL backend needs rank=, world_size= and store=, "
                    "or an initialised torch.distributed process group"
                )
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
            if store is None:
                store = default_store()
        if not 0 <= rank < world_size:
            raise KVConfigError(f"rank {rank} is outside world size {world_size}")
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.store = store
        self.connect_timeout_s = float(connect_timeout_s)
        self.group = group
        self.batch_messages = batch_messages
        self.agent_name = agent_name or f"skvx-r{rank}-p{os.getpid()}-{id(self):x}"
        try:
            self._agent = agent or nixl_agent(
                self.agent_name,
                nixl_agent_config(
                    backends=["UCX"], num_threads=num_threads, enable_prog_thread=progress_thread
                ),
            )
        except Exception as exc:
            raise KVConfigError(f"creating the NIXL agent failed: {exc}") from None
        if "UCX" not in self._agent.backends:
            raise KVConfigError("nixl_cu12 has no UCX plugin here")
        self._lock = threading.RLock()
        # registered storages: (start, end, reg_descs, storage kept alive)
        self._regs: list[tuple[int, int, Any, Any]] = []
        self._md_version = 0
        self._md_sent: dict[int, int] = {}  # peer -> metadata version it has from us
        self._peer_names: dict[int, str] = {}
        self._name_to_rank: dict[str, int] = {}
        self._descs: dict[tuple[int, int], tuple[list[tuple[Any, ...]], int]] = {}
        self._pending: dict[tuple[int, int], _FetchWork] = {}
        self._completed: set[int] = set()
        self._live: dict[int, _ExposeWork] = {}  # exposed, not yet read by the peer
        self._abandoned: list[Any] = []  # failed works whose READ may still be running
        self._retired: set[int] = set()  # starts of registrations a failed transfer used
        self._ids = itertools.count(1)
        self._closed = False
        # a nonce in front: two live backends of one group never publish the same value
        md = os.urandom(8) + bytes(self._agent.get_agent_metadata())
        if bytes(store.compare_set(self._md_key(self.rank), b"", md)) != md:
            raise KVConfigError(
                f"a NIXL backend of group {group!r} is already live on rank {self.rank}: "
                "give each backend of a process its own group=, or close() the other first"
            )

    def _md_key(self, rank: int) -> str:
        return f"{_KEY_ROOT}/md/{self.group}/{rank}"

    # -- connections ---------------------------------------------------------
    def check_peer(self, peer: int) -> None:
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise KVTransferFailedError(
                f"rank {peer} is not a peer of rank {self.rank} (world size {self.world_size})"
            )
        if self._closed:
            raise KVTransferFailedError("the NIXL backend is closed")

    def _connect_locked(self, peer: int) -> str:
        name = self._peer_names.get(peer)
        if name is None:
            got = store_wait(
                self.store,
                self._md_key(peer),
                self.connect_timeout_s,
                f"NIXL metadata of rank {peer}",
            )
            if got is None:
                raise KVTransferTimeoutError(
                    f"NIXL metadata of rank {peer}: not published within "
                    f"{self.connect_timeout_s:.3f} s"
                )
            md = got
            name = self._agent.add_remote_agent(md[8:])
            name = name.decode() if isinstance(name, bytes) else str(name)
            self._peer_names[peer] = name
            self._name_to_rank[name] = peer
        return name

    # -- registration ----------------------------------------------------------
    def _register_locked(self, tensor: torch.Tensor) -> tuple[int, int, int]:
        """Register ``tensor``'s whole storage once; returns (addr, nbytes, mem code)."""
        if not tensor.is_contiguous():
            raise KVTransferFailedError("NIXL moves contiguous tensors only")
        addr = tensor.data_ptr()
        nbytes = tensor.numel() * tensor.element_size()
        mem = 1 if tensor.is_cuda else 0
        for start, end, _, _ in self._regs:
            if start <= addr and addr + nbytes <= end:
                return addr, nbytes, mem
        storage = tensor.untyped_storage()
        start = storage.data_ptr()
        dev = tensor.get_device() if tensor.is_cuda else 0
        descs = self._agent.register_memory([(start, storage.nbytes(), dev, "")], _MEM_TYPES[mem])
        self._regs.append((start, start + storage.nbytes(), descs, storage))
        self._md_version += 1
        return addr, nbytes, mem

    # -- notifications -----------------------------------------------------------
    def _poll_locked(self) -> None:
        if self._abandoned or self._retired:
            self._reap_locked()
        notifs = self._agent.get_new_notifs()
        if not notifs:
            return
        for name, msgs in notifs.items():
            name = name.decode() if isinstance(name, bytes) else str(name)
            for msg in msgs:
                self._on_notif_locked(name, bytes(msg))
        for fw in list(self._pending.values()):
            if fw.handle is None:
                self._try_post_locked(fw)

    def _on_notif_locked(self, name: str, msg: bytes) -> None:
        if not msg:
            return
        if msg[0] == KIND_DONE and len(msg) == DONE.size:
            self._completed.add(DONE.unpack(msg)[1])
            return
        if msg[0] != KIND_DESC or len(msg) < DESC.size:
            return  # not ours: ignore
        _, tag, count, xid, md_len = DESC.unpack_from(msg)
        end = DESC.size + count * ENTRY.size
        if count == 0 or count > MAX_BATCH or len(msg) != end + md_len:
            return  # malformed: the fetch times out, typed
        if md_len:  # the sender registered new memory: refresh what we know of it
            self._agent.add_remote_agent(msg[end:])
        peer = self._name_to_rank.get(name)
        if peer is None:
            return  # a sender we never connected to cannot be addressed
        entries = [ENTRY.unpack_from(msg, DESC.size + i * ENTRY.size) for i in range(count)]
        self._descs[(peer, tag)] = (entries, xid)

    def _try_post_locked(self, fw: _FetchWork) -> None:
        desc = self._descs.pop((fw.peer, fw.tag), None)
        if desc is None:
            return
        entries, xid = desc
        if len(entries) != len(fw.outs):
            raise KVTransferFailedError(
                f"message {fw.tag:#x} from rank {fw.peer}: {len(entries)} descriptors, "
                f"expected {len(fw.outs)}"
            )
        for i, (out, (_, nbytes, _, mem)) in enumerate(zip(fw.outs, entries)):
            want = out.numel() * out.element_size()
            if nbytes != want or mem != entries[0][3]:
                raise KVTransferFailedError(
                    f"message {fw.tag + i:#x} from rank {fw.peer} has {nbytes} bytes, "
                    f"expected {want}"
                )
        remote = self._agent.get_xfer_descs(
            [(addr, nbytes, dev) for addr, nbytes, dev, _ in entries], _MEM_TYPES[entries[0][3]]
        )
        handle = self._agent.initialize_xfer(
            "READ", fw.local, remote, self._peer_names[fw.peer], DONE.pack(KIND_DONE, xid)
        )
        state = self._agent.transfer(handle)
        fw.handle = handle
        if state == "ERR":
            raise KVTransferFailedError(
                f"posting the NIXL READ of message {fw.tag:#x} from rank {fw.peer} failed"
            )

    def _abandon(self, work: Any) -> None:
        """Give up on ``work`` and on every other message of its transfer; free
        what no live message needs (see the module docstring)."""
        with self._lock:
            xfer = (work.peer, _transfer_of(work.tag))
            doomed = [work]
            doomed += [w for k, w in self._pending.items() if (k[0], _transfer_of(k[1])) == xfer]
            doomed += [w for w in self._live.values() if (w.peer, _transfer_of(w.tag)) == xfer]
            for k in [k for k in self._descs if (k[0], _transfer_of(k[1])) == xfer]:
                del self._descs[k]
            for w in doomed:
                if isinstance(w, _FetchWork):
                    self._pending.pop((w.peer, w.tag), None)
                else:
                    self._live.pop(w.id, None)
                if w not in self._abandoned:
                    self._abandoned.append(w)
                for mem in w.memory():
                    reg = self._reg_of(mem)
                    if reg is not None:
                        self._retired.add(reg[0])
            self._reap_locked()

    def _reg_of(self, tensor: Any) -> tuple | None:
        addr = tensor.data_ptr()
        for reg in self._regs:
            if reg[0] <= addr < reg[1]:
                return reg
        return None

    def _reap_locked(self) -> None:
        """Release abandoned requests NIXL has finished with, then deregister the
        retired memory no live or still-running message uses."""
        running = []
        for w in self._abandoned:
            h = getattr(w, "handle", None)
            if h is not None:
                try:
                    state = self._agent.check_xfer_state(h)
                except Exception:
                    state = "ERR"
                if state not in ("DONE", "ERR"):
                    running.append(w)  # the READ may still write into its buffers
                    continue
                with contextlib.suppress(Exception):
                    self._agent.release_xfer_handle(h)
                w.handle = None
        self._abandoned = running
        if not self._retired:
            return
        works = [*self._pending.values(), *self._live.values(), *running]
        busy = [t.data_ptr() for w in works for t in w.memory()]
        keep = []
        for reg in self._regs:
            start, end, descs, _ = reg
            if start in self._retired and not any(start <= a < end for a in busy):
                self._retired.discard(start)
                with contextlib.suppress(Exception):
                    self._agent.deregister_memory(descs)
            else:
                keep.append(reg)
        self._regs = keep

    # -- the engine's interface ------------------------------------------------
    def progress(self) -> None:
        """Poll the agent: UCX moves our READs, and serves the peer's READs of our
        memory, only while this process polls (``num_threads=0``), so the engine
        calls this between the messages it hashes."""
        with self._lock, contextlib.suppress(Exception):
            self._poll_locked()
            for fw in self._pending.values():
                if fw.handle is not None:
                    self._agent.check_xfer_state(fw.handle)

    def expose(self, peer: int, tag: int, tensor: torch.Tensor) -> _ExposeWork:
        return self.expose_many(peer, [tag], [tensor])

    def fetch(self, peer: int, tag: int, out: torch.Tensor) -> _FetchWork:
        return self.fetch_many(peer, [tag], [out])

    def expose_many(self, peer: int, tags: Sequence[int], tensors: Sequence[Any]) -> _ExposeWork:
        """Publish the group's descriptors in one notification; the peer reads them
        with one READ (tags must count up by one from ``tags[0]``)."""
        self.check_peer(peer)
        check_group(tags, tensors)
        with self._lock, _typed(f"exposing message {tags[0]:#x} to rank {peer}", peer):
            name = self._connect_locked(peer)
            entries = []
            for t in tensors:
                addr, nbytes, mem = self._register_locked(t)
                entries.append((addr, nbytes, t.get_device() if t.is_cuda else 0, mem))
            xid = next(self._ids)
            md = b""
            if self._md_sent.get(peer, 0) < self._md_version:
                md = bytes(self._agent.get_agent_metadata())
                self._md_sent[peer] = self._md_version
            self._agent.send_notif(name, desc_message(tags[0], xid, entries, md))
            work = _ExposeWork(self, peer, tags[0], xid, list(tensors))
            self._live[xid] = work
            return work

    def fetch_many(self, peer: int, tags: Sequence[int], outs: Sequence[Any]) -> _FetchWork:
        """Post one READ for the group as soon as its descriptors are here."""
        self.check_peer(peer)
        check_group(tags, outs)
        with self._lock, _typed(f"fetching message {tags[0]:#x} from rank {peer}", peer):
            self._connect_locked(peer)
            local = []
            for out in outs:
                addr, nbytes, mem = self._register_locked(out)
                local.append((addr, nbytes, out.get_device() if out.is_cuda else 0))
            descs = self._agent.get_xfer_descs(local, _MEM_TYPES[mem])
            fw = _FetchWork(self, peer, tags[0], list(outs), descs)
            self._pending[(peer, tags[0])] = fw
            self._poll_locked()
            if fw.handle is None:
                self._try_post_locked(fw)
            return fw

    def close(self) -> None:
        """Deregister memory and drop the agent; READs that timed out may still be
        in flight, so their buffers are released only here."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for w in self._abandoned:
                h = getattr(w, "handle", None)
                if h is not None:
                    with contextlib.suppress(Exception):
                        self._agent.release_xfer_handle(h)
            for name in self._peer_names.values():
                with contextlib.suppress(Exception):
                    self._agent.remove_remote_agent(name)
            for _, _, descs, _ in self._regs:
                with contextlib.suppress(Exception):
                    self._agent.deregister_memory(descs)
            self._regs.clear()
            self._abandoned.clear()
            self._pending.clear()
            self._live.clear()
            self._descs.clear()
            with contextlib.suppress(Exception):
                self.store.delete_key(self._md_key(self.rank))
