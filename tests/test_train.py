"""Evidence for mdgen_helpers.train on the CPU with a tiny LightningDiT (depth 2, width 64; width
128 for the overfitting run).

Latent fixtures are written in the documented extraction format (mdgen_helpers.latents), so the
real loader and checks run; only the data size and the model size are shrunk.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mdgen_helpers import latents
from mdgen_helpers.files import atomic_save_safetensors, load_safetensors_metadata, read_json, sha256_json
from mdgen_helpers.errors import ArtifactMismatchError, DataError, MdgenError
from mdgen_helpers.checkpoints import latest_checkpoint, list_checkpoints
from mdgen_helpers.launch import launch_training
from mdgen_helpers.train import TrainConfig, train
from mdgen_helpers.users import UserMap

TINY = {"depth": 2, "hidden_size": 64, "num_heads": 2}
SHAPE = (32, 16, 16)


def write_latents(out: Path, n_train=8, n_val=4, users=2, tokenizer="standin-pca:test", split_hash="split-A",
                  seed=0, stats=True, val_split_hash=None, val_is_train=False, val_unlike_train=False) -> Path:
    """A latent directory as `latents.extract_latents` writes it: structured per-user latents
    (`val_unlike_train`: val drawn around other centres, so fitting train makes val worse)."""
    g = torch.Generator().manual_seed(seed)
    umap = UserMap.from_folders([f"ID_{k + 1}" for k in range(users)])
    centres = torch.randn((users, *SHAPE), generator=g) * 2 + 0.5
    other = torch.randn((users, *SHAPE), generator=torch.Generator().manual_seed(seed + 1)) * 2 + 0.5

    def part(name, n, sh, z=None):
        labels = torch.arange(n) % users
        if z is None:
            c = other if (name == "val" and val_unlike_train) else centres
            z = c[labels] + 0.3 * torch.randn((n, *SHAPE), generator=g)
        files = [f"ID_{int(lab) + 1}/{name}_{i:03d}.jpg" for i, lab in enumerate(labels)]
        meta = {"format": latents.FORMAT, "tokenizer": tokenizer, "split_hash": sh, "user_map": umap.to_json(),
                "files": files, "part": name, "image_size": 256, "latent_shape": list(SHAPE)}
        atomic_save_safetensors({"latents": z, "latents_std": 0.1 * torch.ones_like(z), "labels": labels},
                                   out / f"{name}.safetensors", metadata=meta)
        return z, meta

    z, meta = part("train", n_train, split_hash)
    part("val", n_train if val_is_train else n_val, val_split_hash or split_hash, z if val_is_train else None)
    if stats:
        smeta = {"format": latents.FORMAT, "tokenizer": tokenizer, "split_hash": split_hash,
                 "user_map": umap.to_json(), "train_files_hash": sha256_json(meta["files"])}
        latents.LatentStats.of(z).save(out / "stats.safetensors", smeta)
    return out


def cfg_for(ldir, out, **kw) -> TrainConfig:
    base = dict(latent_dir=str(ldir), output_dir=str(out), preset="tiny", model_overrides=TINY, batch_size=8,
                max_epochs=None, max_steps=6, lr=1e-3, warmup_steps=3, log_every=1, val_every=0, ckpt_every=0,
                keep_last=10, progress=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def ldir(tmp_path_factory):
    return write_latents(tmp_path_factory.mktemp("latents"))


@pytest.fixture(scope="module")
def memorise_dir(tmp_path_factory):
    """Validation = the train latents, so the fixed-grid val loss measures memorisation."""
    return write_latents(tmp_path_factory.mktemp("memorise"), val_is_train=True)


def model_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overfit_run(memorise_dir, tmp_path_factory):
    # Width 128: with patch 2 a token carries 2*2*32 = 128 values, and a narrower model cannot
    # even pass x_t through (its loss floors near 1.2).
    out = tmp_path_factory.mktemp("overfit")
    cfg = cfg_for(memorise_dir, out, max_steps=150, lr=5e-3, warmup_steps=10, val_every=75, ckpt_every=75,
                  label_dropout=0.1, ema_decay=0.9, model_overrides={**TINY, "hidden_size": 128}, log_every=10)
    return train(cfg), out


def test_tiny_model_overfits_a_handful_of_latents(overfit_run):
    result, out = overfit_run
    first, last = sum(result["losses"][:5]) / 5, sum(result["losses"][-10:]) / 10
    assert last < first / 2.5, (first, last)  # ~2.0 -> ~0.7 measured
    assert result["val_loss_ema"] < first / 3, (first, result["val_loss_ema"])  # ~0.55 measured
    # The run directory has everything generation needs, in the documented layout.
    meta = load_safetensors_metadata(out / "ema.safetensors")
    for key in ("model_config", "user_map", "tokenizer", "split_hash", "latent_mean", "latent_std", "step",
                "train_config"):
        assert key in meta
    assert meta["step"] == 150 and meta["model_config"]["depth"] == 2
    assert [s for s, _ in list_checkpoints(out)] == [75, 150]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in recs if "val_loss_ema" in r]
    assert [r["step"] for r in vals] == [75, 150] and len(vals[0]["val_loss_by_t"]) == 8
    assert {"loss", "grad_norm", "skipped_steps", "samples_per_s", "lr", "memory_mb"} <= set(recs[0])
    # generate.load_generator reads it back without any other file.
    from mdgen_helpers.generate import load_generator

    gen = load_generator(out)
    assert gen.user_map.num_users == 2 and gen.step == 150


def test_resume_reproduces_an_uninterrupted_run(ldir, tmp_path):
    straight = train(cfg_for(ldir, tmp_path / "a", max_steps=8, ckpt_every=4, val_every=4))
    part1 = train(cfg_for(ldir, tmp_path / "b", max_steps=4, val_every=4))
    assert part1["stopped"] == "max_steps" and part1["step"] == 4
    part2 = train(cfg_for(ldir, tmp_path / "b", max_steps=8, val_every=4, resume=True))
    assert part2["resumed_from"].endswith("step_0000004")
    assert part1["losses"] + part2["losses"] == straight["losses"]  # bit-identical on the CPU
    wa, wb = model_weights(latest_checkpoint(tmp_path / "a")), model_weights(latest_checkpoint(tmp_path / "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ea, eb = load_file(str(tmp_path / "a" / "ema.safetensors")), load_file(str(tmp_path / "b" / "ema.safetensors"))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert part2["val_loss_ema"] == straight["val_loss_ema"]
    # metrics.jsonl of the resumed run holds each step once
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 9))


def test_killed_mid_save_leaves_previous_checkpoint_usable(ldir, tmp_path):
    out = tmp_path / "run"
    train(cfg_for(ldir, out, max_steps=2, ckpt_every=1))
    ck = out / "checkpoints"
    # What a killed save leaves: a temp folder, and a renamed-looking folder without complete.json.
    shutil.copytree(ck / "step_0000002", ck / ".tmp_step_0000003")
    (ck / "step_0000009").mkdir()
    (ck / "step_0000009" / "model.safetensors").write_bytes(b"half a file")
    assert latest_checkpoint(out) == ck / "step_0000002"
    res = train(cfg_for(ldir, out, max_steps=3, ckpt_every=1, resume=True))
    assert res["resumed_from"].endswith("step_0000002") and res["step"] == 3
    assert not (ck / ".tmp_step_0000003").exists()
    # A fresh run into a directory with checkpoints is refused rather than silently mixed.
    with pytest.raises(MdgenError, match="--resume"):
        train(cfg_for(ldir, out, max_steps=3))


def _val_losses(out: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss_ema"] for r in recs if "val_loss_ema" in r}


def test_best_ema_is_the_validation_minimum_and_sampled_on_request(tmp_path, capsys):
    """ema_best.safetensors holds the EMA of the validation with the lowest EMA val loss (here a
    val set unlike the train set, so that fitting train makes val worse after a few steps: the
    minimum is before the end); generation samples it when told `best`, the last EMA by default."""
    from mdgen_helpers import checkpoints
    from mdgen_helpers.generate import load_generator

    ldir = write_latents(tmp_path / "lat", n_train=4, n_val=8, seed=3, val_unlike_train=True)
    out = tmp_path / "run"
    res = train(cfg_for(ldir, out, max_steps=40, lr=2e-2, warmup_steps=1, val_every=4, ckpt_every=4, batch_size=4,
                        ema_decay=0.5, ema_warmup=False, model_overrides={**TINY, "hidden_size": 128}))
    vals = _val_losses(out)
    best_step = min(vals, key=vals.get)
    assert best_step < 40, vals  # the run got worse on val after its best point
    assert res["best_step"] == best_step and res["best_val_loss_ema"] == vals[best_step]
    meta = load_safetensors_metadata(out / checkpoints.BEST_NAME)
    assert meta["step"] == best_step and meta["export"] == "best" and meta["val_loss_ema"] == vals[best_step]
    # Its weights are the EMA of that step's checkpoint, bit for bit.
    ckpt_ema = checkpoints.read_ema_state(checkpoints.step_folder(out, best_step))
    best = load_file(str(out / checkpoints.BEST_NAME))
    assert all(torch.equal(best[k], ckpt_ema["module." + k]) for k in best)
    # Generation: the last EMA by default, the best on request; a best export is never "stale".
    assert load_generator(out).step == 40
    assert load_generator(out, weights="best").step == best_step
    assert "older than the complete checkpoint" not in capsys.readouterr().out
    with pytest.raises(MdgenError, match="unknown weights"):
        load_generator(out, weights="newest")


def test_asked_for_best_a_run_without_validation_samples_its_last_ema_and_says_so(ldir, tmp_path, capsys):
    from mdgen_helpers import checkpoints
    from mdgen_helpers.generate import load_generator

    out = tmp_path / "run"
    train(cfg_for(ldir, out, max_steps=2, val_every=0))
    assert not (out / checkpoints.BEST_NAME).exists()
    assert load_generator(out, weights="best").step == 2
    assert "never validated" in capsys.readouterr().out


def test_resume_drops_a_best_export_its_checkpoint_does_not_name(ldir, tmp_path, capsys):
    """A session killed after a validation but before the next checkpoint leaves a best file the
    resumed run cannot account for: it is removed, and the resumed run writes its own."""
    from mdgen_helpers import checkpoints

    out = tmp_path / "run"
    train(cfg_for(ldir, out, max_steps=4, val_every=2, ckpt_every=2))
    best = out / checkpoints.BEST_NAME
    marker = checkpoints.read_marker(checkpoints.step_folder(out, 4))
    assert load_safetensors_metadata(best)["step"] == marker["best_step"]
    # An untouched best file survives a resume.
    train(cfg_for(ldir, out, max_steps=4, val_every=2, ckpt_every=2, resume=True))
    assert best.is_file() and "removed" not in capsys.readouterr().out
    # A best file from steps the checkpoint never saw is removed.
    sd, meta = load_file(str(best)), load_safetensors_metadata(best)
    atomic_save_safetensors(sd, best, {**meta, "step": 99})
    res = train(cfg_for(ldir, out, max_steps=6, val_every=2, ckpt_every=2, resume=True))
    assert f"removed {checkpoints.BEST_NAME}" in capsys.readouterr().out
    vals = _val_losses(out)
    if res["best_step"] == 6:  # the resumed run improved: its own best file
        assert load_safetensors_metadata(best)["step"] == 6
    else:
        assert not best.exists() and min(vals, key=vals.get) <= 4


def test_time_budget_stops_with_a_checkpoint_and_resumes(ldir, tmp_path):
    out = tmp_path / "run"
    res = train(cfg_for(ldir, out, max_steps=5, time_budget=1e-7))
    assert res["stopped"] == "time_budget" and res["step"] == 1
    assert latest_checkpoint(out).name == "step_0000001"
    res2 = train(cfg_for(ldir, out, max_steps=5, resume=True))
    assert res2["step"] == 5 and res2["stopped"] == "max_steps"


def test_time_budget_counts_from_the_session_start(ldir, tmp_path):
    """Kaggle's 12 hours run from the session start: a session already 1 h old has no room in a 0.5 h budget."""
    import time

    res = train(cfg_for(ldir, tmp_path / "run", max_steps=5, time_budget=0.5, session_start=time.time() - 3600))
    assert res["stopped"] == "time_budget" and res["step"] == 1


