"""The training run folder, in one place: what `train` writes and `generate` reads.

    RUN/ema.safetensors                 EMA weights; metadata = everything sampling needs
    RUN/ema_best.safetensors            the EMA at the lowest EMA validation loss so far (same
                                        metadata + `val_loss_ema`, `export: best`); sampled
                                        with `SamplingSettings.weights = "best"`
    RUN/config.json                     the same metadata, readable
    RUN/checkpoints/step_0000100/       Accelerate `save_state` + ema_state.safetensors, fsynced,
                                        then complete.json (written last), then the rename
    RUN/checkpoints/.tmp_step_0000100/  a save in progress (or killed): never read, removed later

A checkpoint folder counts only with its `complete.json` marker, and the newest complete one is
found by step number (never by size or mtime), so a session killed mid-save leaves the previous
checkpoint usable. The EMA metadata (`ema_metadata`) is the train -> generate contract;
`read_ema` is the one reader of it.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mdgen_helpers import trust
from mdgen_helpers.errors import CheckpointError
from mdgen_helpers.files import (atomic_save_safetensors, atomic_write_json, load_safetensors_metadata, read_json,
                                 sha256_file)

CKPT_DIR = "checkpoints"
CKPT_RE = re.compile(r"^step_(\d{7,})$")
COMPLETE = "complete.json"
EMA_NAME = "ema.safetensors"
BEST_NAME = "ema_best.safetensors"
WEIGHTS = ("best", "last")
EMA_STATE = "ema_state.safetensors"  # the EMA inside a checkpoint folder (pickle-free, not an Accelerate custom state)
CONFIG_NAME = "config.json"
EMA_FORMAT = "mdgen-dit-ema-v1"
REQUIRED_METADATA = ("model_config", "user_map", "tokenizer", "latent_mean", "latent_std")


def ema_metadata(model_config: dict, identity: dict, step: int, train_config: dict, init: str) -> dict[str, Any]:
    """What generation needs besides the weights, plus provenance. `identity` holds tokenizer,
    split_hash, user_map and the latent statistics (`LatentStats.to_json`)."""
    return {"model_config": model_config, **identity, "step": step, "train_config": train_config,
            "init": init, "format": EMA_FORMAT}


def write_config(run_dir, meta: dict) -> Path:
    return atomic_write_json(Path(run_dir) / CONFIG_NAME, meta)


def write_ema(run_dir, state_dict: dict[str, torch.Tensor], meta: dict) -> Path:
    """The sampling export: RUN/ema.safetensors with `meta`, and RUN/config.json."""
    path = atomic_save_safetensors(state_dict, Path(run_dir) / EMA_NAME, metadata=meta)
    write_config(run_dir, meta)
    return path


def write_best(run_dir, state_dict: dict[str, torch.Tensor], meta: dict, val_loss: float) -> Path:
    """RUN/ema_best.safetensors: the EMA of the validation with the lowest EMA val loss. On small
    data the last EMA can be a memorised one; this is the one that generalised best to val."""
    return atomic_save_safetensors(state_dict, Path(run_dir) / BEST_NAME,
                                   metadata={**meta, "val_loss_ema": float(val_loss), "export": "best"})


def reconcile_best(run_dir, best_step: int | None) -> bool:
    """On resume: remove an ema_best.safetensors that the checkpoint's record does not name (written
    by validations after the checkpoint, in a session that was then killed), so the best file is
    never one the resumed run cannot account for. Returns whether it removed one."""
    path = Path(run_dir) / BEST_NAME
    if not path.is_file():
        return False
    try:
        step = load_safetensors_metadata(path).get("step")
    except Exception:  # noqa: BLE001 - a damaged file is removed like a stale one
        step = None
    if best_step is not None and step == best_step:
        return False
    path.unlink()
    return True


# --------------------------------------------------------------------------------------------
# Step folders (resume state)
# --------------------------------------------------------------------------------------------


def step_folder(run_dir, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:07d}"


def temp_folder(run_dir, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f".tmp_step_{step:07d}"


def is_complete(folder) -> bool:
    return (Path(folder) / COMPLETE).is_file()


def finish_step_folder(tmp: Path, final: Path, marker: dict) -> Path:
    """Mark a fully written temp folder complete (fsynced first, marker last) and rename it into place."""
    trust.fsync_tree(tmp)
    atomic_write_json(tmp / COMPLETE, marker)
    if final.exists():  # an incomplete folder of the same step from a killed save
        shutil.rmtree(final)
    os.replace(tmp, final)
    trust.fsync_dir(final.parent)
    return final


def _ema_export_of(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and metadata that RUN/ema.safetensors holds when it is checkpoint `ckpt`'s export."""
    marker = read_marker(ckpt)
    meta = {k: marker[k] for k in ("model_config", "tokenizer", "split_hash", "user_map", "latent_mean",
                                   "latent_std", "step", "train_config", "init", "format") if k in marker}
    weights = {k[len("module."):]: v for k, v in read_ema_state(ckpt).items() if k.startswith("module.")}
    return weights, {**meta, "ema_state_sha256": sha256_file(ckpt / EMA_STATE)}


