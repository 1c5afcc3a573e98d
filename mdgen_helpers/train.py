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
- how it is launched (notebook_launcher, `accelerate launch`, this process) is `launch.py`'s concern,
  the run-folder format `checkpoints.py`'s.

Run layout (docs/design.md "train"): `config.json`, `ema.safetensors`, `metrics.jsonl`,
`result.json`, `checkpoints/step_0000100/` (Accelerate `save_state` + `complete.json`),
`previews/step_0000100.png`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from mdgen_helpers import checkpoints, dit, generate, trust, viz
from mdgen_helpers.env import mixed_precision_for
from mdgen_helpers.errors import ArtifactMismatchError, CheckpointError, DataError
from mdgen_helpers.files import atomic_save_safetensors, atomic_write_json, atomic_write_text, json_safe, load_safetensors_metadata
from mdgen_helpers.flow import flow_matching_loss, sample_time
from mdgen_helpers.latents import LatentStats, load_latents, load_stats
from mdgen_helpers.settings import SamplingSettings, TrainConfig, TrainConfigError
from mdgen_helpers.tokenizers import load_tokenizer
from mdgen_helpers.users import UserMap

# Settings a resumed run must share with its checkpoint: changing them mid-run would make the
# record (config.json) describe a run that never happened. Limits, logging and devices may change.
RESUME_FIXED = ("lr", "warmup_steps", "weight_decay", "betas", "clip_norm", "ema_decay", "ema_warmup",
                "label_dropout", "time_dist", "cosine_weight", "resample_latents", "seed", "grad_accum")
# Validation: a fixed grid of t and fixed noise seeds, so val_loss is comparable across steps and runs.
VAL_T_GRID = tuple((k + 0.5) / 8 for k in range(8))
VAL_SEED = 1_000_003
PRECISIONS = {
    "auto": "auto", "no": "no", "32": "no", "fp32": "no", "32-true": "no",
    "fp16": "fp16", "16": "fp16", "16-mixed": "fp16", "bf16": "bf16", "bf16-mixed": "bf16",
}


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
    stats: LatentStats
    user_map: UserMap
    tokenizer: str
    split_hash: str

    @property
    def identity(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer, "split_hash": self.split_hash, "user_map": self.user_map.to_json(),
                **self.stats.to_json()}


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
    stats, _ = load_stats(ldir, tokenizer=train.tokenizer, split_hash=train.split_hash)
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
    checks = [("train latents", train.latents), ("train posterior std", train.latents_std),
              ("stats mean", stats.mean), ("stats std", stats.std)]
    if val is not None:
        checks.append(("val latents", val.latents))
    for name, t in checks:
        if not torch.isfinite(t).all():
            raise DataError(f"{ldir}: {name} contain NaN/inf values; re-run extract")
    if (stats.std <= 0).any():
        raise DataError(f"{ldir}/stats.safetensors: std has non-positive channels; re-run extract")
    users = train.user_map
    labels = train.labels
    if labels.min() < 0 or labels.max() >= users.num_users:
        raise DataError(f"{ldir}: train labels outside 0..{users.num_users - 1}; re-run extract")
    return TrainData(
        train_z=stats.normalize(train.latents).contiguous(),
        train_std=stats.normalize_std(train.latents_std).contiguous(),
        train_y=labels.long(),
        val_z=None if val is None else stats.normalize(val.latents).contiguous(),
        val_y=None if val is None else val.labels.long(),
        stats=stats, user_map=users,
        tokenizer=train.tokenizer, split_hash=train.split_hash,
    )


def build_initial_model(cfg: TrainConfig, data: TrainData):
    """(model, info): a fresh preset, or weights from --init_from after checking they fit the data."""
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
    ours = checkpoints.is_ema_file(path)
    if ours is not None:
        meta = load_safetensors_metadata(ours)
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
    if int(arch.get("in_channels", data.stats.channels)) != data.stats.channels:
        raise ArtifactMismatchError(
            f"--init_from {path} expects {arch['in_channels']}-channel latents, the latents have {data.stats.channels}"
        )
    arch["input_size"] = int(data.train_z.shape[-1])
    model = dit.LightningDiT(**arch)
    dit.load_weights(model, sd, strict=True, source=str(path))
    return model, {"init": f"official weights {path}", **{k: v for k, v in info.items() if k != "arch"}}


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


def micro_batch(data: TrainData, d: Draws, device) -> tuple[torch.Tensor, ...]:
    """(x1, y, noise, t, drop) of one micro-batch on `device`: the arguments of `step_loss`."""
    x1 = data.train_z[d.idx]
    if d.eps is not None:
        x1 = x1 + data.train_std[d.idx] * d.eps
    return (x1.to(device), data.train_y[d.idx].to(device), d.noise.to(device), d.t.to(device),
            d.drop.long().to(device))


