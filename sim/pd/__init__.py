"""Prefill/decode disaggregation: iteration-level prefill and decode instances joined
by a KV link model (``sim.pd.run``, ``sim.pd.link``). Submodules load on first use."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "LINKS": "link",
    "LinkModel": "link",
    "parse_link": "link",
    "parse_pd": "run",
    "simulate_pd": "run",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
