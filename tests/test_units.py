"""One capacity grammar (sim/capacity.py) and model KV shapes (sagellm_kv_cache/model_shapes.py).

Tables: each capacity form -> exact blocks, label and axis value; each bad form ->
KVConfigError with its code and a message fragment; hand-written Hugging Face
config.json files (key subsets of the published ones) -> exact bytes per token.
"""

from __future__ import annotations

import json
import logging
import math

import pytest

from sagellm_kv_cache import KVPool
from sagellm_kv_cache.errors import KVConfigError
from sagellm_kv_cache.model_shapes import (
    PRESETS,
    KVModelShape,
    estimate_pool_bytes,
    model_shape_from_hf_config,
    resolve_model_shape,
)
from sagellm_kv_cache.storage import ModelShape
from sim.config import (
    Capacity,
    ReplayConfig,
    capacity_axis,
    parse_capacity,
    resolve_capacity,
)

BS = 512
LLAMA = "llama-3-8b"  # 128 KiB per token -> 64 MiB per 512-token block
DISTINCT = 1000

# -- capacity grammar ---------------------------------------------------------------------------

# spec, blocks, unit, label, axis_unit, axis value of the resolved block count
GOOD = [
    ("2000", 2000, "blocks", "2000 blocks", "blocks", 2000),
    (2000, 2000, "blocks", "2000 blocks", "blocks", 2000),
    ("10k", 10_000, "blocks", "10k blocks", "blocks", 10_000),
    ("1.5M", 1_500_000, "blocks", "1.5M blocks", "blocks", 1_500_000),
    ("2000b", 2000, "blocks", "2000 blocks", "blocks", 2000),
    ("blocks:2000", 2000, "blocks", "2000 blocks", "blocks", 2000),
    ("5.12Mt", 10_000, "tokens", "5.12 Mt", "M tokens", 5.12),
    ("65536t", 128, "tokens", "65536 tokens", "tokens", 65536),
    ("1000t", 1, "tokens", "1000 tokens", "tokens", 512),  # rounds down to whole blocks
    ("tokens:512k", 1000, "tokens", "512 kt", "k tokens", 512),
    ("40GiB", 640, "bytes", "40 GiB", "GiB", 40),
    (" 40 GiB ", 640, "bytes", "40 GiB", "GiB", 40),
    ("512MB", 7, "bytes", "512 MB", "MB", 7 * 2**26 / 1e6),  # 7.63 blocks -> 7
    ("1.5TiB", 24_576, "bytes", "1.5 TiB", "TiB", 1.5),
    ("bytes:1e9", 14, "bytes", "1000000000 B", "B", 14 * 2**26),
    ("10%", 100, "share", "10 %", "% of distinct blocks", 10),
    ("2.5%", 25, "share", "2.5 %", "% of distinct blocks", 2.5),
    ("0.15%", 1, "share", "0.15 %", "% of distinct blocks", 0.1),  # 1.5 blocks -> 1
    ("150%", 1500, "share", "150 %", "% of distinct blocks", 150),
    ("inf", None, "inf", "inf", "blocks", None),
    (None, None, "inf", "inf", "blocks", None),
]


@pytest.mark.parametrize("spec,blocks,unit,label,axis,value", GOOD)
def test_capacity_forms_resolve_exactly(spec, blocks, unit, label, axis, value):
    cap = resolve_capacity(spec, block_size=BS, model_shape=LLAMA, distinct_blocks=DISTINCT)
    assert (cap.blocks, cap.unit, cap.label, cap.block_size) == (blocks, unit, label, BS)
    assert cap.axis_label == f"capacity ({axis})"
    if blocks is not None:
        assert cap.in_unit(cap.blocks) == pytest.approx(value)
    assert cap.spec == (str(spec).strip() if spec is not None else "inf")


