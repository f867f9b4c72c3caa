"""The seed's record-keeping methods of ``KVTransferEngine`` (a mixin of the engine).

A transfer is PENDING/RUNNING until it ends COMPLETED or FAILED; its record
(``get_transfer_metadata``) stays until ``clear_completed`` drops the
completed ones. Unknown ids raise ``KVInvalidInputError`` like the engine.
"""

from __future__ import annotations

from typing import Any

from .records import TransferBook

__all__ = ["TransferSeedMixin"]


class TransferSeedMixin:
    book: TransferBook

    def get_pending_count(self) -> int:
        """Transfers not finished yet (pending or running)."""
        return self.book.count("pending", "running")

    def get_completed_count(self) -> int:
        """Completed transfers still on record (``clear_completed`` forgets them)."""
        return self.book.count("completed")

    def clear_completed(self) -> int:
        """Forget the records of completed transfers; returns how many went.
        Failed and unfinished ones stay (their errors are still to be read)."""
        return self.book.clear_completed()

    def get_retry_count(self, transfer_id: int) -> int:
        """Retries this transfer needed (0 when the first attempt succeeded)."""
        return self.book.get(transfer_id).retries

    def get_transfer_metrics(self, transfer_id: int) -> dict[str, Any]:
        """Observable metrics of one transfer: bytes, duration, GB/s, retries, status."""
        d = self.book.get(transfer_id).to_dict()
        keys = (
            "transfer_id",
            "status",
            "payload_nbytes",
            "wire_nbytes",
            "duration_s",
            "gbps",
            "retries",
            "num_blocks",
            "num_tokens",
            "checksum_algo",
            "compression",
        )
        return {k: d[k] for k in keys}
