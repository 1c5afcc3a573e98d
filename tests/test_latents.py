"""Latent extraction: files, metadata, train-only statistics, skip/recompute, sharding, errors."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mdgen_helpers import data, latents, vavae
from mdgen_helpers.errors import ArtifactMismatchError, MdgenError, SplitMismatchError
from mdgen_helpers.tokenizers import fit_standin, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, write_simulated_split):
    """3 simulated users x 7 images, persisted split, a stand-in, and one extraction."""
    work = tmp_path_factory.mktemp("work")
    root, split = write_simulated_split(work, num_users=3, per_user=7, seed=1)
    tok = fit_standin(data.ImageDataset(root, split, "train"), num_images=64, seed=0, progress=False)
    tok.save(work / "tokenizer.safetensors")
    status = latents.extract_latents(root, split, tok, work / "latents", batch_size=4, num_workers=0, progress=False)
    return work, root, split, tok, status


def test_files_shapes_dtypes_metadata(setup):
    work, root, split, tok, status = setup
    assert status == {"train": "written", "val": "written", "test": "written", "stats": "written"}
    sets = {p: latents.load_latents(work / "latents", p) for p in latents.PARTS}
    latents.check_consistent(*sets.values())
    for part, s in sets.items():
        n = len(split.files(part))
        assert s.latents.shape == s.latents_std.shape == (n, 32, 16, 16)
        assert s.latents.dtype == s.latents_std.dtype == torch.float32 and s.labels.dtype == torch.int64
        assert s.labels.tolist() == split.labels(part) and s.files == split.files(part)
        assert s.tokenizer == tok.identity and s.split_hash == split.hash and s.part == part
        assert s.user_map == split.user_map and s.meta["image_size"] == 256
    # rows are in split order: row k is the encoding of file k
    s = sets["val"]
    for k in (0, len(s) - 1):
        expected, _ = tok.encode(data.load_image(root / s.files[k]))
        torch.testing.assert_close(s.latents[k], expected[0])


def test_stats_are_train_only(setup):
    work, *_ = setup
    stats, meta = latents.load_stats(work / "latents")
    mean, std = stats.mean, stats.std
    train = latents.load_latents(work / "latents", "train").latents
    z = train.transpose(0, 1).reshape(32, -1).double()
    torch.testing.assert_close(mean, z.mean(1).float())
    torch.testing.assert_close(std, z.std(1, correction=0).float())
    everything = torch.cat([latents.load_latents(work / "latents", p).latents for p in latents.PARTS])
    all_stats = latents.LatentStats.of(everything)
    all_mean, all_std = all_stats.mean, all_stats.std
    assert not torch.allclose(mean, all_mean) and not torch.allclose(std, all_std)
    assert meta["split_hash"] == latents.load_latents(work / "latents", "train").split_hash


def test_merged_shards_equal_single_process(setup):
    work, root, split, tok, _ = setup
    ds = data.ImageDataset(root, split, "train")
    n = len(ds)
    rows1, mean1, std1 = latents.encode_shard(ds, tok, 0, 1, batch_size=4, num_workers=0)
    shards = [latents.encode_shard(ds, tok, i, 2, batch_size=3, num_workers=0) for i in (1, 0)]  # any arrival order
    rows = torch.cat([r for r, _, _ in shards] + [torch.full((1,), -1)])  # plus one padding row
    mean = torch.cat([m for _, m, _ in shards] + [torch.zeros(1, 32, 16, 16)])
    std = torch.cat([s for _, _, s in shards] + [torch.zeros(1, 32, 16, 16)])
    merged_mean, merged_std = latents.merge_shards(rows, mean, std, n)
    assert torch.equal(rows1, torch.arange(n))
    torch.testing.assert_close(merged_mean, mean1)
    torch.testing.assert_close(merged_std, std1)
    # a duplicated or a dropped row is an error, never silently written
    dup = rows.clone()
    dup[0] = dup[1]
    with pytest.raises(MdgenError, match="1 missing, 1 duplicated"):
        latents.merge_shards(dup, mean, std, n)
    with pytest.raises(MdgenError, match="missing"):
        latents.merge_shards(rows[1:], mean[1:], std[1:], n)
    # shard ranges tile [0, n) for any process count, including more processes than rows
    for p in (1, 2, 3, 5, n + 2):
        ranges = [latents.shard_range(n, i, p) for i in range(p)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_rerun_skips_and_changed_inputs_recompute(setup, tmp_path):
    work, root, split, tok, _ = setup
    out = tmp_path / "latents"
    shutil.copytree(work / "latents", out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    status = latents.extract_latents(root, split, tok, out, batch_size=4, num_workers=0, progress=False)
    assert set(status.values()) == {"skipped"}
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    # another tokenizer (other fit) -> every part and the stats recomputed
    other = fit_standin(data.ImageDataset(root, split, "train"), num_images=5, seed=3, progress=False)
    assert other.identity != tok.identity
    status = latents.extract_latents(root, split, other, out, batch_size=4, num_workers=0, progress=False)
    assert set(status.values()) == {"written"}
    assert latents.load_stats(out)[1]["tokenizer"] == other.identity

    # a changed split (few-shot subsample of train) -> new split hash -> recomputed, stats follow
    few = data.subsample_split(split, per_user=2, seed=0)
    status = latents.extract_latents(root, few, other, out, batch_size=4, num_workers=0, progress=False)
    assert set(status.values()) == {"written"}
    assert len(latents.load_latents(out, "train")) == 6
    assert latents.load_stats(out, split_hash=few.hash)[1]["split_hash"] == few.hash

    # only the stats deleted -> parts skipped, stats recomputed from the train file
    os.remove(out / "stats.safetensors")
    status = latents.extract_latents(root, few, other, out, batch_size=4, num_workers=0, progress=False)
    assert status == {"train": "skipped", "val": "skipped", "test": "skipped", "stats": "written"}


def test_extraction_leaves_the_accelerator_state_free(setup):
    """Only PartialState is used, so training may still pick its mixed precision in this process."""
    from accelerate.state import AcceleratorState

    work, root, split, tok, _ = setup
    # Start from a clean state whatever ran before in this process (no order-dependent skip).
    AcceleratorState._reset_state(reset_partial_state=True)
    latents.extract_latents(root, split, tok, work / "latents", num_workers=0, progress=False)
    assert not AcceleratorState._shared_state


def test_missing_and_mismatching_stats_and_parts(setup, tmp_path):
    work, root, split, tok, _ = setup
    out = tmp_path / "latents"
    shutil.copytree(work / "latents", out)
    with pytest.raises(ArtifactMismatchError, match="tokenizer"):
        latents.load_stats(out, tokenizer="vavae-f16d32-ch128:0000000000000000")
    with pytest.raises(ArtifactMismatchError, match="split_hash"):
        latents.load_stats(out, split_hash="f" * 64)

    # stats of another extraction next to these latents are refused
    other_dir = tmp_path / "other"
    other = fit_standin(data.ImageDataset(root, split, "train"), num_images=5, seed=3, progress=False)
    latents.extract_latents(root, split, other, other_dir, batch_size=8, num_workers=0, progress=False)
    shutil.copy(other_dir / "stats.safetensors", out / "stats.safetensors")
    with pytest.raises(ArtifactMismatchError, match="do not match"):
        latents.load_stats(out)
    # parts from different tokenizers are refused together
    with pytest.raises(ArtifactMismatchError, match="different tokenizer"):
        latents.check_consistent(latents.load_latents(out, "train"), latents.load_latents(other_dir, "val"))

    os.remove(out / "stats.safetensors")
    with pytest.raises(MdgenError, match="missing.*never substituted"):
        latents.load_stats(out)
    with pytest.raises(MdgenError, match="run `python -m mdgen_helpers extract`"):
        latents.load_latents(tmp_path / "nowhere", "train")


def test_missing_images_refused_before_anything_is_written(setup, tmp_path):
    work, root, split, tok, _ = setup
    data_copy = tmp_path / "data"
    shutil.copytree(root, data_copy)
    os.remove(data_copy / split.files("test")[0])
    with pytest.raises(SplitMismatchError, match="missing"):
        latents.extract_latents(data_copy, split, tok, tmp_path / "latents", num_workers=0, progress=False)
    assert not (tmp_path / "latents").exists()


def test_cli_extract_in_process(setup, tmp_path, capsys):
    from mdgen_helpers.cli import main

    work, root, split, tok, _ = setup
    base = ["extract", "--data_dir", str(root), "--split", str(work / "split.json"), "--output_path", str(tmp_path / "lat"),
            "--batch_size", "8", "--num_workers", "1", "--no_progress"]
    assert main(base + ["--tokenizer", str(work / "tokenizer.safetensors")]) == 0
    assert "train written" in capsys.readouterr().out
    for p in latents.PARTS:
        torch.testing.assert_close(latents.load_latents(tmp_path / "lat", p).latents,
                                   latents.load_latents(work / "latents", p).latents)
    # --vavae_path accepts any tokenizer file too (dispatch by content); the result is up to date
    assert main(base + ["--vavae_path", str(work / "tokenizer.safetensors")]) == 0
    assert "train skipped" in capsys.readouterr().out
    assert main(base) == 2  # neither path given
    assert "exactly one" in capsys.readouterr().err


def test_cli_extract_without_split_makes_or_reuses_data_split(setup, tmp_path, capsys):
    """The README's stage-1 command (no --split) works verbatim: DATA/split.json is made, then reused."""
    from mdgen_helpers.cli import main

    work, root, split, tok, _ = setup
    data_copy = tmp_path / "data"
    shutil.copytree(root, data_copy, ignore=shutil.ignore_patterns("split.json", "validation.json"))
    cmd = ["extract", "--data_dir", str(data_copy), "--vavae_path", str(work / "tokenizer.safetensors"),
           "--output_path", str(tmp_path / "lat"), "--batch_size", "8", "--num_workers", "0", "--no_progress"]
    assert main(cmd) == 0
    made = data.load_split(data_copy / "split.json")
    assert "train written" in capsys.readouterr().out
    assert main(cmd) == 0
    assert "train skipped" in capsys.readouterr().out
    assert data.load_split(data_copy / "split.json").hash == made.hash


