"""Paged KV storage in torch tensors (CPU or CUDA), apart from the bookkeeping.

One tensor holds every layer's keys and values; block ``b`` of every layer
sits at index ``b`` of dimension 2::

    kv: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]   layout "NHD"
    kv: [num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim]   layout "HND"
              |      |      |
              |      |      +-- block id (the pool's integer id)
              |      +-- 0 = K, 1 = V
              +-- layer

    layer l, K, NHD:   block 0              block 1              block 2
                     +--------------------+--------------------+-----
     token slot  ->  | s0  s1 ... s15     | s0  s1 ... s15     | ...
                     | [heads x head_dim] each slot           |
                     +--------------------+--------------------+-----

    ``storage.layer(l)`` is the zero-copy view ``[2, num_blocks, ...]`` an
    attention kernel reads (vLLM's per-layer ``kv_cache`` tensor).

A request's token ``t`` lives in block ``handle.block_ids[t // block_size]``
at slot ``t % block_size``. fp8 dtypes are stored as ``uint8`` and viewed
back as float8 on read. Nothing here knows about ref counts or hashes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import KVConfigError, KVInvalidInputError, KVInvalidTypeError
from .handle import KV_DTYPES, KVLayout, normalize_dtype

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["KVStorage", "ModelShape", "normalize_device", "torch_dtype"]


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The KV geometry of a model.

    Args:
        num_layers: transformer layers holding KV.
        num_kv_heads: KV heads per layer (after GQA), per tensor-parallel rank.
        head_dim: dimension of one head.
        dtype: KV dtype (``"float16"``, ``"bfloat16"``, ``"float32"``, ``"fp8_e4m3"``...).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float16"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise KVConfigError(f"ModelShape.{name} must be a positive int, got {v!r}")
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))

    @property
    def element_size(self) -> int:
        return KV_DTYPES[self.dtype][0]

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.element_size

    def bytes_per_block(self, block_size: int) -> int:
        return self.bytes_per_token * block_size

    @classmethod
    def named(cls, name: str) -> ModelShape:
        """A few common shapes (bf16), for sizing pools by bytes."""
        try:
            return _NAMED_SHAPES[name]
        except KeyError:
            raise KVConfigError(
                f"unknown model shape {name!r}; known: {sorted(_NAMED_SHAPES)}"
            ) from None


_NAMED_SHAPES = {
    "llama-3-8b": ModelShape(32, 8, 128, "bfloat16"),
    "llama-3-70b": ModelShape(80, 8, 128, "bfloat16"),
    "qwen2.5-7b": ModelShape(28, 4, 128, "bfloat16"),
    "qwen2.5-72b": ModelShape(80, 8, 128, "bfloat16"),
    "mistral-7b": ModelShape(32, 8, 128, "bfloat16"),
    "tiny": ModelShape(2, 2, 8, "float16"),
}


def normalize_device(device: Any) -> str:
    """``"cpu"`` or ``"cuda:N"`` (``"cuda"`` means ``"cuda:0"``); anything else is an error."""
    s = str(device).strip().lower()
    if s == "cpu":
        return "cpu"
    if s == "cuda":
        return "cuda:0"
    if s.startswith("cuda:") and s[5:].isdigit():
        return f"cuda:{int(s[5:])}"
    raise KVConfigError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'")


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype KV of ``dtype`` is *stored* in (fp8 -> uint8)."""
    import torch

    name = normalize_dtype(dtype)
    if name.startswith("fp8"):
        return torch.uint8
    return getattr(torch, name)


def _view_dtype(dtype: str) -> torch.dtype:
    """The torch dtype KV of ``dtype`` is *read back* as."""
    import torch

    name = normalize_dtype(dtype)
    if name == "fp8_e4m3":
        return getattr(torch, "float8_e4m3fn", torch.uint8)
    if name == "fp8_e5m2":
        return getattr(torch, "float8_e5m2", torch.uint8)
    return getattr(torch, name)


