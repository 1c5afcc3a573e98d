"""Kaggle delivery: the helper-package bundle, push-ready kernel folders, metadata checks.

Kaggle users chain the notebooks through attached datasets (helper package, VA-VAE weights,
latents, checkpoints), often without internet. This module builds what they upload:

    python -m mdgen_helpers kaggle bundle --out build/mdgen-helpers   # wheel + source + metadata
    kaggle datasets create -p build/mdgen-helpers -r tar               # -r tar keeps sub-folders
    python -m mdgen_helpers kaggle kernel --notebook 02 --out build/k02
    kaggle kernels push -p build/k02

and validates every metadata file against the documented constraints (tests run these checks on
everything under kaggle_datasets/).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mdgen_helpers import __version__, env
from mdgen_helpers.errors import MdgenError
from mdgen_helpers.files import atomic_write_json, read_json

REPO_ROOT = Path(__file__).resolve().parents[1]
METADATA_DIR = REPO_ROOT / "kaggle_datasets"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
BUNDLE_MARKER = "mdgen_bundle.json"  # env.MARKERS["helpers"] finds the bundle by this file

_SLUG = re.compile(r"^[A-Za-z0-9_-]+/[a-z0-9][a-z0-9-]*[a-z0-9]$")
# Kaggle's documented licence names (kaggle-api docs/datasets_metadata.md), spelled exactly: there
# is no "MIT", and Apache 2.0 is "apache-2.0". Code under MIT goes out as "other" (see the description).
LICENSES = {"CC0-1.0", "CC-BY-SA-3.0", "CC-BY-SA-4.0", "CC-BY-NC-SA-4.0", "GPL-2.0", "ODbL-1.0", "DbCL-1.0",
            "copyright-authors", "other", "unknown", "CC-BY-4.0", "CC-BY-NC-4.0", "PDDL", "CC-BY-3.0",
            "CC-BY-3.0-IGO", "US-Government-Works", "CC-BY-NC-SA-3.0-IGO", "CDLA-Permissive-1.0",
            "CDLA-Sharing-1.0", "CC-BY-ND-4.0", "CC-BY-NC-ND-4.0", "ODC-BY-1.0", "LGPL-3.0", "AGPL-3.0",
            "FDL-1.3", "EU-ODP-Legal-Notice", "apache-2.0", "GPL-3.0"}
KERNEL_KEYS = {"id", "title", "code_file", "language", "kernel_type", "is_private", "enable_gpu",
               "enable_tpu", "enable_internet", "dataset_sources", "competition_sources",
               "kernel_sources", "model_sources", "machine_shape", "docker_image"}


class KaggleMetadataError(MdgenError):
    pass


def slugify(title: str) -> str:
    """The slug Kaggle derives from a kernel title: lowercase, every run of other characters a '-'."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def require_checkout() -> Path:
    """The repository checkout these builders read (kaggle_datasets/, notebooks/, pyproject.toml);
    a clear error when mdgen_helpers runs from an installed wheel or a bundle instead."""
    missing = [n for n in ("pyproject.toml", "kaggle_datasets", "notebooks") if not (REPO_ROOT / n).exists()]
    if missing:
        raise MdgenError(f"this needs the mdgen repository checkout, but mdgen_helpers runs from {REPO_ROOT} "
                         f"(no {', '.join(missing)} there): run it from a clone (pip install -e .)")
    return REPO_ROOT


def find_notebook(notebook: str) -> tuple[Path, Path]:
    """(notebook file, its kernel-metadata.json) for a number or name like '02'."""
    require_checkout()
    matches = sorted(NOTEBOOKS_DIR.glob(f"{notebook}*.ipynb")) or sorted(NOTEBOOKS_DIR.glob(f"*{notebook}*.ipynb"))
    if len(matches) != 1:
        raise MdgenError(f"--notebook {notebook!r} matches {[m.name for m in matches]}; give its number, e.g. 02")
    meta_path = METADATA_DIR / "kernels" / matches[0].stem / "kernel-metadata.json"
    if not meta_path.is_file():
        raise MdgenError(f"no kernel metadata for {matches[0].name} at {meta_path}")
    return matches[0], meta_path


