"""One capacity grammar for replay, sweep, tiers and the Python API.

::

    2000  10k  1.5M  2000b  blocks:2000   blocks (a whole number of them)
    5.12Mt  65536t  tokens:512k           tokens, rounded DOWN to whole blocks
    40GiB  512MB  1.5TiB  bytes:1e9       bytes, rounded down to whole blocks of the
                                          model shape (needs one: --model-shape)
    10%  2.5%                             share of the trace's distinct blocks,
                                          rounded down (needs the trace)
    inf                                   infinite: never evicts

Count suffixes ``k``, ``M``, ``G`` are decimal; ``KiB``/``MiB``/``GiB``/``TiB``
binary and ``KB``/``MB``/``GB``/``TB`` decimal. Amounts are exact (``1.5``
blocks is an error, ``1.5k`` is 1500) and positive; a size that rounds down
to no block at all is an error rather than a silent zero.

:func:`parse_capacity` reads the text into a :class:`CapacitySpec` (no trace
needed: the CLI checks options with it before reading anything);
:func:`resolve_capacity` turns it into a :class:`Capacity`, which knows its
block count and how to label an axis in the unit the user gave
(:meth:`Capacity.in_unit`, :attr:`Capacity.axis_label`).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from sagellm_kv_cache.errors import KVConfigError

__all__ = [
    "GRAMMAR",
    "MAX_CAPACITY_AMOUNT",
    "Capacity",
    "CapacitySpec",
    "capacity_axis",
    "parse_capacity",
    "resolve_capacity",
]

#: Largest amount (blocks, tokens or bytes) a capacity string may give: int64.
MAX_CAPACITY_AMOUNT = 2**63 - 1
#: The forms every capacity option accepts (quoted in error messages).
GRAMMAR = "2000 (blocks), 5.12Mt (tokens), 40GiB (bytes, with a model shape), 10% (of the trace's distinct blocks), inf"

_COUNT_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
_COUNT_NAME = {1: "", 10**3: "k", 10**6: "M", 10**9: "G"}
_BYTE_UNITS = {
    "b": 1, "byte": 1, "bytes": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_BYTE_NAME = {1: "B", 10**3: "KB", 10**6: "MB", 10**9: "GB", 10**12: "TB",
              2**10: "KiB", 2**20: "MiB", 2**30: "GiB", 2**40: "TiB"}  # fmt: skip
_INF = ("inf", "infinite", "infinity", "none", "unbounded")
_RE = re.compile(r"([+-]?)(\d+(?:\.\d*)?|\.\d+)(?:e([+-]?\d+))?\s*([a-z%]*)")


@dataclass(frozen=True, slots=True)
class CapacitySpec:
    """A parsed capacity, not yet in blocks: ``amount`` x ``scale`` of ``unit``.

    ``unit`` is ``"blocks"``, ``"tokens"``, ``"bytes"``, ``"share"`` (percent of
    the trace's distinct blocks) or ``"inf"``; ``amount`` is the total (tokens,
    bytes, percent...), ``scale`` the multiplier the user wrote (``M`` in
    ``5.12Mt``: 10**6; ``GiB``: 2**30), kept for labels.
    """

    amount: float
    unit: str
    scale: int = 1

    @property
    def is_infinite(self) -> bool:
        return self.unit == "inf"

    def to_blocks(
        self, block_size: int, model_shape: Any = None, distinct_blocks: Any = None
    ) -> int | None:
        """Whole blocks (``None`` for infinite); see :func:`resolve_capacity`."""
        return resolve_capacity(
            self, block_size=block_size, model_shape=model_shape, distinct_blocks=distinct_blocks
        ).blocks

    def label(self) -> str:
        """``"40 GiB"``, ``"5.12 Mt"``, ``"10 %"``, ``"2000 blocks"``, ``"inf"``."""
        if self.unit == "inf":
            return "inf"
        n = _num(self.amount / self.scale)
        if self.unit == "blocks":
            return f"{n}{_COUNT_NAME[self.scale]} blocks"
        if self.unit == "tokens":
            return f"{n} {_COUNT_NAME[self.scale]}t" if self.scale > 1 else f"{n} tokens"
        if self.unit == "share":
            return f"{n} %"
        return f"{n} {_BYTE_NAME[self.scale]}"

    def axis_unit(self) -> str:
        """The unit an axis of these capacities is in: ``"GiB"``, ``"M tokens"``..."""
        if self.unit in ("inf", "blocks"):
            return "blocks"
        if self.unit == "tokens":
            return f"{_COUNT_NAME[self.scale]} tokens".strip()
        if self.unit == "share":
            return "% of distinct blocks"
        return _BYTE_NAME[self.scale]

    def __str__(self) -> str:
        """Text :func:`parse_capacity` reads back to an equal spec: the :meth:`label`
        without its spaces and its ``blocks`` (``"40GiB"``, ``"5.12Mt"``, ``"10%"``,
        ``"2000"``), but ``"5t"`` and ``"bytes:5"`` (``"5B"`` would read as blocks)
        for plain tokens and bytes."""
        if self.scale == 1 and self.unit in ("tokens", "bytes"):
            n = _num(self.amount)
            return f"{n}t" if self.unit == "tokens" else f"bytes:{n}"
        return self.label().removesuffix(" blocks").replace(" ", "")


def _num(x: float) -> str:
    if float(x).is_integer():
        return str(int(x))
    return f"{x:.12g}"


@dataclass(frozen=True, slots=True)
class Capacity:
    """A capacity resolved for one trace and block size.

    Attributes:
        blocks: whole blocks (``None``: infinite).
        spec: the text the user gave (``"40GiB"``), or the canonical text.
        unit: ``"blocks"``, ``"tokens"``, ``"bytes"``, ``"share"`` or ``"inf"``.
        label: human form, ``"40 GiB"``, ``"5.12 Mt"``, ``"10 %"``, ``"2000 blocks"``.
        block_size: tokens per block it was resolved at.
        units_per_block: how many of the axis unit one block is (``in_unit``).
    """

    blocks: int | None
    spec: str
    unit: str
    label: str
    block_size: int
    units_per_block: float = 1.0
    axis_unit: str = "blocks"

    @property
    def is_infinite(self) -> bool:
        return self.blocks is None

    @property
    def axis_label(self) -> str:
        """``"capacity (GiB)"``, ``"capacity (M tokens)"``, ``"capacity (blocks)"``..."""
        return f"capacity ({self.axis_unit})"

    def in_unit(self, blocks: float) -> float:
        """A block count in the user's unit (``GiB``, ``M tokens``, ``%``...) for axes."""
        return blocks * self.units_per_block