class KVStorage:
    """KV tensors for ``num_blocks`` blocks of ``block_size`` tokens.

    Args:
        num_blocks, block_size: pool geometry.
        shape: the model's KV geometry and dtype.
        device: ``"cpu"`` or ``"cuda:N"``.
        layout: ``"NHD"`` (default) or ``"HND"`` (see module docstring).
        pin_memory: page-lock a CPU tensor (faster host<->device copies).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        shape: ModelShape,
        device: str = "cpu",
        layout: str = "NHD",
        *,
        pin_memory: bool = False,
    ) -> None:
        import torch

        from .block_pool import check_count

        self.num_blocks = check_count(num_blocks, "num_blocks", 1)
        self.block_size = check_count(block_size, "block_size", 1)
        if not isinstance(shape, ModelShape):
            raise KVInvalidTypeError(f"shape must be a ModelShape, got {type(shape).__name__}")
        self.shape = shape
        self.device = normalize_device(device)
        try:
            self.layout = KVLayout(str(layout).upper()).value
        except ValueError:
            raise KVConfigError(f"unknown layout {layout!r}; use 'NHD' or 'HND'") from None
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise KVConfigError(f"device {self.device} requested but CUDA is not available")
        self.dtype = shape.dtype
        self.storage_dtype = torch_dtype(shape.dtype)
        self.view_dtype = _view_dtype(shape.dtype)
        L, H, D = shape.num_layers, shape.num_kv_heads, shape.head_dim
        if self.layout == "NHD":
            dims = (L, 2, num_blocks, block_size, H, D)
        else:
            dims = (L, 2, num_blocks, H, block_size, D)
        self._check_fits(num_blocks * shape.bytes_per_block(block_size))
        self._pieces: Any = None  # numpy view of kv for block_buffers (built on first use)
        try:
            self.kv = torch.zeros(
                dims,
                dtype=self.storage_dtype,
                device=self.device,
                pin_memory=pin_memory and self.device == "cpu" and torch.cuda.is_available(),
            )
        except (MemoryError, RuntimeError) as exc:  # torch's CPU allocator / CUDA OOM
            raise KVConfigError(
                f"could not allocate {num_blocks} KV blocks "
                f"({num_blocks * shape.bytes_per_block(block_size) / 2**30:.2f} GiB) "
                f"on {self.device}: {exc}"
            ) from None

    def _check_fits(self, nbytes: int) -> None:
        """Refuse, before allocating, KV that exceeds the device's total memory."""
        import os

        import torch

        if self.device == "cpu":
            try:
                total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
                return
        else:
            total = torch.cuda.get_device_properties(int(self.device[5:])).total_memory
        if nbytes > total:
            raise KVConfigError(
                f"{self.num_blocks} KV blocks need {nbytes / 2**30:.2f} GiB; {self.device} has "
                f"{total / 2**30:.2f} GiB in all (lower num_blocks / max_tokens / max_bytes)"
            )

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @property
    def bytes_per_block(self) -> int:
        return self.shape.bytes_per_block(self.block_size)

    def layer(self, layer: int) -> torch.Tensor:
        """Zero-copy view of one layer: ``[2, num_blocks, ...]``."""
        return self.kv[layer]

    # -- block granularity (copy-on-write, transfer, offload) -----------------
    def _index(self, block_ids) -> torch.Tensor:
        import torch

        from .block_pool import check_block_ids

        ids = check_block_ids(block_ids, self.num_blocks)
        return torch.as_tensor(ids, dtype=torch.long, device=self.device)

    def read_blocks(self, block_ids) -> torch.Tensor:
        """Blocks as stored: ``[L, 2, n, <block dims>]`` (a copy), storage dtype."""
        return self.kv.index_select(2, self._index(block_ids))

    def write_blocks(self, block_ids, data: torch.Tensor) -> None:
        """Inverse of ``read_blocks``; ``data`` in storage dtype and layout."""
        import torch

        if not isinstance(data, torch.Tensor):
            raise KVInvalidTypeError(
                f"block data must be a torch.Tensor, got {type(data).__name__}"
            )
        index = self._index(block_ids)
        expected = (*self.kv.shape[:2], len(block_ids), *self.kv.shape[3:])
        if tuple(data.shape) != expected:
            raise KVInvalidInputError(
                f"block data has shape {tuple(data.shape)}, expected {expected}"
            )
        data = self._as_storage(data)
        self.kv.index_copy_(2, index, data.to(self.device, non_blocking=True))

    def copy_blocks(self, src_ids, dst_ids) -> None:
        """``kv[:, :, dst[i]] = kv[:, :, src[i]]`` for every i (copy-on-write, defrag)."""
        if len(src_ids) != len(dst_ids):
            raise KVInvalidInputError(
                f"copy_blocks: {len(src_ids)} sources but {len(dst_ids)} destinations"
            )
        if not len(src_ids):
            return
        dst, src = self._index(dst_ids), self._index(src_ids)
        self.kv.index_copy_(2, dst, self.kv.index_select(2, src))

    def copy_blocks_from(self, src: KVStorage, src_ids, dst_ids) -> None:
        """``kv[:, :, dst[i]] = src.kv[:, :, src[i]]`` for every i, from another storage of
        the same geometry (onboarding from a lower tier): one ``copy_`` per run of
        consecutive ids on both sides, no intermediate tensor."""
        if len(src_ids) != len(dst_ids):
            raise KVInvalidInputError(
                f"copy_blocks_from: {len(src_ids)} sources but {len(dst_ids)} destinations"
            )
        if src.kv.shape[:2] != self.kv.shape[:2] or src.kv.shape[3:] != self.kv.shape[3:]:
            raise KVInvalidInputError(
                f"copy_blocks_from: block shape {tuple(src.kv.shape)} does not match "
                f"{tuple(self.kv.shape)}"
            )
        from .block_pool import check_block_ids

        s_ids = check_block_ids(src_ids, src.num_blocks)
        d_ids = check_block_ids(dst_ids, self.num_blocks)
        n, i = len(s_ids), 0
        non_blocking = self.device != src.device
        while i < n:
            j = i + 1
            while j < n and s_ids[j] == s_ids[j - 1] + 1 and d_ids[j] == d_ids[j - 1] + 1:
                j += 1
            s0, d0, k = s_ids[i], d_ids[i], j - i
            self.kv[:, :, d0 : d0 + k].copy_(src.kv[:, :, s0 : s0 + k], non_blocking=non_blocking)
            i = j

    def block_buffers(self, block_id: int) -> list:
        """The writable memory of one CPU block as its contiguous pieces, in the order
        ``read_blocks([block_id])`` lays them out (layer, then K/V): uint8 arrays a file
        read fills directly."""
        if self.device != "cpu":
            raise KVInvalidInputError(f"block_buffers needs a CPU storage, not {self.device}")
        (b,) = self._check_ids([block_id])
        pieces = self._pieces
        if pieces is None:  # [L, 2, num_blocks, bytes of one piece], a view of kv
            import torch

            kv = self.kv.view(torch.uint8) if self.kv.dtype != torch.uint8 else self.kv
            pieces = self._pieces = kv.reshape(*kv.shape[:3], -1).numpy()
        return list(pieces[:, :, b].reshape(-1, pieces.shape[3]))

    def bounce_block(self) -> torch.Tensor:
        """A CPU tensor shaped like one block ``[L, 2, 1, <block dims>]`` (pinned with CUDA),
        to read into before copying to a device block."""
        import torch

        return torch.empty(
            (*self.kv.shape[:2], 1, *self.kv.shape[3:]),
            dtype=self.storage_dtype,
            pin_memory=torch.cuda.is_available(),
        )

    @staticmethod
    def chunks_of(block: torch.Tensor) -> list:
        """The contiguous pieces of a contiguous CPU ``[L, 2, 1, ...]`` block as uint8
        arrays (writable buffers), in ``block_buffers`` order."""
        import torch

        flat = block.view(torch.uint8) if block.dtype != torch.uint8 else block
        return list(flat.reshape(flat.shape[0] * 2, -1).numpy())

    def _check_ids(self, block_ids) -> list[int]:
        from .block_pool import check_block_ids

        return check_block_ids(block_ids, self.num_blocks)

    # -- token granularity (what an engine writes and reads) ------------------
    def _to_tokens(self, blocks: torch.Tensor) -> torch.Tensor:
        """[L, 2, n, <block dims>] -> [L, 2, n * block_size, H, D] (NHD order)."""
        L, two, n = blocks.shape[:3]
        if self.layout == "HND":
            blocks = blocks.transpose(3, 4)
        return blocks.reshape(L, two, n * self.block_size, *blocks.shape[-2:])

    def _to_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        L, two, T, H, D = tokens.shape
        blocks = tokens.reshape(L, two, T // self.block_size, self.block_size, H, D)
        if self.layout == "HND":
            blocks = blocks.transpose(3, 4)
        return blocks.contiguous()

    def _as_storage(self, data: torch.Tensor) -> torch.Tensor:
        import torch

        if data.dtype == self.storage_dtype:
            return data
        if data.dtype == self.view_dtype and self.storage_dtype == torch.uint8:
            return data.view(torch.uint8)
        raise KVInvalidTypeError(
            f"KV tensor has dtype {data.dtype}, pool stores {self.dtype}; convert it first"
        )

    def check_kv(self, kv: Any) -> int:
        """Validate a token-level KV tensor ``[L, 2, T, H, D]`` (type, device, shape,
        dtype) and return ``T`` (>= 1); typed errors otherwise."""
        import torch

        if not isinstance(kv, torch.Tensor):
            raise KVInvalidTypeError(f"kv must be a torch.Tensor, got {type(kv).__name__}")
        if kv.is_meta:
            raise KVInvalidInputError("kv is a meta-device tensor: it holds no values")
        s = self.shape
        T = kv.shape[2] if kv.dim() == 5 else -1
        if kv.dim() != 5 or tuple(kv.shape) != (s.num_layers, 2, T, s.num_kv_heads, s.head_dim):
            raise KVInvalidInputError(
                f"kv has shape {tuple(kv.shape)}, expected "
                f"[{s.num_layers}, 2, num_tokens, {s.num_kv_heads}, {s.head_dim}]"
            )
        if T == 0:
            raise KVInvalidInputError("kv holds no tokens (dimension 2 is 0)")
        self._as_storage(kv)  # dtype
        return T

    def write_tokens(self, block_ids, kv: torch.Tensor, start_token: int = 0) -> None:
        """Write ``kv`` ``[L, 2, T, H, D]`` into token slots ``start_token .. start_token+T``."""
        from .block_pool import check_count

        T = self.check_kv(kv)
        start_token = check_count(start_token, "start_token")
        bs = self.block_size
        if start_token + T > len(block_ids) * bs:
            raise KVInvalidInputError(
                f"tokens [{start_token}, {start_token + T}) do not fit {len(block_ids)} blocks"
            )
        data = self._as_storage(kv).to(self.device, non_blocking=True)
        first, last = start_token // bs, (start_token + T - 1) // bs
        ids = block_ids[first : last + 1]
        lo = start_token - first * bs
        if lo == 0 and T % bs == 0:
            self.write_blocks(ids, self._to_blocks(data))
            return
        # partial blocks at either end: read-modify-write the covering blocks
        tokens = self._to_tokens(self.read_blocks(ids))
        tokens[:, :, lo : lo + T] = data
        self.write_blocks(ids, self._to_blocks(tokens))

    def read_tokens(self, block_ids, num_tokens: int, start_token: int = 0) -> torch.Tensor:
        """KV of token slots ``start_token .. start_token+num_tokens`` as ``[L, 2, T, H, D]``."""
        from .block_pool import check_count

        num_tokens = check_count(num_tokens, "num_tokens", 1)
        start_token = check_count(start_token, "start_token")
        bs = self.block_size
        if start_token + num_tokens > len(block_ids) * bs:
            raise KVInvalidInputError(
                f"tokens [{start_token}, {start_token + num_tokens}) do not fit "
                f"{len(block_ids)} blocks"
            )
        first, last = start_token // bs, (start_token + num_tokens - 1) // bs
        tokens = self._to_tokens(self.read_blocks(block_ids[first : last + 1]))
        lo = start_token - first * bs
        out = tokens[:, :, lo : lo + num_tokens]
        return out.view(self.view_dtype) if self.view_dtype != self.storage_dtype else out
