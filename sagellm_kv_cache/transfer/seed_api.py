"""The seed's record-keeping methods of ``KVTransferEngine`` (a mixin of the engine).

A transfer is PENDING/RUNNING until it ends COMPLETED or FAILED; its record
(``get_transfer_metadata``) stays until ``clear_completed`` drops the
completed ones. Unknown ids raise ``KVInvalidInputError`` like the engine.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TransferSeedMixin"]


class TransferSeedMixin:
    def _count(self, *statuses: str) -> int:
        with self._lock:
            return sum(1 for r in self._records.values() if r.status.value in statuses)

    def get_pending_count(self) -> int:
        """Transfers not finished yet (pending or running)."""
        return self._count("pending", "running")

    def get_completed_count(self) -> int:
        """Completed transfers still on record (``clear_completed`` forgets them)."""
        return self._count("completed")

    def clear_completed(self) -> int:
        """Forget the records of completed transfers; returns how many went.
        Failed and unfinished ones stay (their errors are still to be read)."""
        with self._lock:
            done = [t for t, r in self._records.items() if r.status.value == "completed"]
            for t in done:
                del self._records[t]
        return len(done)

    def get_retry_count(self, transfer_id: int) -> int:
        """Retries this transfer needed (0 when the first attempt succeeded)."""
        return self._record(transfer_id).retries

    def get_transfer_metrics(self, transfer_id: int) -> dict[str, Any]:
        """Observable metrics of one transfer: bytes, duration, GB/s, retries, status."""
        r = self._record(transfer_id)
        return {
            "transfer_id": r.transfer_id,
            "status": r.status.value,
            "payload_nbytes": r.payload_nbytes,
            "wire_nbytes": r.wire_nbytes,
            "duration_s": r.duration_s,
            "gbps": r.gbps,
            "retries": r.retries,
            "num_blocks": r.num_blocks,
            "num_tokens": r.num_tokens,
            "checksum_algo": r.checksum_algo,
            "compression": r.compression,
        }
