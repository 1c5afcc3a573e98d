"""Train the user-conditioned LightningDiT on latents with flow matching (Accelerate).

    python -m mdgen_helpers train --latent_dir WORK/latents --output_dir RUN \
        --batch_size 32 --max_epochs 100 --lr 1e-4 --devices 2 --precision 16-mixed

One function, `train(cfg)`, is what the CLI, the notebooks and `launch_training` all call.
Lessons from the project this replaces, each handled here:
- precision is chosen from the GPU's compute capability (bf16 on >= 8.0, fp16 + grad scaler on a
  T4, fp32 on CPU), never from `torch.cuda.is_bf16_supported()`, which says yes on a T4;
- a step whose loss or gradient is not finite is skipped and counted on every rank alike (the
  flag is reduced), so NaNs never reach the weights or the EMA and ranks never diverge;
- every random draw of step s (batch order, noise, t, label dropout, posterior resampling) comes
  from a generator seeded by (seed, s) and is drawn for the whole global batch on every rank,
  each rank keeping its slice: the data position is a pure function of the step, a resumed run
  repeats an uninterrupted one exactly, and N processes see what 1 process with the same
  global batch sees;
- checkpoints are step-named folders written to a temp name with `complete.json` last and then
  renamed, so a session killed mid-save leaves the previous checkpoint usable, and --resume
  picks the newest complete folder by step number (never by file size or mtime);
- the latent statistics, user map, tokenizer identity, model config and split hash go into every
  artifact (`ema.safetensors` metadata, `config.json`, `complete.json`), so generation reads
  nothing else;
- `--time_budget` (hours) stops with a checkpoint before Kaggle's 12-hour kill; the next session
  runs the same command with --resume;
- decisions every rank must share (skip, early stop, time stop) are reduced across processes;
- `launch_training` picks notebook_launcher or an `accelerate launch` subprocess and says which.

Run layout (docs/design.md "train"): `config.json`, `ema.safetensors`, `metrics.jsonl`,
`result.json`, `checkpoints/step_0000100/` (Accelerate `save_state` + `complete.json`),
`previews/step_0000100.png`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mdgen_helpers import io
from mdgen_helpers.errors import ArtifactMismatchError, CheckpointError, DataError, MdgenError
from mdgen_helpers.users import UserMap

CKPT_DIR = "checkpoints"
CKPT_RE = re.compile(r"^step_(\d{7,})$")
COMPLETE = "complete.json"
EMA_NAME = "ema.safetensors"
# Validation: a fixed grid of t and fixed noise seeds, so val_loss is comparable across steps and runs.
VAL_T_GRID = tuple((k + 0.5) / 8 for k in range(8))
VAL_SEED = 1_000_003
PREVIEW_SEED = 2_000_003
PRECISIONS = {
    "auto": "auto", "no": "no", "32": "no", "fp32": "no", "32-true": "no",
    "fp16": "fp16", "16": "fp16", "16-mixed": "fp16", "bf16": "bf16", "bf16-mixed": "bf16",
}


class TrainConfigError(MdgenError):
    """A training setting or input that cannot work; the message says which and what to change."""


@dataclass
class TrainConfig:
    """Every training setting. Defaults are the recommended settings for a few thousand images."""

    latent_dir: str = ""
    output_dir: str = ""
    preset: str = "S/2"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"depth": 2, "hidden_size": 64}
    batch_size: int = 32                 # per process; global batch = batch_size * processes
    max_epochs: int | None = 100
    max_steps: int | None = None         # optimizer steps; the smaller of the two limits wins
    lr: float = 1e-4
    warmup_steps: int = 500              # linear warm-up, then constant (as LightningDiT)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)  # LightningDiT's AdamW betas
    grad_accum: int = 1
    clip_norm: float = 1.0               # 0 = no clipping (the norm is still measured)
    ema_decay: float = 0.999             # small data: ~0.999; ImageNet used 0.9999
    ema_warmup: bool = True              # decay min(ema_decay, (1+n)/(10+n)) after n updates
    label_dropout: float = 0.1           # classifier-free guidance; dropped labels -> dit.null_label
    time_dist: str = "uniform"           # or "logit_normal" (official LightningDiT)
    cosine_weight: float = 0.0           # LightningDiT's velocity-direction term (1.0 there)
    resample_latents: bool = False       # z = mean + std * eps from the stored posterior
    precision: str = "auto"              # auto|no|32|fp16|16-mixed|bf16|bf16-mixed
    devices: int = 1
    cpu: bool = False                    # force the CPU even when a GPU is present
    seed: int = 0
    log_every: int = 50
    val_every: int = 500                 # 0 = off
    ckpt_every: int = 1000               # 0 = only at the end / at the time budget
    preview_every: int = 0               # 0 = off; needs `tokenizer`
    keep_last: int = 3
    early_stop_patience: int = 0         # validations without improvement before stopping; 0 = off
    resume: bool | str = False           # True: newest complete checkpoint in output_dir; or a folder
    init_from: str | None = None         # official LightningDiT weights or one of our runs
    time_budget: float | None = None     # hours for this session, e.g. 11.5 on Kaggle
    tokenizer: str | None = None         # for preview decoding
    preview_users: int = 8
    preview_per_user: int = 4
    preview_steps: int = 16
    preview_guidance: float = 4.0
    tensorboard: bool = False
    progress: bool = True

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise TrainConfigError(f"unknown training settings {unknown}; known: {sorted(known)}")
        obj = dict(obj)
        if "betas" in obj:
            obj["betas"] = tuple(float(b) for b in obj["betas"])
        return cls(**obj)


# --------------------------------------------------------------------------------------------
# Pre-flight: every input check happens here, before a model is built or a file is written
# --------------------------------------------------------------------------------------------


@dataclass
class TrainData:
    """What training reads: normalised latents and the identity that travels with every artifact."""

    train_z: torch.Tensor          # (N, C, H, W) normalised posterior means
    train_std: torch.Tensor        # (N, C, H, W) posterior std, in normalised units
    train_y: torch.Tensor          # (N,) int64 labels
    val_z: torch.Tensor | None
    val_y: torch.Tensor | None
    mean: torch.Tensor             # (C,)
    std: torch.Tensor              # (C,)
    user_map: UserMap
    tokenizer: str
    split_hash: str

    @property
    def identity(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer, "split_hash": self.split_hash, "user_map": self.user_map.to_json(),
                "latent_mean": self.mean.tolist(), "latent_std": self.std.tolist()}


def resolve_precision(requested: str, device_type: str, capability: tuple[int, int] | None = None) -> str:
    """Accelerate's mixed_precision ('no' | 'fp16' | 'bf16') for a request and a device.

    'auto': bf16 on compute capability >= 8.0, fp16 (grad scaler) below, fp32 on CPU. fp16 on a
    CPU and bf16 on a GPU without native bf16 are refused with an explanation."""
    key = str(requested).lower()
    if key not in PRECISIONS:
        raise TrainConfigError(f"unknown precision {requested!r}; use one of {sorted(PRECISIONS)}")
    mode = PRECISIONS[key]
    if device_type != "cuda":
        if mode == "fp16":
            raise TrainConfigError("fp16 mixed precision needs a CUDA GPU; on CPU use --precision 32 (or auto)")
        return "no" if mode == "auto" else mode
    from mdgen_helpers.env import mixed_precision_for

    cap = capability or torch.cuda.get_device_capability()
    if mode == "auto":
        return mixed_precision_for(cap)
    if mode == "bf16" and mixed_precision_for(cap) != "bf16":
        raise TrainConfigError(
            f"bf16 needs compute capability >= 8.0 (Ampere or newer); this GPU has {cap[0]}.{cap[1]} (a T4 is 7.5). "
            "Use --precision 16-mixed (fp16 with a grad scaler) or auto."
        )
    return mode


def load_train_data(cfg: TrainConfig, num_processes: int = 1) -> TrainData:
    """Read and check the latents; raise a TrainConfigError / ArtifactMismatchError on bad input."""
    from mdgen_helpers.latents import load_latents, load_stats

    ldir = Path(cfg.latent_dir)
    if not ldir.is_dir():
        raise TrainConfigError(f"latent directory {ldir} does not exist; run `python -m mdgen_helpers extract` first")
    if not (ldir / "stats.safetensors").is_file():
        raise ArtifactMismatchError(
            f"latent statistics {ldir / 'stats.safetensors'} are missing; re-run `python -m mdgen_helpers extract` "
            "(they are computed on the train split and saved with every checkpoint; nothing is substituted)"
        )
    train = load_latents(ldir, "train")
    val = load_latents(ldir, "val") if cfg.val_every > 0 else None
    # Every part must come from the same split, tokenizer and users, and the stats must belong to them.
    for other in [val] if val is not None else []:
        if other.split_hash != train.split_hash:
            raise ArtifactMismatchError(
                f"{ldir}: train and val latents come from different splits (split hash {train.split_hash[:12]} vs "
                f"{other.split_hash[:12]}); re-run `python -m mdgen_helpers extract` for one split"
            )
        train.check_compatible(other)
    mean, std, smeta = load_stats(ldir, tokenizer=train.tokenizer, split_hash=train.split_hash)
    if len(train) == 0:
        raise DataError(f"{ldir}/train.safetensors holds no latents: the train split is empty")
    if val is not None and len(val) == 0:
        raise DataError(f"{ldir}/val.safetensors holds no latents: the val split is empty; "
                        "use a split with validation images or pass --val_every 0")
    global_batch = cfg.batch_size * num_processes
    if cfg.batch_size < 1 or global_batch > len(train):
        raise TrainConfigError(
            f"batch size {cfg.batch_size} x {num_processes} process(es) = {global_batch} is larger than the "
            f"{len(train)} train latents; use --batch_size <= {len(train) // num_processes}"
        )
    for name, t in (("train latents", train.latents), ("train posterior std", train.latents_std),
                    ("stats mean", mean), ("stats std", std)):
        if not torch.isfinite(t).all():
            raise DataError(f"{ldir}: {name} contain NaN/inf values; re-run extract")
    if (std <= 0).any():
        raise DataError(f"{ldir}/stats.safetensors: std has non-positive channels; re-run extract")
    users = train.user_map
    labels = train.labels
    if labels.min() < 0 or labels.max() >= users.num_users:
        raise DataError(f"{ldir}: train labels outside 0..{users.num_users - 1}; re-run extract")
    C = mean.numel()
    m, s = mean.view(1, C, 1, 1).float(), std.view(1, C, 1, 1).float()
    return TrainData(
        train_z=((train.latents.float() - m) / s).contiguous(),
        train_std=(train.latents_std.float() / s).contiguous(),
        train_y=labels.long(),
        val_z=None if val is None else ((val.latents.float() - m) / s).contiguous(),
        val_y=None if val is None else val.labels.long(),
        mean=mean.float(), std=std.float(), user_map=users,
        tokenizer=train.tokenizer, split_hash=train.split_hash,
    )


def _ours_ema_file(path: Path) -> Path | None:
    """Our EMA file for a run folder or file, or None when `path` is not one of our runs."""
    cand = path / EMA_NAME if path.is_dir() else path
    if cand.suffix == ".safetensors" and cand.is_file():
        try:
            meta = io.load_safetensors_metadata(cand)
        except Exception:  # noqa: BLE001 - unreadable: let the official loader report it
            return None
        if "model_config" in meta:
            return cand
    return None


def build_initial_model(cfg: TrainConfig, data: TrainData):
    """(model, info): a fresh preset, or weights from --init_from after checking they fit the data."""
    from mdgen_helpers import dit

    num_users = data.user_map.num_users
    if not cfg.init_from:
        overrides = {"class_dropout_prob": cfg.label_dropout, **cfg.model_overrides}
        # nn.init draws from the global RNG: seed it inside fork_rng so the caller's state is untouched
        # and the same seed gives the same initial weights (needed for resume/DDP equivalence).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = dit.build_model(cfg.preset, num_users, **overrides)
        return model, {"init": f"fresh {cfg.preset}"}
    path = Path(cfg.init_from)
    if not path.exists():
        raise CheckpointError(f"--init_from {path} does not exist")
    ours = _ours_ema_file(path)
    if ours is not None:
        from safetensors.torch import load_file

        meta = io.load_safetensors_metadata(ours)
        if meta.get("tokenizer") != data.tokenizer:
            raise ArtifactMismatchError(
                f"--init_from {ours} was trained on latents of tokenizer {meta.get('tokenizer')!r}, but "
                f"{cfg.latent_dir} holds latents of {data.tokenizer!r}; extract latents with the same tokenizer"
            )
        theirs = UserMap.from_json(meta["user_map"]) if "user_map" in meta else None
        if theirs is None or theirs.num_users != num_users:
            raise ArtifactMismatchError(
                f"--init_from {ours} has {theirs.num_users if theirs else '?'} users, the latents {num_users}; "
                "fine-tune from a run on the same users, or from official weights (their label table is re-initialised)"
            )
        mcfg = dict(meta["model_config"])
        model = dit.LightningDiT.from_config(mcfg)
        dit.load_weights(model, load_file(str(ours)), strict=True, source=str(ours))
        return model, {"init": f"our run {ours} (step {meta.get('step')})"}
    sd, info = dit.load_official_weights(path, num_users, use_ema=True, seed=cfg.seed)
    arch = {**info["arch"], "num_classes": num_users, "class_dropout_prob": cfg.label_dropout}
    if int(arch.get("in_channels", data.mean.numel())) != data.mean.numel():
        raise ArtifactMismatchError(
            f"--init_from {path} expects {arch['in_channels']}-channel latents, the latents have {data.mean.numel()}"
        )
    arch["input_size"] = int(data.train_z.shape[-1])
    model = dit.LightningDiT(**arch)
    dit.load_weights(model, sd, strict=True, source=str(path))
    return model, {"init": f"official weights {path}", **{k: v for k, v in info.items() if k != "arch"}}


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints (a `complete.json` inside) of a run, oldest first, by step number.

    Temp folders (`.tmp_step_*`) and folders without the marker are what a killed save leaves;
    they are ignored here and removed by the next save."""
    root = Path(output_dir) / CKPT_DIR
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = CKPT_RE.match(p.name)
            if m and p.is_dir() and (p / COMPLETE).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def _resume_folder(cfg: TrainConfig) -> Path | None:
    if not cfg.resume:
        if list_checkpoints(cfg.output_dir):
            raise TrainConfigError(
                f"{cfg.output_dir} already holds checkpoints; pass --resume to continue that run, "
                "or choose a new --output_dir"
            )
        return None
    if isinstance(cfg.resume, str) and cfg.resume.lower() not in ("true", "latest", "auto"):
        p = Path(cfg.resume)
        if not (p / COMPLETE).is_file():
            raise CheckpointError(f"--resume {p} is not a complete checkpoint folder (no {COMPLETE})")
        return p
    return latest_checkpoint(cfg.output_dir)


