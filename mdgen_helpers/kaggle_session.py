"""A Kaggle session emulator: run one notebook as Kaggle's headless "Save & Run All" would.

    python -m mdgen_helpers kaggle emulate --notebook 01 --attach mdgen-helpers=build/mdgen-helpers \\
        --attach micro-doppler-data=data/sim --outputs build/kaggle-outputs --set MDGEN_PROFILE=cpu-smoke

What the kernel sees, in a private mount namespace (root and `unshare` needed; elsewhere the
emulator says why it cannot run):
- `/kaggle/input/...` built from the kernel metadata's `dataset_sources` and `kernel_sources`,
  read-only, in either mount layout: `flat` (`/kaggle/input/<slug>`) or `nested`
  (`/kaggle/input/datasets/<owner>/<slug>`, kernel outputs under `notebooks/<owner>/<slug>`);
- an empty `/kaggle/working` (the kernel's cwd), published afterwards as the kernel's output to
  `OUTPUTS/<kernel-slug>/`, where the next notebook's `kernel_sources` find it;
- no repository checkout and no installed `mdgen_helpers`: the checkout and the editable
  install's target are hidden under empty read-only mounts and its `.pth` finder files under
  /dev/null, and the kernel's Python is checked to be unable to import it before the run (the
  attached bundle is the only way in);
- a clean environment with `KAGGLE_KERNEL_RUN_TYPE=Batch` plus the `--set` parameters (what a
  user types into the parameters cell), and no network (its own network namespace, loopback only).
The host is not touched, except for creating an empty `/kaggle` mount point when it is missing.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import site
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mdgen_helpers.errors import MdgenError
from mdgen_helpers.files import read_json

LAYOUTS = ("flat", "nested")
PASS_THROUGH_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LANG")

# Executes the notebook inside the session with the system Python (never with mdgen_helpers).
_RUNNER = r'''
import sys, nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
src, dst, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3])
nb = nbformat.read(src, as_version=4)
n = sum(c.cell_type == "code" for c in nb.cells)
done = [0]
def tick(**kw):
    done[0] += 1
    print(f"[session] cell {done[0]}/{n} done", flush=True)
client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                        resources={"metadata": {"path": "/kaggle/working"}}, on_cell_executed=tick)
rc = 0
try:
    client.execute()
except CellExecutionError as e:
    rc = 1
    print("[session] FAILED:\n" + str(e)[-4000:], flush=True)
nbformat.write(nb, dst)
sys.exit(rc)
'''


class EmulatorUnavailable(MdgenError):
    """This machine cannot build the session (not root, no unshare, no mount namespaces)."""


@dataclass
class SessionResult:
    kernel: str                  # owner/slug from the kernel metadata
    ok: bool
    seconds: float
    executed: Path               # the executed notebook (also kept when it failed)
    published: Path | None       # OUTPUTS/<slug>: /kaggle/working after the run (None when it failed)
    mounts: dict[str, str] = field(default_factory=dict)   # /kaggle/input/... -> host folder
    not_attached: list[str] = field(default_factory=list)  # metadata sources with no folder given
    log: str = ""                # the tail of the session's output (the failing cell's error)


def available() -> tuple[bool, str]:
    """(True, '') when mount namespaces work here, else (False, the reason)."""
    if os.name != "posix" or os.geteuid() != 0:
        return False, "the Kaggle session emulator needs root (bind mounts in a private mount namespace)"
    for tool in ("unshare", "mount", "ip"):
        if shutil.which(tool) is None:
            return False, f"the Kaggle session emulator needs `{tool}` (util-linux / iproute2)"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "--net", "sh", "-c",
                            "ip link set lo up && mount -t tmpfs tmpfs /mnt"], capture_output=True, text=True)
    if probe.returncode != 0:
        return False, f"mount/network namespaces are not permitted here: {probe.stderr.strip()[:200]}"
    return True, ""


def mount_path(source: str, kind: str, layout: str) -> str:
    """Where Kaggle mounts `owner/slug` under /kaggle/input in a layout ('dataset' or 'kernel')."""
    owner, slug = source.split("/", 1)
    if layout == "flat":
        return slug
    return f"{'datasets' if kind == 'dataset' else 'notebooks'}/{owner}/{slug}"


def _hidden_paths() -> tuple[list[Path], list[Path]]:
    """Folders and files that would let the kernel import mdgen_helpers without the bundle:
    this checkout, the editable install's target, and the editable install's .pth/finder files."""
    from mdgen_helpers import kaggle

    dirs = {kaggle.REPO_ROOT}
    files = set()
    for sp in {*site.getsitepackages(), site.getusersitepackages()}:
        sp = Path(sp)
        if not sp.is_dir():
            continue
        for f in sp.glob("__editable__*mdgen_helpers*"):
            files.add(f)
            if f.suffix == ".pth":
                for line in f.read_text().splitlines():
                    if line.strip() and not line.startswith(("import", "#")) and Path(line.strip()).is_dir():
                        dirs.add(Path(line.strip()))
        for f in sp.glob("*.egg-link"):
            if "mdgen" in f.name:
                files.add(f)
                dirs.add(Path(f.read_text().splitlines()[0].strip()))
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; s = u.find_spec('mdgen_helpers'); "
                            "print(s.origin if s and s.origin else '')"], capture_output=True, text=True,
                           cwd="/", env={"PATH": os.environ.get("PATH", "")})
    origin = probe.stdout.strip()
    if origin:
        pkg_parent = Path(origin).resolve().parents[1]
        if (pkg_parent / "pyproject.toml").is_file():  # an editable checkout, not site-packages
            dirs.add(pkg_parent)
    dirs = {d.resolve() for d in dirs}
    # hide the outermost folders only (a mount inside a hidden folder would fail)
    dirs = sorted(d for d in dirs if not any(o != d and o in d.parents for o in dirs))
    return dirs, sorted(files)


def _namespace_script(mounts: dict[str, Path], working: Path, hide_dirs, hide_files, kernel_env: dict[str, str],
                      runner: Path, src: Path, dst: Path, timeout: int) -> str:
    q = shlex.quote
    lines = ["set -eu", "ip link set lo up",
             "mount -t tmpfs -o mode=0755 tmpfs /kaggle", "mkdir -p /kaggle/input /kaggle/working"]
    for rel, host in mounts.items():
        target = q(f"/kaggle/input/{rel}")
        lines += [f"mkdir -p {target}", f"mount --bind {q(str(host))} {target}",
                  f"mount -o remount,bind,ro {target}"]
    lines += [f"mount --bind {q(str(working))} /kaggle/working", "mount -o remount,ro /kaggle"]
    for d in hide_dirs:
        lines.append(f"mount -t tmpfs -o ro,size=4k,mode=0555 tmpfs {q(str(d))}")
    for f in hide_files:
        lines.append(f"mount --bind /dev/null {q(str(f))}")
    env_args = " ".join(q(f"{k}={v}") for k, v in kernel_env.items())
    py = q(sys.executable)
    lines += [
        "cd /kaggle/working",
        # the proof that the bundle is the only way in: this Python cannot import mdgen_helpers
        f"env -i {env_args} {py} -c \"import importlib.util as u, sys; s = u.find_spec('mdgen_helpers'); "
        "sys.exit(f'[session] mdgen_helpers is importable from {s.origin} without the bundle: cannot emulate Kaggle') "
        "if s else None\"",
        f"exec env -i {env_args} {py} {q(str(runner))} {q(str(src))} {q(str(dst))} {int(timeout)}",
    ]
    return "\n".join(lines)


def _publish(working: Path, dest: Path) -> Path:
    """Copy the session's /kaggle/working to OUTPUTS/<slug>, replacing the previous version whole."""
    tmp = dest.with_name(f".{dest.name}.new")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(working, tmp, symlinks=True)
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def emulate(notebook: str | Path, outputs: str | Path, attach: dict[str, str | Path] | None = None,
            params: dict[str, str] | None = None, layout: str = "flat", metadata: dict | None = None,
            timeout: int = 1800, echo: bool = True) -> SessionResult:
    """Run `notebook` (a number like '02', or a path with `metadata`) in an emulated Kaggle session.

    `attach` maps a source (`owner/slug` or `slug`) to a host folder; a kernel source with no
    entry is taken from `OUTPUTS/<slug>` when an earlier session published it there. Entries that
    the metadata does not list are attached too, as a user adds inputs in the editor (e.g. notebook
    02's own previous output, to resume). `params` become the kernel's environment variables.
    """
    from mdgen_helpers import kaggle

    ok, reason = available()
    if not ok:
        raise EmulatorUnavailable(reason)
    if layout not in LAYOUTS:
        raise MdgenError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if metadata is None:
        nb_path, meta_path = kaggle.find_notebook(str(notebook))
        metadata = read_json(meta_path)
    else:
        nb_path = Path(notebook)
    outputs = Path(outputs).resolve()
    outputs.mkdir(parents=True, exist_ok=True)
    attach = {k: Path(v).resolve() for k, v in (attach or {}).items()}
    owner = metadata["id"].split("/", 1)[0]

    def full(name: str) -> str:
        return name if "/" in name else f"{owner}/{name}"

    given = {full(k): v for k, v in attach.items()}
    for name, folder in given.items():
        if not folder.is_dir():
            raise MdgenError(f"--attach {name}={folder}: no such folder")
    mounts, not_attached = {}, []
    sources = [(s, "dataset") for s in metadata.get("dataset_sources", [])]
    sources += [(s, "kernel") for s in metadata.get("kernel_sources", [])]
    listed = {s for s, _ in sources}
    sources += [(s, "kernel" if (outputs / s.split("/", 1)[1]).is_dir() else "dataset") for s in given if s not in listed]
    for source, kind in sources:
        folder = given.get(source)
        if folder is None and kind == "kernel" and (outputs / source.split("/", 1)[1]).is_dir():
            folder = outputs / source.split("/", 1)[1]
        if folder is None:
            not_attached.append(source)
            continue
        mounts[mount_path(source, kind, layout)] = folder

    slug = metadata["id"].split("/", 1)[1]
    Path("/kaggle").mkdir(exist_ok=True)  # the mount point; stays empty on the host
    stage = Path(tempfile.mkdtemp(prefix=f"kaggle-session-{slug}-"))
    try:
        working, home = stage / "working", stage / "home"
        working.mkdir()
        home.mkdir()
        src = stage / nb_path.name
        shutil.copy2(nb_path, src)
        runner = stage / "run_notebook.py"
        runner.write_text(_RUNNER)
        executed = outputs / f"{slug}.ipynb"
        kernel_env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home),
                      "KAGGLE_KERNEL_RUN_TYPE": "Batch", "PYTHONDONTWRITEBYTECODE": "1"}
        kernel_env.update({k: os.environ[k] for k in PASS_THROUGH_ENV if k in os.environ})
        kernel_env.update({k: str(v) for k, v in (params or {}).items()})
        hide_dirs, hide_files = _hidden_paths()
        script = _namespace_script(mounts, working, hide_dirs, hide_files, kernel_env, runner, src,
                                   stage / "executed.ipynb", timeout)
        if echo:
            print(f"[session] {metadata['id']} ({nb_path.name}), layout {layout}")
            for rel, host in mounts.items():
                print(f"[session]   /kaggle/input/{rel}  <-  {host}")
            for source in not_attached:
                print(f"[session]   not attached: {source}")
        start = time.perf_counter()
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--net", "bash", "-c", script],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            tail = (tail + [line])[-200:]
            if echo:
                print(line, end="", flush=True)
        rc = proc.wait()
        seconds = time.perf_counter() - start
        if (stage / "executed.ipynb").is_file():
            shutil.copy2(stage / "executed.ipynb", executed)
        published = _publish(working, outputs / slug) if rc == 0 else None
        if echo:
            print(f"[session] {'published ' + str(published) if published else 'FAILED (nothing published)'} "
                  f"after {seconds:.0f} s")
        return SessionResult(kernel=metadata["id"], ok=rc == 0, seconds=seconds, executed=executed,
                             published=published, mounts={k: str(v) for k, v in mounts.items()},
                             not_attached=not_attached, log="".join(tail))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def add_cli_arguments(sub) -> None:
    p = sub.add_parser("emulate", help="run a notebook in an emulated Kaggle session (root + unshare)")
    p.add_argument("--notebook", required=True, help="notebook number or name, e.g. 01")
    p.add_argument("--outputs", required=True,
                   help="folder of published kernel outputs: OUTPUTS/<slug>/ is this run's /kaggle/working, "
                        "and later notebooks' kernel_sources are attached from it")
    p.add_argument("--attach", action="append", default=[], metavar="SOURCE=DIR",
                   help="attach a folder as a source (slug or owner/slug), e.g. mdgen-helpers=build/mdgen-helpers")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a parameter for the kernel's environment, e.g. MDGEN_PROFILE=cpu-smoke")
    p.add_argument("--layout", choices=LAYOUTS, default="flat",
                   help="flat: /kaggle/input/<slug>; nested: /kaggle/input/datasets/<owner>/<slug>")
    p.add_argument("--timeout", type=int, default=1800, help="per-cell timeout in seconds")


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise MdgenError(f"{flag} expects NAME=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = value
    return out


def cli_main(args) -> int:
    result = emulate(args.notebook, args.outputs, _pairs(args.attach, "--attach"), _pairs(args.set, "--set"),
                     layout=args.layout, timeout=args.timeout)
    print(json.dumps({"kernel": result.kernel, "ok": result.ok, "seconds": round(result.seconds, 1),
                      "published": str(result.published) if result.published else None,
                      "executed": str(result.executed), "not_attached": result.not_attached}, indent=1))
    return 0 if result.ok else 1
