"""Evaluation of generated spectrograms: does synthetic data help recognise users on real data?

Every figure comes with its real-vs-real baseline, because a number alone cannot be read:

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
import copy
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mdgen_helpers import io, metrics
from mdgen_helpers.errors import ArtifactMismatchError, CheckpointError, DataError, MdgenError
from mdgen_helpers.users import UserMap

CLASSIFIER_FORMAT = "mdgen-user-classifier"
METRICS_NAME = "metrics.json"
RECOGNISABILITY_TARGET = 0.8
_GEN_NAME_RE = re.compile(r"^micro_doppler_user(\d+)_(\d+)\.png$")


class LeakageError(MdgenError):
    """A validation/test image (or a copy of one) would reach a training set."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

@dataclass
class EvalConfig:
    """Settings of one evaluation; defaults are the recommended ones (None = chosen per device)."""

    data_dir: str
    split: str
    output_dir: str
    generated_dir: str | None = None
    classifier: str | None = None  # reuse this saved classifier; trained and saved there if missing
    pretrained: str | None = None  # local torchvision ResNet-18 ImageNet weights (never downloaded)
    epochs: int | None = None  # None: 15 on CPU, 30 on GPU
    batch_size: int = 64
    lr: float = 1e-3
    min_steps: int = 200  # tiny few-shot sets still get this many optimiser steps
    seeds: tuple[int, ...] = (0, 1, 2)
    synthetic_per_user: tuple[int, ...] = (0, 25, 50)
    few_shot: tuple[int, ...] = ()
    few_shot_generated: dict[int, str] = field(default_factory=dict)  # k -> generated dir of that regime
    few_shot_seed: int = 0  # the subset the few-shot generators were trained on
    inception_weights: str | None = None
    filter_confidence: float | None = None
    device: str = "auto"
    image_size: int | None = None  # None: 64 on CPU, 128 on GPU
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    pr_k: int = 3
    dc_k: int = 5
    memorisation_percentile: float = 1.0
    pixel_size: int = 32  # pixel-space memorisation distances at this resolution
    physics_per_user: int = 20  # images per user read off in the physics check (it is slow on CPU)
    figures: bool = True
    progress: bool = True


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_image_size(device: torch.device) -> int:
    """64 px on CPU keeps a ResNet-18 epoch to tens of seconds; 128 px on GPU keeps more detail."""
    return 128 if device.type == "cuda" else 64


def default_epochs(device: torch.device) -> int:
    return 30 if device.type == "cuda" else 15


# --------------------------------------------------------------------------------------------
# Images in memory
# --------------------------------------------------------------------------------------------

@dataclass
class ImageSet:
    """Images as uint8 (N, 3, S, S), labels (N,), and the file each came from."""

    images: torch.Tensor
    labels: torch.Tensor
    files: list[Path]

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, index) -> "ImageSet":
        index = torch.as_tensor(np.asarray(index, dtype=np.int64))
        return ImageSet(self.images[index], self.labels[index], [self.files[i] for i in index.tolist()])

    @staticmethod
    def concat(sets: Sequence["ImageSet"]) -> "ImageSet":
        return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]),
                        [f for s in sets for f in s.files])


def load_images(paths: Sequence[Path], image_size: int, progress: bool = False) -> torch.Tensor:
    """Files -> uint8 (N, 3, S, S), converted and resized like `data.load_image` does."""
    from tqdm.auto import tqdm

    from mdgen_helpers.data import load_image

    out = torch.empty((len(paths), 3, image_size, image_size), dtype=torch.uint8)
    for i, p in enumerate(tqdm(paths, desc="loading images", unit="img", disable=not progress or len(paths) < 200)):
        out[i] = load_image(p, size=image_size).add_(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)
    return out


def load_split_part(data_dir, split, part: str, image_size: int, progress: bool = False) -> ImageSet:
    files = [Path(data_dir) / f for f in split.files(part)]
    return ImageSet(load_images(files, image_size, progress), torch.tensor(split.labels(part), dtype=torch.long), files)


