"""KV transfer between pools, processes and nodes (``KVTransferEngine``).

    from sagellm_kv_cache.transfer import KVTransferEngine

    # in-process: device pool -> host pool
    engine = KVTransferEngine("inprocess")
    engine.register_pool(gpu_pool, rank=0)
    engine.register_pool(cpu_pool, rank=1)
    tid = engine.transfer_kv_handle(handle, src_rank=0, dst_rank=1)

    # across processes (torch.distributed: gloo on CPU, NCCL on CUDA)
    engine = KVTransferEngine("torch", timeout_s=10)
    engine.register_pool(pool)
    engine.transfer_kv_handle(handle, src_rank=0, dst_rank=1)   # on rank 0
    engine.receive(pool)                                        # on rank 1

    # the same calls over NIXL (nixl-cu12): the receiver READs over UCX
    engine = KVTransferEngine("nixl", timeout_s=10)

See ``engine.py`` for the protocol (its parts: ``plan.py``, ``protocol.py``,
``sender.py``, ``receiver.py``, ``pipeline.py``, ``local.py``, ``records.py``),
``wire.py`` for the wire format, ``guard.py`` for the receiver's own checks
(checksum policy, lengths), ``codec.py`` for compression and ``backends/``
for transports. ``sagellm_kv_cache.testing`` starts local ranks and injects
faults in tests and benchmarks.
"""

from __future__ import annotations

from .backends import InProcessBackend, TorchDistBackend, TransferBackend, make_backend
from .engine import KVTransferEngine
from .records import ReceivedTransfer, TransferRecord, TransferStatus
from .wire import TransferHeader, decode_header, encode_header

__all__ = [
    "InProcessBackend",
    "KVTransferEngine",
    "ReceivedTransfer",
    "TorchDistBackend",
    "TransferBackend",
    "TransferHeader",
    "TransferRecord",
    "TransferStatus",
    "decode_header",
    "encode_header",
    "make_backend",
]


def __getattr__(name: str):
    # The seed imported ``KVTransferPipeline`` from here; it lives with the pooling
    # layer above transfer (sagellm_kv_cache.pooling), so the alias is lazy: no import
    # of the upper layer unless a seed-era caller asks for it.
    if name == "KVTransferPipeline":
        from ..pooling.pipeline import KVTransferPipeline

        return KVTransferPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