def _model_ema_metadata(model_cfg, data: TrainData, cfg: TrainConfig, step: int, init: str) -> dict[str, Any]:
    """What generation needs besides the weights (docs/design.md "train"), plus provenance."""
    return {"model_config": model_cfg, **data.identity, "step": step, "train_config": cfg.to_json(),
            "init": init, "format": "mdgen-dit-ema-v1"}


# --------------------------------------------------------------------------------------------
# Per-step randomness: a pure function of (seed, step)
# --------------------------------------------------------------------------------------------


def _generator(*key: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


@dataclass
class Draws:
    """The random draws of one optimizer step for its whole global batch (every rank draws the same)."""

    idx: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    drop: torch.Tensor
    eps: torch.Tensor | None

    def part(self, slot: int, size: int) -> "Draws":
        """Micro-batch `slot` (= micro_step * processes + rank) of `size` samples."""
        s = slice(slot * size, (slot + 1) * size)
        return Draws(self.idx[s], self.noise[s], self.t[s], self.drop[s], None if self.eps is None else self.eps[s])


def step_draws(cfg: TrainConfig, step: int, n_train: int, step_batch: int, shape: tuple[int, ...]) -> Draws:
    """Batch indices (seeded epoch permutation, drop_last) and every random tensor of optimizer
    step `step`, for all `step_batch` = batch_size * processes * grad_accum samples. Slicing this
    one draw per (micro-step, rank) makes 2 processes x batch 4, 1 process x batch 4 x accum 2
    and 1 process x batch 8 see the same samples, noise, t and dropout."""
    from mdgen_helpers.flow import sample_time

    per_epoch = n_train // step_batch
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n_train, generator=_generator(cfg.seed, 1, epoch))
    idx = perm[pos * step_batch:(pos + 1) * step_batch]
    g = _generator(cfg.seed, 2, step)
    noise = torch.randn((step_batch, *shape), generator=g)
    t = sample_time(step_batch, g, cfg.time_dist)
    drop = torch.rand(step_batch, generator=g) < cfg.label_dropout
    eps = torch.randn((step_batch, *shape), generator=g) if cfg.resample_latents else None
    return Draws(idx, noise, t, drop, eps)


