"""Analyses and figures of any run: access tables, replay records, sweeps, tiers.

The one home of the workbench's DataFrame analyses and plots; the CLI and the
notebooks import from here. Nothing here imports matplotlib or
polars at import time (each function imports what it draws with), so
``import sim`` stays light.

- :mod:`sim.analysis.plots`: every figure (a DataFrame in, an optional ``ax``, a Figure out).
"""
