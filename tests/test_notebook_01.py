"""Notebook 01 runs top to bottom without an error."""

from __future__ import annotations

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from tests._notebooks import ROOT, execute_notebook  # noqa: E402

NOTEBOOK = ROOT / "notebooks" / "01-access-patterns.ipynb"


def test_notebook_01_executes(tmp_path, monkeypatch):
    outputs = execute_notebook(NOTEBOOK, tmp_path, monkeypatch)
    errors = [out for out in outputs if out.get("output_type") == "error"]
    assert not errors, errors
    assert (tmp_path / "demo_stats.parquet").is_file()
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 6