def test_two_process_gloo_extraction_matches_single_process(setup, tmp_path):
    """A real `accelerate launch --num_processes 2 --cpu` run (gloo): shards are gathered in order."""
    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate launcher is not on PATH")
    work, root, split, tok, _ = setup
    out = tmp_path / "lat2"
    cmd = ["accelerate", "launch", "--num_processes", "2", "--cpu", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "mdgen_helpers", "extract", "--data_dir", str(root),
           "--split", str(work / "split.json"), "--tokenizer", str(work / "tokenizer.safetensors"),
           "--output_path", str(out), "--batch_size", "2", "--num_workers", "0", "--no_progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for p in latents.PARTS:
        a, b = latents.load_latents(out, p), latents.load_latents(work / "latents", p)
        assert a.meta == b.meta
        torch.testing.assert_close(a.latents, b.latents)
        assert torch.equal(a.labels, b.labels)
    a, b = latents.load_stats(out)[0], latents.load_stats(work / "latents")[0]
    for x, y in ((a.mean, b.mean), (a.std, b.std)):
        torch.testing.assert_close(x, y)


def test_vavae_extraction_through_random_official_checkpoint(setup, tmp_path):
    work, root, split, _, _ = setup
    ckpt = vavae.write_random_checkpoint(tmp_path / "vavae.pt", seed=0, ch=32)
    tok = load_tokenizer(ckpt)
    few = data.subsample_split(split, per_user=1, seed=0)  # keep the CPU cost of the small VAE low
    few.parts["val"], few.parts["test"] = few.parts["val"][:1], few.parts["test"][:1]
    status = latents.extract_latents(root, few, tok, tmp_path / "lat", batch_size=4, num_workers=0, progress=False)
    assert set(status.values()) == {"written"}
    s = latents.load_latents(tmp_path / "lat", "train")
    assert s.latents.shape == (3, 32, 16, 16) and torch.all(s.latents_std > 0)
    assert s.tokenizer == vavae.vavae_identity(ckpt)
    assert latents.load_stats(tmp_path / "lat")[1]["tokenizer"] == tok.identity


def test_latent_stats_normalise_and_back():
    g = torch.Generator().manual_seed(0)
    z = torch.randn((6, 32, 4, 4), generator=g) * torch.linspace(0.5, 3.0, 32).view(1, -1, 1, 1) + 2.0
    stats = latents.LatentStats.of(z)
    n = stats.normalize(z)
    torch.testing.assert_close(n.mean(dim=(0, 2, 3)), torch.zeros(32), atol=1e-5, rtol=0)
    torch.testing.assert_close(n.std(dim=(0, 2, 3), correction=0), torch.ones(32), atol=1e-4, rtol=0)
    torch.testing.assert_close(stats.denormalize(n), z, atol=1e-5, rtol=0)
    back = latents.LatentStats.from_json(stats.to_json())  # the checkpoint metadata keys
    assert set(stats.to_json()) == {"latent_mean", "latent_std"}
    assert torch.equal(back.mean, stats.mean) and torch.equal(back.std, stats.std)
