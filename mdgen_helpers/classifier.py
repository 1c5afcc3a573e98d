"""The user classifier: images to tensors, a torchvision ResNet-18, train / embed / save / load.

A classifier trained on real-train images names the user of an image; its accuracy on generated
images is the recognisability figure and its penultimate (512-d) features are the space of the
distribution metrics (`metrics.py`). Images are held in memory as uint8 at the classifier's
input size (`ImageSet`); a generated set is read from its manifest, its `dataset/` export or its
file names (`find_generated`). Saved as safetensors + a JSON twin, never pickled.
"""

from __future__ import annotations

import copy
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torchvision.models import resnet18
from tqdm.auto import tqdm

from mdgen_helpers.data import load_image
from mdgen_helpers.env import mixed_precision_for
from mdgen_helpers import trust
from mdgen_helpers.errors import ArtifactMismatchError, CheckpointError, DataError
from mdgen_helpers.files import atomic_save_safetensors, atomic_write_json, load_safetensors_metadata, read_json, sha256_file
from mdgen_helpers.users import UserMap, parse_image_name


CLASSIFIER_FORMAT = "mdgen-user-classifier"

def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)

def default_image_size(device: torch.device) -> int:
    """64 px on CPU keeps a ResNet-18 epoch to tens of seconds; 128 px on GPU keeps more detail."""
    return 128 if device.type == "cuda" else 64

