"""Distribution metrics on feature vectors: pure maths, no models, no files.

Every function takes feature matrices of shape (N, D) (numpy arrays or torch tensors) and works
in float64 so that results do not depend on the device or on summation order at float32 noise.
The evaluation (`mdgen_helpers.evaluate`) feeds them classifier or Inception features.

- Fréchet distance (Heusel et al. 2017): distance between Gaussians fitted to the two sets,
  FD = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).
- KID (Bińkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / D + 1)^3, averaged over random subsets; unbiased, so ~0 for one distribution.
- Precision / recall (Kynkäänniemi et al. 2019): the share of one set that falls inside the
  other's k-NN manifold (union of balls reaching each point's k-th nearest neighbour).
- Density / coverage (Naeem et al. 2020): density counts how many real balls hold each fake
  point (robust to real outliers); coverage is the share of real balls that hold any fake point.
- Nearest-neighbour distances, for memorisation checks and diversity.
"""

from __future__ import annotations

import numpy as np


def as_float64(x) -> np.ndarray:
    """(N, D) float64 numpy copy of a numpy array or torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must have shape (N, D), got {x.shape}")
    return x


# --- Fréchet distance ------------------------------------------------------------------------

def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N-1) covariance of the rows of `features`."""
    x = as_float64(features)
    if x.shape[0] < 2:
        raise ValueError("need at least 2 samples to estimate a covariance")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """FD between N(mu1, sigma1) and N(mu2, sigma2).

    Tr((S1 S2)^(1/2)) is computed as Tr((A S2 A)^(1/2)) with A = S1^(1/2): A S2 A is symmetric
    PSD and has the same eigenvalues as S1 S2, so eigh is exact where scipy's general sqrtm can
    return complex round-off for singular covariances (fewer samples than dimensions).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    a = _psd_sqrt(s1)
    eig = np.linalg.eigvalsh(a @ s2 @ a)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean, 0.0))


def frechet_distance(features_a, features_b) -> float:
    """FD between Gaussians fitted to two feature sets. Biased upward for small N: compare only
    with a baseline computed at the same sample sizes."""
    return frechet_distance_from_stats(*gaussian_stats(features_a), *gaussian_stats(features_b))


# --- KID / MMD ---------------------------------------------------------------------------------

def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    """KID's kernel k(x, y) = (x.y / D + coef0)^degree."""
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x, y, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased MMD^2 estimate (diagonal terms of k(x,x) and k(y,y) left out)."""
    x, y = as_float64(x), as_float64(y)
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError("MMD needs at least 2 samples per set")
    kxx = polynomial_kernel(x, x, degree, coef0)
    kyy = polynomial_kernel(y, y, degree, coef0)
    kxy = polynomial_kernel(x, y, degree, coef0)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kernel_inception_distance(
    features_a, features_b, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0,
    degree: int = 3, coef0: float = 1.0,
) -> tuple[float, float]:
    """KID = mean (and std) of unbiased MMD^2 over random subsets (without replacement inside a
    subset). The subset size is capped by the smaller set, as torch-fidelity does."""
    a, b = as_float64(features_a), as_float64(features_b)
    size = min(subset_size, a.shape[0], b.shape[0])
    rng = np.random.default_rng(seed)
    vals = [
        mmd2_unbiased(a[rng.choice(a.shape[0], size, replace=False)],
                      b[rng.choice(b.shape[0], size, replace=False)], degree, coef0)
        for _ in range(num_subsets)
    ]
    return float(np.mean(vals)), float(np.std(vals))


# --- nearest neighbours --------------------------------------------------------------------------

def pairwise_distances(a, b, chunk: int = 2048) -> np.ndarray:
    """Euclidean distances (len(a), len(b)), chunked over rows of `a` to bound memory."""
    a, b = as_float64(a), as_float64(b)
    bb = (b * b).sum(1)
    out = np.empty((a.shape[0], b.shape[0]))
    for i in range(0, a.shape[0], chunk):
        x = a[i:i + chunk]
        d2 = (x * x).sum(1)[:, None] + bb[None, :] - 2.0 * x @ b.T
        out[i:i + chunk] = np.sqrt(np.clip(d2, 0, None))
    return out


def nearest_neighbors(query, reference, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Distance to, and index of, each query row's nearest reference row. With `exclude_self`
    (query is reference) a point is not its own neighbour."""
    d = pairwise_distances(query, reference)
    if exclude_self:
        if d.shape[0] != d.shape[1]:
            raise ValueError("exclude_self needs query and reference to be the same set")
        np.fill_diagonal(d, np.inf)
    idx = d.argmin(axis=1)
    return d[np.arange(d.shape[0]), idx], idx


def knn_radii(features, k: int) -> np.ndarray:
    """Distance from each point to its k-th nearest other point (the k-NN ball radius)."""
    x = as_float64(features)
    if x.shape[0] <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} points, got {x.shape[0]}")
    d = pairwise_distances(x, x)
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def mean_pairwise_distance(features) -> float:
    """Mean distance between distinct points: a simple diversity figure (0 = mode collapse)."""
    x = as_float64(features)
    n = x.shape[0]
    if n < 2:
        return 0.0
    d = pairwise_distances(x, x)
    return float(d.sum() / (n * (n - 1)))


# --- manifold estimates ----------------------------------------------------------------------------

def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019. Precision: share of fake points inside the real k-NN manifold
    (fidelity). Recall: share of real points inside the fake k-NN manifold (coverage of modes)."""
    real, fake = as_float64(real), as_float64(fake)
    r_real, r_fake = knn_radii(real, k), knn_radii(fake, k)
    d = pairwise_distances(fake, real)  # (n_fake, n_real)
    precision = (d <= r_real[None, :]).any(axis=1).mean()
    recall = (d.T <= r_fake[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def density_coverage(real, fake, k: int = 5) -> tuple[float, float]:
    """Naeem et al. 2020. Density: mean number of real k-NN balls holding a fake point, divided
    by k (≈1 for matching distributions, can exceed 1). Coverage: share of real points whose
    ball holds at least one fake point."""
    real, fake = as_float64(real), as_float64(fake)
    r_real = knn_radii(real, k)
    inside = pairwise_distances(fake, real) <= r_real[None, :]  # (n_fake, n_real)
    density = inside.sum() / (k * fake.shape[0])
    coverage = inside.any(axis=0).mean()
    return float(density), float(coverage)
