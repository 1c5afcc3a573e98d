"""generate: checkpoint loading and refusals, per-image seeds, guidance, files, manifest, export.

A tiny LightningDiT (depth 2, hidden 64) with seeded random weights is written as
ema.safetensors by the checkpoint code train.py uses (conftest `write_tiny_run`), and the real
stand-in tokenizer is fitted on a few synthetic images, so every test runs the real code path.
"""

from __future__ import annotations

import os

import pytest
import torch

from mdgen_helpers.files import read_json, sha256_file
from mdgen_helpers.cli import main as cli_main
from mdgen_helpers.errors import ArtifactMismatchError, CheckpointError, MdgenError
from mdgen_helpers.generate import (
    GRID_NAME,
    MANIFEST_NAME,
    SamplingSettings,
    UnknownUserError,
    generate_images,
    image_seed,
    initial_noise,
    load_generator,
    read_png,
    regenerate_image,
    sample_latents,
)
from mdgen_helpers.users import image_name

NUM_USERS = 5  # the users of the `write_tiny_run` fixture


@pytest.fixture(scope="module")
def env(tmp_path_factory, make_tokenizer, write_tiny_run):
    root = tmp_path_factory.mktemp("gen")
    tok = make_tokenizer(root / "tok.safetensors", seed=0)
    run = root / "run"
    run.mkdir()
    write_tiny_run(run, tok.identity)
    gen = load_generator(run, "cpu")
    return {"root": root, "tok": tok, "tok_path": root / "tok.safetensors", "run": run, "gen": gen}


SETTINGS = SamplingSettings(guidance_scale=3.0, num_steps=4, solver="euler", seed=7, batch_size=3)


def sampling(**kw) -> SamplingSettings:
    """Sampling settings for the tests: euler and batch 16 unless given."""
    return SamplingSettings(**{"solver": "euler", "batch_size": 16, **kw})


@pytest.fixture(scope="module")
def generated(env):
    out = env["root"] / "out"
    manifest = generate_images(env["gen"], env["tok"], out, [1, 3], 2, SETTINGS, export_dataset=True, progress=False)
    return out, manifest


def test_load_generator_reads_everything_from_checkpoint(env):
    gen = env["gen"]
    assert gen.num_users == NUM_USERS and gen.user_map.user_ids == (1, 2, 3, 4, 5)
    assert gen.tokenizer_identity == env["tok"].identity
    assert gen.latent_shape == (32, 16, 16) and gen.step == 123 and not gen.model.training
    assert gen.checkpoint_sha256 == sha256_file(env["run"] / "ema.safetensors")
    # A RUN dir and its file are the same checkpoint.
    assert load_generator(env["run"] / "ema.safetensors").checkpoint_sha256 == gen.checkpoint_sha256


def test_load_generator_refuses_non_checkpoints(env, tmp_path):
    with pytest.raises(CheckpointError, match="ema.safetensors"):
        load_generator(tmp_path)  # a dir without ema.safetensors
    with pytest.raises(CheckpointError, match="lacks the metadata"):
        load_generator(env["tok_path"])  # a safetensors file, but a tokenizer
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_generator(tmp_path / "junk.safetensors")


def test_files_are_named_like_the_data_and_manifest_records_everything(env, generated):
    out, manifest = generated
    names = [image_name(u, k) for u in (1, 3) for k in (1, 2)]
    assert names[0] == "micro_doppler_user01_001.png" and names[-1] == "micro_doppler_user03_002.png"
    for name in names:
        img = read_png(out / name)
        assert img.shape == (3, 256, 256) and img.dtype == torch.uint8
    assert (out / GRID_NAME).stat().st_size > 0
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    on_disk = read_json(out / MANIFEST_NAME)
    assert on_disk == manifest
    assert manifest["checkpoint_sha256"] == sha256_file(env["run"] / "ema.safetensors")
    assert manifest["tokenizer"] == env["tok"].identity
    s = manifest["settings"]
    assert (s["guidance_scale"], s["num_steps"], s["solver"], s["seed"]) == (3.0, 4, "euler", 7)
    assert s["timestep_shift"] == 0.0 and s["guidance_interval"] == [0.0, 1.0]
    assert [r["file"] for r in manifest["images"]] == names
    assert [r["seed"] for r in manifest["images"]] == [image_seed(7, u, k) for u in (1, 3) for k in (1, 2)]
    assert len({r["seed"] for r in manifest["images"]}) == 4
    assert all(r["nfe"] >= 4 - 1 for r in manifest["images"])


