"""C2ST and the interval maths: ~0.5 for two samples of one distribution, ~1 for a visible
difference (a blocky background, the demo generator's tell); intervals that cover the truth."""

import numpy as np
import pytest
import torch

from mdgen_helpers import c2st, metrics


def _spectrograms(n: int, seed: int, blocky: bool = False, size: int = 64) -> torch.Tensor:
    """Noise background with a bright band; `blocky` repeats the background in 8x8 blocks."""
    g = torch.Generator().manual_seed(seed)
    if blocky:
        bg = torch.randint(0, 90, (n, 3, size // 8, size // 8), generator=g).repeat_interleave(8, 2).repeat_interleave(8, 3)
    else:
        bg = torch.randint(0, 90, (n, 3, size, size), generator=g)
    rows = torch.randint(10, size - 20, (n,), generator=g)
    for i, r in enumerate(rows.tolist()):
        bg[i, 0, r:r + 8] = 230
    return bg.to(torch.uint8)


def test_c2st_is_chance_for_one_distribution_and_high_for_a_visible_difference():
    real = _spectrograms(48, seed=0)
    same = c2st.c2st(real, _spectrograms(48, seed=1), seeds=(0, 1), steps=80, batch_size=16, bootstrap=300)
    assert same["interval"][0] <= 0.5 <= same["interval"][1], same
    diff = c2st.c2st(real, _spectrograms(48, seed=2, blocky=True), seeds=(0, 1), steps=80, batch_size=16,
                     bootstrap=300)
    assert diff["interval"][0] > 0.5, diff  # significantly better than chance
    # every drawn image has a held-out score; the blocky ones score as generated
    assert not np.isnan(diff["scores_generated"]).any()
    assert np.nanmean(diff["scores_generated"]) > np.nanmean(diff["scores_real"])
    # same seeds, same numbers
    again = c2st.c2st(real, _spectrograms(48, seed=2, blocky=True), seeds=(0, 1), steps=80, batch_size=16,
                      bootstrap=300)
    assert again["per_seed"] == diff["per_seed"] and again["interval"] == diff["interval"]


def test_c2st_refuses_tiny_sets():
    with pytest.raises(ValueError, match="at least 4"):
        c2st.c2st(_spectrograms(3, 0), _spectrograms(10, 1), seeds=(0,), steps=1)


def test_fd_ratio_covers_one_for_one_distribution_and_exceeds_it_for_a_shift():
    rng = np.random.default_rng(0)
    ref, base, same = (rng.normal(size=(200, 16)) for _ in range(3))
    r = metrics.fd_ratio(same, base, ref, num_bootstrap=200, seed=0)
    assert r["interval"][0] <= 1.0 <= r["interval"][1], r
    assert r["fd_generated_interval"][0] <= r["fd_generated"] <= r["fd_generated_interval"][1]
    assert r["ratio"] == pytest.approx(metrics.frechet_distance(ref, same) / metrics.frechet_distance(ref, base))
    shifted = rng.normal(size=(200, 16)) + 0.5
    r = metrics.fd_ratio(shifted, base, ref, num_bootstrap=200, seed=0)
    assert r["interval"][0] > 1.0, r
    # fewer samples than dimensions (the demo: 90 images, 512 features): the thin-SVD route
    # gives the same distances as the D x D one
    few = [rng.normal(size=(n, 64)) for n in (20, 20, 27)]
    r = metrics.fd_ratio(*few, num_bootstrap=0)
    assert r["fd_generated"] == pytest.approx(metrics.frechet_distance(few[2], few[0]), rel=1e-6)
    assert r["fd_baseline"] == pytest.approx(metrics.frechet_distance(few[2], few[1]), rel=1e-6)
    with pytest.raises(ValueError, match="matched sizes"):
        metrics.fd_ratio(shifted[:10], base, ref)


def test_paired_difference_is_a_student_t_interval_over_pairs():
    a, b = [0.90, 0.95, 0.93], [0.92, 0.94, 0.90]
    d = metrics.paired_difference(a, b)
    diffs = np.array(a) - np.array(b)
    half = 4.302652729911275 * diffs.std(ddof=1) / np.sqrt(3)  # t(0.975, df=2)
    assert d["mean"] == pytest.approx(diffs.mean())
    assert d["interval"] == pytest.approx([diffs.mean() - half, diffs.mean() + half])
    r = metrics.paired_ratio([0.3, 0.4, 0.5], [0.6, 0.8, 1.0])
    assert r["mean"] == pytest.approx(0.5) and r["interval"] == pytest.approx([0.5, 0.5])


def test_bootstrap_interval_resamples_every_side():
    x = np.r_[np.zeros(50), np.ones(50)]
    lo, hi = metrics.bootstrap_interval(np.mean, (x,), num=500, seed=0)
    assert lo < 0.5 < hi and hi - lo < 0.3
    lo, hi = metrics.bootstrap_interval(lambda a, b: a.mean() - b.mean(), (x, np.full(10, 0.5)), num=200)
    assert lo < 0 < hi


def test_hand_written_fd_and_kid_match_torchmetrics():
    """Cross-check against torchmetrics' own FID and KID maths (skipped where it is not installed)."""
    pytest.importorskip("torchmetrics")
    from torchmetrics.image.fid import _compute_fid
    from torchmetrics.image.kid import poly_mmd

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(120, 24)), rng.normal(size=(90, 24)) * 1.2 + 0.3
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    mu_a, s_a = metrics.gaussian_stats(a)
    mu_b, s_b = metrics.gaussian_stats(b)
    ref = float(_compute_fid(torch.from_numpy(mu_a), torch.from_numpy(s_a), torch.from_numpy(mu_b),
                             torch.from_numpy(s_b)))
    assert metrics.frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert metrics.fd_ratio(b, b, a, num_bootstrap=0)["fd_generated"] == pytest.approx(ref, rel=1e-6)
    # torchmetrics' MMD assumes equal set sizes (as KID subsets are)
    assert metrics.mmd2_unbiased(a[:90], b) == pytest.approx(float(poly_mmd(ta[:90], tb)), rel=1e-6)


def test_proportion_intervals_cover_the_truth_at_the_boundary():
    lo, hi = metrics.proportion_interval(45, 45)
    assert 0.9 < lo < hi <= 1.0  # all right is not certainty
    # 45/45 vs 84/90 is not a significant difference (Fisher exact p = 0.18): the ratio interval holds 1
    lo, hi = metrics.proportion_ratio_interval(45, 45, 84, 90)
    assert lo <= 1.0 <= hi
    # coverage of a true ratio of 1 by simulation
    rng = np.random.default_rng(0)
    hits = 0
    for i in range(200):
        k1, k2 = rng.binomial(45, 0.9), rng.binomial(90, 0.9)
        lo, hi = metrics.proportion_ratio_interval(k1, 45, k2, 90, num=2000, seed=i)
        hits += lo <= 1.0 <= hi
    assert hits / 200 >= 0.9
