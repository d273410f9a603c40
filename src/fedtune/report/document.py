"""Documents: one list of blocks rendered as report.md and a self-contained report.html.

Why blocks rendered twice: the Markdown reads well in a terminal or a repository, the HTML
(plots inlined as base64, no external links) is one file to mail or archive; building both
from one list keeps them saying the same thing. `fmt` is the one number formatter of every
fedtune table (run reports, comparisons of runs, study tables).

A block is ("h", text[, level]), ("p", text), ("code", text[, language]),
("table", header, rows) or ("img", path). Values are plain text; the renderers escape them.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from fedtune.files import atomic_write_text
from fedtune.report.folder import MIB


def fmt(v, spec: str = ".4f", missing: str = "") -> str:
    """A table cell: floats by `spec` ("mib": bytes as MiB), ints and other values as they
    are. None is `missing`; so is NaN when `missing` is set (study tables write "n/a"),
    else NaN shows as "nan"."""
    if v is None or (missing and isinstance(v, float) and math.isnan(v)):
        return missing
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if spec == "mib":
        return f"{v / MIB:,.2f}"
    if isinstance(v, int):
        return f"{v:,}"  # 921,600 parameters
    return format(v, spec) if math.isfinite(v) else str(v)


def duration(s: float) -> str:
    """Seconds, with minutes or hours alongside once they help: "75.0 s (1 min 15 s)"."""
    m, sec = divmod(round(s), 60)
    return f"{s:.1f} s" + (
        f" ({m // 60} h {m % 60} min)" if m >= 60 else f" ({m} min {sec} s)" if m else ""
    )


def _md(blocks) -> str:
    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")

    out = []
    for b in blocks:
        if b[0] == "h":
            out.append(f"{'#' * b[2] if len(b) > 2 else '##'} {b[1]}")
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "code":
            fence = "```"
            while fence in b[1]:
                fence += "`"
            out.append(f"{fence}{b[2] if len(b) > 2 else ''}\n{b[1].rstrip()}\n{fence}")
        elif b[0] == "table":
            best = b[3] if len(b) > 3 else None  # a row to highlight (the best round)
            lines = ["| " + " | ".join(map(cell, b[1])) + " |", "|" + "---|" * len(b[1])]
            lines += [
                "| "
                + " | ".join(map(cell, [f"**{r[0]}** (best)", *r[1:]] if i == best else r))
                + " |"
                for i, r in enumerate(b[2])
            ]
            out.append("\n".join(lines))
        elif b[0] == "img":
            out.append(f"![{b[1].stem}](plots/{b[1].name})")
    return "\n\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left}pre{background:#f6f8fa;padding:.8em;
overflow-x:auto;font-size:.85em}img{max-width:100%;display:block;margin:1em 0}
code{background:#f6f8fa}tr.best td{background:#fff4c2;font-weight:600}"""


def _html(blocks, title: str) -> str:
    e = html.escape
    out = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
        f"<style>{_CSS}</style></head><body>"
    ]
    for b in blocks:
        if b[0] == "h":
            n = b[2] if len(b) > 2 else 2
            out.append(f"<h{n}>{e(b[1])}</h{n}>")
        elif b[0] == "p":
            out.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "code":
            out.append(f"<pre><code>{e(b[1])}</code></pre>")
        elif b[0] == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in b[1])
            best = b[3] if len(b) > 3 else None
            body = "".join(
                ("<tr class='best'>" if i == best else "<tr>")
                + "".join(f"<td>{e(str(c))}</td>" for c in r)
                + "</tr>"
                for i, r in enumerate(b[2])
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b[0] == "img":
            data = base64.b64encode(b[1].read_bytes()).decode("ascii")
            out.append(f'<img alt="{e(b[1].stem)}" src="data:image/png;base64,{data}">')
    return "\n".join(out) + "\n</body></html>\n"


def write_docs(out_dir: Path, blocks, title: str) -> tuple[Path, Path]:
    """out_dir/report.md and out_dir/report.html from `blocks`, each written atomically."""
    md, page = out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(md, _md(blocks))
    atomic_write_text(page, _html(blocks, title))
    return md, page