def assert_same_up_to_round_off(a: torch.Tensor, b: torch.Tensor):
    """Batched kernels sum in another order (~1e-6 in the latents): a rare pixel may move by one
    grey level, no more."""
    diff = (a.int() - b.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3


def test_one_image_regenerated_from_manifest_has_the_same_pixels(env, generated):
    out, manifest = generated
    name = "micro_doppler_user03_001.png"  # generated in a batch of 3 next to other images
    assert manifest["batches"][[r for r in manifest["images"] if r["file"] == name][0]["batch"]] == [
        "micro_doppler_user01_001.png", "micro_doppler_user01_002.png", "micro_doppler_user03_001.png"]
    exact = regenerate_image(env["gen"], env["tok"], out / MANIFEST_NAME, name)
    assert torch.equal(exact, read_png(out / name))
    alone = regenerate_image(env["gen"], env["tok"], out / MANIFEST_NAME, name, exact=False)
    assert_same_up_to_round_off(alone, read_png(out / name))


def test_noise_is_per_image_and_seeds_are_pure():
    # Pinned values: a manifest written today must regenerate on any later machine or version.
    assert image_seed(0, 1, 1) == 6539522614480888714 and image_seed(7, 3, 2) == 8916552850581642618
    assert len({image_seed(b, u, k) for b in (0, 1) for u in (1, 2, 10) for k in (1, 2, 11)}) == 18
    seeds = [image_seed(0, 1, k) for k in (1, 2, 3)]
    assert torch.equal(initial_noise(seeds, (32, 16, 16))[1], initial_noise(seeds[1:2], (32, 16, 16))[0])


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_latents_do_not_depend_on_batch_size(env, solver):
    users, seeds = [1, 2, 5], [11, 12, 13]
    kw = dict(guidance_scale=4.0, num_steps=4, solver=solver)
    one = sample_latents(env["gen"], users, seeds, sampling(batch_size=1, **kw))
    three = sample_latents(env["gen"], users, seeds, sampling(batch_size=3, **kw))
    assert one.shape == (3, 32, 16, 16)
    torch.testing.assert_close(one, three, rtol=0, atol=1e-5)
    # Reordering the work does not change an image either.
    rev = sample_latents(env["gen"], users[::-1], seeds[::-1], sampling(batch_size=2, **kw))
    torch.testing.assert_close(rev.flip(0), one, rtol=0, atol=1e-5)


def test_guidance_changes_all_32_channels(env):
    users, seeds = [2, 4], [3, 4]
    base = sample_latents(env["gen"], users, seeds, sampling(guidance_scale=1.0, num_steps=4))
    guided = sample_latents(env["gen"], users, seeds, sampling(guidance_scale=4.0, num_steps=4))
    per_channel = (guided - base).abs().amax(dim=(0, 2, 3))
    assert per_channel.shape == (32,) and bool((per_channel > 1e-4).all()), per_channel


def test_guidance_scale_one_is_the_conditional_model(env):
    from mdgen_helpers.flow import sample_ode

    gen = env["gen"]
    users, seeds = [1, 5], [21, 22]
    ours = sample_latents(gen, users, seeds, sampling(guidance_scale=1.0, num_steps=5, solver="heun"))
    y = torch.tensor(gen.labels_of_users(users))

    def conditional(x, t):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0]) if torch.as_tensor(t).ndim == 0 else t
        return gen.model(x, t, y)

    with torch.no_grad():
        x1, _ = sample_ode(conditional, initial_noise(seeds, gen.latent_shape), 5, method="heun")
    expected = gen.stats.denormalize(x1)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [0, NUM_USERS + 1])
