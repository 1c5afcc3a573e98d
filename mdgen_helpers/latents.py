"""Latent extraction: every image of the persisted split -> tokenizer latents on disk, once.

Layout of `out_dir` (all safetensors, all written atomically by the main process):

* `{train,val,test}.safetensors`: `latents` (N, 32, 16, 16) float32 posterior means,
  `latents_std` (N, 32, 16, 16) posterior stds (zeros for the deterministic stand-in), `labels`
  (N,) int64 0-based; metadata `tokenizer` (identity), `split_hash`, `user_map`, `files` (the
  part's relpaths, in row order), `part`, `image_size`, `latent_shape`.
* `stats.safetensors`: per-channel `mean`, `std` (32,) of the TRAIN latents only (val/test must
  not leak into the normalisation), with the same identity metadata. Training and generation
  normalise with `LatentStats` (`z_model = (z - mean) / std`); `load_stats` refuses to run without these stats
  rather than falling back to ImageNet constants, which would silently mis-scale every latent.

A part is skipped when its file already holds latents of the same tokenizer, split and file
list, so re-running after an interruption only redoes what is missing or stale.

Multi-process (Accelerate's PartialState): each process encodes one contiguous shard of the part through a
DataLoader (workers decode JPEGs while the accelerator encodes), the shards are padded, gathered
with their row indices, and put back in order; the merge checks that every row arrived exactly
once before anything is written.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather, pad_across_processes
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from mdgen_helpers import data, trust
from mdgen_helpers.files import atomic_save_safetensors, load_safetensors_metadata, sha256_json
from mdgen_helpers.errors import ArtifactMismatchError, DataError, MdgenError
from mdgen_helpers.tokenizers import load_tokenizer
from mdgen_helpers.users import UserMap

PARTS = ("train", "val", "test")
FORMAT = "mdgen-latents-v1"
# Metadata keys that decide whether an existing file still matches its inputs.
IDENTITY_KEYS = ("format", "tokenizer", "split_hash", "user_map", "files", "part", "image_size", "latent_shape")


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass
class LatentSet:
    """One part's latents as stored. `meta` is the file's decoded metadata."""

    latents: torch.Tensor
    latents_std: torch.Tensor
    labels: torch.Tensor
    files: list[str]
    meta: dict = field(repr=False)

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def part(self) -> str:
        return self.meta["part"]

    @property
    def tokenizer(self) -> str:
        return self.meta["tokenizer"]

    @property
    def split_hash(self) -> str:
        return self.meta["split_hash"]

    @property
    def user_map(self) -> UserMap:
        return UserMap.from_json(self.meta["user_map"])

    def check_compatible(self, other: "LatentSet") -> None:
        """Raise ArtifactMismatchError unless both sets come from the same tokenizer, split and users."""
        for key, what in (("tokenizer", "tokenizer"), ("split_hash", "split"), ("user_map", "user map")):
            if self.meta.get(key) != other.meta.get(key):
                raise ArtifactMismatchError(
                    f"latents of part '{self.part}' and part '{other.part}' were extracted with a different {what} "
                    f"({self.meta.get(key)!r} vs {other.meta.get(key)!r}); re-run `python -m mdgen_helpers extract` "
                    "so that every part comes from the same tokenizer and split"
                )


def check_consistent(*sets: LatentSet) -> None:
    """Every set compatible with the first (same tokenizer, split hash and user map)."""
    for s in sets[1:]:
        sets[0].check_compatible(s)


def load_latents(out_dir, part: str) -> LatentSet:
    path = Path(out_dir) / f"{part}.safetensors"
    if part not in PARTS:
        raise MdgenError(f"unknown part {part!r}; expected one of {PARTS}")
    if not path.is_file():
        raise MdgenError(f"no latents for part '{part}' at {path}; run `python -m mdgen_helpers extract` first")
    meta = load_safetensors_metadata(path)
    if meta.get("format") != FORMAT:
        raise ArtifactMismatchError(f"{path} is not a latent file written by mdgen (format={meta.get('format')!r}); re-run extract")
    t = load_file(str(path))
    s = LatentSet(t["latents"], t["latents_std"], t["labels"], list(meta["files"]), meta)
    if not (len(s.files) == s.labels.shape[0] == s.latents.shape[0] == s.latents_std.shape[0]):
        raise ArtifactMismatchError(f"{path} is inconsistent (rows: files {len(s.files)}, labels {s.labels.shape[0]}, "
                                    f"latents {s.latents.shape[0]}); re-run extract")
    return s


@dataclass(frozen=True)
class LatentStats:
    """Per-channel mean and std (C,) of the train latents: the one normalisation of the project.

    The model sees `(z - mean) / std`; generation turns its output back with `denormalize`.
    Training, generation, previews and the checkpoint metadata all go through this type."""

    mean: torch.Tensor
    std: torch.Tensor

    def __post_init__(self):
        object.__setattr__(self, "mean", torch.as_tensor(self.mean, dtype=torch.float32).reshape(-1))
        object.__setattr__(self, "std", torch.as_tensor(self.std, dtype=torch.float32).reshape(-1))
        if self.mean.shape != self.std.shape:
            raise ArtifactMismatchError(f"latent statistics: mean has {self.mean.numel()} channels, std {self.std.numel()}")

    @classmethod
    def of(cls, latents: torch.Tensor) -> "LatentStats":
        """Mean and (population) std over images and positions, in float64 for stability."""
        z = latents.double().transpose(0, 1).reshape(latents.shape[1], -1)
        return cls(z.mean(1).float(), z.std(1, correction=0).clamp_min(1e-6).float())

    @property
    def channels(self) -> int:
        return self.mean.numel()

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) latents -> the model's units."""
        return (z.float() - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def normalize_std(self, std: torch.Tensor) -> torch.Tensor:
        """A posterior std (N, C, H, W) in the model's units."""
        return std.float() / self.std.view(1, -1, 1, 1)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The model's units -> latents the tokenizer decodes (float32, on z's device)."""
        return z.float() * self.std.view(1, -1, 1, 1).to(z.device) + self.mean.view(1, -1, 1, 1).to(z.device)

    def to_json(self) -> dict:
        return {"latent_mean": self.mean.tolist(), "latent_std": self.std.tolist()}

    @classmethod
    def from_json(cls, obj: dict) -> "LatentStats":
        return cls(torch.tensor(obj["latent_mean"], dtype=torch.float32),
                   torch.tensor(obj["latent_std"], dtype=torch.float32))

    def save(self, path, metadata: dict) -> Path:
        return atomic_save_safetensors({"mean": self.mean, "std": self.std}, path, metadata)


def load_stats(out_dir, tokenizer: str | None = None, split_hash: str | None = None) -> tuple[LatentStats, dict]:
    """(stats, meta) of the train latents. Raises when the stats are missing, or do not belong
    to the latents next to them / the given tokenizer identity or split hash."""
    out_dir = Path(out_dir)
    path = out_dir / "stats.safetensors"
    if not path.is_file():
        raise MdgenError(
            f"latent statistics {path} are missing; run `python -m mdgen_helpers extract` (it computes them on "
            "the train split). ImageNet statistics are never substituted: they do not fit these latents."
        )
    meta = load_safetensors_metadata(path)
    expected = {}
    train_path = out_dir / "train.safetensors"
    if train_path.is_file():
        tm = load_safetensors_metadata(train_path)
        expected = {"tokenizer": tm.get("tokenizer"), "split_hash": tm.get("split_hash"),
                    "train_files_hash": sha256_json(tm.get("files"))}
    if tokenizer is not None:
        expected["tokenizer"] = tokenizer
    if split_hash is not None:
        expected["split_hash"] = split_hash
    for key, want in expected.items():
        if meta.get(key) != want:
            raise ArtifactMismatchError(
                f"latent statistics {path} do not match: {key} is {meta.get(key)!r}, expected {want!r}; "
                "re-run `python -m mdgen_helpers extract` with the same tokenizer and split"
            )
    t = load_file(str(path))
    return LatentStats(t["mean"], t["std"]), meta


# --------------------------------------------------------------------------------------------
# Sharded encoding
# --------------------------------------------------------------------------------------------


def shard_range(n: int, process_index: int, num_processes: int) -> tuple[int, int]:
    """Contiguous shard [start, end) of n rows for one process; the first n % p shards get one
    extra row (the same rule as `Accelerator.split_between_processes`)."""
    base, extra = divmod(n, num_processes)
    start = process_index * base + min(process_index, extra)
    return start, start + base + (1 if process_index < extra else 0)


@torch.no_grad()
def encode_shard(dataset, tokenizer, process_index: int = 0, num_processes: int = 1, batch_size: int = 32,
                 num_workers: int = 2, progress: bool = False, desc: str = "encode"):
    """Encode this process's shard of `dataset` (items (image, label, index)).

    Returns (rows, mean, std): rows (M,) int64 positions in the part, mean/std (M, 32, 16, 16)
    float32 on the CPU.
    """
    start, end = shard_range(len(dataset), process_index, num_processes)
    subset = Subset(dataset, range(start, end))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=tokenizer.device.type == "cuda")
    means, stds = [], []
    for images, _labels, _index in tqdm(loader, desc=desc, disable=not progress, unit="batch"):
        mean, std = tokenizer.encode(images.to(tokenizer.device, non_blocking=True))
        means.append(mean.float().cpu())
        stds.append(std.float().cpu())
    empty = torch.zeros((0, *tokenizer.latent_shape))
    mean = torch.cat(means) if means else empty
    std = torch.cat(stds) if stds else empty.clone()
    if mean.shape[0] != end - start:
        raise MdgenError(f"shard {process_index}/{num_processes} encoded {mean.shape[0]} images, expected {end - start}")
    return torch.arange(start, end, dtype=torch.int64), mean, std


def merge_shards(rows: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, n: int):
    """Put gathered rows back in order. Padding rows carry index -1 and are dropped; every index
    in [0, n) must appear exactly once, else nothing is written."""
    keep = rows >= 0
    rows, mean, std = rows[keep], mean[keep], std[keep]
    if rows.numel() != n or not torch.equal(torch.sort(rows).values, torch.arange(n)):
        counts = torch.bincount(rows.clamp(0, max(n - 1, 0)), minlength=n) if rows.numel() else torch.zeros(n)
        raise MdgenError(
            f"gathering latents failed: expected each of {n} rows once, got {rows.numel()} rows "
            f"({int((counts == 0).sum())} missing, {int((counts > 1).sum())} duplicated); nothing was written"
        )
    order = torch.argsort(rows)
    return mean[order], std[order]


def _gather(state, rows, mean, std):
    """All processes' shards, padded to equal length (rows padded with -1) and concatenated."""
    if state.num_processes == 1:
        return rows, mean, std
    dev = state.device
    rows = pad_across_processes(rows.to(dev), dim=0, pad_index=-1)
    mean = pad_across_processes(mean.to(dev), dim=0)
    std = pad_across_processes(std.to(dev), dim=0)
    return gather(rows).cpu(), gather(mean).cpu(), gather(std).cpu()


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------


