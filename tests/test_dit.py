"""LightningDiT: numbers and state-dict layout of the official model, presets, weight loading."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mdgen_helpers import dit
from mdgen_helpers.dit import LightningDiT, build_model, load_official_weights, load_weights, null_label
from mdgen_helpers.errors import CheckpointError, MdgenError

VARIANTS = ["small_p1_swiglu_rope_rms", "small_p2_qknorm_wo_shift", "small_p2_plain"]


def load_variant(ref_dir: Path, variant: str):
    path = ref_dir / f"lightningdit_{variant}_seed0.safetensors"
    with safe_open(str(path), "pt") as f:
        arch = json.loads(f.metadata()["arch"])
    tensors = load_file(str(path))
    weights = {k.removeprefix("weights."): v for k, v in tensors.items() if k.startswith("weights.")}
    return arch, weights, tensors


def read_tsv(path: Path) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


# ----------------------------------------------------------------------------- official numbers


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_official(ref_dir, variant):
    arch, weights, t = load_variant(ref_dir, variant)
    model = LightningDiT(**arch).eval()
    report = load_weights(model, weights, source=variant)  # strict
    assert report == {"missing": [], "unexpected": [], "mismatched": []}
    with torch.no_grad():
        out = model(t["input.x"], t["input.t"], t["input.y"])
    torch.testing.assert_close(out, t["expected.out"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fixed_tables_match_official_construction(ref_dir, variant):
    """RoPE buffers are rebuilt exactly; pos_embed is the sin-cos table (the reference perturbed it
    with small seeded noise so that a forgotten load would show up)."""
    arch, weights, _ = load_variant(ref_dir, variant)
    own = LightningDiT(**arch).state_dict()
    for k in ("feat_rope.freqs_cos", "feat_rope.freqs_sin"):
        if k in weights:
            torch.testing.assert_close(own[k], weights[k], rtol=0, atol=1e-6)
    diff = own["pos_embed"] - weights["pos_embed"]
    assert diff.abs().mean() < 0.03 and weights["pos_embed"].abs().mean() > 0.3
    assert torch.corrcoef(torch.stack([own["pos_embed"].flatten(), weights["pos_embed"].flatten()]))[0, 1] > 0.99


def test_xl1_state_dict_keys_and_shapes(ref_dir):
    expected = read_tsv(ref_dir / "lightningdit_xl1_state_dict_keys.tsv")
    with torch.device("meta"):
        model = build_model("XL/1", num_classes=1000)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(expected)  # same names, same order
    assert got == expected
    assert not model.pos_embed.requires_grad


def test_parameter_counts(ref_dir):
    counts = json.loads((ref_dir / "param_counts.json").read_text())["lightningdit_params_at_16x16x32_1000_classes"]
    for name, n in counts.items():
        with torch.device("meta"):
            model = build_model(name, num_classes=1000)
        assert dit.count_parameters(model) == n, name


def test_presets_and_config_roundtrip():
    assert {"B/1", "B/2", "L/2", "XL/1", "XL/2", "S/1", "S/2", "tiny"} <= set(dit.PRESETS)
    tiny = build_model("tiny", num_classes=8)
    assert 5e6 <= dit.count_parameters(tiny) <= 10e6
    with torch.device("meta"):
        s2 = build_model("S/2", num_classes=8, class_dropout_prob=0.2)
    cfg = dit.model_config(s2)
    assert cfg["depth"] == 12 and cfg["hidden_size"] == 384 and cfg["num_heads"] == 6 and cfg["patch_size"] == 2
    assert json.loads(json.dumps(cfg)) == cfg
    again = LightningDiT.from_config(dit.model_config(tiny))
    assert again.state_dict().keys() == tiny.state_dict().keys()
    with pytest.raises(CheckpointError, match="unknown keys"):
        LightningDiT.from_config({**cfg, "bogus": 1})
    with pytest.raises(MdgenError, match="unknown model preset"):
        build_model("XXL/9", num_classes=3)


# ----------------------------------------------------------------------------- label dropout


def test_label_dropout_goes_to_null_label_and_is_seeded():
    emb = dit.LabelEmbedder(num_classes=5, hidden_size=4, dropout_prob=0.5)
    assert emb.embedding_table.num_embeddings == 6 and null_label(5) == 5
    y = torch.arange(5).repeat(40)
    a = emb.token_drop(y, generator=torch.Generator().manual_seed(3))
    b = emb.token_drop(y, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    dropped = a != y
    assert 0.3 < dropped.float().mean() < 0.7
    assert set(a[dropped].tolist()) == {null_label(5)}
    force = torch.tensor([1, 0, 1, 0, 0])
    assert emb.token_drop(torch.arange(5), force_drop_ids=force).tolist() == [5, 1, 5, 3, 4]
    assert dit.LabelEmbedder(5, 4, 0.0).embedding_table.num_embeddings == 5  # no null row without dropout


def test_forced_drop_equals_null_label_and_eval_never_drops():
    torch.manual_seed(0)
    model = LightningDiT(depth=1, hidden_size=64, num_heads=2, patch_size=2, num_classes=3)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    torch.nn.init.normal_(model.blocks[0].adaLN_modulation[-1].weight, std=0.1)
    x, t = torch.randn(2, 32, 16, 16), torch.tensor([0.3, 0.8])
    y = torch.tensor([0, 2])
    model.eval()
    with torch.no_grad():
        forced = model(x, t, y, force_drop_ids=torch.ones(2, dtype=torch.long))
        null = model(x, t, torch.full((2,), null_label(3)))
        cond = model(x, t, y)
        cond_again = model(x, t, y)
    torch.testing.assert_close(forced, null)
    assert torch.equal(cond, cond_again) and not torch.allclose(cond, null)


# ----------------------------------------------------------------------------- loading weights


def _fake_official_ckpt(ref_dir, tmp_path):
    """An official-layout training checkpoint built from the reference weights (DDP prefixes)."""
    arch, weights, t = load_variant(ref_dir, "small_p1_swiglu_rope_rms")
    ema = {f"module.{k}": v for k, v in weights.items()}
    model = {f"module.{k}": torch.zeros_like(v) for k, v in weights.items()}
    path = tmp_path / "0080000.pt"
    torch.save({"model": model, "ema": ema, "opt": {"state": {}, "param_groups": []},
                "config": {"model": {"model_type": "LightningDiT-XL/1"}}}, path)
    return arch, weights, t, path


def test_load_official_training_checkpoint_same_classes(ref_dir, tmp_path):
    arch, weights, t, path = _fake_official_ckpt(ref_dir, tmp_path)
    sd, info = load_official_weights(path, num_classes=arch["num_classes"])
    assert info["source"] == "training checkpoint ['ema']" and info["stripped_prefixes"] == ["module."]
    assert info["reinitialised"] == [] and info["checkpoint_classes"] == 31
    assert info["arch"]["num_heads"] == arch["num_heads"] and info["arch"]["depth"] == arch["depth"]
    model = LightningDiT(**arch).eval()
    load_weights(model, sd, source=str(path))
    with torch.no_grad():
        torch.testing.assert_close(model(t["input.x"], t["input.t"], t["input.y"]), t["expected.out"], rtol=1e-4, atol=1e-4)
    sd_model, info_model = load_official_weights(path, num_classes=31, use_ema=False)
    assert info_model["source"] == "training checkpoint ['model']"
    assert sd_model["x_embedder.proj.weight"].abs().sum() == 0


def test_load_official_reinitialises_class_table_for_our_users(ref_dir, tmp_path):
    arch, weights, t, path = _fake_official_ckpt(ref_dir, tmp_path)
    sd, info = load_official_weights(path, num_classes=4)
    table = sd["y_embedder.embedding_table.weight"]
    assert table.shape == (5, weights["y_embedder.embedding_table.weight"].shape[1])
    torch.testing.assert_close(table[null_label(4)], weights["y_embedder.embedding_table.weight"][-1])
    assert info["null_row_kept"] and len(info["reinitialised"]) == 1 and "4 users" in info["reinitialised"][0]
    model = LightningDiT(**{**arch, "num_classes": 4}).eval()
    load_weights(model, sd)
    sd2, info2 = load_official_weights(path, num_classes=4, keep_null_row=False)
    assert not info2["null_row_kept"]
    assert not torch.allclose(sd2["y_embedder.embedding_table.weight"][4], table[4])
    # Everything but the label table is untouched: unconditional outputs agree with the original.
    orig = LightningDiT(**arch).eval()
    load_weights(orig, weights)
    x, tt = t["input.x"][:2], t["input.t"][:2]
    with torch.no_grad():
        torch.testing.assert_close(model(x, tt, torch.full((2,), 4)), orig(x, tt, torch.full((2,), 31)))


def test_load_safetensors_with_compile_prefix(ref_dir, tmp_path):
    arch, weights, t = load_variant(ref_dir, "small_p2_plain")
    path = tmp_path / "ema.safetensors"
    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in weights.items()}, str(path))
    sd, info = load_official_weights(path, num_classes=arch["num_classes"])
    assert info["source"] == "safetensors" and info["stripped_prefixes"] == ["_orig_mod."]
    model = LightningDiT(**arch).eval()
    load_weights(model, sd)
    with torch.no_grad():
        torch.testing.assert_close(model(t["input.x"], t["input.t"], t["input.y"]), t["expected.out"], rtol=1e-4, atol=1e-4)


def test_strict_loading_errors(ref_dir, tmp_path):
    arch, weights, _ = load_variant(ref_dir, "small_p2_plain")
    model = LightningDiT(**arch)
    bad = dict(weights)
    del bad["blocks.0.attn.qkv.bias"]
    bad["extra.weight"] = torch.zeros(1)
    bad["final_layer.linear.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError) as e:
        load_weights(model, bad, source="bad.pt")
    msg = str(e.value)
    assert "missing 1: blocks.0.attn.qkv.bias" in msg and "unexpected 1: extra.weight" in msg
    assert "final_layer.linear.bias: checkpoint (7,) vs model (128,)" in msg
    report = load_weights(model, bad, strict=False)
    assert report["missing"] == ["blocks.0.attn.qkv.bias"]
    # A model of another architecture: one clear error, not a RuntimeError from deep inside torch.
    with pytest.raises(CheckpointError, match="does not fit"):
        load_weights(LightningDiT(**{**arch, "use_swiglu": True}), weights)


def test_vavae_and_unsafe_checkpoints_are_rejected(tmp_path):
    vavae = tmp_path / "vavae.pt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(2), "decoder.conv_out.weight": torch.zeros(2),
                               "loss.logvar": torch.zeros(1)}}, vavae)
    with pytest.raises(CheckpointError, match="VA-VAE"):
        load_official_weights(vavae, num_classes=3)
    pickled = tmp_path / "pickle.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "obj": _Opaque()}, pickled)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_official_weights(pickled, num_classes=3)
    with pytest.raises(CheckpointError, match="not found"):
        load_official_weights(tmp_path / "nope.pt", num_classes=3)


class _Opaque:
    pass


# ----------------------------------------------------------------------------- training helpers


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = LightningDiT(depth=2, hidden_size=64, num_heads=2, patch_size=2, num_classes=3, class_dropout_prob=0.0)
    for p in a.parameters():
        p.data.add_(torch.randn_like(p) * 0.02)
    b = LightningDiT.from_config({**dit.model_config(a), "use_checkpoint": True})
    b.load_state_dict(a.state_dict())
    x, t, y = torch.randn(2, 32, 16, 16), torch.rand(2), torch.tensor([0, 1])
    for m in (a, b):
        m.train()
        m(x, t, y).square().mean().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_maybe_compile_falls_back_to_eager(monkeypatch):
    model = LightningDiT(depth=1, hidden_size=64, num_heads=2, patch_size=2, num_classes=2)

    def broken_compile(*a, **k):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken_compile)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = dit.maybe_compile(model)
    assert out is model and any("eager" in str(x.message) for x in w)
