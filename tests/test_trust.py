"""Tamper corpus for the trust boundary (issue 13): attached checkpoints cannot run code, bad
files are named in one line (exit 2), names from metadata cannot leave their folder, non-finite
numbers are refused. A marker file proves that no crafted pickle is ever executed; the first
test shows that the same pickle does run under a plain torch.load, so the proof can fail.
"""

from __future__ import annotations

import builtins
import shutil
from pathlib import Path

import pytest
import torch
from test_train import cfg_for, write_latents

from mdgen_helpers import files, notebook, trust
from mdgen_helpers.cli import main as cli
from mdgen_helpers.errors import CheckpointError, DataError
from mdgen_helpers.checkpoints import EMA_STATE, latest_checkpoint
from mdgen_helpers.train import train
from mdgen_helpers.users import UserMap


class _Payload:
    """Unpickling this calls exec(), which writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def write_crafted_pickle(path: Path, marker: Path) -> None:
    torch.save({"state": _Payload(marker)}, path)


@pytest.fixture(scope="module")
def ldir(tmp_path_factory):
    return write_latents(tmp_path_factory.mktemp("latents"))


@pytest.fixture(scope="module")
def run2(ldir, tmp_path_factory):
    """A finished 2-step run with checkpoints at steps 1 and 2 (copied per test before tampering)."""
    out = tmp_path_factory.mktemp("run") / "run"
    train(cfg_for(ldir, out, max_steps=2, ckpt_every=1))
    return out


def fresh_copy(run2: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run2, dst)
    return dst


def resume_cli(ldir, out, *extra) -> list[str]:
    return ["train", "--latent_dir", str(ldir), "--output_dir", str(out), "--preset", "tiny",
            "--model_overrides", '{"depth": 2, "hidden_size": 64, "num_heads": 2}', "--batch_size", "8",
            "--max_steps", "3", "--lr", "1e-3", "--warmup_steps", "3", "--val_every", "0", "--ckpt_every", "0",
            "--keep_last", "10", "--seed", "0", "--no_progress", "--resume", *extra]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def test_the_crafted_pickle_runs_under_a_plain_torch_load(tmp_path):
    marker = tmp_path / "marker"
    write_crafted_pickle(tmp_path / "x.pkl", marker)
    torch.load(tmp_path / "x.pkl", weights_only=False)
    assert marker.read_text() == "pwned"


def test_checkpoint_state_is_pickle_free_where_we_write_it(run2):
    ck = latest_checkpoint(run2)
    assert (ck / EMA_STATE).is_file() and not list(ck.glob("custom_checkpoint_*"))
    # every file Accelerate wrote loads with weights_only (numpy RNG state included)
    trust.scan_checkpoint_folder(ck)
    assert files.load_safetensors_metadata(run2 / "ema.safetensors")["step"] == 2


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl",
                                  "scheduler.bin", "scaler.pt", "extra.pt"])
def test_crafted_pickle_in_a_checkpoint_is_refused_before_load_state(name, ldir, run2, tmp_path, capsys):
    out = fresh_copy(run2, tmp_path)
    marker = tmp_path / "marker"
    write_crafted_pickle(latest_checkpoint(out) / name, marker)
    assert cli(resume_cli(ldir, out)) == 2
    line = one_line_error(capsys)
    assert name in line and "not executed" in line
    assert str(out / "checkpoints" / "step_0000001") in line  # the previous complete checkpoint is offered
    assert not marker.exists()
    # the offered checkpoint resumes
    assert cli(resume_cli(ldir, out, str(out / "checkpoints" / "step_0000001"))) == 0
    assert not marker.exists()


def test_checkpoint_from_before_ema_state_resumes_through_the_safe_loader(ldir, run2, tmp_path):
    """Older checkpoints held the EMA as Accelerate's custom_checkpoint_0.pkl: read with weights_only."""
    from safetensors.torch import load_file

    out = fresh_copy(run2, tmp_path)
    ck = latest_checkpoint(out)
    torch.save(load_file(str(ck / EMA_STATE)), ck / "custom_checkpoint_0.pkl")
    (ck / EMA_STATE).unlink()
    res = train(cfg_for(ldir, out, max_steps=3, resume=True))
    assert res["step"] == 3 and files.load_safetensors_metadata(out / "ema.safetensors")["step"] == 3
    assert not list(latest_checkpoint(out).glob("custom_checkpoint_*"))  # new checkpoints are pickle-free


def test_truncated_model_safetensors_on_resume_is_one_line(ldir, run2, tmp_path, capsys):
    out = fresh_copy(run2, tmp_path)
    f = latest_checkpoint(out) / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert cli(resume_cli(ldir, out)) == 2
    line = one_line_error(capsys)
    assert "model.safetensors" in line and "step_0000001" in line


