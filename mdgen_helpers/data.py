"""The data layer: user discovery, validation report, the persisted split, the image dataset.

Layout: `DATA/ID_1/*.jpg ... DATA/ID_N/*.jpg`, one folder per user. `ID_k` is user id k and
label k-1 (`mdgen_helpers.users.UserMap`); folders with other names are accepted and get an
explicit mapping, printed by `split` and saved in `split.json`, so every later artifact agrees on
who is who. The number of users always comes from the folders, never from a constant.

Every file is checked once (`validate_dataset`): what cannot be used is reported with a reason
instead of failing deep inside training, and what can be fixed (grayscale, RGBA, 16-bit, other
sizes) is converted the same way `load_image` converts it, with a note in the report.

The split is decided once and persisted (`split.json`), because the tokenizer statistics, the
model and the evaluation must all see the same train/val/test files. Assignment is per file: a
seeded hash of its relative path is compared with the cumulative fractions. So a file always
lands in the same part, whatever else is in the folder: adding files never moves old ones, and
stratification by user holds in expectation (each user's parts are drawn independently).
Trade-off: proportions are binomial, not exact (for 300 files per user, the train share has a
standard deviation of about 2.6 points). A user with very few files could get an empty part by
chance, so an empty train part (any user) and empty val / test parts (users with >= 3 files) are
filled by moving the one file whose hash lies closest to that part's interval (recorded under
`forced` in split.json); users with 1-2 files have train (and maybe val) only.
Such a forced file can move back to its hashed part once the user has enough files; every other
file never moves.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from mdgen_helpers.errors import DataError, MdgenError, SplitMismatchError
from mdgen_helpers.files import atomic_write_json, read_json, sha256_bytes, sha256_json
from mdgen_helpers.trust import inside
from mdgen_helpers.users import UserMap

IMAGE_SIZE = 256
PARTS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
SPLIT_FORMAT = "mdgen-split"
SPLIT_VERSION = 1
MIN_SIDE = 16  # smaller images hold no usable spectrogram; upscaling them would invent content


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------

def _hidden(name: str) -> bool:
    """Hidden / tool folders: .ipynb_checkpoints (Kaggle, Jupyter), __MACOSX (zip), .DS_Store."""
    return name.startswith(".") or name.startswith("__")


def _natural_key(text: str) -> list:
    """Sort 'img_2' before 'img_10' (numbers compared as numbers)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _user_folders(data_dir: Path) -> list[str]:
    if not data_dir.exists():
        raise DataError(f"data folder {data_dir} does not exist; pass the folder that holds ID_1/, ID_2/, ...")
    if not data_dir.is_dir():
        raise DataError(f"{data_dir} is a file, not a folder; pass the folder that holds ID_1/, ID_2/, ...")
    folders = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not _hidden(p.name))
    if not folders:
        loose = [p.name for p in data_dir.iterdir() if p.is_file() and not _hidden(p.name)]
        hint = f" (found {len(loose)} loose files there)" if loose else ""
        raise DataError(
            f"no user folders in {data_dir}{hint}; images must be in one folder per user, "
            f"e.g. {data_dir}/ID_1/*.jpg, {data_dir}/ID_2/*.jpg"
        )
    # A common mistake with unzipped Kaggle datasets: DATA/<wrapper>/ID_1/...
    if len(folders) == 1 and not folders[0].startswith("ID_"):
        inner = data_dir / folders[0]
        if any(p.is_dir() and p.name.startswith("ID_") for p in inner.iterdir()):
            raise DataError(f"{data_dir} holds a single folder '{folders[0]}' with ID_* folders inside; pass --data_dir {inner}")
    return folders


def discover_users(data_dir: str | os.PathLike) -> UserMap:
    """All user folders of `data_dir`: `ID_k` numerically (ID_2 before ID_10), other names after.

    Files next to the folders (users.json, split.json, ...) and hidden folders are ignored.
    `validate_dataset` later drops folders without a single usable image from the map it uses.
    """
    return UserMap.from_folders(_user_folders(Path(data_dir)))


# --------------------------------------------------------------------------------------------
# Decoding: shared by validation and load_image, so both see the same pixels
# --------------------------------------------------------------------------------------------

