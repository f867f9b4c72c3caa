"""The iteration-level engine against vLLM v1's own scheduler, step for step (CPU only).

Drives ``vllm.v1.core.sched.scheduler.Scheduler`` (built as vLLM's
``tests/v1/core/utils.py::create_scheduler`` builds it: a ``VllmConfig`` with a
``SchedulerConfig``, a ``ModelConfig`` from a local directory holding a minimal
``config.json``, a ``CacheConfig`` and a ``KVCacheConfig`` with one
``FullAttentionSpec`` group) with a fake model runner: every request whose prompt
(or recomputation) caught up this step, and every decode, samples one token
(a token of its own, so generated blocks hit only their own request, as the
engine's ``("gen", row, k)`` hashes do); a prefill chunk that ends mid-prompt
samples nothing. Requests are added at their arrival step; a step takes one time
unit. The same trace rows, pool size, budget and ``max_num_seqs`` go to
``sim.iteration_run.simulate_iteration`` with a constant step cost of 1 s, and the
first-token step and finish step of each request are compared.

Prompts are made from the trace's block hashes: a full block with hash ``h`` holds
``block_size`` copies of a token numbered after ``h`` (so two prompts share vLLM
block hashes exactly where they share trace hashes), the partial last block tokens
of the request's own. vLLM reserves one null block, so it gets ``blocks + 1``.

Not run in CI (vLLM is not a dependency): without vLLM it says so, writes a JSON
that says it skipped, and exits 0.
Install it into a separate venv (no CUDA torch needed)::

    python -m venv --system-site-packages /tmp/vllmenv
    /tmp/vllmenv/bin/pip install --no-deps vllm==0.11.0   # then the pure-Python deps it imports

``--random-cases N`` also runs N small random traces (``random_case``: shared
prefixes, blocks of 4-16 tokens, tight pools and budgets) through both and counts
the requests that differ. Known residue there: vLLM keeps a block's hash on every
block computed for it (a duplicate, e.g. a block-aligned prompt recomputing its last
block), so when the first copy is evicted a later request still hits the duplicate;
the library's pool keeps one block per hash, so the engine misses it.

Usage::

    /tmp/vllmenv/bin/python benchmarks/compare_vllm_scheduler.py \\
        [--requests 300] [--blocks 400] [--budget 2048] [--max-seqs 64] [--steps-per-s 20]
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time

from _util import parse_args, print_table, write_json

_GEN_BASE = 2_000_000_000
_TAIL_BASE = 1_000_000_000


def _hash(obj) -> bytes:
    """vLLM's block hash function slot: Python's hash as 8 bytes (deterministic for ints)."""
    return hash(obj).to_bytes(8, "little", signed=True)


def _vllm_scheduler(
    block_size: int, blocks: int, budget: int, max_seqs: int, max_len: int, chunked: bool
):
    """vLLM's ``Scheduler`` as its own tests build it (module doc)."""
    import torch
    from vllm.config import CacheConfig, DeviceConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    d = tempfile.mkdtemp(prefix="fake_model_")
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "num_hidden_layers": 1,
        "vocab_size": 32000,
        "max_position_embeddings": max_len,
        "dtype": "float16",
    }
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    sched_cfg = SchedulerConfig(
        max_num_seqs=max_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_len,
        enable_chunked_prefill=chunked,
    )
    model_cfg = ModelConfig(model=d, dtype="float16", seed=0, skip_tokenizer_init=True)
    cache_cfg = CacheConfig(
        block_size=block_size,
        gpu_memory_utilization=0.9,
        swap_space=0,
        cache_dtype="auto",
        enable_prefix_caching=True,
    )
    vcfg = VllmConfig(
        scheduler_config=sched_cfg,
        model_config=model_cfg,
        cache_config=cache_cfg,
        device_config=DeviceConfig(device="cpu"),
    )
    kv_cfg = KVCacheConfig(
        num_blocks=blocks + 1,  # + vLLM's null block
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(["layer"], FullAttentionSpec(block_size, 1, 1, torch.float32, False))
        ],
    )
    cache_cfg.num_gpu_blocks = blocks + 1
    return Scheduler(
        vllm_config=vcfg,
        kv_cache_config=kv_cfg,
        log_stats=False,
        structured_output_manager=StructuredOutputManager(vcfg),
    )