@pytest.mark.parametrize("spec", [g[0] for g in GOOD if g[0] is not None])
def test_parsed_capacities_round_trip_through_text(spec):
    parsed = parse_capacity(spec)
    assert parse_capacity(str(parsed)) == parsed


def test_int_fast_path_equals_the_text_path():
    fast = resolve_capacity(2000, block_size=BS)
    assert fast == resolve_capacity("2000", block_size=BS)
    assert isinstance(fast, Capacity) and fast.in_unit(10) == 10


def test_share_count_is_lazy():
    calls = []

    def distinct():
        calls.append(1)
        return 200

    assert resolve_capacity("2000", block_size=BS, distinct_blocks=distinct).blocks == 2000
    assert calls == []  # a block count never asks for the trace's size
    assert resolve_capacity("10%", block_size=BS, distinct_blocks=distinct).blocks == 20
    assert calls == [1]


def test_resolving_a_resolved_capacity_uses_its_text_at_the_new_block_size():
    cap = resolve_capacity("5.12Mt", block_size=512)
    assert resolve_capacity(cap, block_size=256).blocks == 20_000


BAD = [
    ("-5", "must be positive"),
    ("0", "must be positive"),
    ("-10%", "must be positive"),
    ("0%", "must be positive"),
    ("1.5", "whole number of blocks"),
    ("1.5t", "whole number of tokens"),
    ("1e400", "too large"),
    ("lots", "cannot parse capacity 'lots'"),
    ("5Xb", "unknown suffix 'x'"),
    ("foo:5", "unknown capacity unit 'foo'"),
    ("5PiB", "unknown suffix"),
    (True, "must be a number or a string"),
    ([1], "must be a number or a string"),
    ("100t", "holds no full block (of 512 tokens)"),
    ("1MiB", "holds no full block (of 512 tokens x 131072 bytes per token)"),
    ("0.05%", "holds no full block (of the trace's 1000 distinct blocks)"),
]


@pytest.mark.parametrize("spec,fragment", BAD)
def test_bad_capacities_are_config_errors_naming_the_problem(spec, fragment):
    with pytest.raises(KVConfigError) as info:
        resolve_capacity(spec, block_size=BS, model_shape=LLAMA, distinct_blocks=DISTINCT)
    assert info.value.code == "KV_CONFIG_INVALID"
    assert fragment in info.value.message


@pytest.mark.parametrize("spec", ["lots", "5Xb", "foo:5"])
def test_grammar_errors_list_every_accepted_form(spec):
    with pytest.raises(KVConfigError) as info:
        parse_capacity(spec)
    for form in ("2000", "5.12Mt", "40GiB", "10%", "inf"):
        assert form in info.value.message


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"spec": "40GiB"}, "needs a model shape"),
        ({"spec": "10%"}, "needs the trace"),
        ({"spec": "10%", "distinct_blocks": -1}, "distinct_blocks must be an int >= 0"),
        ({"spec": "10%", "distinct_blocks": lambda: 2.5}, "distinct_blocks must be an int"),
        ({"spec": "2000", "block_size": 0}, "block_size must be a positive int"),
        ({"spec": "2000", "block_size": True}, "block_size must be a positive int"),
        ({"spec": "40GiB", "model_shape": "nope"}, "unknown model shape 'nope'"),
    ],
)
def test_missing_context_is_named(kwargs, fragment):
    kwargs = {"block_size": BS, **kwargs}
    with pytest.raises(KVConfigError) as info:
        resolve_capacity(kwargs.pop("spec"), **kwargs)
    assert info.value.code == "KV_CONFIG_INVALID" and fragment in info.value.message


def test_capacity_axis_shares_a_unit_or_falls_back_to_blocks():
    same = [resolve_capacity(s, block_size=BS, model_shape=LLAMA) for s in ("20GiB", "40GiB")]
    label, to_axis = capacity_axis(same)
    assert label == "capacity (GiB)" and to_axis(640) == pytest.approx(40.0)
    mixed = [
        resolve_capacity(s, block_size=BS, model_shape=LLAMA, distinct_blocks=DISTINCT)
        for s in ("1%", "5Mt", "40GiB", "inf")
    ]
    label, to_axis = capacity_axis(mixed)
    assert label == "capacity (blocks)" and to_axis(640) == 640


