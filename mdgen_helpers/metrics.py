"""Every number the evaluation reports, as functions of features, images or read-offs.

The distribution metrics take feature matrices (N, D) (numpy arrays or torch tensors) and work
in float64 so that results do not depend on the device or on summation order at float32 noise.
The evaluation (`mdgen_helpers.evaluate`) feeds them classifier or Inception features; the
metric families on top (recognisability, realism/diversity, memorisation, physics) combine them
with their real-vs-real baselines. PSNR/SSIM measure tokenizer reconstructions.

- Fréchet distance (Heusel et al. 2017): distance between Gaussians fitted to the two sets,
  FD = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).
- KID (Bińkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / D + 1)^3, averaged over random subsets; unbiased, so ~0 for one distribution.
- Precision / recall (Kynkäänniemi et al. 2019): the share of one set that falls inside the
  other's k-NN manifold (union of balls reaching each point's k-th nearest neighbour).
- Density / coverage (Naeem et al. 2020): density counts how many real balls hold each fake
  point (robust to real outliers); coverage is the share of real balls that hold any fake point.
- Nearest-neighbour distances, for memorisation checks and diversity.
- Uncertainty: bootstrap intervals (resampling every side), `fd_ratio` against a held-out real
  baseline, paired differences over seeds with Student-t intervals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from mdgen_helpers import physics
from mdgen_helpers.classifier import ImageSet, UserClassifier, classification_report, embed, load_images, read_rgb
from mdgen_helpers.files import read_json
from mdgen_helpers.users import UserMap

RECOGNISABILITY_TARGET = 0.8


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


# --------------------------------------------------------------------------------------------
# Image quality (tokenizer reconstructions)
# --------------------------------------------------------------------------------------------

def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak = 1 after mapping to [0, 1])."""
    mse = ((a.float() - b.float()) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004): 11x11 Gaussian window (sigma 1.5), K1=0.01, K2=0.03,
    data range 1 (images mapped from [-1, 1] to [0, 1]), valid-window mean over pixels and
    channels. Same formula as skimage's `structural_similarity(gaussian_weights=True)` up to border handling.
    Computed in float64: var = E[x^2] - E[x]^2 cancels, and float32 round-off is then not
    negligible next to C2 = 9e-4 (it shifts SSIM in the 4th digit). Returned as float32."""
    a = (a.double() + 1) / 2
    b = (b.double() + 1) / 2
    c = a.shape[1]
    x = torch.arange(window, dtype=torch.float64, device=a.device) - (window - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = torch.outer(g, g).expand(c, 1, window, window).contiguous()

    def filt(t):
        return F.conv2d(t, kernel, groups=c)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()


# --- uncertainty: bootstrap and paired intervals ------------------------------------------------------

def bootstrap_interval(stat, samples, num: int = 200, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of `stat(*resampled)` where each array in `samples` is resampled by rows
    with replacement, independently (so the uncertainty of every side is counted)."""
    arrays = [np.asarray(s) for s in samples]
    rng = np.random.default_rng(seed)
    vals = [stat(*[a[rng.integers(0, len(a), len(a))] for a in arrays]) for _ in range(num)]
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(vals, alpha)), float(np.quantile(vals, 1.0 - alpha))


