"""Throughput of LightningDiT presets: one training step and one guided sampling step.

    python benchmarks/bench_dit.py --presets tiny S/2 --batch-sizes 64

Training step = flow-matching loss forward + backward + AdamW step, reported as samples/s.
Sampling step = one classifier-free-guided velocity at batch B, i.e. ONE forward of 2B latents
(conditional + unconditional), reported as per-sample model evaluations per second (NFE/s) and
as images/s for a 50-step guided Euler run. On CUDA it runs under autocast (bf16 when compute
capability >= 8.0, else fp16 with a GradScaler -- a T4 has no bf16) and reports peak memory and
model FLOP utilisation (MFU) from an analytic FLOP count; on the CPU it reports achieved GFLOP/s.
Figures on a shared CPU are noisy: other processes compete for the cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdgen_helpers import dit, flow  # noqa: E402

# Dense tensor-core peak FLOP/s for the autocast dtype (vendor datasheets, no sparsity).
PEAK_FLOPS = {"T4": 65e12, "A100": 312e12, "H100": 989e12, "H200": 989e12, "L4": 121e12,
              "A10": 125e12, "V100": 125e12, "P100": 18.7e12, "4090": 165e12, "3090": 71e12}


def forward_flops_per_sample(cfg: dict) -> float:
    """Multiply-adds x 2 of one forward pass on one latent (biases, norms, softmax ignored)."""
    D, p, C, L = cfg["hidden_size"], cfg["patch_size"], cfg["in_channels"], cfg["depth"]
    N = (cfg["input_size"] // p) ** 2
    Hm = int(D * cfg["mlp_ratio"])
    mlp = 2 * N * D * (3 * int(2 / 3 * Hm)) if cfg["use_swiglu"] else 2 * N * D * 2 * Hm
    ada = 2 * D * (4 if cfg["wo_shift"] else 6) * D
    block = 2 * N * D * 3 * D + 2 * 2 * N * N * D + 2 * N * D * D + mlp + ada
    embed = 2 * N * C * p * p * D + 2 * 256 * D + 2 * D * D
    final = 2 * N * D * p * p * C * (2 if cfg["learn_sigma"] else 1) + 2 * D * 2 * D
    return float(L * block + embed + final)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def bench_one(preset: str, batch: int, device: torch.device, num_classes: int, warmup: int, iters: int) -> dict:
    torch.manual_seed(0)
    model = dit.build_model(preset, num_classes=num_classes).to(device)
    cfg = dit.model_config(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95))
    amp_dtype = None
    if device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    fp16 = amp_dtype == torch.float16
    # torch >= 2.3 spells it torch.amp.GradScaler("cuda"); older releases torch.cuda.amp.GradScaler.
    scaler = torch.amp.GradScaler("cuda", enabled=fp16) if hasattr(torch.amp, "GradScaler") else \
        torch.cuda.amp.GradScaler(enabled=fp16)
    g = torch.Generator(device=device).manual_seed(0)
    x1 = torch.randn(batch, cfg["in_channels"], cfg["input_size"], cfg["input_size"], device=device, generator=g)
    y = torch.randint(0, num_classes, (batch,), device=device, generator=g)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def train_step():
        model.train()
        with autocast():
            loss = flow.flow_matching_loss(model, x1, y, generator=g, time_dist="logit_normal").mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    vf = None

    def sample_step():
        with torch.no_grad(), autocast():
            vf(x1, torch.full((batch,), 0.5, device=device))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_train = _timed(train_step, device, warmup, iters)
    mem_train = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    model.eval()
    vf = flow.guided_velocity(model, y, 4.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_sample = _timed(sample_step, device, warmup, iters)
    mem_sample = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    f = forward_flops_per_sample(cfg)
    train_flops = 3 * f * batch / t_train  # backward ~ 2x forward
    sample_flops = f * 2 * batch / t_sample
    out = dict(
        preset=preset, batch=batch, device=str(device), params_M=round(dit.count_parameters(model) / 1e6, 2),
        amp=str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
        train_step_s=round(t_train, 4), train_samples_per_s=round(batch / t_train, 2),
        guided_step_s=round(t_sample, 4), sample_nfe_per_s=round(2 * batch / t_sample, 1),
        images_per_s_50_steps=round(batch / (50 * t_sample), 3),
        fwd_gflop_per_sample=round(f / 1e9, 3),
        train_gflops=round(train_flops / 1e9, 1), sample_gflops=round(sample_flops / 1e9, 1),
    )
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        out.update(gpu=name, peak_mem_train_GiB=round(mem_train, 2), peak_mem_sample_GiB=round(mem_sample, 2),
                   train_mfu=round(train_flops / peak, 3) if peak else None,
                   sample_mfu=round(sample_flops / peak, 3) if peak else None)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "S/2"], choices=sorted(dit.PRESETS))
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[64])
    ap.add_argument("--num-classes", type=int, default=8, help="number of users (label table size)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, device {device}, CPU threads {torch.get_num_threads()}")
    results = []
    for preset in args.presets:
        for b in args.batch_sizes:
            r = bench_one(preset, b, device, args.num_classes, args.warmup, args.iters)
            results.append(r)
            print(json.dumps(r), flush=True)
    if args.json:
        from mdgen_helpers.files import atomic_write_json

        atomic_write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
