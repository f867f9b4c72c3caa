"""Measure a step-time table (``sim.cost.TableCost``) on this machine's GPU with torch.

For each grid point (``tokens`` new tokens, ``kv_tokens`` KV tokens read) it
times, median of ``--repeat`` after ``--warmup`` runs, one transformer layer at
the model's shapes and multiplies by its layer count:

* the linear layers: ``[T, hidden] x [hidden, q + 2 kv]`` (QKV),
  ``[T, q] x [q, hidden]`` (O), ``[T, hidden] x [hidden, 2 x intermediate]``
  (gate and up), ``[T, intermediate] x [intermediate, hidden]`` (down);
  MoE models run ``active_experts`` MLPs per token;
* attention: ``scaled_dot_product_attention`` of T queries against
  ``max(kv_tokens, T)`` keys and values (KV heads repeated to the query heads);

plus one LM-head row (``[1, hidden] x [hidden, vocab]``). It writes the table
as JSON with its provenance (GPU name, torch and CUDA versions, model, dtype,
date, this script and its arguments), which ``--cost-model table:FILE.json``
reads.

Usage::

    python benchmarks/profile_step_times.py --model llama-2-7b --out h100_llama2_7b.json
    python benchmarks/profile_step_times.py --device cpu --tiny --out /tmp/t.json   # smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

TOKENS = [1, 16, 64, 256, 512, 1024, 2048, 4096, 8192]
KV_TOKENS = [0, 1024, 4096, 16384, 65536, 262144]
_DT = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "bfloat16"}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_s(fn, device: str, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def profile(spec, tokens, kv_tokens, device: str, warmup: int, repeat: int) -> list[list[float]]:
    import torch
    import torch.nn.functional as F

    dt = getattr(torch, _DT.get(spec.dtype, spec.dtype))
    if device == "cpu" and dt is torch.float16:
        dt = torch.float32
    h, q, kv = spec.hidden, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    inter = spec.intermediate
    experts = spec.active_experts if spec.num_experts else 1
    w = {
        "qkv": torch.randn(h, q + 2 * kv, device=device, dtype=dt),
        "o": torch.randn(q, h, device=device, dtype=dt),
        "up": torch.randn(h, 2 * inter, device=device, dtype=dt),
        "down": torch.randn(inter, h, device=device, dtype=dt),
        "head": torch.randn(h, spec.vocab, device=device, dtype=dt),
    }
    rows = []
    for t in tokens:
        x = torch.randn(t, h, device=device, dtype=dt)
        xq = torch.randn(t, q, device=device, dtype=dt)
        xi = torch.randn(t, inter, device=device, dtype=dt)

        def linear(x=x, xq=xq, xi=xi):
            x @ w["qkv"]
            xq @ w["o"]
            for _ in range(experts):
                x @ w["up"]
                xi @ w["down"]

        lin = _median_s(linear, device, warmup, repeat)
        head = _median_s(lambda x=x: x[:1] @ w["head"], device, warmup, repeat)
        row = []
        for r in kv_tokens:
            n = max(r, t)
            qt = torch.randn(1, spec.num_heads, t, spec.head_dim, device=device, dtype=dt)
            k = torch.randn(1, spec.num_heads, n, spec.head_dim, device=device, dtype=dt)
            v = torch.randn_like(k)
            causal = n == t
            att = _median_s(
                lambda qt=qt, k=k, v=v, c=causal: F.scaled_dot_product_attention(
                    qt, k, v, is_causal=c
                ),
                device,
                warmup,
                repeat,
            )
            row.append(spec.num_layers * (lin + att) + head)
        rows.append(row)
    return rows


def main(argv=None) -> Path:
    from sim.cost import TableCost, model_spec
    from sim.cost.models import ModelSpec

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="llama-2-7b", help="preset name or a config.json path")
    ap.add_argument("--dtype", default=None, help="bf16 (default: the model's), fp16, fp32")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    ap.add_argument("--kv-tokens", type=int, nargs="+", default=KV_TOKENS)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model (CPU smoke test)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    import torch

    spec = model_spec(a.model, a.dtype)
    if a.tiny:
        spec = ModelSpec("tiny", 2, 64, 128, 4, 2, 16, 256, dtype="fp32")
    gpu = (
        torch.cuda.get_device_name(0)
        if a.device.startswith("cuda")
        else platform.processor() or "cpu"
    )
    seconds = profile(spec, sorted(a.tokens), sorted(a.kv_tokens), a.device, a.warmup, a.repeat)
    table = TableCost(
        sorted(a.tokens),
        sorted(a.kv_tokens),
        seconds,
        {
            "gpu": gpu,
            "device": a.device,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "model": spec.to_dict(),
            "dtype": spec.dtype,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "script": "benchmarks/profile_step_times.py",
            "argv": list(sys.argv[1:] if argv is None else argv),
            "method": "median of repeats; layers x (linear + attention) + one LM-head row",
        },
    )
    out = Path(a.out)
    table.save(out)
    print(json.dumps({"out": str(out), "grid": [len(a.tokens), len(a.kv_tokens)], "gpu": gpu}))
    return out


if __name__ == "__main__":
    main()
