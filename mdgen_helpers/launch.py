"""How training runs: in this process, through `accelerate.notebook_launcher`, or as an
`accelerate launch` subprocess; and the `train` command line, which picks among them.

    python -m mdgen_helpers train --latent_dir WORK/latents --output_dir RUN \
        --batch_size 32 --max_epochs 100 --lr 1e-4 --devices 2 --precision 16-mixed

`--devices N > 1` outside a launcher re-runs the same command under `accelerate launch` with
the settings written to RUN/train_config.json; `launch_training` is the notebooks' entry and
prints which path it took and why.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from accelerate import notebook_launcher
from accelerate.state import AcceleratorState

from mdgen_helpers.env import notebook_launcher_status
from mdgen_helpers.errors import MdgenError
from mdgen_helpers.files import atomic_write_json, json_safe, read_json
from mdgen_helpers.settings import TrainConfig, TrainConfigError, add_arguments, apply, given
from mdgen_helpers.train import train


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
    return read_json(p)


def launcher_refused(error: BaseException) -> bool:
    """Whether notebook_launcher failed because of CUDA state in the parent (then the subprocess works):
    'CUDA has been initialized', or the forked workers' 'CUDA error: initialization error'."""
    text = str(error).lower()
    return any(s in text for s in ("initialized", "initialised", "initialization error"))


def launch_training(cfg: TrainConfig, num_processes: int | None = None) -> dict:
    """Train from a notebook on `num_processes` GPUs (default: cfg.devices), choosing how:

    - 1 process, or no CUDA: `train(cfg)` in this kernel;
    - several GPUs, accelerate >= 1.14 with torch >= 2.9 (or older torch) and CUDA not yet
      initialised here: `accelerate.notebook_launcher` (forks this kernel);
    - otherwise: `accelerate launch -m mdgen_helpers train --config RUN/train_config.json` in a
      subprocess whose output is streamed here.
    The chosen path and why are printed; the summary is read back from RUN/result.json."""
    n = int(num_processes or cfg.devices or 1)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() and not cfg.cpu else 0
    if n <= 1 or gpus == 0:
        print("launch_training: one process in this kernel" + ("" if n <= 1 else " (no CUDA GPU; --devices ignored)"))
        return train(dataclasses.replace(cfg, devices=1))
    if n > gpus:
        raise TrainConfigError(f"{n} processes requested but only {gpus} GPU(s) are visible")
    how, why = notebook_launcher_status(n)
    if how == "notebook_launcher" and AcceleratorState._shared_state:
        how, why = "subprocess", ("an Accelerator already exists in this kernel, which notebook_launcher refuses: "
                                  "using `accelerate launch` in a subprocess")
    print(f"launch_training: {how} - {why}")
    cfg = dataclasses.replace(cfg, devices=n)
    if how == "notebook_launcher":
        try:
            notebook_launcher(train, (cfg,), num_processes=n)
            return _read_result(Path(cfg.output_dir))
        except Exception as e:
            if not launcher_refused(e):
                raise
            print(f"launch_training: notebook_launcher refused ({str(e)[:200]}); falling back to a subprocess")
    out = Path(cfg.output_dir)
    config_path = atomic_write_json(out / "train_config.json", cfg.to_json())
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
    parser.add_argument("--config", default=None, help="JSON file of TrainConfig fields (flags given on the command line override it)")
    add_arguments(parser, TrainConfig, types_={"time_dist": {"choices": ["uniform", "logit_normal"]}})


def config_from_args(args) -> TrainConfig:
    """--config (or the defaults) with the flags given on the command line applied."""
    base = TrainConfig.from_json(read_json(args.config)) if args.config else TrainConfig()
    return apply(base, given(args, TrainConfig))


def cli_main(args) -> int:
    cfg = config_from_args(args)
    if cfg.devices > 1 and not _under_launcher():
        cuda = torch.cuda.is_available() and not cfg.cpu
        if not cuda:
            raise TrainConfigError(
                f"--devices {cfg.devices} needs {cfg.devices} CUDA GPUs; none is visible. Use --devices 1 on the CPU."
            )
        out = Path(cfg.output_dir or ".")
        config_path = atomic_write_json(out / "train_config.json", cfg.to_json())
        cmd = _accelerate_launch_cmd(config_path, cfg.devices)
        print("re-launching: " + " ".join(cmd), flush=True)
        return subprocess.call(cmd, env=_child_env())
    result = train(cfg)
    print(json.dumps(json_safe({k: v for k, v in result.items() if k != "losses"}), indent=2))
    return 0