def fd_ratio(generated, baseline, reference, num_bootstrap: int = 200, seed: int = 0,
             level: float = 0.95) -> dict:
    """FD(generated, reference) / FD(baseline, reference), with bootstrap intervals (all three sets
    resampled) for the ratio and both distances. `baseline` is held-out real data of the same size
    as `generated`, so ~1 means the generated set is as far from `reference` as another real
    sample is."""
    gen, base, ref = as_float64(generated), as_float64(baseline), as_float64(reference)
    if len(gen) != len(base):
        raise ValueError(f"fd_ratio needs matched sizes, got {len(gen)} generated and {len(base)} baseline")

    def both(g, b, r):
        # FD(x, r) through thin SVDs: sqrt(S_r) = V diag(s / sqrt(n_r - 1)) V^T from the centred
        # reference, and Tr((A S_x A)^(1/2)) from the eigenvalues of the small Gram matrix of
        # y = X_c V diag(s / sqrt(n_r - 1)). Same value as `frechet_distance`, but at the cost of
        # the sample sizes instead of a D x D eigendecomposition, so bootstraps stay cheap.
        mu_r = r.mean(0)
        _, sv, vt = np.linalg.svd(r - mu_r, full_matrices=False)
        scale = sv / np.sqrt(len(r) - 1)
        out = []
        for x in (g, b):
            mu = x.mean(0)
            y = ((x - mu) @ vt.T) * scale
            gram = y @ y.T if y.shape[0] <= y.shape[1] else y.T @ y
            tr = np.sqrt(np.clip(np.linalg.eigvalsh(gram / (len(x) - 1)), 0, None)).sum()
            d = mu - mu_r
            out.append(max(d @ d + ((x - mu) ** 2).sum() / (len(x) - 1) + (scale ** 2).sum() - 2.0 * tr, 0.0))
        return np.array([out[0], out[1], out[0] / max(out[1], 1e-12)])

    point = both(gen, base, ref)
    rng = np.random.default_rng(seed)
    reps = np.array([both(*[x[rng.integers(0, len(x), len(x))] for x in (gen, base, ref)])
                     for _ in range(num_bootstrap)]).reshape(-1, 3)
    alpha = (1.0 - level) / 2.0
    # Resampling with replacement duplicates rows, which by itself inflates FD (a bias as large as
    # the spread in 512-d); the interval keeps the bootstrap's spread but is re-centred on the
    # estimate (percentiles shifted by the bootstrap median's bias).
    iv = (lambda j: [max(float(np.quantile(reps[:, j], q) - np.median(reps[:, j]) + point[j]), 0.0)
                     for q in (alpha, 1 - alpha)] if num_bootstrap else [float("nan")] * 2)  # FD >= 0
    return {"ratio": float(point[2]), "interval": iv(2), "fd_generated": float(point[0]),
            "fd_generated_interval": iv(0), "fd_baseline": float(point[1]), "fd_baseline_interval": iv(1),
            "level": level, "num_bootstrap": int(num_bootstrap)}


def proportion_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Equal-tailed interval of the Beta(k + 1, n - k + 1) posterior of a proportion k/n (uniform
    prior): it stays honest at 0 or n successes, where a bootstrap collapses to a point."""
    alpha = (1.0 - level) / 2.0
    return float(stats.beta.ppf(alpha, k + 1, n - k + 1)), float(stats.beta.ppf(1.0 - alpha, k + 1, n - k + 1))


def proportion_ratio_interval(k1: int, n1: int, k2: int, n2: int, level: float = 0.95, num: int = 20000,
                              seed: int = 0) -> tuple[float, float]:
    """Interval for (k1/n1) / (k2/n2): quantiles of the ratio of the two posteriors
    Beta(k + 1, n - k + 1), sampled with a seeded generator. Coverage of a true ratio 1 measured
    by simulation (n = 45 vs 90, p = 0.1 ... 0.98): 95-98%; Jeffreys' prior gave 93-96% and
    excluded 1 for 45/45 vs 84/90, which Fisher's exact test calls insignificant (p = 0.18)."""
    rng = np.random.default_rng(seed)
    r = rng.beta(k1 + 1, n1 - k1 + 1, num) / rng.beta(k2 + 1, n2 - k2 + 1, num)
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(r, alpha)), float(np.quantile(r, 1.0 - alpha))


def paired_difference(a, b, level: float = 0.95) -> dict:
    """Mean of a - b over paired runs (same seed) with a Student-t interval over the pairs."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    mean = float(d.mean())
    if len(d) < 2:
        return {"mean": mean, "interval": [float("nan"), float("nan")], "per_seed": d.tolist(), "level": level}
    half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return {"mean": mean, "interval": [mean - half, mean + half], "per_seed": d.tolist(), "level": level}


def paired_ratio(a, b, level: float = 0.95) -> dict:
    """Mean of a / b over paired runs (same seed) with a Student-t interval over the pairs."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return paired_difference(a / b, np.zeros_like(a), level)


