"""Sampling speed: images/s per ODE solver and step count, latents only and with decoding.

    python benchmarks/bench_sample.py                    # tiny preset, CPU, 8 images, guidance 4
    python benchmarks/bench_sample.py --steps 10 25 --solvers euler heun --images 16
    python benchmarks/bench_sample.py --checkpoint RUN --tokenizer TOK   # a trained model

Without --checkpoint the tiny preset gets seeded random weights (perturbed away from the
zero-initialised output layers so the velocity field is not trivially zero). Speed per model
evaluation does not depend on the weights, but the adaptive solver's step count does: dopri5
figures on random weights say little about a trained model (pass --checkpoint for those).
"With decoding" fits the weight-free stand-in tokenizer on synthetic images (no data needed),
unless --tokenizer is given. Timings on a shared CPU are noisy: compare within one run, and pass
--threads 1 there (two OpenMP threads on two busy cores spin-wait; it was 20x slower here).
"""

from __future__ import annotations

import argparse
import time

import torch

from mdgen_helpers.dit import build_model, model_config
from mdgen_helpers.generate import Generator, decode_to_uint8, image_seed, load_generator, sample_latents
from mdgen_helpers.latents import LatentStats
from mdgen_helpers.settings import SamplingSettings
from mdgen_helpers.users import UserMap


def random_generator(num_users: int, seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    model = build_model("tiny", num_classes=num_users)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    cfg = model_config(model)
    return Generator(
        model=model.eval().requires_grad_(False), user_map=UserMap.from_folders([f"ID_{k}" for k in range(1, num_users + 1)]),
        stats=LatentStats(torch.zeros(cfg["in_channels"]), torch.ones(cfg["in_channels"])), tokenizer_identity="",
        model_config=cfg, latent_shape=(cfg["in_channels"], cfg["input_size"], cfg["input_size"]),
        checkpoint_path=None, checkpoint_sha256="",
    )


def standin_tokenizer(seed: int = 0):
    from mdgen_helpers.tokenizers import fit_standin

    g = torch.Generator().manual_seed(seed)
    low = torch.nn.functional.interpolate(torch.randn(8, 3, 16, 16, generator=g), size=256, mode="bilinear")
    return fit_standin(list(torch.tanh(low + 0.3 * torch.randn(8, 3, 256, 256, generator=g))), num_images=8, progress=False, kind="rgb-pca")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="RUN dir or ema.safetensors (default: random tiny preset)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file (default: stand-in fitted on synthetic images)")
    p.add_argument("--solvers", nargs="+", default=["euler", "heun", "dopri5"])
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 250])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--guidance_scale", type=float, default=4.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=1, help="report the fastest of this many runs (noisy CPUs)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.checkpoint:
        gen = load_generator(args.checkpoint, args.device)
    else:
        gen = random_generator(num_users=10)
        gen.model.to(args.device)
    if args.tokenizer:
        from mdgen_helpers.tokenizers import load_tokenizer

        tok = load_tokenizer(args.tokenizer, args.device)
    else:
        tok = standin_tokenizer().to(args.device)
    users = [gen.user_map.user_ids[i % gen.num_users] for i in range(args.images)]
    seeds = [image_seed(0, u, i + 1) for i, u in enumerate(users)]
    sample_latents(gen, users[:1], seeds[:1], SamplingSettings(args.guidance_scale, 2, "euler"))  # warm-up

    print(f"device {args.device}, torch threads {torch.get_num_threads()}, {args.images} images, "
          f"batch {args.batch_size}, guidance {args.guidance_scale:g}, "
          f"model {'checkpoint ' + str(args.checkpoint) if args.checkpoint else 'tiny preset, random weights'}")
    print(f"{'solver':>7} {'steps':>5} {'nfe/img':>7} {'latents img/s':>13} {'+decode img/s':>13} {'decode ms/img':>13}")
    for solver in args.solvers:
        for steps in args.steps:
            best_sample = best_decode = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                settings = SamplingSettings(args.guidance_scale, steps, solver, batch_size=args.batch_size)
                latents, nfes = sample_latents(gen, users, seeds, settings, return_nfe=True)
                t1 = time.perf_counter()
                decode_to_uint8(tok, latents.to(args.device), batch_size=args.batch_size)
                t2 = time.perf_counter()
                best_sample, best_decode = min(best_sample, t1 - t0), min(best_decode, t2 - t1)
            n = len(users)
            print(f"{solver:>7} {steps:>5} {sum(nfes) / n:>7.1f} {n / best_sample:>13.2f} "
                  f"{n / (best_sample + best_decode):>13.2f} {1000 * best_decode / n:>13.2f}", flush=True)


if __name__ == "__main__":
    main()