class _Reject(Exception):
    """Internal: the file cannot be used; args = (kind, reason)."""


def _to_rgb(img: Image.Image) -> tuple[Image.Image, list[str]]:
    """Convert a decoded image to 8-bit RGB; returns the image and notes on what was changed."""
    mode = img.mode
    if mode == "RGB":
        return img, []
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale (PNG): Pillow's convert("RGB") would clip at 255, so scale the range.
        a = np.asarray(img).astype(np.int64)
        if a.min() < 0 or a.max() > 65535:
            raise _Reject("unsupported_mode", f"32-bit integer image (mode {mode}) with values outside 0..65535")
        g = np.round(a / 257.0).astype(np.uint8)
        return Image.fromarray(np.stack([g, g, g], axis=-1)), [f"16-bit grayscale (mode {mode}) scaled to 8-bit RGB"]
    if mode == "F":
        raise _Reject("unsupported_mode", "floating-point image (mode F); save it as 8-bit RGB PNG or JPEG")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        opaque = bool(np.asarray(rgba)[..., 3].min() == 255)
        note = f"{mode} converted to RGB (alpha dropped{'' if opaque else '; it was NOT fully opaque'})"
        return rgba.convert("RGB"), [note]
    if mode in ("L", "1"):
        return img.convert("RGB"), [f"grayscale (mode {mode}) converted to RGB"]
    return img.convert("RGB"), [f"mode {mode} converted to RGB"]


def _decode(data: bytes, size: int = IMAGE_SIZE) -> tuple[Image.Image, list[str]]:
    """Bytes -> checked RGB image of (size, size) plus notes; raises _Reject(kind, reason)."""
    if len(data) == 0:
        raise _Reject("empty_file", "empty file (0 bytes)")
    fmt = "image"
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format or fmt
            probe.verify()  # structure / checksum checks (PNG CRCs), no pixel decoding
    except UnidentifiedImageError:
        raise _Reject("not_image", "not an image (Pillow cannot identify the file type)") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a property of the file
        raise _Reject("corrupt", f"corrupt {fmt} file ({type(e).__name__}: {e})") from None
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # full decode: catches truncated JPEGs that verify() lets through
    except Exception as e:  # noqa: BLE001
        raise _Reject("truncated", f"truncated or unreadable {fmt} image data ({type(e).__name__}: {e})") from None
    notes: list[str] = []
    if getattr(img, "n_frames", 1) > 1:
        notes.append(f"{img.n_frames} frames; the first is used")
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise _Reject("too_small", f"image is {w}x{h}; at least {MIN_SIDE}x{MIN_SIDE} is needed")
    img, conv = _to_rgb(img)
    notes += conv
    if (w, h) != (size, size):
        # Pillow's resize filters scale their support with the reduction: antialiased.
        img = img.resize((size, size), Image.Resampling.BICUBIC)
        notes.append(f"resized from {w}x{h} to {size}x{size}")
    return img, notes


def load_image(path: str | os.PathLike, size: int = IMAGE_SIZE):
    """Image file -> float tensor (3, size, size) in [-1, 1].

    Grayscale / RGBA / 16-bit are converted to RGB and other sizes resized (antialiased bicubic),
    exactly as `validate_dataset` reports it. Raises DataError naming the file when it is unusable.
    """
    import torch

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    try:
        img, _ = _decode(data, size)
    except _Reject as r:
        raise DataError(f"{path}: {r.args[1]}; remove or replace the file and re-run `split`") from None
    # Scaled in numpy: a torch op this small is slower than the decode when torch's thread
    # pool competes with DataLoader workers for the cores.
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / np.float32(127.5) - np.float32(1.0)
    return torch.from_numpy(np.ascontiguousarray(x))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileRecord:
    """A usable image. `notes` say what load_image will convert (empty when nothing)."""

    relpath: str
    label: int
    sha256: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Skipped:
    """A file that is not used, with a short machine-readable kind and a readable reason."""

    relpath: str
    kind: str
    reason: str


