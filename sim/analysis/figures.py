"""Which figures a run can draw, and drawing them: the registry ``visualize`` and ``report`` use.

A figure needs one part of a :class:`~sim.analysis.runs.Run`:

==================  ===========  ==============================================
name                needs        figure
==================  ===========  ==============================================
heatmap             accesses     blocks (popularity rank) x time
position_heatmap    accesses     prompt positions x time
timeline            accesses     hits and misses per window
reuse               accesses     reuse-distance histogram
reuse_cdf           accesses     reuse-distance CDF
reuse_time_cdf      accesses     reuse-time CDF
hot                 accesses     most accessed blocks
position            accesses     block hit ratio by prompt position
hit_ratio_time      records      token/request hit ratio over time
hit_vs_length       records      token hit ratio by prompt length
session_reuse       records      token hit ratio by turn within a session
footprint           records      blocks cached over time, capacity
capacity_curve      curve        hit ratio vs capacity (``summary.json``)
queue_ttft          timeline     TTFT, queueing, blocks in use (concurrent)
==================  ===========  ==============================================
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .runs import Run

__all__ = ["FIGURES", "available", "draw", "write_figures"]


def _acc(fn_name: str, **kw: Any) -> Callable[..., Any]:
    def draw(run: Run, window_s: float | None = None) -> Any:
        from . import plots

        fn = getattr(plots, fn_name)
        extra = dict(kw)
        if fn_name in ("plot_heatmap", "plot_timeline"):
            extra["window_s"] = window_s
        return fn(run.accesses, **extra)

    return draw


def _reuse_cdf(by: str) -> Callable[..., Any]:
    def draw(run: Run, window_s: float | None = None) -> Any:
        from .request_plots import plot_reuse_cdf

        return plot_reuse_cdf(run.accesses, by=by)

    return draw


def _hit_ratio_time(run: Run, window_s: float | None = None) -> Any:
    from .request_plots import plot_hit_ratio_over_time

    return plot_hit_ratio_over_time(run.records, window_s=window_s)


def _hit_vs_length(run: Run, window_s: float | None = None) -> Any:
    from .request_plots import plot_hit_vs_prompt_length

    return plot_hit_vs_prompt_length(run.records)


def _session_reuse(run: Run, window_s: float | None = None) -> Any:
    from .request_plots import plot_session_reuse

    return plot_session_reuse(run.records, inferred=run.sessions_inferred)


def _footprint(run: Run, window_s: float | None = None) -> Any:
    from .request_plots import plot_cache_footprint

    return plot_cache_footprint(run.records, capacity_blocks=run.capacity_blocks)


def _curve(run: Run, window_s: float | None = None) -> Any:
    from .plots import plot_capacity_curve

    s = run.summary or {}
    this_run = None
    if isinstance(s.get("capacity_blocks"), int) and "token_hit_ratio" in s:
        this_run = (s["capacity_blocks"], s["token_hit_ratio"])
    return plot_capacity_curve(
        s["curve"],
        this_run=this_run,
        block_size=s.get("block_size"),
        mode=s.get("mode", "sequential"),
    )


def _queue_ttft(run: Run, window_s: float | None = None) -> Any:
    from .plots import plot_queue_ttft

    return plot_queue_ttft(run.records, run.timeline, run.capacity_blocks)


def _has(part: str) -> Callable[[Run], bool]:
    def check(run: Run) -> bool:
        if part == "accesses":
            return run.accesses is not None
        if part == "records":
            return run.records is not None and "hit_blocks" in run.records.columns
        if part == "curve":
            return bool((run.summary or {}).get("curve"))
        return (
            run.timeline is not None
            and run.records is not None
            and {"ttft_s", "queue_s", "arrival_s"} <= set(run.records.columns)
        )

    return check


#: name -> (what it needs, predicate on a Run, draw(run, window_s) -> Figure)
FIGURES: dict[str, tuple[str, Callable[[Run], bool], Callable[..., Any]]] = {
    "heatmap": ("accesses", _has("accesses"), _acc("plot_heatmap")),
    "position_heatmap": ("accesses", _has("accesses"), _acc("plot_heatmap", by="position")),
    "timeline": ("accesses", _has("accesses"), _acc("plot_timeline")),
    "reuse": ("accesses", _has("accesses"), _acc("plot_reuse")),
    "reuse_cdf": ("accesses", _has("accesses"), _reuse_cdf("distance")),
    "reuse_time_cdf": ("accesses", _has("accesses"), _reuse_cdf("time")),
    "hot": ("accesses", _has("accesses"), _acc("plot_hot_blocks")),
    "position": ("accesses", _has("accesses"), _acc("plot_position")),
    "hit_ratio_time": ("records", _has("records"), _hit_ratio_time),
    "hit_vs_length": ("records", _has("records"), _hit_vs_length),
    "session_reuse": ("records", _has("records"), _session_reuse),
    "footprint": ("records", _has("records"), _footprint),
    "capacity_curve": ("curve", _has("curve"), _curve),
    "queue_ttft": ("timeline", _has("timeline"), _queue_ttft),
}


def available(run: Run) -> list[str]:
    """Names of the figures ``run`` can draw, in registry order."""
    return [name for name, (_, ok, _) in FIGURES.items() if ok(run)]


def draw(run: Run, name: str, *, window_s: float | None = None) -> Any:
    """Draw figure ``name`` of ``run``.

    Raises:
        KVInvalidInputError: unknown name, or the run lacks what the figure needs.
    """
    from sagellm_kv_cache.errors import KVInvalidInputError

    if name not in FIGURES:
        raise KVInvalidInputError(f"unknown figure {name!r}; known: {', '.join(FIGURES)}")
    needs, ok, fn = FIGURES[name]
    if not ok(run):
        raise KVInvalidInputError(
            f"figure {name!r} needs {needs}, which {run.path} does not have "
            f"(it can draw: {', '.join(available(run)) or 'nothing'})"
        )
    return fn(run, window_s=window_s)


def write_figures(
    run: Run,
    names: list[str],
    folder: str | Path,
    *,
    dpi: int = 120,
    window_s: float | None = None,
    suffix: str = ".png",
) -> dict[str, Path]:
    """Draw each of ``names`` into ``folder/<name><suffix>``; returns name -> path."""
    from .plots import save_figure

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        out[name] = save_figure(
            draw(run, name, window_s=window_s), folder / f"{name}{suffix}", dpi=dpi
        )
    return out
