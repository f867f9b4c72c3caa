"""Replay configuration: the cost model, capacities, and ``ReplayConfig``.

The dataclass fields are the single source of the CLI's defaults and help
(``cli/replay_cmds.py`` reads ``field_help``); every run writes the resolved
config as ``config.json`` next to its output.

Capacities follow one grammar everywhere (``sim/capacity.py``, re-exported
here): ``2000`` blocks, ``5.12Mt`` tokens, ``40GiB`` bytes (with a model shape:
``sagellm_kv_cache.model_shapes``), ``10%`` of the trace's distinct blocks,
``inf``. ``resolve_capacity`` turns one into a :class:`Capacity` (blocks, the
user's text, a label and the axis unit). A capacity larger than a trace needs
is meaningful only as "never evicts"; the CLI clamps it to the trace's size
(see ``cli/_common.py``) rather than building a pool that large.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sagellm_kv_cache.errors import KVConfigError

from .capacity import (
    GRAMMAR,
    MAX_CAPACITY_AMOUNT,
    Capacity,
    CapacitySpec,
    capacity_axis,
    parse_capacity,
    resolve_capacity,
)

__all__ = [
    "GRAMMAR",
    "MAX_CAPACITY_AMOUNT",
    "Capacity",
    "CapacitySpec",
    "LinearCostModel",
    "ReplayConfig",
    "capacity_axis",
    "check_fields_nonnegative",
    "field_help",
    "parse_capacity",
    "resolve_capacity",
]


def check_fields_nonnegative(obj: Any) -> None:
    """Every dataclass field of ``obj`` a number >= 0 (not a bool), else ``KVConfigError``."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0:
            raise KVConfigError(f"{type(obj).__name__}.{f.name} must be a number >= 0, got {v!r}")


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
        check_fields_nonnegative(self)

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
        "10000",
        "cache size: 10000 (blocks), 5.12Mt (tokens), 40GiB (needs --model-shape), "
        "10% (of the trace's distinct blocks), inf",
    )
    policy: str = _f("lru", "eviction policy name")
    block_size: int | None = _f(
        None, "tokens per block (default: the trace's; token-level traces are hashed at it)"
    )
    mode: str = _f("sequential", "sequential (one request at a time) or concurrent (clocked)")
    model_shape: str | None = _f(
        None,
        "model KV shape for byte capacities: a preset (llama-3-8b), LAYERS,KV_HEADS,HEAD_DIM,DTYPE "
        "(32,8,128,bf16) or a Hugging Face config.json",
    )
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
        elif isinstance(self.capacity, Capacity):
            self.capacity = self.capacity.spec
        elif not isinstance(self.capacity, str):
            self.capacity = str(parse_capacity(self.capacity))
        parse_capacity(self.capacity)  # fail early
        for name in ("block_size", "max_num_seqs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise KVConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if self.model_shape is not None:
            from sagellm_kv_cache.model_shapes import resolve_model_shape

            resolve_model_shape(self.model_shape)  # fail early, names the accepted forms
        from sagellm_kv_cache.eviction import make_policy

        make_policy(self.policy)  # fail early, names the registered policies

    def resolve_capacity(self, block_size: int, distinct_blocks: Any = None) -> Capacity:
        """``capacity`` as a :class:`Capacity` at ``block_size`` (``model_shape`` for bytes,
        ``distinct_blocks``, an int or a function, for shares).

        Raises:
            KVConfigError: bytes without ``model_shape``, a share without
                ``distinct_blocks``, or less than one block.
        """
        return resolve_capacity(
            self.capacity,
            block_size=block_size,
            model_shape=self.model_shape,
            distinct_blocks=distinct_blocks,
        )

    def capacity_blocks(self, block_size: int, distinct_blocks: Any = None) -> int | None:
        """The capacity in whole blocks of ``block_size`` tokens (``None``: infinite);
        see :meth:`resolve_capacity`."""
        return self.resolve_capacity(block_size, distinct_blocks).blocks

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_help(name: str) -> str:
    """The help text of ``ReplayConfig.<name>`` (for CLI options)."""
    return ReplayConfig.__dataclass_fields__[name].metadata["help"]
