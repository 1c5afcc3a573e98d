"""Sampling sweep: realism and recognisability of one trained run under several sampling settings.

Why: the sampling defaults (solver, steps, guidance scale and interval, timestep shift) must come
from measurements, not from looking at grids. Re-running the whole evaluation per setting costs
~5 min on 2 cores; this sweep reuses the evaluation's trained user classifier and measures, per
setting, on the same seeds:

* `fd_ratio` in that classifier's features (FD(generated, real-test) / FD(real-val, real-test),
  matched sizes, `metrics.realism_diversity`),
* recognisability (the classifier's accuracy on the generated images / on real-test),
* the realism two-sample test (`c2st.c2st`, 256 px, real-train vs generated, the evaluation's
  CNN; fewer seeds than the evaluation unless `--c2st_seeds` says otherwise),
* the step-rate error ratio (`metrics.physics_check`),
* model evaluations per image (NFE).

Generated images go through the same JPEG q95 export the evaluation reads, so the comparison with
the real JPEGs is format-matched.

    PYTHONPATH=. python benchmarks/sweep_quality.py --work_dir mdgen_runs/demo \
        --setting solver=euler,num_steps=16,guidance_scale=4 --setting solver=heun,num_steps=12,guidance_scale=2

`--work_dir` is a `demo`/`pipeline` work folder (run/, tokenizer.safetensors, data/, split.json,
evaluation/classifier.safetensors). Results: one JSON line per setting on stdout and in
`--out` (default WORK/sweep.jsonl).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mdgen_helpers import c2st as c2st_mod
from mdgen_helpers.classifier import ImageSet, embed, load_classifier, load_images, load_split_part
from mdgen_helpers.generate import decode_to_uint8, image_seed, load_generator, write_dataset_jpeg, sample_latents
from mdgen_helpers.metrics import physics_check, realism_diversity
from mdgen_helpers.settings import SamplingSettings, apply, parse_text
from mdgen_helpers.data import load_split
from mdgen_helpers.tokenizers import load_tokenizer


def parse_setting(text: str) -> dict:
    """'solver=heun,num_steps=12,guidance_interval=0.1:1' -> SamplingSettings fields, each read by
    the settings module's own parser (a tuple's values are separated by ':')."""
    hints = typing.get_type_hints(SamplingSettings)
    out = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in hints:
            raise SystemExit(f"unknown sampling setting {key!r}; known: {sorted(hints)}")
        out[key] = parse_text(value.replace(":", " "), hints[key])
    return out


@dataclass
class Context:
    """What every setting is measured against, loaded once: the run, its tokenizer, the
    evaluation's classifier and its features of real val/test, real-train at 256 px."""

    work: Path
    weights: str
    gen: Any
    tok: Any
    split: Any
    clf: Any
    val_feats: np.ndarray
    test_feats: np.ndarray
    real_acc: float
    train_256: torch.Tensor | None

    @classmethod
    def load(cls, work: Path, weights: str, with_c2st: bool) -> "Context":
        split = load_split(work / "split.json")
        clf = load_classifier(work / "evaluation" / "classifier.safetensors")
        val = load_split_part(work / "data", split, "val", clf.image_size)
        test = load_split_part(work / "data", split, "test", clf.image_size)
        vf, _ = embed(clf.model, val.images)
        tf, tp = embed(clf.model, test.images)
        return cls(work, weights, load_generator(work / "run", weights=weights),
                   load_tokenizer(work / "tokenizer.safetensors"), split, clf, vf, tf,
                   float((tp.argmax(1) == test.labels.numpy()).mean()),
                   load_split_part(work / "data", split, "train", 256).images if with_c2st else None)


def measure(ctx: Context, setting: dict, per_user: int, c2st_seeds, c2st_steps: int, tmp: Path) -> dict:
    gen, data_dir = ctx.gen, ctx.work / "data"
    settings = apply(SamplingSettings(weights=ctx.weights), setting)
    if settings.weights != ctx.weights:
        raise SystemExit("weights is chosen once per sweep: --weights")
    users = [gen.user_map.user_of_label(c) for c in range(gen.num_users)]
    ids = [u for u in users for _ in range(per_user)]
    seeds = [image_seed(settings.seed, u, k) for u in users for k in range(1, per_user + 1)]
    t0 = time.time()
    latents, nfe = sample_latents(gen, ids, seeds, settings, return_nfe=True)
    images = decode_to_uint8(ctx.tok, latents)
    sample_s = time.time() - t0
    out_dir = tmp / f"set{abs(hash(json.dumps(setting, sort_keys=True))) % 10**8}"
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (u, img) in enumerate(zip(ids, images)):
        f = out_dir / f"{u}_{i:04d}.jpg"
        write_dataset_jpeg(f, img)
        files.append(f)
    labels = torch.tensor([gen.user_map.label_of_user(u) for u in ids])
    g = ImageSet(load_images(files, ctx.clf.image_size), labels, files)
    gf, gp = embed(ctx.clf.model, g.images)
    rec = float((gp.argmax(1) == labels.numpy()).mean())
    fd = realism_diversity(ctx.val_feats, ctx.test_feats, gf, seed=0, bootstrap=50)["fd_ratio"]
    row = {"setting": setting, "weights": ctx.weights, "step": gen.step, "nfe": float(np.mean(nfe)),
           "sample_s": round(sample_s, 1), "fd_ratio": round(fd["ratio"], 3),
           "fd_ratio_interval": [round(v, 3) for v in fd["interval"]],
           "recognisability": round(rec / ctx.real_acc, 3)}
    if c2st_seeds:
        res = c2st_mod.c2st(ctx.train_256, load_images(files, 256), seeds=c2st_seeds, steps=c2st_steps)
        row["c2st"] = round(res["accuracy"], 3)
        row["c2st_interval"] = [round(v, 3) for v in res["interval"]]
    test_files = [data_dir / f for f in ctx.split.files("test")]
    phys = physics_check(data_dir / "users.json", gen.user_map, (files, labels.tolist()),
                         (test_files, ctx.split.labels("test")), max_per_user=per_user)
    row["step_rate_error_ratio"] = round(phys["step_rate_error_ratio"], 2)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", required=True)
    p.add_argument("--setting", action="append", required=True, help="comma-separated SamplingSettings fields")
    p.add_argument("--per_user", type=int, default=10)
    p.add_argument("--c2st_seeds", type=int, nargs="*", default=[0])
    p.add_argument("--c2st_steps", type=int, default=60)
    p.add_argument("--weights", default=SamplingSettings.weights, choices=["best", "last"],
                   help="which EMA of WORK/run (as generation's SamplingSettings.weights)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    out = Path(args.out) if args.out else work / "sweep.jsonl"
    settings = [parse_setting(text) for text in args.setting]  # all read before any work
    ctx = Context.load(work, args.weights, with_c2st=bool(args.c2st_seeds))
    with tempfile.TemporaryDirectory() as tmp:
        for setting in settings:
            row = measure(ctx, setting, args.per_user, args.c2st_seeds, args.c2st_steps, Path(tmp))
            line = json.dumps(row)
            print(line, flush=True)
            with open(out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
