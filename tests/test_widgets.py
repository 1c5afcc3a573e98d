"""widgets: the render functions the headless report uses, the LRU cache, and the explorer panel.

Widget callbacks print exceptions instead of raising them, so the render function and the cache
are tested directly, and the explorer's update function is called by hand.
"""

from __future__ import annotations

import pytest
import torch
from matplotlib.figure import Figure

from mdgen_helpers.errors import ArtifactMismatchError
from mdgen_helpers.generate import load_generator
from mdgen_helpers.settings import SamplingSettings
from mdgen_helpers.widgets import RenderCache, guidance_explorer, guidance_sweep_figure, render_guidance_grid


@pytest.fixture(scope="module")
def env(tmp_path_factory, make_tokenizer, write_tiny_run):
    root = tmp_path_factory.mktemp("widgets")
    tok = make_tokenizer(root / "tok.safetensors", seed=0)
    write_tiny_run(root, tok.identity)
    return load_generator(root, "cpu"), tok


def image_axes(fig: Figure):
    return [ax for ax in fig.axes if ax.images]


def test_render_guidance_grid_shows_users_by_samples(env, tmp_path):
    gen, tok = env
    fig = render_guidance_grid(gen, tok, [2, 4], SamplingSettings(guidance_scale=3.0, num_steps=2, seed=1, solver="euler"),
                               num_samples=3)
    assert isinstance(fig, Figure) and len(image_axes(fig)) == 6
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert labels == ["user 2", "user 4"]
    assert "guidance 3" in fig.get_suptitle()
    fig.savefig(tmp_path / "grid.png")  # renders headless


def test_guidance_sweep_columns_are_scales_on_the_same_noise(env):
    gen, tok = env
    fig = guidance_sweep_figure(gen, tok, [1, 3], scales=(1.0, 7.0), sampling=SamplingSettings(num_steps=2, solver="euler"))
    axes = image_axes(fig)
    assert len(axes) == 4
    assert [ax.get_title() for ax in axes[:2]] == ["guidance 1", "guidance 7"]
    one, seven = (torch.from_numpy(ax.images[0].get_array().data.copy()) for ax in axes[:2])
    assert not torch.equal(one, seven)  # guidance changes the picture


def test_render_refuses_a_foreign_tokenizer(env, tmp_path, make_tokenizer):
    gen, _ = env
    other = make_tokenizer(tmp_path / "other.safetensors", seed=3)
    with pytest.raises(ArtifactMismatchError):
        render_guidance_grid(gen, other, [1], SamplingSettings(num_steps=1))


def test_cache_is_lru_keyed_by_settings():
    calls = []

    def render(**s):
        calls.append(s)
        return object()

    cache = RenderCache(render, max_entries=2)
    a = cache.get(users=(1, 2), guidance_scale=4.0, seed=0)
    assert cache.get(seed=0, guidance_scale=4.0, users=(1, 2)) is a  # key ignores argument order
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    b = cache.get(users=(1, 2), guidance_scale=7.0, seed=0)
    cache.get(users=(1, 2), guidance_scale=4.0, seed=0)  # touch a: b is now least recent
    cache.get(users=(1,), guidance_scale=4.0, seed=0)  # evicts b
    assert len(cache) == 2 and len(calls) == 3
    assert cache.get(users=(1, 2), guidance_scale=4.0, seed=0) is a
    assert cache.get(users=(1, 2), guidance_scale=7.0, seed=0) is not b and len(calls) == 4


def test_explorer_builds_widgets_and_renders_on_change(env):
    import ipywidgets as w

    gen, tok = env
    panel = guidance_explorer(gen, tok, [1, 2], num_samples=1, sampling=SamplingSettings(num_steps=1, solver="euler"))
    assert isinstance(panel, w.VBox)
    c = panel.controls
    assert set(c) == {"users", "guidance_scale", "num_steps", "seed", "solver"}
    assert c["users"].value == (1, 2) and c["users"].options == (1, 2, 3, 4, 5)
    assert panel.cache.misses == 1  # rendered once when built
    c["guidance_scale"].value = 7.0  # the observer re-renders (errors there would only be printed)
    assert panel.cache.misses == 2
    fig = panel.update()  # the same settings again: served from the cache
    assert isinstance(fig, Figure) and panel.cache.hits == 1 and "guidance 7" in fig.get_suptitle()
    c["guidance_scale"].value = 4.0
    assert panel.cache.hits == 2 and panel.cache.misses == 2
    c["users"].value = ()
    assert panel.update() is None  # nothing to render, no error


def test_explorer_shows_a_failing_render_in_its_status_line(env, monkeypatch):
    from mdgen_helpers import widgets

    gen, tok = env
    panel = guidance_explorer(gen, tok, [1], num_samples=1, sampling=SamplingSettings(num_steps=1, solver="euler"))

    def broken(*a, **k):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(widgets, "render_guidance_grid", broken)
    panel.controls["seed"].value = 5  # the observer runs the failing render
    status = panel.children[1]
    assert status.value == "error: RuntimeError: CUDA out of memory"
