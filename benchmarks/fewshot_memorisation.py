"""Does a few-shot generator copy its K training images? Pixel-space nearest-train distances.

Why: the evaluation's memorisation check runs on the full run's generated set; a few-shot regime
(`pipeline --few_shot K`) trains on K images per user for hundreds of passes, where copying is
likeliest. This reads WORK/fewshot_KK/split.json, and for each generated folder given prints the
median distance (64 px pixels in [0, 1], flattened) from each generated image to its nearest
few-shot training image, and the fraction closer than the 1st percentile of real-test images'
distances to those training images (a generator that does not copy: ~1%).

    PYTHONPATH=. python benchmarks/fewshot_memorisation.py --work_dir runs/fs --k 5 \\
        --generated runs/fs/fewshot_05/generated other/fewshot_05/generated
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from mdgen_helpers.classifier import load_images
from mdgen_helpers.data import load_split
from mdgen_helpers.files import read_json
from mdgen_helpers.metrics import nearest_neighbors, pixel_vectors

SIZE = 64


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", required=True, help="the pipeline work folder (data/ and fewshot_KK/)")
    p.add_argument("--k", type=int, required=True, help="the few-shot regime")
    p.add_argument("--generated", nargs="+", required=True, help="generated folders (manifest.json + PNGs)")
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    split = load_split(work / f"fewshot_{args.k:02d}" / "split.json")
    train = pixel_vectors(load_images([work / "data" / f for f in split.files("train")], SIZE), SIZE)
    test = pixel_vectors(load_images([work / "data" / f for f in split.files("test")], SIZE), SIZE)
    d_test, _ = nearest_neighbors(test, train)
    threshold = float(np.percentile(d_test, 1))
    print(f"real-test -> {len(train)} few-shot train images: median {np.median(d_test):.2f}, 1st percentile {threshold:.2f}")
    for folder in map(Path, args.generated):
        manifest = read_json(folder / "manifest.json")
        gen = pixel_vectors(load_images([folder / im["file"] for im in manifest["images"]], SIZE), SIZE)
        d, _ = nearest_neighbors(gen, train)
        print(f"{folder} (step {manifest.get('checkpoint_step')}, weights "
              f"{manifest['settings'].get('weights', 'last')}): median {np.median(d):.2f}, "
              f"closer than the 1st percentile: {np.mean(d < threshold):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
