"""The receiver's own integrity policy for KV transfers (``receiver.py`` applies it).

A sender cannot switch the receiver's checks off (DESIGN.md):

* **checksum**: a receiver built with ``enable_checksum=True`` refuses a
  header that carries none (``check_policy``), before it allocates anything;
  the sender is told ``KV_CONFIG_INVALID``. A checksum the header does carry
  is always verified, whatever the receiver's own setting.
* **lengths**: every message must fill what the header declared. torch's gloo
  reports no received length (a shorter message completes silently and the
  rest of the buffer keeps what it held), so ``TailGuard`` writes a fresh
  random nonce over the last bytes of each destination before the receive
  is posted: a message at least ``NONCE_BYTES`` short leaves it in place and
  is refused (``field="length"``). One shorter by fewer bytes leaves part of
  the nonce (never an earlier transfer's bytes) and fails the checksum.
* **compression**: a compressed chunk inflates to at most its declared size
  plus one byte (``codec.decompress``); more, less or undecodable is refused
  (``field="compression"``) without ever holding more than that.

A failure while the payload streams in does not stop the receiver: it keeps
consuming (and hashing) the sender's messages, so the sender finishes its
stream and reads the typed verdict from the ack instead of timing out.
``verdict`` picks which error the sender is told.
"""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING

from ..errors import KVChecksumMismatchError, KVConfigError, KVTransferFailedError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .wire import TransferHeader

__all__ = ["NONCE_BYTES", "TailGuard", "check_policy", "verdict"]

#: bytes of random nonce at the end of every receive destination
NONCE_BYTES = 8


def check_policy(header: TransferHeader, require_checksum: bool) -> None:
    """Refuse a header the receiver's policy does not accept (before allocating)."""
    if require_checksum and header.checksum_algo == "none":
        raise KVConfigError(
            f"transfer {header.transfer_id} carries no checksum and this receiver requires "
            "one: build the sender with enable_checksum=True",
            field="checksum_algo",
        )


class TailGuard:
    """Arms and checks the nonce at the end of each receive destination that
    lies in ``base`` (a contiguous CPU tensor: a staging buffer or a pool's KV).
    Costs two 8-byte copies per message. CUDA destinations are not armed (NCCL
    needs matching sizes on both sides)."""

    __slots__ = ("_base", "_mv", "_rng")

    def __init__(self, base: torch.Tensor) -> None:
        import torch

        if base.is_cuda or not base.is_contiguous():
            self._mv = None
            return
        self._base = base.data_ptr()
        flat = base.reshape(-1).view(torch.uint8).numpy()
        self._mv = memoryview(flat)  # type: ignore[arg-type]  # numpy's stubs give ndarray __buffer__ only on Python >= 3.12
        # seeded from the OS: a sender never sees a nonce, so cannot predict the next
        self._rng = random.Random(os.urandom(16))

    def arm(self, view: torch.Tensor) -> tuple | None:
        """Write the nonce over ``view``'s last bytes; returns the token for ``check``."""
        if self._mv is None:
            return None
        nbytes = view.nbytes
        end = view.data_ptr() - self._base + nbytes
        n = min(NONCE_BYTES, nbytes)
        nonce = self._rng.getrandbits(64).to_bytes(8, "little")[:n]
        self._mv[end - n : end] = nonce
        return end - n, end, nonce

    def check(self, token: tuple | None, what: str) -> None:
        """Raise if the message did not reach the end of its destination."""
        mv = self._mv
        if token is not None and mv is not None and mv[token[0] : token[1]] == token[2]:
            raise KVTransferFailedError(
                f"{what} arrived short: fewer bytes than the header declares", field="length"
            )


def verdict(errors: list[Exception], mismatch: KVChecksumMismatchError | None) -> Exception | None:
    """The error a receiver reports once the whole payload went by. A chunk
    that does not inflate may be a byte corrupted in flight: when the checksum
    ``mismatch``-es too, that is reported (the sender may retry); when the
    bytes arrived as sent, the inflate error is (the sender's bytes are bad).
    Any other error (a short message, a fault on this side) comes first."""
    for e in errors:
        if not (isinstance(e, KVTransferFailedError) and e.details.get("field") == "compression"):
            return e
    if mismatch is not None:
        return mismatch
    return errors[0] if errors else None
