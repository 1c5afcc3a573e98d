"""The evaluation flow: does synthetic data help recognise users on real data?

This module runs the parts in order, guards against leakage and writes metrics.json; the parts
live in `classifier.py` (the ResNet-18 and the images), `metrics.py` (the numbers) and
`report.py` (headline table and figures). Every figure comes with its real-vs-real baseline,
because a number alone cannot be read:

1. **User classifier** (torchvision ResNet-18, from scratch unless a local ImageNet weight file is
   given) trained on real-train, model-selected on real-val, reported on real-test. Saved as
   safetensors + JSON (metrics, settings, split hash) and reused by later evaluations.
2. **Recognisability**: that classifier's accuracy on generated images, and its ratio to the
   real-test accuracy (headline quality figure, target >= 0.8).
3. **Realism / diversity** in the classifier's penultimate features: Fréchet distance, KID,
   precision/recall, density/coverage (`mdgen_helpers.metrics`), generated vs real-test, with
   real-train vs real-test at the same sample size as baseline. Inception FID/KID through
   torchmetrics when the Inception weights are available locally (never downloaded here).
4. **Memorisation**: nearest-training-image distances of generated vs real-test images (feature
   and pixel space); generated images closer than the 1st percentile of the real-test distances
   are flagged as near-copies (a real-test image is that close to train only 1% of the time).
5. **Augmentation gain** (the headline): real-test accuracy of classifiers trained on real-train
   only, real-train + n synthetic per user, and synthetic only, over seeds (mean ± std); also
   in few-shot regimes, each with a generator trained only on that few-shot subset.
6. **Physics** (simulated data with users.json): torso velocity and step rate read off generated
   images vs each user's ground truth, with the same read-off on real-test images as baseline.

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

from mdgen_helpers import data
from mdgen_helpers.classifier import (ImageSet, UserClassifier, accuracy, classification_report, default_epochs,
                                      default_image_size, embed, load_classifier, load_generated_set, load_split_part,
                                      resolve_device, save_classifier, train_classifier)
from mdgen_helpers.errors import ArtifactMismatchError, DataError, MdgenError
from mdgen_helpers.files import atomic_write_json, atomic_write_text, sha256_file
from mdgen_helpers.generate import decode_to_uint8, image_seed, sample_latents
from mdgen_helpers.metrics import (confidence_filter, inception_metrics, mean_pairwise_distance, memorisation,
                                   physics_check, pixel_vectors, realism_diversity, recognisability)
from mdgen_helpers.report import format_table, headline_table, write_figures
from mdgen_helpers.settings import EvalConfig, SamplingSettings, add_arguments, apply, given

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


def fit_user_classifier(data_dir, split, train: ImageSet, val: ImageSet, *, image_size: int, epochs: int,
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


def augmentation_gain(data_dir, split, train: ImageSet, val: ImageSet, test: ImageSet, generated: ImageSet | None,
                      amounts: Sequence[int], seeds: Sequence[int], *, image_size: int, epochs: int,
                      device: torch.device, cache: dict | None = None, regime: str = "full",
                      real_only: dict | None = None, **train_kwargs) -> dict[str, Any]:
    """Real-test accuracy: real only, real + n synthetic per user (each n>0 in `amounts`),
    synthetic only (every generated image); mean ± std over `seeds`. `gain` = mean difference to
    real only. `cache` maps (regime, kind, n, seed) -> accuracy to skip repeated trainings;
    `real_only` reuses a real-only result already measured on the same real train set."""
    cache = {} if cache is None else cache
    labels = generated.labels.numpy() if generated is not None else None

    def run(kind: str, n: int, seed: int, data: ImageSet) -> float:
        key = (regime, kind, n, seed)
        if key not in cache:
            clf = fit_user_classifier(data_dir, split, data, val, image_size=image_size, epochs=epochs, seed=seed,
                                      device=device, what=f"{regime}/{kind} training set", **train_kwargs)
            cache[key] = accuracy(clf.model, test)
        return cache[key]

    out: dict[str, Any] = {"num_real_train": len(train),
                           "real_only": real_only or _mean_std([run("real", 0, s, train) for s in seeds])}
    if generated is None:
        out["skipped"] = "no generated set for this regime: real-only baseline only"
        return out
    out["real_plus_synthetic"], out["gain"] = {}, {}
    for n in sorted({int(a) for a in amounts if int(a) > 0}):
        accs, counts = [], []
        for s in seeds:
            syn = generated.subset(_synthetic_pick(labels, n, s))
            counts.append(len(syn))
            accs.append(run("real+synthetic", n, s, ImageSet.concat([train, syn])))
        out["real_plus_synthetic"][str(n)] = {**_mean_std(accs), "num_synthetic": int(np.mean(counts))}
        out["gain"][str(n)] = out["real_plus_synthetic"][str(n)]["mean"] - out["real_only"]["mean"]
    out["synthetic_only"] = {**_mean_std([run("synthetic", len(generated), s, generated) for s in seeds]),
                             "num_synthetic": len(generated)}
    return out


# --------------------------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------------------------


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run every part that its inputs allow; write OUT/metrics.json (rewritten after each part,
    with "complete": false until the end, so a crash keeps what was measured) and figures."""
    started = time.time()
    out_dir = Path(cfg.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MdgenError(f"--output_dir {out_dir} is a file; give a folder for the evaluation")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    epochs = cfg.epochs or default_epochs(device)
    split = data.load_split(cfg.split)
    data.check_split(split, cfg.data_dir)
    um = split.user_map
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
                                                         "image_size": image_size, "epochs": epochs},
                         "split_hash": split.hash, "user_map": um.to_json(), "skipped": {}, "figures": []}

    def save():
        m["seconds"] = round(time.time() - started, 1)
        atomic_write_json(out_dir / METRICS_NAME, m)

    train = load_split_part(cfg.data_dir, split, "train", image_size, cfg.progress)
    val = load_split_part(cfg.data_dir, split, "val", image_size, cfg.progress)
    test = load_split_part(cfg.data_dir, split, "test", image_size, cfg.progress)
    cache: dict = {}
    if clf is None:
        clf = fit_user_classifier(cfg.data_dir, split, train, val, image_size=image_size, epochs=epochs,
                                  seed=cfg.seeds[0] if cfg.seeds else 0, device=device, **train_kwargs)
        clf.info["real_test_accuracy"] = accuracy(clf.model, test)
        save_classifier(clf, clf_path)
        cache[("full", "real", 0, clf.info["seed"])] = clf.info["real_test_accuracy"]
        trained_here = True
    else:
        trained_here = False
    train_feats, _ = embed(clf.model, train.images)
    test_feats, test_probs = embed(clf.model, test.images)
    m["classifier"] = {"path": str(clf_path), "trained_here": trained_here, "image_size": clf.image_size,
                       "train_settings": {k: v for k, v in clf.info.items() if k != "history"},
                       "real_val_accuracy": accuracy(clf.model, val),
                       "real_test": classification_report(clf.model, test, um, test_probs)}
    save()

    gen, gen_info = None, None
    if cfg.generated_dir:
        gen, gen_info = load_generated_set(cfg.generated_dir, um, image_size, cfg.progress)
        if len(gen) < 3:
            raise DataError(f"{cfg.generated_dir} holds {len(gen)} generated images; distribution metrics need "
                            f"at least 3 (generate more samples per user)")
        gen_info["split_check"] = check_generator_split(gen_info, split.hash, "generated set")
        check_no_leakage(gen.files, split, cfg.data_dir, "generated set")
        m["generator"] = gen_info
        m["generator_manifest_sha256"] = gen_info["manifest_sha256"]
        gen_feats, gen_probs = embed(clf.model, gen.images)
        real_acc = m["classifier"]["real_test"]["accuracy"]
        m["recognisability"] = recognisability(clf, gen, real_acc, gen_probs)
        fm_kwargs = dict(kid_subsets=cfg.kid_subsets, kid_subset_size=cfg.kid_subset_size, pr_k=cfg.pr_k, dc_k=cfg.dc_k)
        m["realism"] = {"classifier_features": realism_diversity(train_feats, test_feats, gen_feats,
                                                                 seed=cfg.seeds[0] if cfg.seeds else 0, **fm_kwargs),
                        "inception": inception_metrics(cfg.inception_weights, train.files, test.files, gen.files,
                                                       device, kid_subsets=cfg.kid_subsets,
                                                       kid_subset_size=cfg.kid_subset_size)}
        save()
        psize = min(cfg.pixel_size, image_size)
        m["memorisation"] = memorisation(train_feats, test_feats, gen_feats, pixel_vectors(train.images, psize),
                                         pixel_vectors(test.images, psize), pixel_vectors(gen.images, psize),
                                         gen.files, train.files, cfg.memorisation_percentile)
        m["memorisation"]["pixel_size"] = psize
        save()
    else:
        for k in ("recognisability", "realism", "memorisation", "physics", "filtering"):
            m["skipped"][k] = "no --generated_dir given"

    # Augmentation gain: full data, then few-shot regimes.
    aug_kwargs = dict(image_size=image_size, epochs=epochs, device=device, cache=cache, **train_kwargs)
    m["augmentation"] = {}
    if cfg.seeds:
        m["augmentation"]["full"] = augmentation_gain(cfg.data_dir, split, train, val, test, gen, cfg.synthetic_per_user,
                                                      cfg.seeds, regime="full", **aug_kwargs)
        save()
        if gen is not None and cfg.filter_confidence is not None:
            keep = confidence_filter(gen_probs, gen.labels.numpy(), cfg.filter_confidence)
            m["filtering"] = {"threshold": cfg.filter_confidence, "kept": int(keep.sum()), "total": len(gen),
                              "kept_fraction": float(keep.mean()),
                              "kept_per_user": {str(um.user_of_label(c)): int(keep[gen.labels.numpy() == c].sum())
                                                for c in range(um.num_users)}}
            if keep.sum() >= 2:
                m["augmentation"]["filtered"] = augmentation_gain(
                    cfg.data_dir, split, train, val, test, gen.subset(np.flatnonzero(keep)), cfg.synthetic_per_user,
                    cfg.seeds, regime="filtered", real_only=m["augmentation"]["full"]["real_only"], **aug_kwargs)
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
                m.setdefault("few_shot_generators", {})[str(k)] = fs_info
            m["augmentation"][regime] = augmentation_gain(cfg.data_dir, fs, fs_train, val, test, fs_gen,
                                                          cfg.synthetic_per_user, cfg.seeds, regime=regime, **aug_kwargs)
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
    add_arguments(parser, EvalConfig, required=("data_dir", "split", "output_dir"),
                  types_={"few_shot_generated": {"type": _regime_dir, "nargs": "*", "metavar": "K=DIR"}})


def cli_main(args: argparse.Namespace) -> int:
    values = given(args, EvalConfig)
    if "few_shot_generated" in values:
        values["few_shot_generated"] = dict(values["few_shot_generated"])
    cfg = apply(EvalConfig(), values)
    m = evaluate(cfg)
    print(format_table(headline_table(m)))
    print(f"wrote {Path(cfg.output_dir) / METRICS_NAME}")
    return 0
