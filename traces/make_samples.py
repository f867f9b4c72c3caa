"""Regenerate the synthetic sample traces in ``traces/data`` (deterministic).

No Qwen-Bailian or BurstGPT file can be shipped here, so these two samples are
*synthetic*: drawn by :func:`traces.synthetic.generate_trace` with the fixed
arguments below and written in those formats. Run ``python -m traces.make_samples``
to rewrite them; tests check the shipped files equal a fresh generation.
"""

from __future__ import annotations

import random
from pathlib import Path

from .io import write_trace
from .synthetic import generate_trace

__all__ = ["BAILIAN_SAMPLE_ARGS", "BURSTGPT_SAMPLE_ARGS", "write_samples"]

BAILIAN_SAMPLE_ARGS = dict(
    num_requests=400,
    seed=2025,
    rate=4.0,
    block_size=16,
    own_tokens_mean=300.0,
    output_tokens_mean=120.0,
    num_system_prompts=12,
    system_prompt_tokens=600,
    system_prompt_prob=0.7,
    num_documents=20,
    document_tokens=1500,
    document_prob=0.2,
    multi_turn_prob=0.45,
    max_open_sessions=64,
    min_think_s=5.0,
)
BURSTGPT_SAMPLE_ARGS = dict(num_requests=500, seed=2026, rate=0.5, own_tokens_mean=400.0)


def _bailian_sample(path: Path) -> None:
    import polars as pl

    table = generate_trace(**BAILIAN_SAMPLE_ARGS)
    table = table.with_columns(pl.col("arrival_s").round(3))  # readable timestamps
    write_trace(table, path, "bailian")


def _burstgpt_sample(path: Path) -> None:
    table = generate_trace(**BURSTGPT_SAMPLE_ARGS)
    rng = random.Random("burstgpt-sample")
    lines = ["Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type"]
    for t, n_in, n_out in table.select("arrival_s", "input_length", "output_length").iter_rows():
        model = "GPT-4" if rng.random() < 0.2 else "ChatGPT"
        log = "API log" if rng.random() < 0.3 else "Conversation log"
        lines.append(f"{round(t, 3)},{model},{n_in},{n_out},{n_in + n_out},{log}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_samples(directory: str | Path | None = None) -> list[Path]:
    """Write ``bailian_synthetic_sample.jsonl`` and ``burstgpt_synthetic_sample.csv``."""
    d = Path(directory) if directory is not None else Path(__file__).resolve().parent / "data"
    out = [d / "bailian_synthetic_sample.jsonl", d / "burstgpt_synthetic_sample.csv"]
    _bailian_sample(out[0])
    _burstgpt_sample(out[1])
    return out


if __name__ == "__main__":  # pragma: no cover
    for p in write_samples():
        print(p)
