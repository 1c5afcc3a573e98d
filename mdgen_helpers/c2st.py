"""Classifier two-sample test (C2ST): can a small CNN tell real images from generated ones?

Lopez-Paz & Oquab 2017. A two-sample test that looks at the pixels at full resolution, so it sees
what a low-resolution user classifier cannot (blocky backgrounds, saturated bands, JPEG vs PNG
artefacts: both sides must come in the same file format). Held-out accuracy 0.5 means the two sets
cannot be told apart; 1.0 means every image gives itself away.

Protocol, per seed: draw a balanced sample (n real, n generated, n = the smaller set), cut each side
into two halves, train on one half of both sides and score the other, then swap (2-fold
cross-fitting), so every drawn image gets one held-out score per seed. The accuracy is the mean
over seeds; its interval is a bootstrap over images (each side resampled separately). The network
is deliberately small: a strided 8x8 first layer brings 256 px down to 63 px before anything else,
which keeps a CPU run to seconds per fold.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def c2st_net(seed: int) -> nn.Module:
    """A four-layer CNN with a strided stem; coarse 4x4 pooling keeps where things are in the image."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        blocks = []
        for cin, cout, k, s in ((3, 16, 8, 4), (16, 32, 3, 2), (32, 64, 3, 2), (64, 64, 3, 2)):
            blocks += [nn.Conv2d(cin, cout, k, s, padding=k // 4 if k > 3 else 1), nn.BatchNorm2d(cout), nn.ReLU()]
        return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, 1))


def _inputs(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images.to(device).float().div_(127.5).sub_(1.0)


def train_and_score(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, *, seed: int, steps: int,
                    batch_size: int = 32, lr: float = 2e-3, device: torch.device | str = "cpu") -> np.ndarray:
    """Fit `c2st_net` on uint8 images (label 1 = generated) for a fixed number of steps; return
    P(generated) for `test_x`. Fixed schedule, no model selection: the held-out half stays unseen."""
    device = torch.device(device)
    model = c2st_net(seed).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.2)
    gen = torch.Generator().manual_seed(seed)
    bs = min(batch_size, len(train_x))
    order: list[int] = []
    model.train()
    for _ in range(steps):
        if len(order) < bs:
            order = torch.randperm(len(train_x), generator=gen).tolist()
        idx, order = order[:bs], order[bs:]
        loss = F.binary_cross_entropy_with_logits(model(_inputs(train_x[idx], device)).squeeze(1),
                                                  train_y[idx].float().to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        out = [torch.sigmoid(model(_inputs(test_x[i:i + 64], device)).squeeze(1)).cpu()
               for i in range(0, len(test_x), 64)]
    return torch.cat(out).double().numpy()


def c2st(real: torch.Tensor, generated: torch.Tensor, *, seeds: Sequence[int] = (0, 1, 2), steps: int = 80,
         batch_size: int = 32, lr: float = 2e-3, bootstrap: int = 1000, level: float = 0.95,
         device: torch.device | str = "cpu") -> dict[str, Any]:
    """C2ST between uint8 image sets (N, 3, H, W). Returns `accuracy` (mean held-out accuracy over
    seeds), `interval`, `per_seed`, and per-image mean held-out P(generated) as `scores_real` /
    `scores_generated` (NaN for images never drawn)."""
    n = min(len(real), len(generated))
    if n < 4:
        raise ValueError(f"C2ST needs at least 4 images per side, got {len(real)} real and {len(generated)} generated")
    sums = [np.zeros(len(real)), np.zeros(len(generated))]
    counts = [np.zeros(len(real)), np.zeros(len(generated))]
    hits = [np.zeros(len(real)), np.zeros(len(generated))]
    per_seed = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        picks = [rng.permutation(len(real))[:n], rng.permutation(len(generated))[:n]]
        halves = [(p[: n // 2], p[n // 2:]) for p in picks]
        correct = 0
        for fold in (0, 1):
            tr = [h[1 - fold] for h in halves]
            te = [h[fold] for h in halves]
            x = torch.cat([real[tr[0]], generated[tr[1]]])
            y = torch.cat([torch.zeros(len(tr[0])), torch.ones(len(tr[1]))])
            p = train_and_score(x, y, torch.cat([real[te[0]], generated[te[1]]]), seed=seed * 2 + fold,
                                steps=steps, batch_size=batch_size, lr=lr, device=device)
            for side, idx, score in ((0, te[0], p[:len(te[0])]), (1, te[1], p[len(te[0]):])):
                right = (score >= 0.5) == bool(side)
                sums[side][idx] += score
                counts[side][idx] += 1
                hits[side][idx] += right
                correct += int(right.sum())
        per_seed.append(correct / (2 * n))
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = [s / c for s, c in zip(sums, counts)]
    drawn = [np.flatnonzero(c > 0) for c in counts]
    h, c = [hits[s][drawn[s]] for s in (0, 1)], [counts[s][drawn[s]] for s in (0, 1)]
    rng = np.random.default_rng(12345)
    boot = []
    for _ in range(bootstrap):
        r = [rng.integers(0, len(h[s]), len(h[s])) for s in (0, 1)]
        boot.append(sum(h[s][r[s]].sum() for s in (0, 1)) / sum(c[s][r[s]].sum() for s in (0, 1)))
    alpha = (1 - level) / 2
    return {"accuracy": float(np.mean(per_seed)), "interval": [float(np.quantile(boot, alpha)),
                                                               float(np.quantile(boot, 1 - alpha))],
            "level": level, "per_seed": [float(a) for a in per_seed], "num_per_side": int(n),
            "seeds": [int(s) for s in seeds], "steps": int(steps), "batch_size": int(min(batch_size, n // 2 * 2)),
            "image_size": int(real.shape[-1]), "scores_real": scores[0], "scores_generated": scores[1]}