def test_progress_bar_refreshes_once_a_minute_into_a_pipe(monkeypatch):
    """A subprocess echoed into a notebook gets one progress line a minute, not one per refresh."""
    import io as stdio
    import sys

    from mdgen_helpers.train import progress_interval

    monkeypatch.setattr(sys, "stderr", stdio.StringIO())
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert progress_interval() == 60.0


def test_non_finite_step_is_skipped_and_counted(ldir, tmp_path):
    out = tmp_path / "run"

    def hook(step, loss):  # step index 1 (the second step) gets a NaN loss
        return loss + float("nan") if step == 1 else loss

    res = train(cfg_for(ldir, out, max_steps=3, ckpt_every=1), loss_hook=hook)
    assert res["skipped_steps"] == 1 and res["step"] == 3
    ck = dict(list_checkpoints(out))
    w1, w2, w3 = (model_weights(ck[s]) for s in (1, 2, 3))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # the NaN step changed nothing
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)  # the next step trained again
    assert all(torch.isfinite(v).all() for v in load_file(str(out / "ema.safetensors")).values())
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in recs] == [0, 1, 1]
    assert math.isnan(res["losses"][1])


def test_compile_failure_falls_back_to_eager_in_one_line(ldir, tmp_path, monkeypatch, capsys):
    """A compiler failure surfaces at the first call (no C++ compiler, unsupported platform): the
    probe catches it, one line says so, and training runs eager with the eager numbers."""
    eager = train(cfg_for(ldir, tmp_path / "eager", max_steps=3))

    def broken_compile(fn, *args, **kwargs):
        def call(*a, **k):
            raise RuntimeError("C++ compile error\ng++: not found")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    capsys.readouterr()
    res = train(cfg_for(ldir, tmp_path / "fallback", max_steps=3, compile=True))
    said = [line for line in capsys.readouterr().out.splitlines() if "torch.compile" in line]
    assert said == ["torch.compile failed (RuntimeError: C++ compile error); training eager"]
    assert res["compile"] == said[0] and res["step"] == 3
    assert res["losses"] == eager["losses"]