@dataclass
class ValidationReport:
    data_dir: str
    user_map: UserMap
    records: list[FileRecord]
    skipped: list[Skipped]
    skipped_users: list[tuple[str, str]] = field(default_factory=list)  # (folder, reason)
    folder_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # folder -> {files, ok, skipped}

    def per_user(self) -> list[dict[str, Any]]:
        """One row per folder seen: usable folders (with label / user id) and skipped ones."""
        rows = []
        dropped = dict(self.skipped_users)
        folders = list(self.user_map.folders) + sorted(f for f in dropped if f not in self.user_map.folders)
        for folder in folders:
            c = self.folder_counts.get(folder, {"files": 0, "ok": 0, "skipped": 0})
            in_map = folder in self.user_map.folders
            label = self.user_map.label_of_folder(folder) if in_map else None
            recs = [r for r in self.records if r.label == label] if in_map else []
            rows.append({
                "folder": folder,
                "user_id": self.user_map.user_of_label(label) if in_map else None,
                "label": label,
                "files": c["files"],
                "ok": c["ok"],
                "skipped": c["skipped"],
                "converted": sum(1 for r in recs if r.notes),
                "status": "ok" if folder not in dropped else f"skipped: {dropped[folder]}",
            })
        return rows

    def summary(self) -> str:
        n_conv = sum(1 for r in self.records if r.notes)
        lines = [
            f"validated {len(self.records) + len(self.skipped)} files in {len(self.per_user())} user folders "
            f"of {self.data_dir}: {len(self.records)} usable ({n_conv} converted/resized), "
            f"{len(self.skipped)} skipped, {self.user_map.num_users} users"
        ]
        if any(not f.startswith("ID_") for f in self.user_map.folders):
            pairs = ", ".join(f"{f} -> user {u} (label {i})" for i, (f, u) in
                              enumerate(zip(self.user_map.folders, self.user_map.user_ids)))
            lines.append(f"user mapping (saved in split.json): {pairs}")
        kinds: dict[str, list[Skipped]] = {}
        for s in self.skipped:
            kinds.setdefault(s.kind, []).append(s)
        for kind, items in sorted(kinds.items()):
            lines.append(f"  skipped {len(items)} x {kind}, e.g. {items[0].relpath}: {items[0].reason}")
        notes: dict[str, list[str]] = {}
        for r in self.records:
            for n in r.notes:
                notes.setdefault(re.sub(r"from \d+x\d+", "from WxH", n), []).append(r.relpath)
        for n, paths in sorted(notes.items()):
            lines.append(f"  note {len(paths)} x {n}, e.g. {paths[0]}")
        for folder, reason in self.skipped_users:
            lines.append(f"  user folder {folder} skipped: {reason}")
        lines.append(f"{'folder':<16}{'user':>6}{'label':>7}{'files':>7}{'ok':>6}{'skip':>6}  status")
        for row in self.per_user():
            lines.append(
                f"{row['folder']:<16}{str(row['user_id'] if row['user_id'] is not None else '-'):>6}"
                f"{str(row['label'] if row['label'] is not None else '-'):>7}{row['files']:>7}"
                f"{row['ok']:>6}{row['skipped']:>6}  {row['status']}"
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "data_dir": self.data_dir,
            "user_map": self.user_map.to_json(),
            "users": self.per_user(),
            "records": [{"relpath": r.relpath, "label": r.label, "sha256": r.sha256, "notes": list(r.notes)}
                        for r in self.records],
            "skipped": [{"relpath": s.relpath, "kind": s.kind, "reason": s.reason} for s in self.skipped],
            "skipped_users": [{"folder": f, "reason": r} for f, r in self.skipped_users],
        }


def _list_files(folder: Path) -> list[Path]:
    """Files under a user folder (recursively), hidden files and folders excluded."""
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).parts
        if any(_hidden(part) for part in rel) or not p.is_file():
            continue
        out.append(p)
    return out


def _outside(path: Path, data_dir: Path) -> bool:
    """True when `path` (a symlink, or under one) resolves outside the data folder."""
    root = data_dir.resolve()
    return root not in path.resolve().parents


