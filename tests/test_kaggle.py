"""Kaggle delivery: metadata validity, bundle build + offline install, input discovery."""

import json
import subprocess
import venv
from pathlib import Path

import pytest

from mdgen_helpers import env, kaggle


def test_every_metadata_file_is_valid():
    results = kaggle.check_all_metadata()
    assert any(k.endswith("dataset-metadata.json") for k in results)
    assert sum(k.endswith("kernel-metadata.json") for k in results) == 4  # one per numbered notebook
    assert {k: v for k, v in results.items() if v} == {}


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"title": "abc"}, "title"),
        ({"title": "x" * 51}, "title"),
        ({"id": "noslash"}, "owner/slug"),
        ({"id": "me/ab"}, "slug"),
        ({"licenses": [{"name": "other"}, {"name": "CC0-1.0"}]}, "exactly one"),
        ({"licenses": [{"name": "WTFPL"}]}, "unknown licence"),
        ({"licenses": [{"name": "MIT"}]}, "unknown licence"),          # not in Kaggle's list
        ({"licenses": [{"name": "Apache 2.0"}]}, "unknown licence"),   # Kaggle spells it apache-2.0
    ],
)
def test_dataset_metadata_rules(patch, needle):
    meta = {"title": "A fine title", "id": "me/fine-slug", "licenses": [{"name": "apache-2.0"}]}
    assert kaggle.validate_dataset_metadata(meta) == []
    meta.update(patch)
    problems = kaggle.validate_dataset_metadata(meta)
    assert problems and any(needle in p for p in problems)


def test_kernel_metadata_rules():
    meta = kaggle.read_json(kaggle.METADATA_DIR / "kernels" / "02_train_dit" / "kernel-metadata.json")
    assert kaggle.validate_kernel_metadata(meta) == []
    for key, value, needle in [("machine_shape", None, "NvidiaTeslaT4"), ("enable_internet", None, "explicitly"),
                               ("enable_gpu", False, "enable_gpu"), ("docker_image", "gcr.io/x", "docker_image")]:
        bad = dict(meta)
        if value is None:
            bad.pop(key)
        else:
            bad[key] = value
        assert any(needle in p for p in kaggle.validate_kernel_metadata(bad)), key


def test_kernel_folder_is_push_ready(tmp_path):
    out = kaggle.build_kernel("02", tmp_path / "k02", owner="alice")
    meta = json.loads((out / "kernel-metadata.json").read_text())
    assert (out / meta["code_file"]).is_file()
    assert meta["id"].startswith("alice/") and all(s.startswith("alice/") for s in meta["dataset_sources"])
    assert meta["kernel_sources"] == ["alice/mdgen-01-extract-latents"]  # chained to notebook 01's output


def test_kernel_titles_slugify_to_their_ids():
    assert kaggle.slugify("mdgen 02 - train LightningDiT") == "mdgen-02-train-lightningdit"
    for name in ("01_extract_latents", "02_train_dit", "03_generate", "04_evaluate"):
        meta = kaggle.read_json(kaggle.METADATA_DIR / "kernels" / name / "kernel-metadata.json")
        assert kaggle.slugify(meta["title"]) == meta["id"].split("/", 1)[1]
    bad = dict(meta, title="mdgen 04 - evaluate generated spectrograms")
    assert any("slugifies to" in p for p in kaggle.validate_kernel_metadata(bad))