def validate_dataset_metadata(meta: dict) -> list[str]:
    """Problems with a dataset-metadata.json (empty list when valid).

    Kaggle's rules: title 6-50 characters; id `owner/slug` with a slug of 3-50 characters
    (lowercase letters, digits, hyphens); exactly one licence from the known names.
    """
    problems = []
    title = meta.get("title", "")
    if not isinstance(title, str) or not 6 <= len(title) <= 50:
        problems.append(f"title must be 6-50 characters, got {title!r} ({len(title) if isinstance(title, str) else '-'})")
    ident = meta.get("id", "")
    if not isinstance(ident, str) or not _SLUG.match(ident):
        problems.append(f"id must be 'owner/slug' (lowercase slug, digits, hyphens), got {ident!r}")
    else:
        slug = ident.split("/", 1)[1]
        if not 3 <= len(slug) <= 50:
            problems.append(f"slug must be 3-50 characters, got {slug!r}")
    licenses = meta.get("licenses")
    if not isinstance(licenses, list) or len(licenses) != 1 or not isinstance(licenses[0], dict):
        problems.append("licenses must be a list with exactly one {'name': ...} entry")
    elif licenses[0].get("name") not in LICENSES:
        problems.append(f"unknown licence {licenses[0].get('name')!r}; use one of {sorted(LICENSES)}")
    return problems


def validate_kernel_metadata(meta: dict) -> list[str]:
    """Problems with a kernel-metadata.json for a GPU notebook run on T4x2."""
    problems = []
    unknown = set(meta) - KERNEL_KEYS
    if unknown:
        problems.append(f"unknown keys {sorted(unknown)}")
    ident = meta.get("id", "")
    if not isinstance(ident, str) or not _SLUG.match(ident):
        problems.append(f"id must be 'owner/slug', got {ident!r}")
    title = meta.get("title", "")
    if not isinstance(title, str) or not 5 <= len(title) <= 50:
        problems.append(f"title must be 5-50 characters, got {title!r}")
    elif isinstance(ident, str) and "/" in ident and slugify(title) != ident.split("/", 1)[1]:
        problems.append(f"title {title!r} slugifies to {slugify(title)!r}, not the id's slug "
                        f"{ident.split('/', 1)[1]!r}: `kaggle kernels push` would create another kernel")
    if meta.get("language") != "python" or meta.get("kernel_type") != "notebook":
        problems.append("language must be 'python' and kernel_type 'notebook'")
    if meta.get("enable_gpu") is not True:
        problems.append("enable_gpu must be true")
    if meta.get("machine_shape") != "NvidiaTeslaT4":
        problems.append("machine_shape must be 'NvidiaTeslaT4' (enable_gpu alone has landed on P100s, "
                        "which the current image cannot run)")
    if not isinstance(meta.get("enable_internet"), bool):
        problems.append("enable_internet must be set explicitly (true or false)")
    if "docker_image" in meta:
        problems.append("do not pin docker_image: the notebooks follow Kaggle's current image")
    for key in ("dataset_sources", "kernel_sources", "competition_sources"):
        if not isinstance(meta.get(key, []), list):
            problems.append(f"{key} must be a list")
    for key in ("dataset_sources", "kernel_sources"):
        for source in meta.get(key, []) if isinstance(meta.get(key, []), list) else []:
            if not isinstance(source, str) or not _SLUG.match(source):
                problems.append(f"{key} entry {source!r} must be 'owner/slug'")
    if not str(meta.get("code_file", "")).endswith(".ipynb"):
        problems.append("code_file must name the notebook (.ipynb)")
    return problems


def check_all_metadata(root: Path = METADATA_DIR) -> dict[str, list[str]]:
    """Validate every dataset-metadata.json and kernel-metadata.json under `root`."""
    require_checkout()
    results = {}
    for path in sorted(root.rglob("dataset-metadata.json")):
        results[str(path.relative_to(root))] = validate_dataset_metadata(read_json(path))
    for path in sorted(root.rglob("kernel-metadata.json")):
        meta = read_json(path)
        problems = validate_kernel_metadata(meta)
        code = NOTEBOOKS_DIR / Path(meta.get("code_file", "")).name
        if not code.is_file():
            problems.append(f"notebook {code.name} does not exist in notebooks/")
        results[str(path.relative_to(root))] = problems
    return results


def build_wheel(out_dir: Path) -> Path:
    """Build the package wheel with the installed setuptools (no network, no build isolation)."""
    require_checkout()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # build from a copy so the repo gets no build/ or egg-info droppings
        src = Path(tmp) / "src"
        shutil.copytree(REPO_ROOT, src, ignore=shutil.ignore_patterns(
            ".git", "__pycache__", "*.egg-info", "build", "dist", "mdgen_runs", ".pytest_cache", "*.ipynb_checkpoints"))
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
               "-q", "-w", str(out_dir), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise MdgenError(f"building the wheel failed (is setuptools installed?):\n{proc.stderr[-2000:]}")
    wheels = sorted(out_dir.glob("mdgen_helpers-*.whl"))
    if not wheels:
        raise MdgenError(f"no wheel appeared in {out_dir}")
    return wheels[-1]