def test_replay_config_resolves_shares_and_custom_shapes():
    cfg = ReplayConfig(capacity="10%")
    assert cfg.capacity_blocks(BS, distinct_blocks=DISTINCT) == 100
    cfg = ReplayConfig(capacity="40GiB", model_shape="32,8,128,bf16")
    assert cfg.capacity_blocks(BS) == 640
    assert cfg.resolve_capacity(BS).label == "40 GiB"
    with pytest.raises(KVConfigError, match="unknown model shape"):
        ReplayConfig(model_shape="32,8")
    cap = resolve_capacity("5.12Mt", block_size=BS)
    assert ReplayConfig(capacity=cap).capacity == "5.12Mt"


def test_parse_capacity_keeps_its_old_interface():
    cap = parse_capacity("40GiB")
    assert (cap.amount, cap.unit, cap.is_infinite) == (40 * 2**30, "bytes", False)
    assert cap.to_blocks(512, "llama-3-8b") == 640
    assert parse_capacity("10%").to_blocks(512, distinct_blocks=50) == 5
    assert parse_capacity(math.inf).is_infinite and parse_capacity("inf").to_blocks(16) is None


# -- model shapes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,bytes_per_token",
    [
        ("llama-3-8b", 131_072),
        ("qwen2.5-7b", 57_344),
        ("deepseek-v3", 61 * 576 * 2),
        ("32,8,128,bf16", 131_072),
        ("32, 8, 128, fp8", 65_536),
        ("28,4,128", 57_344),  # dtype defaults to bf16
        ("2,2,8,float32", 2 * 2 * 2 * 8 * 4),
    ],
)
def test_presets_and_custom_strings(spec, bytes_per_token):
    shape = resolve_model_shape(spec)
    assert isinstance(shape, KVModelShape) and isinstance(shape, ModelShape)
    assert shape.bytes_per_token == bytes_per_token
    assert shape.bytes_per_block(16) == 16 * bytes_per_token


def test_presets_keep_model_shape_named_geometry():
    for name in ("llama-3-8b", "llama-3-70b", "qwen2.5-7b", "qwen2.5-72b", "mistral-7b", "tiny"):
        old = ModelShape.named(name)
        new = PRESETS[name]
        assert (new.num_layers, new.num_kv_heads, new.head_dim, new.dtype) == (
            old.num_layers,
            old.num_kv_heads,
            old.head_dim,
            old.dtype,
        )


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("nope", "unknown model shape 'nope'"),
        ("32,0,128,bf16", "kv_heads must be positive"),
        ("32,8,128,int3", "unsupported KV dtype 'int3'"),
        ("missing/config.json", "no such file"),
        (3.5, "must be a string or a ModelShape"),
    ],
)
def test_bad_model_shapes(spec, fragment):
    with pytest.raises(KVConfigError) as info:
        resolve_model_shape(spec)
    assert info.value.code == "KV_CONFIG_INVALID" and fragment in info.value.message


def test_unknown_shape_message_lists_the_forms():
    with pytest.raises(KVConfigError) as info:
        resolve_model_shape("llama-9")
    msg = info.value.message
    assert "llama-3-8b" in msg and "32,8,128,bf16" in msg and "config.json" in msg