def test_truncated_optimizer_on_resume_is_one_line(ldir, run2, tmp_path, capsys):
    out = fresh_copy(run2, tmp_path)
    f = latest_checkpoint(out) / "optimizer.bin"
    f.write_bytes(f.read_bytes()[:100])
    assert cli(resume_cli(ldir, out)) == 2
    assert "optimizer.bin" in one_line_error(capsys)


def test_adopting_an_attached_run_is_explicit_scanned_and_printed(run2, tmp_path, monkeypatch, capsys):
    from mdgen_helpers import env

    monkeypatch.setattr(env, "on_kaggle", lambda: True)
    monkeypatch.setattr(env, "find_inputs", lambda *a, **k: {"checkpoint": [run2]})
    paths = notebook.RunPaths(tmp_path / "work")
    # found but not adopted without an explicit choice
    assert notebook.adopt_previous_run(paths, "") is None
    assert "not adopted automatically" in capsys.readouterr().out and not paths.run.exists()
    # explicit: copied, with path and sha256 printed
    assert notebook.adopt_previous_run(paths, str(run2)) == run2
    printed = capsys.readouterr().out
    digest = trust.folder_sha256(latest_checkpoint(run2))
    assert str(latest_checkpoint(run2)) in printed and digest in printed
    assert latest_checkpoint(paths.run).name == "step_0000002"


def test_adopting_a_tampered_run_runs_nothing(run2, tmp_path):
    src = fresh_copy(run2, tmp_path)
    marker = tmp_path / "marker"
    write_crafted_pickle(latest_checkpoint(src) / "custom_checkpoint_0.pkl", marker)
    paths = notebook.RunPaths(tmp_path / "work")
    with pytest.raises(CheckpointError, match="custom_checkpoint_0.pkl"):
        notebook.adopt_previous_run(paths, str(src))
    assert not marker.exists() and latest_checkpoint(paths.run) is None


def test_changed_training_settings_on_resume_are_refused(ldir, run2, tmp_path, capsys):
    out = fresh_copy(run2, tmp_path)
    before = (out / "config.json").read_text()
    args = resume_cli(ldir, out)
    args[args.index("--lr") + 1] = "0.05"
    assert cli(args) == 2
    line = one_line_error(capsys)
    assert "lr 0.001 -> 0.05" in line
    assert (out / "config.json").read_text() == before  # nothing recorded that was not used