# --------------------------------------------------------------------------------------------
# The metric families of the evaluation (each callable alone from a notebook)
# --------------------------------------------------------------------------------------------

def recognisability(clf: UserClassifier, generated: ImageSet, real_test_accuracy: float,
                    probs: np.ndarray | None = None, test_correct: np.ndarray | None = None,
                    seed: int = 0) -> dict[str, Any]:
    """Classifier accuracy on generated images, overall and per user, and its ratio to real-test.
    With `test_correct` (per real-test image, 1 = right) the accuracy and the ratio get intervals
    (`proportion_interval`, `proportion_ratio_interval`)."""
    rep = classification_report(clf.model, generated, clf.user_map, probs)
    rep["real_test_accuracy"] = real_test_accuracy
    rep["ratio_to_real_test"] = rep["accuracy"] / real_test_accuracy if real_test_accuracy > 0 else float("nan")
    if test_correct is not None:
        if probs is None:
            _, probs = embed(clf.model, generated.images)
        k_gen, n_gen = int((probs.argmax(1) == generated.labels.numpy()).sum()), len(generated)
        k_test, n_test = int(np.sum(test_correct)), len(test_correct)
        rep["ratio_interval"] = list(proportion_ratio_interval(k_gen, n_gen, k_test, n_test, seed=seed))
        rep["accuracy_interval"] = list(proportion_interval(k_gen, n_gen))
    rep["target_ratio"] = RECOGNISABILITY_TARGET
    rep["meets_target"] = bool(rep["ratio_to_real_test"] >= RECOGNISABILITY_TARGET)
    return rep


