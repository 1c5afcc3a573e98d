"""Physical read-offs from a rendered micro-Doppler spectrogram.

The simulator's realism tests and the evaluation's physics check share these functions, so that a
generated image is judged with the same ruler as the simulated training data. Everything works
from the image alone plus the radar settings saved in users.json["radar"]:

- `image_to_power`: invert the jet colormap (`colormap.colormap_index`, the nearest LUT entry) and
  the colour scaling back to dB relative to the image maximum (`db_range`, `color_gamma` of the radar).
- `row_velocities`: the velocity of every image row (row 0 = most positive, approaching).
- `torso_velocity`: the median over time of each column's strongest row (the torso, the
  largest scatterer), ignoring the zero-Doppler clutter band.
- `envelope`: per-column velocity below which a given fraction of the (noise-subtracted) power lies
  (the percentile method of van Dorp & Groen, 2008). 0.97 traces the feet, 0.5 the body.
- `step_rate`: the dominant periodicity of the upper envelope (each step throws one foot forward).
- `gait_features` + `user_probe_accuracy`: a small linear probe (softmax regression, numpy) that
  tells how recognisable the users of a set of images are.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from mdgen_helpers.colormap import colormap_index, colormap_lut_tensor, run_middle_index
from mdgen_helpers.errors import MdgenError


@lru_cache(maxsize=4)
def _lut(colormap: str = "jet") -> tuple[torch.Tensor, torch.Tensor]:
    lut = colormap_lut_tensor(colormap)
    return lut, run_middle_index(lut)


def to_uint8_image(image) -> np.ndarray:
    """uint8 (H, W, 3) from uint8 HxWx3, or from a float tensor/array (3, H, W) in [-1, 1]."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy()
    a = np.asarray(image)
    if a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3:
        return a
    if a.ndim == 3 and a.shape[0] == 3 and np.issubdtype(a.dtype, np.floating):
        return np.clip(np.round((a.transpose(1, 2, 0) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    raise MdgenError(f"physics: expected a uint8 (H, W, 3) image or a float (3, H, W) array in [-1, 1], "
                     f"got dtype {a.dtype} shape {a.shape}")


def image_to_power(image, db_range: float = 50.0, colormap: str = "jet", color_gamma: float = 1.0) -> np.ndarray:
    """dB relative to the image maximum, (H, W), in [-db_range, 0], by nearest-colour inversion.

    The inverse of `simulate.render`: pass the data set's `radar["db_range"]` and
    `radar["color_gamma"]` (as `_power` does) to get its dB scale; the defaults match the default style.
    """
    rgb = torch.from_numpy(to_uint8_image(image).transpose(2, 0, 1).copy())[None].float() / 127.5 - 1.0
    lut, middle = _lut(colormap)
    idx, _ = colormap_index(rgb, lut)
    level = middle[idx[0]].numpy() / 255.0
    if color_gamma != 1.0:
        level = level ** (1.0 / float(color_gamma))
    return (level - 1.0) * float(db_range)


def row_velocities(radar: dict, n_rows: int = None) -> np.ndarray:
    """Velocity (m/s) at the centre of each image row; row 0 is the most positive velocity."""
    n = int(n_rows or radar["n_doppler"])
    return np.linspace(float(radar["v_max"]), float(radar["v_min"]), n)


def _power(image, radar: dict) -> np.ndarray:
    """dB image on the data set's own scale (users.json "radar"; data sets older than the
    colour scaling have no color_gamma, i.e. 1)."""
    return image_to_power(image, float(radar.get("db_range", 50.0)), radar.get("colormap", "jet"),
                          float(radar.get("color_gamma", 1.0)))


def torso_velocity(image, radar: dict, min_speed: float = 0.25) -> float:
    """Torso radial velocity (m/s): the median over time of each column's strongest row.

    The torso is the largest scatterer, so it is the strongest return in almost every column;
    the median over columns averages out its +-0.2 m/s gait oscillation and the moments a limb
    outshines it. Rows with |v| < min_speed (static clutter) are ignored.
    """
    db = _power(image, radar)
    v = row_velocities(radar, db.shape[0])
    db = np.where((np.abs(v) < min_speed)[:, None], -np.inf, db)
    return float(np.median(v[np.argmax(db, axis=0)]))


def _noise_free_power(db: np.ndarray, margin_db: float = 6.0) -> np.ndarray:
    """Linear power with the noise floor (the image median + margin) subtracted and clipped at 0."""
    p = 10 ** (db / 10)
    floor = 10 ** ((np.median(db) + margin_db) / 10)
    return np.maximum(p - floor, 0.0)


def envelope(image, radar: dict, quantile: float = 0.97) -> np.ndarray:
    """Per column, the velocity below which `quantile` of the column's signal power lies (NaN if none)."""
    return envelope_from_db(_power(image, radar), radar, quantile)


def envelope_from_db(db: np.ndarray, radar: dict, quantile: float) -> np.ndarray:
    """`envelope` on an already inverted dB image (saves the colormap inversion)."""
    if not 0.0 < quantile < 1.0:
        raise MdgenError(f"physics.envelope: quantile must be in (0, 1), got {quantile}")
    v = row_velocities(radar, db.shape[0])
    p = _noise_free_power(db)[::-1]  # bottom row (most negative velocity) first
    total = p.sum(axis=0)
    cum = np.cumsum(p, axis=0) / np.where(total > 0, total, 1.0)
    first = np.argmax(cum >= quantile, axis=0)
    out = v[::-1][first].astype(float)
    out[total <= 0] = np.nan
    return out


def column_dt(radar: dict, n_cols: int = None) -> float:
    """Seconds between image columns (rescaled when the image width differs from n_time)."""
    n = int(n_cols or radar["n_time"])
    span = float(radar["column_t1_s"]) - float(radar["column_t0_s"])
    return span / max(n - 1, 1)


def dominant_frequency(series: np.ndarray, dt: float, fmin: float, fmax: float) -> float:
    """Frequency (Hz) of the strongest spectral peak of a detrended series within [fmin, fmax]."""
    x = np.asarray(series, dtype=float)
    ok = np.isfinite(x)
    if ok.sum() < 8:
        return float("nan")
    idx = np.arange(len(x))
    x = np.interp(idx, idx[ok], x[ok])
    x = x - np.polyval(np.polyfit(idx, x, 1), idx)
    nfft = 8192
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x)), n=nfft))
    f = np.fft.rfftfreq(nfft, dt)
    band = np.flatnonzero((f >= fmin) & (f <= fmax))
    k = band[np.argmax(spec[band])]
    if 0 < k < len(spec) - 1:  # parabolic refinement of the peak
        a, b, c = np.log(spec[k - 1 : k + 2] + 1e-12)
        k = k + 0.5 * (a - c) / (a - 2 * b + c)
    return float(k * (f[1] - f[0]))


