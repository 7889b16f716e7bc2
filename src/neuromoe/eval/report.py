"""Report sections saved by runs, merged into one self-contained HTML page.

Each run saves what it wants to show (text, tables, metrics, figures) as ``run_dir/report/section.json``
plus PNGs, so the page can be rebuilt later from finished runs without rerunning anything. The HTML
inlines every PNG as base64: one file a researcher can e-mail or attach to a lab notebook. Absolute
paths are reduced to their file name before anything is stored, so reports name subjects, not the
directory layout of the machine that made them.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from neuromoe import __version__
from neuromoe.errors import InputError
from neuromoe.io.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, check_outputs

__all__ = ["Report", "Section", "build_report", "load_section"]

SECTION_VERSION = 1
REPORT_DIR = "report"
SECTION_FILE = "section.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# An absolute POSIX/Windows path (≥ 2 components) not glued to a word: "/data/x/sub-01_T1w.nii.gz".
# Directory components may contain spaces ("/Users/Jane Doe/My Study/…") but not start or end with one, and
# a space-containing run stops before what reads as the end of a file name or a new path (".gz and C:\…",
# ".nii.gz or train/val"), so prose between two paths, or after one, is kept.
_SEP, _STOP = r"[/\\]", r"(?!\.\w+\s|\s[A-Za-z]:[/\\])"
_END = r"[^\s/\\'\"<>|]"
_COMPONENT = rf"{_END}(?:(?:{_STOP}[^/\\'\"<>|\n])*?{_END})?"
_ABS_PATH = re.compile(rf"(?<![\w.~])(?:[A-Za-z]:)?{_SEP}(?:{_COMPONENT}{_SEP})+({_END}*)")


_URL = re.compile(r"((?:https?|ftp)://\S+)")


def scrub_paths(text: str) -> str:
    """Replace absolute paths by their last component (file or subject id); web links are kept whole (their
    path part read as a file path: "https://doi.org/10.1000/abc" became "https:/abc")."""
    parts = _URL.split(text)  # odd items are the links
    return "".join(p if i % 2 else _ABS_PATH.sub(lambda m: m.group(1) or "…", p) for i, p in enumerate(parts))


def _is_ci(value: Any) -> bool:
    """``(estimate, lower, upper)`` as returned by ``bootstrap_ci`` (a tuple, or a list after JSON)."""
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        return False
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        return False
    v, lo, hi = value
    return isinstance(value, tuple) or (lo <= v <= hi and lo < hi)


def _cell(value: Any) -> str:
    """Readable, JSON-safe table cell: 4 significant digits, CIs as ``v [lo, hi]``, no absolute paths."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) or (hasattr(value, "dtype") and getattr(value, "ndim", 1) == 0):
        v = float(value)
        if math.isnan(v):
            return "NaN"
        return str(int(v)) if v.is_integer() and abs(v) < 1e9 else f"{v:.4g}"
    if _is_ci(value):
        return f"{_cell(value[0])} [{_cell(value[1])}, {_cell(value[2])}]"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_cell(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    return scrub_paths(str(value))


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(_flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)):
            rows.append((name, json.dumps(value)))  # e.g. a confusion matrix
        else:
            rows.append((name, value))
    return rows


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "section"