def _grammar_error(text: Any, why: str) -> KVConfigError:
    return KVConfigError(f"{why}; capacity forms: {GRAMMAR}")


@functools.lru_cache(maxsize=256)
def _parse_text(text: str) -> CapacitySpec:
    s = text.strip().replace("_", "").replace(",", "")
    low = s.lower()
    if low in _INF:
        return CapacitySpec(math.inf, "inf")
    prefix = None
    if ":" in low:
        prefix, _, low = low.partition(":")
        if prefix not in ("blocks", "tokens", "bytes"):
            raise _grammar_error(text, f"unknown capacity unit {prefix!r} in {text!r}")
        low = low.strip()
    m = _RE.fullmatch(low)
    if m is None:
        raise _grammar_error(text, f"cannot parse capacity {text!r}")
    sign, number, exponent, suffix = m.groups()
    if exponent and int(exponent) > 30:  # Fraction would build a huge integer first
        raise KVConfigError(f"capacity {text!r} is too large (at most {MAX_CAPACITY_AMOUNT})")
    value = Fraction(number) * (Fraction(10) ** int(exponent or 0))
    if sign == "-" and value:
        raise KVConfigError(f"capacity must be positive, got {text!r}")
    if suffix == "%" and prefix is None:
        unit, scale = "share", 1
    elif prefix == "bytes" or (prefix is None and suffix in _BYTE_UNITS and suffix != "b"):
        scale = _BYTE_UNITS.get(suffix or "b")
        if scale is None:
            raise _grammar_error(text, f"unknown byte unit {suffix!r} in capacity {text!r}")
        unit = "bytes"
    else:
        unit = prefix or "blocks"
        if prefix is None and suffix:
            if suffix.endswith(("tokens", "blocks")):
                unit, suffix = suffix[-6:], suffix[:-6]
            elif suffix[-1] == "t":
                unit, suffix = "tokens", suffix[:-1]
            elif suffix[-1] == "b":
                suffix = suffix[:-1]
        scale = _COUNT_SUFFIX.get(suffix)
        if scale is None:
            raise _grammar_error(text, f"unknown suffix {suffix!r} in capacity {text!r}")
    amount = value * scale
    if amount <= 0:
        raise KVConfigError(f"capacity must be positive, got {text!r}")
    if unit != "share" and amount.denominator != 1:
        raise KVConfigError(f"capacity must be a whole number of {unit}, got {text!r}")
    if amount > MAX_CAPACITY_AMOUNT:
        raise KVConfigError(f"capacity {text!r} is too large (at most {MAX_CAPACITY_AMOUNT})")
    return CapacitySpec(float(amount), unit, scale)