def _check_file(path: Path) -> tuple[str | None, list[str], tuple[str, str] | None]:
    """(sha256, notes, reject) for one file; runs in a worker thread (Pillow releases the GIL)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, [], ("unreadable", f"cannot read file ({e})")
    digest = sha256_bytes(data)
    try:
        _, notes = _decode(data)
    except _Reject as r:
        return digest, [], (r.args[0], r.args[1])
    except Exception as e:  # noqa: BLE001 - never crash the whole validation on one file
        return digest, [], ("unreadable", f"{type(e).__name__}: {e}")
    return digest, notes, None


def validate_dataset(data_dir: str | os.PathLike, user_map: UserMap | None = None,
                     workers: int | None = None) -> ValidationReport:
    """Check every file once; return usable records and skips with reasons.

    Without `user_map` the users are the folders that hold at least one usable image (in
    `discover_users` order). With `user_map` (e.g. from a saved split) labels follow that map,
    and folders outside it are reported as skipped. Files with the same bytes are kept once (the
    first in folder / natural file order); the others are reported as duplicates.
    Raises DataError when nothing usable remains.
    """
    data_dir = Path(data_dir)
    folders = _user_folders(data_dir)
    if user_map is not None:
        extra = [f for f in folders if f not in user_map.folders]
        folders = [f for f in user_map.folders if f in folders]
    else:
        extra = []
        folders = list(UserMap.from_folders(folders).folders)

    files: list[tuple[str, Path]] = []
    for folder in folders:
        for p in sorted(_list_files(data_dir / folder), key=lambda p: _natural_key(p.relative_to(data_dir).as_posix())):
            files.append((folder, p))
    workers = workers or min(16, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # links leaving the folder are not read
        results = list(pool.map(lambda p: (None, [], None) if _outside(p, data_dir) else _check_file(p),
                                 [p for _, p in files]))

    seen: dict[str, str] = {}  # sha256 -> first relpath
    good: dict[str, list[tuple[str, str, tuple[str, ...]]]] = {f: [] for f in folders}
    skipped: list[Skipped] = []
    counts = {f: {"files": 0, "ok": 0, "skipped": 0} for f in folders}
    for (folder, path), (digest, notes, reject) in zip(files, results):
        rel = path.relative_to(data_dir).as_posix()
        counts[folder]["files"] += 1
        if _outside(path, data_dir):
            reject = ("outside", f"a link to {path.resolve()}, outside the data folder (not followed)")
        elif reject is None and digest in seen and seen[digest].split("/")[0] != folder:
            reject = ("label_conflict", f"same image as {seen[digest]} of another user (kept that one): "
                                        "which user is it? remove one copy")
        elif reject is None and digest in seen:
            reject = ("duplicate", f"same bytes as {seen[digest]} (kept that one)")
        if reject is not None:
            skipped.append(Skipped(rel, *reject))
            counts[folder]["skipped"] += 1
            continue
        seen[digest] = rel
        good[folder].append((rel, digest, tuple(notes)))
        counts[folder]["ok"] += 1

    skipped_users: list[tuple[str, str]] = []
    for folder in folders:
        if not good[folder]:
            n = counts[folder]["files"]
            skipped_users.append((folder, "empty folder" if n == 0 else f"no usable image among {n} files"))
    for folder in extra:
        skipped_users.append((folder, "not in the given user map (saved split); re-run `split` to include it"))
        counts[folder] = {"files": len(_list_files(data_dir / folder)), "ok": 0, "skipped": 0}
    if user_map is not None:
        for folder in user_map.folders:
            if folder not in folders:
                skipped_users.append((folder, "folder listed in the user map is missing"))

    usable = [f for f in folders if good[f]]
    if not usable:
        reasons = ", ".join(sorted({s.kind for s in skipped})) or "no files"
        raise DataError(
            f"no usable images in {data_dir} ({len(files)} files in {len(folders)} user folders; "
            f"problems: {reasons}). Expected JPEG/PNG spectrograms in {data_dir}/ID_1/, {data_dir}/ID_2/, ..."
        )
    if user_map is None:
        user_map = UserMap.from_folders(usable)
    records = [FileRecord(rel, user_map.label_of_folder(folder), digest, notes)
               for folder in user_map.folders if folder in good for rel, digest, notes in good[folder]]
    return ValidationReport(str(data_dir), user_map, records, skipped, skipped_users, counts)


# --------------------------------------------------------------------------------------------
# The persisted split
# --------------------------------------------------------------------------------------------

def _unit_hash(seed: int, key: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, key): the same file always gets the same value."""
    h = hashlib.sha256(f"{int(seed)}\0{key}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    f = tuple(float(x) for x in fractions)
    if len(f) != 3 or any(x < 0 for x in f) or abs(sum(f) - 1.0) > 1e-6 or f[0] <= 0:
        raise MdgenError(f"fractions must be three non-negative numbers (train, val, test) summing to 1 "
                         f"with train > 0, got {list(fractions)}")
    return f  # type: ignore[return-value]


@dataclass
class Split:
    """Train/val/test files per user. `parts[part]` = [(relpath, label), ...]."""

    user_map: UserMap
    parts: dict[str, list[tuple[str, int]]]
    seed: int
    fractions: tuple[float, float, float]
    forced: list[str] = field(default_factory=list)  # files moved to fill an empty part (see module doc)
    subsample: dict[str, Any] | None = None  # set by subsample_split
    # Content identity: relpath -> sha256 of every split file, and what validation skipped (files,
    # folders), so `check_split` can tell changed, new and known-skipped files apart. Part of the hash.
    sha256: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self):
        # One canonical order (user label, then natural file order): dataset indices, latent
        # files and the hash never depend on how the parts were built or stored.
        self.parts = {p: sorted(((str(f), int(l)) for f, l in self.parts.get(p, [])),
                                key=lambda fl: (fl[1], _natural_key(fl[0]))) for p in PARTS}

    @property
    def hash(self) -> str:
        """sha256 of the assignment (user map + parts): equal hash, equal split."""
        ident = {"user_map": self.user_map.to_json(), "parts": {p: [[f, int(l)] for f, l in self.parts[p]] for p in PARTS}}
        if self.sha256:  # splits written before content identity keep their hash
            ident["sha256"] = dict(sorted(self.sha256.items()))
        return sha256_json(ident)

    def files(self, part: str) -> list[str]:
        return [f for f, _ in self._part(part)]

    def labels(self, part: str) -> list[int]:
        return [int(l) for _, l in self._part(part)]

    def _part(self, part: str) -> list[tuple[str, int]]:
        if part not in PARTS:
            raise MdgenError(f"unknown split part '{part}'; use one of {PARTS}")
        return self.parts[part]

    def counts(self) -> dict[int, dict[str, int]]:
        """label -> {train, val, test} file counts."""
        out = {label: {p: 0 for p in PARTS} for label in range(self.user_map.num_users)}
        for p in PARTS:
            for _, label in self.parts[p]:
                out[label][p] += 1
        return out

    def format_counts(self) -> str:
        lines = [f"{'folder':<16}{'user':>6}{'label':>7}{'train':>7}{'val':>6}{'test':>6}"]
        for label, c in self.counts().items():
            lines.append(f"{self.user_map.folder_of_label(label):<16}{self.user_map.user_of_label(label):>6}"
                         f"{label:>7}{c['train']:>7}{c['val']:>6}{c['test']:>6}")
        tot = {p: len(self.parts[p]) for p in PARTS}
        lines.append(f"{'total':<29}{tot['train']:>7}{tot['val']:>6}{tot['test']:>6}   split hash {self.hash[:12]}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SPLIT_FORMAT,
            "version": SPLIT_VERSION,
            "seed": self.seed,
            "fractions": list(self.fractions),
            "user_map": self.user_map.to_json(),
            "parts": {p: {f: int(l) for f, l in self.parts[p]} for p in PARTS},  # relpath -> label
            "counts": {self.user_map.folder_of_label(l): c for l, c in self.counts().items()},
            "forced": list(self.forced),
            "subsample": self.subsample,
            "sha256": dict(sorted(self.sha256.items())),
            "skipped": list(self.skipped),
            "hash": self.hash,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Split":
        if not isinstance(obj, dict) or obj.get("format") != SPLIT_FORMAT:
            raise SplitMismatchError("not an mdgen split file (no \"format\": \"mdgen-split\"); "
                                     "create one with `python -m mdgen_helpers split`")
        if obj.get("version") != SPLIT_VERSION:
            raise SplitMismatchError(f"split file version {obj.get('version')} is not supported "
                                     f"(expected {SPLIT_VERSION}); re-run `split`")
        try:
            user_map = UserMap.from_json(obj["user_map"])
            raw = obj["parts"]
            parts = {p: [(str(f), int(l)) for f, l in (raw[p].items() if isinstance(raw[p], dict) else raw[p])]
                     for p in PARTS}
            split = cls(user_map, parts, int(obj["seed"]), _check_fractions(obj["fractions"]),
                        list(obj.get("forced", [])), obj.get("subsample"), dict(obj.get("sha256") or {}),
                        list(obj.get("skipped") or []))
        except (KeyError, TypeError, ValueError) as e:
            raise SplitMismatchError(f"malformed split file ({type(e).__name__}: {e}); re-run `split`") from None
        seen: set[str] = set()
        for p in PARTS:
            for f, label in parts[p]:
                pp = f.replace("\\", "/").split("/")
                if f.startswith("/") or os.path.isabs(f) or any(c in ("", ".", "..") for c in pp):
                    raise SplitMismatchError(f"split file: path {f!r} is not a plain relative path inside the data "
                                             "folder ('..', '.', absolute); re-run `split`")
                if not 0 <= label < user_map.num_users:
                    raise SplitMismatchError(f"split file: {f} has label {label}, outside 0..{user_map.num_users - 1}")
                if f in seen:
                    raise SplitMismatchError(f"split file: {f} appears twice (parts must not overlap); re-run `split`")
                seen.add(f)
        if "hash" in obj and obj["hash"] != split.hash:
            raise SplitMismatchError(
                "split file content does not match its recorded hash (edited by hand or damaged); "
                "re-run `split`, or delete the \"hash\" field if the edit was intended")
        return split


def make_split(report: ValidationReport, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> Split:
    """Assign each usable file to train/val/test by a seeded hash of its relative path (see module doc)."""
    fr = _check_fractions(fractions)
    bounds = (0.0, fr[0], fr[0] + fr[1], 1.0)
    parts: dict[str, list[tuple[str, int]]] = {p: [] for p in PARTS}
    forced: list[str] = []
    by_label: dict[int, list[FileRecord]] = {}
    for r in report.records:
        by_label.setdefault(r.label, []).append(r)
    for label in sorted(by_label):
        u = {r.relpath: _unit_hash(seed, r.relpath) for r in by_label[label]}
        mine: dict[str, list[str]] = {p: [] for p in PARTS}
        for rel, x in u.items():
            i = 0 if x < bounds[1] else 1 if x < bounds[2] else 2
            mine[PARTS[i]].append(rel)
        for i, part in enumerate(PARTS):
            # Train is never left empty (the model must see every user); val and test are
            # filled only for users with >= 3 files, taking from a part that keeps >= 1 file.
            if mine[part] or fr[i] == 0 or (part != "train" and len(u) < 3):
                continue
            lo, hi = bounds[i], bounds[i + 1]
            donors = [(max(lo - u[f], u[f] - hi, 0.0), f, q) for q in PARTS
                      if len(mine[q]) >= (1 if part == "train" else 2) for f in mine[q]]
            _, f, q = min(donors)
            mine[q].remove(f)
            mine[part].append(f)
            forced.append(f)
        for part in PARTS:
            parts[part] += [(rel, label) for rel in sorted(mine[part], key=_natural_key)]
    skipped = sorted([s.relpath for s in report.skipped] + [f for f, _ in report.skipped_users], key=_natural_key)
    return Split(report.user_map, parts, int(seed), fr, sorted(forced, key=_natural_key),
                 sha256={r.relpath: r.sha256 for r in report.records}, skipped=skipped)


def subsample_split(split: Split, per_user: int, seed: int = 0) -> Split:
    """Few-shot regime: keep `per_user` train files per user (val/test unchanged).

    The kept files are those with the smallest seeded hash, so smaller subsets are nested in
    larger ones (5-shot inside 10-shot) and the choice does not depend on file order. Users with
    fewer train files keep all of them. The subsample is recorded in the split JSON (and its hash).
    """
    if int(per_user) < 1:
        raise MdgenError(f"per_user must be >= 1, got {per_user}")
    train: list[tuple[str, int]] = []
    for label in range(split.user_map.num_users):
        files = [f for f, l in split.parts["train"] if l == label]
        keep = set(sorted(files, key=lambda f: (_unit_hash(seed, "subsample\0" + f), f))[: int(per_user)])
        train += [(f, label) for f in files if f in keep]
    info = {"per_user": int(per_user), "seed": int(seed), "source_hash": split.hash,
            "source_train_files": len(split.parts["train"])}
    kept = {f for f, _ in train} | {f for p in ("val", "test") for f, _ in split.parts[p]}
    return Split(split.user_map, {"train": train, "val": list(split.parts["val"]), "test": list(split.parts["test"])},
                 split.seed, split.fractions, list(split.forced), info,
                 {f: h for f, h in split.sha256.items() if f in kept}, list(split.skipped))


def save_split(split: Split, path: str | os.PathLike) -> Path:
    return atomic_write_json(path, split.to_json())


def load_split(path: str | os.PathLike) -> Split:
    path = Path(path)
    if not path.is_file():
        raise SplitMismatchError(f"no split file at {path}; create it with "
                                 f"`python -m mdgen_helpers split --data_dir DATA --out {path}`")
    try:
        obj = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise SplitMismatchError(f"split file {path} is not valid JSON ({e}); re-run `split`") from None
    return Split.from_json(obj)


def check_split(split: Split, data_dir: str | os.PathLike) -> None:
    """Refuse a split whose files are not all in `data_dir` (wrong folder, or files removed), and,
    when it records content (sha256), one whose files changed or whose folder gained user folders
    or files since: every later stage would otherwise reuse results made from other data."""
    data_dir = Path(data_dir)
    for p in PARTS:
        for f in split.files(p):
            inside(data_dir, f, "split path")
    missing = [f for p in PARTS for f in split.files(p) if not (data_dir / f).is_file()]
    if missing:
        n = sum(len(split.parts[p]) for p in PARTS)
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise SplitMismatchError(
            f"{len(missing)} of {n} files of the split are missing from {data_dir}: {shown}. "
            f"If the data folder is right, re-run `python -m mdgen_helpers split --data_dir {data_dir} --out SPLIT.json` "
            f"(files that still exist keep their part); otherwise pass the data folder the split was made from.")
    if split.sha256:
        _check_content(split, data_dir)


def _check_content(split: Split, data_dir: Path) -> None:
    """Changed files (sha256), new user folders and new files: one error that lists them."""
    resplit = (f"re-run `python -m mdgen_helpers split --data_dir {data_dir} --out SPLIT.json` (existing files keep "
               "their part; latents, tokenizer and model are then recomputed for the new content)")
    changed = [f for f, h in split.sha256.items() if sha256_bytes((data_dir / f).read_bytes()) != h]
    known = set(split.sha256) | {f for p in PARTS for f in split.files(p)} | set(split.skipped)
    if split.subsample:  # a few-shot split leaves the parent's other train files out on purpose
        return _raise_changes(changed, [], [], resplit)
    folders = [f for f in _user_folders(data_dir) if f not in split.user_map.folders and f not in known]
    new_files = [p.relative_to(data_dir).as_posix() for folder in split.user_map.folders if (data_dir / folder).is_dir()
                 for p in _list_files(data_dir / folder) if p.relative_to(data_dir).as_posix() not in known]
    _raise_changes(changed, folders, new_files, resplit)


def _raise_changes(changed: list[str], folders: list[str], new_files: list[str], resplit: str) -> None:
    def show(xs):
        return ", ".join(sorted(xs, key=_natural_key)[:5]) + (", ..." if len(xs) > 5 else "")

    parts = []
    if changed:
        parts.append(f"{len(changed)} files changed since the split was made ({show(changed)})")
    if folders:
        parts.append(f"{len(folders)} new user folders ({show(folders)})")
    if new_files:
        parts.append(f"{len(new_files)} new files ({show(new_files)})")
    if parts:
        raise SplitMismatchError("the data folder no longer matches the split: " + "; ".join(parts) + f". To use them, {resplit}")


def ensure_split(data_dir: str | os.PathLike, split_path: str | os.PathLike, seed: int | None = None,
                 fractions: Sequence[float] | None = None, workers: int | None = None) -> Split:
    """Load and check `split_path`, or validate the data and create it (plus validation.json).

    `seed` / `fractions` default to 0 / (0.7, 0.15, 0.15) when creating; when a split exists,
    explicit values must match it (a silent re-split would invalidate latents and models).
    """
    split_path = Path(split_path)
    if split_path.exists():
        split = load_split(split_path)
        if seed is not None and int(seed) != split.seed:
            raise SplitMismatchError(f"{split_path} was made with seed {split.seed}, not {seed}; "
                                     f"pass seed={split.seed} (or None), or delete the file to re-split")
        if fractions is not None and any(abs(a - b) > 1e-9 for a, b in zip(_check_fractions(fractions), split.fractions)):
            raise SplitMismatchError(f"{split_path} was made with fractions {list(split.fractions)}, not "
                                     f"{list(fractions)}; pass matching fractions (or None), or delete it to re-split")
        check_split(split, data_dir)
        return split
    report = validate_dataset(data_dir, workers=workers)
    split = make_split(report, fractions if fractions is not None else DEFAULT_FRACTIONS, 0 if seed is None else seed)
    atomic_write_json(split_path.parent / "validation.json", report.to_json())
    save_split(split, split_path)
    return split


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------

class ImageDataset:
    """Images of one split part: item i -> (image (3, 256, 256) in [-1, 1], label, i).

    No augmentation by default. A horizontal flip reverses time and a vertical flip reverses the
    Doppler sign (approaching becomes receding): both make physically different signals, so they
    are opt-in only. `flip_time` / `flip_doppler` add flipped copies deterministically (no RNG):
    the dataset grows 2x (or 4x with both); items [k*n, (k+1)*n) are variant k of files 0..n-1,
    so `index % n` is the file's position in `split.files(part)`.
    """

    def __init__(self, data_dir: str | os.PathLike, split: Split, part: str,
                 flip_time: bool = False, flip_doppler: bool = False):
        self.data_dir = Path(data_dir)
        self.split = split
        self.part = part
        self.files = split.files(part)
        self.file_labels = split.labels(part)
        self.variants = [(t, d) for d in ([False, True] if flip_doppler else [False])
                         for t in ([False, True] if flip_time else [False])]

    def __len__(self) -> int:
        return len(self.files) * len(self.variants)

    def variant(self, index: int) -> tuple[str, bool, bool]:
        """(relpath, time flipped, Doppler flipped) of item `index`."""
        n = len(self.files)
        t, d = self.variants[index // n]
        return self.files[index % n], t, d

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(index)
        rel, t, d = self.variant(index)
        x = load_image(self.data_dir / rel)
        if t:
            x = x.flip(-1)  # time axis is x (width)
        if d:
            x = x.flip(-2)  # Doppler axis is y (height)
        return x, self.file_labels[index % len(self.files)], index


# --------------------------------------------------------------------------------------------
# CLI: python -m mdgen_helpers split
# --------------------------------------------------------------------------------------------

def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data_dir", required=True, help="folder with one sub-folder of images per user (ID_1/, ID_2/, ...)")
    parser.add_argument("--out", required=True, help="path of split.json to write (validation.json goes next to it)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the file -> part hash (default 0)")
    parser.add_argument("--fractions", type=float, nargs=3, default=list(DEFAULT_FRACTIONS),
                        metavar=("TRAIN", "VAL", "TEST"), help="part fractions, summing to 1 (default 0.7 0.15 0.15)")
    parser.add_argument("--workers", type=int, default=None, help="validation threads (default: 2 x CPU cores, max 16)")


def cli_main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    report = validate_dataset(args.data_dir, workers=args.workers)
    print(report.summary())
    split = make_split(report, args.fractions, args.seed)
    previous = None
    if out.exists():
        try:
            previous = load_split(out)
        except MdgenError:
            previous = None
    validation_path = atomic_write_json(out.parent / "validation.json", report.to_json())
    save_split(split, out)
    print(split.format_counts())
    if previous is not None:
        old = {f: p for p in PARTS for f in previous.files(p)}
        moved = sum(1 for p in PARTS for f in split.files(p) if f in old and old[f] != p)
        print(f"previous split {previous.hash[:12]} -> {split.hash[:12]}: {moved} existing files changed part")
    print(f"wrote {out} and {validation_path}")
    return 0
