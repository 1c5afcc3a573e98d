"""The evaluation flow: does synthetic data help recognise users on real data?

This module runs the parts in order, guards against leakage and writes metrics.json; the parts
live in `classifier.py` (the ResNet-18 and the images), `metrics.py` (the numbers) and
`report.py` (headline table and figures). Every figure comes with its real-vs-real baseline,
because a number alone cannot be read:

1. **User classifier** (torchvision ResNet-18, from scratch unless a local ImageNet weight file is
   given) trained on real-train for a fixed number of steps (no model selection: real-val stays a
   clean held-out sample), reported on real-test. Saved as safetensors + JSON (metrics, settings,
   split hash) and reused by later evaluations.
2. **Recognisability**: that classifier's accuracy on generated images and its ratio to the
   real-test accuracy (bootstrap interval), at its input size and at `recognisability_sizes`
   (a second classifier at e.g. 128 px sees finer cues); real-train accuracy is the ceiling.
3. **Realism**: a two-sample test at 256 px (`mdgen_helpers.c2st`: a small CNN tells real-train
   from generated; `c2st_accuracy` 0.5 = indistinguishable), then FD, KID, precision/recall,
   density/coverage in the classifier's penultimate features (`mdgen_helpers.metrics`), generated
   vs real-test next to real-val vs real-test at the same sample size, `fd_ratio` with a bootstrap
   interval. Inception FID/KID through torchmetrics when the weights are available locally.
4. **Memorisation**: nearest-training-image distances of generated vs real-test images (feature
   and pixel space); generated images closer than the 1st percentile of the real-test distances
   are flagged as near-copies (a real-test image is that close to train only 1% of the time).
5. **Augmentation gain** (the headline): real-test accuracy of classifiers trained on real-train
   only, real-train + n synthetic per user, and synthetic only, all at the same optimiser steps,
   per seed; paired differences over seeds with intervals (`gain_real_plus_synthetic`,
   `synthetic_only_ratio`); also in few-shot regimes, each with a generator trained only on that
   few-shot subset.
6. **Physics** (simulated data with users.json): torso velocity and step rate read off generated
   images vs each user's ground truth, with the same read-off on real-test images as baseline
   (`step_rate_error_ratio` = generated error / real error).
7. **Per image**: `per_image.csv` (file, user, seed, classifier confidence, nearest-train
   distance, C2ST score). **Calibration**: `calibrate` runs the evaluation on held-out real
   images and on noise in place of generated ones and checks every metric against its interval.

Leakage guard: before any classifier trains, every training file is compared with the split's
val/test files by relative path AND content hash (a renamed copy is caught); a generator
trained on another split is refused. Both raise `LeakageError`.

Speed: images are held in memory as uint8 at `image_size` (the classifier's input size). The
default is 64 px on a CPU (a ResNet-18 epoch over ~3000 images then takes tens of seconds)
and 128 px on a GPU; physics and Inception metrics always read the full 256 px files.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mdgen_helpers import c2st as c2st_mod
from mdgen_helpers import data, viz
from mdgen_helpers.classifier import (ImageSet, UserClassifier, accuracy, classification_report, classifier_steps,
                                      default_epochs, default_image_size, embed, load_classifier, load_generated_set,
                                      load_images, load_split_part, resolve_device, save_classifier, train_classifier)
from mdgen_helpers.errors import ArtifactMismatchError, DataError, MdgenError
from mdgen_helpers.files import atomic_write_json, atomic_write_text, sha256_file
from mdgen_helpers.generate import decode_to_uint8, image_seed, sample_latents
from mdgen_helpers.metrics import (confidence_filter, inception_metrics, mean_pairwise_distance, memorisation,
                                   nearest_neighbors, paired_difference, paired_ratio, physics_check, pixel_vectors,
                                   realism_diversity, recognisability)
from mdgen_helpers.report import format_calibration, format_table, headline_table, plot_c2st_extremes, write_figures
from mdgen_helpers.settings import EvalConfig, SamplingSettings, add_arguments, apply, given
from mdgen_helpers.users import UserMap

METRICS_NAME = "metrics.json"


class LeakageError(MdgenError):
    """A validation/test image (or a copy of one) would reach a training set."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Leakage guard and few-shot splits
