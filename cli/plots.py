"""Figures of an access table: moved to :mod:`sim.analysis.plots` (re-exported here).

New code imports from ``sim.analysis.plots``; these names stay for callers of
the earlier location.
"""

from __future__ import annotations

from sim.analysis.plots import (
    PLOT_TYPES,
    plot_heatmap,
    plot_hot_blocks,
    plot_position,
    plot_reuse,
    plot_timeline,
    save_figure,
)

__all__ = [
    "PLOT_TYPES",
    "plot_heatmap",
    "plot_hot_blocks",
    "plot_position",
    "plot_reuse",
    "plot_timeline",
    "save_figure",
]
