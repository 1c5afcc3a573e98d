"""The tokenizer's realism ceiling, and a residual-texture decoder prototype (issue #15).

Why: a generator can only look as real as its tokenizer's reconstructions. This measures the
two-sample test (`c2st.c2st`, 256 px, the evaluation's CNN) of real-train against

* `real`: real val/test image files themselves (the test's calibration, ~0.5; decoding them and
  writing them again as JPEG q95 is detected at ~0.93, so every other side is encoded once, from
  pixels, as generated images are),
* `recon`: the same images encoded and decoded by the work folder's tokenizer,
* `texture`: those reconstructions plus a synthesised residual (prototype, not shipped): per
  decoded-level residual quantiles (`--bins`, optionally x `--blur_bins` levels of the 9x9 mean)
  sampled through a Gaussian copula whose spectrum is the residuals' mean power spectrum, then
  rendered on the colormap LUT like the simulator renders,
* `generated+texture`: the same on latents sampled from the work folder's run (euler 16, guidance 4).

All sides go through the JPEG q95 export, like the real data. Colormap stand-in tokenizers only.

    PYTHONPATH=. python benchmarks/bench_realism_ceiling.py --work_dir mdgen_runs/demo --sides real recon texture
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from mdgen_helpers import c2st as c2st_mod, data
from mdgen_helpers.classifier import load_images, load_split_part
from mdgen_helpers.generate import decode_to_uint8, image_seed, load_generator, sample_latents, write_dataset_jpeg
from mdgen_helpers.metrics import psnr
from mdgen_helpers.settings import SamplingSettings
from mdgen_helpers.tokenizers import ColormapPCATokenizer, load_tokenizer

QUANTILES = 64


class ResidualTexture:
    """Residual s - decode_scalar(encode(s)) modelled per decoded level: quantiles + spectrum."""

    def __init__(self, tok: ColormapPCATokenizer, train_images: torch.Tensor, bins: int, blur_bins: int):
        self.tok, self.bins, self.blur_bins = tok, bins, blur_bins
        s = tok.image_to_scalar(train_images)
        sh = tok.decode_scalar(tok.encode(train_images)[0])
        r = s - sh
        keys = self.keys(sh)
        qs = torch.linspace(0.5 / QUANTILES, 1 - 0.5 / QUANTILES, QUANTILES)
        gen = torch.Generator().manual_seed(0)
        self.q = torch.zeros(bins * blur_bins, QUANTILES)
        sig = torch.zeros(bins * blur_bins)
        for k in range(bins * blur_bins):
            v = r[keys == k]
            v = v if v.numel() > 100 else r.flatten()
            v = v[torch.randperm(v.numel(), generator=gen)[:200_000]]
            self.q[k], sig[k] = torch.quantile(v, qs), v.std()
        rn = r / sig[keys].clamp_min(1e-3)
        self.amplitude = (torch.fft.rfft2(rn).abs() ** 2).mean(0).sqrt()

    def keys(self, sh: torch.Tensor) -> torch.Tensor:
        blur = F.avg_pool2d(sh.unsqueeze(1), 9, 1, 4, count_include_pad=False)[:, 0]
        return ((sh.clamp(0, 1) * (self.bins - 1)).round().long() * self.blur_bins
                + (blur.clamp(0, 1) * (self.blur_bins - 1)).round().long())

    def decode(self, latents: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """uint8 (N, 3, 256, 256): decoded scalar + residual texture, through the colormap LUT."""
        sh = self.tok.decode_scalar(latents)
        w = torch.randn(sh.shape, generator=torch.Generator().manual_seed(seed))
        g = torch.fft.irfft2(torch.fft.rfft2(w) * self.amplitude, s=sh.shape[-2:])
        g = g / g.std()
        u = 0.5 * (1 + torch.erf(g / math.sqrt(2)))
        qi = (u * QUANTILES - 0.5).clamp(0, QUANTILES - 1)
        lo = qi.floor().long()
        hi = (lo + 1).clamp(max=QUANTILES - 1)
        k = self.keys(sh)
        s = (sh + self.q[k, lo] * (1 - (qi - lo)) + self.q[k, hi] * (qi - lo)).clamp(0, 1)
        idx = torch.searchsorted(self.tok.scalar_of_index.contiguous(), s.contiguous()).clamp(0, 255)
        rgb = self.tok.lut[idx].permute(0, 3, 1, 2)
        return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", required=True)
    p.add_argument("--sides", nargs="+", default=["real", "recon", "texture", "generated+texture"])
    p.add_argument("--bins", type=int, default=32)
    p.add_argument("--blur_bins", type=int, default=1)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--c2st_seeds", type=int, nargs="+", default=[0])
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    split = data.load_split(work / "split.json")
    tok = load_tokenizer(work / "tokenizer.safetensors")
    files = [work / "data" / f for f in split.files("val") + split.files("test")][: args.images]
    x = torch.stack([data.load_image(f) for f in files])
    train = load_split_part(work / "data", split, "train", 256)
    texture = None
    if any("texture" in s for s in args.sides):
        fit = torch.stack([data.load_image(work / "data" / f) for f in split.files("train")[:200]])
        texture = ResidualTexture(tok, fit, args.bins, args.blur_bins)
    for side in args.sides:
        if side == "real":  # the files as they are: re-encoding a JPEG is itself detectable (C2ST ~0.93)
            res = c2st_mod.c2st(train.images, load_images(files, 256), seeds=args.c2st_seeds, steps=60)
            print(f"real: C2ST {res['accuracy']:.3f} [{res['interval'][0]:.3f}, {res['interval'][1]:.3f}]", flush=True)
            continue
        if side == "recon":
            images = decode_to_uint8(tok, tok.encode(x)[0])
        elif side == "texture":
            images = texture.decode(tok.encode(x)[0])
        elif side == "generated+texture":
            gen = load_generator(work / "run")
            users = [gen.user_map.user_of_label(c) for c in range(gen.num_users)]
            per = max(1, args.images // len(users))
            ids = [u for u in users for _ in range(per)]
            seeds = [image_seed(0, u, k) for u in users for k in range(1, per + 1)]
            z = sample_latents(gen, ids, seeds, SamplingSettings(num_steps=16, solver="euler", guidance_scale=4.0))
            images = texture.decode(z)
        else:
            raise SystemExit(f"unknown side {side!r}")
        with tempfile.TemporaryDirectory() as tmp:
            out = []
            for i, im in enumerate(images):
                out.append(Path(tmp) / f"{i}.jpg")
                write_dataset_jpeg(out[-1], im)
            res = c2st_mod.c2st(train.images, load_images(out, 256), seeds=args.c2st_seeds, steps=60)
        extra = f", PSNR {float(psnr(images.float() / 127.5 - 1, x).mean()):.1f} dB" if side in ("recon", "texture") else ""
        print(f"{side}: C2ST {res['accuracy']:.3f} [{res['interval'][0]:.3f}, {res['interval'][1]:.3f}]{extra}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
