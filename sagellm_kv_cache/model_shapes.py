"""Model KV shapes: presets, ``LAYERS,KV_HEADS,HEAD_DIM,DTYPE`` strings, Hugging Face configs.

A shape says how many bytes of KV one token takes, which is what turns a byte
budget (``40GiB``) into blocks. :func:`resolve_model_shape` accepts::

    llama-3-8b                 a preset (see PRESETS)
    32,8,128,bf16              layers, KV heads, head dim, dtype (dtype optional: bf16)
    path/to/config.json        a Hugging Face config (or the folder holding one)

and returns a :class:`KVModelShape`, a :class:`~sagellm_kv_cache.storage.ModelShape`
that also remembers where it came from and the attention variant, so a pool,
the simulator and the tiered model all take it where they take a ``ModelShape``.

What the config reader counts, per token, in the model's dtype::

    GQA / MHA / MQA   2 (K and V) x kv_heads x head_dim     per attention layer
    MLA (DeepSeek)    kv_lora_rank + qk_rope_head_dim       per layer (one latent, no V)
    sliding window    as a full layer (see below)
    linear attention  nothing (a fixed-size state, not per-token KV)

Sliding-window layers in a prefix cache: a sliding layer needs only the last
``window`` tokens' KV to *run* a request, but a prefix cache keeps a block so a
later request can *resume* from it, and the request that resumes after block
``b`` needs the window layers' KV of the blocks just before ``b``. Any cached
block can end a future hit, so a cache that serves hits at every block
boundary keeps every layer of every cached block: :attr:`bytes_per_token`
counts sliding layers like full ones (an upper bound, and exact for a cache
that does not special-case windows). :attr:`full_attention_bytes_per_token`
is the lower bound of a cache that drops window-layer KV outside the live
window (vLLM's hybrid allocator frees those blocks); the difference is
reported, not guessed.

MLA shapes are stored as one KV "head" whose K and V halves together hold the
latent (``head_dim = (kv_lora_rank + qk_rope_head_dim) / 2``), so a pool with
tensors allocates exactly the latent's bytes.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import KVConfigError
from .handle import normalize_dtype
from .storage import ModelShape

__all__ = [
    "PRESETS",
    "KVModelShape",
    "estimate_pool_bytes",
    "format_bytes",
    "model_shape_from_hf_config",
    "resolve_model_shape",
]

#: Largest config.json this reader opens (real ones are a few KB).
MAX_CONFIG_BYTES = 4 << 20
_GRAMMAR = (
    "a preset ({presets}), LAYERS,KV_HEADS,HEAD_DIM[,DTYPE] (e.g. 32,8,128,bf16) "
    "or the path of a Hugging Face config.json"
)


@dataclass(frozen=True, slots=True)
class KVModelShape(ModelShape):
    """A :class:`ModelShape` with its provenance and attention variant.

    Args (besides ``ModelShape``'s):
        name: preset name, the custom string, or the config's ``model_type``.
        source: ``"preset"``, ``"custom"`` or the config file's path.
        attention: ``"mha"``, ``"gqa"``, ``"mqa"`` or ``"mla"``.
        kv_lora_rank, qk_rope_head_dim: the MLA latent (``None`` otherwise).
        sliding_window: window of the sliding layers, in tokens (``None``: none).
        num_sliding_layers: how many of ``num_layers`` use the window.
        num_layers_without_kv: layers that keep no per-token KV (linear attention).
    """

    name: str = ""
    source: str = "custom"
    attention: str = "gqa"
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    sliding_window: int | None = None
    num_sliding_layers: int = 0
    num_layers_without_kv: int = 0

    def __post_init__(self) -> None:
        ModelShape.__post_init__(self)  # zero-arg super() breaks in slots dataclasses
        if not 0 <= self.num_sliding_layers <= self.num_layers:
            raise KVConfigError(
                f"num_sliding_layers must be in [0, {self.num_layers}], "
                f"got {self.num_sliding_layers!r}"
            )

    @property
    def bytes_per_layer_token(self) -> int:
        """KV bytes of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.element_size

    @property
    def full_attention_bytes_per_token(self) -> int:
        """Bytes per token of the full-attention layers only (lower bound; module doc)."""
        return (self.num_layers - self.num_sliding_layers) * self.bytes_per_layer_token

    @property
    def sliding_window_bytes(self) -> int:
        """What the sliding layers need for one request's live window (0 without one)."""
        if not self.sliding_window:
            return 0
        return self.num_sliding_layers * self.sliding_window * self.bytes_per_layer_token

    def describe(self) -> str:
        """One line: geometry, dtype and bytes per token."""
        if self.attention == "mla":
            geo = (
                f"{self.num_layers} layers x MLA latent {self.kv_lora_rank}+{self.qk_rope_head_dim}"
            )
        else:
            geo = f"{self.num_layers} layers x {self.num_kv_heads} KV heads x {self.head_dim}"
        extra = ""
        if self.num_sliding_layers:
            extra = (
                f"; {self.num_sliding_layers} sliding-window layers ({self.sliding_window} "
                f"tokens) counted in full, {format_bytes(self.full_attention_bytes_per_token)}"
                "/token without them"
            )
        label = f"{self.name}: " if self.name else ""
        return f"{label}{geo} {self.dtype} = {format_bytes(self.bytes_per_token)}/token{extra}"

    def __str__(self) -> str:
        """Text :func:`resolve_model_shape` reads back: the preset name, the config's
        path, or ``LAYERS,KV_HEADS,HEAD_DIM,DTYPE``."""
        if self.source == "preset" and PRESETS.get(self.name) == self:
            return self.name
        if self.source not in ("preset", "custom"):
            return self.source
        return f"{self.num_layers},{self.num_kv_heads},{self.head_dim},{self.dtype}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (for ``config.json``), ``bytes_per_token`` included."""
        out = {s: getattr(self, s) for s in _FIELDS}
        out["bytes_per_token"] = self.bytes_per_token
        return out


_FIELDS = (
    "name",
    "source",
    "num_layers",
    "num_kv_heads",
    "head_dim",
    "dtype",
    "attention",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "sliding_window",
    "num_sliding_layers",
    "num_layers_without_kv",
)


def _mla(name: str, layers: int, rank: int, rope: int, dtype: str = "bfloat16") -> KVModelShape:
    return KVModelShape(
        layers, 1, (rank + rope) // 2, dtype, name=name, source="preset", attention="mla",
        kv_lora_rank=rank, qk_rope_head_dim=rope,
    )  # fmt: skip


def _gqa(name, layers, kv, dim, window=None, sliding=0, heads=None) -> KVModelShape:
    attention = "mha" if heads == kv else ("mqa" if kv == 1 else "gqa")
    return KVModelShape(
        layers, kv, dim, "bfloat16", name=name, source="preset", attention=attention,
        sliding_window=window, num_sliding_layers=sliding,
    )  # fmt: skip


#: Named shapes (bf16 KV). The first six are ``ModelShape.named``'s.
PRESETS: dict[str, KVModelShape] = {
    s.name: s
    for s in (
        _gqa("llama-3-8b", 32, 8, 128),
        _gqa("llama-3-70b", 80, 8, 128),
        _gqa("qwen2.5-7b", 28, 4, 128),
        _gqa("qwen2.5-72b", 80, 8, 128),
        _gqa("mistral-7b", 32, 8, 128),
        KVModelShape(2, 2, 8, "float16", name="tiny", source="preset"),
        _mla("deepseek-v2", 60, 512, 64),
        _mla("deepseek-v3", 61, 512, 64),
        _gqa("gemma-2-9b", 42, 8, 256, window=4096, sliding=21),
        _gqa("gemma-3-27b", 62, 16, 128, window=1024, sliding=52),
    )
}

_CUSTOM = re.compile(r"\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*(?:,\s*([A-Za-z0-9_.]+)\s*)?")


def _grammar() -> str:
    return _GRAMMAR.format(presets=", ".join(PRESETS))


@functools.lru_cache(maxsize=64)
def _from_text(text: str) -> KVModelShape:
    key = text.strip()
    preset = PRESETS.get(key.lower())
    if preset is not None:
        return preset
    m = _CUSTOM.fullmatch(key)
    if m is not None:
        layers, heads, dim = (int(g) for g in m.groups()[:3])
        for what, v in (("layers", layers), ("kv_heads", heads), ("head_dim", dim)):
            if v <= 0:
                raise KVConfigError(f"model shape {text!r}: {what} must be positive, got {v}")
        dtype = m.group(4) or "bfloat16"
        try:
            dtype = normalize_dtype(dtype)
        except KVConfigError as err:
            raise KVConfigError(f"model shape {text!r}: {err.message}") from None
        canon = f"{layers},{heads},{dim},{dtype}"
        return KVModelShape(layers, heads, dim, dtype, name=canon, source="custom")
    raise KVConfigError(f"unknown model shape {text!r}; give {_grammar()}")


def resolve_model_shape(spec: Any, *, dtype: str | None = None) -> KVModelShape:
    """A :class:`KVModelShape` from a preset name, a custom string, a config path or a shape.

    Args:
        spec: ``"llama-3-8b"``, ``"32,8,128,bf16"``, a path to a Hugging Face
            ``config.json`` (or its folder), a ``dict`` of one, or a ``ModelShape``.
        dtype: KV dtype instead of the one the spec gives (e.g. ``"fp8"``).

    Raises:
        KVConfigError: an unknown name, a malformed string, an unreadable or
            incomplete config (the message says which key is missing).
    """
    if isinstance(spec, KVModelShape):
        shape = spec
    elif isinstance(spec, ModelShape):
        shape = _from_text(f"{spec.num_layers},{spec.num_kv_heads},{spec.head_dim},{spec.dtype}")
    elif isinstance(spec, dict):
        shape = model_shape_from_hf_config(spec)
    elif isinstance(spec, str | os.PathLike):
        text = os.fspath(spec)
        if isinstance(spec, str) and (text.strip().lower() in PRESETS or _CUSTOM.fullmatch(text)):
            shape = _from_text(text)
        elif text.endswith(".json") or os.path.exists(text):
            shape = model_shape_from_hf_config(text)
        else:
            shape = _from_text(text)
    else:
        raise KVConfigError(f"model shape must be a string or a ModelShape, got {spec!r}")
    if dtype is not None and normalize_dtype(dtype) != shape.dtype:
        shape = replace(shape, dtype=dtype)
    return shape


# -- Hugging Face config.json -------------------------------------------------------------------


def _load_config(path: str) -> tuple[dict, str]:
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise KVConfigError(f"{p}: {size} bytes is too large for a model config")
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KVConfigError(f"model shape {path!r}: no such file; give {_grammar()}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise KVConfigError(f"{p}: not a readable JSON model config ({err})") from None
    if not isinstance(data, dict):
        raise KVConfigError(f"{p}: a model config must be a JSON object")
    return data, str(p)


def _opt_int(cfg: dict, where: str, *keys: str) -> int | None:
    """The first of ``keys`` present in ``cfg`` (a positive int), or ``None``."""
    for k in keys:
        v = cfg.get(k)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise KVConfigError(f"{where}: {k} must be a positive integer, got {v!r}")
            return v
    return None


def _int(cfg: dict, where: str, *keys: str) -> int:
    """The first of ``keys`` present in ``cfg`` (a positive int); ``KVConfigError`` if none."""
    v = _opt_int(cfg, where, *keys)
    if v is None:
        raise KVConfigError(f"{where}: missing {' or '.join(keys)}")
    return v


def _layer_types(cfg: dict, where: str, num_layers: int) -> list[str]:
    """Each layer's attention kind: ``full_attention``, ``sliding_attention`` or ``linear_attention``."""
    types = cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != num_layers:
            raise KVConfigError(f"{where}: layer_types must list {num_layers} layer kinds")
        out = []
        for t in types:
            kind = {"chunked_attention": "sliding_attention"}.get(t, t)
            if kind not in ("full_attention", "sliding_attention", "linear_attention"):
                raise KVConfigError(f"{where}: unknown layer type {t!r} in layer_types")
            out.append(kind)
        return out
    window = cfg.get("sliding_window")
    if not window or cfg.get("use_sliding_window") is False:
        return ["full_attention"] * num_layers
    model_type = str(cfg.get("model_type", ""))
    if model_type.startswith("gemma2"):  # even layers slide (Gemma-2 interleaving)
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    pattern = cfg.get("sliding_window_pattern")
    if pattern is None and model_type.startswith("gemma3"):
        pattern = 6
    if pattern:  # Gemma-3: every pattern-th layer is global
        p = int(pattern)
        return [
            "full_attention" if (i + 1) % p == 0 else "sliding_attention" for i in range(num_layers)
        ]
    first = cfg.get("max_window_layers") if cfg.get("use_sliding_window") else 0
    first = int(first or 0)  # Qwen2: layers from max_window_layers on slide
    return ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]


def model_shape_from_hf_config(
    config: str | os.PathLike | dict, *, dtype: str | None = None
) -> KVModelShape:
    """The KV shape a Hugging Face ``config.json`` describes (module doc: what is counted).

    Reads ``num_hidden_layers``, ``num_key_value_heads`` (GQA; defaults to
    ``num_attention_heads``), ``head_dim`` (default ``hidden_size /
    num_attention_heads``), MLA's ``kv_lora_rank`` and ``qk_rope_head_dim``,
    ``sliding_window`` with ``layer_types``, ``use_sliding_window`` /
    ``max_window_layers`` (Qwen2), Gemma-2's alternation or Gemma-3's
    ``sliding_window_pattern``, and ``torch_dtype`` (or ``dtype``; default
    bfloat16). A multimodal config's ``text_config`` is used when present.

    Raises:
        KVConfigError: unreadable file, missing or non-positive keys.
    """
    if isinstance(config, dict):
        cfg, where = config, "model config"
    else:
        cfg, where = _load_config(os.fspath(config))
    top = cfg
    text = cfg.get("text_config")
    if isinstance(text, dict) and "num_hidden_layers" not in cfg:
        cfg = {**text, "torch_dtype": text.get("torch_dtype") or top.get("torch_dtype")}
    name = str(cfg.get("model_type") or top.get("model_type") or Path(where).parent.name)
    total_layers = _int(cfg, where, "num_hidden_layers", "n_layer", "num_layers")
    kv_dtype = dtype or cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    try:
        kv_dtype = normalize_dtype(kv_dtype)
    except KVConfigError as err:
        raise KVConfigError(f"{where}: {err.message}") from None
    types = _layer_types(cfg, where, total_layers)
    no_kv = types.count("linear_attention")
    num_layers = total_layers - no_kv
    if num_layers < 1:
        raise KVConfigError(f"{where}: no layer keeps per-token KV")
    sliding = types.count("sliding_attention")
    window = cfg.get("sliding_window") if sliding else None
    common: dict[str, Any] = {
        "name": name,
        "source": where,
        "sliding_window": window,
        "num_sliding_layers": sliding,
        "num_layers_without_kv": no_kv,
    }
    if cfg.get("kv_lora_rank"):
        rank = _int(cfg, where, "kv_lora_rank")
        rope = _int(cfg, where, "qk_rope_head_dim")
        if (rank + rope) % 2:
            raise KVConfigError(f"{where}: MLA latent {rank}+{rope} is odd")
        return KVModelShape(
            num_layers, 1, (rank + rope) // 2, kv_dtype, attention="mla",
            kv_lora_rank=rank, qk_rope_head_dim=rope, **common,
        )  # fmt: skip
    heads = _int(cfg, where, "num_attention_heads", "n_head")
    kv = _opt_int(cfg, where, "num_key_value_heads", "num_kv_heads")
    if kv is None:
        kv = 1 if cfg.get("multi_query") else heads
    head_dim = _opt_int(cfg, where, "head_dim")
    if head_dim is None:
        hidden = _int(cfg, where, "hidden_size", "n_embd")
        if hidden % heads:
            raise KVConfigError(f"{where}: hidden_size {hidden} is not a multiple of {heads} heads")
        head_dim = hidden // heads
    attention = "mha" if kv == heads else ("mqa" if kv == 1 else "gqa")
    return KVModelShape(num_layers, kv, head_dim, kv_dtype, attention=attention, **common)


# -- sizes ---------------------------------------------------------------------------------------


def format_bytes(n: float) -> str:
    """``134217728`` -> ``"128 MiB"`` (binary units, at most 3 significant decimals)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{int(n)} B"


def estimate_pool_bytes(
    max_tokens: int | None = None,
    *,
    block_size: int = 16,
    num_blocks: int | None = None,
    max_bytes: int | None = None,
    model_shape: Any = None,
) -> int:
    """Bytes of KV tensors a ``KVPool`` of these arguments allocates (0 without a shape).

    Sized like the pool: exactly one of ``max_tokens`` (rounded down to whole
    blocks), ``num_blocks`` or ``max_bytes``; ``model_shape`` as
    :func:`resolve_model_shape` accepts it.

    Raises:
        KVConfigError: not exactly one size, a non-positive size, or a bad shape.
    """
    sizes = {"max_tokens": max_tokens, "num_blocks": num_blocks, "max_bytes": max_bytes}
    given = {k: v for k, v in sizes.items() if v is not None}
    if len(given) != 1:
        raise KVConfigError(
            f"size the pool with exactly one of max_tokens, num_blocks, max_bytes (got {list(given)})"
        )
    for k, v in (*given.items(), ("block_size", block_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise KVConfigError(f"{k} must be a positive int, got {v!r}")
    shape = None if model_shape is None else resolve_model_shape(model_shape)
    if shape is None:
        if max_bytes is not None:
            raise KVConfigError("max_bytes needs a model_shape to convert bytes into blocks")
        return 0
    per_block = shape.bytes_per_block(block_size)
    if max_tokens is not None:
        num_blocks = max_tokens // block_size
    elif max_bytes is not None:
        num_blocks = max_bytes // per_block
    assert num_blocks is not None  # exactly one size was given
    return num_blocks * per_block