# --------------------------------------------------------------------------------------------
# Validation and previews
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def validation_loss(model, z: torch.Tensor, y: torch.Tensor, device, rank: int = 0, world: int = 1,
                    batch_size: int = 64, autocast=contextlib.nullcontext) -> tuple[float, list[float]]:
    """Mean flow-matching loss of `model` on val latents over the fixed t grid VAL_T_GRID with
    noise seeded per val sample (VAL_SEED, i): the same numbers for the same weights, whatever
    the batch size, rank count or run. Returns (mean, per-t means); sums are reduced by the caller."""
    from mdgen_helpers.flow import flow_matching_loss

    K = len(VAL_T_GRID)
    sums = torch.zeros(K + 1, dtype=torch.float64)
    mine = list(range(rank, z.shape[0], world))
    was_training = model.training
    model.eval()
    per = max(1, batch_size // K)
    for s in range(0, len(mine), per):
        ids = mine[s:s + per]
        noise = torch.stack([torch.randn((K, *z.shape[1:]), generator=_generator(VAL_SEED, i)) for i in ids])
        x1 = z[ids].unsqueeze(1).expand(-1, K, *z.shape[1:]).reshape(-1, *z.shape[1:])
        t = torch.tensor(VAL_T_GRID).repeat(len(ids))
        yy = y[ids].repeat_interleave(K)
        with autocast():
            loss = flow_matching_loss(model, x1.to(device), yy.to(device), noise=noise.reshape(x1.shape).to(device),
                                      t=t.to(device))
        sums[:K] += loss.double().cpu().view(len(ids), K).sum(0)
        sums[K] += len(ids)
    model.train(was_training)
    return sums


def _grid_png(images_by_user: dict[int, list], title: str, path: Path) -> None:
    """Preview grid through viz.user_grid (matplotlib)."""
    from mdgen_helpers import viz

    viz.save_figure(viz.user_grid(images_by_user, title=title), path)


@torch.no_grad()
def write_preview(ema_model, tokenizer, data: TrainData, cfg: TrainConfig, step: int, out: Path, device) -> Path:
    """Per-user grid from the EMA model: short Euler ODE with guidance, fixed seeds, decoded to PNG."""
    from mdgen_helpers.dit import null_label
    from mdgen_helpers.flow import guided_velocity, sample_ode

    users = list(range(min(cfg.preview_users, data.user_map.num_users)))
    labels = torch.tensor([u for u in users for _ in range(cfg.preview_per_user)], device=device)
    shape = tuple(data.train_z.shape[1:])
    x0 = torch.randn((len(labels), *shape), generator=_generator(PREVIEW_SEED, cfg.seed)).to(device)
    model = ema_model.eval()
    scale = cfg.preview_guidance if model.config["class_dropout_prob"] > 0 else 1.0
    vf = guided_velocity(model, labels, scale, null_label(model.num_classes) if scale != 1.0 else None)
    z, _ = sample_ode(vf, x0, cfg.preview_steps, method="euler")
    z = z.float().cpu() * data.std.view(1, -1, 1, 1) + data.mean.view(1, -1, 1, 1)
    images = tokenizer.decode(z.to(tokenizer.device) if hasattr(tokenizer, "device") else z).float().cpu()
    by_user: dict[int, list] = {}
    for img, lab in zip(images, labels.tolist()):
        by_user.setdefault(data.user_map.user_of_label(lab), []).append(img)
    path = out / "previews" / f"step_{step:07d}.png"
    _grid_png(by_user, f"step {step} (EMA, Euler {cfg.preview_steps} steps, guidance {scale:g})", path)
    return path


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def ema_decay_at(decay: float, num_updates: int, warmup: bool = True) -> float:
    """EMA decay after `num_updates` updates: with warm-up, min(decay, (1+n)/(10+n)).

    Without warm-up a 0.999 EMA still holds 74% of the random initial weights after 300 steps,
    so a short run (a CPU demo, a few-shot regime) would sample from a mostly untrained model.
    The warm-up ramps the decay (0.1 at the first update, 0.9 at 80, 0.99 at 890) and is capped
    at `decay`, so long runs are unchanged after the first few thousand steps.
    """
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates)) if warmup else decay