def part_metadata(split, part: str, tokenizer) -> dict:
    return {
        "format": FORMAT,
        "tokenizer": tokenizer.identity,
        "split_hash": split.hash,
        "user_map": split.user_map.to_json(),
        "files": list(split.files(part)),
        "part": part,
        "image_size": tokenizer.image_size,
        "latent_shape": list(tokenizer.latent_shape),
    }


def _up_to_date(path: Path, expected: dict) -> bool:
    if not path.is_file():
        return False
    try:
        meta = load_safetensors_metadata(path)
    except Exception:  # unreadable or truncated by hand: recompute
        return False
    return all(meta.get(k) == expected[k] for k in IDENTITY_KEYS)


def _stats_metadata(train_meta: dict) -> dict:
    return {"format": FORMAT, "tokenizer": train_meta["tokenizer"], "split_hash": train_meta["split_hash"],
            "user_map": train_meta["user_map"], "train_files_hash": sha256_json(train_meta["files"]),
            "computed_on": "train posterior means, per channel over images and positions"}


def extract_latents(data_dir, split, tokenizer, out_dir, batch_size: int = 32, num_workers: int = 2,
                    state=None, progress: bool = True) -> dict[str, str]:
    """Encode train/val/test of `split` and write them (plus train stats) to `out_dir`.

    Returns {part: "written" | "skipped", "stats": ...}. Call from every process under
    `accelerate launch`; only the main process writes. `state` is an accelerate `PartialState`
    (default) or `Accelerator`; `tokenizer` is moved to its device. A PartialState, not an
    Accelerator, because extraction needs no mixed-precision setting, and initialising the
    Accelerator state here would forbid a later `Accelerator(mixed_precision="fp16")` (training)
    in the same Python process (a notebook kernel).
    """
    data.check_split(split, data_dir)
    if not split.files("train"):
        raise DataError("the split has no training images; latents (and their statistics) need at least one")
    out_dir = Path(out_dir)
    if state is None:
        state = PartialState()
    tokenizer.to(state.device)
    main = state.is_main_process
    status: dict[str, str] = {}
    train_changed = False
    for part in PARTS:
        path = out_dir / f"{part}.safetensors"
        meta = part_metadata(split, part, tokenizer)
        if _up_to_date(path, meta):
            status[part] = "skipped"
            continue
        dataset = data.ImageDataset(data_dir, split, part)
        n = len(dataset)
        if n != len(meta["files"]):
            raise MdgenError(f"ImageDataset for part '{part}' has {n} items but the split lists {len(meta['files'])}")
        rows, mean, std = encode_shard(dataset, tokenizer, state.process_index, state.num_processes,
                                       batch_size, num_workers, progress=progress and main,
                                       desc=f"extract {part} ({n} images)")
        rows, mean, std = _gather(state, rows, mean, std)
        mean, std = merge_shards(rows, mean, std, n)
        if main:
            labels = torch.tensor(list(split.labels(part)), dtype=torch.int64).reshape(n)
            with trust.disk_full_guard(out_dir, f"the {part} latents"):  # the temp file is already removed
                atomic_save_safetensors({"latents": mean, "latents_std": std, "labels": labels}, path, meta)
        status[part] = "written"
        train_changed |= part == "train"
        state.wait_for_everyone()

    stats_path = out_dir / "stats.safetensors"
    train_meta = part_metadata(split, "train", tokenizer)
    stats_meta = _stats_metadata(train_meta)
    fresh = (not train_changed and stats_path.is_file()
             and all(load_safetensors_metadata(stats_path).get(k) == v for k, v in stats_meta.items()))
    if fresh:
        status["stats"] = "skipped"
    else:
        if main:
            with trust.disk_full_guard(out_dir, "the latent statistics"):
                LatentStats.of(load_latents(out_dir, "train").latents).save(stats_path, stats_meta)
        status["stats"] = "written"
    state.wait_for_everyone()
    return status


