"""One self-contained HTML page comparing runs: figures embedded as base64 PNG,
the summaries side by side, each run's resolved config.

The page carries a small script that sets ``data-figures-ok`` on ``<body>``
to the number of images decoded (``complete`` and ``naturalWidth > 0``) and
``data-figures-total`` to the number of images, so a headless browser can
check every figure rendered.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

__all__ = ["REPORT_FIGURES", "render_report", "write_report"]

#: figures a report draws for each run, when the run has what they need
REPORT_FIGURES = (
    "capacity_curve",
    "hit_ratio_time",
    "hit_vs_length",
    "session_reuse",
    "footprint",
    "queue_ttft",
    "reuse_cdf",
    "position",
)

_SCRIPT = """
function check() {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.figuresTotal = imgs.length;
  document.body.dataset.figuresOk = ok;
}
window.addEventListener('load', check);
"""
_STYLE = (
    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}"
    "th:first-child,td:first-child{text-align:left}img{max-width:100%}"
    "pre{background:#f6f6f6;padding:.5em;overflow:auto}"
)


def _png(fig: Any, dpi: int) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape(str(v))


def render_report(runs: list[Any], *, dpi: int = 90, title: str = "sagellm-kv-cache runs") -> str:
    """The HTML text of a report on ``runs`` (:class:`~sim.analysis.runs.Run` objects)."""
    from . import figures

    esc = html.escape
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
        f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    names = [r.name for r in runs]
    keys: list[str] = []
    for r in runs:
        for k, v in (r.summary or {}).items():
            if isinstance(v, (int, float, str, bool)) and k not in keys:
                keys.append(k)
    parts.append("<h2>Summary</h2><table><tr><th>metric</th>")
    parts += [f"<th>{esc(n)}</th>" for n in names]
    parts.append("</tr>")
    for k in keys:
        row = "".join(f"<td>{_cell((r.summary or {}).get(k, ''))}</td>" for r in runs)
        parts.append(f"<tr><td>{esc(k)}</td>{row}</tr>")
    parts.append("</table>")
    for r in runs:
        parts.append(f"<h2>{esc(r.name)}</h2><p>{esc(str(r.path))}</p>")
        for note in r.notes:
            parts.append(f"<p><em>note: {esc(note)}</em></p>")
        for name in (n for n in REPORT_FIGURES if n in figures.available(r)):
            data = _png(figures.draw(r, name), dpi)
            parts.append(
                f"<figure><img alt='{esc(name)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{esc(name)}</figcaption></figure>"
            )
        if r.config is not None:
            cfg = esc(json.dumps(r.config, indent=2, default=str))
            parts.append(f"<details open><summary>config</summary><pre>{cfg}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(paths: list[str | Path], out: str | Path | None = None, *, dpi: int = 90) -> Path:
    """Read each run (``load_run``) and write the report to ``out``
    (default ``<first run>/report.html``); returns the path written."""
    from sagellm_kv_cache.errors import KVInvalidInputError

    from .runs import load_run

    if not paths:
        raise KVInvalidInputError("report needs at least one run")
    runs = [load_run(p) for p in paths]
    target = Path(out) if out is not None else Path(paths[0]) / "report.html"
    target.write_text(render_report(runs, dpi=dpi), encoding="utf-8")
    return target
