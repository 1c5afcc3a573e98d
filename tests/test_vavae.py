"""VA-VAE: numbers equal the official code, keys equal the official checkpoint, loading is strict
and safe, the slim copy is faithful, and reduced precision keeps norms and softmax in float32."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from mdgen_helpers import cli
from mdgen_helpers.errors import CheckpointError
from mdgen_helpers.files import load_safetensors_metadata
from mdgen_helpers.vavae import (
    AttnBlock,
    AutoencoderKL,
    convert_to_safetensors,
    extract_vavae_state_dict,
    init_random_,
    load_vavae,
    vavae_identity,
    write_random_checkpoint,
)

REF = Path(__file__).resolve().parents[2] / "shared" / "reference"
needs_ref = pytest.mark.skipif(not REF.is_dir(), reason=f"reference vectors folder {REF} is absent")
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(128,), z_channels=4, embed_dim=4)


@pytest.fixture(scope="module")
def ref():
    from safetensors.torch import load_file

    path = REF / "vavae_ch32_seed0.safetensors"
    tensors = load_file(str(path))
    arch = load_safetensors_metadata(path)["arch"]
    weights = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
    return arch, weights, tensors


@pytest.fixture(scope="module")
def official_pt(tmp_path_factory):
    """A ch=32 random checkpoint in the official .pt layout (with loss/foundation/linear_proj keys)."""
    path = tmp_path_factory.mktemp("ckpt") / "vavae-random.pt"
    write_random_checkpoint(path, seed=0, ch=32)
    return path


def _images(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


# --- numbers and keys equal the official code ---------------------------------------------------


@needs_ref
def test_matches_official_reference_vectors(ref):
    arch, weights, t = ref
    model = AutoencoderKL(**arch).eval()
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        post = model.encode(t["input.images"])
        decoded = model.decode(t["input.latents"])
    torch.testing.assert_close(post.mean, t["expected.posterior_mean"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(post.logvar, t["expected.posterior_logvar"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decoded, t["expected.decoded"], rtol=1e-4, atol=1e-4)
    assert post.mean.shape == (2, 32, 16, 16)


@needs_ref
def test_full_size_keys_and_shapes_equal_official_checkpoint():
    with torch.device("meta"):
        model = AutoencoderKL()
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    lines = (REF / "vavae_f16d32_state_dict_keys.tsv").read_text().splitlines()
    official = [(k, ast.literal_eval(shape)) for k, shape in (line.split("\t") for line in lines if line.strip())]
    assert sorted(ours) == sorted(official)
    counts = json.loads((REF / "param_counts.json").read_text())
    assert sum(p.numel() for p in model.encoder.parameters()) == counts["vavae_f16d32_encoder_params"]
    assert sum(p.numel() for p in model.decoder.parameters()) == counts["vavae_f16d32_decoder_params"]


def test_posterior_sample_is_seeded_and_mode_is_mean():
    model = init_random_(AutoencoderKL(**TINY), seed=1).eval()
    with torch.no_grad():
        post = model.encode(_images(1, 32))
    a = post.sample(torch.Generator().manual_seed(5))
    b = post.sample(torch.Generator().manual_seed(5))
    c = post.sample(torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(post.mode(), post.mean)
    torch.testing.assert_close(post.std, torch.exp(0.5 * post.logvar))
    assert post.logvar.min() >= -30 and post.logvar.max() <= 20


# --- loading: formats, strictness, safety ----------------------------------------------------------


def test_official_layout_loads_strictly_without_training_keys(official_pt):
    model = load_vavae(official_pt)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.arch["ch"] == 32 and model.dtype == torch.float32
    raw = torch.load(official_pt, map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith(("loss.", "foundation_model.", "linear_proj.")) for k in raw)
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw[k]), k
    assert model.identity == vavae_identity(official_pt)
    assert model.identity.startswith("vavae-f16d32-ch32:") and len(model.identity.split(":")[1]) == 16


@pytest.mark.parametrize("layout", ["lightning_ckpt", "ddp_bare", "safetensors_without_metadata"])
def test_other_layouts_and_inferred_tiny_architecture(tmp_path, layout):
    """A tiny VA-VAE of another width loads with no arch given: the shapes say it all."""
    from safetensors.torch import save_file

    src = init_random_(AutoencoderKL(**TINY), seed=3)
    sd = src.state_dict()
    if layout == "lightning_ckpt":
        path = tmp_path / "finetuned.ckpt"
        torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()} | {"loss.logvar": torch.zeros(())},
                    "epoch": 3, "global_step": 100}, path)
    elif layout == "ddp_bare":
        path = tmp_path / "bare.pth"
        torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    else:
        path = tmp_path / "plain.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = load_vavae(path)
    for key in ("ch", "z_channels", "embed_dim", "num_res_blocks"):
        assert model.arch[key] == TINY[key]
    assert model.arch["ch_mult"] == list(TINY["ch_mult"]) and model.arch["attn_resolutions"] == [128]
    x = _images(1, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src.eval()(x), rtol=0, atol=0)


def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned.txt"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "hook": Payload()}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused") as err:
        load_vavae(path)
    assert "not executed" in str(err.value) and "io.open" in str(err.value)  # the global it needed
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        vavae_identity(path)
    assert not marker.exists()


def test_lightningdit_checkpoint_is_recognised(tmp_path):
    dit = {"x_embedder.proj.weight": torch.zeros(4, 32, 1, 1), "y_embedder.embedding_table.weight": torch.zeros(9, 4),
           "blocks.0.attn.qkv.weight": torch.zeros(12, 4), "final_layer.linear.weight": torch.zeros(32, 4)}
    bare, training = tmp_path / "dit.pt", tmp_path / "dit_train.pt"
    torch.save(dit, bare)
    torch.save({"model": dit, "ema": dit, "opt": {"state": {}}, "config": {"lr": 1e-4}}, training)
    for path in (bare, training):
        with pytest.raises(CheckpointError, match="LightningDiT checkpoint, not a VA-VAE"):
            load_vavae(path)
    with pytest.raises(CheckpointError, match="no VA-VAE weights"):
        extract_vavae_state_dict({"foo.weight": torch.zeros(1)})
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)) * 16)  # neither zip, pickle nor safetensors
    with pytest.raises(CheckpointError, match="cannot read"):
        load_vavae(junk)
    with pytest.raises(CheckpointError, match="not found"):
        load_vavae(tmp_path / "absent.pt")


def test_missing_key_and_wrong_width_are_named(official_pt, tmp_path):
    ckpt = torch.load(official_pt, map_location="cpu", weights_only=True)
    del ckpt["state_dict"]["decoder.conv_out.bias"]
    path = tmp_path / "incomplete.pt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"1 missing keys: decoder\.conv_out\.bias"):
        load_vavae(path)
    with pytest.raises(CheckpointError, match=r"shape mismatches: encoder\.conv_in\.weight"):
        load_vavae(official_pt, ch=64)  # arch_overrides win over the inferred width


# --- slim copy ------------------------------------------------------------------------------------


def test_slim_safetensors_round_trip(official_pt, tmp_path):
    slim = tmp_path / "vavae.safetensors"
    info = convert_to_safetensors(official_pt, slim)
    meta = load_safetensors_metadata(slim)
    assert meta["arch"]["ch"] == 32 and meta["dtype"] == "float32"
    assert meta["source_name"] == official_pt.name and len(meta["source_sha256"]) == 64
    from safetensors import safe_open

    with safe_open(str(slim), "pt") as f:
        assert all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in f.keys())
    a, b = load_vavae(official_pt), load_vavae(slim)
    x = _images(2, 32)
    with torch.no_grad():
        assert torch.equal(a.encode(x).mean, b.encode(x).mean)
        assert torch.equal(a.decode(a.encode(x).mean), b.decode(b.encode(x).mean))
    assert vavae_identity(official_pt) == vavae_identity(slim) == a.identity == b.identity == info["identity"]

    half = tmp_path / "vavae16.safetensors"
    assert cli.main(["convert-vavae", "--src", str(official_pt), "--dst", str(half), "--fp16"]) == 0
    assert load_safetensors_metadata(half)["dtype"] == "float16"
    assert vavae_identity(half) != a.identity  # other weights, other identity
    assert load_vavae(half).dtype == torch.float32  # dtype=None computes in float32
    assert cli.main(["convert-vavae", "--src", str(tmp_path / "nope.pt"), "--dst", str(half)]) == 2


# --- reduced precision ----------------------------------------------------------------------------


class _RecordDtypes(TorchFunctionMode):
    """Records the input dtype of every group_norm / softmax / attention call."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, set] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in ("group_norm", "softmax", "scaled_dot_product_attention"):
            self.seen.setdefault(name, set()).add(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_forward(official_pt, dtype):
    """fp16 and bf16 run on the CPU: finite, near fp32, norms and attention computed in float32."""
    ref32, low = load_vavae(official_pt), load_vavae(official_pt, dtype=dtype)
    assert low.dtype == dtype
    x = _images(1, 32)
    with torch.no_grad():
        mean32 = ref32.encode(x).mean
        rec32 = ref32.decode(mean32)
        with _RecordDtypes() as rec:
            post = low.encode(x)
            out = low.decode(mean32)
    assert post.mean.dtype == torch.float32 and out.dtype == torch.float32
    assert torch.isfinite(post.mean).all() and torch.isfinite(out).all()
    # Errors seen: fp16 ~0.003 (mean) / ~0.01 (image); bf16 ~0.02 / ~0.1, on values of size ~1-3.
    atol, rtol = (0.03, 0.01) if dtype == torch.float16 else (0.2, 0.05)
    torch.testing.assert_close(post.mean, mean32, rtol=rtol, atol=atol)
    torch.testing.assert_close(out, rec32, rtol=rtol, atol=atol)
    assert rec.seen["group_norm"] == {torch.float32}
    assert rec.seen["scaled_dot_product_attention"] == {torch.float32}


def test_fp16_attention_survives_scores_that_overflow_naive_fp16():
    """q.k over 128 channels with q, k ~ 100 is ~1e5 > 65504: naive fp16 scores are inf, softmax NaN."""
    block = init_random_(AttnBlock(128), seed=0).eval()
    with torch.no_grad():
        block.q.weight.mul_(100.0)
        block.k.weight.mul_(100.0)
        block.half()
        x = torch.randn(1, 128, 8, 8, generator=torch.Generator().manual_seed(0)).half()
        h = block.norm(x)
        naive = torch.bmm(block.q(h).flatten(2).transpose(1, 2), block.k(h).flatten(2))
        assert not torch.isfinite(naive).all()  # the failure the float32 attention guards against
        out = block(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
