"""Standard evaluation figures, returned as matplotlib ``Figure`` objects for report sections.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot state, no GUI backend), so they work
headless on clusters, in threads and in tests, and need no ``plt.close``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from neuromoe.errors import InputError

__all__ = ["bar_chart", "confusion_matrix_plot", "heatmap", "pred_vs_true", "roc_curves", "training_curves"]

# Columns of metrics.csv that index rows rather than measure something.
INDEX_COLUMNS = ("step", "epoch", "time", "wall_time", "elapsed_s", "timestamp")


def roc_curves(y_true: np.ndarray, y_prob: np.ndarray, labels: Sequence[str] | None = None,
               title: str = "ROC") -> Figure:
    """One-vs-rest ROC curve per class (binary: the positive class) with its AUC in the legend."""
    y_true = np.asarray(y_true).astype(int)
    y_prob = np.asarray(y_prob, dtype=float)
    if y_prob.ndim == 1:
        y_prob = np.stack([1 - y_prob, y_prob], axis=1)
    k = y_prob.shape[1]
    labels = list(labels) if labels is not None else [str(i) for i in range(k)]
    fig = Figure(figsize=(4.2, 4.0))
    ax = fig.subplots()
    for c in [1] if k == 2 else range(k):
        pos = y_true == c
        if pos.all() or not pos.any():
            continue  # ROC undefined with one class present
        fpr, tpr, _ = roc_curve(pos, y_prob[:, c])
        ax.plot(fpr, tpr, lw=1.5, label=f"{labels[c]} (AUC {roc_auc_score(pos, y_prob[:, c]):.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def confusion_matrix_plot(cm: np.ndarray | Sequence[Sequence[int]], labels: Sequence[str],
                          title: str = "confusion matrix", normalize: bool = False) -> Figure:
    """Confusion matrix (rows = truth) with counts, or row-normalised fractions, in each cell."""
    cm = np.asarray(cm, dtype=float)
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    n = len(labels)
    fig = Figure(figsize=(1.0 + 0.8 * n, 0.8 + 0.8 * n))
    ax = fig.subplots()
    ax.imshow(shown, cmap="Blues", vmin=0)
    for (i, j), v in np.ndenumerate(shown):
        text = f"{v:.2f}" if normalize else f"{int(v)}"
        ax.text(j, i, text, ha="center", va="center", fontsize=9,
                color="white" if v > 0.6 * max(shown.max(), 1e-9) else "black")
    ax.set(xticks=range(n), yticks=range(n), xticklabels=labels, yticklabels=labels,
           xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    return fig


def pred_vs_true(y_true: np.ndarray, y_pred: np.ndarray, *, xlabel: str = "true", ylabel: str = "predicted",
                 title: str = "", baseline: float | None = None) -> Figure:
    """Scatter of predictions against targets with the identity line, MAE and r in the corner.

    ``baseline`` (e.g. the training mean) is drawn as a horizontal line: what a model that learned
    nothing would predict.
    """
    t = np.asarray(y_true, dtype=float)
    p = np.asarray(y_pred, dtype=float)
    ok = np.isfinite(t) & np.isfinite(p)
    t, p = t[ok], p[ok]
    fig = Figure(figsize=(4.2, 4.0))
    ax = fig.subplots()
    ax.scatter(t, p, s=14, alpha=0.7, edgecolors="none")
    if t.size:
        lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
        ax.plot([lo, hi], [lo, hi], "k:", lw=0.8, label="identity")
        text = f"MAE {np.mean(np.abs(t - p)):.2f}"
        if t.size > 1 and t.std() > 0 and p.std() > 0:
            text += f"\nr {np.corrcoef(t, p)[0, 1]:.2f}"
        ax.text(0.03, 0.97, text, transform=ax.transAxes, va="top", fontsize=9)
    if baseline is not None:
        ax.axhline(baseline, color="tab:red", lw=0.8, ls="--", label="baseline")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def _read_metrics(source: str | Path | pd.DataFrame) -> pd.DataFrame:
    if isinstance(source, pd.DataFrame):
        return source
    try:
        return pd.read_csv(source)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read training metrics ({exc.__class__.__name__})", path=source,
                         fix="pass the metrics.csv written by the trainer") from None


def _x_axis(df: pd.DataFrame) -> tuple[str | None, np.ndarray]:
    x_name = next((c for c in ("step", "epoch") if c in df.columns), None)
    return x_name, df[x_name].to_numpy(float) if x_name else np.arange(len(df), dtype=float)


def training_curves(source: str | Path | pd.DataFrame, title: str = "training curves",
                    max_panels: int = 8) -> Figure:
    """One small panel per numeric column of a trainer ``metrics.csv`` against step (or epoch).

    Train and validation columns with the same metric name (``train/loss``, ``val/loss``) share a
    panel so over-fitting is visible at a glance. Rows where a column is empty (validation is logged
    less often) are skipped per column.
    """
    df = _read_metrics(source)
    x_name, x = _x_axis(df)
    numeric = [c for c in df.columns if c not in INDEX_COLUMNS and pd.api.types.is_numeric_dtype(df[c])
               and df[c].notna().any()]
    panels: dict[str, list[str]] = {}
    for c in numeric:
        key = c.split("/", 1)[1] if c.split("/", 1)[0] in ("train", "val", "valid", "test") and "/" in c else c
        key = key.removeprefix("train_").removeprefix("val_")
        panels.setdefault(key, []).append(c)
    ordered = sorted(panels, key=lambda k: (k == "lr", k))
    keys, hidden = ordered[:max_panels], ordered[max_panels:]
    n = max(len(keys), 1)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, key in zip(axes, keys):
        for c in panels[key]:
            y = df[c].to_numpy(float)
            ok = np.isfinite(y)
            ax.plot(x[ok], y[ok], marker="o" if ok.sum() < 30 else None, ms=3, lw=1.2, label=c)
        ax.set(title=key, xlabel=x_name or "row")
        if key == "lr" or (key.endswith("loss") and np.nanmin(df[panels[key]].to_numpy(float)) > 0):
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    if not keys:
        axes[0].text(0.5, 0.5, "no numeric metrics", ha="center", va="center")
    fig.suptitle(title if not hidden else f"{title} ({len(hidden)} more not shown: {', '.join(hidden)})")
    fig.tight_layout()
    return fig


def expert_curves(sources: Mapping[str, str | Path | pd.DataFrame], metric: str = "loss",
                  title: str = "experts") -> Figure:
    """Train (dashed) and validation (solid) ``metric`` of separately trained experts on one axis, one
    colour each, so an expert that stopped learning or over-fits stands out among its peers."""
    fig = Figure(figsize=(6.0, 3.6))
    ax = fig.subplots()
    positive, x_name = True, None
    for i, (name, source) in enumerate(sources.items()):
        df = _read_metrics(source)
        x_name, x = _x_axis(df)
        for split, style in (("train", "--"), ("val", "-")):
            column = f"{split}_{metric}"
            if column not in df.columns or not pd.api.types.is_numeric_dtype(df[column]):
                continue
            y = df[column].to_numpy(float)
            ok = np.isfinite(y)
            if ok.any():
                positive &= bool((y[ok] > 0).all())
                ax.plot(x[ok], y[ok], style, color=f"C{i % 10}", lw=1.2, marker="o" if ok.sum() < 30 else None,
                        ms=3, label=f"{name} ({split})")
    if not ax.lines:
        ax.text(0.5, 0.5, f"no {metric} logged", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=7, ncol=2)
        if positive:
            ax.set_yscale("log")
    ax.set(title=title, xlabel=x_name or "row", ylabel=metric)
    fig.tight_layout()
    return fig


def heatmap(matrix: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], *, title: str = "",
            xlabel: str = "", ylabel: str = "", cbar_label: str = "", annotate: bool = True) -> Figure:
    """Annotated heatmap, e.g. task × expert routing fractions of an MoE layer."""
    m = np.asarray(matrix, dtype=float)
    fig = Figure(figsize=(1.8 + 0.55 * m.shape[1], 1.4 + 0.45 * m.shape[0]))
    ax = fig.subplots()
    im = ax.imshow(m, cmap="viridis", aspect="auto")
    if annotate and m.size <= 400:
        hi = np.nanmax(m) if np.isfinite(m).any() else 1.0
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if v > 0.6 * hi else "white")
    ax.set(xticks=range(m.shape[1]), yticks=range(m.shape[0]), xticklabels=list(col_labels),
           yticklabels=list(row_labels), xlabel=xlabel, ylabel=ylabel, title=title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=cbar_label)
    fig.tight_layout()
    return fig


def bar_chart(values: Mapping[str, float], *, errors: Mapping[str, tuple[float, float]] | None = None,
              title: str = "", ylabel: str = "", reference: float | None = None) -> Figure:
    """Bar per named value, optional (lower, upper) intervals and a horizontal reference line."""
    names = list(values)
    v = np.array([values[k] for k in names], dtype=float)
    fig = Figure(figsize=(1.5 + 0.7 * len(names), 3.4))
    ax = fig.subplots()
    yerr = None
    if errors:
        lo = np.array([v[i] - errors[k][0] if k in errors else 0.0 for i, k in enumerate(names)])
        hi = np.array([errors[k][1] - v[i] if k in errors else 0.0 for i, k in enumerate(names)])
        yerr = np.clip(np.vstack([lo, hi]), 0, None)
    ax.bar(range(len(names)), v, yerr=yerr, capsize=3, color="tab:blue", alpha=0.8)
    if reference is not None:
        ax.axhline(reference, color="tab:red", ls="--", lw=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set(title=title, ylabel=ylabel)
    fig.tight_layout()
    return fig