def find_generated(generated_dir, user_map: UserMap) -> tuple[list[Path], list[int], dict[str, Any]]:
    """Files and labels of a generated set, and what its manifest says.

    Accepts a generate.py output folder (manifest.json lists every image and its user id), its
    `dataset/` export (ID_k/*.jpg, the real layout; the manifest one level up), or a folder of
    `micro_doppler_userNN_KKK.png` files without manifest.
    """
    gdir = Path(generated_dir)
    if not gdir.is_dir():
        raise DataError(f"generated folder {gdir} does not exist; run `python -m mdgen_helpers generate` first")
    manifest_path = next((p for p in (gdir / "manifest.json", gdir.parent / "manifest.json") if p.is_file()), None)
    manifest = io.read_json(manifest_path) if manifest_path else {}
    info: dict[str, Any] = {
        "dir": str(gdir),
        "manifest_sha256": io.sha256_file(manifest_path) if manifest_path else None,
        "checkpoint_sha256": manifest.get("checkpoint_sha256"),
        "split_hash": manifest.get("split_hash"),
        "tokenizer": manifest.get("tokenizer"),
        "settings": manifest.get("settings"),
    }
    items: list[tuple[Path, int]] = []
    folders = [f for f in user_map.folders if (gdir / f).is_dir()]
    if folders:  # real layout (export)
        info["layout"] = "folders"
        for f in folders:
            label = user_map.folders.index(f)
            items += [(p, label) for p in sorted((gdir / f).iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    elif manifest_path == gdir / "manifest.json" and manifest.get("images"):
        info["layout"] = "manifest"
        for r in manifest["images"]:
            items.append((gdir / r["file"], _label_of_user(user_map, r["user_id"], gdir)))
    else:
        info["layout"] = "file names"
        for p in sorted(gdir.iterdir()):
            m = _GEN_NAME_RE.match(p.name)
            if m:
                items.append((p, _label_of_user(user_map, int(m.group(1)), gdir)))
    if not items:
        raise DataError(f"no generated images found in {gdir} (expected manifest.json with images, ID_k/ folders, "
                        f"or micro_doppler_userNN_KKK.png files)")
    missing = [str(p) for p, _ in items if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} generated images listed in {gdir} are missing, e.g. {missing[0]}; re-run generate")
    return [p for p, _ in items], [label for _, label in items], info


def _label_of_user(user_map: UserMap, user_id: int, where: Path) -> int:
    try:
        return user_map.label_of_user(int(user_id))
    except ValueError as e:
        raise ArtifactMismatchError(f"{where}: generated images of user {user_id}, which the split does not have ({e})") from None


def load_generated_set(generated_dir, user_map: UserMap, image_size: int, progress: bool = False):
    files, labels, info = find_generated(generated_dir, user_map)
    info["num_images"] = len(files)
    return ImageSet(load_images(files, image_size, progress), torch.tensor(labels, dtype=torch.long), files), info


def read_rgb(path) -> np.ndarray:
    """A file as uint8 HxWx3 at its own size (physics and thumbnails want the full image)."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def to_model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)


# --------------------------------------------------------------------------------------------
# Leakage guard and few-shot splits
# --------------------------------------------------------------------------------------------

_HASHES: dict[tuple[str, int, int], str] = {}


def content_hash(path: Path) -> str:
    """sha256 of a file's bytes, cached by (path, size, mtime) so repeated guards cost nothing."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = io.sha256_file(path)
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
    from mdgen_helpers.data import subsample_split

    return subsample_split(split, k, seed)


# --------------------------------------------------------------------------------------------
# The user classifier
# --------------------------------------------------------------------------------------------

@dataclass
class UserClassifier:
    model: torch.nn.Module
    image_size: int
    user_map: UserMap
    split_hash: str
    info: dict[str, Any] = field(default_factory=dict)  # training settings, history, metrics

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def build_classifier(num_classes: int, pretrained: str | None = None, seed: int = 0) -> torch.nn.Module:
    """torchvision ResNet-18; initialised from `seed` (the global RNG state is restored after).
    `pretrained`: a local ImageNet weight file (.pth via weights_only, or .safetensors); the
    1000-class head is dropped and a fresh one of `num_classes` kept."""
    from torchvision.models import resnet18

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = resnet18(weights=None, num_classes=num_classes)
    if pretrained:
        path = Path(pretrained)
        if not path.is_file():
            raise CheckpointError(f"pretrained weights {path} not found; pass a local torchvision resnet18 ImageNet "
                                  f"file (e.g. resnet18-f37072fd.pth) or leave --pretrained out to train from scratch")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        # strict=False only for the classifier head: fc.* is replaced (1000 ImageNet classes -> our
        # users); every other key must match, which the check below enforces.
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {"fc.weight", "fc.bias"}:
            raise CheckpointError(f"{path} is not a torchvision ResNet-18 state dict (missing {missing[:4]}, "
                                  f"unexpected {unexpected[:4]})")
    return model


def _autocast(device: torch.device):
    """fp16 on GPUs below compute capability 8.0 (T4), bf16 from 8.0; no autocast on CPU."""
    from mdgen_helpers.env import mixed_precision_for

    if device.type != "cuda":
        return None
    mode = mixed_precision_for(torch.cuda.get_device_capability(device))
    return torch.bfloat16 if mode == "bf16" else torch.float16


def _features_and_logits(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ResNet-18 forward that also returns the penultimate (512-d, pooled) features."""
    m = model
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
    f = torch.flatten(m.avgpool(x), 1)
    return f, m.fc(f)


@torch.no_grad()
def embed(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, 512), class probabilities (N, C)) in float32, eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats, probs = [], []
    dtype = _autocast(device)
    for i in range(0, len(images), batch_size):
        x = to_model_input(images[i:i + batch_size], device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            f, logits = _features_and_logits(model, x)
        feats.append(f.float().cpu())
        probs.append(logits.float().softmax(-1).cpu())
    model.train(was_training)
    if not feats:
        return np.zeros((0, 512), np.float32), np.zeros((0, model.fc.out_features), np.float32)
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()


def accuracy(model: torch.nn.Module, data: ImageSet) -> float:
    _, probs = embed(model, data.images)
    return float((probs.argmax(1) == data.labels.numpy()).mean()) if len(data) else float("nan")


def train_classifier(train: ImageSet, val: ImageSet, num_classes: int, *, epochs: int, seed: int,
                     device: torch.device, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 5e-4,
                     min_steps: int = 200, pretrained: str | None = None,
                     progress: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train a ResNet-18 on `train`, keep the weights with the best `val` accuracy.

    One-cycle AdamW; `epochs` passes over the data but at least `min_steps` steps (few-shot sets
    are tiny); validation `epochs` times, evenly spaced. No augmentation: flips change the
    physics (time reversal, Doppler sign). Callers run the leakage guard first.
    """
    from tqdm.auto import tqdm

    if len(train) < 2:
        raise DataError(f"classifier training needs at least 2 images, got {len(train)}")
    model = build_classifier(num_classes, pretrained, seed).to(device)
    bs = min(batch_size, len(train))
    steps_per_epoch = len(train) // bs
    total = max(int(epochs) * steps_per_epoch, int(min_steps), 1)
    eval_every = max(1, math.ceil(total / max(1, int(epochs))))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
    dtype = _autocast(device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    best_acc, best_state, best_step, history = -1.0, None, 0, []
    started = time.time()
    model.train()
    for step in tqdm(range(1, total + 1), desc="classifier", unit="step", disable=not progress, leave=False):
        if len(order) < bs:  # drop the ragged end of each pass: BatchNorm dislikes tiny batches
            order = torch.randperm(len(train), generator=gen).tolist()
        idx, order = order[:bs], order[bs:]
        x = to_model_input(train.images[idx], device)
        y = train.labels[idx].to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        if step % eval_every == 0 or step == total:
            acc = accuracy(model, val)
            history.append({"step": step, "loss": float(loss.detach()), "val_accuracy": acc})
            if acc > best_acc:
                best_acc, best_step = acc, step
                best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    info = {"seed": int(seed), "epochs": int(epochs), "steps": total, "batch_size": bs, "lr": lr,
            "weight_decay": weight_decay, "min_steps": int(min_steps), "pretrained": pretrained,
            "num_train": len(train), "num_val": len(val), "best_step": best_step, "val_accuracy": best_acc,
            "history": history, "seconds": round(time.time() - started, 2), "device": str(device)}
    return model, info


def classification_report(model: torch.nn.Module, data: ImageSet, user_map: UserMap,
                          probs: np.ndarray | None = None) -> dict[str, Any]:
    """Accuracy, per-user accuracy (keys: user ids as strings) and confusion matrix (rows: true)."""
    if probs is None:
        _, probs = embed(model, data.images)
    n = user_map.num_users
    pred, true = probs.argmax(1), data.labels.numpy()
    conf = np.zeros((n, n), dtype=np.int64)
    np.add.at(conf, (true, pred), 1)
    per_user = {str(user_map.user_of_label(c)): float(conf[c, c] / conf[c].sum())
                for c in range(n) if conf[c].sum() > 0}
    return {"accuracy": float((pred == true).mean()) if len(true) else float("nan"), "num_images": int(len(true)),
            "per_user": per_user, "confusion_matrix": conf.tolist(),
            "user_ids": [int(u) for u in user_map.user_ids]}


def save_classifier(clf: UserClassifier, path) -> Path:
    """safetensors weights (metadata: everything needed to reuse it) + a JSON twin to read."""
    path = Path(path)
    meta = {"format": CLASSIFIER_FORMAT, "arch": "resnet18", "num_classes": clf.user_map.num_users,
            "image_size": clf.image_size, "user_map": clf.user_map.to_json(), "split_hash": clf.split_hash,
            "info": clf.info}
    io.atomic_save_safetensors(clf.model.state_dict(), path, meta)
    io.atomic_write_json(path.with_suffix(".json"), meta)
    return path


def load_classifier(path, device: str | torch.device = "cpu") -> UserClassifier:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"classifier {path} not found")
    try:
        meta = io.load_safetensors_metadata(path)
    except Exception as e:  # noqa: BLE001 - any parse failure means "not our file"
        raise CheckpointError(f"{path} is not a safetensors file ({e})") from None
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise CheckpointError(f"{path} is not an mdgen user classifier (format {meta.get('format')!r})")
    model = build_classifier(int(meta["num_classes"]))
    model.load_state_dict(load_file(str(path)))
    model.to(resolve_device(device)).eval()
    return UserClassifier(model, int(meta["image_size"]), UserMap.from_json(meta["user_map"]), meta["split_hash"],
                          meta.get("info", {}))


def fit_user_classifier(data_dir, split, train: ImageSet, val: ImageSet, *, image_size: int, epochs: int,
                        seed: int, device: torch.device, what: str = "classifier training set",
                        **train_kwargs) -> UserClassifier:
    """Leakage guard, then `train_classifier`: the only way evaluate trains a classifier."""
    check_no_leakage(train.files, split, data_dir, what)
    model, info = train_classifier(train, val, split.user_map.num_users, epochs=epochs, seed=seed, device=device,
                                   **train_kwargs)
    info["image_size"] = image_size
    return UserClassifier(model, image_size, split.user_map, split.hash, info)


# --------------------------------------------------------------------------------------------
# The metric families (each callable alone from a notebook)
# --------------------------------------------------------------------------------------------

def recognisability(clf: UserClassifier, generated: ImageSet, real_test_accuracy: float,
                    probs: np.ndarray | None = None) -> dict[str, Any]:
    """Classifier accuracy on generated images, overall and per user, and its ratio to real-test."""
    rep = classification_report(clf.model, generated, clf.user_map, probs)
    rep["real_test_accuracy"] = real_test_accuracy
    rep["ratio_to_real_test"] = rep["accuracy"] / real_test_accuracy if real_test_accuracy > 0 else float("nan")
    rep["target_ratio"] = RECOGNISABILITY_TARGET
    rep["meets_target"] = bool(rep["ratio_to_real_test"] >= RECOGNISABILITY_TARGET)
    return rep


def feature_metrics(real: np.ndarray, fake: np.ndarray, *, kid_subsets: int = 100, kid_subset_size: int = 1000,
                    pr_k: int = 3, dc_k: int = 5, seed: int = 0) -> dict[str, Any]:
    """All distribution metrics between two feature sets (real = the reference manifold)."""
    kid, kid_std = metrics.kernel_inception_distance(real, fake, kid_subsets, kid_subset_size, seed)
    k = min(pr_k, len(real) - 1, len(fake) - 1)
    kd = min(dc_k, len(real) - 1)
    p, r = metrics.precision_recall(real, fake, k)
    d, c = metrics.density_coverage(real, fake, kd)
    return {"fd": metrics.frechet_distance(real, fake), "kid": kid, "kid_std": kid_std, "precision": p, "recall": r,
            "density": d, "coverage": c, "k_precision_recall": k, "k_density_coverage": kd,
            "mean_pairwise_distance": metrics.mean_pairwise_distance(fake), "num_real": len(real),
            "num_fake": len(fake)}


def realism_diversity(train_feats: np.ndarray, test_feats: np.ndarray, gen_feats: np.ndarray, seed: int = 0,
                      **kwargs) -> dict[str, Any]:
    """Generated vs real-test, and the baseline real-train vs real-test with real-train subsampled
    to the generated set's size (FD and KID depend on sample size, so sizes must match)."""
    n = min(len(gen_feats), len(train_feats))
    rng = np.random.default_rng(seed)
    train_sub = train_feats[rng.choice(len(train_feats), n, replace=False)]
    return {"space": "user-classifier penultimate features (512-d)",
            "generated_vs_test": feature_metrics(test_feats, gen_feats, seed=seed, **kwargs),
            "baseline_train_vs_test": feature_metrics(test_feats, train_sub, seed=seed, **kwargs),
            "real_test_mean_pairwise_distance": metrics.mean_pairwise_distance(test_feats)}


def inception_metrics(weights_path: str | None, real_train: Sequence[Path], real_test: Sequence[Path],
                      generated: Sequence[Path], device: torch.device, seed: int = 0, batch_size: int = 32,
                      kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict[str, Any]:
    """Inception-v3 FID/KID (generated vs real-test, baseline real-train vs real-test) through
    torchmetrics' FID network (torch-fidelity port of the TF Inception). Skipped, with the reason,
    when the weights file or the library is missing: nothing is ever downloaded here."""
    if not weights_path:
        return {"skipped": "no Inception weights given (--inception_weights PATH to the torch-fidelity "
                           "weights-inception-2015-12-05 .pth); nothing is downloaded at run time"}
    if not Path(weights_path).is_file():
        return {"skipped": f"Inception weights {weights_path} not found"}
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        return {"skipped": "torchmetrics with its image extra is not installed (pip install 'torchmetrics[image]')"}
    try:
        fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights_path)).to(device)
        net = fid.inception.eval()

        @torch.no_grad()
        def feats(paths):
            out = []
            for i in range(0, len(paths), batch_size):
                x = load_images(paths[i:i + batch_size], 256).to(device)
                out.append(net(x).double().cpu())
            return torch.cat(out).numpy()

        rng = np.random.default_rng(seed)
        train_pick = [real_train[i] for i in rng.choice(len(real_train), min(len(generated), len(real_train)), replace=False)]
        f_test, f_gen, f_train = feats(list(real_test)), feats(list(generated)), feats(train_pick)
    except Exception as e:  # noqa: BLE001 - an optional metric must not sink the evaluation
        return {"skipped": f"Inception feature extraction failed ({type(e).__name__}: {e})"}
    out = {}
    for name, f in (("generated_vs_test", f_gen), ("baseline_train_vs_test", f_train)):
        kid, kid_std = metrics.kernel_inception_distance(f_test, f, kid_subsets, kid_subset_size, seed)
        out[name] = {"fid": metrics.frechet_distance(f_test, f), "kid": kid, "kid_std": kid_std, "num_fake": len(f)}
    out["weights"] = str(weights_path)
    return out


def pixel_vectors(images: torch.Tensor, size: int) -> np.ndarray:
    """Flattened [0, 1] pixels at `size` px: a memorisation check that does not trust any network."""
    x = images.float() / 255.0
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.flatten(1).numpy()


def memorisation(train_feats, test_feats, gen_feats, train_pix, test_pix, gen_pix, gen_files: Sequence[Path],
                 train_files: Sequence[Path], percentile: float = 1.0) -> dict[str, Any]:
    """Nearest-train distances of generated vs real-test images, in feature and pixel space.

    Rule: a generated image is a near-copy when, in either space, it is closer to its nearest
    training image than `percentile`% of real-test images are to theirs. A generator that does not
    copy gets about `percentile`% flagged per space, like held-out real data.
    """
    out: dict[str, Any] = {"rule": f"flagged when nearer to a training image than the {percentile:g}th percentile "
                                   f"of real-test nearest-train distances, in feature or pixel space",
                           "expected_fraction_per_space": percentile / 100.0}
    flagged = np.zeros(len(gen_files), dtype=bool)
    nn_index, dists = {}, {}
    for space, tr, te, ge in (("feature", train_feats, test_feats, gen_feats), ("pixel", train_pix, test_pix, gen_pix)):
        d_gen, i_gen = metrics.nearest_neighbors(ge, tr)
        d_test, _ = metrics.nearest_neighbors(te, tr)
        thr = float(np.percentile(d_test, percentile))
        mask = d_gen < thr
        flagged |= mask
        nn_index[space], dists[space] = i_gen, d_gen
        out[space] = {"generated_nn_median": float(np.median(d_gen)), "generated_nn_min": float(d_gen.min()),
                      "real_test_nn_median": float(np.median(d_test)), "real_test_nn_min": float(d_test.min()),
                      "ratio_of_medians": float(np.median(d_gen) / max(np.median(d_test), 1e-12)),
                      "threshold": thr, "num_flagged": int(mask.sum()), "fraction_flagged": float(mask.mean())}
    out["num_flagged"] = int(flagged.sum())
    out["fraction_flagged"] = float(flagged.mean())
    order = np.argsort(dists["feature"] / max(out["feature"]["threshold"], 1e-12))
    out["near_copies"] = [
        {"generated": str(gen_files[i]), "nearest_train_feature": str(train_files[nn_index["feature"][i]]),
         "nearest_train_pixel": str(train_files[nn_index["pixel"][i]]), "feature_distance": float(dists["feature"][i]),
         "pixel_distance": float(dists["pixel"][i])}
        for i in order if flagged[i]
    ]
    return out


def confidence_filter(probs: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """Keep generated images whose intended user gets classifier probability >= threshold."""
    return probs[np.arange(len(labels)), labels] >= threshold


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


def physics_check(users_json: Path, user_map: UserMap, generated: tuple[Sequence[Path], Sequence[int]],
                  real_test: tuple[Sequence[Path], Sequence[int]], max_per_user: int | None = 20) -> dict[str, Any]:
    """Torso velocity and step rate read off each image (physics.py, the simulator's own
    estimator) vs each user's ground truth; real-test read-offs are the baseline error (it holds
    the per-image nuisances: aspect angle, speed jitter). The first `max_per_user` images of each
    user and set are read (None: all)."""
    from mdgen_helpers import physics

    meta = io.read_json(users_json)
    radar, truth = meta["radar"], meta["users"]
    quantities = (("torso_velocity", physics.torso_velocity, "speed_mps"),
                  ("step_rate", physics.step_rate, "step_rate_hz"))
    out: dict[str, Any] = {"users_json": str(users_json), "max_per_user": max_per_user, "per_user": {}}
    errs = {(q, which): [] for q, _, _ in quantities for which in ("generated", "real_test")}
    for which, (files, labels) in (("generated", generated), ("real_test", real_test)):
        seen: dict[str, int] = {}
        for path, label in zip(files, labels):
            uid = str(user_map.user_of_label(label))
            seen[uid] = seen.get(uid, 0) + 1
            if uid not in truth or (max_per_user is not None and seen[uid] > max_per_user):
                continue
            img = read_rgb(path)
            row = out["per_user"].setdefault(uid, {})
            for q, fn, key in quantities:
                est, gt = float(fn(img, radar)), float(truth[uid][key])
                row.setdefault(f"{q}_truth", gt)
                row.setdefault(f"{q}_{which}", []).append(est)
                errs[(q, which)].append(abs(est - gt))
    for row in out["per_user"].values():  # lists of read-offs -> mean and std
        for k in [k for k, v in row.items() if isinstance(v, list)]:
            v = np.asarray(row[k])
            row[k], row[f"{k}_std"] = float(v.mean()), float(v.std())
    for q, _, _ in quantities:
        for which in ("generated", "real_test"):
            e = errs[(q, which)]
            out[f"{q}_mae_{which}"] = float(np.mean(e)) if e else float("nan")
    return out


# --------------------------------------------------------------------------------------------
# Tables and figures
# --------------------------------------------------------------------------------------------

def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, dict) and "mean" in x:
        return f"{x['mean']:.{digits}f} ± {x['std']:.{digits}f}"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}g}" if abs(x) >= 1000 or (x and abs(x) < 1e-3) else f"{x:.{digits}f}"
    return str(x)


