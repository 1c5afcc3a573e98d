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
from mdgen_helpers.files import atomic_write_json, read_json
from mdgen_helpers.train import TrainConfig, TrainConfigError, train


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
        except (RuntimeError, ValueError) as e:
            if "initialized" not in str(e).lower() and "initialised" not in str(e).lower():
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
    base = TrainConfig.from_json(read_json(args.config)).to_json() if args.config else TrainConfig().to_json()
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
        config_path = atomic_write_json(out / "train_config.json", cfg.to_json())
        cmd = _accelerate_launch_cmd(config_path, cfg.devices)
        print("re-launching: " + " ".join(cmd), flush=True)
        return subprocess.call(cmd, env=_child_env())
    result = train(cfg)
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=2))
    return 0
