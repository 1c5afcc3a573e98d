"""Guidance in notebooks: an inline grid, a static sweep figure, and a slider explorer.

Guidance strength is tuned by eye (the origin project swung between scales 1, 7 and 10), so the
notebook offers sliders. Kaggle's "Save & Run All" executes notebooks headless, where nobody
moves a slider, so every figure the report needs comes from a plain function
(`render_guidance_grid`, `guidance_sweep_figure`); the explorer only calls the same function.

All three take a loaded `generate.Generator` and the tokenizer it was trained with.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Callable, Hashable, Sequence

from matplotlib.figure import Figure

from mdgen_helpers.generate import (
    Generator,
    check_tokenizer,
    decode_to_uint8,
    image_seed,
    normalize_solver,
    sample_latents,
)
from mdgen_helpers.settings import SamplingSettings
from mdgen_helpers.viz import user_grid

SOLVER_CHOICES = ("euler", "heun", "dopri5")
STEP_CHOICES = (10, 25, 50, 100, 250)


def _sample_images(gen, tokenizer, user_ids, num_samples, sampling: SamplingSettings):
    """uint8 HWC arrays per user; seeds follow generate.image_seed, so a grid image equals the
    file `generate` writes for the same settings."""
    jobs = [(u, k) for u in user_ids for k in range(1, num_samples + 1)]
    latents = sample_latents(gen, [u for u, _ in jobs], [image_seed(sampling.seed, u, k) for u, k in jobs], sampling)
    images = decode_to_uint8(tokenizer, latents, batch_size=sampling.batch_size)
    by_user: dict[int, list] = {int(u): [] for u in user_ids}
    for (u, _), img in zip(jobs, images):
        by_user[int(u)].append(img.permute(1, 2, 0).numpy())
    return by_user


def _describe(sampling: SamplingSettings) -> str:
    return f"{sampling.num_steps} steps {normalize_solver(sampling.solver)}, seed {sampling.seed}"


def render_guidance_grid(gen: Generator, tokenizer, user_ids: Sequence[int], sampling: SamplingSettings | None = None,
                         num_samples: int = 4):
    """Grid (rows = users, `num_samples` columns) at one sampling setting, for inline display."""
    sampling = sampling or SamplingSettings()
    check_tokenizer(gen, tokenizer)
    by_user = _sample_images(gen, tokenizer, list(user_ids), num_samples, sampling)
    return user_grid(by_user, f"guidance {sampling.guidance_scale:g}, {_describe(sampling)}")


def guidance_sweep_figure(gen: Generator, tokenizer, user_ids: Sequence[int],
                          scales: Sequence[float] = (1.0, 2.0, 4.0, 7.0), sampling: SamplingSettings | None = None):
    """Rows = users, columns = guidance scales, same noise in every column (sample 1 of each
    user), so the only thing that changes along a row is the guidance: the headless figure for
    the report. Every other setting comes from `sampling`."""
    sampling = sampling or SamplingSettings()
    check_tokenizer(gen, tokenizer)
    user_ids = [int(u) for u in user_ids]
    columns = [_sample_images(gen, tokenizer, user_ids, 1, dataclasses.replace(sampling, guidance_scale=float(scale)))
               for scale in scales]
    rows, cols = len(user_ids), len(scales)
    fig = Figure(figsize=(1.9 * cols + 0.6, 1.9 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for c, (scale, by_user) in enumerate(zip(scales, columns)):
        for r, uid in enumerate(user_ids):
            ax = axes[r][c]
            ax.imshow(by_user[uid][0], aspect="auto", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"guidance {scale:g}", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"user {uid}", fontsize=9)
    fig.suptitle(f"effect of guidance: {_describe(sampling)}", fontsize=10)
    return fig


class RenderCache:
    """Least-recently-used dict of rendered figures keyed by the settings that produced them, so
    moving a slider back to a value seen before shows its figure at once."""

    def __init__(self, render: Callable[..., Any], max_entries: int = 16):
        self.render = render
        self.max_entries = max_entries
        self.entries: OrderedDict[Hashable, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(**settings) -> tuple:
        return tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in settings.items()))

    def get(self, **settings):
        key = self.key(**settings)
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        value = self.render(**settings)
        self.entries[key] = value
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self.entries)


def guidance_explorer(gen: Generator, tokenizer, user_ids: Sequence[int] | None = None, num_samples: int = 4,
                      sampling: SamplingSettings | None = None, cache_size: int = 16):
    """An ipywidgets panel: users, guidance slider, steps, seed, solver, starting from `sampling`
    (the other settings stay as given); figures are cached per setting. Returns a `VBox` with
    `.controls` (dict of widgets), `.output`, `.cache` and `.update()` (re-render from the
    current control values)."""
    import ipywidgets as w

    sampling = sampling or SamplingSettings()
    check_tokenizer(gen, tokenizer)
    all_users = list(gen.user_map.user_ids)
    chosen = [int(u) for u in (user_ids if user_ids is not None else all_users[:4])]
    gen.labels_of_users(chosen)
    guidance_scale, num_steps, seed, solver = sampling.guidance_scale, sampling.num_steps, sampling.seed, sampling.solver

    def render(users, guidance_scale, num_steps, seed, solver):
        chosen_settings = dataclasses.replace(sampling, guidance_scale=guidance_scale, num_steps=num_steps, seed=seed,
                                              solver=solver)
        return render_guidance_grid(gen, tokenizer, list(users), chosen_settings, num_samples=num_samples)

    controls = {
        "users": w.SelectMultiple(options=all_users, value=tuple(chosen), description="users", rows=min(6, len(all_users))),
        "guidance_scale": w.FloatSlider(value=float(guidance_scale), min=1.0, max=10.0, step=0.5, description="guidance",
                                        continuous_update=False),
        "num_steps": w.Dropdown(options=sorted({*STEP_CHOICES, int(num_steps)}), value=int(num_steps), description="steps"),
        "seed": w.IntText(value=int(seed), description="seed"),
        "solver": w.Dropdown(options=list(SOLVER_CHOICES), value=normalize_solver(solver), description="solver"),
    }
    output = w.Output()
    cache = RenderCache(render, cache_size)
    status = w.HTML()

    def update(change=None):
        settings = {name: c.value for name, c in controls.items()}
        if not settings["users"]:
            status.value = "choose at least one user"
            return None
        status.value = "rendering..."
        try:
            fig = cache.get(**settings)
        except Exception as e:  # an observer's exception is otherwise swallowed: show it where the user looks
            status.value = f"error: {type(e).__name__}: {e}"
            return None
        status.value = f"cached settings: {len(cache)} (hits {cache.hits}, renders {cache.misses})"
        # Set the Output widget's content directly rather than capturing `display` inside
        # `with output:`: the capture path made headless nbclient runs wait until their cell
        # timeout after the cell had finished; this path behaves the same in a browser.
        output.outputs = ()
        output.append_display_data(fig)
        return fig

    for c in controls.values():
        c.observe(update, names="value")
    panel = w.VBox([w.HBox([controls["users"], w.VBox([controls[k] for k in ("guidance_scale", "num_steps", "seed", "solver")])]),
                    status, output])
    panel.controls, panel.output, panel.cache, panel.update = controls, output, cache, update
    update()
    return panel
