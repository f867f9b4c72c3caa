"""The link a prefill instance's KV crosses to reach a decode instance.

``transfer_s(nbytes) = latency_s + nbytes / bytes_per_s``. Presets (one direction,
datasheet rates; latency is a typical small-message figure, the order that matters
for a KV transfer of megabytes being the bandwidth):

==============  ============  =========  ============================================
``nvlink``      450 GB/s      3 us       H100/H200 NVLink 4: 900 GB/s total, 18 links
``ib-ndr``      50 GB/s       5 us       InfiniBand NDR, 400 Gb/s per port (RDMA)
``tcp-100g``    12.5 GB/s     50 us      100 Gb Ethernet, TCP
``none``        unlimited     0          a zero-time transfer (sanity runs)
==============  ============  =========  ============================================

A spec is a preset name, ``bw=25GB/s,lat=10us`` (units ``GB/s``, ``Gb/s``, ``MB/s``;
``s``, ``ms``, ``us``) or ``bench:PATH`` (optionally ``,lat=...``): the fastest
``engine`` row of a ``benchmarks/bench_transfer.py`` JSON (its ``gbps``, GB/s; the
fastest row of any kind when none is named ``engine...``), i.e. the transfer engine's
own measured bandwidth.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sagellm_kv_cache.errors import KVConfigError

__all__ = ["LINKS", "LinkModel", "parse_link"]


@dataclass(frozen=True)
class LinkModel:
    """A link's bandwidth (bytes/s; ``inf`` for none) and per-transfer latency (s)."""

    name: str
    bytes_per_s: float
    latency_s: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        bw, lat = self.bytes_per_s, self.latency_s
        if isinstance(bw, bool) or not isinstance(bw, int | float) or not bw > 0:
            raise KVConfigError(f"link bandwidth must be > 0 bytes/s, got {bw!r}")
        if isinstance(lat, bool) or not isinstance(lat, int | float) or not 0 <= lat < math.inf:
            raise KVConfigError(f"link latency must be >= 0 s, got {lat!r}")

    def transfer_s(self, nbytes: float) -> float:
        """Seconds to move ``nbytes`` (0 bytes: no transfer, no latency)."""
        if nbytes <= 0:
            return 0.0
        return self.latency_s + nbytes / self.bytes_per_s

    def describe(self) -> dict:
        return {
            "name": self.name,
            "gb_per_s": self.bytes_per_s / 1e9,
            "latency_s": self.latency_s,
            "source": self.source,
        }


LINKS: dict[str, LinkModel] = {
    "nvlink": LinkModel("nvlink", 450e9, 3e-6, "NVLink 4 (H100/H200 SXM) datasheet, per direction"),
    "ib-ndr": LinkModel("ib-ndr", 50e9, 5e-6, "InfiniBand NDR 400 Gb/s port"),
    "tcp-100g": LinkModel("tcp-100g", 12.5e9, 50e-6, "100 Gb Ethernet, TCP"),
    "none": LinkModel("none", math.inf, 0.0, "zero-time transfer"),
}
_LAT = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
_NUM = r"\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*"


def _bandwidth(text: str) -> float:
    m = re.fullmatch(_NUM + r"(GB/s|Gb/s|MB/s)\s*", text)
    if not m:
        raise KVConfigError(f"bad link bandwidth {text!r}; use e.g. 25GB/s, 400Gb/s or 800MB/s")
    unit = {"GB/s": 1e9, "Gb/s": 1e9 / 8, "MB/s": 1e6}[m.group(2)]
    return float(m.group(1)) * unit


def _latency(text: str) -> float:
    m = re.fullmatch(_NUM + r"(s|ms|us)?\s*", text)
    if not m:
        raise KVConfigError(f"bad link latency {text!r}; use e.g. 10us, 0.2ms")
    return float(m.group(1)) * _LAT[m.group(2) or ""]


def _from_bench(path: str) -> float:
    p = Path(path)
    try:
        rows = json.loads(p.read_text())["rows"]
        rates = [(str(r.get("variant", "")), float(r["gbps"])) for r in rows]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise KVConfigError(f"cannot read bench_transfer rows from {path}: {err}") from None
    engine = [g for v, g in rates if v.startswith("engine") and g > 0]
    best = max(engine or [g for _, g in rates if g > 0], default=0.0)
    if not best > 0:
        raise KVConfigError(f"{path} has no row with a positive gbps")
    return best * 1e9


def parse_link(spec: Any) -> LinkModel:
    """A ``LinkModel`` from a preset name, ``bw=...,lat=...`` or ``bench:PATH`` (module doc)."""
    if isinstance(spec, LinkModel):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise KVConfigError(
            f"link must be a preset ({', '.join(LINKS)}) or bw=..,lat=.., got {spec!r}"
        )
    text = spec.strip()
    if text.lower() in LINKS:
        return LINKS[text.lower()]
    if text.startswith("bench:"):
        path, _, rest = text[len("bench:") :].partition(",")
        lat = 0.0
        for item in [x for x in rest.split(",") if x.strip()]:
            k, _, v = item.partition("=")
            if k.strip() != "lat":
                raise KVConfigError(f"bench:PATH takes only lat=..., got {item!r}")
            lat = _latency(v)
        return LinkModel("bench", _from_bench(path), lat, f"bench_transfer.py: {path}")
    bw, lat = None, 0.0
    for item in [x for x in text.split(",") if x.strip()]:
        k, sep, v = item.partition("=")
        k = k.strip().lower()
        if not sep or k not in ("bw", "lat"):
            raise KVConfigError(
                f"bad link item {item!r}; use a preset ({', '.join(LINKS)}), "
                "bw=25GB/s,lat=10us or bench:PATH"
            )
        if k == "bw":
            bw = _bandwidth(v)
        else:
            lat = _latency(v)
    if bw is None:
        raise KVConfigError(f"link {spec!r} needs bw=... (e.g. bw=25GB/s)")
    return LinkModel("custom", bw, lat, text)