def parse_capacity(text: Any) -> CapacitySpec:
    """Read a capacity (module doc) without resolving it: ``"40GiB"`` -> bytes x 2**30.

    Accepts a string, a positive int (blocks), ``None`` or ``math.inf``
    (infinite), a :class:`CapacitySpec` or a :class:`Capacity` (its ``spec``).

    Raises:
        KVConfigError: unparseable text, unknown unit, a non-positive or
            fractional amount; the message lists the forms.
    """
    if isinstance(text, CapacitySpec):
        return text
    if isinstance(text, Capacity):
        return _parse_text(text.spec)
    if text is None:
        return CapacitySpec(math.inf, "inf")
    is_number = isinstance(text, str | int | float) or hasattr(text, "__index__")
    if isinstance(text, bool) or not is_number:
        raise _grammar_error(text, f"capacity must be a number or a string, got {text!r}")
    if isinstance(text, float) and math.isinf(text) and text > 0:
        return CapacitySpec(math.inf, "inf")
    if not isinstance(text, str):
        text = str(int(text)) if hasattr(text, "__index__") else repr(text)
    return _parse_text(text)


def resolve_capacity(
    spec: Any,
    *,
    block_size: int,
    model_shape: Any = None,
    distinct_blocks: int | Callable[[], int] | None = None,
) -> Capacity:
    """A capacity in whole blocks of ``block_size`` tokens, with its label and axis unit.

    Args:
        spec: anything :func:`parse_capacity` reads (``2000``, ``"5.12Mt"``,
            ``"40GiB"``, ``"10%"``, ``"inf"``, ``None``).
        block_size: tokens per block (a positive int).
        model_shape: needed by byte capacities: anything
            ``sagellm_kv_cache.model_shapes.resolve_model_shape`` reads.
        distinct_blocks: needed by shares: the trace's distinct blocks, or a
            function returning them (called only for a share, so callers can
            pass a lazy count).

    Returns:
        :class:`Capacity`; tokens, bytes and shares round down to whole blocks.

    Raises:
        KVConfigError: a grammar error, a byte capacity without a model shape,
            a share without the trace's size, or a size under one block.
    """
    if type(spec) is int and spec > 0 and type(block_size) is int and block_size > 0:
        return Capacity(spec, str(spec), "blocks", f"{spec} blocks", block_size)  # fast path
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise KVConfigError(f"block_size must be a positive int, got {block_size!r}")
    text = spec.spec if isinstance(spec, Capacity) else spec
    cap = parse_capacity(text)
    given = text.strip() if isinstance(text, str) else str(cap)
    label = cap.label()
    axis = cap.axis_unit()
    if cap.unit == "inf":
        return Capacity(None, given, "inf", label, block_size)
    if cap.unit == "blocks":
        return Capacity(int(cap.amount), given, "blocks", label, block_size)
    if cap.unit == "tokens":
        n = int(cap.amount) // block_size
        per_block = block_size / cap.scale
        what = f"of {block_size} tokens"
    elif cap.unit == "bytes":
        if model_shape is None:
            raise KVConfigError(
                f"capacity {given!r} is in bytes and needs a model shape to become blocks "
                "(--model-shape llama-3-8b, 32,8,128,bf16 or a config.json; "
                "Python: model_shape=...)"
            )
        from sagellm_kv_cache.model_shapes import resolve_model_shape

        block_bytes = resolve_model_shape(model_shape).bytes_per_block(block_size)
        n = int(cap.amount) // block_bytes
        per_block = block_bytes / cap.scale
        what = f"of {block_size} tokens x {block_bytes // block_size} bytes per token"
    else:  # share
        total = distinct_blocks() if callable(distinct_blocks) else distinct_blocks
        if total is None:
            raise KVConfigError(
                f"capacity {given!r} is a share of the trace's distinct blocks and needs the "
                "trace (Python: distinct_blocks=...)"
            )
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise KVConfigError(f"distinct_blocks must be an int >= 0, got {total!r}")
        n = int(Fraction(cap.amount) * total // 100)
        per_block = 100 / total if total else 0.0
        what = f"of the trace's {total} distinct blocks"
    if n < 1:
        raise KVConfigError(f"capacity {given!r} holds no full block ({what})")
    return Capacity(n, given, cap.unit, label, block_size, per_block, axis)


def capacity_axis(capacities: Sequence[Capacity]) -> tuple[str, Callable[[float], float]]:
    """An axis label and a blocks -> axis-value function shared by ``capacities``.

    When they share one unit (all ``GiB``, all shares...) the axis is in it;
    mixed units (``1%,5Mt,40GiB``) fall back to blocks, the one unit all share.
    """
    finite = [c for c in capacities if c.blocks is not None]
    units = {(c.axis_unit, c.units_per_block) for c in finite}
    if len(units) == 1:
        c = finite[0]
        return c.axis_label, c.in_unit
    return "capacity (blocks)", float
