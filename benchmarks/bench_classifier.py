"""Train the evaluation's user classifier on a simulated set; print real-test accuracy and time.

    python benchmarks/bench_classifier.py                      # 31 users x 150 images, 64 px, 15 epochs
    python benchmarks/bench_classifier.py --users 10 --per_user 60 --epochs 8   # quicker

The simulated set is written once to --data_dir (reused when it is already complete). Timings
depend on the machine and on whatever else runs on it: report them with that context.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=31)
    p.add_argument("--per_user", type=int, default=150)
    p.add_argument("--data_dir", default=None, help="default: /tmp/mdgen_bench_sim_<users>x<per_user>")
    p.add_argument("--image_size", type=int, default=None, help="default: evaluate's per-device default")
    p.add_argument("--epochs", type=int, default=None, help="default: evaluate's per-device default")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()

    from mdgen_helpers import data, evaluate as ev
    from mdgen_helpers.simulate import simulate_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    device = ev.resolve_device(args.device)
    image_size = args.image_size or ev.default_image_size(device)
    epochs = args.epochs or ev.default_epochs(device)
    data_dir = Path(args.data_dir or f"/tmp/mdgen_bench_sim_{args.users}x{args.per_user}")

    t0 = time.time()
    if not (data_dir / "users.json").is_file():
        simulate_dataset(data_dir, args.users, args.per_user, seed=args.seed)
    t_sim = time.time() - t0
    split = data.make_split(data.validate_dataset(data_dir), seed=0)
    t0 = time.time()
    parts = {k: ev.load_split_part(data_dir, split, k, image_size, progress=True) for k in ("train", "val", "test")}
    t_load = time.time() - t0
    t0 = time.time()
    clf = ev.fit_user_classifier(data_dir, split, parts["train"], parts["val"], image_size=image_size, epochs=epochs,
                                 seed=args.seed, device=device, batch_size=args.batch_size, progress=True)
    t_train = time.time() - t0
    rep = ev.classification_report(clf.model, parts["test"], split.user_map)
    worst = sorted(rep["per_user"].items(), key=lambda kv: kv[1])[:3]
    print(f"data: {args.users} users x {args.per_user} images ({data_dir}); "
          f"train/val/test = {len(parts['train'])}/{len(parts['val'])}/{len(parts['test'])}")
    print(f"classifier: ResNet-18 from scratch, {image_size} px, {epochs} epochs ({clf.info['steps']} steps, "
          f"batch {clf.info['batch_size']}), device {device}, torch threads {torch.get_num_threads()}")
    print(f"real-val accuracy (selected step {clf.info['best_step']}): {clf.info['val_accuracy']:.4f}")
    print(f"real-test accuracy: {rep['accuracy']:.4f} (chance {1 / args.users:.4f}); worst users {worst}")
    print(f"time: simulate {t_sim:.1f} s (0 if reused), load {t_load:.1f} s, train {t_train:.1f} s "
          f"({t_train / max(1, clf.info['steps']):.3f} s/step)")


if __name__ == "__main__":
    main()