class Section:
    """An ordered list of report items (text, tables, metrics, figures) belonging to one run."""

    def __init__(self, title: str, report_title: str = "") -> None:
        self.title = scrub_paths(title)
        self.report_title = report_title
        self.items: list[dict[str, Any]] = []
        self._png: dict[str, bytes] = {}  # figure file name → PNG bytes not yet saved

    def add_text(self, text: str) -> Section:
        """A paragraph (plain text; blank lines separate paragraphs)."""
        self.items.append({"kind": "text", "text": scrub_paths(str(text))})
        return self

    def add_table(self, rows: Sequence[Mapping[str, Any]] | pd.DataFrame, caption: str = "") -> Section:
        """A table from a list of row dicts (columns in first-seen order) or a DataFrame."""
        if isinstance(rows, pd.DataFrame):
            rows = rows.to_dict("records")
        keys: list[Any] = []
        for row in rows:
            keys.extend(k for k in row if k not in keys)
        cells = [[_cell(row.get(k)) for k in keys] for row in rows]
        self.items.append({"kind": "table", "caption": scrub_paths(caption),
                           "columns": [scrub_paths(str(k)) for k in keys], "rows": cells})
        return self

    def add_metrics(self, metrics: Mapping[str, Any], caption: str = "") -> Section:
        """A two-column metric/value table; nested dicts become dotted names, 3-lists become CIs."""
        rows = [{"metric": k, "value": v} for k, v in _flatten(metrics)]
        return self.add_table(rows, caption)

    def add_figure(self, figure: Figure | str | Path, caption: str = "", dpi: int = 110) -> Section:
        """A matplotlib Figure (rendered now, so the caller may close it) or an existing PNG file."""
        if isinstance(figure, (str, Path)):
            path = Path(figure)
            try:
                data = path.read_bytes()
            except OSError:
                raise InputError("figure file not found", path=path, fix="write the PNG before adding it") from None
            if not data.startswith(PNG_MAGIC):
                raise InputError("figure is not a PNG file", path=path, fix="save the figure as .png")
        else:
            buf = io.BytesIO()
            figure.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
            data = buf.getvalue()
        name = f"fig{sum(i['kind'] == 'figure' for i in self.items) + 1:02d}.png"
        self._png[name] = data
        self.items.append({"kind": "figure", "caption": scrub_paths(caption), "file": name})
        return self

    def figure_bytes(self, name: str, run_dir: Path | None = None) -> bytes:
        """PNG bytes of a figure item, from memory or from ``run_dir/report``."""
        if name in self._png:
            return self._png[name]
        if run_dir is None:
            raise InputError(f"figure '{name}' not loaded", fix="load the section with load_section(run_dir)")
        path = run_dir / REPORT_DIR / name
        try:
            return path.read_bytes()
        except OSError:
            raise InputError("report figure missing", path=path, fix="re-run the step that wrote this report") from None

    def save(self, run_dir: str | Path) -> Path:
        """Write ``run_dir/report/section.json`` and its PNGs atomically; return the JSON path."""
        out = Path(run_dir) / REPORT_DIR
        for name, data in self._png.items():
            atomic_write_bytes(out / name, data)
        payload = {"format_version": SECTION_VERSION, "neuromoe_version": __version__, "title": self.title,
                   "report_title": self.report_title, "items": self.items}
        atomic_write_json(out / SECTION_FILE, payload)
        return out / SECTION_FILE


class Report:
    """A titled collection of sections; runs usually create one section and save it."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.sections: list[Section] = []

    def section(self, title: str) -> Section:
        section = Section(title, report_title=self.title)
        self.sections.append(section)
        return section


def load_section(run_dir: str | Path) -> Section:
    """Read ``run_dir/report/section.json`` back (figures are read from disk when rendered)."""
    path = Path(run_dir) / REPORT_DIR / SECTION_FILE
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("no report section in this run directory", path=path.parent.parent,
                         fix="pass a run directory written by a NeuroMoE pipeline") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError("report section is not valid JSON", path=path, fix="re-run the step") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("items"), list):
        raise InputError("malformed report section", path=path, fix="re-run the step")
    if payload.get("format_version", 1) > SECTION_VERSION:
        raise InputError("report section made by a newer NeuroMoE", path=path, fix="upgrade NeuroMoE")
    section = Section(str(payload.get("title", Path(run_dir).name)), str(payload.get("report_title", "")))
    for item in payload["items"]:
        if not isinstance(item, dict) or item.get("kind") not in ("text", "table", "figure"):
            raise InputError("malformed report item", path=path, fix="re-run the step")
        if item["kind"] == "figure" and Path(str(item.get("file", ""))).name != item.get("file"):
            raise InputError("report figure name must be a plain file name", path=path, fix="re-run the step")
    section.items = payload["items"]
    return section


# ------------------------------------------------------------------------------------------------ HTML

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1d232a;line-height:1.45}
h1{border-bottom:3px solid #2b6cb0;padding-bottom:.3em}
h2{margin-top:2.2em;border-bottom:1px solid #ccd;padding-bottom:.2em}
nav{background:#f4f6fa;border:1px solid #dde;padding:.6em 1.2em;border-radius:6px}
nav ol{margin:.3em 0}
table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:.9em}
th,td{border:1px solid #ccd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#edf2f7}
tr:nth-child(even) td{background:#fafbfd}
caption{caption-side:bottom;text-align:left;color:#555;font-size:.85em;padding-top:.3em}
figure{margin:1em 0 1.6em}
figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.85em}
.meta{color:#666;font-size:.85em}
"""


