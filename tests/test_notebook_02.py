"""Notebook 02 runs top to bottom without an error and draws its figures."""

from __future__ import annotations

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from tests._notebooks import ROOT, execute_notebook, load_builder  # noqa: E402

NOTEBOOK = ROOT / "notebooks" / "02-trace-replay.ipynb"


def test_notebook_02_executes(tmp_path, monkeypatch):
    outputs = execute_notebook(NOTEBOOK, tmp_path, monkeypatch)
    errors = [out for out in outputs if out.get("output_type") == "error"]
    assert not errors, errors
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # per-minute hit ratio and the sweep figure
    text = "".join(
        o.get("text", "") + "".join(o.get("data", {}).get("text/plain", "")) for o in outputs
    )
    assert "infinite" in text and "lru" in text


def test_notebook_02_is_built_from_its_script(monkeypatch):
    """The committed notebook's sources equal the builder script's cells."""
    module = load_builder(ROOT / "notebooks" / "build_02_trace_replay.py", monkeypatch)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert [c.source for c in nb.cells] == [c.source for c in module.CELLS]
