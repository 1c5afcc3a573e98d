"""Where are we running, and what should we do about it?

Kaggle-specific facts this module encodes (each learnt the hard way):
- Datasets mount at `/kaggle/input/<slug>` on older images and at
  `/kaggle/input/datasets/<owner>/<slug>` on newer ones, so inputs are found by marker files
  (what a folder contains), never by hard-coded paths.
- A T4 (compute capability 7.5) has no native bf16, although `torch.cuda.is_bf16_supported()`
  may say otherwise: precision is chosen from the compute capability (>= 8.0 -> bf16, else fp16).
- `accelerate.notebook_launcher` with torch >= 2.9 needs accelerate >= 1.14, and it refuses to
  start once CUDA is initialised in the notebook process; the subprocess path
  (`accelerate launch`) works everywhere.
- /kaggle/working holds 20 GB; we warn before it is full rather than lose a checkpoint mid-write.
Everything here works unchanged on a laptop (no GPU, no /kaggle).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")
KAGGLE_WORKING_LIMIT_GB = 20.0

# What identifies each kind of input (see kaggle_datasets/README.md for how each is produced).
MARKERS = {
    "helpers": "mdgen_bundle.json",          # helper package bundle (wheel + source)
    "split": "split.json",                   # notebook 01's persisted split (a file)
    "latents": "stats.safetensors",          # extraction output directory
    "checkpoint": "ema.safetensors",         # training run directory
    "generated": "manifest.json",            # notebook 03's generated set
    "data": "ID_1",                          # a data set with ID_k (or ID_0k) user folders
}
DATA_FOLDER = re.compile(r"^ID_0*1$")        # the first user's folder: ID_1, ID_01, ID_001
VAVAE_SUFFIXES = (".pt", ".ckpt", ".safetensors")


@dataclass
class GpuInfo:
    index: int
    name: str
    capability: tuple[int, int]
    memory_gb: float


@dataclass
class EnvInfo:
    on_kaggle: bool
    python: str
    torch: str
    accelerate: str
    gpus: list[GpuInfo] = field(default_factory=list)
    precision: str = "no"
    launcher: str = "in-process"
    launcher_reason: str = ""
    working_dir: str = "."
    working_free_gb: float | None = None
    working_used_gb: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def on_kaggle() -> bool:
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE")) or KAGGLE_WORKING.is_dir()


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def gpu_info() -> list[GpuInfo]:
    """GPU list without initialising CUDA in this process where avoidable.

    `torch.cuda.device_count()` uses NVML and leaves CUDA uninitialised, but
    `get_device_properties` initialises it; notebook_launcher needs an uninitialised parent, so
    we read properties through NVML when the parent must stay clean.
    """
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    count = torch.cuda.device_count()
    try:
        import pynvml  # shipped with the CUDA builds of torch on Kaggle as nvidia-ml-py

        pynvml.nvmlInit()
        for i in range(count):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30
            gpus.append(GpuInfo(i, name, (int(major), int(minor)), round(mem, 1)))
        return gpus
    except Exception:
        pass
    for i in range(count):
        p = torch.cuda.get_device_properties(i)
        gpus.append(GpuInfo(i, p.name, (p.major, p.minor), round(p.total_memory / 2**30, 1)))
    return gpus


def mixed_precision_for(capability: tuple[int, int]) -> str:
    """'bf16' on CUDA compute capability >= 8.0 (A100, H100, ...), 'fp16' below (T4 is 7.5, P100 6.0).

    The one place this rule lives: `torch.cuda.is_bf16_supported()` says True on a T4, where bf16
    is emulated and slow, so it is never consulted.
    """
    return "bf16" if tuple(capability) >= (8, 0) else "fp16"


def choose_precision(gpus: list[GpuInfo] | None = None) -> str:
    """Accelerate mixed-precision mode: 'bf16' on compute capability >= 8.0, 'fp16' on older GPUs
    (T4, P100, V100: with a grad scaler), 'no' (fp32) on CPU.

    Decided by compute capability, never by `torch.cuda.is_bf16_supported()`, which reports True
    on a T4 where bf16 is emulated and slow.
    """
    gpus = gpu_info() if gpus is None else gpus
    if not gpus:
        return "no"
    return mixed_precision_for(min(g.capability for g in gpus))


def notebook_launcher_status(num_processes: int) -> tuple[str, str]:
    """('in-process' | 'notebook_launcher' | 'subprocess', reason) for training from a notebook."""
    import accelerate
    import torch

    if num_processes <= 1:
        return "in-process", "one process: training runs in this kernel"
    if on_kaggle():
        return "subprocess", ("on Kaggle: `accelerate launch` in a subprocess (notebook_launcher has failed there "
                              "with 'CUDA error: initialization error' on images whose accelerate/torch pair looks fine)")
    torch_v, acc_v = _version_tuple(torch.__version__), _version_tuple(accelerate.__version__)
    if torch_v >= (2, 9) and acc_v < (1, 14):
        return "subprocess", (
            f"accelerate {accelerate.__version__} predates the notebook_launcher fix for torch "
            f"{torch.__version__} (needs accelerate >= 1.14): using `accelerate launch` in a subprocess"
        )
    if torch.cuda.is_initialized():
        return "subprocess", (
            "CUDA is already initialised in this kernel (a cell touched the GPU), which "
            "notebook_launcher refuses: using `accelerate launch` in a subprocess"
        )
    return "notebook_launcher", f"accelerate {accelerate.__version__} + torch {torch.__version__}: notebook_launcher"


_IMPORTED_AT = time.time()


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_average() -> float:
    """The 1-minute load average (0 where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def cpu_thread_policy(environ=None, load: float | None = None) -> dict[str, str]:
    """OpenMP threads for a CPU run that may share its machine: one per usable core that no other
    process is busy on (1-minute load average), with the default wait policy. Why, measured
    (benchmarks/bench_threads.py, the demo's training step, 2 cores): 2 threads run 273 samples/s
    quiet but 12.5 with one busy neighbour (their spin-waits lose the contested core: 22x
    slower), 1 thread runs 156 either way, and PASSIVE waits give 139 loaded but cost 44% quiet.
    Values the user already set are kept."""
    environ = os.environ if environ is None else environ
    cores = usable_cores()
    load = load_average() if load is None else load
    busy = min(cores - 1, max(0, int(round(load))))
    return {"OMP_NUM_THREADS": environ.get("OMP_NUM_THREADS", str(cores - busy))}


def session_start() -> float:
    """When this session began (epoch seconds): the start of this process (on Kaggle the kernel, which
    starts with the session), read from /proc; the time this module was imported where /proc is absent.
    Kaggle's 12-hour limit counts from here, not from when training starts."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return min(boot + ticks / os.sysconf("SC_CLK_TCK"), _IMPORTED_AT)
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT


def disk_usage(path: str | os.PathLike) -> tuple[float, float]:
    """(used_gb, free_gb) of the tree at `path` and its file system."""
    path = Path(path)
    used = 0
    if path.is_dir():
        for root, _, files in os.walk(path):
            for f in files:
                try:
                    used += os.path.getsize(os.path.join(root, f))
                except OSError:
                    pass
    free = shutil.disk_usage(path if path.exists() else Path.cwd()).free
    return used / 2**30, free / 2**30


def check_working_space(path: str | os.PathLike = KAGGLE_WORKING, limit_gb: float = KAGGLE_WORKING_LIMIT_GB,
                        warn_fraction: float = 0.85) -> str | None:
    """A warning string when the output folder nears Kaggle's 20 GB limit, else None."""
    if not Path(path).exists():
        return None
    used, free = disk_usage(path)
    if used >= warn_fraction * limit_gb or free < 2.0:
        return (f"{path} holds {used:.1f} GB of its {limit_gb:.0f} GB limit ({free:.1f} GB free on disk): "
                "delete old checkpoints (train --keep_last) or previews before the next save")
    return None


def find_inputs(roots: list[str | os.PathLike] | None = None, max_depth: int = 5) -> dict[str, list[Path]]:
    """Attached inputs by kind, found by marker files under the input roots.

    Works for both Kaggle layouts (`/kaggle/input/<slug>/...` and
    `/kaggle/input/datasets/<owner>/<slug>/...`) and any local folder passed in `roots`.
    Kinds: helpers, latents, checkpoint, generated, data (dirs); split, vavae (files).
    """
    roots = [Path(r) for r in (roots if roots is not None else [KAGGLE_INPUT])]
    found: dict[str, list[Path]] = {k: [] for k in (*MARKERS, "vavae")}
    for root in roots:
        if not root.is_dir():
            continue
        base_depth = len(root.parts)
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            depth = len(here.parts) - base_depth
            names = set(filenames) | set(dirnames)
            for kind, marker in MARKERS.items():
                if kind == "data":
                    if any(DATA_FOLDER.match(d) for d in dirnames):
                        found[kind].append(here)
                elif kind == "split":
                    # notebook 01's split; a data set's own DATA/split.json (from `extract` without --split) is not it
                    if marker in filenames and not any(DATA_FOLDER.match(d) for d in dirnames):
                        found[kind].append(here / marker)
                elif marker in names:
                    found[kind].append(here)
            for f in filenames:
                low = f.lower()
                if "vavae" in low and low.endswith(VAVAE_SUFFIXES):
                    found["vavae"].append(here / f)
            # do not descend into data sets, run or generated folders: they can hold thousands of files
            # (and a generated set's dataset/ID_k copy is not a real data set)
            if depth >= max_depth or any(here in found[k] for k in ("data", "latents", "checkpoint", "generated")):
                dirnames[:] = []
            dirnames.sort()
    return {k: sorted(set(v)) for k, v in found.items()}


def detect(working_dir: str | os.PathLike | None = None, num_processes: int | None = None) -> EnvInfo:
    import platform

    import accelerate
    import torch

    gpus = gpu_info()
    nproc = num_processes if num_processes is not None else max(1, len(gpus))
    launcher, reason = notebook_launcher_status(nproc)
    wd = Path(working_dir) if working_dir else (KAGGLE_WORKING if on_kaggle() else Path.cwd())
    used, free = disk_usage(wd) if wd.exists() and on_kaggle() else (None, shutil.disk_usage(Path.cwd()).free / 2**30)
    return EnvInfo(
        on_kaggle=on_kaggle(), python=platform.python_version(), torch=torch.__version__,
        accelerate=accelerate.__version__, gpus=gpus, precision=choose_precision(gpus),
        launcher=launcher, launcher_reason=reason, working_dir=str(wd),
        working_free_gb=None if free is None else round(free, 1),
        working_used_gb=None if used is None else round(used, 2),
    )


def default_profile_name(info: EnvInfo | None = None) -> str:
    """kaggle-t4x2 on a GPU machine, cpu-demo elsewhere."""
    info = info or detect()
    return "kaggle-t4x2" if info.gpus else "cpu-demo"


def summary(info: EnvInfo | None = None) -> str:
    """The one environment summary printed at the top of every notebook."""
    info = info or detect()
    lines = [
        f"platform   : {'Kaggle' if info.on_kaggle else 'local'} (python {info.python}, torch {info.torch}, accelerate {info.accelerate})",
    ]
    if info.gpus:
        for g in info.gpus:
            lines.append(f"gpu {g.index}      : {g.name}, compute capability {g.capability[0]}.{g.capability[1]}, {g.memory_gb} GB")
    else:
        lines.append("gpu        : none (CPU run: use the cpu-smoke / cpu-demo profiles)")
    lines.append(f"precision  : {info.precision} (chosen by compute capability)")
    lines.append(f"training   : {info.launcher} - {info.launcher_reason}")
    if info.working_free_gb is not None:
        used = f"{info.working_used_gb} GB used, " if info.working_used_gb is not None else ""
        lines.append(f"working dir: {info.working_dir} ({used}{info.working_free_gb} GB free)")
    warning = check_working_space(info.working_dir) if info.on_kaggle else None
    if warning:
        lines.append(f"WARNING    : {warning}")
    return "\n".join(lines)