# --------------------------------------------------------------------------------------------

_HASHES: dict[tuple[str, int, int], str] = {}


def content_hash(path: Path) -> str:
    """sha256 of a file's bytes, cached by (path, size, mtime) so repeated guards cost nothing."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def check_no_leakage(train_files: Iterable, split, data_dir, what: str = "training set") -> int:
    """Raise LeakageError if any training file is a val/test file of `split`: the same relative
    path under `data_dir`, or the same bytes anywhere (a renamed or copied file). Returns the
    number of files checked."""
    data_dir = Path(data_dir).resolve()
    held = {rel: part for part in ("val", "test") for rel in split.files(part)}
    held_hashes = {content_hash(data_dir / rel): rel for rel in held if (data_dir / rel).is_file()}
    n = 0
    for f in train_files:
        f = Path(f)
        try:
            rel = f.resolve().relative_to(data_dir).as_posix()
        except ValueError:
            rel = None
        if rel in held:
            raise LeakageError(f"{what}: {f} is the {held[rel]} image {rel} of the split; val/test images must "
                               f"never be trained on. Remove it from the training set.")
        h = content_hash(f)
        if h in held_hashes:
            rel = held_hashes[h]
            raise LeakageError(f"{what}: {f} has the same content as the {held[rel]} image {rel} (a renamed or "
                               f"copied held-out image, or a duplicate file in the data set). Remove the copy, "
                               f"or remove duplicates from the data folder and re-run `split`.")
        n += 1
    return n


def check_generator_split(gen_info: Mapping[str, Any], expected_hash: str, what: str) -> str:
    """The generator must have been trained on exactly this (possibly few-shot) split's train part."""
    got = gen_info.get("split_hash")
    if got is None:
        return "unverified: the generated set has no manifest with a split hash"
    if got != expected_hash:
        raise LeakageError(
            f"{what}: the generator was trained on split {got[:12]}..., not on this evaluation's split "
            f"{expected_hash[:12]}...; its training images may include this split's val/test images (or, "
            f"for a few-shot regime, more than the few-shot subset). Generate with a model trained on this split.")
    return "verified: generator split hash matches"


def few_shot_split(split, k: int, seed: int = 0):
    """The few-shot regime with k real train images per user (val/test unchanged)."""
    return data.subsample_split(split, k, seed)


def fit_user_classifier(data_dir, split, train: ImageSet, val: ImageSet | None, *, image_size: int, epochs: int,
                        seed: int, device: torch.device, what: str = "classifier training set",
                        **train_kwargs) -> UserClassifier:
    """Leakage guard, then `train_classifier`: the only way evaluate trains a classifier."""
    check_no_leakage(train.files, split, data_dir, what)
    model, info = train_classifier(train, val, split.user_map.num_users, epochs=epochs, seed=seed, device=device,
                                   **train_kwargs)
    info["image_size"] = image_size
    return UserClassifier(model, image_size, split.user_map, split.hash, info)


def _synthetic_pick(labels: np.ndarray, per_user: int, seed: int) -> np.ndarray:
    """Up to `per_user` generated images per user; nested across amounts for one seed."""
    rng = np.random.default_rng(seed)
    pick = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        pick += rng.permutation(idx)[:per_user].tolist()
    return np.array(sorted(pick), dtype=np.int64)


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "per_seed": [float(x) for x in v]}