# Key subsets of the published config.json files (hand-written for these tests).
HF = {
    "llama-3-8b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "torch_dtype": "bfloat16",
    },
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "sliding_window": 131072,
        "use_sliding_window": False,
        "max_window_layers": 28,
        "torch_dtype": "bfloat16",
    },
    "deepseek-v3": {
        "model_type": "deepseek_v3",
        "hidden_size": 7168,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "num_hidden_layers": 61,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 128,
        "v_head_dim": 128,
        "torch_dtype": "bfloat16",
    },
    "gemma-2-9b": {
        "model_type": "gemma2",
        "hidden_size": 3584,
        "head_dim": 256,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "num_hidden_layers": 42,
        "sliding_window": 4096,
        "torch_dtype": "float32",
    },
    "gemma-3-4b": {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": {
            "model_type": "gemma3_text",
            "hidden_size": 2560,
            "head_dim": 256,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "num_hidden_layers": 34,
            "sliding_window": 1024,
        },
        "torch_dtype": "bfloat16",
    },
    "gemma-3-1b": {
        "model_type": "gemma3_text",
        "hidden_size": 1152,
        "head_dim": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "num_hidden_layers": 6,
        "sliding_window": 512,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
        "torch_dtype": "bfloat16",
    },
    "mistral-7b-v0.1": {
        "model_type": "mistral",
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_hidden_layers": 32,
        "sliding_window": 4096,
        "torch_dtype": "bfloat16",
    },
    "mistral-7b-v0.3": {
        "model_type": "mistral",
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_hidden_layers": 32,
        "sliding_window": None,
        "torch_dtype": "bfloat16",
    },
}

# name: bytes/token (every KV layer), full-attention bytes/token, attention, sliding layers
HF_EXPECTED = {
    "llama-3-8b": (131_072, 131_072, "gqa", 0),
    "qwen2.5-7b": (57_344, 57_344, "gqa", 0),  # use_sliding_window: false
    "deepseek-v3": (61 * 576 * 2, 61 * 576 * 2, "mla", 0),  # one 512+64 latent per layer
    "gemma-2-9b": (2 * 42 * 8 * 256 * 4, 2 * 21 * 8 * 256 * 4, "gqa", 21),  # even layers slide
    "gemma-3-4b": (2 * 34 * 4 * 256 * 2, 2 * 5 * 4 * 256 * 2, "gqa", 29),  # 1 global in 6
    "gemma-3-1b": (2 * 6 * 1 * 256 * 2, 2 * 1 * 256 * 2, "mqa", 5),
    "mistral-7b-v0.1": (131_072, 0, "gqa", 32),  # every layer slides
    "mistral-7b-v0.3": (131_072, 131_072, "gqa", 0),
}


@pytest.mark.parametrize("name", sorted(HF))
def test_hf_configs_give_exact_bytes_per_token(tmp_path, name):
    path = tmp_path / name / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(HF[name]))
    total, full, attention, sliding = HF_EXPECTED[name]
    for spec in (str(path), path.parent, str(path.parent)):  # the file or its folder
        shape = resolve_model_shape(spec)
        assert shape.bytes_per_token == total
        assert shape.full_attention_bytes_per_token == full
        assert (shape.attention, shape.num_sliding_layers) == (attention, sliding)
        assert shape.source == str(path)
    assert model_shape_from_hf_config(HF[name]).bytes_per_token == total  # a dict works too
    json.dumps(shape.to_dict())  # plain JSON for config.json
    assert resolve_capacity("40GiB", block_size=16, model_shape=str(path)).blocks == (
        40 * 2**30 // (16 * total)
    )


def test_hf_config_details(tmp_path):
    g3 = model_shape_from_hf_config(HF["gemma-3-4b"])
    assert (g3.sliding_window, g3.sliding_window_bytes) == (1024, 29 * 1024 * 2 * 4 * 256 * 2)
    ds = model_shape_from_hf_config(HF["deepseek-v3"], dtype="fp8")
    assert (ds.kv_lora_rank, ds.qk_rope_head_dim, ds.bytes_per_token) == (512, 64, 61 * 576)
    qwen_sliding = {**HF["qwen2.5-7b"], "use_sliding_window": True, "max_window_layers": 20}
    assert model_shape_from_hf_config(qwen_sliding).num_sliding_layers == 8
    hybrid = {**HF["llama-3-8b"], "num_hidden_layers": 4}
    hybrid["layer_types"] = ["linear_attention"] * 3 + ["full_attention"]
    shape = model_shape_from_hf_config(hybrid)
    assert (shape.num_layers, shape.num_layers_without_kv) == (1, 3)
    assert "llama-3-8b" in resolve_model_shape("llama-3-8b").describe()