def step_rate(image, radar: dict, fmin: float = 1.0, fmax: float = 3.5, quantile: float = 0.97) -> float:
    """Steps per second: the dominant periodicity of the upper envelope (the swinging feet)."""
    env = envelope(image, radar, quantile)
    return dominant_frequency(env, column_dt(radar, len(env)), fmin, fmax)


# ----------------------------------------------------------------------------------------------
# A small linear probe: how recognisable are users from these images?
# ----------------------------------------------------------------------------------------------


def gait_features(image, radar: dict, bands: int = 16, mod_bins: int = 24) -> np.ndarray:
    """Time-shift invariant features: Doppler profile, envelope statistics, per-band modulation spectra."""
    db = _power(image, radar)
    h, w = db.shape
    profile = db.reshape(64, h // 64, w).mean(axis=(1, 2)) if h % 64 == 0 else np.interp(
        np.linspace(0, h - 1, 64), np.arange(h), db.mean(axis=1))
    envs = [envelope_from_db(db, radar, q) for q in (0.05, 0.25, 0.5, 0.75, 0.95)]
    env_stats = np.concatenate([[np.nanmean(e), np.nanstd(e)] for e in envs])
    band = db[: (h // bands) * bands].reshape(bands, h // bands, w).mean(axis=1)
    band = band - band.mean(axis=1, keepdims=True)
    mod = np.abs(np.fft.rfft(band * np.hanning(w), axis=1))[:, 1 : mod_bins + 1] / w
    feats = np.concatenate([profile / 10.0, env_stats, np.log1p(mod).ravel()])
    return np.nan_to_num(feats, nan=0.0)


def fit_softmax(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float = 1e-3, steps: int = 300,
                lr: float = 0.5):
    """Multinomial logistic regression by full-batch gradient descent with momentum (deterministic)."""
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = (x - mean) / std
    n, d = z.shape
    w = np.zeros((d, num_classes))
    b = np.zeros(num_classes)
    onehot = np.eye(num_classes)[y]
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    for _ in range(steps):
        logits = z @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        g = (p - onehot) / n
        gw = z.T @ g + l2 * w
        gb = g.sum(axis=0)
        vw = 0.9 * vw - lr * gw
        vb = 0.9 * vb - lr * gb
        w += vw
        b += vb

    def predict(xq: np.ndarray) -> np.ndarray:
        return np.argmax(((xq - mean) / std) @ w + b, axis=1)

    return predict


def user_probe_accuracy(train_x, train_y, test_x, test_y) -> float:
    """Test accuracy of a softmax-regression probe trained on features of the train images."""
    train_y = np.asarray(train_y)
    predict = fit_softmax(np.asarray(train_x), train_y, int(max(train_y.max(), np.max(test_y)) + 1))
    return float(np.mean(predict(np.asarray(test_x)) == np.asarray(test_y)))
