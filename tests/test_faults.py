"""Fault corpus for issue 13: kill -9 at each phase of a checkpoint save, a full disk (a patched
writer everywhere; a real small tmpfs when running as root where `mount` works), and the files
that used to end in a traceback. Every failure is one line (exit 2) and leaves a consistent state.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import cfg_for
from test_trust import (  # noqa: F401 - ldir and run2 are fixtures
    _Payload, ldir, one_line_error, resume_cli, run2, write_crafted_pickle, write_images)

from mdgen_helpers import files, trust
from mdgen_helpers.cli import main as cli
from mdgen_helpers.errors import CheckpointError
from mdgen_helpers.checkpoints import COMPLETE, EMA_STATE, latest_checkpoint
from mdgen_helpers.train import train

TESTS = Path(__file__).resolve().parent

# Phase -> the patch, in a child process, that SIGKILLs it there during the step-2 checkpoint save.
KILL_AT = {
    "mid_save_state": "train.atomic_save_safetensors", "before_complete": "trust.fsync_tree",
    "after_complete": "checkpoints.atomic_write_json", "after_rename": "checkpoints.export_ema",
    "mid_export_config": "checkpoints.atomic_write_json", "during_prune": "shutil.rmtree",
}
CHILD = textwrap.dedent('''
    import os, shutil, signal, sys
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    from test_train import cfg_for
    from mdgen_helpers import checkpoints as C, trust, train as T
    phase, ldir, out = sys.argv[3], sys.argv[4], sys.argv[5]
    calls = {"n": 0}
    nth = 1 if phase == "during_prune" else 2   # the step-2 save (pruning happens first there)

    def killer(owner, name, when, after=False):
        real = getattr(owner, name)
        def f(*a, **k):
            hit = when(*a)
            if hit:
                calls["n"] += 1
            if hit and calls["n"] == nth and not after:
                os.kill(os.getpid(), signal.SIGKILL)
            r = real(*a, **k)
            if hit and calls["n"] == nth and after:
                os.kill(os.getpid(), signal.SIGKILL)
            return r
        setattr(owner, name, f)

    name = lambda p: os.path.basename(str(p))
    if phase == "mid_save_state":
        killer(T, "atomic_save_safetensors", lambda t, p, *r: name(p) == C.EMA_STATE)
    elif phase == "before_complete":
        killer(trust, "fsync_tree", lambda p: True)
    elif phase == "after_complete":
        killer(C, "atomic_write_json", lambda p, o: name(p) == C.COMPLETE, after=True)
    elif phase == "after_rename":
        killer(C, "export_ema", lambda c, o: True)
    elif phase == "mid_export_config":
        killer(C, "atomic_write_json", lambda p, o: name(p) == "config.json")
    elif phase == "during_prune":
        killer(shutil, "rmtree", lambda p, *r: name(p).startswith("step_"))
    T.train(cfg_for(ldir, out, max_steps=2, ckpt_every=1, keep_last=1 if phase == "during_prune" else 10))
    print("not killed")
''')


@pytest.fixture(scope="module")
def uninterrupted(run2):
    return load_file(str(run2 / "ema.safetensors"))


@pytest.mark.parametrize("phase", list(KILL_AT))
def test_kill_9_at_each_phase_of_a_checkpoint_save(phase, ldir, uninterrupted, tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(TESTS.parent), str(TESTS), phase, str(ldir), str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    # Whatever phase: the newest complete checkpoint is whole and safe, and resuming repairs the rest.
    newest = latest_checkpoint(out)
    assert newest is not None and (newest / COMPLETE).is_file() and (newest / EMA_STATE).is_file()
    trust.scan_checkpoint_folder(newest)
    res = train(cfg_for(ldir, out, max_steps=2, ckpt_every=1, resume=True))
    assert res["step"] == 2
    final = latest_checkpoint(out)
    assert final.name == "step_0000002" and not list((out / "checkpoints").glob(".tmp_*"))
    meta = files.load_safetensors_metadata(out / "ema.safetensors")
    assert meta["step"] == 2 and meta["ema_state_sha256"] == files.sha256_file(final / EMA_STATE)
    assert files.read_json(out / "config.json")["step"] == 2
    ema = load_file(str(out / "ema.safetensors"))
    assert all(torch.equal(ema[k], uninterrupted[k]) for k in uninterrupted)  # same as never killed


def test_stale_export_is_redone_when_the_run_is_already_finished(ldir, tmp_path):
    """The issue's case: killed after the final rename, before the export; the re-run has nothing to train."""
    out = tmp_path / "run"
    train(cfg_for(ldir, out, max_steps=2, ckpt_every=1))
    old = tmp_path / "old_export"
    train(cfg_for(ldir, old, max_steps=1, ckpt_every=1))
    shutil.copy(old / "ema.safetensors", out / "ema.safetensors")  # an export one step behind
    assert files.load_safetensors_metadata(out / "ema.safetensors")["step"] == 1
    train(cfg_for(ldir, out, max_steps=2, resume=True))
    assert files.load_safetensors_metadata(out / "ema.safetensors")["step"] == 2