# --------------------------------------------------------------------------------------------
# The training objective, eager or compiled
# --------------------------------------------------------------------------------------------


def step_loss(model, x1, y, noise, t, drop, cosine_weight: float) -> torch.Tensor:
    """Per-sample flow-matching loss (B,) of one micro-batch, label dropout given as `drop`
    (force_drop_ids) from the step's draws: the part of a step that `TrainConfig.compile` compiles."""
    return flow_matching_loss(lambda x, tt, yy: model(x, tt, yy, force_drop_ids=drop), x1, y,
                              cosine_weight=cosine_weight, noise=noise, t=t)


def compiled_step_loss(model, example: tuple, cosine_weight: float) -> tuple[Callable, str]:
    """(`torch.compile(step_loss)`, a one-line note), or (`step_loss`, why not) when it fails.

    Compilation is lazy and the backward graph is compiled at the first backward, so one forward +
    backward on `example` (a micro-batch, `micro_batch(...)`) runs here, inside the try, and its
    gradients are cleared. Any failure (no C++ compiler, an unsupported platform or GPU) means eager:
    the same numbers, only slower. The model object itself is not wrapped, so checkpoints, the EMA
    copy and the state-dict keys are the same either way."""
    t0 = time.time()
    fn = torch.compile(step_loss)
    try:
        fn(model, *example, cosine_weight).mean().backward()
    except Exception as e:  # noqa: BLE001 - any compiler failure means "train eager"
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return step_loss, f"torch.compile failed ({type(e).__name__}: {first}); training eager"
    finally:
        model.zero_grad(set_to_none=True)
    return fn, f"training step compiled (torch.compile) in {time.time() - t0:.0f} s"


# --------------------------------------------------------------------------------------------
# Validation and previews
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def validation_loss(model, z: torch.Tensor, y: torch.Tensor, device, rank: int = 0, world: int = 1,
                    batch_size: int = 64, autocast=contextlib.nullcontext) -> tuple[float, list[float]]:
    """Mean flow-matching loss of `model` on val latents over the fixed t grid VAL_T_GRID with
    noise seeded per val sample (VAL_SEED, i): the same numbers for the same weights, whatever
    the batch size, rank count or run. Returns (mean, per-t means); sums are reduced by the caller."""
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


@torch.no_grad()
def write_preview(ema_model, tokenizer, data: TrainData, cfg: TrainConfig, step: int, out: Path) -> Path:
    """Per-user grid from the EMA model through the generation sampler (`generate.sample_latents`,
    Euler, fixed per-image seeds) and the one denormalisation, decoded to PNG."""
    model = ema_model.eval()
    sampler = generate.Generator(model=model, user_map=data.user_map, stats=data.stats,
                                 tokenizer_identity=data.tokenizer, model_config=dit.model_config(model),
                                 latent_shape=tuple(data.train_z.shape[1:]), step=step, split_hash=data.split_hash)
    user_ids = list(data.user_map.user_ids[:cfg.preview_users])
    jobs = [(u, k) for u in user_ids for k in range(1, cfg.preview_per_user + 1)]
    scale = cfg.preview_guidance if model.config["class_dropout_prob"] > 0 else 1.0
    sampling = SamplingSettings(guidance_scale=scale, num_steps=cfg.preview_steps, solver="euler", batch_size=len(jobs))
    z = generate.sample_latents(sampler, [u for u, _ in jobs], [generate.image_seed(cfg.seed, u, k) for u, k in jobs],
                                sampling)
    images = generate.decode_to_uint8(tokenizer, z, batch_size=len(jobs))
    by_user: dict[int, list] = {}
    for img, (uid, _) in zip(images, jobs):
        by_user.setdefault(uid, []).append(img)
    path = out / "previews" / f"step_{step:07d}.png"
    viz.save_figure(viz.user_grid(by_user, title=f"step {step} (EMA, Euler {cfg.preview_steps} steps, guidance {scale:g})"),
                    path)
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
    if Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        raise TrainConfigError(f"--output_dir {cfg.output_dir} is a file; give a folder for the run")
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


def progress_interval() -> float:
    """Seconds between progress-bar refreshes: live in a terminal or a notebook, but one line a minute
    when stderr is a pipe (an `accelerate launch` subprocess echoed into a notebook, a CI log), where
    every refresh becomes a new line (a 40k-step run would otherwise write tens of thousands)."""
    if sys.stderr.isatty() or "ipykernel" in sys.modules:
        return 0.5
    return 60.0


