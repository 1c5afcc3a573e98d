"""The prepared GPU benchmark: one command, under 8 minutes on one modern GPU.

    python benchmarks/bench_gpu.py --out runs/bench_gpu      # on a GPU machine
    python benchmarks/bench_gpu.py --smoke --out /tmp/bg     # tiny sizes on the CPU, < 60 s (tests run it)

Writes OUT/bench_gpu.json (every figure) and OUT/bench_gpu.md (the tables). What it measures:

1. Training step, samples/s, peak memory and MFU for S/2, S/1, B/1 at batch 64 in fp16 with a
   GradScaler (the T4 setting) and, on compute capability >= 8.0, bf16; S/2 fp16 also with
   `TrainConfig.compile` (`train.compiled_step_loss`), so the kaggle-t4x2 profile's compile
   choice can be made from data. The step is the training loop's: `train.step_loss` under
   autocast, scaled backward, unscale + clip at 1.0, AdamW, zero_grad.
2. XL/1 forward only (batch 32, autocast dtype of the device): samples/s, peak memory, MFU.
3. A real chain on simulated data: simulate users -> split -> a full-size VA-VAE f16d32 with
   random weights (`vavae.write_random_checkpoint(ch=128)`) -> `latents.extract_latents`
   (images/s) -> 300 steps of `train.train` (Accelerate, EMA, skip logic: the real code path) in
   fp16 with a GradScaler, reporting every non-finite loss and skipped step -> guided sampling of
   the trained EMA through `generate.sample_latents` (Heun, 50 steps, guidance 4: images/s).

MFU (model FLOP utilisation) = achieved model FLOP/s / the GPU's dense fp16/bf16 peak
(`bench_dit.PEAK_FLOPS`, vendor datasheets). Model FLOPs are counted analytically
(`bench_dit.forward_flops_per_sample`): per block, with N tokens, width D, SwiGLU hidden
H = int(2/3 * 4D):
    qkv 2*N*D*3D + attention scores and values 2*2*N*N*D + projection 2*N*D*D
    + SwiGLU 2*N*D*3H + adaLN 2*D*6D,
times depth, plus the patch embedding 2*N*C*p*p*D, the timestep MLP 2*256*D + 2*D*D and the
final layer 2*N*D*p*p*C + 2*D*2D (biases, norms, softmax, RoPE ignored). A training step counts
3x the forward (the backward is ~2x), so train MFU = 3 * F * samples/s / peak.

No GPU was lent to the session that wrote this: the GPU figures are to be filled in by whoever
runs it (benchmarks/README.md says so). `--smoke` runs every code path above on the CPU with a
tiny model, a small VA-VAE (ch=32), a handful of images and steps.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dit import PEAK_FLOPS, forward_flops_per_sample  # noqa: E402
from mdgen_helpers import data, dit, generate, latents, simulate, train, vavae  # noqa: E402
from mdgen_helpers.files import atomic_write_json, atomic_write_text  # noqa: E402
from mdgen_helpers.settings import SamplingSettings, TrainConfig  # noqa: E402
from mdgen_helpers.tokenizers import load_tokenizer  # noqa: E402

NUM_USERS = 31
COSINE = 1.0  # the official loss: MSE + the cosine direction term
# The two sizes: the real benchmark and the CPU smoke run of the same code paths.
FULL = dict(presets=["S/2", "S/1", "B/1"], overrides={}, batch=64, warmup=10, iters=30, forward_preset="XL/1",
            forward_batch=32, users=4, per_user=48, vavae_ch=128, extract_batch=32, extract_workers=2, sim_workers=None,
            train_steps=300,
            train_batch=64, sample_images=64, sample_steps=50, sample_batch=64)
SMOKE = dict(presets=["tiny"], overrides=dict(depth=2, hidden_size=64, num_heads=2), batch=8, warmup=1, iters=2,
             forward_preset="tiny", forward_batch=4, users=2, per_user=6, vavae_ch=32, extract_batch=4, extract_workers=0, sim_workers=1,
             train_steps=6, train_batch=4, sample_images=2, sample_steps=2, sample_batch=2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def amp_modes(device: torch.device) -> list[str]:
    """fp16 (+GradScaler, the T4 setting) everywhere on CUDA, bf16 where native (cc >= 8.0); fp32 on the CPU."""
    if device.type != "cuda":
        return ["fp32"]
    return ["fp16", "bf16"] if torch.cuda.get_device_capability(device)[0] >= 8 else ["fp16"]


def _dtype(amp: str):
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[amp]


def train_throughput(preset: str, overrides: dict, batch: int, amp: str, compile_: bool, warmup: int, iters: int,
                     device: torch.device) -> dict:
    """samples/s, peak memory and MFU of the training loop's step (see the module docstring)."""
    torch.manual_seed(0)
    model = dit.build_model(preset, NUM_USERS, **overrides).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    dtype = _dtype(amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    g = torch.Generator(device=device).manual_seed(0)
    cfg = dit.model_config(model)
    shape = (batch, cfg["in_channels"], cfg["input_size"], cfg["input_size"])

    def draws():
        return (torch.randn(shape, device=device, generator=g), torch.randint(0, NUM_USERS, (batch,), device=device,
                generator=g), torch.randn(shape, device=device, generator=g),
                torch.sigmoid(torch.randn(batch, device=device, generator=g)),
                (torch.rand(batch, device=device, generator=g) < 0.1).long())

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    _peak_reset(device)
    t0 = time.perf_counter()
    loss_fn, note = train.step_loss, "eager"
    if compile_:
        with autocast():
            loss_fn, note = train.compiled_step_loss(model, draws(), COSINE)

    def step():
        with autocast():
            loss = loss_fn(model, *draws(), COSINE).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    _sync(device)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    rate = batch * iters / (time.perf_counter() - t0)
    peak = _peak_flops(device)
    flops = 3 * forward_flops_per_sample(cfg) * rate
    return {"what": "train step", "preset": preset, "amp": amp, "compile": note, "batch": batch,
            "params_m": round(dit.count_parameters(model) / 1e6, 1), "samples_per_s": round(rate, 2),
            "peak_memory_gib": _peak_gib(device), "tflops": round(flops / 1e12, 3),
            "mfu": round(flops / peak, 3) if peak else None, "warmup_s": round(setup_s, 1)}


@torch.no_grad()
def forward_throughput(preset: str, overrides: dict, batch: int, amp: str, warmup: int, iters: int,
                       device: torch.device) -> dict:
    """Forward only (sampling's cost per model evaluation) for the big model that training never fits."""
    torch.manual_seed(0)
    model = dit.build_model(preset, NUM_USERS, **overrides).to(device).eval()
    cfg = dit.model_config(model)
    x = torch.randn(batch, cfg["in_channels"], cfg["input_size"], cfg["input_size"], device=device)
    t = torch.rand(batch, device=device)
    y = torch.randint(0, NUM_USERS, (batch,), device=device)
    dtype = _dtype(amp)
    _peak_reset(device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for _ in range(warmup):
            model(x, t, y)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x, t, y)
        _sync(device)
    rate = batch * iters / (time.perf_counter() - t0)
    peak = _peak_flops(device)
    flops = forward_flops_per_sample(cfg) * rate
    return {"what": "forward only", "preset": preset, "amp": amp, "compile": "eager", "batch": batch,
            "params_m": round(dit.count_parameters(model) / 1e6, 1), "samples_per_s": round(rate, 2),
            "peak_memory_gib": _peak_gib(device), "tflops": round(flops / 1e12, 3),
            "mfu": round(flops / peak, 3) if peak else None}


def chain(size: dict, work: Path, device: torch.device) -> dict:
    """simulate -> split -> random full-size VA-VAE -> extract -> 300 train steps -> guided sampling."""
    t0 = time.perf_counter()
    data_dir = simulate.simulate_dataset(work / "data", size["users"], size["per_user"], seed=0,
                                          workers=size["sim_workers"], progress=False)
    simulate_s = time.perf_counter() - t0
    split = data.ensure_split(data_dir, work / "split.json")
    ckpt = vavae.write_random_checkpoint(work / "vavae_random.pt", seed=0, ch=size["vavae_ch"])
    tokenizer = load_tokenizer(ckpt, device)
    n_images = sum(len(split.parts[p]) for p in ("train", "val", "test"))
    _sync(device)
    t0 = time.perf_counter()
    latents.extract_latents(data_dir, split, tokenizer, work / "latents", batch_size=size["extract_batch"],
                            num_workers=size["extract_workers"], progress=False)
    _sync(device)
    extract_s = time.perf_counter() - t0
    del tokenizer

    precision = "fp16" if device.type == "cuda" else "no"  # the T4 setting; fp16 needs a GPU
    cfg = TrainConfig(latent_dir=str(work / "latents"), output_dir=str(work / "run"), preset=size["presets"][0],
                      model_overrides=dict(size["overrides"]), batch_size=size["train_batch"], max_epochs=None,
                      max_steps=size["train_steps"], precision=precision, cpu=device.type != "cuda",
                      warmup_steps=min(50, size["train_steps"]), log_every=max(1, size["train_steps"] // 6),
                      val_every=max(1, size["train_steps"] // 3), ckpt_every=0, progress=False,
                      time_dist="logit_normal", cosine_weight=COSINE)
    t0 = time.perf_counter()
    result = train.train(cfg)
    train_s = time.perf_counter() - t0
    losses = result["losses"]
    non_finite = sum(1 for v in losses if not math.isfinite(v))

    gen = generate.load_generator(work / "run", device)
    users = [1 + k % size["users"] for k in range(size["sample_images"])]
    settings = SamplingSettings(num_steps=size["sample_steps"], solver="heun", guidance_scale=4.0,
                                batch_size=size["sample_batch"])
    generate.sample_latents(gen, users[: settings.batch_size], list(range(settings.batch_size)), settings)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    z = generate.sample_latents(gen, users, list(range(len(users))), settings)
    _sync(device)
    sample_s = time.perf_counter() - t0
    return {
        "images": n_images, "simulate_s": round(simulate_s, 1), "vavae_ch": size["vavae_ch"],
        "extract_images_per_s": round(n_images / extract_s, 2),
        "train_precision": result["precision"], "train_steps": result["step"], "train_batch": size["train_batch"],
        "train_s": round(train_s, 1), "non_finite_losses": non_finite, "skipped_steps": result["skipped_steps"],
        "final_loss": result["final_loss"], "all_finite": non_finite == 0 and bool(torch.isfinite(z).all()),
        "sampling": f"heun {settings.num_steps} steps ({2 * settings.num_steps} NFE), guidance 4, batch "
                    f"{settings.batch_size}", "sample_images_per_s": round(len(users) / sample_s, 2),
    }


def markdown(res: dict) -> str:
    head = (f"device: {res['device']}, torch {res['torch']}, {'smoke (CPU sizes)' if res['smoke'] else 'full'} run, "
            f"{res['seconds']:.0f} s")
    lines = [head, "", "| what | preset | amp | compile | batch | samples/s | peak GiB | TFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["throughput"]:
        lines.append(f"| {r['what']} | {r['preset']} | {r['amp']} | {r['compile']} | {r['batch']} | "
                     f"{r['samples_per_s']} | {r['peak_memory_gib']} | {r['tflops']} | {r['mfu']} |")
    c = res["chain"]
    lines += ["", "| chain on simulated data | figure |", "|---|---|",
              f"| extraction, VA-VAE ch={c['vavae_ch']} (random weights), {c['images']} images | "
              f"{c['extract_images_per_s']} images/s |",
              f"| `train.train`, {c['train_steps']} steps at batch {c['train_batch']}, {c['train_precision']} | "
              f"{c['train_s']} s; non-finite losses {c['non_finite_losses']}, skipped steps {c['skipped_steps']} |",
              f"| guided sampling, {c['sampling']} | {c['sample_images_per_s']} images/s |",
              f"| every loss and sample finite | {c['all_finite']} |"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for bench_gpu.json and bench_gpu.md")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (< 60 s): the code paths, no figures")
    ap.add_argument("--device", default=None, help="default: cuda when present, else cpu (--smoke: cpu)")
    args = ap.parse_args(argv)
    size = SMOKE if args.smoke else FULL
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    if device.type != "cuda" and not args.smoke:
        print("note: no CUDA device; the full sizes on a CPU take hours -- use --smoke for the code paths", flush=True)
    t_start = time.perf_counter()
    rows = []
    for preset in size["presets"]:
        for amp in amp_modes(device):
            rows.append(train_throughput(preset, size["overrides"], size["batch"], amp, False, size["warmup"],
                                         size["iters"], device))
            print(json.dumps(rows[-1]), flush=True)
    if not args.smoke:  # compiling costs more than the whole smoke budget on a CPU; tests/test_train.py covers it
        rows.append(train_throughput(size["presets"][0], size["overrides"], size["batch"], amp_modes(device)[0], True,
                                     size["warmup"], size["iters"], device))
        print(json.dumps(rows[-1]), flush=True)
    rows.append(forward_throughput(size["forward_preset"], size["overrides"], size["forward_batch"],
                                   amp_modes(device)[-1], size["warmup"], size["iters"], device))
    print(json.dumps(rows[-1]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ch = chain(size, Path(tmp), device)
    print(json.dumps(ch), flush=True)
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "smoke": args.smoke, "throughput": rows, "chain": ch,
           "seconds": time.perf_counter() - t_start}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "bench_gpu.json", res)
    atomic_write_text(args.out / "bench_gpu.md", markdown(res))
    print(markdown(res))
    return 0 if ch["all_finite"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
