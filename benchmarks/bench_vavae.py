"""CPU throughput of the full-size VA-VAE f16d32 (ch=128), random weights: encode and decode images/s.

    python benchmarks/bench_vavae.py                 # batch 8, 256x256, float32, 2 timed runs
    python benchmarks/bench_vavae.py --threads 2 --repeats 1 --dtype bfloat16

The weights are random (seeded), which does not change the cost of a forward pass. Timings on a
shared machine are noisy: report the thread count and machine load with the figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from mdgen_helpers.vavae import AutoencoderKL, init_random_


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs; the best is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    with torch.device("meta"):
        model = AutoencoderKL()
    model = init_random_(model, seed=0).to(dtype).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=g) * 2 - 1
    f = model.downsample_factor
    latents = torch.randn(args.batch, model.arch["embed_dim"], args.size // f, args.size // f, generator=g)

    with torch.inference_mode():
        model.decode(model.encode(images[:1]).mean)  # warm-up: kernel selection, allocator
        t_enc = _time(lambda: model.encode(images), args.repeats)
        t_dec = _time(lambda: model.decode(latents), args.repeats)

    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"VA-VAE f16d32 ch=128 ({params:.1f}M params), {args.dtype}, batch {args.batch}, "
          f"{args.size}x{args.size}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}, best of {args.repeats}")
    print(f"encode: {args.batch / t_enc:.2f} images/s ({t_enc:.2f} s per batch)")
    print(f"decode: {args.batch / t_dec:.2f} images/s ({t_dec:.2f} s per batch)")


if __name__ == "__main__":
    main()