def train(cfg: TrainConfig, *, loss_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Train and return a summary dict (also written to RUN/result.json).

    Call it from every process (the CLI under `accelerate launch`, notebook_launcher) or from one.
    `loss_hook(step, per_sample_loss) -> per_sample_loss` is a diagnostic hook (tests inject a
    non-finite loss with it to prove the skip path)."""
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
    resume_from = checkpoints.resume_folder(cfg.output_dir, cfg.resume)
    if cfg.resume and resume_from is None and os.environ.get("RANK", "0") == "0":
        print(f"note: --resume found no complete checkpoint in {out / checkpoints.CKPT_DIR}; starting from step 0",
              flush=True)
    state: dict[str, Any] = {"step": 0, "skipped_steps": 0, "best_val": None, "best_step": None, "bad_vals": 0}
    if resume_from is not None:
        state = _check_resume(checkpoints.checked_resume_folder(resume_from), dit.model_config(model), data, cfg, world)
    state["init"] = init_info["init"]
    tokenizer = None
    if cfg.preview_every:
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
    mcfg = dit.model_config(model)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    warm = max(0, int(cfg.warmup_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # EMA in float32 on the training device; updated only by applied steps.
    ema = AveragedModel(accelerator.unwrap_model(model), multi_avg_fn=ema_update_fn(cfg.ema_decay, cfg.ema_warmup),
                        use_buffers=True)
    ema.requires_grad_(False)
    # Not register_for_checkpointing: Accelerate would pickle it and unpickle it with weights_only=False.
    if resume_from is not None:
        slots = [_LegacySlot() for _ in resume_from.glob("custom_checkpoint_*.pkl")]
        for slot in slots:
            accelerator.register_for_checkpointing(slot)
        accelerator.load_state(str(resume_from))
        for slot in slots:  # never saved again: new checkpoints hold the EMA as safetensors
            accelerator._custom_objects.remove(slot)
        ema.load_state_dict(checkpoints.read_ema_state(resume_from))
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(out / "metrics.jsonl", state["step"])
        if resume_from is not None:  # an export older than the checkpoint (killed after the rename) is redone
            checkpoints.export_ema(resume_from, out)
            if checkpoints.reconcile_best(out, state["best_step"]):
                print(f"note: removed {checkpoints.BEST_NAME}: it came from validations after {resume_from.name} "
                      "(a killed session); the resumed run writes a new one when its EMA val loss improves", flush=True)
        else:
            (out / checkpoints.BEST_NAME).unlink(missing_ok=True)  # a fresh run never samples an older run's best
            checkpoints.write_config(out, _ema_metadata(mcfg, data, cfg, 0, state["init"]))
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
    bar = tqdm(total=max_steps, initial=step, disable=not (main and cfg.progress), desc="train", dynamic_ncols=True,
               mininterval=progress_interval())

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

    loss_fn, compile_note = step_loss, "off"
    if cfg.compile and step < max_steps:
        model.train()
        first = step_draws(cfg, step, n_train, global_batch * cfg.grad_accum, shape).part(rank, cfg.batch_size)
        loss_fn, compile_note = compiled_step_loss(model, micro_batch(data, first, device), cfg.cosine_weight)
        print_main(compile_note)

    while step < max_steps:
        t_step = time.time()
        model.train()
        ok_local = True
        loss_sum = 0.0
        draws = step_draws(cfg, step, n_train, global_batch * cfg.grad_accum, shape)
        for k in range(cfg.grad_accum):
            batch = micro_batch(data, draws.part(k * P + rank, cfg.batch_size), device)
            sync = k == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                per_sample = loss_fn(model, *batch, cfg.cosine_weight)
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
                state["best_val"], state["best_step"], state["bad_vals"] = last_val, step, 0
                if main:  # the EMA that generalises best so far (generation samples it with weights="best")
                    with trust.disk_full_guard(out, f"the best EMA export of step {step}"):
                        checkpoints.write_best(out, ema.module.state_dict(),
                                               _ema_metadata(mcfg, data, cfg, step, state["init"]), last_val)
            else:
                state["bad_vals"] += 1
            if cfg.early_stop_patience and state["bad_vals"] >= cfg.early_stop_patience and step < max_steps:
                stop_reason = "early_stop"

        if cfg.preview_every and step % cfg.preview_every == 0:
            if main:
                p = write_preview(ema.module, tokenizer.to(device), data, cfg, step, out)
                print_main(f"preview: {p}")
            accelerator.wait_for_everyone()

        # Time budget: stop when the next step plus a save would not fit (the save time is measured at
        # the first checkpoint, assumed 10 s before). Any rank's clock can call it; the sum makes all agree.
        if cfg.time_budget is not None:
            est_save = save_time if save_time is not None else 10.0
            elapsed = time.time() - (cfg.session_start or t_session)  # Kaggle's clock runs from the session start
            late = step < max_steps and elapsed + step_time + est_save > cfg.time_budget * 3600
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
        "best_val_loss_ema": state["best_val"], "best_step": state["best_step"],
        "checkpoint": str(checkpoints.latest_checkpoint(out)), "ema": str(out / checkpoints.EMA_NAME), "precision": mixed,
        "num_processes": P, "global_batch": global_batch, "resumed_from": str(resume_from) if resume_from else None,
        "compile": compile_note,
        "seconds": time.time() - t_session,
    }
    if main:
        atomic_write_json(out / "result.json", {k: v for k, v in result.items() if k != "losses"})
    return result


def _log(accelerator, path: Path, rec: dict, tensorboard: bool) -> None:
    if accelerator.is_main_process:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(json_safe(rec), sort_keys=True, allow_nan=False) + "\n")
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
    atomic_write_text(path, "".join(x + "\n" for x in keep))


def _ema_metadata(mcfg: dict, data: TrainData, cfg: TrainConfig, step: int, init: str) -> dict[str, Any]:
    return checkpoints.ema_metadata(mcfg, data.identity, step, cfg.to_json(), init)


def _save_checkpoint(accelerator, ema, out: Path, step: int, skipped: int, state: dict, mcfg: dict,
                     data: TrainData, cfg: TrainConfig) -> Path | None:
    """One transaction: full state into checkpoints/.tmp_step_XXXXXXX (Accelerate's files plus the
    EMA as safetensors), fsynced, `complete.json` last, renamed to step_XXXXXXX; then the sampling
    export ema.safetensors + config.json, and keep-last-K pruning. A kill anywhere leaves the
    previous complete checkpoint; a missing or older export is redone from the checkpoint by the
    next save or resume (`checkpoints.export_ema`). A full disk removes the temp folder and says so."""
    final = checkpoints.step_folder(out, step)
    tmp = checkpoints.temp_folder(out, step)
    main = accelerator.is_main_process
    if checkpoints.is_complete(final):
        if main:
            checkpoints.export_ema(final, out)
        accelerator.wait_for_everyone()
        return final
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with trust.disk_full_guard(tmp.parent, f"checkpoint step {step}", remove=tmp):
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if main:
            atomic_save_safetensors(ema.state_dict(), tmp / checkpoints.EMA_STATE)
            meta = _ema_metadata(mcfg, data, cfg, step, state.get("init", ""))
            marker = {**meta, "skipped_steps": skipped, "best_val": state.get("best_val"), "best_step": state.get("best_step"),
                      "bad_vals": state.get("bad_vals", 0), "num_processes": accelerator.num_processes,
                      "global_batch": cfg.batch_size * accelerator.num_processes * cfg.grad_accum,
                      "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            checkpoints.finish_step_folder(tmp, final, marker)
    if main:
        with trust.disk_full_guard(out, f"the EMA export of step {step}"):
            checkpoints.export_ema(final, out)
        checkpoints.prune(out, cfg.keep_last, keep=tmp)
    accelerator.wait_for_everyone()
    return final


class _LegacySlot:
    """Stands in for the EMA that older checkpoints registered as Accelerate custom state 0, so
    `load_state` accepts them (it requires one registered object per custom file). The file has
    already passed the weights_only scan; its content is ignored here and read by
    `checkpoints.read_ema_state`."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, _sd) -> None:
        pass


def _check_resume(folder: Path, mcfg: dict, data: TrainData, cfg: TrainConfig, world: int) -> dict:
    """Read complete.json and refuse to resume into a different model, tokenizer, split or users."""
    marker = checkpoints.read_marker(folder)
    for key in ("tokenizer", "split_hash", "user_map"):
        if marker.get(key) != data.identity[key]:
            raise ArtifactMismatchError(
                f"cannot resume from {folder}: its {key} differs from the latents in {cfg.latent_dir}; "
                "resume with the same latents or start a new --output_dir"
            )
    old_cfg = marker.get("train_config") or {}
    new_cfg = cfg.to_json()
    changed = {k: (old_cfg[k], new_cfg[k]) for k in RESUME_FIXED if k in old_cfg and old_cfg[k] != new_cfg[k]}
    if changed:
        listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise TrainConfigError(
            f"cannot resume from {folder} with changed settings ({listed}): the run would no longer be the one "
            f"its record describes. Resume with the checkpoint's values, or start a new --output_dir")
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
            "best_val": marker.get("best_val"), "best_step": marker.get("best_step"),
            "bad_vals": int(marker.get("bad_vals", 0))}