def default_epochs(device: torch.device) -> int:
    return 30 if device.type == "cuda" else 15

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
    `micro_doppler_userNN_KKK.png` files without manifest. A generate folder that holds a
    `dataset/` export is read from the export: JPEGs like the real data, so the two-sample test
    compares images, not file formats. With a manifest, exactly its files count (never leftovers
    of an earlier run in the folder). `info["seeds"]` holds each image's sampling seed (None
    where the manifest does not say).
    """
    gdir = Path(generated_dir)
    if not gdir.is_dir():
        raise DataError(f"generated folder {gdir} does not exist; run `python -m mdgen_helpers generate` first")
    if any((gdir / "dataset" / f).is_dir() for f in user_map.folders):
        gdir = gdir / "dataset"
    manifest_path = next((p for p in (gdir / "manifest.json", gdir.parent / "manifest.json") if p.is_file()), None)
    manifest = read_json(manifest_path) if manifest_path else {}
    info: dict[str, Any] = {
        "dir": str(gdir),
        "manifest_sha256": sha256_file(manifest_path) if manifest_path else None,
        "checkpoint_sha256": manifest.get("checkpoint_sha256"),
        "split_hash": manifest.get("split_hash"),
        "tokenizer": manifest.get("tokenizer"),
        "settings": manifest.get("settings"),
    }
    items: list[tuple[Path, int]] = []
    folders = [f for f in user_map.folders if (gdir / f).is_dir()]
    key = ("file" if manifest_path == gdir / "manifest.json" else
           "dataset_file" if manifest_path is not None and manifest.get("dataset_dir") == gdir.name else None)
    if key and manifest.get("images"):
        info["layout"] = "manifest"
        records = [r for r in manifest["images"] if r.get(key)]
        for r in records:
            items.append((trust.inside(manifest_path.parent, r[key], "manifest entry"),
                          _label_of_user(user_map, r["user_id"], gdir)))
        info["seeds"] = [r.get("seed") for r in records]
    elif folders:  # real layout (export) without a manifest
        info["layout"] = "folders"
        for f in folders:
            label = user_map.label_of_folder(f)
            items += [(p, label) for p in sorted((gdir / f).iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
        seeds = {(r.get("user_id"), r.get("sample_index")): r.get("seed") for r in manifest.get("images", [])}
        info["seeds"] = [seeds.get((user_map.user_of_label(lab), _export_index(p))) for p, lab in items]
    else:
        info["layout"] = "file names"
        for p in sorted(gdir.iterdir()):
            parsed = parse_image_name(p.name)
            if parsed:
                items.append((p, _label_of_user(user_map, parsed[0], gdir)))
        info["seeds"] = [None] * len(items)
    if not items:
        raise DataError(f"no generated images found in {gdir} (expected manifest.json with images, ID_k/ folders, "
                        f"or micro_doppler_userNN_KKK.png files)")
    missing = [str(p) for p, _ in items if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} generated images listed in {gdir} are missing, e.g. {missing[0]}; re-run generate")
    return [p for p, _ in items], [label for _, label in items], info


def _export_index(path: Path) -> int | None:
    """k of an exported gen_KKKK.jpg (`generate.export_name`), to find its seed in the manifest."""
    m = re.match(r"^gen_(\d+)\.", path.name)
    return int(m.group(1)) if m else None


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
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))

def to_model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)

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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = resnet18(weights=None, num_classes=num_classes)
    if pretrained:
        path = Path(pretrained)
        if not path.is_file():
            raise CheckpointError(f"pretrained weights {path} not found; pass a local torchvision resnet18 ImageNet "
                                  f"file (e.g. resnet18-f37072fd.pth) or leave --pretrained out to train from scratch")
        if path.suffix == ".safetensors":
            trust.check_safetensors(path, "pretrained weights")
            state = load_file(str(path))
        else:
            state = trust.load_pickle_safely(path, "pretrained weights")
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

def classifier_steps(num_train: int, epochs: int, batch_size: int, min_steps: int) -> int:
    """Optimiser steps of `epochs` passes over `num_train` images, at least `min_steps`."""
    return max(int(epochs) * (num_train // max(1, min(batch_size, num_train))), int(min_steps), 1)


def train_classifier(train: ImageSet, val: ImageSet | None, num_classes: int, *, epochs: int, seed: int,
                     device: torch.device, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 5e-4,
                     min_steps: int = 200, steps: int | None = None, pretrained: str | None = None,
                     progress: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train a ResNet-18 on `train`; with `val`, keep the weights with the best `val` accuracy.

    One-cycle AdamW for `steps` steps (None: `classifier_steps`, which grows with the training
    set; pass the same `steps` to compare training sets at matched compute). Without `val` the
    schedule is fixed and the last weights are kept, so no held-out image influences the model;
    with it, validation runs `epochs` times, evenly spaced. No augmentation: flips change the
    physics (time reversal, Doppler sign). Callers run the leakage guard first.
    """
    if len(train) < 2:
        raise DataError(f"classifier training needs at least 2 images, got {len(train)}")
    model = build_classifier(num_classes, pretrained, seed).to(device)
    bs = min(batch_size, len(train))
    total = int(steps) if steps else classifier_steps(len(train), epochs, batch_size, min_steps)
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
        if val is not None and (step % eval_every == 0 or step == total):
            acc = accuracy(model, val)
            history.append({"step": step, "loss": float(loss.detach()), "val_accuracy": acc})
            if acc > best_acc:
                best_acc, best_step = acc, step
                best_state = copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_step = total
    model.eval()
    info = {"seed": int(seed), "epochs": int(epochs), "steps": total, "batch_size": bs, "lr": lr,
            "weight_decay": weight_decay, "min_steps": int(min_steps), "pretrained": pretrained,
            "num_train": len(train), "num_val": len(val) if val is not None else 0,
            "model_selection": "best val accuracy" if val is not None else "fixed schedule (last weights)",
            "best_step": best_step, "val_accuracy": best_acc if val is not None else None,
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
    atomic_save_safetensors(clf.model.state_dict(), path, meta)
    atomic_write_json(path.with_suffix(".json"), meta)
    return path

def load_classifier(path, device: str | torch.device = "cpu") -> UserClassifier:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"classifier {path} not found")
    try:
        meta = load_safetensors_metadata(path)
    except Exception as e:  # noqa: BLE001 - any parse failure means "not our file"
        raise CheckpointError(f"{path} is not a safetensors file ({e})") from None
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise CheckpointError(f"{path} is not an mdgen user classifier (format {meta.get('format')!r})")
    model = build_classifier(int(meta["num_classes"]))
    model.load_state_dict(load_file(str(path)))
    model.to(resolve_device(device)).eval()
    return UserClassifier(model, int(meta["image_size"]), UserMap.from_json(meta["user_map"]), meta["split_hash"],
                          meta.get("info", {}))