def _export_is_current(ckpt: Path, export_meta: dict[str, Any]) -> bool:
    return (export_meta.get("ema_state_sha256") == sha256_file(ckpt / EMA_STATE)
            and export_meta.get("step") == read_marker(ckpt).get("step"))


def export_ema(ckpt: Path, run_dir) -> bool:
    """Write RUN/ema.safetensors + config.json from checkpoint `ckpt` unless they already hold
    exactly its EMA (same step and sha256 of its EMA state): the export is part of the checkpoint
    transaction, redone by the next save or resume after a kill. Returns whether it wrote."""
    if not (ckpt / EMA_STATE).is_file():  # a checkpoint from before EMA_STATE: its export is its own
        return False
    export = Path(run_dir) / EMA_NAME
    if export.is_file():
        try:
            have = load_safetensors_metadata(export)
        except Exception:  # noqa: BLE001 - a damaged export is simply rewritten
            have = {}
        if _export_is_current(ckpt, have):
            return False
    weights, meta = _ema_export_of(ckpt)
    write_ema(run_dir, weights, meta)
    return True


def checked_resume_folder(folder: Path) -> Path:
    """Scan every file of the checkpoint Accelerate would unpickle (and every safetensors file)
    before `load_state`; a bad one is named, with the previous complete checkpoint offered."""
    try:
        trust.scan_checkpoint_folder(folder)
        if not (folder / EMA_STATE).is_file() and not (folder / "custom_checkpoint_0.pkl").is_file():
            raise CheckpointError(f"checkpoint {folder} holds no EMA state ({EMA_STATE})")
    except CheckpointError as e:
        older = [p for _, p in list_checkpoints(folder.parent.parent) if p.name < folder.name]
        hint = (f" Resume from the previous complete checkpoint: --resume {older[-1]}" if older
                else " No earlier complete checkpoint exists: start a new --output_dir.")
        raise CheckpointError(f"cannot resume from {folder}: {e}.{hint}") from None
    return folder


def read_ema_state(folder: Path) -> dict[str, torch.Tensor]:
    """The EMA (AveragedModel state dict) of a checkpoint: ema_state.safetensors, or (checkpoints
    written before it existed) Accelerate's custom_checkpoint_0.pkl read with weights_only.
    Non-finite weights are refused."""
    path = folder / EMA_STATE
    sd = load_file(str(path)) if path.is_file() else trust.load_pickle_safely(folder / "custom_checkpoint_0.pkl")
    trust.require_finite(sd, f"EMA weights in {folder}")
    return sd


def prune(run_dir, keep_last: int, keep: Path | None = None) -> None:
    """Keep the newest `keep_last` complete checkpoints; remove the leftovers of killed saves."""
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    root = Path(run_dir) / CKPT_DIR
    for p in root.iterdir() if root.is_dir() else []:
        if p.name.startswith(".tmp_step_") and p != keep:
            shutil.rmtree(p, ignore_errors=True)