def test_generation_from_a_stale_export_uses_the_newest_checkpoint(ldir, tmp_path, capsys):
    """Killed after the final rename, before the export, and never resumed (e.g. an attached,
    read-only run): sampling must use the newest complete checkpoint's EMA, not the older file."""
    from mdgen_helpers.checkpoints import read_ema

    out = tmp_path / "run"
    train(cfg_for(ldir, out, max_steps=2, ckpt_every=1))
    current = read_ema(out)
    current.state_dict = {k: v.clone() for k, v in current.state_dict.items()}  # loaded tensors map the file
    assert current.meta["step"] == 2
    old = tmp_path / "old_export"
    train(cfg_for(ldir, old, max_steps=1, ckpt_every=1))
    shutil.copy(old / "ema.safetensors", out / "ema.safetensors")  # an export one step behind
    capsys.readouterr()
    ema = read_ema(out)
    assert "older than the complete checkpoint" in capsys.readouterr().out
    assert ema.meta["step"] == 2 and ema.meta["ema_state_sha256"] == current.meta["ema_state_sha256"]
    assert ema.state_dict.keys() == current.state_dict.keys()
    assert all(torch.equal(ema.state_dict[k], current.state_dict[k]) for k in current.state_dict)
    assert files.load_safetensors_metadata(out / "ema.safetensors")["step"] == 1  # reading writes nothing


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_a_checkpoint_save_is_one_line_and_cleans_up(ldir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    train(cfg_for(ldir, out, max_steps=1, ckpt_every=1))
    from mdgen_helpers import train as T

    real = T.atomic_save_safetensors
    monkeypatch.setattr(T, "atomic_save_safetensors",
                        lambda t, p, *a, **k: _enospc() if Path(p).name == EMA_STATE else real(t, p, *a, **k))
    assert cli(resume_cli(ldir, out)[:-1] + ["--resume"]) == 2
    line = one_line_error(capsys)
    assert "disk full" in line and str(out / "checkpoints") in line
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000001"]  # no .tmp_step_ left
    monkeypatch.setattr(T, "atomic_save_safetensors", real)
    assert cli(resume_cli(ldir, out)) == 0  # the previous checkpoint still resumes


@pytest.fixture(scope="module")
def extraction_inputs(tmp_path_factory, make_tokenizer):
    from mdgen_helpers import data

    d = tmp_path_factory.mktemp("ext")
    write_images(d / "data", users=2, per_user=4)
    data.ensure_split(d / "data", d / "split.json")
    make_tokenizer(d / "tok.safetensors", seed=0)
    return d


def extract_cli(d: Path, out: Path) -> list[str]:
    return ["extract", "--data_dir", str(d / "data"), "--split", str(d / "split.json"), "--output_path", str(out),
            "--tokenizer", str(d / "tok.safetensors"), "--num_workers", "0", "--no_progress"]


def test_disk_full_during_extraction_is_one_line_and_leaves_no_partial_file(extraction_inputs, tmp_path, monkeypatch,
                                                                             capsys):
    out = tmp_path / "latents"
    # The real writer runs: temp file created and written, then the disk is full at fsync.
    monkeypatch.setattr(os, "fsync", _enospc)
    assert cli(extract_cli(extraction_inputs, out)) == 2
    line = one_line_error(capsys)
    assert "disk full" in line and str(out) in line
    assert not [p for p in out.iterdir() if p.is_file()]
    monkeypatch.undo()
    assert cli(extract_cli(extraction_inputs, out)) == 0


def _tmpfs(path: Path, size: str) -> str | None:
    """Mount a small tmpfs at `path`; the reason it cannot be done, or None."""
    if os.geteuid() != 0:
        return "not running as root"
    if shutil.which("mount") is None:
        return "no mount command"
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    return None if r.returncode == 0 else f"mount failed: {r.stderr.strip()[:200]}"


def _umount(path: Path) -> None:
    import gc

    gc.collect()  # file objects held by a failed save's frames
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_real_full_tmpfs_during_extraction(extraction_inputs, tmp_path, capsys):
    mnt = tmp_path / "small"
    why = _tmpfs(mnt, "300k")  # train latents of 8 images need ~0.5 MB
    if why:
        pytest.skip(f"tmpfs case needs root and a working mount: {why}")
    try:
        assert cli(extract_cli(extraction_inputs, mnt / "latents")) == 2
        line = one_line_error(capsys)
        assert "disk full" in line and str(mnt / "latents") in line
        left = [p for p in (mnt / "latents").iterdir() if p.is_file()]
        assert not [p for p in left if p.name.startswith(".")]  # no temp file; parts written before are whole
        for p in left:
            trust.check_safetensors(p)
    finally:
        _umount(mnt)


# ---------------------------------------------------------------------------------------------
# Files that used to end in a traceback
# ---------------------------------------------------------------------------------------------

def test_pickle_named_safetensors_as_vavae_path_is_one_line(extraction_inputs, tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = tmp_path / "vavae.safetensors"
    evil.write_bytes(pickle.dumps({"state_dict": _Payload(marker)}))
    args = extract_cli(extraction_inputs, tmp_path / "lat")
    args[args.index("--tokenizer"):args.index("--tokenizer") + 2] = ["--vavae_path", str(evil)]
    assert cli(args) == 2
    assert str(evil) in one_line_error(capsys) and not marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_evaluate_pretrained_pickle_is_refused(suffix, tmp_path):
    from mdgen_helpers.classifier import build_classifier

    marker = tmp_path / "marker"
    evil = tmp_path / f"resnet18{suffix}"
    write_crafted_pickle(evil, marker)
    with pytest.raises(CheckpointError, match="resnet18"):
        build_classifier(3, pretrained=str(evil))
    assert not marker.exists()


def test_a_real_full_tmpfs_during_a_checkpoint_save(ldir, tmp_path, capsys):
    mnt = tmp_path / "small"
    why = _tmpfs(mnt, "2m")  # a tiny-model checkpoint (model, optimizer, EMA) needs ~3 MB
    if why:
        pytest.skip(f"tmpfs case needs root and a working mount: {why}")
    try:
        args = resume_cli(ldir, mnt / "run")[:-1]
        args[args.index("--max_steps") + 1] = "1"
        assert cli(args) == 2
        line = one_line_error(capsys)
        assert "disk full" in line and str(mnt / "run" / "checkpoints") in line
        assert list((mnt / "run" / "checkpoints").iterdir()) == []  # the partial temp folder is gone
    finally:
        _umount(mnt)
