"""viz: figures build headless (Agg), grids have one labelled row per user, atomic PNG writes."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")  # tests only; the module itself never picks a backend

import numpy as np
import pytest
import torch
from PIL import Image

from mdgen_helpers import viz


def _row_labels(fig) -> list[str]:
    return [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]


def test_to_uint8_maps_range_and_layouts():
    t = torch.tensor([-1.0, 0.0, 1.0, 3.0, -2.0]).view(1, 1, 5).expand(3, 1, 5)
    out = viz.to_uint8(t)
    assert out.shape == (1, 5, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 128, 255, 255, 0]
    hwc = np.zeros((4, 6, 3), np.uint8) + 7
    assert np.array_equal(viz.to_uint8(hwc), hwc)
    assert np.array_equal(viz.to_uint8(np.moveaxis(hwc, -1, 0)), hwc)  # uint8 CHW, not rescaled
    assert viz.to_uint8(torch.zeros(1, 4, 4)).shape == (4, 4, 3)  # one channel -> RGB
    with pytest.raises(ValueError, match="one image"):
        viz.to_uint8(torch.zeros(2, 3, 4, 4))


def test_user_grid_one_row_per_user():
    rng = np.random.default_rng(0)
    images = {
        10: [torch.rand(3, 32, 32) * 2 - 1 for _ in range(3)],
        2: [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(12)],
        5: [],
    }
    fig = viz.user_grid(images, title="real samples", max_per_user=8)
    assert _row_labels(fig) == ["user 2", "user 5", "user 10"]  # numeric order, empty user kept
    assert len(fig.axes) == 3 * 8
    assert sum(1 for ax in fig.axes if ax.images) == 8 + 3
    assert fig._suptitle.get_text() == "real samples"


def test_side_by_side_rows():
    real = {1: [torch.zeros(3, 16, 16)] * 2, 3: [torch.ones(3, 16, 16)]}
    gen = {1: [torch.zeros(3, 16, 16)] * 4}
    fig = viz.side_by_side(real, gen, max_per_user=3)
    assert _row_labels(fig) == ["user 1 real", "user 1 gen", "user 3 real", "user 3 gen"]


def test_save_figure_writes_png_atomically(tmp_path):
    fig = viz.user_grid({1: [torch.zeros(3, 16, 16)]})
    target = tmp_path / "out" / "grid.png"
    target.parent.mkdir()
    target.write_bytes(b"old")
    assert viz.save_figure(fig, target) == target
    with Image.open(target) as im:
        im.verify()
        assert im.format == "PNG"
    assert [p.name for p in target.parent.iterdir()] == ["grid.png"]  # no temp file left behind


def test_training_curves_from_jsonl_with_partial_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-4}) for s in range(1, 11)]
    lines += [json.dumps({"step": 10, "val_loss": 0.2}), '{"step": 11, "lo']  # killed mid-write
    path.write_text("\n".join(lines))
    fig = viz.plot_training_curves(path)
    ax = fig.axes[0]
    assert sorted(line.get_label() for line in ax.get_lines()) == ["loss", "val_loss"]
    assert len(ax.get_lines()[0].get_xdata()) == 10
    empty = viz.plot_training_curves([])
    assert "no loss values yet" in empty.axes[0].texts[0].get_text()


def test_stat_and_metric_plots(tmp_path):
    fig = viz.plot_latent_stats(torch.randn(32), torch.rand(32) + 0.5)
    assert len(fig.axes) == 2 and len(fig.axes[0].patches) == 32
    fig = viz.plot_per_user_bars({3: 0.9, 1: 0.5, 2: 0.7}, "accuracy", baseline=1 / 3)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3"]
    assert [p.get_height() for p in ax.patches] == [0.5, 0.7, 0.9]
    fig = viz.plot_confusion(np.array([[5, 1], [0, 6]]), [1, 2])
    assert {t.get_text() for t in fig.axes[0].texts} == {"5", "1", "6"}
    with pytest.raises(ValueError, match="does not match 3 user ids"):
        viz.plot_confusion(np.eye(2), [1, 2, 3])
    viz.save_figure(fig, tmp_path / "confusion.png")
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_guidance_tradeoff_plot_has_both_curves():
    from mdgen_helpers import viz

    rows = [{"guidance_scale": s, "recognisability": r, "diversity": d}
            for s, r, d in [(1, 0.5, 3.0), (4, 0.8, 2.0), (7, 0.9, 1.5)]]
    fig = viz.plot_guidance_tradeoff(rows)
    left, right = fig.axes
    assert list(left.lines[0].get_xdata()) == [1.0, 4.0, 7.0]
    assert list(right.lines[0].get_ydata()) == [3.0, 2.0, 1.5]