@pytest.mark.parametrize(
    "spec,text",
    [
        ("llama-3-8b", "llama-3-8b"),
        ("32,8,128,bf16", "32,8,128,bfloat16"),
        (ModelShape(2, 2, 8, "float16"), "2,2,8,float16"),
        ("deepseek-v3", "deepseek-v3"),
    ],
)
def test_str_of_a_shape_resolves_back_to_it(spec, text):
    shape = resolve_model_shape(spec)
    assert str(shape) == text and resolve_model_shape(str(shape)) == shape


@pytest.mark.parametrize(
    "edit,fragment",
    [
        ({"num_hidden_layers": None}, "missing num_hidden_layers"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
        ({"num_attention_heads": 7}, "not a multiple of 7 heads"),
        ({"torch_dtype": "int4"}, "unsupported KV dtype"),
        ({"layer_types": ["full_attention"]}, "layer_types must list 32"),
        ({"layer_types": ["mamba"] * 32}, "unknown layer type 'mamba'"),
    ],
)
def test_bad_hf_configs(edit, fragment):
    with pytest.raises(KVConfigError) as info:
        model_shape_from_hf_config({**HF["llama-3-8b"], **edit})
    assert info.value.code == "KV_CONFIG_INVALID" and fragment in info.value.message


def test_unreadable_config_files(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(KVConfigError, match="not a readable JSON model config"):
        resolve_model_shape(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(KVConfigError, match="must be a JSON object"):
        resolve_model_shape(str(bad))


# -- pool sizing --------------------------------------------------------------------------------


def test_estimate_bytes_matches_what_the_pool_allocates(caplog):
    assert KVPool.estimate_bytes(65536, model_shape="llama-3-8b") == 8 * 2**30
    assert estimate_pool_bytes(num_blocks=4, block_size=16, model_shape="tiny") == 4 * 16 * 128
    assert estimate_pool_bytes(max_bytes=10_000, block_size=16, model_shape="tiny") == 8192
    assert estimate_pool_bytes(4096) == 0  # metadata-only: no tensors
    with caplog.at_level(logging.INFO, logger="sagellm_kv_cache.pool"):
        pool = KVPool(max_tokens=256, block_size=16, model_shape="2,2,8,fp16")
    assert pool.storage.kv.numel() * pool.storage.kv.element_size() == KVPool.estimate_bytes(
        256, block_size=16, model_shape="2,2,8,fp16"
    )
    assert (
        "KVPool allocates 32 KiB of KV tensors on cpu: 16 blocks x 16 tokens x 128 bytes/token"
        in caplog.text
    )


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({}, "exactly one of"),
        ({"max_tokens": 16, "num_blocks": 1}, "exactly one of"),
        ({"max_tokens": 0}, "max_tokens must be a positive int"),
        ({"num_blocks": True}, "num_blocks must be a positive int"),
        ({"max_bytes": 100}, "max_bytes needs a model_shape"),
        ({"max_tokens": 16, "block_size": 0}, "block_size must be a positive int"),
    ],
)
def test_estimate_bytes_rejects_what_the_pool_rejects(kwargs, fragment):
    with pytest.raises(KVConfigError, match=fragment):
        KVPool.estimate_bytes(**kwargs)


def test_mla_pool_tensors_hold_exactly_the_latent():
    pool = KVPool(num_blocks=2, block_size=4, model_shape=PRESETS["deepseek-v3"], dtype="fp8")
    assert pool.storage.kv.numel() == 2 * 4 * 61 * 576  # one byte per fp8 element