def ema_update_fn(decay: float, warmup: bool = True):
    """`multi_avg_fn` for torch's AveragedModel: ema <- d * ema + (1 - d) * param, d from `ema_decay_at`."""

    @torch.no_grad()
    def update(ema_params, params, num_averaged):
        d = ema_decay_at(decay, int(num_averaged), warmup)
        for e, p in zip(ema_params, params):
            e.lerp_(p, 1.0 - d)

    return update


def _memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _steps_limit(cfg: TrainConfig, n_train: int, global_batch: int) -> int:
    per_epoch = n_train // global_batch // cfg.grad_accum
    if per_epoch < 1:
        raise TrainConfigError(
            f"{n_train} train latents make no full optimizer step with a global batch of {global_batch} "
            f"and --grad_accum {cfg.grad_accum}; lower one of them"
        )
    limits = [cfg.max_steps] if cfg.max_steps else []
    if cfg.max_epochs:
        limits.append(cfg.max_epochs * per_epoch)
    if not limits:
        raise TrainConfigError("set --max_steps or --max_epochs")
    return min(limits)


def _check_config(cfg: TrainConfig) -> None:
    if not cfg.latent_dir or not cfg.output_dir:
        raise TrainConfigError("latent_dir and output_dir are required")
    if cfg.grad_accum < 1 or cfg.keep_last < 1:
        raise TrainConfigError("--grad_accum and --keep_last must be >= 1")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise TrainConfigError(f"--ema_decay must be in [0, 1), got {cfg.ema_decay}")
    if not 0.0 <= cfg.label_dropout < 1.0:
        raise TrainConfigError(f"--label_dropout must be in [0, 1), got {cfg.label_dropout}")
    if cfg.time_dist not in ("uniform", "logit_normal"):
        raise TrainConfigError(f"--time_dist must be 'uniform' or 'logit_normal', got {cfg.time_dist!r}")
    if cfg.preview_every and not cfg.tokenizer:
        raise TrainConfigError("--preview_every needs --tokenizer (the file that made the latents) to decode previews")
    if cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise TrainConfigError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None


