"""Metric maths against closed-form cases and constructed point clouds."""

import numpy as np
import pytest
import torch

from mdgen_helpers import metrics


def _gaussian(rng, mean, cov, n):
    return rng.multivariate_normal(mean, cov, size=n)


def _random_cov(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def _closed_form_fd(m1, s1, m2, s2):
    from scipy.linalg import sqrtm

    covmean = sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fd_from_stats_matches_closed_form():
    rng = np.random.default_rng(0)
    d = 6
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d, 2.0)
    assert metrics.frechet_distance_from_stats(m1, s1, m2, s2) == pytest.approx(_closed_form_fd(m1, s1, m2, s2), rel=1e-8)
    # Diagonal case by hand: |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0]), np.array([9.0, 1.0])
    expected = 2.0 ** 2 + (1 - 3) ** 2 + (2 - 1) ** 2
    got = metrics.frechet_distance_from_stats(np.array([0.0, 0.0]), np.diag(a), np.array([2.0, 0.0]), np.diag(b))
    assert got == pytest.approx(expected, abs=1e-10)
    assert metrics.frechet_distance_from_stats(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-8)


def test_fd_from_samples_converges_to_closed_form():
    rng = np.random.default_rng(1)
    d = 4
    m1, m2 = np.zeros(d), np.full(d, 0.5)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    x, y = _gaussian(rng, m1, s1, 20000), _gaussian(rng, m2, s2, 20000)
    assert metrics.frechet_distance(x, y) == pytest.approx(_closed_form_fd(m1, s1, m2, s2), rel=0.05)
    # Torch input and fewer samples than dimensions (singular covariance) still work.
    t = torch.randn(10, 32, generator=torch.Generator().manual_seed(0))
    assert metrics.frechet_distance(t, t) == pytest.approx(0.0, abs=1e-6)


def test_kid_same_distribution_is_near_zero_and_shift_matches_closed_form():
    rng = np.random.default_rng(2)
    d = 8
    x, y = rng.normal(size=(1000, d)), rng.normal(size=(1000, d))
    kid, kid_std = metrics.kernel_inception_distance(x, y, num_subsets=20, subset_size=500)
    assert abs(kid) < 3 * kid_std + 1e-3

    # Degree-2 kernel (x.y/D + c)^2: MMD^2 = |M1 - M2|_F^2 / D^2 + 2c |m1 - m2|^2 / D,
    # with M = S + m m^T the second moment (exact for any distribution with these moments).
    m1, m2 = np.zeros(d), np.full(d, 0.7)
    s1, s2 = np.eye(d), 1.5 * np.eye(d)
    big1, big2 = s1 + np.outer(m1, m1), s2 + np.outer(m2, m2)
    closed = ((big1 - big2) ** 2).sum() / d**2 + 2 * ((m1 - m2) ** 2).sum() / d
    a, b = _gaussian(rng, m1, s1, 3000), _gaussian(rng, m2, s2, 3000)
    kid2, _ = metrics.kernel_inception_distance(a, b, num_subsets=10, subset_size=1500, degree=2)
    assert kid2 == pytest.approx(closed, rel=0.1)
    # Linear kernel: MMD^2 = |m1 - m2|^2 / D exactly in expectation.
    lin = metrics.mmd2_unbiased(a, b, degree=1, coef0=0.0)
    assert lin == pytest.approx(((m1 - m2) ** 2).sum() / d, rel=0.1)
    # The default cubic KID sees the shift clearly.
    kid3, std3 = metrics.kernel_inception_distance(a, b, num_subsets=10, subset_size=1000)
    assert kid3 > 10 * max(std3, abs(kid))


def test_precision_recall_on_constructed_clouds():
    rng = np.random.default_rng(3)
    cloud = rng.normal(size=(300, 3))
    p, r = metrics.precision_recall(cloud, cloud.copy(), k=3)
    assert (p, r) == (1.0, 1.0)
    same_dist = rng.normal(size=(300, 3))
    p, r = metrics.precision_recall(cloud, same_dist, k=5)
    assert p > 0.8 and r > 0.8
    far = rng.normal(size=(300, 3)) + 100.0
    assert metrics.precision_recall(cloud, far, k=3) == (0.0, 0.0)
    # Fake = one small corner of the real cloud: faithful (high precision), covers little (low recall).
    corner = cloud[np.argsort(cloud[:, 0])[:30]]
    p, r = metrics.precision_recall(cloud, corner, k=3)
    assert p == 1.0 and r < 0.3


def test_density_coverage_on_constructed_clouds():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(400, 3))
    fake = rng.normal(size=(400, 3))
    density, coverage = metrics.density_coverage(real, fake, k=5)
    assert 0.7 < density < 1.3 and coverage > 0.8
    density, coverage = metrics.density_coverage(real, fake + 100.0, k=5)
    assert density == 0.0 and coverage == 0.0
    corner = real[np.argsort(real[:, 0])[:20]]
    _, coverage = metrics.density_coverage(real, corner, k=5)
    assert coverage < 0.2


def test_nearest_neighbors_and_diversity():
    ref = np.array([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
    q = np.array([[0.0, 1.0], [3.0, 4.0]])
    d, idx = metrics.nearest_neighbors(q, ref)
    np.testing.assert_allclose(d, [1.0, 0.0], atol=1e-12)
    assert idx.tolist() == [0, 1]
    d, idx = metrics.nearest_neighbors(ref, ref, exclude_self=True)
    np.testing.assert_allclose(d, [5.0, 5.0, np.sqrt(65.0)], atol=1e-12)
    np.testing.assert_allclose(metrics.knn_radii(ref, 1), d, atol=1e-12)
    # Mean pairwise distance of the 3 points: (5 + 10 + sqrt(65)) / 3; a collapsed set gives 0.
    assert metrics.mean_pairwise_distance(ref) == pytest.approx((5 + 10 + np.sqrt(65)) / 3)
    assert metrics.mean_pairwise_distance(np.ones((5, 2))) == 0.0