def feature_metrics(real: np.ndarray, fake: np.ndarray, *, kid_subsets: int = 100, kid_subset_size: int = 1000,
                    pr_k: int = 3, dc_k: int = 5, seed: int = 0) -> dict[str, Any]:
    """All distribution metrics between two feature sets (real = the reference manifold). KID
    subsets hold at most half of the smaller set, so that they differ and kid_std means something."""
    kid_subset_size = max(2, min(kid_subset_size, len(real) // 2, len(fake) // 2))
    kid, kid_std = kernel_inception_distance(real, fake, kid_subsets, kid_subset_size, seed)
    k = min(pr_k, len(real) - 1, len(fake) - 1)
    kd = min(dc_k, len(real) - 1)
    p, r = precision_recall(real, fake, k)
    d, c = density_coverage(real, fake, kd)
    return {"fd": frechet_distance(real, fake), "kid": kid, "kid_std": kid_std, "precision": p, "recall": r,
            "density": d, "coverage": c, "k_precision_recall": k, "k_density_coverage": kd,
            "mean_pairwise_distance": mean_pairwise_distance(fake), "num_real": len(real),
            "num_fake": len(fake), "kid_subset_size": kid_subset_size}


def realism_diversity(val_feats: np.ndarray, test_feats: np.ndarray, gen_feats: np.ndarray, seed: int = 0,
                      bootstrap: int = 200, **kwargs) -> dict[str, Any]:
    """Generated vs real-test next to the unbiased baseline real-val vs real-test (the classifier
    never trained on val, whereas its train features are tighter than any new sample's), both at
    the same sample size (FD and KID depend on it: the larger set is subsampled). `fd_ratio` =
    FD(generated, test) / FD(val, test) with a bootstrap interval over all three sets."""
    n = min(len(gen_feats), len(val_feats))
    rng = np.random.default_rng(seed)
    gen_sub = gen_feats[np.sort(rng.choice(len(gen_feats), n, replace=False))]
    val_sub = val_feats[np.sort(rng.choice(len(val_feats), n, replace=False))]
    return {"space": "user-classifier penultimate features (512-d)", "matched_size": int(n),
            "generated_vs_test": feature_metrics(test_feats, gen_sub, seed=seed, **kwargs),
            "baseline_val_vs_test": feature_metrics(test_feats, val_sub, seed=seed, **kwargs),
            "fd_ratio": fd_ratio(gen_sub, val_sub, test_feats, bootstrap, seed),
            "real_test_mean_pairwise_distance": mean_pairwise_distance(test_feats)}


def inception_metrics(weights_path: str | None, real_val: Sequence[Path], real_test: Sequence[Path],
                      generated: Sequence[Path], device: torch.device, seed: int = 0, batch_size: int = 32,
                      kid_subsets: int = 100, kid_subset_size: int = 1000, bootstrap: int = 200) -> dict[str, Any]:
    """Inception-v3 FID/KID (generated vs real-test, baseline real-val vs real-test at the same
    sample size, and their ratio `fid_ratio` with a bootstrap interval) through
    torchmetrics' FID network (torch-fidelity port of the TF Inception). Skipped, with the reason,
    when the weights file or the library is missing: nothing is ever downloaded here."""
    if not weights_path:
        return {"skipped": "no Inception weights given (--inception_weights PATH to the torch-fidelity "
                           "weights-inception-2015-12-05 .pth); nothing is downloaded at run time"}
    if not Path(weights_path).is_file():
        return {"skipped": f"Inception weights {weights_path} not found"}
    try:
        from torchimage.fid import FrechetInceptionDistance
    except ImportError:
        return {"skipped": "torchmetrics with its image extra is not installed (pip install 'torchmetrics[image]')"}
    try:
        fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights_path)).to(device)
        net = fid.inception.eval()

        @torch.no_grad()
        def feats(paths):
            out = []
            for i in range(0, len(paths), batch_size):
                x = load_images(paths[i:i + batch_size], 256).to(device)
                out.append(net(x).double().cpu())
            return torch.cat(out).numpy()

        rng = np.random.default_rng(seed)
        n = min(len(generated), len(real_val))
        gen_pick = [generated[i] for i in np.sort(rng.choice(len(generated), n, replace=False))]
        val_pick = [real_val[i] for i in np.sort(rng.choice(len(real_val), n, replace=False))]
        f_test, f_gen, f_val = feats(list(real_test)), feats(gen_pick), feats(val_pick)
    except Exception as e:  # noqa: BLE001 - an optional metric must not sink the evaluation
        return {"skipped": f"Inception feature extraction failed ({type(e).__name__}: {e})"}
    out = {}
    size = max(2, min(kid_subset_size, n // 2, len(f_test) // 2))
    for name, f in (("generated_vs_test", f_gen), ("baseline_val_vs_test", f_val)):
        kid, kid_std = kernel_inception_distance(f_test, f, kid_subsets, size, seed)
        out[name] = {"fid": frechet_distance(f_test, f), "kid": kid, "kid_std": kid_std, "num_fake": len(f)}
    out["fid_ratio"] = fd_ratio(f_gen, f_val, f_test, bootstrap, seed)
    out["weights"] = str(weights_path)
    return out


def pixel_vectors(images: torch.Tensor, size: int) -> np.ndarray:
    """Flattened [0, 1] pixels at `size` px: a memorisation check that does not trust any network."""
    x = images.float() / 255.0
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.flatten(1).numpy()


def memorisation(train_feats, test_feats, gen_feats, train_pix, test_pix, gen_pix, gen_files: Sequence[Path],
                 train_files: Sequence[Path], percentile: float = 1.0) -> dict[str, Any]:
    """Nearest-train distances of generated vs real-test images, in feature and pixel space.

    Rule: a generated image is a near-copy when, in either space, it is closer to its nearest
    training image than `percentile`% of real-test images are to theirs. A generator that does not
    copy gets about `percentile`% flagged per space, like held-out real data.
    """
    out: dict[str, Any] = {"rule": f"flagged when nearer to a training image than the {percentile:g}th percentile "
                                   f"of real-test nearest-train distances, in feature or pixel space",
                           "expected_fraction_per_space": percentile / 100.0}
    flagged = np.zeros(len(gen_files), dtype=bool)
    nn_index, dists = {}, {}
    for space, tr, te, ge in (("feature", train_feats, test_feats, gen_feats), ("pixel", train_pix, test_pix, gen_pix)):
        d_gen, i_gen = nearest_neighbors(ge, tr)
        d_test, _ = nearest_neighbors(te, tr)
        thr = float(np.percentile(d_test, percentile))
        mask = d_gen < thr
        flagged |= mask
        nn_index[space], dists[space] = i_gen, d_gen
        out[space] = {"generated_nn_median": float(np.median(d_gen)), "generated_nn_min": float(d_gen.min()),
                      "real_test_nn_median": float(np.median(d_test)), "real_test_nn_min": float(d_test.min()),
                      "ratio_of_medians": float(np.median(d_gen) / max(np.median(d_test), 1e-12)),
                      "threshold": thr, "num_flagged": int(mask.sum()), "fraction_flagged": float(mask.mean())}
    out["num_flagged"] = int(flagged.sum())
    out["fraction_flagged"] = float(flagged.mean())
    order = np.argsort(dists["feature"] / max(out["feature"]["threshold"], 1e-12))
    out["near_copies"] = [
        {"generated": str(gen_files[i]), "nearest_train_feature": str(train_files[nn_index["feature"][i]]),
         "nearest_train_pixel": str(train_files[nn_index["pixel"][i]]), "feature_distance": float(dists["feature"][i]),
         "pixel_distance": float(dists["pixel"][i])}
        for i in order if flagged[i]
    ]
    return out


def confidence_filter(probs: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """Keep generated images whose intended user gets classifier probability >= threshold."""
    return probs[np.arange(len(labels)), labels] >= threshold


def physics_check(users_json: Path, user_map: UserMap, generated: tuple[Sequence[Path], Sequence[int]],
                  real_test: tuple[Sequence[Path], Sequence[int]], max_per_user: int | None = 20) -> dict[str, Any]:
    """Torso velocity and step rate read off each image (physics.py, the simulator's own
    estimator) vs each user's ground truth; real-test read-offs are the baseline error (it holds
    the per-image nuisances: aspect angle, speed jitter). The first `max_per_user` images of each
    user and set are read (None: all)."""
    meta = read_json(users_json)
    radar, truth = meta["radar"], meta["users"]
    quantities = (("torso_velocity", physics.torso_velocity, "speed_mps"),
                  ("step_rate", physics.step_rate, "step_rate_hz"))
    out: dict[str, Any] = {"users_json": str(users_json), "max_per_user": max_per_user, "per_user": {}}
    errs = {(q, which): [] for q, _, _ in quantities for which in ("generated", "real_test")}
    for which, (files, labels) in (("generated", generated), ("real_test", real_test)):
        seen: dict[str, int] = {}
        for path, label in zip(files, labels):
            uid = str(user_map.user_of_label(label))
            seen[uid] = seen.get(uid, 0) + 1
            if uid not in truth or (max_per_user is not None and seen[uid] > max_per_user):
                continue
            img = read_rgb(path)
            row = out["per_user"].setdefault(uid, {})
            for q, fn, key in quantities:
                est, gt = float(fn(img, radar)), float(truth[uid][key])
                row.setdefault(f"{q}_truth", gt)
                row.setdefault(f"{q}_{which}", []).append(est)
                errs[(q, which)].append(abs(est - gt))
    for row in out["per_user"].values():  # lists of read-offs -> mean and std
        for k in [k for k, v in row.items() if isinstance(v, list)]:
            v = np.asarray(row[k])
            row[k], row[f"{k}_std"] = float(v.mean()), float(v.std())
    for q, _, _ in quantities:
        for which in ("generated", "real_test"):
            e = errs[(q, which)]
            out[f"{q}_mae_{which}"] = float(np.mean(e)) if e else float("nan")
        # generated error in units of the real baseline error: ~1 = as accurate as real images
        base = out[f"{q}_mae_real_test"]
        out[f"{q}_error_ratio"] = out[f"{q}_mae_generated"] / base if base > 0 else float("nan")
    return out