def train(cfg: TrainConfig, *, loss_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Train and return a summary dict (also written to RUN/result.json).

    Call it from every process (the CLI under `accelerate launch`, notebook_launcher) or from one.
    `loss_hook(step, per_sample_loss) -> per_sample_loss` is a diagnostic hook (tests inject a
    non-finite loss with it to prove the skip path)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from torch.optim.swa_utils import AveragedModel
    from tqdm.auto import tqdm

    from mdgen_helpers.dit import model_config
    from mdgen_helpers.flow import flow_matching_loss

    t_session = time.time()
    _check_config(cfg)
    out = Path(cfg.output_dir)
    cpu = cfg.cpu or not torch.cuda.is_available()
    device_type = "cpu" if cpu else "cuda"
    cap = None if cpu else torch.cuda.get_device_capability()
    mixed = resolve_precision(cfg.precision, device_type, cap)

    # ---- pre-flight: inputs, model, resume point; nothing written yet ----
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data = load_train_data(cfg, world)
    model, init_info = build_initial_model(cfg, data)
    resume_from = _resume_folder(cfg)
    if cfg.resume and resume_from is None and os.environ.get("RANK", "0") == "0":
        print(f"note: --resume found no complete checkpoint in {out / CKPT_DIR}; starting from step 0", flush=True)
    state: dict[str, Any] = {"step": 0, "skipped_steps": 0, "best_val": None, "bad_vals": 0}
    if resume_from is not None:
        state = _check_resume(resume_from, model_config(model), data, cfg, world)
    state["init"] = init_info["init"]
    tokenizer = None
    if cfg.preview_every:
        from mdgen_helpers.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)
        if tokenizer.identity != data.tokenizer:
            raise ArtifactMismatchError(
                f"--tokenizer {cfg.tokenizer} is {tokenizer.identity!r} but the latents were made by "
                f"{data.tokenizer!r}; pass the tokenizer used by extract"
            )

    accelerator = Accelerator(
        mixed_precision=mixed, cpu=cpu, step_scheduler_with_optimizer=False,
        log_with="tensorboard" if cfg.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard")),
    )
    P, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    device = accelerator.device
    if P != world:  # launched some other way: recheck the batch against the real process count
        data = load_train_data(cfg, P)
    global_batch = cfg.batch_size * P
    n_train = data.train_z.shape[0]
    max_steps = _steps_limit(cfg, n_train, global_batch)
    mcfg = model_config(model)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    warm = max(0, int(cfg.warmup_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # EMA in float32 on the training device; updated only by applied steps.
    ema = AveragedModel(accelerator.unwrap_model(model), multi_avg_fn=ema_update_fn(cfg.ema_decay, cfg.ema_warmup),
                        use_buffers=True)
    ema.requires_grad_(False)
    accelerator.register_for_checkpointing(ema)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(out / "metrics.jsonl", state["step"])
        io.atomic_write_json(out / "config.json", _model_ema_metadata(mcfg, data, cfg, state["step"], state["init"]))
    if cfg.tensorboard:
        accelerator.init_trackers("mdgen", config={k: v for k, v in cfg.to_json().items()
                                                   if isinstance(v, (int, float, str, bool))})
    accelerator.wait_for_everyone()

    step = int(state["step"])
    skipped = int(state["skipped_steps"])
    shape = tuple(data.train_z.shape[1:])
    metrics_path = out / "metrics.jsonl"
    ckpt_paths: list[str] = []
    stop_reason = "max_steps"
    step_time, save_time = None, None
    window = {"loss": 0.0, "n": 0, "t0": time.time(), "samples": 0, "grad_norm": float("nan")}
    last_val = None
    losses: list[float] = []
    bar = tqdm(total=max_steps, initial=step, disable=not (main and cfg.progress), desc="train", dynamic_ncols=True)

    def print_main(*a):  # is_main_process, not accelerate's local-main print
        if main:
            print(*a, flush=True)

    print_main(f"train: {n_train} latents, {data.user_map.num_users} users, {P} process(es) on {device_type}, "
               f"precision {mixed}, global batch {global_batch} x accum {cfg.grad_accum}, {max_steps} steps; "
               f"{init_info['init']}" + (f"; resumed from {resume_from}" if resume_from else ""))

    def save() -> None:
        nonlocal save_time
        t0 = time.time()
        path = _save_checkpoint(accelerator, ema, out, step, skipped, state, mcfg, data, cfg)
        save_time = time.time() - t0
        if path is not None:
            ckpt_paths.append(str(path))

    while step < max_steps:
        t_step = time.time()
        model.train()
        ok_local = True
        loss_sum = 0.0
        draws = step_draws(cfg, step, n_train, global_batch * cfg.grad_accum, shape)
        for k in range(cfg.grad_accum):
            d = draws.part(k * P + rank, cfg.batch_size)
            x1 = data.train_z[d.idx]
            if d.eps is not None:
                x1 = x1 + data.train_std[d.idx] * d.eps
            x1, y = x1.to(device), data.train_y[d.idx].to(device)
            drop = d.drop.long().to(device)
            sync = k == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                per_sample = flow_matching_loss(
                    lambda x, t, yy: model(x, t, yy, force_drop_ids=drop), x1, y,
                    cosine_weight=cfg.cosine_weight, noise=d.noise.to(device), t=d.t.to(device))
                if loss_hook is not None:
                    per_sample = loss_hook(step, per_sample)
                loss = per_sample.mean()
                ok_local &= bool(torch.isfinite(loss.detach()))
                loss_sum += float(loss.detach()) / cfg.grad_accum
                accelerator.backward(loss / cfg.grad_accum)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.clip_norm if cfg.clip_norm > 0 else math.inf)
        grad_norm = float(grad_norm)
        # Skip decision shared by all ranks: any non-finite loss or gradient anywhere -> nobody steps.
        # The same reduce gives the global mean loss (what a 1-process run with this batch reports).
        bad, loss_sum = accelerator.reduce(
            torch.tensor([0.0 if ok_local and math.isfinite(grad_norm) else 1.0, loss_sum], device=device,
                         dtype=torch.float64), reduction="sum").tolist()
        loss_sum /= P
        if bad == 0:
            optimizer.step()
            if accelerator.optimizer_step_was_skipped:
                skipped += 1
            else:
                scheduler.step()
                ema.update_parameters(accelerator.unwrap_model(model))
        else:
            skipped += 1
            if accelerator.scaler is not None:  # after unscale_ (in clip_grad_norm_): lower the scale
                accelerator.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        losses.append(loss_sum)
        if math.isfinite(loss_sum):
            window["loss"] += loss_sum
            window["n"] += 1
        window["samples"] += global_batch * cfg.grad_accum
        window["grad_norm"] = grad_norm
        dt = time.time() - t_step
        step_time = dt if step_time is None else 0.9 * step_time + 0.1 * dt

        if cfg.log_every and step % cfg.log_every == 0:
            elapsed = max(time.time() - window["t0"], 1e-9)
            rec = {"step": step, "loss": window["loss"] / window["n"] if window["n"] else float("nan"),
                   "grad_norm": window["grad_norm"], "skipped_steps": skipped,
                   "samples_per_s": window["samples"] / elapsed, "lr": scheduler.get_last_lr()[0],
                   "memory_mb": _memory_mb(device)}
            _log(accelerator, metrics_path, rec, cfg.tensorboard)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", skipped=skipped)
            window = {"loss": 0.0, "n": 0, "t0": time.time(), "samples": 0, "grad_norm": float("nan")}

        if cfg.val_every and data.val_z is not None and (step % cfg.val_every == 0 or step == max_steps):
            rec = {"step": step}
            for name, net in (("val_loss", accelerator.unwrap_model(model)), ("val_loss_ema", ema.module)):
                sums = validation_loss(net, data.val_z, data.val_y, device, rank, P, autocast=accelerator.autocast)
                sums = accelerator.reduce(sums.to(device), "sum").cpu()
                per_t = (sums[:-1] / sums[-1]).tolist()
                rec[name] = float(sum(per_t) / len(per_t))
                if name == "val_loss":
                    rec["val_loss_by_t"] = {f"{t:.4f}": v for t, v in zip(VAL_T_GRID, per_t)}
            last_val = rec["val_loss_ema"]
            _log(accelerator, metrics_path, rec, cfg.tensorboard)
            # Early stopping on the EMA val loss: identical on every rank (reduced sums), so all stop together.
            if state["best_val"] is None or last_val < state["best_val"]:
                state["best_val"], state["bad_vals"] = last_val, 0
            else:
                state["bad_vals"] += 1
            if cfg.early_stop_patience and state["bad_vals"] >= cfg.early_stop_patience and step < max_steps:
                stop_reason = "early_stop"

        if cfg.preview_every and step % cfg.preview_every == 0:
            if main:
                p = write_preview(ema.module, tokenizer.to(device), data, cfg, step, out, device)
                print_main(f"preview: {p}")
            accelerator.wait_for_everyone()

        # Time budget: stop when the next step plus a save would not fit (the save time is measured at
        # the first checkpoint, assumed 10 s before). Any rank's clock can call it; the sum makes all agree.
        if cfg.time_budget is not None:
            est_save = save_time if save_time is not None else 10.0
            late = step < max_steps and time.time() - t_session + step_time + est_save > cfg.time_budget * 3600
            if float(accelerator.reduce(torch.tensor([float(late)], device=device), "sum")) > 0:
                stop_reason = "time_budget"

        if stop_reason != "max_steps" or step == max_steps or (cfg.ckpt_every and step % cfg.ckpt_every == 0):
            save()
        if stop_reason != "max_steps":
            print_main(f"stopping at step {step}: {stop_reason}; continue with --resume")
            break
    bar.close()
    if step >= max_steps and (not ckpt_paths or not ckpt_paths[-1].endswith(f"step_{step:07d}")):
        save()  # resumed at max_steps or nothing to do: still leave an up-to-date export
    accelerator.wait_for_everyone()
    if cfg.tensorboard:
        accelerator.end_training()
    result = {
        "step": step, "max_steps": max_steps, "stopped": stop_reason, "skipped_steps": skipped,
        "final_loss": losses[-1] if losses else None, "losses": losses, "val_loss_ema": last_val,
        "checkpoint": str(latest_checkpoint(out)), "ema": str(out / EMA_NAME), "precision": mixed,
        "num_processes": P, "global_batch": global_batch, "resumed_from": str(resume_from) if resume_from else None,
        "seconds": time.time() - t_session,
    }
    if main:
        io.atomic_write_json(out / "result.json", {k: v for k, v in result.items() if k != "losses"})
    return result


def _log(accelerator, path: Path, rec: dict, tensorboard: bool) -> None:
    if accelerator.is_main_process:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    if tensorboard:
        accelerator.log({k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"}, step=rec["step"])


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint (the killed session logged steps it lost)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    io.atomic_write_text(path, "".join(x + "\n" for x in keep))


def _save_checkpoint(accelerator, ema, out: Path, step: int, skipped: int, state: dict, mcfg: dict,
                     data: TrainData, cfg: TrainConfig) -> Path | None:
    """Full state into checkpoints/step_XXXXXXX (temp folder, complete.json last, rename), the
    sampling export ema.safetensors + config.json, then keep-last-K pruning."""
    root = out / CKPT_DIR
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    main = accelerator.is_main_process
    if (final / COMPLETE).is_file():
        return final
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if main:
        meta = _model_ema_metadata(mcfg, data, cfg, step, state.get("init", ""))
        marker = {**meta, "skipped_steps": skipped, "best_val": state.get("best_val"),
                  "bad_vals": state.get("bad_vals", 0), "num_processes": accelerator.num_processes,
                  "global_batch": cfg.batch_size * accelerator.num_processes * cfg.grad_accum,
                  "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        io.atomic_write_json(tmp / COMPLETE, marker)
        if final.exists():  # an incomplete folder of the same step from a killed save
            shutil.rmtree(final)
        os.replace(tmp, final)
        io.atomic_save_safetensors(ema.module.state_dict(), out / EMA_NAME, metadata=meta)
        io.atomic_write_json(out / "config.json", meta)
        for _, old in list_checkpoints(out)[:-cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for p in root.iterdir():  # leftovers of killed saves
            if p.name.startswith(".tmp_step_") and p != tmp:
                shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _check_resume(folder: Path, mcfg: dict, data: TrainData, cfg: TrainConfig, world: int) -> dict:
    """Read complete.json and refuse to resume into a different model, tokenizer, split or users."""
    marker = io.read_json(folder / COMPLETE)
    for key in ("tokenizer", "split_hash", "user_map"):
        if marker.get(key) != data.identity[key]:
            raise ArtifactMismatchError(
                f"cannot resume from {folder}: its {key} differs from the latents in {cfg.latent_dir}; "
                "resume with the same latents or start a new --output_dir"
            )
    if marker.get("model_config") != mcfg:
        raise CheckpointError(
            f"cannot resume from {folder}: it holds a different model ({marker.get('model_config')}) than "
            f"--preset {cfg.preset} builds ({mcfg}); use the same preset/overrides"
        )
    gb = cfg.batch_size * world * cfg.grad_accum
    if marker.get("global_batch") not in (None, gb):
        print(f"note: resuming with global batch {gb} instead of {marker['global_batch']}: training continues, "
              "but the data order no longer repeats the original run exactly", file=sys.stderr)
    return {"step": int(marker["step"]), "skipped_steps": int(marker.get("skipped_steps", 0)),
            "best_val": marker.get("best_val"), "bad_vals": int(marker.get("bad_vals", 0))}


# --------------------------------------------------------------------------------------------
# Launching: in-process, notebook_launcher, or an `accelerate launch` subprocess
# --------------------------------------------------------------------------------------------


def _accelerate_launch_cmd(config_path: Path, num_processes: int, cpu: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
           "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no"]
    cmd += ["--multi_gpu"] if not cpu else ["--cpu"]
    return cmd + ["-m", "mdgen_helpers", "train", "--config", str(config_path)]


def _child_env() -> dict[str, str]:
    """This environment, with the folder holding mdgen_helpers on PYTHONPATH: notebooks often
    import the helpers through sys.path (a Kaggle dataset) rather than pip."""
    pkg_parent = str(Path(__file__).resolve().parents[1])
    old = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": pkg_parent + (os.pathsep + old if old else "")}


def _run_streaming(cmd: list[str]) -> int:
    """Run a command, echoing its output line by line (visible in a notebook cell)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=_child_env())
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
    return proc.wait()


def _read_result(out: Path) -> dict:
    p = out / "result.json"
    if not p.is_file():
        raise MdgenError(f"training ended without writing {p}; see the output above for the error")
    return io.read_json(p)


def launch_training(cfg: TrainConfig, num_processes: int | None = None) -> dict:
    """Train from a notebook on `num_processes` GPUs (default: cfg.devices), choosing how:

    - 1 process, or no CUDA: `train(cfg)` in this kernel;
    - several GPUs, accelerate >= 1.14 with torch >= 2.9 (or older torch) and CUDA not yet
      initialised here: `accelerate.notebook_launcher` (forks this kernel);
    - otherwise: `accelerate launch -m mdgen_helpers train --config RUN/train_config.json` in a
      subprocess whose output is streamed here.
    The chosen path and why are printed; the summary is read back from RUN/result.json."""
    from mdgen_helpers.env import notebook_launcher_status

    n = int(num_processes or cfg.devices or 1)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() and not cfg.cpu else 0
    if n <= 1 or gpus == 0:
        print("launch_training: one process in this kernel" + ("" if n <= 1 else " (no CUDA GPU; --devices ignored)"))
        return train(dataclasses.replace(cfg, devices=1))
    if n > gpus:
        raise TrainConfigError(f"{n} processes requested but only {gpus} GPU(s) are visible")
    how, why = notebook_launcher_status(n)
    from accelerate.state import AcceleratorState

    if how == "notebook_launcher" and AcceleratorState._shared_state:
        how, why = "subprocess", ("an Accelerator already exists in this kernel, which notebook_launcher refuses: "
                                  "using `accelerate launch` in a subprocess")
    print(f"launch_training: {how} - {why}")
    cfg = dataclasses.replace(cfg, devices=n)
    if how == "notebook_launcher":
        from accelerate import notebook_launcher

        try:
            notebook_launcher(train, (cfg,), num_processes=n)
            return _read_result(Path(cfg.output_dir))
        except (RuntimeError, ValueError) as e:
            if "initialized" not in str(e).lower() and "initialised" not in str(e).lower():
                raise
            print(f"launch_training: notebook_launcher refused ({str(e)[:200]}); falling back to a subprocess")
    out = Path(cfg.output_dir)
    config_path = io.atomic_write_json(out / "train_config.json", cfg.to_json())
    rc = _run_streaming(_accelerate_launch_cmd(config_path, n))
    if rc != 0:
        raise MdgenError(f"`accelerate launch` training exited with code {rc}; see the output above")
    return _read_result(out)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _under_launcher() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    a = parser.add_argument
    a("--config", default=None, help="JSON file of TrainConfig fields (flags given on the command line override it)")
    a("--latent_dir", default=None, help="extraction output (train/val .safetensors + stats.safetensors)")
    a("--output_dir", default=None, help="run directory (checkpoints, ema.safetensors, metrics.jsonl)")
    a("--preset", default=None, help=f"model size (dit.PRESETS, e.g. tiny, S/2, B/2, XL/1; default {d.preset})")
    a("--model_overrides", default=None, help='JSON dict of LightningDiT arguments, e.g. \'{"depth": 2}\'')
    a("--batch_size", type=int, default=None, help=f"per process (default {d.batch_size})")
    a("--max_epochs", type=int, default=None, help=f"default {d.max_epochs}")
    a("--max_steps", type=int, default=None, help="optimizer steps (the smaller limit wins)")
    a("--lr", type=float, default=None, help=f"default {d.lr}")
    a("--warmup_steps", type=int, default=None, help=f"linear LR warm-up (default {d.warmup_steps})")
    a("--weight_decay", type=float, default=None, help=f"AdamW (default {d.weight_decay})")
    a("--betas", type=float, nargs=2, default=None, help=f"AdamW betas (default {d.betas[0]} {d.betas[1]})")
    a("--grad_accum", type=int, default=None, help="gradient accumulation micro-steps (default 1)")
    a("--clip_norm", type=float, default=None, help=f"gradient clipping, 0 = off (default {d.clip_norm})")
    a("--ema_decay", type=float, default=None, help=f"default {d.ema_decay} (0.9999 for ImageNet-size data)")
    a("--no_ema_warmup", dest="ema_warmup", action="store_false", default=None,
      help="use the full EMA decay from the first step (default: warm-up, see train.ema_decay_at)")
    a("--label_dropout", type=float, default=None, help=f"label dropout for guidance (default {d.label_dropout})")
    a("--time_dist", choices=["uniform", "logit_normal"], default=None, help="training t distribution")
    a("--cosine_weight", type=float, default=None, help="weight of the velocity-direction loss (LightningDiT: 1.0)")
    a("--resample_latents", action="store_true", default=None, help="z = mean + std * eps from the stored posterior")
    a("--precision", default=None, help="auto|no|32|fp16|16-mixed|bf16|bf16-mixed (auto: bf16 on cc>=8.0, fp16 on T4, fp32 on CPU)")
    a("--devices", type=int, default=None, help="processes/GPUs; > 1 re-launches through `accelerate launch`")
    a("--cpu", action="store_true", default=None, help="train on the CPU even when a GPU is present")
    a("--seed", type=int, default=None)
    a("--log_every", type=int, default=None)
    a("--val_every", type=int, default=None, help="validation loss every N steps (0 = off)")
    a("--ckpt_every", type=int, default=None, help="checkpoint every N steps (0 = only at the end)")
    a("--preview_every", type=int, default=None, help="preview grid every N steps (needs --tokenizer)")
    a("--keep_last", type=int, default=None, help=f"checkpoints kept (default {d.keep_last})")
    a("--early_stop_patience", type=int, default=None, help="stop after N validations without improvement (0 = off)")
    a("--resume", nargs="?", const=True, default=None,
      help="continue from the newest complete checkpoint in --output_dir (or from the given folder)")
    a("--init_from", default=None, help="official LightningDiT checkpoint or one of our runs to start from")
    a("--time_budget", type=float, default=None, help="hours this session may run (e.g. 11.5 on Kaggle)")
    a("--tokenizer", default=None, help="tokenizer file (for decoding previews)")
    a("--tensorboard", action="store_true", default=None, help="log to RUN/tensorboard")
    a("--no_progress", action="store_true", default=None, help="no tqdm bar")


def config_from_args(args) -> TrainConfig:
    base = TrainConfig.from_json(io.read_json(args.config)).to_json() if args.config else TrainConfig().to_json()
    for name in base:
        v = getattr(args, name, None)
        if v is not None:
            base[name] = v
    if isinstance(base.get("model_overrides"), str):
        base["model_overrides"] = json.loads(base["model_overrides"])
    if args.no_progress:
        base["progress"] = False
    return TrainConfig.from_json(base)


def cli_main(args) -> int:
    cfg = config_from_args(args)
    if cfg.devices > 1 and not _under_launcher():
        cuda = torch.cuda.is_available() and not cfg.cpu
        if not cuda:
            raise TrainConfigError(
                f"--devices {cfg.devices} needs {cfg.devices} CUDA GPUs; none is visible. Use --devices 1 on the CPU."
            )
        out = Path(cfg.output_dir or ".")
        config_path = io.atomic_write_json(out / "train_config.json", cfg.to_json())
        cmd = _accelerate_launch_cmd(config_path, cfg.devices)
        print("re-launching: " + " ".join(cmd), flush=True)
        return subprocess.call(cmd, env=_child_env())
    result = train(cfg)
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=2))
    return 0