@pytest.mark.slow
def test_compiled_training_matches_eager(ldir, tmp_path):
    """TrainConfig.compile: the compiled step (inductor, forward + backward) trains the same model
    as the eager one, up to float round-off, and the probe step leaves no gradient behind."""
    eager = train(cfg_for(ldir, tmp_path / "eager", max_steps=3))
    comp = train(cfg_for(ldir, tmp_path / "compiled", max_steps=3, compile=True))
    if comp["compile"].startswith("torch.compile failed"):
        pytest.skip(f"no working torch.compile here: {comp['compile']}")
    assert comp["compile"].startswith("training step compiled")
    assert comp["losses"] == pytest.approx(eager["losses"], rel=1e-4)
    we = load_file(str(tmp_path / "eager" / "ema.safetensors"))
    wc = load_file(str(tmp_path / "compiled" / "ema.safetensors"))
    assert all(torch.allclose(we[k], wc[k], rtol=1e-4, atol=1e-5) for k in we)


# --------------------------------------------------------------------------------------------- errors


def test_errors_before_any_work(ldir, overfit_run, tmp_path):
    _, run = overfit_run
    cases = []
    other_tok = write_latents(tmp_path / "tok", tokenizer="vavae:other")
    cases.append((cfg_for(other_tok, tmp_path / "o1", init_from=str(run)), ArtifactMismatchError, "tokenizer"))
    three = write_latents(tmp_path / "three", users=3, n_train=9)
    cases.append((cfg_for(three, tmp_path / "o2", init_from=str(run)), ArtifactMismatchError, "3"))
    nostats = write_latents(tmp_path / "nostats", stats=False)
    cases.append((cfg_for(nostats, tmp_path / "o3"), MdgenError, "stats"))
    empty_val = write_latents(tmp_path / "emptyval", n_val=0)
    cases.append((cfg_for(empty_val, tmp_path / "o4", val_every=2), DataError, "val split is empty"))
    cases.append((cfg_for(ldir, tmp_path / "o5", batch_size=9), MdgenError, "larger than"))
    mixed = write_latents(tmp_path / "mixed", val_split_hash="split-B")
    cases.append((cfg_for(mixed, tmp_path / "o6", val_every=2), ArtifactMismatchError, "split"))
    for cfg, err, text in cases:
        with pytest.raises(err, match=text):
            train(cfg)
        assert not Path(cfg.output_dir).exists(), cfg.output_dir  # nothing written


