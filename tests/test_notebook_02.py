"""Notebook 02 runs top to bottom without an error and draws its figures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "02-trace-replay.ipynb"


def test_notebook_02_executes(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel runs in tmp_path; the project is importable through PYTHONPATH
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [
        out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    ]
    errors = [out for out in outputs if out.get("output_type") == "error"]
    assert not errors, errors
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # per-minute hit ratio and the sweep figure
    text = "".join(
        o.get("text", "") + "".join(o.get("data", {}).get("text/plain", "")) for o in outputs
    )
    assert "infinite" in text and "lru" in text


def test_notebook_02_is_built_from_its_script():
    """The committed notebook's sources equal the builder script's cells."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "build_02", ROOT / "notebooks" / "build_02_trace_replay.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert [c.source for c in nb.cells] == [c.source for c in module.CELLS]
