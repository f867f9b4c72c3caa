"""The hit ratios of the workbench, defined once: every replay mode's summary, the
per-tier and per-instance rows, the fleet's bounds, the one-pass curves and the
sampled estimates compute them here.

* ``token_hit_ratio`` = hit blocks x block size / prompt tokens: a hit is a whole
  cached block, so a prompt's partial tail block never hits and a prompt that
  all hits has a ratio just under 1. The figure to quote.
* ``block_hit_ratio`` = hit blocks / the prompts' full blocks.
* ``request_hit_ratio`` = requests with at least one hit block / requests.

Each is 0 where its denominator is 0. The arguments may be ints or numpy arrays
(one ratio per capacity, sample or tier); an array's ratios come as floats of
its shape.
"""

from __future__ import annotations

from typing import Any

__all__ = ["block_hit_ratio", "hit_ratios", "request_hit_ratio", "token_hit_ratio"]


def _ratio(num: Any, den: Any) -> Any:
    """``num / den``, or zeros of ``num``'s shape (floats) where ``den`` is 0."""
    return num / den if den else num * 0.0


def token_hit_ratio(hit_blocks: Any, block_size: int, prompt_tokens: Any) -> Any:
    """Hit tokens over prompt tokens (a hit block counts ``block_size`` tokens)."""
    return _ratio(hit_blocks * block_size, prompt_tokens)


def block_hit_ratio(hit_blocks: Any, full_blocks: Any) -> Any:
    """Hit blocks over the prompts' full blocks."""
    return _ratio(hit_blocks, full_blocks)


def request_hit_ratio(hit_requests: Any, num_requests: Any) -> Any:
    """Requests with at least one hit block over requests."""
    return _ratio(hit_requests, num_requests)


def hit_ratios(
    hit_blocks: Any,
    hit_requests: Any,
    *,
    block_size: int,
    prompt_tokens: Any,
    full_blocks: Any,
    num_requests: Any,
) -> dict[str, Any]:
    """The three ratios, by their names in every summary and table."""
    return {
        "token_hit_ratio": token_hit_ratio(hit_blocks, block_size, prompt_tokens),
        "block_hit_ratio": block_hit_ratio(hit_blocks, full_blocks),
        "request_hit_ratio": request_hit_ratio(hit_requests, num_requests),
    }