def test_init_from_our_run_and_cli(ldir, overfit_run, tmp_path, capsys):
    from mdgen_helpers.cli import main

    _, run = overfit_run
    out = tmp_path / "cli"
    rc = main(["train", "--latent_dir", str(ldir), "--output_dir", str(out), "--preset", "tiny",
               "--model_overrides", json.dumps(TINY), "--batch_size", "4", "--max_steps", "2", "--lr", "1e-4",
               "--precision", "auto", "--init_from", str(run), "--val_every", "0", "--no_progress"])
    assert rc == 0
    assert load_safetensors_metadata(out / "ema.safetensors")["step"] == 2
    assert main(["train", "--latent_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    if not torch.cuda.is_available():  # --devices 2 needs GPUs: a clear error, not a hanging launcher
        assert main(["train", "--latent_dir", str(ldir), "--output_dir", str(tmp_path / "y"), "--devices", "2"]) == 2
        assert "CUDA GPUs" in capsys.readouterr().err


def test_launch_training_on_cpu_runs_in_process(ldir, tmp_path, capsys):
    res = launch_training(cfg_for(ldir, tmp_path / "nb", max_steps=1), num_processes=2)
    assert res["step"] == 1 and res["num_processes"] == 1
    assert "one process in this kernel" in capsys.readouterr().out


def test_gradient_accumulation_matches_the_full_batch(ldir, tmp_path):
    """batch 4 x accum 2 == batch 8: same samples, noise and t per optimizer step (one draw per
    step, sliced); only float summation order differs."""
    full = train(cfg_for(ldir, tmp_path / "full", max_steps=4, batch_size=8))
    acc = train(cfg_for(ldir, tmp_path / "acc", max_steps=4, batch_size=4, grad_accum=2))
    assert acc["losses"] == pytest.approx(full["losses"], rel=1e-5, abs=1e-6)
    wa, wb = model_weights(latest_checkpoint(tmp_path / "full")), model_weights(latest_checkpoint(tmp_path / "acc"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------- DDP


def _ddp_worker(cfg_json):
    from accelerate.state import AcceleratorState

    torch.set_num_threads(1)
    # A fresh (spawned) worker has no Accelerate state yet; resetting keeps it safe under fork too.
    AcceleratorState._reset_state(reset_partial_state=True)
    train(TrainConfig.from_json(cfg_json))


def _spawn_cpu_processes(function, args, num_processes: int, rdv_file):
    """accelerate.debug_launcher, but with *spawned* workers: a forked child of a process whose
    OpenMP thread pool is already running (any earlier torch op with 2 threads) can hang on its
    first parallel op, which is what a long pytest session is."""
    import socket

    from accelerate.utils import PrepareForLaunch, patch_environment
    from torch.multiprocessing import start_processes

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with patch_environment(world_size=num_processes, master_addr="127.0.0.1", master_port=str(port),
                           accelerate_mixed_precision="no", accelerate_debug_rdv_file=str(rdv_file),
                           accelerate_use_cpu="yes", gloo_socket_ifname="lo"):
        start_processes(PrepareForLaunch(function, debug=True), args=args, nprocs=num_processes, start_method="spawn")


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(ldir, tmp_path):
    """2 CPU processes (gloo, spawned like accelerate.debug_launcher) x batch 4 == 1 process x batch 8.

    Same data order and draws by construction; the only difference is the order of float sums
    (DDP averages two half-batch gradients), so weights agree to ~1e-6 after 6 Adam steps;
    the tolerance is 1e-4."""
    one = train(cfg_for(ldir, tmp_path / "one", batch_size=8, val_every=6))
    cfg2 = cfg_for(ldir, tmp_path / "two", batch_size=4, val_every=6)
    _spawn_cpu_processes(_ddp_worker, (cfg2.to_json(),), num_processes=2, rdv_file=tmp_path / "rdv")
    two = read_json(tmp_path / "two" / "result.json")
    assert two["num_processes"] == 2 and two["global_batch"] == 8 and two["step"] == 6
    wa, wb = model_weights(latest_checkpoint(tmp_path / "one")), model_weights(latest_checkpoint(tmp_path / "two"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-4)
    assert abs(two["final_loss"] - one["final_loss"]) < 1e-4
    assert abs(two["val_loss_ema"] - one["val_loss_ema"]) < 1e-4


def test_preview_grid_is_decoded_with_the_stand_in_tokenizer(tmp_path, monkeypatch):
    """The preview shows what `generate` would make from the EMA at that step: the same sampler,
    seeds, denormalisation and decoder."""
    from mdgen_helpers import generate, viz
    from mdgen_helpers.settings import SamplingSettings
    from mdgen_helpers.tokenizers import fit_standin

    g = torch.Generator().manual_seed(0)
    tok = fit_standin(torch.rand((4, 3, 256, 256), generator=g) * 2 - 1, num_images=4, progress=False, kind="rgb-pca")
    tok.save(tmp_path / "tok.safetensors")
    ld = write_latents(tmp_path / "lat", tokenizer=tok.identity)
    out = tmp_path / "run"
    shown = {}
    real_grid = viz.user_grid
    monkeypatch.setattr(viz, "user_grid", lambda images, title=None: shown.update(images) or real_grid(images, title))
    cfg = cfg_for(ld, out, max_steps=2, preview_every=2, tokenizer=str(tmp_path / "tok.safetensors"),
                  preview_per_user=2, preview_steps=2)
    train(cfg)
    png = out / "previews" / "step_0000002.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The grid's images are the generation of the EMA saved at that step (ema.safetensors, step 2).
    gen = generate.load_generator(out)
    assert gen.step == 2 and sorted(shown) == list(gen.user_map.user_ids)
    jobs = [(u, k) for u in gen.user_map.user_ids for k in (1, 2)]
    z = generate.sample_latents(gen, [u for u, _ in jobs], [generate.image_seed(cfg.seed, u, k) for u, k in jobs],
                                SamplingSettings(guidance_scale=cfg.preview_guidance, num_steps=2, solver="euler",
                                                 batch_size=len(jobs)))
    expected = generate.decode_to_uint8(tok, z, batch_size=len(jobs))
    got = torch.stack([img for u in gen.user_map.user_ids for img in shown[u]])
    assert got.dtype == torch.uint8 and got.shape == expected.shape
    assert (got.int() - expected.int()).abs().max() <= 1  # float round-off of the EMA file round trip
    assert got.float().std() > 1  # not a blank image
    # A tokenizer that did not make the latents is refused before training.
    with pytest.raises(ArtifactMismatchError, match="tokenizer"):
        train(cfg_for(write_latents(tmp_path / "lat2"), tmp_path / "run2", max_steps=2, preview_every=2,
                      tokenizer=str(tmp_path / "tok.safetensors")))


REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


@pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"reference vectors folder {REFERENCE} is absent")
def test_init_from_official_lightningdit_weights(ldir, tmp_path):
    """Official-layout weights (5 classes, plain LayerNorm/GELU variant) fine-tuned for 2 users:
    the architecture is read from the weights, the label table is re-initialised for our users."""
    ref = load_file(str(REFERENCE / "lightningdit_small_p2_plain_seed0.safetensors"))
    official = tmp_path / "official.safetensors"
    atomic_save_safetensors({k[len("weights."):]: v for k, v in ref.items() if k.startswith("weights.")}, official)
    out = tmp_path / "ft"
    res = train(cfg_for(ldir, out, max_steps=2, init_from=str(official)))
    assert res["step"] == 2
    mcfg = load_safetensors_metadata(out / "ema.safetensors")["model_config"]
    assert mcfg["num_classes"] == 2 and mcfg["hidden_size"] == 128 and mcfg["use_swiglu"] is False
    # The transformer blocks start from the official weights (not from a fresh init).
    ema = load_file(str(out / "ema.safetensors"))
    w0 = ref["weights.blocks.0.attn.qkv.weight"]
    assert (ema["blocks.0.attn.qkv.weight"] - w0).abs().max() < 0.05


def test_ema_warmup_tracks_short_runs_and_caps_at_decay():
    from mdgen_helpers.train import ema_decay_at, ema_update_fn

    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.999, 80) == pytest.approx(0.9)
    assert ema_decay_at(0.999, 100_000) == 0.999
    assert ema_decay_at(0.999, 5, warmup=False) == 0.999
    # after 300 updates towards a fixed target the warmed-up EMA is there; the plain 0.999 one is not
    for warmup, close in ((True, True), (False, False)):
        ema, target = [torch.zeros(3)], [torch.ones(3)]
        update = ema_update_fn(0.999, warmup)
        for n in range(1, 301):
            update(ema, target, torch.tensor(n))
        assert bool(torch.allclose(ema[0], target[0], atol=1e-3)) is close
