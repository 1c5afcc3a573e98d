"""The trust boundary: what we read from attached folders, and how we own what we write.

Checkpoints, runs and weights arrive as Kaggle datasets, often someone else's. A pickle can run
any code while it is read, and Accelerate's `load_state` unpickles several files (custom states
even with `weights_only=False`). So every file it would unpickle is first read here with
`torch.load(weights_only=True)` (tensors, plain containers, and the numpy types Accelerate's RNG
states need, nothing callable): a crafted pickle is refused before `load_state` runs.

Also here, small and shared: names from metadata are single path components, paths stay inside
their folder, tensors are finite before they are used or written, folders are fsynced before
their completion marker, and a full disk becomes one line that names the folder.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import os
import pickle
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from mdgen_helpers.errors import CheckpointError, DataError, MdgenError

# Files Accelerate reads with torch.load in a checkpoint folder (optimizer.bin, scheduler.bin,
# sampler.bin, scaler.pt, random_states_*.pkl, custom_checkpoint_*.pkl, pytorch_model.bin, ...).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


if TYPE_CHECKING:
    import torch

# torch and numpy are imported where they are used: `users` imports this module, and it must stay
# importable without them (the Kaggle bundle's offline install check).


class DiskFullError(MdgenError):
    """The disk filled up while writing; the partial output was removed."""


def _numpy_rng_globals() -> list:
    """What Accelerate's random_states_*.pkl needs besides tensors: numpy arrays and dtypes (data,
    not code) and codecs.encode (numpy pickles the RNG key as latin-1 text)."""
    import numpy as np

    out: list = [np.ndarray, np.dtype, codecs.encode]
    try:
        out.append(np._core.multiarray._reconstruct)
    except AttributeError:  # numpy < 2
        out.append(np.core.multiarray._reconstruct)
    out += [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", None)) if n.endswith("DType")]
    return out


def load_pickle_safely(path: str | os.PathLike, what: str = "file") -> Any:
    """torch.load restricted to tensors, plain containers and numpy data; anything else (a
    class, a function, os.system) is refused with a CheckpointError naming the file, never run."""
    import torch

    path = Path(path)
    allowed = _numpy_rng_globals()
    scoped = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; older: add globally
    if scoped is None:
        torch.serialization.add_safe_globals(allowed)
    try:
        with scoped(allowed) if scoped is not None else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "global" in ln.lower()), lines[0] if lines else "")
        if "global" in reason.lower():
            raise CheckpointError(
                f"refused to load {what} {path}: it is a pickle that needs code to unpickle ({reason[:160]}), "
                "so it was not executed; only tensors and plain containers are accepted") from None
        raise CheckpointError(f"cannot read {what} {path}: damaged or truncated ({reason[:160]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot read {what} {path}: damaged or truncated ({first})") from None


def check_safetensors(path: str | os.PathLike, what: str = "file") -> None:
    """Open a safetensors file's header and data range (a truncated file fails here, not mid-load)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            for k in keys[-1:]:  # the last tensor ends at the end of the data region
                f.get_slice(k)
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: all mean "not a usable file"
        raise CheckpointError(f"cannot read {what} {path}: not a complete safetensors file "
                              f"({str(e).splitlines()[0][:160]})") from None


def scan_checkpoint_folder(folder: str | os.PathLike) -> None:
    """Read every file in a checkpoint folder that Accelerate would unpickle (weights_only) and
    open every safetensors file; raise a CheckpointError naming the first bad one."""
    folder = Path(folder)
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        if p.suffix in PICKLE_SUFFIXES:
            load_pickle_safely(p, "checkpoint file")
        elif p.suffix == ".safetensors":
            check_safetensors(p, "checkpoint file")


def folder_sha256(folder: str | os.PathLike) -> str:
    """One sha256 for a folder's content: every file's relative path and sha256, in sorted order."""
    from mdgen_helpers.files import sha256_file, sha256_json

    folder = Path(folder)
    return sha256_json(sorted((p.relative_to(folder).as_posix(), sha256_file(p))
                              for p in folder.rglob("*") if p.is_file()))


# --------------------------------------------------------------------------------------------
# Names and paths
# --------------------------------------------------------------------------------------------

def safe_component(name: Any, what: str = "name") -> str:
    """`name` if it is one path component (not empty, `.`, `..`, absolute, or holding a separator)."""
    s = str(name)
    if (not s or s in (".", "..") or "/" in s or "\\" in s or "\0" in s or os.path.isabs(s)
            or (os.altsep and os.altsep in s)):
        raise DataError(f"unsafe {what} {s!r}: it must be a single folder or file name (no '/', '..' or absolute path)")
    return s


def inside(root: str | os.PathLike, path: str | os.PathLike, what: str = "path") -> Path:
    """`path` (relative to `root` or absolute), resolved; refused when it leaves `root`."""
    root_r = Path(root).resolve()
    p = Path(path)
    full = (p if p.is_absolute() else root_r / p).resolve()
    if full != root_r and root_r not in full.parents:
        raise DataError(f"{what} {path} resolves to {full}, outside {root_r}; refused")
    return full


# --------------------------------------------------------------------------------------------
# Finite checks
# --------------------------------------------------------------------------------------------

def require_finite(tensors: "torch.Tensor | Mapping[str, torch.Tensor]", what: str) -> None:
    """Raise a DataError naming `what` (and the first bad tensor) when anything is NaN/inf."""
    import torch

    items = tensors.items() if isinstance(tensors, Mapping) else [("", tensors)]
    for name, t in items:
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise DataError(f"{what}{f' ({name})' if name else ''} holds {bad} NaN/inf values; refused")


# --------------------------------------------------------------------------------------------
# Durability and a full disk
# --------------------------------------------------------------------------------------------

def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file under `folder`, then the folders: the data is on disk before a marker
    that says it is complete."""
    folder = Path(folder)
    dirs = [folder]
    for p in folder.rglob("*"):
        if p.is_dir():
            dirs.append(p)
        elif p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in dirs:
        fsync_dir(d)


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder (its entries: a rename into it is durable after this)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


# Below this much free space after a failed write, the failure is taken to be the full disk:
# torch.save reports ENOSPC as a RuntimeError ("iostream error", "unexpected pos"), not an OSError.
NEARLY_FULL_BYTES = 64 * 2**20


def _free_bytes(folder: str | os.PathLike) -> int | None:
    for p in (Path(folder), *Path(folder).parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


@contextlib.contextmanager
def disk_full_guard(folder: str | os.PathLike, what: str, remove: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn a full disk while writing `what` into one line naming `folder`; `remove` (a temp
    folder or file of the partial output) is deleted first, so nothing half-written stays."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        if not full and not isinstance(e, OSError):
            free = _free_bytes(folder)
            full = free is not None and free < NEARLY_FULL_BYTES
        if not full:
            raise
        if remove is not None:
            r = Path(remove)
            shutil.rmtree(r, ignore_errors=True) if r.is_dir() else r.unlink(missing_ok=True)
        free = _free_bytes(folder)
        left = "free space unknown" if free is None else f"{free / 2**20:.1f} MB free"
        cause = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise DiskFullError(f"disk full while writing {what} in {folder} ({left}; {cause}); the partial output was "
                            "removed. Free space (or pick a folder on a larger disk) and run the same command again") from None