def read_marker(folder) -> dict[str, Any]:
    return read_json(Path(folder) / COMPLETE)


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints (a `complete.json` inside) of a run, oldest first, by step number.

    Temp folders (`.tmp_step_*`) and folders without the marker are what a killed save leaves;
    they are ignored here and removed by the next save."""
    root = Path(run_dir) / CKPT_DIR
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = CKPT_RE.match(p.name)
            if m and p.is_dir() and is_complete(p):
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def resume_folder(run_dir, resume: bool | str) -> Path | None:
    """The folder to resume from: `resume` True/"latest" -> the newest complete checkpoint (None
    when there is none), a path -> that folder (it must be complete). With `resume` False a run
    folder that already holds checkpoints is refused, so a run is never silently overwritten."""
    if not resume:
        if list_checkpoints(run_dir):
            raise CheckpointError(
                f"{run_dir} already holds checkpoints; pass --resume to continue that run, or choose a new --output_dir"
            )
        return None
    if isinstance(resume, str) and resume.lower() not in ("true", "latest", "auto"):
        p = Path(resume)
        if not is_complete(p):
            raise CheckpointError(f"--resume {p} is not a complete checkpoint folder (no {COMPLETE})")
        return p
    return latest_checkpoint(run_dir)


def copy_run(src, dst) -> Path | None:
    """Copy the newest complete checkpoint of run `src` (and its EMA export, config, metrics)
    into run `dst`, e.g. from a read-only attached dataset. Returns the copied folder or None.

    The checkpoint is scanned first (`trust.scan_checkpoint_folder`: nothing in it may need code
    to unpickle), and the copy must have the content (sha256) it had; the path and the sha256
    are printed, so what was adopted is on record."""
    src, dst = Path(src), Path(dst)
    newest = latest_checkpoint(src)
    if newest is None:
        return None
    trust.scan_checkpoint_folder(newest)
    digest = trust.folder_sha256(newest)
    dst.mkdir(parents=True, exist_ok=True)
    for name in (EMA_NAME, BEST_NAME, CONFIG_NAME, "metrics.jsonl"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    target = dst / newest.relative_to(src)
    tmp = target.with_name(".tmp_copy_" + target.name)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(newest, tmp)
    if trust.folder_sha256(tmp) != digest:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{newest} changed while it was copied; run again")
    tmp.rename(target)
    print(f"adopted {newest} (sha256 {digest}) as {target}")
    return target


# --------------------------------------------------------------------------------------------
# Reading the EMA export
# --------------------------------------------------------------------------------------------


@dataclass
class EmaFile:
    """The weights and metadata of RUN/ema.safetensors."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]


def resolve_ema(path, weights: str = "last") -> Path:
    """A RUN directory (its best or last EMA export) or an EMA file -> the file. A run that never
    validated has no best export: its last one is used, and said."""
    if weights not in WEIGHTS:
        raise CheckpointError(f"unknown weights {weights!r}; choose one of {list(WEIGHTS)}")
    path = Path(path)
    if path.is_dir() and weights == "best":
        if (path / BEST_NAME).is_file():
            return path / BEST_NAME
        if (path / EMA_NAME).is_file():
            print(f"note: {path} has no {BEST_NAME} (it never validated, or predates best exports): "
                  "sampling its last EMA")
    if path.is_dir():
        path = path / EMA_NAME
        if not path.is_file():
            raise CheckpointError(
                f"{path.parent} has no {EMA_NAME}; pass a finished training run directory "
                f"(python -m mdgen_helpers train ...) or the path of its {EMA_NAME}."
            )
    elif not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a RUN directory or its {EMA_NAME}.")
    return path


def is_ema_file(path) -> Path | None:
    """Our EMA file for a run folder or file, or None when `path` is not one of our runs."""
    path = Path(path)
    cand = path / EMA_NAME if path.is_dir() else path
    if cand.suffix == ".safetensors" and cand.is_file():
        try:
            meta = load_safetensors_metadata(cand)
        except Exception:  # noqa: BLE001 - unreadable: let the official loader report it
            return None
        if "model_config" in meta:
            return cand
    return None


def read_ema(path, weights: str = "last") -> EmaFile:
    """Weights and metadata of a run's EMA export, refusing files that lack the metadata."""
    path = resolve_ema(path, weights)
    try:
        meta = load_safetensors_metadata(path)
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); pass RUN/{EMA_NAME}.") from None
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise CheckpointError(
            f"{path} lacks the metadata {missing} that train.py writes into {EMA_NAME}; it is not an "
            f"mdgen EMA checkpoint (official LightningDiT weights need conversion through train.py)."
        )
    # A best export is older than the newest checkpoint by design: only the last one can be stale
    # (and only then is the checkpoint's EMA state hashed).
    newest = None if meta.get("export") == "best" else latest_checkpoint(path.parent)
    if newest is not None and (newest / EMA_STATE).is_file() and not _export_is_current(newest, meta):
        # A run killed between its last checkpoint and the export (or an attached, read-only run
        # in that state): sample from the newest complete checkpoint's EMA, never the stale file.
        print(f"note: {path} (step {meta.get('step')}) is older than the complete checkpoint {newest}; "
              f"using that checkpoint's EMA (train --resume re-exports it)")
        state, meta = _ema_export_of(newest)
    return EmaFile(path, state, meta)