def test_user_ids_outside_the_trained_range_are_refused(env, tmp_path, bad):
    with pytest.raises(UnknownUserError, match=r"1\.\.5") as e:
        sample_latents(env["gen"], [1, bad], [0, 1], sampling(num_steps=2))
    assert str(bad) in str(e.value)
    with pytest.raises(UnknownUserError):
        generate_images(env["gen"], env["tok"], tmp_path / "o", [bad], 1, SETTINGS, progress=False)
    assert not (tmp_path / "o").exists()  # refused before any work


def test_tokenizer_mismatch_is_refused(env, tmp_path, capsys, make_tokenizer):
    other = make_tokenizer(tmp_path / "other.safetensors", seed=1)
    assert other.identity != env["tok"].identity
    with pytest.raises(ArtifactMismatchError, match="tokenizer mismatch"):
        generate_images(env["gen"], other, tmp_path / "o", [1], 1, SETTINGS, progress=False)
    rc = cli_main(["generate", "--dit_checkpoint", str(env["run"]), "--vavae_path", str(tmp_path / "other.safetensors"),
                   "--output_dir", str(tmp_path / "o"), "--user_ids", "1", "--num_steps", "2"])
    assert rc == 2 and "tokenizer mismatch" in capsys.readouterr().err


def test_export_is_readable_by_the_data_layer(generated):
    from PIL import Image

    from mdgen_helpers.data import discover_users, validate_dataset

    out, manifest = generated
    users = discover_users(out / "dataset")
    assert users.folders == ("ID_1", "ID_3") and users.user_ids == (1, 3)
    report = validate_dataset(out / "dataset")
    assert len(report.records) == 4 and not report.skipped
    with Image.open(out / "dataset" / "ID_3" / "gen_0002.jpg") as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (256, 256))
    assert [r["dataset_file"] for r in manifest["images"]][:2] == ["dataset/ID_1/gen_0001.jpg", "dataset/ID_1/gen_0002.jpg"]


def test_cli_generates_with_the_seed_flags(env, tmp_path):
    out = tmp_path / "cli"
    rc = cli_main([
        "generate", "--dit_checkpoint", str(env["run"] / "ema.safetensors"), "--tokenizer", str(env["tok_path"]),
        "--output_dir", str(out), "--user_ids", "2", "--num_samples_per_user", "2", "--guidance_scale", "2.5",
        "--num_steps", "3", "--solver", "heun", "--timestep_shift", "0.3", "--guidance_interval", "0.1", "1.0",
        "--seed", "5", "--batch_size", "1", "--device", "cpu", "--no_progress",
    ])
    assert rc == 0
    m = read_json(out / MANIFEST_NAME)
    assert [r["file"] for r in m["images"]] == ["micro_doppler_user02_001.png", "micro_doppler_user02_002.png"]
    assert m["settings"]["timestep_shift"] == 0.3 and m["settings"]["guidance_interval"] == [0.1, 1.0]
    # The CLI output is the library output for the same settings (batch size aside).
    s = SamplingSettings(guidance_scale=2.5, num_steps=3, solver="heun", timestep_shift=0.3,
                         guidance_interval=(0.1, 1.0), seed=5, batch_size=2)
    m2 = generate_images(env["gen"], env["tok"], tmp_path / "lib", [2], 2, s, progress=False)
    for r in m2["images"]:
        assert_same_up_to_round_off(read_png(out / r["file"]), read_png(tmp_path / "lib" / r["file"]))


def test_bad_settings_are_refused(env, tmp_path):
    with pytest.raises(MdgenError, match="solver"):
        sample_latents(env["gen"], [1], [0], sampling(solver="rk4"))
    with pytest.raises(MdgenError, match="num_steps"):
        sample_latents(env["gen"], [1], [0], sampling(num_steps=0))
    with pytest.raises(MdgenError, match="guidance_interval"):
        sample_latents(env["gen"], [1], [0], sampling(guidance_interval=(0.8, 0.2)))
    with pytest.raises(MdgenError, match="repeat"):
        generate_images(env["gen"], env["tok"], tmp_path, [1, 1], 1, SETTINGS, progress=False)