def _render_item(item: dict[str, Any], section: Section, run_dir: Path) -> str:
    kind = item["kind"]
    if kind == "text":
        paras = [p.strip() for p in str(item.get("text", "")).split("\n\n") if p.strip()]
        return "".join(f"<p>{html.escape(scrub_paths(p))}</p>\n" for p in paras)
    if kind == "table":
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in item.get("columns", []))
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(scrub_paths(str(v)))}</td>" for v in row) + "</tr>\n"
            for row in item.get("rows", []))
        cap = f"<caption>{html.escape(item.get('caption', ''))}</caption>" if item.get("caption") else ""
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>\n"
    data = section.figure_bytes(str(item["file"]), run_dir)
    if not data.startswith(PNG_MAGIC):
        raise InputError("report figure is not a PNG", path=run_dir / REPORT_DIR / item["file"],
                         fix="re-run the step that wrote this report")
    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    cap = html.escape(item.get("caption", ""))
    return f'<figure><img alt="{cap}" src="{src}"><figcaption>{cap}</figcaption></figure>\n'


def _metrics_files(run_dir: Path) -> list[Path]:
    """``metrics.csv`` of the run and of its direct sub-runs (e.g. pretrain/ and finetune/)."""
    return [p for p in [run_dir / "metrics.csv", *sorted(run_dir.glob("*/metrics.csv"))] if p.is_file()]


def _curves_section(run_dir: Path, section: Section) -> None:
    from neuromoe.eval.plots import training_curves

    for csv in _metrics_files(run_dir):
        label = "" if csv.parent == run_dir else f" ({csv.parent.name})"
        try:
            fig = training_curves(csv, title=f"training curves{label}")
        except InputError:
            section.add_text(f"Training metrics{label} could not be read.")
            continue
        section.add_figure(fig, f"Training curves from metrics.csv{label}.")


def build_report(run_dirs: Iterable[str | Path], out_html: str | Path, title: str = "NeuroMoE report") -> Path:
    """Merge the saved sections of ``run_dirs`` (and their training curves) into one HTML file."""
    out_html = Path(out_html)
    run_dirs = [Path(d) for d in run_dirs]
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise InputError("run directory not found", path=run_dir, fix="check the path")
    # the page must not replace a file it is built from (--out runs/x/metrics.csv destroyed the run's log)
    check_outputs([out_html], [f for d in run_dirs for f in (*(d / REPORT_DIR).glob("*"), *_metrics_files(d))])
    rendered: list[tuple[str, str, str]] = []  # (anchor, title, html)
    for i, run_dir in enumerate(run_dirs):
        has_section = (run_dir / REPORT_DIR / SECTION_FILE).is_file()
        if not has_section and not _metrics_files(run_dir):
            raise InputError("nothing to report (no report/section.json and no metrics.csv)", path=run_dir,
                             fix="pass a run directory written by a NeuroMoE pipeline")
        section = load_section(run_dir) if has_section else Section(run_dir.name)
        _curves_section(run_dir, section)
        body = "".join(_render_item(item, section, run_dir) for item in section.items)
        rendered.append((f"s{i + 1}-{_slug(section.title)}", section.title, body))
    if not rendered:
        raise InputError("no run directories given", fix="pass at least one run directory")
    toc = "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t, _ in rendered)
    sections = "".join(f'<section id="{a}"><h2>{html.escape(t)}</h2>\n{b}</section>\n' for a, t, b in rendered)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head>\n'
        f"<body><h1>{html.escape(title)}</h1>\n"
        f'<p class="meta">Generated by NeuroMoE {__version__} on {stamp}.</p>\n'
        f"<nav><strong>Contents</strong><ol>{toc}</ol></nav>\n{sections}</body></html>\n"
    )
    atomic_write_text(out_html, page)
    return out_html