def test_builders_outside_a_checkout_say_so(monkeypatch, tmp_path):
    """Run from an installed wheel, REPO_ROOT is site-packages: a clear error, not a copy of it."""
    monkeypatch.setattr(kaggle, "REPO_ROOT", tmp_path)
    for call in (lambda: kaggle.build_bundle(tmp_path / "b"), lambda: kaggle.find_notebook("02"),
                 kaggle.check_all_metadata):
        with pytest.raises(kaggle.MdgenError, match="repository checkout"):
            call()
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_bundle_installs_offline_in_fresh_venv(tmp_path):
    out = kaggle.build_bundle(tmp_path / "bundle", owner="alice")
    assert json.loads((out / "dataset-metadata.json").read_text())["id"] == "alice/mdgen-helpers"
    marker = json.loads((out / kaggle.BUNDLE_MARKER).read_text())
    wheel = out / marker["wheel"]
    assert wheel.is_file() and (out / "src" / "mdgen_helpers" / "__init__.py").is_file()
    # a fresh virtualenv, no index: exactly what a Kaggle session without internet does
    venv_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(venv_dir)
    py = venv_dir / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheel)], check=True)
    code = "import mdgen_helpers, mdgen_helpers.users, mdgen_helpers.profiles as p; print(mdgen_helpers.__version__, p.get_profile('cpu-smoke').name)"
    res = subprocess.run([py, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert res.stdout.split() == [marker["version"], "cpu-smoke"]
    # the bundle is itself found by its marker
    assert env.find_inputs([tmp_path])["helpers"] == [out]


def _touch(path: Path, data: bytes = b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.mark.parametrize("layout", ["old", "new"])
def test_find_inputs_in_both_mount_layouts(tmp_path, layout):
    root = tmp_path / "input"
    base = root if layout == "old" else root / "datasets" / "alice"
    _touch(base / "mdgen-helpers" / "mdgen_bundle.json", b"{}")
    _touch(base / "vavae-f16d32" / "vavae-f16d32.safetensors")
    _touch(base / "mdgen-latents" / "latents" / "stats.safetensors")
    _touch(base / "mdgen-checkpoints" / "run" / "ema.safetensors")
    for k in (1, 2, 10):
        _touch(base / "micro-doppler-data" / f"ID_{k}" / "a.jpg")
    _touch(base / "unrelated" / "notes.txt")
    found = env.find_inputs([root])
    assert found["helpers"] == [base / "mdgen-helpers"]
    assert found["vavae"] == [base / "vavae-f16d32" / "vavae-f16d32.safetensors"]
    assert found["latents"] == [base / "mdgen-latents" / "latents"]
    assert found["checkpoint"] == [base / "mdgen-checkpoints" / "run"]
    assert found["data"] == [base / "micro-doppler-data"]


def test_find_inputs_missing_root_is_empty(tmp_path):
    assert all(v == [] for v in env.find_inputs([tmp_path / "nope"]).values())


def test_precision_by_compute_capability_not_bf16_flag():
    t4 = env.GpuInfo(0, "Tesla T4", (7, 5), 15.0)
    a100 = env.GpuInfo(0, "A100", (8, 0), 40.0)
    assert env.choose_precision([]) == "no"
    assert env.choose_precision([t4, t4]) == "fp16"
    assert env.choose_precision([a100]) == "bf16"
    assert env.choose_precision([a100, t4]) == "fp16"  # the weakest GPU decides


def test_launcher_choice(monkeypatch):
    import accelerate
    import torch

    assert env.notebook_launcher_status(1)[0] == "in-process"
    monkeypatch.setattr(torch, "__version__", "2.9.0")
    monkeypatch.setattr(accelerate, "__version__", "1.13.0")
    kind, reason = env.notebook_launcher_status(2)
    assert kind == "subprocess" and "1.14" in reason
    monkeypatch.setattr(accelerate, "__version__", "1.14.0")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert env.notebook_launcher_status(2)[0] == "subprocess"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    monkeypatch.setattr(env, "KAGGLE_WORKING", Path("/nonexistent/kaggle/working"))
    assert env.notebook_launcher_status(2)[0] == "notebook_launcher"
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")  # on Kaggle: the subprocess, whatever the versions
    kind, reason = env.notebook_launcher_status(2)
    assert kind == "subprocess" and "Kaggle" in reason and "initialization error" in reason


def test_launcher_fallback_recognises_cuda_initialization_errors():
    from mdgen_helpers.launch import launcher_refused

    assert launcher_refused(RuntimeError("CUDA error: initialization error"))
    assert launcher_refused(ValueError("CUDA has been initialized before the `notebook_launcher` could create a forked subprocess"))
    assert not launcher_refused(RuntimeError("CUDA out of memory"))


def test_working_space_warning(tmp_path):
    _touch(tmp_path / "big.bin", b"0" * 2048)
    assert env.check_working_space(tmp_path, limit_gb=1.0) is None
    warning = env.check_working_space(tmp_path, limit_gb=2048 / 2**30)
    assert warning and "limit" in warning


def test_summary_and_cli_run_without_gpu(capsys, tmp_path):
    from mdgen_helpers.cli import main

    text = env.summary()
    assert "precision" in text and "training" in text
    assert main(["kaggle", "env", "--input_root", str(tmp_path)]) == 0
    assert "helpers" in capsys.readouterr().out
    assert main(["kaggle", "check"]) == 0
