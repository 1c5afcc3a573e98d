"""Stand-in tokenizer fit time and PSNR/SSIM, and latent extraction throughput, on the CPU.

    python benchmarks/bench_extract.py --users 31 --per_user 150 --threads 2 --num_workers 2
    python benchmarks/bench_extract.py --users 6 --per_user 30 --threads 1 --skip_extract   # quick comparison
    python benchmarks/bench_extract.py --users 6 --per_user 30 --threads 1 --skip_extract --kinds colormap-pca --style mmwave

Simulates the data set once into --workdir (reused on later runs), makes the split, and for each
stand-in kind in --kinds (default: both, on the same images) fits it on the train part, reports its
reconstruction on held-out val images, and (unless --skip_extract) times a fresh extraction of
every part (images/s, JPEG decoding in DataLoader workers included). --png saves a comparison grid
(originals, then one row per kind).
Timings on a shared machine are noisy: run it on a quiet one for figures you publish.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from mdgen_helpers import data, latents, tokenizers
from mdgen_helpers.simulate import simulate_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=31)
    ap.add_argument("--per_user", type=int, default=150)
    ap.add_argument("--workdir", default="/tmp/mdgen_bench_extract")
    ap.add_argument("--style", default="default", help="simulator style (simulate.SIM_STYLES)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--num_workers", type=int, default=2, help="DataLoader workers for extraction")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--fit_images", type=int, default=512)
    ap.add_argument("--report_per_user", type=int, default=4)
    ap.add_argument("--kinds", default="rgb-pca,colormap-pca", help="comma-separated stand-in kinds to compare")
    ap.add_argument("--skip_extract", action="store_true", help="only fit and report, no extraction timing")
    ap.add_argument("--png", default=None, help="write originals / reconstructions of each kind to this PNG")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(args.workdir) / f"u{args.users}_p{args.per_user}" / args.style
    root = work / "data"
    t = time.perf_counter()
    if not (root / "users.json").is_file():
        simulate_dataset(root, args.users, args.per_user, seed=0, workers=args.threads, progress=True, style=args.style)
        print(f"simulated {args.users}x{args.per_user} images in {time.perf_counter() - t:.1f} s")
    split = data.make_split(data.validate_dataset(root), seed=0)
    n = {p: len(split.files(p)) for p in latents.PARTS}
    print(f"data set {args.users} users x {args.per_user} = {sum(n.values())} images; split {n}; "
          f"torch threads {args.threads}, workers {args.num_workers}")

    rows = []
    for kind in args.kinds.split(","):
        t = time.perf_counter()
        tok = tokenizers.fit_standin(data.ImageDataset(root, split, "train"), num_images=args.fit_images, seed=0,
                                     progress=False, kind=kind)
        fit_s = time.perf_counter() - t
        print(f"[{kind}] fit: {tok.meta['fit_num_images']} train images in {fit_s:.1f} s "
              f"(explained variance {tok.meta['explained_variance_fraction']:.3f})")
        rep = tokenizers.reconstruction_report(tok, data.ImageDataset(root, split, "val"), per_user=args.report_per_user,
                                               user_map=split.user_map)
        per = [u["psnr"] for u in rep["per_user"].values()]
        print(f"[{kind}] reconstruction on {rep['num_images']} val images: PSNR {rep['psnr']:.2f} dB "
              f"(per-user {min(per):.2f}..{max(per):.2f}, worst image {rep['psnr_min']:.2f}), SSIM {rep['ssim']:.4f}")
        if not rows:
            rows.append(rep["examples"]["original"])
        rows.append(rep["examples"]["reconstruction"])
        if args.skip_extract:
            continue
        out = work / f"latents_{kind}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        latents.extract_latents(root, split, tok, out, batch_size=args.batch_size, num_workers=args.num_workers, progress=False)
        ext_s = time.perf_counter() - t
        total = sum(n.values())
        print(f"[{kind}] extraction: {total} images in {ext_s:.1f} s = {total / ext_s:.1f} images/s (stand-in, CPU)")
        t = time.perf_counter()
        latents.extract_latents(root, split, tok, out, batch_size=args.batch_size, num_workers=args.num_workers, progress=False)
        print(f"[{kind}] re-run with unchanged inputs (skip check): {time.perf_counter() - t:.2f} s")
    if args.png:
        from torchvision.utils import save_image

        save_image((torch.cat(rows) + 1) / 2, args.png, nrow=len(rows[0]))
        print(f"wrote {args.png}: originals, then {args.kinds}")


if __name__ == "__main__":
    main()
