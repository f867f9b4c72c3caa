"""Replay configuration: the cost model, capacities, and ``ReplayConfig``.

The dataclass fields are the single source of the CLI's defaults and help
(``cli/replay_cmds.py`` reads ``field_help``); every run writes the resolved
config as ``config.json`` next to its output.

Capacity strings (``parse_capacity``)::

    10000  10000b  blocks:10000     blocks
    5.12Mt  512kt  tokens:5120000   tokens (rounded down to whole blocks)
    40GiB  512MB   bytes:1e9        bytes (need a model shape: --model-shape llama-3-8b)
    inf                             infinite (never evicts)

Count suffixes ``k``, ``M``, ``G`` are decimal; byte units ``KiB``/``MiB``/``GiB``/``TiB``
are binary and ``KB``/``MB``/``GB``/``TB`` decimal. Amounts are exact: they must
be positive, whole (``1.5`` blocks is an error, ``1.5k`` blocks is 1500) and at
most :data:`MAX_CAPACITY_AMOUNT`. A capacity larger than a trace needs is
meaningful only as "never evicts"; the CLI clamps it to the trace's size (see
``cli/replay_cmds.py``) rather than building a pool that large.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from sagellm_kv_cache.errors import KVConfigError

__all__ = [
    "MAX_CAPACITY_AMOUNT",
    "Capacity",
    "LinearCostModel",
    "ReplayConfig",
    "field_help",
    "parse_capacity",
]


@dataclass(frozen=True, slots=True)
class LinearCostModel:
    """Time a request runs, linear in its uncached prompt tokens and output tokens.

    ::

        prefill_s = prefill_overhead_s + prefill_s_per_token * uncached_prompt_tokens
        decode_s  = decode_overhead_s  + decode_s_per_token  * output_tokens

    The defaults are illustrative, order-of-magnitude figures for a Llama-3-8B
    class model in bf16 on one H100 at batch size 1 (prefill about 16k tokens/s,
    decode about 80 tokens/s); they were not measured here. Calibrate them from
    your own engine's profile before reading absolute latencies; hit ratios do
    not depend on them in sequential mode.
    """

    prefill_s_per_token: float = 6.0e-5
    prefill_overhead_s: float = 0.010
    decode_s_per_token: float = 0.012
    decode_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0:
                raise KVConfigError(f"LinearCostModel.{f.name} must be a number >= 0, got {v!r}")

    def prefill_s(self, uncached_tokens: int) -> float:
        return self.prefill_overhead_s + self.prefill_s_per_token * uncached_tokens

    def decode_s(self, output_tokens: int) -> float:
        return self.decode_overhead_s + self.decode_s_per_token * output_tokens

    @classmethod
    def zero(cls) -> LinearCostModel:
        """Every request takes no simulated time (concurrent replay then equals sequential)."""
        return cls(0.0, 0.0, 0.0, 0.0)

    def to_text(self) -> str:
        """The ``name=value,...`` form ``parse`` reads back."""
        return ",".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))

    @classmethod
    def parse(cls, text: str | None) -> LinearCostModel:
        """``"prefill_s_per_token=5e-5,decode_s_per_token=0.01"`` -> a cost model."""
        if not text:
            return cls()
        kwargs: dict[str, float] = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in names:
                raise KVConfigError(
                    f"bad cost model item {part!r}; use name=value with names {sorted(names)}"
                )
            try:
                kwargs[key] = float(value)
            except ValueError:
                raise KVConfigError(f"cost model {key}={value!r} is not a number") from None
        return cls(**kwargs)


_COUNT_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
_BYTE_UNITS = {
    "b": 1,
    "byte": 1,
    "bytes": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_NUM = r"(\d+(?:\.\d*)?(?:e[+-]?\d+)?)"
#: Largest amount (blocks, tokens or bytes) a capacity string may give: int64.
MAX_CAPACITY_AMOUNT = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Capacity:
    """A cache size: ``amount`` of ``unit`` (``"blocks"``, ``"tokens"``, ``"bytes"``, ``"inf"``)."""

    amount: float
    unit: str

    @property
    def is_infinite(self) -> bool:
        return self.unit == "inf"

    def to_blocks(self, block_size: int, model_shape: Any = None) -> int | None:
        """Whole blocks (``None`` for infinite).

        Raises:
            KVConfigError: bytes without a model shape, or less than one block.
        """
        if self.unit == "inf":
            return None
        if self.unit == "blocks":
            n = int(self.amount)
        elif self.unit == "tokens":
            n = int(self.amount) // block_size
        else:
            if model_shape is None:
                raise KVConfigError(
                    f"capacity {self} is in bytes; give a model shape (--model-shape llama-3-8b)"
                )
            if isinstance(model_shape, str):
                from sagellm_kv_cache.storage import ModelShape

                model_shape = ModelShape.named(model_shape)
            n = int(self.amount) // model_shape.bytes_per_block(block_size)
        if n < 1:
            raise KVConfigError(f"capacity {self} holds no full block of {block_size} tokens")
        return n

    def __str__(self) -> str:
        if self.unit == "inf":
            return "inf"
        amount = int(self.amount) if float(self.amount).is_integer() else self.amount
        return f"{amount} {self.unit}"


def parse_capacity(text: str | int | Capacity) -> Capacity:
    """Parse ``10000``, ``10000b``, ``5.12Mt``, ``tokens:512k``, ``40GiB``, ``inf``.

    Raises:
        KVConfigError: unparseable text or a non-positive amount.
    """
    if isinstance(text, Capacity):
        return text
    if isinstance(text, bool):
        raise KVConfigError(f"capacity must be a number or a string, got {text!r}")
    if isinstance(text, int):
        text = str(text)
    s = str(text).strip().replace("_", "").replace(",", "")
    low = s.lower()
    if low in ("inf", "infinite", "infinity", "none", "unbounded"):
        return Capacity(math.inf, "inf")
    unit_prefix = None
    if ":" in low:
        unit_prefix, _, low = low.partition(":")
        if unit_prefix not in ("blocks", "tokens", "bytes"):
            raise KVConfigError(f"unknown capacity unit {unit_prefix!r} in {text!r}")
    m = re.fullmatch(r"([+-]?)" + _NUM + r"\s*([a-z]*)", low)
    if m is None:
        raise KVConfigError(
            f"cannot parse capacity {text!r}; examples: 10000, 10000b, 5.12Mt, 40GiB, inf"
        )
    sign, number, suffix = m.groups()
    exponent = number.partition("e")[2]
    if exponent and int(exponent) > 30:  # Fraction would build a huge integer first
        raise KVConfigError(f"capacity {text!r} is too large (at most {MAX_CAPACITY_AMOUNT})")
    value = Fraction(number)
    if sign == "-" and value:
        raise KVConfigError(f"capacity must be positive, got {text!r}")
    if unit_prefix == "bytes" or (unit_prefix is None and suffix in _BYTE_UNITS and suffix != "b"):
        mult = _BYTE_UNITS.get(suffix or "b")
        if mult is None:
            raise KVConfigError(f"unknown byte unit {suffix!r} in capacity {text!r}")
        unit = "bytes"
    else:
        unit = unit_prefix or "blocks"
        if unit_prefix is None and suffix:
            tail = suffix[-1]
            if tail == "t":
                unit, suffix = "tokens", suffix[:-1]
            elif tail == "b":
                suffix = suffix[:-1]
            elif suffix.endswith(("tokens", "blocks")):
                unit = suffix[-6:].rstrip("s") + "s"
                suffix = suffix[:-6]
        mult = _COUNT_SUFFIX.get(suffix)
        if mult is None:
            raise KVConfigError(f"unknown suffix {suffix!r} in capacity {text!r}")
    amount = value * mult
    if amount <= 0:
        raise KVConfigError(f"capacity must be positive, got {text!r}")
    if amount.denominator != 1:
        raise KVConfigError(f"capacity must be a whole number of {unit}, got {text!r}")
    if amount > MAX_CAPACITY_AMOUNT:
        raise KVConfigError(f"capacity {text!r} is too large (at most {MAX_CAPACITY_AMOUNT})")
    return Capacity(float(amount), unit)


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help}, **kw)


@dataclass(slots=True)
class ReplayConfig:
    """One replay: which trace, how big a cache, which policy, which clock.

    Sequential mode releases each request before the next one arrives (the
    setting of published prefix-hit numbers); concurrent mode runs requests
    on a simulated clock with the cost model, so requests overlap, hold their
    blocks while they run and queue (FIFO) when the cache cannot give them
    their blocks.
    """

    trace: str | None = _f(None, "trace file (default: the bundled Mooncake synthetic trace)")
    format: str = _f("auto", "trace format (auto-detected from the file by default)")
    capacity: str = _f(
        "10000", "cache size: 10000 (blocks), 5.12Mt (tokens), 40GiB (needs --model-shape), inf"
    )
    policy: str = _f("lru", "eviction policy name")
    block_size: int | None = _f(
        None, "tokens per block (default: the trace's; token-level traces are hashed at it)"
    )
    mode: str = _f("sequential", "sequential (one request at a time) or concurrent (clocked)")
    model_shape: str | None = _f(None, "model shape for byte capacities (e.g. llama-3-8b)")
    max_num_seqs: int | None = _f(
        None, "concurrent mode: most requests running at once (default: no limit but the cache)"
    )
    cost: LinearCostModel = field(
        default_factory=LinearCostModel,
        metadata={"help": "cost model, e.g. prefill_s_per_token=5e-5,decode_s_per_token=0.01"},
    )
    curve: str = _f(
        "1000,3000,10000,30000",
        "capacities of the hit-ratio-vs-capacity figure (sequential replays), comma-separated",
    )
    skip_bad: bool = _f(False, "skip malformed trace records instead of failing")
    progress: bool = _f(True, "show progress bars")
    out_dir: str = _f("kv_replay_out", "output directory")

    def __post_init__(self) -> None:
        if self.mode not in ("sequential", "concurrent"):
            raise KVConfigError(f"mode must be 'sequential' or 'concurrent', got {self.mode!r}")
        if self.cost is None or isinstance(self.cost, str):
            self.cost = LinearCostModel.parse(self.cost)
        elif isinstance(self.cost, dict):
            self.cost = LinearCostModel(**self.cost)
        elif not isinstance(self.cost, LinearCostModel):
            raise KVConfigError(
                f"cost must be a LinearCostModel, dict or string, got {self.cost!r}"
            )
        # canonical capacity text: None means infinite, ints and Capacity objects become text
        if self.capacity is None:
            self.capacity = "inf"
        elif isinstance(self.capacity, int) and not isinstance(self.capacity, bool):
            self.capacity = str(self.capacity)
        elif not isinstance(self.capacity, str):
            self.capacity = str(parse_capacity(self.capacity))
        parse_capacity(self.capacity)  # fail early
        for name in ("block_size", "max_num_seqs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise KVConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if self.model_shape is not None:
            from sagellm_kv_cache.storage import ModelShape

            ModelShape.named(self.model_shape)  # fail early, names the known shapes
        from sagellm_kv_cache.eviction import make_policy

        make_policy(self.policy)  # fail early, names the registered policies

    def capacity_blocks(self, block_size: int) -> int | None:
        """The capacity in whole blocks of ``block_size`` tokens (``None``: infinite).

        Raises:
            KVConfigError: bytes without ``model_shape``, or less than one block.
        """
        return parse_capacity(self.capacity).to_blocks(block_size, self.model_shape)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_help(name: str) -> str:
    """The help text of ``ReplayConfig.<name>`` (for CLI options)."""
    return ReplayConfig.__dataclass_fields__[name].metadata["help"]
