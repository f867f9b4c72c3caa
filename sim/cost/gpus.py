"""GPU specs from public datasheets (dense, i.e. without 2:4 sparsity).

Each row names its source. FLOP/s are the vendor's peak tensor-core figures;
no kernel reaches them, which is what ``RooflineCost``'s efficiency factors are for.
"""

from __future__ import annotations

from dataclasses import dataclass

from sagellm_kv_cache.errors import KVConfigError

__all__ = ["GPUS", "GPUSpec", "gpu_spec"]


@dataclass(frozen=True)
class GPUSpec:
    name: str
    bf16_flops: float  # dense FLOP/s
    fp8_flops: float | None  # dense FLOP/s; None: no FP8 tensor cores
    hbm_bytes_per_s: float
    memory_bytes: float
    source: str


_G = 1e9
GPUS: dict[str, GPUSpec] = {
    # NVIDIA A100 Tensor Core GPU datasheet (SXM 80GB): BF16 312 TFLOPS dense,
    # HBM2e 2,039 GB/s, 80 GB; no FP8.
    "a100-80g": GPUSpec(
        "A100-80G", 312e12, None, 2039 * _G, 80 * _G, "NVIDIA A100 datasheet (SXM4 80GB)"
    ),
    # NVIDIA H100 Tensor Core GPU datasheet (SXM): BF16 1,979 TFLOPS and FP8 3,958 TFLOPS
    # *with sparsity*, i.e. 989.5 / 1,979 dense; HBM3 3.35 TB/s, 80 GB.
    "h100-sxm": GPUSpec(
        "H100-SXM", 989.5e12, 1979e12, 3350 * _G, 80 * _G, "NVIDIA H100 datasheet (SXM5)"
    ),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): same tensor cores as H100 SXM
    # (989.5 / 1,979 TFLOPS dense BF16 / FP8), HBM3e 4.8 TB/s, 141 GB.
    "h200": GPUSpec("H200", 989.5e12, 1979e12, 4800 * _G, 141 * _G, "NVIDIA H200 datasheet (SXM)"),
    # NVIDIA DGX/HGX B200 datasheet, per GPU: FP8 9 PFLOPS and BF16 4.5 PFLOPS with
    # sparsity (4.5 / 2.25 dense), HBM3e 8 TB/s, 180 GB (HGX B200 figure).
    "b200": GPUSpec("B200", 2250e12, 4500e12, 8000 * _G, 180 * _G, "NVIDIA HGX B200 datasheet"),
    # NVIDIA L40S datasheet: BF16 362.05 TFLOPS dense (733 sparse), FP8 733 dense
    # (1,466 sparse), GDDR6 864 GB/s, 48 GB.
    "l40s": GPUSpec("L40S", 362.05e12, 733e12, 864 * _G, 48 * _G, "NVIDIA L40S datasheet"),
    # AMD Instinct MI300X datasheet: BF16 1,307.4 TFLOPS dense, FP8 2,614.9 TFLOPS dense,
    # HBM3 5.3 TB/s, 192 GB.
    "mi300x": GPUSpec(
        "MI300X", 1307.4e12, 2614.9e12, 5300 * _G, 192 * _G, "AMD Instinct MI300X datasheet"
    ),
}
_ALIASES = {"a100": "a100-80g", "h100": "h100-sxm", "h200-sxm": "h200", "mi300": "mi300x"}


def gpu_spec(name: str | GPUSpec) -> GPUSpec:
    if isinstance(name, GPUSpec):
        return name
    if not isinstance(name, str):
        raise KVConfigError(f"gpu must be a name, got {name!r}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in GPUS:
        raise KVConfigError(f"unknown gpu {name!r}; known: {sorted(GPUS)}")
    return GPUS[key]