# --------------------------------------------------------------------------------------------
# CLI: extract
# --------------------------------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data_dir", required=True, help="data set root with ID_k/ folders")
    parser.add_argument("--split", help="persisted split.json (from `python -m mdgen_helpers split`); default: "
                        "DATA_DIR/split.json, made there (seed 0, 70/15/15) when it does not exist yet")
    parser.add_argument("--output_path", required=True, help="output directory, e.g. WORK/latents")
    parser.add_argument("--vavae_path", help="VA-VAE checkpoint (.pt or safetensors copy)")
    parser.add_argument("--tokenizer", help="any tokenizer file, e.g. the stand-in WORK/tokenizer.safetensors")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader workers decoding JPEGs")
    parser.add_argument("--no_progress", action="store_true")
    parser.epilog = "Multi-GPU: accelerate launch --num_processes 2 -m mdgen_helpers extract ..."


def cli_main(args) -> int:
    paths = [p for p in (args.vavae_path, args.tokenizer) if p]
    if len(paths) != 1:
        raise MdgenError("give exactly one of --vavae_path (VA-VAE checkpoint) or --tokenizer (e.g. the stand-in file)")
    state = PartialState()
    tokenizer = load_tokenizer(paths[0], device=state.device)
    split_path = Path(args.split) if args.split else Path(args.data_dir) / "split.json"
    if not args.split and state.is_main_process:
        try:
            data.ensure_split(args.data_dir, split_path)
        except OSError as e:
            raise MdgenError(f"cannot write {split_path} ({e.strerror}); make one elsewhere with "
                             "`python -m mdgen_helpers split --out W/split.json` and pass --split") from None
        print(f"split: {split_path}")
    state.wait_for_everyone()
    split = data.load_split(split_path)
    status = extract_latents(args.data_dir, split, tokenizer, args.output_path, batch_size=args.batch_size,
                             num_workers=args.num_workers, state=state, progress=not args.no_progress)
    if state.is_main_process:
        print(f"latents in {args.output_path} (tokenizer {tokenizer.identity}): "
              + ", ".join(f"{k} {v}" for k, v in status.items()))
    return 0
