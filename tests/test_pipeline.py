"""The one-command pipeline: stages in order, finished stages skipped, few-shot regimes isolated."""

import pytest

from mdgen_helpers import data, pipeline
from mdgen_helpers.errors import MdgenError
from mdgen_helpers.files import read_json
from mdgen_helpers.profiles import get_profile


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """A full cpu-smoke pipeline run (simulate, split, random VA-VAE, extract, train, generate)."""
    profile = get_profile("cpu-smoke")
    root = tmp_path_factory.mktemp("pipe")
    first = pipeline.run_pipeline(profile, root, simulate=True)
    return profile, root, first


def test_pipeline_writes_every_artifact(smoke):
    profile, root, first = smoke
    paths = pipeline.RunPaths(root)
    for f in (paths.split, paths.random_vavae, paths.latents / "stats.safetensors", paths.run / "ema.safetensors",
              paths.generated / "manifest.json", paths.generated / "micro_doppler_grid.png"):
        assert f.is_file(), f
    manifest = read_json(paths.generated / "manifest.json")
    assert len(manifest["images"]) == profile.sim_users * profile.num_samples_per_user
    assert manifest["split_hash"] == data.load_split(paths.split).hash
    assert first["train"]["step"] == profile.train.max_steps


def test_rerun_skips_finished_stages(smoke):
    profile, root, first = smoke
    paths = pipeline.RunPaths(root)
    ema_before = (paths.run / "ema.safetensors").stat().st_mtime_ns
    manifest_before = (paths.generated / "manifest.json").read_bytes()
    again = pipeline.run_pipeline(profile, root, simulate=True)
    assert set(again["latents"].values()) == {"skipped"}
    assert again["train"]["step"] == profile.train.max_steps
    assert (paths.run / "ema.safetensors").stat().st_mtime_ns == ema_before  # no training step was taken
    assert (paths.generated / "manifest.json").read_bytes() == manifest_before


def test_few_shot_regime_sees_only_its_subset(smoke):
    from mdgen_helpers import evaluate

    profile, root, _ = smoke
    k = 2
    out = pipeline.run_pipeline(profile, root, few_shot=k, simulate=True)
    base, regime = pipeline.RunPaths(root), pipeline.RunPaths(root).few_shot(k)
    assert out["work_dir"] == str(regime.root)
    full, sub = data.load_split(base.split), data.load_split(regime.split)
    assert sub.hash == evaluate.few_shot_split(full, k, profile.split_seed).hash
    assert all(n <= k for n in (sum(1 for l in sub.labels("train") if l == u) for u in range(full.user_map.num_users)))
    assert sub.files("test") == full.files("test") and sub.files("val") == full.files("val")
    from mdgen_helpers import latents

    assert len(latents.load_latents(regime.latents, "train").labels) == len(sub.files("train"))
    manifest = read_json(regime.generated / "manifest.json")
    assert manifest["split_hash"] == sub.hash  # what the evaluation's leakage guard checks
    assert not (base.root / "data").joinpath("split.json").exists()  # the data folder is never written to


def test_few_shot_evaluation_draws_the_subset_with_the_split_seed(smoke, tmp_path, monkeypatch):
    """MDGEN_SPLIT_SEED=1: the pipeline draws the few-shot subset with seed 1, and the evaluation
    must redraw the same subset (it used seed 0 and refused the generator with LeakageError)."""
    from mdgen_helpers import evaluate

    monkeypatch.setenv("MDGEN_SPLIT_SEED", "1")
    profile = get_profile("cpu-smoke")
    assert profile.split_seed == 1
    _, root, _ = smoke
    paths, k = pipeline.RunPaths(tmp_path), 2
    data_dir = pipeline.RunPaths(root).data
    full = pipeline.prepare_split(paths, profile, data_dir)
    sub = pipeline.prepare_split(paths.few_shot(k), profile, data_dir, few_shot=k, full_split_path=paths.split)
    assert sub.hash != evaluate.few_shot_split(full, k, 0).hash  # seed 0 would draw another subset
    cfg = pipeline.eval_config(paths, profile, data_dir)
    redrawn = evaluate.few_shot_split(full, k, cfg.few_shot_seed)  # what evaluate() does per regime
    assert redrawn.hash == sub.hash
    evaluate.check_generator_split({"split_hash": sub.hash}, redrawn.hash, f"few_shot_{k}")  # no LeakageError


def test_previews_off_without_a_tokenizer_said_once(tmp_path, capsys):
    """Notebook 02 on Kaggle attaches no VA-VAE: the kaggle-t4x2 profile's previews are turned off, not an error."""
    cfg = pipeline.train_config(pipeline.RunPaths(tmp_path), get_profile("kaggle-t4x2"), None)
    assert cfg.preview_every == 0 and cfg.session_start is not None
    assert capsys.readouterr().out.count("previews off") == 1


def test_no_data_is_an_error_unless_simulation_is_asked_for(tmp_path, monkeypatch):
    from mdgen_helpers.errors import DataError

    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    with pytest.raises(DataError, match="no data set.*SIMULATE"):
        pipeline.ensure_data(pipeline.RunPaths(tmp_path), get_profile("cpu-smoke"), None)
    assert not (tmp_path / "data").exists()