def build_bundle(out: str | Path, owner: str | None = None) -> Path:
    """Folder ready for `kaggle datasets create -p OUT -r tar`: wheel, source copy, metadata, marker.

    Install on Kaggle (no internet needed): `pip install --no-index --no-deps /kaggle/input/<slug>/*.whl`
    or put `<bundle>/src` on sys.path.
    """
    require_checkout()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / BUNDLE_MARKER).exists():
        raise MdgenError(f"{out} exists and is not an mdgen bundle folder; choose an empty --out")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    wheel = build_wheel(out)
    shutil.copytree(REPO_ROOT / "mdgen_helpers", out / "src" / "mdgen_helpers",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO_ROOT / "requirements.txt", out / "requirements.txt")
    meta = read_json(METADATA_DIR / "mdgen-helpers" / "dataset-metadata.json")
    if owner:
        meta["id"] = f"{owner}/{meta['id'].split('/', 1)[1]}"
    problems = validate_dataset_metadata(meta)
    if problems:
        raise KaggleMetadataError("; ".join(problems))
    atomic_write_json(out / "dataset-metadata.json", meta)
    atomic_write_json(out / BUNDLE_MARKER, {"package": "mdgen_helpers", "version": __version__, "wheel": wheel.name})
    return out


def build_kernel(notebook: str, out: str | Path, owner: str | None = None) -> Path:
    """Push-ready folder for `kaggle kernels push -p OUT`: the notebook + its kernel-metadata.json."""
    nb, meta_path = find_notebook(notebook)
    meta = read_json(meta_path)
    if owner:
        meta["id"] = f"{owner}/{meta['id'].split('/', 1)[1]}"
        for key in ("dataset_sources", "kernel_sources"):
            meta[key] = [f"{owner}/{s.split('/', 1)[1]}" for s in meta.get(key, [])]
    meta["code_file"] = nb.name
    problems = validate_kernel_metadata(meta)
    if problems:
        raise KaggleMetadataError("; ".join(problems))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(nb, out / nb.name)
    atomic_write_json(out / "kernel-metadata.json", meta)
    return out


def add_cli_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="kaggle_command", required=True)
    p = sub.add_parser("bundle", help="build the helper-package dataset folder (wheel + source + metadata)")
    p.add_argument("--out", required=True, help="output folder (then: kaggle datasets create -p OUT -r tar)")
    p.add_argument("--owner", help="your Kaggle user name (replaces the owner in dataset-metadata.json)")
    p = sub.add_parser("kernel", help="build a push-ready folder for one notebook")
    p.add_argument("--notebook", required=True, help="notebook number or name, e.g. 02")
    p.add_argument("--out", required=True)
    p.add_argument("--owner", help="your Kaggle user name")
    sub.add_parser("check", help="validate every metadata file under kaggle_datasets/")
    from mdgen_helpers import kaggle_session

    kaggle_session.add_cli_arguments(sub)
    p = sub.add_parser("env", help="print the environment summary and the inputs found")
    p.add_argument("--input_root", action="append", help="folder(s) to search for inputs (default /kaggle/input)")


def cli_main(args) -> int:
    if args.kaggle_command == "bundle":
        out = build_bundle(args.out, args.owner)
        print(f"bundle ready in {out}\nupload: kaggle datasets create -p {out} -r tar   "
              "(-r tar: the default 'skip' mode drops sub-folders)")
    elif args.kaggle_command == "kernel":
        out = build_kernel(args.notebook, args.out, args.owner)
        print(f"kernel folder ready in {out}\npush: kaggle kernels push -p {out}")
    elif args.kaggle_command == "check":
        results = check_all_metadata()
        bad = {k: v for k, v in results.items() if v}
        for name, problems in results.items():
            print(f"{'FAIL' if problems else 'ok  '} {name}" + "".join(f"\n     - {p}" for p in problems))
        return 1 if bad else 0
    elif args.kaggle_command == "emulate":
        from mdgen_helpers import kaggle_session

        return kaggle_session.cli_main(args)
    elif args.kaggle_command == "env":
        print(env.summary())
        for kind, paths in env.find_inputs(args.input_root).items():
            print(f"{kind:10s}: {', '.join(map(str, paths)) or '-'}")
    return 0