def augmentation_gain(data_dir, split, train: ImageSet, test: ImageSet, generated: ImageSet | None,
                      amounts: Sequence[int], seeds: Sequence[int], *, image_size: int, epochs: int, steps: int,
                      device: torch.device, cache: dict | None = None, regime: str = "full",
                      real_only: dict | None = None, **train_kwargs) -> dict[str, Any]:
    """Real-test accuracy of classifiers trained on real only, real + n synthetic per user (each
    n>0 in `amounts`), and synthetic only (every generated image), one per seed.

    Matched compute: every arm gets the same `steps` optimiser steps on a fixed schedule (last
    weights, no model selection: no arm sees more validation than another, and val stays held
    out), so arms differ only in their data. Arms of one seed share the initialisation and the
    batch order seed, and are compared pairwise: `gain_real_plus_synthetic[n]` is the mean
    paired difference to real only and `synthetic_only_ratio` the mean paired ratio, each with a
    Student-t interval over seeds. `cache` maps (regime, kind, n, seed) -> accuracy;
    `real_only` reuses a real-only result already measured on the same real train set."""
    cache = {} if cache is None else cache
    labels = generated.labels.numpy() if generated is not None else None

    def run(kind: str, n: int, seed: int, data: ImageSet) -> float:
        key = (regime, kind, n, seed)
        if key not in cache:
            clf = fit_user_classifier(data_dir, split, data, None, image_size=image_size, epochs=epochs, seed=seed,
                                      device=device, what=f"{regime}/{kind} training set", steps=steps, **train_kwargs)
            cache[key] = accuracy(clf.model, test)
        return cache[key]

    out: dict[str, Any] = {"num_real_train": len(train), "steps": int(steps), "seeds": [int(s) for s in seeds],
                           "real_only": real_only or _mean_std([run("real", 0, s, train) for s in seeds])}
    if generated is None:
        out["skipped"] = "no generated set for this regime: real-only baseline only"
        return out
    real = out["real_only"]["per_seed"]
    out["real_plus_synthetic"], out["gain_real_plus_synthetic"] = {}, {}
    for n in sorted({int(a) for a in amounts if int(a) > 0}):
        accs, counts = [], []
        for s in seeds:
            syn = generated.subset(_synthetic_pick(labels, n, s))
            counts.append(len(syn))
            accs.append(run("real+synthetic", n, s, ImageSet.concat([train, syn])))
        out["real_plus_synthetic"][str(n)] = {**_mean_std(accs), "num_synthetic": int(np.mean(counts))}
        out["gain_real_plus_synthetic"][str(n)] = paired_difference(accs, real)
    syn_only = [run("synthetic", len(generated), s, generated) for s in seeds]
    out["synthetic_only"] = {**_mean_std(syn_only), "num_synthetic": len(generated)}
    out["synthetic_only_ratio"] = paired_ratio(syn_only, real)
    return out