def run_vllm(
    rows: list[dict], block_size: int, blocks: int, budget: int, max_seqs: int, chunked: bool
) -> dict:
    """Per request ``(first_token_step_end, finish_step_end, preemptions)`` under vLLM."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    max_len = max(r["input_length"] + r["output_length"] for r in rows) + block_size
    if not chunked:  # vLLM wants the whole context in one budget (rows are filtered)
        max_len = budget
    sched = _vllm_scheduler(block_size, blocks, budget, max_seqs, max_len, chunked)
    init_none_hash(_hash)
    hasher = get_request_block_hasher(block_size, _hash)
    tok_of: dict = {}
    reqs = []
    for i, r in enumerate(rows):
        full = r["input_length"] // block_size
        toks: list[int] = []
        for h in r["block_hashes"][:full]:
            t = tok_of.setdefault(h, len(tok_of) + 1)
            toks.extend([t] * block_size)
        toks.extend([_TAIL_BASE + i] * (r["input_length"] - len(toks)))
        sp = SamplingParams(max_tokens=r["output_length"], ignore_eos=True)
        reqs.append(
            Request(
                request_id=str(i),
                prompt_token_ids=toks,
                sampling_params=sp,
                pooling_params=None,
                eos_token_id=None,
                arrival_time=float(r["arrival"]),
                block_hasher=hasher,
            )
        )
    order = sorted(range(len(rows)), key=lambda i: rows[i]["arrival"])
    n = len(rows)
    first = [math.nan] * n
    finish = [math.nan] * n
    got = [0] * n
    p = 0
    now = 0
    steps = preemptions = 0
    while p < n or sched.get_num_unfinished_requests():
        if not sched.get_num_unfinished_requests():
            now = max(now, rows[order[p]]["arrival"])
        while p < n and rows[order[p]]["arrival"] <= now:
            sched.add_request(reqs[order[p]])
            p += 1
        if not sched.get_num_unfinished_requests():
            continue
        before = {r.request_id for r in sched.running}
        out = sched.schedule()
        preemptions += sum(1 for r in sched.waiting if r.request_id in before)
        ids = list(out.num_scheduled_tokens)
        sampled = []
        for rid in ids:
            req = sched.requests[rid]
            sampled.append(
                [_GEN_BASE + int(rid)] if req.num_computed_tokens >= req.num_tokens else []
            )
        mro = ModelRunnerOutput(
            req_ids=ids,
            req_id_to_index={rid: k for k, rid in enumerate(ids)},
            sampled_token_ids=sampled,
            logprobs=None,
            prompt_logprobs_dict={},
            pooler_output=[],
        )
        sched.update_from_output(out, mro)
        if not ids:
            continue
        steps += 1
        end = now + 1
        for rid, s in zip(ids, sampled):
            if s:
                i = int(rid)
                got[i] += 1
                if got[i] == 1:
                    first[i] = end
                if got[i] >= rows[i]["output_length"]:
                    finish[i] = end
        now = end
    return {"first": first, "finish": finish, "steps": steps, "preemptions": preemptions}


def _table(rows: list[dict], block_size: int):
    import polars as pl

    return pl.DataFrame(
        {
            "request_id": [str(i) for i in range(len(rows))],
            "arrival_s": [float(r["arrival"]) for r in rows],
            "input_length": [r["input_length"] for r in rows],
            "output_length": [r["output_length"] for r in rows],
            "block_hashes": [list(r["block_hashes"]) for r in rows],
            "block_size": [block_size] * len(rows),
        }
    )


def run_ours(
    rows: list[dict], block_size: int, blocks: int, budget: int, max_seqs: int, chunked: bool
) -> dict:
    from sim.iteration_run import simulate_iteration

    res = simulate_iteration(
        _table(rows, block_size),
        blocks,
        "lru",
        cost="linear:step_overhead_s=1,prefill_overhead_s=0,prefill_s_per_token=0,decode_step_s=0",
        max_num_seqs=max_seqs,
        max_num_batched_tokens=budget,
        chunked_prefill=chunked,
    )
    rec = res.records
    return {
        "first": rec["first_token_s"].to_list(),
        "finish": rec["finish_s"].to_list(),
        "steps": res.stats["num_steps"],
        "preemptions": res.stats["preemptions"],
    }


def load_rows(
    n: int, steps_per_s: float, blocks: int, budget: int | None = None
) -> tuple[list[dict], int]:
    """The bundled trace's first rows that can ever run in ``blocks`` (and, without
    chunked prefill, whose context fits ``budget``), arrivals in steps."""
    from traces import DEFAULT_TRACE, read_trace

    t = read_trace(DEFAULT_TRACE)
    bs = int(t["block_size"][0])
    rows = []
    for r in t.iter_rows(named=True):
        out = max(1, int(r["output_length"]))
        if -(-(r["input_length"] + out - 1) // bs) > blocks:
            continue
        if budget is not None and r["input_length"] + out > budget:
            continue
        rows.append(
            {
                "arrival": math.floor(r["arrival_s"] * steps_per_s),
                "input_length": int(r["input_length"]),
                "output_length": out,
                "block_hashes": list(r["block_hashes"]),
            }
        )
        if len(rows) == n:
            break
    return rows, bs


def random_case(seed: int) -> tuple:
    """A small random trace and settings (shared prefixes, small blocks, tight pools and
    budgets, chunked prefill on in 70% of cases): ``(rows, block_size, blocks, budget,
    max_seqs, chunked)``."""
    import random

    rng = random.Random(seed)
    bs = rng.choice([4, 8, 16])
    prefixes = [[rng.randrange(10**6) for _ in range(rng.randint(0, 6))] for _ in range(4)]
    rows, t = [], 0
    for _ in range(rng.randint(5, 40)):
        t += rng.choice([0, 0, 0, 1, 2, 5])
        n = rng.randint(1, 12 * bs)
        ids = rng.choice(prefixes)[: n // bs]
        ids += [10**7 + rng.randrange(10**6) for _ in range(n // bs - len(ids))]
        chain, h = [], 0
        for x in ids:  # prefix hashes: equal exactly where the prefixes are
            h = hash((h, x))
            chain.append(h)
        out = rng.choice([1, 1, 2, 3, 5, 10, 20, 40])
        rows.append({"arrival": t, "input_length": n, "output_length": out, "block_hashes": chain})
    need = max(-(-(r["input_length"] + r["output_length"] - 1) // bs) for r in rows)
    blocks = rng.randint(need, need * 3)
    budget = rng.choice([bs, 2 * bs, 3 * bs + 1, 64, 1000])
    seqs = rng.choice([1, 2, 3, 8, 64])
    chunked = rng.random() < 0.7
    budget = max(budget, seqs)  # vLLM's SchedulerConfig wants budget >= max_num_seqs
    if not chunked:
        budget = max(budget, max(r["input_length"] + r["output_length"] for r in rows))
    return rows, bs, blocks, budget, seqs, chunked


def run_random(cases: int) -> dict:
    """``cases`` random traces through both schedulers: how many cases and requests differ."""
    out = {"cases": cases, "cases_differing": 0, "requests": 0, "requests_differing": 0}
    out["preemptions_vllm"] = 0
    for seed in range(cases):
        rows, bs, blocks, budget, seqs, chunked = random_case(seed)
        v = run_vllm(rows, bs, blocks, budget, seqs, chunked)
        o = run_ours(rows, bs, blocks, budget, seqs, chunked)
        bad = sum(
            1
            for k in range(len(rows))
            if (v["first"][k], v["finish"][k]) != (o["first"][k], o["finish"][k])
        )
        out["requests"] += len(rows)
        out["requests_differing"] += bad
        out["cases_differing"] += bad > 0
        out["preemptions_vllm"] += v["preemptions"]
    return out


def main() -> None:
    a = parse_args(
        __doc__,
        requests=300,
        blocks=400,
        budget=2048,
        max_seqs=64,
        steps_per_s=(20.0, "trace seconds -> steps"),
        no_chunked=(False, "chunked prefill off"),
        random_cases=(0, "also compare on this many small random traces (module doc)"),
    )
    try:
        import vllm
    except ImportError:
        msg = "vLLM is not installed: skipping (see the module doc for a venv)"
        print(msg)
        write_json("compare_vllm_scheduler", {"settings": vars(a), "skipped": msg})
        return
    rnd = run_random(a.random_cases) if a.random_cases else None
    if rnd:
        print("random traces:", rnd)
    chunked = not a.no_chunked
    rows, bs = load_rows(a.requests, a.steps_per_s, a.blocks, None if chunked else a.budget)
    t0 = time.process_time()
    v = run_vllm(rows, bs, a.blocks, a.budget, a.max_seqs, chunked)
    t1 = time.process_time()
    o = run_ours(rows, bs, a.blocks, a.budget, a.max_seqs, chunked)
    t2 = time.process_time()
    n = len(rows)
    ft = sum(1 for x, y in zip(v["first"], o["first"]) if x == y)
    fi = sum(1 for x, y in zip(v["finish"], o["finish"]) if x == y)
    both = sum(
        1 for k in range(n) if v["first"][k] == o["first"][k] and v["finish"][k] == o["finish"][k]
    )
    diff = [
        {"row": k, "vllm": (v["first"][k], v["finish"][k]), "ours": (o["first"][k], o["finish"][k])}
        for k in range(n)
        if v["first"][k] != o["first"][k] or v["finish"][k] != o["finish"][k]
    ]
    table = [
        {"figure": "requests", "value": n},
        {"figure": "first-token step equal %", "value": f"{100 * ft / n:.1f}"},
        {"figure": "finish step equal %", "value": f"{100 * fi / n:.1f}"},
        {"figure": "both equal %", "value": f"{100 * both / n:.1f}"},
        {"figure": "steps vllm / ours", "value": f"{v['steps']} / {o['steps']}"},
        {"figure": "preemptions vllm / ours", "value": f"{v['preemptions']} / {o['preemptions']}"},
        {"figure": "cpu s vllm / ours", "value": f"{t1 - t0:.1f} / {t2 - t1:.1f}"},
    ]
    print_table(table, f"vLLM v1 scheduler vs iteration engine ({vars(a)})")
    for d in diff[:10]:
        print("differs:", d)
    import vllm

    write_json(
        "compare_vllm_scheduler",
        {
            "settings": vars(a),
            "vllm_version": vllm.__version__,
            "requests": n,
            "first_token_match": ft / n,
            "finish_match": fi / n,
            "both_match": both / n,
            "steps": {"vllm": v["steps"], "ours": o["steps"]},
            "preemptions": {"vllm": v["preemptions"], "ours": o["preemptions"]},
            "differences": diff[:50],
            "random_traces": rnd,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