def headline_table(m: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Rows (metric, generated, real baseline) from a metrics dict, for the notebook and README."""
    rows: list[tuple[str, str, str]] = []
    clf = m.get("classifier", {})
    rec = m.get("recognisability", {})
    if "accuracy" in rec:
        rows.append(("user-classifier accuracy (generated vs real-test)", _fmt(rec["accuracy"]),
                     _fmt(clf.get("real_test", {}).get("accuracy"))))
        rows.append((f"recognisability ratio (target >= {RECOGNISABILITY_TARGET})", _fmt(rec["ratio_to_real_test"]), "1.000"))
    elif "real_test" in clf:
        rows.append(("user-classifier accuracy (real-test)", "-", _fmt(clf["real_test"]["accuracy"])))
    fm = m.get("realism", {}).get("classifier_features", {})
    if "generated_vs_test" in fm:
        g, b = fm["generated_vs_test"], fm["baseline_train_vs_test"]
        for key, name in (("fd", "Fréchet distance (classifier features)"), ("kid", "KID (classifier features)"),
                          ("precision", "precision (k-NN)"), ("recall", "recall (k-NN)"), ("density", "density"),
                          ("coverage", "coverage"), ("mean_pairwise_distance", "diversity: mean pairwise feature distance")):
            rows.append((name, _fmt(g[key]), _fmt(b[key])))
    inc = m.get("realism", {}).get("inception", {})
    if "generated_vs_test" in inc:
        rows.append(("Inception FID", _fmt(inc["generated_vs_test"]["fid"]), _fmt(inc["baseline_train_vs_test"]["fid"])))
        rows.append(("Inception KID", _fmt(inc["generated_vs_test"]["kid"]), _fmt(inc["baseline_train_vs_test"]["kid"])))
    mem = m.get("memorisation", {})
    if "feature" in mem:
        rows.append(("median nearest-train distance (features)", _fmt(mem["feature"]["generated_nn_median"]),
                     _fmt(mem["feature"]["real_test_nn_median"])))
        rows.append(("median nearest-train distance (pixels)", _fmt(mem["pixel"]["generated_nn_median"]),
                     _fmt(mem["pixel"]["real_test_nn_median"])))
        rows.append(("near-copies flagged (fraction)", _fmt(mem["fraction_flagged"]),
                     f"~{_fmt(mem['expected_fraction_per_space'])} per space"))
    for regime, aug in m.get("augmentation", {}).items():
        if not isinstance(aug, dict) or "real_only" not in aug:
            continue
        base = _fmt(aug["real_only"])
        label = "real-test accuracy" if regime == "full" else f"real-test accuracy, {regime}"
        if "real_plus_synthetic" not in aug:
            rows.append((f"{label}, real only", "-", base))
        for n, r in aug.get("real_plus_synthetic", {}).items():
            rows.append((f"{label}, real + {n} synthetic/user", _fmt(r), base))
        if "synthetic_only" in aug:
            rows.append((f"{label}, synthetic only", _fmt(aug["synthetic_only"]), base))
    phys = m.get("physics", {})
    if "torso_velocity_mae_generated" in phys:
        rows.append(("torso velocity error vs truth (m/s, MAE)", _fmt(phys["torso_velocity_mae_generated"]),
                     _fmt(phys["torso_velocity_mae_real_test"])))
        rows.append(("step rate error vs truth (Hz, MAE)", _fmt(phys["step_rate_mae_generated"]),
                     _fmt(phys["step_rate_mae_real_test"])))
    return rows


def format_table(rows: Sequence[tuple[str, str, str]]) -> str:
    """Markdown table of `headline_table` rows."""
    lines = ["| metric | generated | real baseline |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def plot_embedding(real_feats: np.ndarray, real_labels: np.ndarray, gen_feats: np.ndarray, gen_labels: np.ndarray,
                   user_map: UserMap, title: str = "classifier features, PCA: real-test (o) vs generated (x)"):
    """2-D PCA (fitted on real + generated) of the penultimate features, one colour per user."""
    from matplotlib.figure import Figure

    allf = np.concatenate([real_feats, gen_feats]).astype(np.float64)
    mu = allf.mean(0)
    _, _, vt = np.linalg.svd(allf - mu, full_matrices=False)
    proj = lambda f: (f - mu) @ vt[:2].T  # noqa: E731
    pr, pg = proj(real_feats), proj(gen_feats)
    fig = Figure(figsize=(6.5, 5), layout="constrained")
    ax = fig.subplots()
    cmap = __import__("matplotlib").colormaps["tab20"]
    for c in range(user_map.num_users):
        col = cmap(c % 20)
        ax.scatter(*pr[real_labels == c].T, s=12, color=col, marker="o", alpha=0.6)
        ax.scatter(*pg[gen_labels == c].T, s=16, color=col, marker="x",
                   label=f"user {user_map.user_of_label(c)}" if user_map.num_users <= 20 else None)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    if user_map.num_users <= 20:
        ax.legend(fontsize=7, ncols=2, loc="best")
    ax.set_title(title, fontsize=10)
    return fig


def plot_augmentation(aug: Mapping[str, Any], title: str = "real-test accuracy vs synthetic images per user"):
    """Mean ± std accuracy against the synthetic amount, one line per regime; synthetic-only dashed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for i, (regime, r) in enumerate(aug.items()):
        if not isinstance(r, dict) or "real_only" not in r:
            continue
        xs = [0] + [int(n) for n in r.get("real_plus_synthetic", {})]
        ys = [r["real_only"]] + list(r.get("real_plus_synthetic", {}).values())
        col = f"C{i}"
        ax.errorbar(xs, [y["mean"] for y in ys], yerr=[y["std"] for y in ys], marker="o", color=col, capsize=3,
                    label=f"{regime}: real + synthetic")
        if "synthetic_only" in r:
            ax.axhline(r["synthetic_only"]["mean"], color=col, ls="--", lw=1, label=f"{regime}: synthetic only")
    ax.set_xlabel("synthetic images per user added to real-train")
    ax.set_ylabel("real-test accuracy")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return fig


def plot_near_copies(near: Sequence[Mapping[str, Any]], max_pairs: int = 8):
    """Flagged generated images (top) above their nearest training image (bottom)."""
    from matplotlib.figure import Figure

    near = list(near)[:max_pairs]
    fig = Figure(figsize=(1.6 * max(1, len(near)) + 0.6, 3.6), layout="constrained")
    axes = fig.subplots(2, max(1, len(near)), squeeze=False)
    for j, r in enumerate(near):
        for i, (key, name) in enumerate((("generated", "generated"), ("nearest_train_feature", "nearest train"))):
            ax = axes[i][j]
            ax.imshow(read_rgb(r[key]))
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
        axes[0][j].set_title(f"d={r['feature_distance']:.3g}", fontsize=7)
    if not near:
        axes[0][0].set_axis_off()
        axes[1][0].set_axis_off()
        axes[0][0].set_title("no near-copies flagged")
    fig.suptitle("near-copies: generated (top) vs nearest training image (bottom)", fontsize=9)
    return fig


# --------------------------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------------------------

def _json_settings(cfg: EvalConfig) -> dict[str, Any]:
    s = asdict(cfg)
    s["few_shot_generated"] = {str(k): v for k, v in cfg.few_shot_generated.items()}
    return s


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run every part that its inputs allow; write OUT/metrics.json (rewritten after each part,
    with "complete": false until the end, so a crash keeps what was measured) and figures."""
    from mdgen_helpers import data

    started = time.time()
    out_dir = Path(cfg.output_dir)
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
    m: dict[str, Any] = {"complete": False, "settings": {**_json_settings(cfg), "device": str(device),
                                                         "image_size": image_size, "epochs": epochs},
                         "split_hash": split.hash, "user_map": um.to_json(), "skipped": {}, "figures": []}

    def save():
        m["seconds"] = round(time.time() - started, 1)
        io.atomic_write_json(out_dir / METRICS_NAME, m)

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
    io.atomic_write_text(out_dir / "headline.md", format_table(headline_table(m)) + "\n")
    m["complete"] = True
    save()
    return m


def write_figures(m: Mapping[str, Any], out_dir: Path, user_map: UserMap, test_feats, test_labels,
                  gen_feats=None, gen_labels=None) -> list[str]:
    """Per-user accuracy bars, confusion matrices, PCA embedding, augmentation curve, near-copies."""
    from mdgen_helpers import viz

    written = []

    def save(fig, name):
        viz.save_figure(fig, out_dir / name)
        written.append(name)

    real = m["classifier"]["real_test"]
    uids = real["user_ids"]
    save(viz.plot_confusion(real["confusion_matrix"], uids, title="real-test confusion"), "confusion_real_test.png")
    rec = m.get("recognisability")
    if rec:
        save(viz.plot_per_user_bars({int(u): v for u, v in rec["per_user"].items()}, "accuracy on generated",
                                    baseline=real["accuracy"], baseline_label="real-test accuracy",
                                    title="recognisability per user"), "recognisability_per_user.png")
        save(viz.plot_confusion(rec["confusion_matrix"], uids, title="generated-image confusion"),
             "confusion_generated.png")
        save(plot_embedding(test_feats, test_labels, gen_feats, gen_labels, user_map), "embedding_pca.png")
    if "near_copies" in m.get("memorisation", {}):
        save(plot_near_copies(m["memorisation"]["near_copies"]), "near_copies.png")
    if any(isinstance(v, dict) and "real_plus_synthetic" in v for v in m.get("augmentation", {}).values()):
        save(plot_augmentation(m["augmentation"]), "augmentation_gain.png")
    return written


def guidance_tradeoff(gen, tokenizer, classifier: UserClassifier, scales: Sequence[float],
                      user_ids: Sequence[int] | None = None, per_user: int = 8, seed: int = 0, num_steps: int = 25,
                      solver: str = "euler", batch_size: int = 16) -> list[dict[str, Any]]:
    """Recognisability and diversity (mean pairwise feature distance within each user, averaged)
    per guidance scale: higher guidance usually buys recognisability with diversity."""
    from mdgen_helpers import generate

    user_ids = list(user_ids) if user_ids is not None else list(gen.user_map.user_ids)
    uids = [u for u in user_ids for _ in range(per_user)]
    seeds = [generate.image_seed(seed, u, k) for u in user_ids for k in range(1, per_user + 1)]
    labels = torch.tensor([classifier.user_map.label_of_user(u) for u in uids])
    rows = []
    for scale in scales:
        latents = generate.sample_latents(gen, uids, seeds, guidance_scale=float(scale), num_steps=num_steps,
                                          solver=solver, batch_size=batch_size)
        images = generate.decode_to_uint8(tokenizer, latents, batch_size=batch_size)
        if images.shape[-1] != classifier.image_size:
            images = F.interpolate(images.float(), size=(classifier.image_size,) * 2, mode="bilinear",
                                   antialias=True).round().clamp(0, 255).to(torch.uint8)
        feats, probs = embed(classifier.model, images)
        lab = labels.numpy()
        rows.append({"guidance_scale": float(scale), "recognisability": float((probs.argmax(1) == lab).mean()),
                     "diversity": float(np.mean([metrics.mean_pairwise_distance(feats[lab == c]) for c in np.unique(lab)])),
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
    d = EvalConfig
    parser.add_argument("--data_dir", required=True, help="real (or simulated) data folder ID_k/*.jpg")
    parser.add_argument("--split", required=True, help="split.json written by `split`")
    parser.add_argument("--generated_dir", default=None, help="generate output folder (manifest.json + PNGs) or its dataset/ export")
    parser.add_argument("--output_dir", required=True, help="where metrics.json, headline.md, figures and classifier go")
    parser.add_argument("--classifier", default=None, help="saved classifier .safetensors to reuse (trained and saved there if missing)")
    parser.add_argument("--pretrained", default=None, help="local torchvision ResNet-18 ImageNet weights (default: from scratch)")
    parser.add_argument("--epochs", type=int, default=None, help="classifier epochs (default 15 on CPU, 30 on GPU)")
    parser.add_argument("--batch_size", type=int, default=d.batch_size)
    parser.add_argument("--min_steps", type=int, default=d.min_steps, help="at least this many steps per training (few-shot)")
    parser.add_argument("--seeds", type=int, nargs="*", default=list(d.seeds), help="training seeds for the augmentation runs")
    parser.add_argument("--synthetic_per_user", type=int, nargs="*", default=list(d.synthetic_per_user),
                        help="synthetic images per user added to real-train (0 = real only)")
    parser.add_argument("--few_shot", type=int, nargs="*", default=[], help="few-shot regimes: real train images per user")
    parser.add_argument("--few_shot_generated", type=_regime_dir, nargs="*", default=[], metavar="K=DIR",
                        help="generated set of each few-shot regime (its generator trained on that subset only)")
    parser.add_argument("--few_shot_seed", type=int, default=d.few_shot_seed)
    parser.add_argument("--inception_weights", default=None, help="local Inception weights for FID/KID (skipped without)")
    parser.add_argument("--filter_confidence", type=float, default=None,
                        help="also report augmentation with generated images kept only above this classifier confidence")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image_size", type=int, default=None,
                        help="classifier input size (default 64 on CPU for speed, 128 on GPU)")
    parser.add_argument("--no_figures", action="store_true")


def cli_main(args: argparse.Namespace) -> int:
    cfg = EvalConfig(
        data_dir=args.data_dir, split=args.split, output_dir=args.output_dir, generated_dir=args.generated_dir,
        classifier=args.classifier, pretrained=args.pretrained, epochs=args.epochs, batch_size=args.batch_size,
        min_steps=args.min_steps, seeds=tuple(args.seeds), synthetic_per_user=tuple(args.synthetic_per_user),
        few_shot=tuple(args.few_shot), few_shot_generated=dict(args.few_shot_generated),
        few_shot_seed=args.few_shot_seed, inception_weights=args.inception_weights,
        filter_confidence=args.filter_confidence, device=args.device, image_size=args.image_size,
        figures=not args.no_figures)
    m = evaluate(cfg)
    print(format_table(headline_table(m)))
    print(f"wrote {Path(cfg.output_dir) / METRICS_NAME}")
    return 0