# --------------------------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------------------------


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run every part that its inputs allow; write OUT/metrics.json (rewritten after each part,
    with "complete": false until the end, so a crash keeps what was measured) and figures.

    Reproducible: every random choice is seeded from the config, and torch runs with
    deterministic algorithms for the duration (restored afterwards)."""
    before, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _evaluate(cfg)
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)


def calibration_halves(val: ImageSet, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Real-val cut in two halves per user: (stand-in generated set, remaining val baseline)."""
    rng = np.random.default_rng(seed)
    labels = val.labels.numpy()
    first, second = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        first += idx[: (len(idx) + 1) // 2].tolist()
        second += idx[(len(idx) + 1) // 2:].tolist()
    return val.subset(sorted(first)), val.subset(sorted(second))


def write_noise_set(out_dir: Path, user_map: UserMap, per_user: Mapping[int, int], size: int = 256,
                    seed: int = 0) -> Path:
    """Uniform-noise images in the real layout (ID_k/noise_KKKK.jpg, JPEG q95 like the real data):
    the calibration's "generator that learned nothing"."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, n in sorted(per_user.items()):
        folder = Path(out_dir) / user_map.folder_of_label(label)
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(1, n + 1):
            img = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(img).save(folder / f"noise_{k:04d}.jpg", quality=95)
    return Path(out_dir)


def _evaluate(cfg: EvalConfig) -> dict[str, Any]:
    started = time.time()
    out_dir = Path(cfg.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MdgenError(f"--output_dir {out_dir} is a file; give a folder for the evaluation")
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.calibrate not in (None, "real", "noise"):
        raise MdgenError(f"calibrate must be 'real' or 'noise', got {cfg.calibrate!r}")
    device = resolve_device(cfg.device)
    epochs = cfg.epochs or default_epochs(device)
    split = data.load_split(cfg.split)
    data.check_split(split, cfg.data_dir)
    um = split.user_map
    seed0 = cfg.seeds[0] if cfg.seeds else 0
    train_kwargs = {"batch_size": cfg.batch_size, "lr": cfg.lr, "min_steps": cfg.min_steps,
                    "pretrained": cfg.pretrained, "progress": cfg.progress}

    # Classifier: reuse a saved one (must match the split) or train one on real-train.
    clf = None
    clf_path = Path(cfg.classifier) if cfg.classifier else out_dir / "classifier.safetensors"
    if cfg.classifier and clf_path.is_file():
        clf = load_classifier(clf_path, device)
        if clf.split_hash != split.hash:
            raise ArtifactMismatchError(f"classifier {clf_path} was trained on split {clf.split_hash[:12]}..., not "
                                        f"{split.hash[:12]}... ({cfg.split}); pass the matching split or drop --classifier")
        if cfg.image_size and cfg.image_size != clf.image_size:
            raise ArtifactMismatchError(f"classifier {clf_path} takes {clf.image_size} px input, not --image_size "
                                        f"{cfg.image_size}; drop --image_size to use the classifier's")
    image_size = clf.image_size if clf else (cfg.image_size or default_image_size(device))
    m: dict[str, Any] = {"complete": False, "settings": {**cfg.to_json(), "device": str(device),
                                                         "image_size": image_size, "epochs": epochs,
                                                         "torch_threads": torch.get_num_threads()},
                         "split_hash": split.hash, "user_map": um.to_json(), "skipped": {}, "figures": []}

    def save():
        m["seconds"] = round(time.time() - started, 1)
        atomic_write_json(out_dir / METRICS_NAME, m)

    train = load_split_part(cfg.data_dir, split, "train", image_size, cfg.progress)
    val = load_split_part(cfg.data_dir, split, "val", image_size, cfg.progress)
    test = load_split_part(cfg.data_dir, split, "test", image_size, cfg.progress)
    steps = cfg.steps or classifier_steps(len(train), epochs, cfg.batch_size, cfg.min_steps)
    m["settings"]["steps"] = steps
    gen, gen_info = None, None
    if cfg.calibrate == "real":  # half of real-val plays the generator, the other half the baseline
        gen, val = calibration_halves(val, seed0)
        gen_info = {"dir": "calibration: real-val half", "num_images": len(gen), "seeds": [None] * len(gen)}
    cache: dict = {}
    if clf is None:
        clf = fit_user_classifier(cfg.data_dir, split, train, None, image_size=image_size, epochs=epochs,
                                  seed=seed0, device=device, steps=steps, **train_kwargs)
        clf.info["real_test_accuracy"] = accuracy(clf.model, test)
        save_classifier(clf, clf_path)
        cache[("full", "real", 0, clf.info["seed"])] = clf.info["real_test_accuracy"]
        trained_here = True
    else:
        trained_here = False
    train_feats, _ = embed(clf.model, train.images)
    val_feats, _ = embed(clf.model, val.images)
    test_feats, test_probs = embed(clf.model, test.images)
    test_correct = test_probs.argmax(1) == test.labels.numpy()
    m["classifier"] = {"path": str(clf_path), "trained_here": trained_here, "image_size": clf.image_size,
                       "train_settings": {k: v for k, v in clf.info.items() if k != "history"},
                       "real_train_accuracy": accuracy(clf.model, train),  # the ceiling memorisation reaches
                       "real_val_accuracy": accuracy(clf.model, val),
                       "real_test": classification_report(clf.model, test, um, test_probs)}
    save()

    if cfg.calibrate == "noise":
        counts = np.bincount(val.labels.numpy(), minlength=um.num_users)
        noise_dir = write_noise_set(out_dir / "calibration_noise", um, {c: int(n) for c, n in enumerate(counts)},
                                    seed=seed0)
        gen, gen_info = load_generated_set(noise_dir, um, image_size, cfg.progress)
    elif gen is None and cfg.generated_dir:
        gen, gen_info = load_generated_set(cfg.generated_dir, um, image_size, cfg.progress)
    if gen is not None:
        if len(gen) < 4:
            raise DataError(f"{cfg.generated_dir} holds {len(gen)} generated images; distribution metrics need "
                            f"at least 4 (generate more samples per user)")
        if cfg.calibrate:
            gen_info["split_check"] = f"calibration ({cfg.calibrate}): no generator"
        else:
            gen_info["split_check"] = check_generator_split(gen_info, split.hash, "generated set")
            check_no_leakage(gen.files, split, cfg.data_dir, "generated set")
        m["generator"] = {k: v for k, v in gen_info.items() if k != "seeds"}
        m["generator_manifest_sha256"] = gen_info.get("manifest_sha256")
        gen_feats, gen_probs = embed(clf.model, gen.images)
        real_acc = m["classifier"]["real_test"]["accuracy"]
        m["recognisability"] = recognisability(clf, gen, real_acc, gen_probs, test_correct, seed0)
        m["recognisability"]["image_size"] = image_size
        m["recognisability"]["by_size"] = {str(image_size): _recognisability_row(m["recognisability"],
                                                                                 m["classifier"]["real_train_accuracy"])}
        save()
        for size in [int(x) for x in cfg.recognisability_sizes if int(x) != image_size]:
            m["recognisability"]["by_size"][str(size)] = recognisability_at(cfg, split, train, test, gen, size,
                                                                             epochs, steps, seed0, device,
                                                                             train_kwargs)
            save()
        fm_kwargs = dict(kid_subsets=cfg.kid_subsets, kid_subset_size=cfg.kid_subset_size, pr_k=cfg.pr_k, dc_k=cfg.dc_k)
        m["realism"] = {"classifier_features": realism_diversity(val_feats, test_feats, gen_feats, seed=seed0,
                                                                 bootstrap=cfg.bootstrap, **fm_kwargs),
                        "inception": inception_metrics(cfg.inception_weights, val.files, test.files, gen.files,
                                                       device, kid_subsets=cfg.kid_subsets,
                                                       kid_subset_size=cfg.kid_subset_size, bootstrap=cfg.bootstrap)}
        save()
        c2st_scores = np.full(len(gen), np.nan)
        if cfg.c2st_seeds:
            real_full = load_images(train.files, cfg.c2st_size, cfg.progress)
            gen_full = load_images(gen.files, cfg.c2st_size, cfg.progress)
            res = c2st_mod.c2st(real_full, gen_full, seeds=cfg.c2st_seeds, steps=cfg.c2st_steps,
                                batch_size=cfg.batch_size, bootstrap=cfg.bootstrap, device=device)
            c2st_scores = res.pop("scores_generated")
            real_scores = res.pop("scores_real")
            res["real_side"] = "real-train"
            m["c2st"] = res
            if cfg.figures:
                viz.save_figure(plot_c2st_extremes(real_full, real_scores, gen_full, c2st_scores, res),
                                out_dir / "c2st_most_sure.png")
            del real_full, gen_full
        else:
            m["skipped"]["c2st"] = "no c2st seeds given"
        save()
        psize = min(cfg.pixel_size, image_size)
        m["memorisation"] = memorisation(train_feats, test_feats, gen_feats, pixel_vectors(train.images, psize),
                                         pixel_vectors(test.images, psize), pixel_vectors(gen.images, psize),
                                         gen.files, train.files, cfg.memorisation_percentile)
        m["memorisation"]["pixel_size"] = psize
        nn_dist, _ = nearest_neighbors(gen_feats, train_feats)
        write_per_image_csv(out_dir / "per_image.csv", gen, gen_info.get("seeds"), gen_probs, nn_dist, c2st_scores, um)
        save()
    else:
        for k in ("recognisability", "realism", "memorisation", "physics", "filtering", "c2st"):
            m["skipped"][k] = "no --generated_dir given"

    # Augmentation gain: full data, then few-shot regimes; every arm of a regime at the same steps.
    aug_kwargs = dict(image_size=image_size, epochs=epochs, device=device, cache=cache, **train_kwargs)
    m["augmentation"] = {}
    if cfg.calibrate:
        m["skipped"]["augmentation"] = f"calibration ({cfg.calibrate}): no generated images to augment with"
    elif cfg.seeds:
        m["augmentation"]["full"] = augmentation_gain(cfg.data_dir, split, train, test, gen, cfg.synthetic_per_user,
                                                      cfg.seeds, regime="full", steps=steps, **aug_kwargs)
        save()
        if gen is not None and cfg.filter_confidence is not None:
            keep = confidence_filter(gen_probs, gen.labels.numpy(), cfg.filter_confidence)
            m["filtering"] = {"threshold": cfg.filter_confidence, "kept": int(keep.sum()), "total": len(gen),
                              "kept_fraction": float(keep.mean()),
                              "kept_per_user": {str(um.user_of_label(c)): int(keep[gen.labels.numpy() == c].sum())
                                                for c in range(um.num_users)}}
            if keep.sum() >= 2:
                m["augmentation"]["filtered"] = augmentation_gain(
                    cfg.data_dir, split, train, test, gen.subset(np.flatnonzero(keep)), cfg.synthetic_per_user,
                    cfg.seeds, regime="filtered", steps=steps, real_only=m["augmentation"]["full"]["real_only"],
                    **aug_kwargs)
            else:
                m["filtering"]["skipped"] = "fewer than 2 images pass the threshold"
            save()
        for k in cfg.few_shot:
            fs = few_shot_split(split, int(k), cfg.few_shot_seed)
            keep_files = {Path(cfg.data_dir) / f for f in fs.files("train")}
            fs_train = train.subset([i for i, f in enumerate(train.files) if f in keep_files])
            fs_gen = None
            gdir = cfg.few_shot_generated.get(int(k))
            regime = f"few_shot_{int(k)}"
            if gdir:
                fs_gen, fs_info = load_generated_set(gdir, um, image_size, cfg.progress)
                fs_info["split_check"] = check_generator_split(fs_info, fs.hash, regime)
                check_no_leakage(fs_gen.files, split, cfg.data_dir, f"{regime} generated set")
                m.setdefault("few_shot_generators", {})[str(k)] = {k2: v for k2, v in fs_info.items() if k2 != "seeds"}
            fs_steps = cfg.steps or classifier_steps(len(fs_train), epochs, cfg.batch_size, cfg.min_steps)
            m["augmentation"][regime] = augmentation_gain(cfg.data_dir, fs, fs_train, test, fs_gen,
                                                          cfg.synthetic_per_user, cfg.seeds, regime=regime,
                                                          steps=fs_steps, **aug_kwargs)
            m["augmentation"][regime]["split_hash"] = fs.hash
            save()
    else:
        m["skipped"]["augmentation"] = "no seeds given"

    users_json = Path(cfg.data_dir) / "users.json"
    if gen is not None:
        if users_json.is_file():
            m["physics"] = physics_check(users_json, um, (gen.files, gen.labels.tolist()),
                                         (test.files, test.labels.tolist()), cfg.physics_per_user)
        else:
            m["skipped"]["physics"] = f"{users_json} not found (only simulated data has ground truth)"

    if cfg.figures:
        m["figures"] = write_figures(m, out_dir, um, test_feats, test.labels.numpy(),
                                     gen_feats if gen is not None else None,
                                     gen.labels.numpy() if gen is not None else None)
    m["headline"] = [list(r) for r in headline_table(m)]
    atomic_write_text(out_dir / "headline.md", format_table(headline_table(m)) + "\n")
    m["complete"] = True
    save()
    return m


def _contains(interval, value: float) -> bool:
    lo, hi = interval
    return bool(lo <= value <= hi)


def calibration_checks(real: Mapping[str, Any], noise: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What the metrics must say about held-out real images (a perfect generator) and about noise
    (a generator that learned nothing). Every tolerance is the metric's own 95% interval."""
    def row(run, name, value, interval, expected, passed):
        return {"run": run, "metric": name, "value": value, "interval": interval, "expected": expected,
                "passed": bool(passed)}

    checks = []
    for run, m in (("real", real), ("noise", noise)):
        c2, fr = m["c2st"], m["realism"]["classifier_features"]["fd_ratio"]
        rec = m["recognisability"]
        chance = 1.0 / len(rec["user_ids"])
        if run == "real":
            checks += [row(run, "c2st_accuracy", c2["accuracy"], c2["interval"], "interval holds 0.5",
                           _contains(c2["interval"], 0.5)),
                       row(run, "fd_ratio", fr["ratio"], fr["interval"], "interval holds 1",
                           _contains(fr["interval"], 1.0)),
                       row(run, "recognisability_ratio", rec["ratio_to_real_test"], rec["ratio_interval"],
                           "interval holds 1", _contains(rec["ratio_interval"], 1.0))]
        else:
            checks += [row(run, "c2st_accuracy", c2["accuracy"], c2["interval"], "interval above 0.5 (~1)",
                           c2["interval"][0] > 0.5),
                       row(run, "fd_ratio", fr["ratio"], fr["interval"], "interval above 1",
                           fr["interval"][0] > 1.0),
                       row(run, "recognisability_accuracy", rec["accuracy"], rec["accuracy_interval"],
                           f"interval holds chance ({chance:.3f})", _contains(rec["accuracy_interval"], chance))]
    return checks


def calibrate(cfg: EvalConfig) -> dict[str, Any]:
    """The calibration check: evaluate with held-out real images (half of real-val) in place of
    generated ones, then with noise images, into OUT/calibration_real and OUT/calibration_noise
    (one classifier, trained once), and test what the metrics say (`calibration_checks`).
    Writes OUT/calibration.json."""
    out = Path(cfg.output_dir)
    base = dataclasses.replace(cfg, generated_dir=None, seeds=cfg.seeds[:1] or (0,), few_shot=(), figures=False,
                               recognisability_sizes=())  # the checks read the main classifier only
    m_real = evaluate(dataclasses.replace(base, calibrate="real", output_dir=str(out / "calibration_real")))
    clf = m_real["classifier"]["path"]
    m_noise = evaluate(dataclasses.replace(base, calibrate="noise", classifier=clf,
                                           output_dir=str(out / "calibration_noise")))
    checks = calibration_checks(m_real, m_noise)
    result = {"passed": all(c["passed"] for c in checks), "checks": checks,
              "seconds": round(m_real["seconds"] + m_noise["seconds"], 1)}
    atomic_write_json(out / "calibration.json", result)
    return result


def _recognisability_row(rec: Mapping[str, Any], real_train_accuracy: float) -> dict[str, Any]:
    return {"accuracy": rec["accuracy"], "ratio_to_real_test": rec["ratio_to_real_test"],
            "ratio_interval": rec.get("ratio_interval"), "real_test_accuracy": rec["real_test_accuracy"],
            "real_train_accuracy": real_train_accuracy}


def recognisability_at(cfg: EvalConfig, split, train: ImageSet, test: ImageSet, gen: ImageSet, size: int,
                       epochs: int, steps: int, seed: int, device: torch.device,
                       train_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Recognisability with a second classifier at `size` px (same steps and seed): more detail
    than the main classifier sees, so generated images must carry finer user cues."""
    load = lambda s: ImageSet(load_images(s.files, size, cfg.progress), s.labels, s.files)  # noqa: E731
    tr, te, ge = load(train), load(test), load(gen)
    clf = fit_user_classifier(cfg.data_dir, split, tr, None, image_size=size, epochs=epochs, seed=seed,
                              device=device, steps=steps, what=f"{size} px classifier training set", **train_kwargs)
    _, test_probs = embed(clf.model, te.images)
    real_acc = float((test_probs.argmax(1) == te.labels.numpy()).mean())
    rec = recognisability(clf, ge, real_acc, None, test_probs.argmax(1) == te.labels.numpy(), seed)
    return _recognisability_row(rec, accuracy(clf.model, tr))


def write_per_image_csv(path: Path, gen: ImageSet, seeds, probs: np.ndarray, nn_dist: np.ndarray,
                        c2st_scores: np.ndarray, user_map: UserMap) -> Path:
    """One row per generated image: file, user, seed, classifier confidence in the intended user,
    predicted user, nearest-train feature distance, C2ST P(generated) (empty when not drawn)."""
    import csv
    import io as pyio

    labels = gen.labels.numpy()
    seeds = seeds if seeds and len(seeds) == len(gen) else [None] * len(gen)
    buf = pyio.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "user", "seed", "classifier_confidence", "predicted_user", "nearest_train_distance",
                "c2st_score"])
    for i, f in enumerate(gen.files):
        c2 = "" if np.isnan(c2st_scores[i]) else f"{c2st_scores[i]:.6f}"
        w.writerow([str(f), user_map.user_of_label(labels[i]), "" if seeds[i] is None else seeds[i],
                    f"{probs[i, labels[i]]:.6f}", user_map.user_of_label(int(probs[i].argmax())), f"{nn_dist[i]:.6f}",
                    c2])
    return atomic_write_text(path, buf.getvalue())




def guidance_tradeoff(gen, tokenizer, classifier: UserClassifier, scales: Sequence[float],
                      sampling: SamplingSettings | None = None, user_ids: Sequence[int] | None = None,
                      per_user: int = 8) -> list[dict[str, Any]]:
    """Recognisability and diversity (mean pairwise feature distance within each user, averaged)
    per guidance scale, every other setting from `sampling`: higher guidance usually buys
    recognisability with diversity."""
    sampling = sampling or SamplingSettings()
    user_ids = list(user_ids) if user_ids is not None else list(gen.user_map.user_ids)
    uids = [u for u in user_ids for _ in range(per_user)]
    seeds = [image_seed(sampling.seed, u, k) for u in user_ids for k in range(1, per_user + 1)]
    labels = torch.tensor([classifier.user_map.label_of_user(u) for u in uids])
    rows = []
    for scale in scales:
        latents = sample_latents(gen, uids, seeds, dataclasses.replace(sampling, guidance_scale=float(scale)))
        images = decode_to_uint8(tokenizer, latents, batch_size=sampling.batch_size)
        if images.shape[-1] != classifier.image_size:
            images = F.interpolate(images.float(), size=(classifier.image_size,) * 2, mode="bilinear",
                                   antialias=True).round().clamp(0, 255).to(torch.uint8)
        feats, probs = embed(classifier.model, images)
        lab = labels.numpy()
        rows.append({"guidance_scale": float(scale), "recognisability": float((probs.argmax(1) == lab).mean()),
                     "diversity": float(np.mean([mean_pairwise_distance(feats[lab == c]) for c in np.unique(lab)])),
                     "num_images": len(uids)})
    return rows


# --------------------------------------------------------------------------------------------
# CLI: python -m mdgen_helpers evaluate
# --------------------------------------------------------------------------------------------

def _regime_dir(text: str) -> tuple[int, str]:
    k, sep, d = text.partition("=")
    if not sep or not k.isdigit():
        raise argparse.ArgumentTypeError(f"expected K=DIR (e.g. 5=gen_5shot), got {text!r}")
    return int(k), d


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, EvalConfig, required=("data_dir", "split", "output_dir"), skip=("calibrate",),
                  types_={"few_shot_generated": {"type": _regime_dir, "nargs": "*", "metavar": "K=DIR"}})
    parser.add_argument("--calibrate", action="store_true",
                        help="calibration check: held-out real images, then noise, in place of generated ones")


def cli_main(args: argparse.Namespace) -> int:
    values = given(args, EvalConfig, skip=("calibrate",))
    if "few_shot_generated" in values:
        values["few_shot_generated"] = dict(values["few_shot_generated"])
    cfg = apply(EvalConfig(), values)
    if args.calibrate:
        result = calibrate(cfg)
        print(format_calibration(result))
        print(f"calibration {'passed' if result['passed'] else 'FAILED'}; wrote {Path(cfg.output_dir) / 'calibration.json'}")
        return 0 if result["passed"] else 1
    m = evaluate(cfg)
    print(format_table(headline_table(m)))
    print(f"wrote {Path(cfg.output_dir) / METRICS_NAME}")
    return 0
