"""Each notebook has one source: its ``notebooks/build_NN_*.py``; the ``.ipynb`` must be
exactly what that script writes (regenerate with ``python notebooks/build_NN_*.py``)."""

from __future__ import annotations

import pytest

from tests._notebooks import ROOT, load_builder

NOTEBOOKS = ROOT / "notebooks"
BUILDERS = sorted(NOTEBOOKS.glob("build_[0-9][0-9]_*.py"))


def test_every_notebook_has_a_build_script():
    built = {p.stem.split("_")[1] for p in BUILDERS}
    notebooks = {p.name[:2] for p in NOTEBOOKS.glob("[0-9][0-9]-*.ipynb")}
    assert built == notebooks and built


@pytest.mark.parametrize("path", BUILDERS, ids=lambda p: p.name)
def test_committed_notebook_is_what_its_script_builds(path, monkeypatch):
    module = load_builder(path, monkeypatch)
    from _build import notebook_text

    committed = (NOTEBOOKS / module.NAME).read_text()
    assert committed == notebook_text(module.CELLS), (
        f"{module.NAME} differs from what {path.name} builds: edit the script and run "
        f"python notebooks/{path.name}"
    )
