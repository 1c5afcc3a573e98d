"""Grids and plots for the notebooks and the generation stage (matplotlib).

Every function builds a `matplotlib.figure.Figure` directly instead of going through pyplot. So
this module never chooses a backend (Jupyter's inline display keeps working: a Figure returned as
a cell's last value, or passed to `display(fig)`, is shown), figures are not kept alive by
pyplot's global registry (no "more than 20 figures" warning in long generation runs), and the
same code runs headless on a server. `save_figure` renders to PNG bytes and writes atomically.

Image convention: uint8 HxWx3 arrays, or float tensors / arrays (3, H, W) in [-1, 1] (the
project's tensor convention); spectrograms are drawn with time left to right and positive
Doppler at the top, i.e. row 0 at the top, as stored.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from mdgen_helpers.files import atomic_write_bytes


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        return x.detach().cpu().numpy()
    return np.asarray(x)


def to_uint8(img) -> np.ndarray:
    """Image -> uint8 HxWx3. Floats are taken as [-1, 1] (-1 -> 0, 1 -> 255, clipped outside).

    Accepts torch tensors or numpy arrays, channels first (3, H, W) or last (H, W, 3), 1 channel
    or none (grayscale is repeated to RGB). uint8 input is only re-laid out, not rescaled.
    """
    is_tensor = hasattr(img, "detach")
    a = _as_numpy(img)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected one image (3, H, W) or (H, W, 3), got shape {tuple(a.shape)}")
    channels_first = a.shape[0] in (1, 3) and (is_tensor or a.shape[-1] not in (1, 3))
    if channels_first:
        a = np.moveaxis(a, 0, -1)
    if a.shape[-1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got shape {tuple(a.shape)}")
    if a.dtype != np.uint8:
        a = np.clip(np.round((a.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.ascontiguousarray(a)


def _image_axes(ax, img=None) -> None:
    """An axes that shows an image with no ticks or frame but keeps its y label (row title)."""
    if img is not None:
        ax.imshow(to_uint8(img), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def _sorted_users(*dicts: Mapping) -> list:
    return sorted(set().union(*(d.keys() for d in dicts)), key=lambda u: (not isinstance(u, (int, np.integer)), u))


def _grid(rows: list[tuple[str, Sequence]], cols: int, title: str | None, cell: float) -> Figure:
    cols = max(1, cols)
    fig = Figure(figsize=(cell * cols + 0.6, cell * len(rows) + (0.4 if title else 0.1)), layout="constrained")
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            if c < len(images):
                _image_axes(ax, images[c])
            elif c == 0:
                _image_axes(ax)  # an empty row still shows its label
            else:
                ax.set_axis_off()
            if c == 0:
                ax.set_ylabel(label, fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


def user_grid(images_by_user: Mapping[int, Sequence], title: str | None = None, max_per_user: int = 8,
              cell: float = 1.3) -> Figure:
    """One row per user (sorted by user id, labelled 'user k'), up to `max_per_user` images each."""
    if not images_by_user:
        raise ValueError("user_grid: no users given")
    users = _sorted_users(images_by_user)
    rows = [(f"user {u}", list(images_by_user[u])[:max_per_user]) for u in users]
    return _grid(rows, max(len(im) for _, im in rows), title, cell)


def side_by_side(real_by_user: Mapping[int, Sequence], generated_by_user: Mapping[int, Sequence],
                 title: str | None = "real vs generated, per user", max_per_user: int = 6,
                 cell: float = 1.3) -> Figure:
    """Two rows per user: 'user k real' then 'user k gen'; users in either mapping are shown."""
    users = _sorted_users(real_by_user, generated_by_user)
    if not users:
        raise ValueError("side_by_side: no users given")
    rows = []
    for u in users:
        rows.append((f"user {u} real", list(real_by_user.get(u, []))[:max_per_user]))
        rows.append((f"user {u} gen", list(generated_by_user.get(u, []))[:max_per_user]))
    return _grid(rows, max(len(im) for _, im in rows), title, cell)


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Render `fig` to PNG bytes, then write them atomically (no half-written PNG on a crash)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------

def _read_metrics(metrics) -> list[dict[str, Any]]:
    """Records from a metrics.jsonl path or a list of dicts; lines that do not parse (a run killed
    mid-write leaves a partial last line) are skipped, not fatal."""
    if isinstance(metrics, (str, os.PathLike)):
        out = []
        path = Path(metrics)
        if not path.exists():
            return out
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out
    return [dict(r) for r in metrics]


def plot_training_curves(metrics, title: str | None = "training curves", logy: bool = True) -> Figure:
    """Every '*loss*' series (train loss, val loss, ...) against 'step', from metrics.jsonl or dicts.

    A record contributes to each series it has a finite value for, so train and validation
    records may be interleaved. With no loss values yet, the figure says so instead of failing.
    """
    records = _read_metrics(metrics)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for i, rec in enumerate(records):
        step = rec.get("step", i)
        for key, value in rec.items():
            if "loss" in key and isinstance(value, (int, float)) and math.isfinite(value):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(float(step))
                ys.append(float(value))
    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.subplots()
    if not series:
        ax.text(0.5, 0.5, "no loss values yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    for key in sorted(series, key=lambda k: (k.startswith("val"), k)):
        xs, ys = series[key]
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=key)
    if series:
        if logy and all(v > 0 for _, ys in series.values() for v in ys):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        ax.set_title(title)
    return fig


def plot_latent_stats(mean, std, title: str | None = "latent statistics per channel (train split)") -> Figure:
    """Per-channel mean and std bars of the latents (before normalisation)."""
    mean, std = _as_numpy(mean).astype(float).ravel(), _as_numpy(std).astype(float).ravel()
    if mean.shape != std.shape:
        raise ValueError(f"mean and std differ in shape: {mean.shape} vs {std.shape}")
    ch = np.arange(len(mean))
    fig = Figure(figsize=(max(6.0, 0.22 * len(ch) + 1.5), 4.2), layout="constrained")
    ax_m, ax_s = fig.subplots(2, 1, sharex=True)
    ax_m.bar(ch, mean, color="tab:blue")
    ax_m.axhline(0.0, color="k", lw=0.6)
    ax_m.set_ylabel("mean")
    ax_s.bar(ch, std, color="tab:orange")
    ax_s.set_ylabel("std")
    ax_s.set_xlabel("latent channel")
    ax_s.set_xticks(ch[:: max(1, len(ch) // 16)])
    if title:
        fig.suptitle(title)
    return fig


def plot_per_user_bars(values: Mapping[int, float], ylabel: str, baseline: float | None = None,
                       title: str | None = None, baseline_label: str = "baseline") -> Figure:
    """One bar per user (e.g. recognisability), optionally with a dashed baseline (e.g. chance)."""
    users = _sorted_users(values)
    vals = [float(values[u]) for u in users]
    fig = Figure(figsize=(max(4.0, 0.45 * len(users) + 1.5), 3.5), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(users))
    bars = ax.bar(x, vals, color="tab:blue")
    if len(users) <= 30:
        ax.bar_label(bars, labels=[f"{v:.2g}" for v in vals], fontsize=7)
    ax.set_xticks(x, [str(u) for u in users])
    ax.set_xlabel("user")
    ax.set_ylabel(ylabel)
    if baseline is not None:
        ax.axhline(float(baseline), color="tab:red", ls="--", lw=1, label=f"{baseline_label} ({baseline:.3g})")
        ax.legend(loc="best", fontsize=8)
    if title:
        ax.set_title(title)
    return fig


def plot_confusion(matrix, user_ids: Sequence, title: str | None = "confusion (rows: true user)",
                   normalize: bool = True) -> Figure:
    """Confusion matrix, rows = true user, columns = predicted user; colour = row share when
    `normalize`, cell text = counts (for up to 20 users)."""
    m = _as_numpy(matrix).astype(float)
    n = len(user_ids)
    if m.shape != (n, n):
        raise ValueError(f"matrix shape {m.shape} does not match {n} user ids")
    shown = m / np.maximum(m.sum(axis=1, keepdims=True), 1e-12) if normalize else m
    fig = Figure(figsize=(max(3.5, 0.45 * n + 2.0), max(3.0, 0.45 * n + 1.5)), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(im, ax=ax, label="share of true user" if normalize else "count")
    ax.set_xticks(range(n), [str(u) for u in user_ids], fontsize=8)
    ax.set_yticks(range(n), [str(u) for u in user_ids], fontsize=8)
    ax.set_xlabel("predicted user")
    ax.set_ylabel("true user")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(j, i, f"{m[i, j]:g}", ha="center", va="center", fontsize=7,
                            color="white" if shown[i, j] > 0.6 * (shown.max() or 1) else "black")
    if title:
        ax.set_title(title)
    return fig


def plot_guidance_tradeoff(rows: Sequence[Mapping[str, float]],
                           title: str | None = "guidance: recognisability vs diversity") -> Figure:
    """Recognisability (left axis) and within-user diversity (right axis) per guidance scale;
    `rows` as returned by `evaluate.guidance_tradeoff`."""
    scales = [float(r["guidance_scale"]) for r in rows]
    fig = Figure(figsize=(5.0, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(scales, [r["recognisability"] for r in rows], "o-", color="tab:blue")
    ax.set_xlabel("guidance scale w")
    ax.set_ylabel("recognisability (classifier accuracy)", color="tab:blue")
    ax.set_ylim(0, 1.02)
    ax2 = ax.twinx()
    ax2.plot(scales, [r["diversity"] for r in rows], "s--", color="tab:orange")
    ax2.set_ylabel("diversity (mean pairwise feature distance)", color="tab:orange")
    if title:
        ax.set_title(title)
    return fig