def test_attached_data_sets_are_found_by_marker(tmp_path):
    """ID_01-style names and a data set one level deeper are found; two candidates are an error listing both."""
    from mdgen_helpers import inputs
    from mdgen_helpers.errors import DataError

    root = tmp_path / "input"
    (root / "micro-doppler-data" / "spectrograms" / "ID_01").mkdir(parents=True)
    (root / "micro-doppler-data" / "spectrograms" / "ID_02").mkdir()
    assert inputs.find_data(None, [root]) == root / "micro-doppler-data" / "spectrograms"
    (root / "other" / "ID_1").mkdir(parents=True)
    with pytest.raises(DataError, match="data set: several attached copies") as e:
        inputs.find_data(None, [root])
    assert "spectrograms" in str(e.value) and "other" in str(e.value)
    assert inputs.find_data(None, [tmp_path / "empty"]) is None


def test_upstream_artifacts_are_located_or_named(tmp_path):
    from mdgen_helpers import inputs

    root = tmp_path / "input"
    paths = pipeline.RunPaths(tmp_path / "work")
    with pytest.raises(inputs.MissingInputError, match="notebook 02 .02_train_dit.") as e:
        inputs.locate("run", paths, [root])
    assert str(paths.run) in str(e.value)
    run = root / "notebooks" / "me" / "mdgen-02-train-dit" / "mdgen" / "run"
    run.mkdir(parents=True)
    (run / "ema.safetensors").write_bytes(b"x")
    assert inputs.locate("run", paths, [root]) == run
    gen = root / "mdgen-03-generate" / "mdgen" / "generated"
    (gen / "dataset" / "ID_1").mkdir(parents=True)  # its copy in the data layout is not a data set
    (gen / "manifest.json").write_text("{}")
    assert inputs.locate("generated", paths, [root]) == gen
    assert inputs.find_data(None, [root]) is None
    data = root / "micro-doppler-data"
    (data / "ID_1").mkdir(parents=True)
    (data / "split.json").write_text("{}")  # the CLI's DATA/split.json is not notebook 01's split
    split = root / "mdgen-01-extract-latents" / "mdgen" / "split.json"
    split.parent.mkdir(parents=True)
    split.write_text("{}")
    assert inputs.locate("split", paths, [root]) == split


def test_pipeline_cli_profile_from_hardware_and_explicit_epochs(monkeypatch, capsys):
    """No --profile: picked from the hardware and said; --max_epochs alone is not capped by the profile's max_steps."""
    import argparse

    from mdgen_helpers import env
    from mdgen_helpers.cli import main

    monkeypatch.delenv("MDGEN_PROFILE", raising=False)
    parser = argparse.ArgumentParser()
    pipeline.add_cli_arguments(parser)
    monkeypatch.setattr(env, "default_profile_name", lambda info=None: "kaggle-t4x2")
    prof = pipeline.cli_profile(parser.parse_args(["--output_dir", "w", "--max_epochs", "50"]))
    assert prof.name == "kaggle-t4x2" and prof.train.max_epochs == 50 and prof.train.max_steps is None
    out = capsys.readouterr().out
    assert "picked from the hardware" in out and "step cap is lifted" in out
    prof = pipeline.cli_profile(parser.parse_args(["--output_dir", "w", "--profile", "cpu-demo", "--max_epochs", "5",
                                                   "--max_steps", "100"]))
    assert prof.name == "cpu-demo" and (prof.train.max_epochs, prof.train.max_steps) == (5, 100)
    assert main(["pipeline", "--output_dir", "w"]) == 2  # no --data_dir and no --simulate
    assert "--simulate" in capsys.readouterr().err


def test_the_sim_style_travels_from_the_profile_to_the_data(tmp_path, monkeypatch):
    """`demo --set sim_style=mmwave` becomes MDGEN_SIM_STYLE for the notebooks; notebook 01's
    `ensure_data` then simulates that style, records it, and refuses a folder of another style."""
    from mdgen_helpers.demo import notebook_env

    env = notebook_env("cpu-smoke", tmp_path / "w", overrides={"sim_style": "mmwave", "sim_users": 2, "sim_per_user": 2})
    assert env["MDGEN_SIM_STYLE"] == "mmwave"
    for k in ("MDGEN_SIM_STYLE", "MDGEN_SIM_USERS", "MDGEN_SIM_PER_USER"):
        monkeypatch.setenv(k, env[k])
    profile = get_profile("cpu-smoke")
    assert profile.sim_style == "mmwave"
    paths = pipeline.RunPaths(tmp_path / "w")
    d = pipeline.ensure_data(paths, profile, simulate=True, progress=False)
    meta = read_json(d / "users.json")
    assert meta["style"] == "mmwave" and meta["radar"]["carrier_hz"] == 77e9 and len(meta["users"]) == 2
    assert pipeline.ensure_data(paths, profile, simulate=True, progress=False) == d  # reused as is
    monkeypatch.delenv("MDGEN_SIM_STYLE")
    with pytest.raises(MdgenError, match="made with other settings"):
        pipeline.ensure_data(paths, get_profile("cpu-smoke"), simulate=True, progress=False)
