"""Where a stage's inputs come from: this run's work folder, else the attached inputs, by marker.

On Kaggle each notebook runs in a fresh session: `/kaggle/working` starts empty, and what an
earlier notebook wrote arrives read-only under `/kaggle/input` (its output attached through
`kernel_sources`, or republished as a dataset). So every upstream artifact (split, latents, run,
generated set, the data set itself) is looked up first in this run's work folder (a local run of
the whole series), then among the attached inputs by its marker file. A missing artifact is an
error that names what was searched and which notebook produces it; nothing is ever substituted
(no simulated data unless asked for, no "first match" among several candidates).
"""

from __future__ import annotations

from pathlib import Path

from mdgen_helpers import env
from mdgen_helpers.errors import DataError, MdgenError


class MissingInputError(MdgenError):
    """An upstream artifact is neither in the work folder nor among the attached inputs."""


# kind -> (what it is, the env.find_inputs kind, which notebook writes it)
ARTIFACTS = {
    "split": ("the persisted split (split.json)", "split", "notebook 01 (01_extract_latents)"),
    "latents": ("the latents (stats.safetensors)", "latents", "notebook 01 (01_extract_latents)"),
    "run": ("the training run (ema.safetensors)", "checkpoint", "notebook 02 (02_train_dit)"),
    "generated": ("the generated set (manifest.json)", "generated", "notebook 03 (03_generate)"),
}


def input_roots() -> list[Path]:
    """Where attached inputs live: /kaggle/input on Kaggle, nothing elsewhere."""
    return [env.KAGGLE_INPUT] if env.on_kaggle() else []


def _local(kind: str, paths) -> Path:
    return {"split": paths.split, "latents": paths.latents, "run": paths.run, "generated": paths.generated}[kind]


def _present(kind: str, path: Path) -> bool:
    marker = env.MARKERS[ARTIFACTS[kind][1]]
    return path.is_file() if kind == "split" else (path / marker).is_file()


def _searched(roots: list[Path]) -> str:
    if not roots:
        return "no attached inputs (not on Kaggle)"
    lines = []
    for root in roots:
        if not root.is_dir():
            lines.append(f"{root} (absent)")
            continue
        tops = sorted(str(p.relative_to(root)) for p in root.glob("*/*/*") if p.is_dir() and p.parent.parent.name in
                      ("datasets", "notebooks")) + sorted(p.name for p in root.iterdir() if p.name not in ("datasets", "notebooks"))
        lines.append(f"{root} holding {', '.join(tops) if tops else 'nothing'}")
    return "; ".join(lines)


def _single(found: list[Path], label: str, several_hint: str, error=MissingInputError) -> Path | None:
    """The one attached candidate (printed), or None; several are an error that lists them."""
    if len(found) > 1:
        raise error(f"{label}: several attached copies {[str(p) for p in found]}; {several_hint}")
    if found:
        print(f"{label}: {found[0]} (attached)")
        return found[0]
    return None


def locate(kind: str, paths, roots: list[Path] | None = None) -> Path:
    """The folder (or, for the split, the file) of an upstream artifact: WORK first, then the one
    attached copy. Several attached copies, or none, are errors naming them / what was searched."""
    if kind not in ARTIFACTS:
        raise MdgenError(f"unknown artifact {kind!r}; one of {sorted(ARTIFACTS)}")
    what, found_kind, producer = ARTIFACTS[kind]
    local = _local(kind, paths)
    if _present(kind, local):
        return local
    roots = input_roots() if roots is None else [Path(r) for r in roots]
    found = _single(env.find_inputs(roots)[found_kind], kind, "attach only one")
    if found is not None:
        return found
    raise MissingInputError(
        f"{what} not found: looked in {local} and among the attached inputs ({_searched(roots)}). "
        f"It is written by {producer}: run that notebook first, then attach its output "
        "(kernel_sources in kernel-metadata.json, or the dataset published from it)")


def locate_tokenizer(paths, profile, vavae_path: str | None = None, roots: list[Path] | None = None) -> Path:
    """The tokenizer file the latents were made with: an explicit/attached VA-VAE, this run's
    fitted stand-in or random VA-VAE, or the same file in notebook 01's attached output."""
    from mdgen_helpers.pipeline import tokenizer_path

    path = tokenizer_path(paths, profile, vavae_path)
    if vavae_path or path.is_file():
        return path
    roots = input_roots() if roots is None else [Path(r) for r in roots]
    found = _single(sorted({p for r in roots if r.is_dir() for p in r.rglob(path.name)}), f"tokenizer {path.name}",
                    "set VAVAE_PATH")
    if found is not None:
        return found
    raise MissingInputError(
        f"tokenizer {path.name} not found: looked in {path.parent} and among the attached inputs "
        f"({_searched(roots)}). It is written by notebook 01 (01_extract_latents): attach its output, "
        "or attach the VA-VAE (vavae-f16d32) and set VAVAE_PATH")


def find_data(data_dir: str | None = None, roots: list[Path] | None = None) -> Path | None:
    """The data set: `data_dir` if given, else the one attached folder holding ID_1 (or ID_01)
    user folders; None when nothing is attached. Several candidates are an error listing them."""
    if data_dir:
        path = Path(data_dir)
        if not path.is_dir():
            raise DataError(f"data folder {path} does not exist; pass the folder that holds ID_1, ID_2, ...")
        return path
    roots = input_roots() if roots is None else [Path(r) for r in roots]
    return _single(env.find_inputs(roots)["data"], "data set", "set DATA_DIR (--data_dir) to one of them", DataError)


def no_data_error(roots: list[Path] | None = None) -> DataError:
    roots = input_roots() if roots is None else [Path(r) for r in roots]
    return DataError(
        "no data set: DATA_DIR (--data_dir) is empty and no folder holding ID_1 (or ID_01) user folders was "
        f"found among the attached inputs ({_searched(roots)}). Attach your data set (micro-doppler-data), "
        "set DATA_DIR, or ask for simulated users explicitly (SIMULATE = True, --simulate)")
