"""Run a notebook top to bottom in a kernel (shared by the notebook tests)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def execute_notebook(path: Path, workdir: Path, monkeypatch) -> list[dict]:
    """Execute ``path`` with ``workdir`` as the kernel's cwd and return the outputs of
    its code cells. The project is importable in the kernel through PYTHONPATH."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()
    outputs = [
        out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    ]
    return outputs


def load_builder(path: Path, monkeypatch):
    """The module of a ``notebooks/build_NN_*.py`` script (its ``CELLS``, ``NAME``), loaded
    from its file with ``notebooks/`` importable, as when the script is run."""
    import importlib.util

    monkeypatch.syspath_prepend(str(path.parent))  # the scripts import notebooks/_build.py
    spec = importlib.util.spec_from_file_location(f"_nb_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
