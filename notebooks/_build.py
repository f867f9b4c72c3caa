"""What every ``build_*.py`` does with its cells: one notebook, written the same way.

The ``.ipynb`` files are generated, never hand-edited: each ``build_NN_*.py``
holds its notebook's cells and calls :func:`write_notebook`. Cell ids are
numbered (not random), so building twice gives the same file and
``tests/test_notebook_drift.py`` can check that every committed notebook is
what its script builds.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_notebook

HERE = Path(__file__).resolve().parent


def build_notebook(cells: list) -> nbformat.NotebookNode:
    """The notebook of ``cells``: Python 3 kernel, cell ids ``cell-00``, ``cell-01``..."""
    nb = new_notebook(cells=[nbformat.from_dict(dict(c)) for c in cells])
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def notebook_text(cells: list) -> str:
    """The ``.ipynb`` file's text for ``cells`` (what :func:`write_notebook` writes)."""
    return nbformat.writes(build_notebook(cells)) + "\n"


def write_notebook(cells: list, name: str) -> Path:
    """Write ``notebooks/<name>`` from ``cells`` and return its path."""
    path = HERE / name
    path.write_text(notebook_text(cells))
    return path