def test_nan_in_ema_weights_is_refused_at_load(ldir, run2, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    out = fresh_copy(run2, tmp_path)
    f = latest_checkpoint(out) / EMA_STATE
    sd = load_file(str(f))
    key = next(k for k in sd if k.startswith("module.") and sd[k].is_floating_point())
    sd[key][...] = float("nan")
    save_file(sd, str(f))
    assert cli(resume_cli(ldir, out)) == 2
    assert "NaN" in one_line_error(capsys)


def test_nan_in_val_latents_is_refused(tmp_path):
    d = write_latents(tmp_path / "lat")
    from safetensors.torch import load_file

    t = load_file(str(d / "val.safetensors"))
    t["latents"][0, 0, 0, 0] = float("nan")
    files.atomic_save_safetensors(t, d / "val.safetensors", files.load_safetensors_metadata(d / "val.safetensors"))
    with pytest.raises(DataError, match="val latents"):
        train(cfg_for(d, tmp_path / "run", val_every=1))


def test_json_never_holds_nan(tmp_path):
    files.atomic_write_json(tmp_path / "x.json", {"val_loss": float("nan"), "a": [float("inf"), 1.0]})
    assert "NaN" not in (tmp_path / "x.json").read_text() and "Infinity" not in (tmp_path / "x.json").read_text()
    assert files.read_json(tmp_path / "x.json") == {"val_loss": None, "a": [None, 1.0]}


def test_output_dir_that_is_a_file_is_one_line(ldir, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    args = resume_cli(ldir, f)
    assert cli(args[:-1]) == 2
    assert "is a file" in one_line_error(capsys)


@pytest.mark.parametrize("bad", ["..", ".", "", "../../escaped", "/abs", "a/b", "a\\b"])
def test_names_from_metadata_must_be_one_component(bad):
    with pytest.raises(DataError, match="unsafe"):
        trust.safe_component(bad, "folder")
    assert trust.safe_component("ID_1") == "ID_1"


def test_inside_refuses_paths_leaving_the_root(tmp_path):
    assert trust.inside(tmp_path, "a/b.png") == (tmp_path / "a/b.png").resolve()
    for bad in ("../x", "a/../../x", "/etc/passwd"):
        with pytest.raises(DataError, match="outside"):
            trust.inside(tmp_path, bad)
    (tmp_path / "link").symlink_to("/")
    with pytest.raises(DataError, match="outside"):
        trust.inside(tmp_path, "link/etc")


# ---------------------------------------------------------------------------------------------
# generate: owned output folder, names from metadata, finite checks
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gen_inputs(tmp_path_factory, make_tokenizer, write_tiny_run):
    d = tmp_path_factory.mktemp("gen")
    tok = make_tokenizer(d / "tok.safetensors", seed=0)
    write_tiny_run(d, tok.identity)
    return d


def gen_cli(d: Path, out: Path, *extra) -> list[str]:
    return ["generate", "--dit_checkpoint", str(d), "--tokenizer", str(d / "tok.safetensors"), "--output_dir",
            str(out), "--user_ids", "1", "2", "--num_samples_per_user", "2", "--num_steps", "2", "--no_progress",
            "--export_dataset", *extra]


def listed(out: Path) -> set[str]:
    from mdgen_helpers.generate import _manifest_files

    return set(_manifest_files(files.read_json(out / "manifest.json")))


def on_disk(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


def test_generate_owns_its_output_folder(gen_inputs, tmp_path, capsys):
    out = tmp_path / "gen"
    assert cli(gen_cli(gen_inputs, out)) == 0
    assert on_disk(out) == listed(out)
    capsys.readouterr()
    # a second run into the same folder: refused without --overwrite, nothing touched
    before = on_disk(out)
    assert cli(gen_cli(gen_inputs, out)) == 2
    assert "--overwrite" in one_line_error(capsys) and on_disk(out) == before
    # smaller run with --overwrite: the folder holds exactly the new manifest's files (export included)
    args = gen_cli(gen_inputs, out, "--overwrite")
    args[args.index("--user_ids") + 1: args.index("--num_samples_per_user")] = ["2"]
    assert cli(args) == 0
    assert on_disk(out) == listed(out) and len(files.read_json(out / "manifest.json")["images"]) == 2
    # evaluation lists exactly the manifest's images, also through the dataset/ export
    from mdgen_helpers.classifier import find_generated

    um = UserMap.from_folders([f"ID_{k}" for k in range(1, 6)])
    assert len(find_generated(out, um)[0]) == 2 and len(find_generated(out / "dataset", um)[0]) == 2
    # a generation killed midway (here: an error in the second batch) leaves the previous one whole
    from mdgen_helpers import generate as g

    before = {f: (out / f).read_bytes() for f in on_disk(out)}
    real, calls = g.decode_to_uint8, []

    def fail_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    g.decode_to_uint8 = fail_second
    try:
        with pytest.raises(KeyboardInterrupt):
            cli(gen_cli(gen_inputs, out, "--overwrite", "--batch_size", "1"))
    finally:
        g.decode_to_uint8 = real
    assert {f: (out / f).read_bytes() for f in on_disk(out)} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["gen"]
    # files no manifest lists are never deleted
    (out / "mine.txt").write_text("keep")
    assert cli(gen_cli(gen_inputs, out, "--overwrite")) == 2
    assert "mine.txt" in one_line_error(capsys) and (out / "mine.txt").is_file()


def test_output_dir_that_is_a_file_for_generate_and_evaluate(gen_inputs, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert cli(gen_cli(gen_inputs, f)) == 2
    assert "is a file" in one_line_error(capsys)
    assert cli(["evaluate", "--data_dir", str(tmp_path), "--split", str(tmp_path / "s.json"),
                "--output_dir", str(f)]) == 2
    assert "is a file" in one_line_error(capsys)


def _retagged_run(gen_inputs: Path, dst: Path, **meta_changes) -> Path:
    from safetensors.torch import load_file

    dst.mkdir()
    shutil.copy(gen_inputs / "tok.safetensors", dst / "tok.safetensors")
    sd = load_file(str(gen_inputs / "ema.safetensors"))
    meta = {**files.load_safetensors_metadata(gen_inputs / "ema.safetensors"), **meta_changes}
    if "nan" in meta_changes:
        del meta["nan"]
        k = next(k for k in sd if sd[k].is_floating_point())
        sd[k][...] = float("nan")
    files.atomic_save_safetensors(sd, dst / "ema.safetensors", meta)
    return dst


def test_user_folder_name_from_metadata_cannot_escape(gen_inputs, tmp_path, capsys):
    folders = ["ID_1", "../../escaped", "ID_3", "ID_4", "ID_5"]
    d = _retagged_run(gen_inputs, tmp_path / "evil", user_map={"folders": folders, "user_ids": [1, 2, 3, 4, 5]})
    assert cli(gen_cli(d, tmp_path / "deep" / "er" / "gen")) == 2
    assert "unsafe user folder name '../../escaped'" in one_line_error(capsys)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "deep" / "escaped").exists()


def test_nan_ema_weights_refused_by_generate(gen_inputs, tmp_path, capsys):
    d = _retagged_run(gen_inputs, tmp_path / "nan", nan=True)
    assert cli(gen_cli(d, tmp_path / "gen")) == 2
    assert "NaN" in one_line_error(capsys) and not (tmp_path / "gen").exists()


def test_non_finite_sampled_latents_and_decoded_images_are_not_written(gen_inputs, tmp_path, monkeypatch):
    from mdgen_helpers import generate as g
    from mdgen_helpers.tokenizers import load_tokenizer

    gen = g.load_generator(gen_inputs)
    tok = load_tokenizer(gen_inputs / "tok.safetensors")
    real = g.sample_latents
    monkeypatch.setattr(g, "sample_latents", lambda *a, **k: (lambda r: (r[0] * float("nan"), r[1]))(real(*a, **k)))
    with pytest.raises(DataError, match="sampled latents"):
        g.generate_images(gen, tok, tmp_path / "a", [1], 1, g.SamplingSettings(num_steps=2), progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the output folder nor its staging folder
    monkeypatch.setattr(g, "sample_latents", real)
    monkeypatch.setattr(tok, "decode", lambda z: torch.full((z.shape[0], 3, 256, 256), float("nan")))
    with pytest.raises(DataError, match="decoded images"):
        g.generate_images(gen, tok, tmp_path / "b", [1], 1, g.SamplingSettings(num_steps=2), progress=False)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Content identity and paths of the data set
# ---------------------------------------------------------------------------------------------

def write_images(root: Path, users: int = 2, per_user: int = 4, seed: int = 0) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for u in range(1, users + 1):
        (root / f"ID_{u}").mkdir(parents=True, exist_ok=True)
        for k in range(per_user):
            arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / f"ID_{u}" / f"img_{k}.png")
    return root


def test_split_records_content_and_refuses_changed_or_new_files(tmp_path):
    from PIL import Image

    from mdgen_helpers import data
    from mdgen_helpers.errors import SplitMismatchError

    d = write_images(tmp_path / "data")
    sp = tmp_path / "split.json"
    split = data.ensure_split(d, sp)
    assert set(files.read_json(sp)["sha256"]) == {f for p in data.PARTS for f in split.files(p)}
    data.ensure_split(d, sp)  # unchanged: accepted
    # an image replaced in place under the same name
    Image.new("RGB", (32, 32), (1, 2, 3)).save(d / "ID_1" / "img_0.png")
    with pytest.raises(SplitMismatchError, match=r"1 files changed.*ID_1/img_0.png.*re-run `python -m mdgen_helpers split"):
        data.ensure_split(d, sp)
    # re-splitting records the new content, so the split hash (and everything keyed on it) changes
    assert data.cli_main(type("A", (), {"data_dir": str(d), "out": str(sp), "seed": 0, "fractions": [0.7, 0.15, 0.15],
                                         "workers": 1})()) == 0
    assert data.load_split(sp).hash != split.hash
    # a new user folder and a new file
    write_images(tmp_path / "more", users=5, per_user=1, seed=3)
    shutil.copytree(tmp_path / "more" / "ID_5", d / "ID_5")
    shutil.copy(tmp_path / "more" / "ID_3" / "img_0.png", d / "ID_2" / "new.png")
    with pytest.raises(SplitMismatchError, match=r"1 new user folders \(ID_5\); 1 new files \(ID_2/new.png\)"):
        data.ensure_split(d, sp)


def test_split_paths_must_stay_in_the_data_folder(tmp_path):
    from mdgen_helpers import data
    from mdgen_helpers.errors import SplitMismatchError

    d = write_images(tmp_path / "data")
    obj = data.make_split(data.validate_dataset(d, workers=1)).to_json()
    obj["parts"]["train"]["../outside.png"] = 0
    del obj["hash"]
    with pytest.raises(SplitMismatchError, match="not a plain relative path"):
        data.Split.from_json(obj)


def test_symlink_leaving_the_data_folder_is_skipped_and_reported(tmp_path):
    from mdgen_helpers import data

    d = write_images(tmp_path / "data")
    secret = write_images(tmp_path / "elsewhere", users=1, per_user=1, seed=9) / "ID_1" / "img_0.png"
    (d / "ID_1" / "link.png").symlink_to(secret)
    report = data.validate_dataset(d, workers=1)
    skipped = {s.relpath: s for s in report.skipped}
    assert skipped["ID_1/link.png"].kind == "outside" and "ID_1/link.png" not in {r.relpath for r in report.records}
