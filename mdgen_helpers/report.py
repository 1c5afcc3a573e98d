"""Reading an evaluation: the headline table (metric, generated, real baseline) and the figures.

Everything here takes the metrics dict that `evaluate.evaluate` writes to metrics.json, so a
finished evaluation can be re-tabled or re-plotted without re-running it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from mdgen_helpers import viz
from mdgen_helpers.classifier import read_rgb
from mdgen_helpers.metrics import RECOGNISABILITY_TARGET
from mdgen_helpers.users import UserMap


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, dict) and "mean" in x:
        return f"{x['mean']:.{digits}f} ± {x['std']:.{digits}f}"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{digits}g}" if abs(x) >= 1000 or (x and abs(x) < 1e-3) else f"{x:.{digits}f}"
    return str(x)


def _iv(x: Mapping[str, Any] | None, key: str = "mean", digits: int = 3) -> str:
    """'value [lo, hi]' of a result with an `interval`."""
    if not x:
        return "-"
    lo, hi = x.get("interval") or (float("nan"), float("nan"))
    return f"{_fmt(x[key], digits)} [{_fmt(lo, digits)}, {_fmt(hi, digits)}]"


def headline_table(m: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Rows (metric, generated, real baseline) from a metrics dict, for the notebook and README.
    Intervals are 95%: bootstrap over images for C2ST, FD and recognisability, Student-t over
    seeds for the paired augmentation differences."""
    rows: list[tuple[str, str, str]] = []
    clf = m.get("classifier", {})
    c2 = m.get("c2st")
    if c2:
        rows.append((f"C2ST accuracy, real-train vs generated at {c2['image_size']} px (0.5 = indistinguishable)",
                     _iv(c2, "accuracy"), "0.5"))
    fm = m.get("realism", {}).get("classifier_features", {})
    if "fd_ratio" in fm:
        r = fm["fd_ratio"]
        rows.append(("FD ratio, FD(generated, test) / FD(val, test), classifier features", _iv(r, "ratio"), "1.0"))
        rows.append((f"Fréchet distance to real-test (n = {fm['matched_size']} per side)", _iv(
            {"v": r["fd_generated"], "interval": r["fd_generated_interval"]}, "v"), _iv(
            {"v": r["fd_baseline"], "interval": r["fd_baseline_interval"]}, "v") + " (real-val)"))
    inc = m.get("realism", {}).get("inception", {})
    if "fid_ratio" in inc:
        rows.append(("Inception FID ratio (generated / real-val, vs real-test)", _iv(inc["fid_ratio"], "ratio"), "1.0"))
    rec = m.get("recognisability", {})
    for size, r in sorted(rec.get("by_size", {}).items(), key=lambda kv: int(kv[0])):
        rows.append((f"recognisability ratio at {size} px (generated / real-test accuracy; target >= "
                     f"{RECOGNISABILITY_TARGET})",
                     _iv({"v": r["ratio_to_real_test"], "interval": r.get("ratio_interval")}, "v"),
                     f"1.0 (real-test acc. {_fmt(r['real_test_accuracy'])}, real-train {_fmt(r['real_train_accuracy'])})"))
    if "accuracy" in rec and not rec.get("by_size"):
        rows.append(("recognisability ratio", _fmt(rec["ratio_to_real_test"]), "1.000"))
    elif "accuracy" not in rec and "real_test" in clf:
        rows.append(("user-classifier accuracy (real-test)", "-", _fmt(clf["real_test"]["accuracy"])))
    if "generated_vs_test" in fm:
        g, b = fm["generated_vs_test"], fm["baseline_val_vs_test"]
        for key, name in (("kid", "KID (classifier features)"), ("precision", "precision (k-NN)"),
                          ("recall", "recall (k-NN)"), ("density", "density"), ("coverage", "coverage"),
                          ("mean_pairwise_distance", "diversity: mean pairwise feature distance")):
            rows.append((name, _fmt(g[key]), _fmt(b[key]) + (" (real-val)" if key == "kid" else "")))
    mem = m.get("memorisation", {})
    if "feature" in mem:
        rows.append(("median nearest-train distance (features / pixels)",
                     f"{_fmt(mem['feature']['generated_nn_median'])} / {_fmt(mem['pixel']['generated_nn_median'])}",
                     f"{_fmt(mem['feature']['real_test_nn_median'])} / {_fmt(mem['pixel']['real_test_nn_median'])}"))
        rows.append(("near-copies flagged (fraction)", _fmt(mem["fraction_flagged"]),
                     f"~{_fmt(mem['expected_fraction_per_space'])} per space"))
    for regime, aug in m.get("augmentation", {}).items():
        if not isinstance(aug, dict) or "real_only" not in aug:
            continue
        base = _fmt(aug["real_only"])
        label = "real-test accuracy" if regime == "full" else f"real-test accuracy, {regime}"
        seeds = f"{len(aug['real_only']['per_seed'])} seeds, {aug.get('steps', '?')} steps each"
        rows.append((f"{label}, real only ({seeds})", "-", base))
        for n, r in aug.get("real_plus_synthetic", {}).items():
            rows.append((f"{label}, real + {n} synthetic/user", _fmt(r), base))
            rows.append((f"gain_real_plus_synthetic ({n}/user, paired over seeds)",
                         _iv(aug["gain_real_plus_synthetic"][n]), "0"))
        if "synthetic_only" in aug:
            rows.append((f"{label}, synthetic only", _fmt(aug["synthetic_only"]), base))
            rows.append(("synthetic_only_ratio (paired over seeds)", _iv(aug["synthetic_only_ratio"]), "1.0"))
    phys = m.get("physics", {})
    if "step_rate_error_ratio" in phys:
        rows.append(("step_rate_error_ratio (generated MAE / real-test MAE)", _fmt(phys["step_rate_error_ratio"]),
                     f"1.0 ({_fmt(phys['step_rate_mae_generated'])} vs {_fmt(phys['step_rate_mae_real_test'])} Hz)"))
        rows.append(("torso velocity error ratio (generated / real-test)", _fmt(phys["torso_velocity_error_ratio"]),
                     f"1.0 ({_fmt(phys['torso_velocity_mae_generated'])} vs "
                     f"{_fmt(phys['torso_velocity_mae_real_test'])} m/s)"))
    return rows


def format_table(rows: Sequence[tuple[str, str, str]]) -> str:
    """Markdown table of `headline_table` rows."""
    lines = ["| metric | generated | real baseline |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def plot_embedding(real_feats: np.ndarray, real_labels: np.ndarray, gen_feats: np.ndarray, gen_labels: np.ndarray,
                   user_map: UserMap, title: str = "classifier features, PCA: real-test (o) vs generated (x)"):
    """2-D PCA (fitted on real + generated) of the penultimate features, one colour per user."""
    allf = np.concatenate([real_feats, gen_feats]).astype(np.float64)
    mu = allf.mean(0)
    _, _, vt = np.linalg.svd(allf - mu, full_matrices=False)
    proj = lambda f: (f - mu) @ vt[:2].T  # noqa: E731
    pr, pg = proj(real_feats), proj(gen_feats)
    fig = Figure(figsize=(6.5, 5), layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["tab20"]
    for c in range(user_map.num_users):
        col = cmap(c % 20)
        ax.scatter(*pr[real_labels == c].T, s=12, color=col, marker="o", alpha=0.6)
        ax.scatter(*pg[gen_labels == c].T, s=16, color=col, marker="x",
                   label=f"user {user_map.user_of_label(c)}" if user_map.num_users <= 20 else None)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    if user_map.num_users <= 20:
        ax.legend(fontsize=7, ncols=2, loc="best")
    ax.set_title(title, fontsize=10)
    return fig


def plot_augmentation(aug: Mapping[str, Any], title: str = "real-test accuracy vs synthetic images per user"):
    """Mean ± std accuracy against the synthetic amount, one line per regime; synthetic-only dashed."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for i, (regime, r) in enumerate(aug.items()):
        if not isinstance(r, dict) or "real_only" not in r:
            continue
        xs = [0] + [int(n) for n in r.get("real_plus_synthetic", {})]
        ys = [r["real_only"]] + list(r.get("real_plus_synthetic", {}).values())
        col = f"C{i}"
        ax.errorbar(xs, [y["mean"] for y in ys], yerr=[y["std"] for y in ys], marker="o", color=col, capsize=3,
                    label=f"{regime}: real + synthetic")
        if "synthetic_only" in r:
            ax.axhline(r["synthetic_only"]["mean"], color=col, ls="--", lw=1, label=f"{regime}: synthetic only")
    ax.set_xlabel("synthetic images per user added to real-train")
    ax.set_ylabel("real-test accuracy")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return fig


def plot_near_copies(near: Sequence[Mapping[str, Any]], max_pairs: int = 8):
    """Flagged generated images (top) above their nearest training image (bottom)."""
    near = list(near)[:max_pairs]
    fig = Figure(figsize=(1.6 * max(1, len(near)) + 0.6, 3.6), layout="constrained")
    axes = fig.subplots(2, max(1, len(near)), squeeze=False)
    for j, r in enumerate(near):
        for i, (key, name) in enumerate((("generated", "generated"), ("nearest_train_feature", "nearest train"))):
            ax = axes[i][j]
            ax.imshow(read_rgb(r[key]))
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
        axes[0][j].set_title(f"d={r['feature_distance']:.3g}", fontsize=7)
    if not near:
        axes[0][0].set_axis_off()
        axes[1][0].set_axis_off()
        axes[0][0].set_title("no near-copies flagged")
    fig.suptitle("near-copies: generated (top) vs nearest training image (bottom)", fontsize=9)
    return fig


def plot_c2st_extremes(real, real_scores: np.ndarray, gen, gen_scores: np.ndarray, res: Mapping[str, Any],
                       k: int = 6):
    """The real images the C2ST is surest are real (top) and the generated images it is surest are
    generated (bottom), with their held-out P(generated). `real`, `gen`: uint8 (N, 3, H, W)."""
    rows = []
    for images, scores, sign in ((real, real_scores, 1.0), (gen, gen_scores, -1.0)):
        idx = np.flatnonzero(~np.isnan(scores))
        rows.append([(images[i], scores[i]) for i in idx[np.argsort(sign * scores[idx], kind="stable")][:k]])
    cols = max(1, max(len(r) for r in rows))
    fig = Figure(figsize=(1.6 * cols + 0.6, 3.8), layout="constrained")
    axes = fig.subplots(2, cols, squeeze=False)
    for i, (row, name) in enumerate(zip(rows, ("real", "generated"))):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(row):
                ax.imshow(row[j][0].permute(1, 2, 0).numpy())
                ax.set_title(f"P(gen)={row[j][1]:.2f}", fontsize=7)
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
    lo, hi = res["interval"]
    fig.suptitle(f"C2ST accuracy {res['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]: images it is surest about", fontsize=9)
    return fig


def format_calibration(result: Mapping[str, Any]) -> str:
    lines = ["| run | metric | value | 95% interval | expected | passed |", "|---|---|---|---|---|---|"]
    lines += [f"| {c['run']} | {c['metric']} | {_fmt(c['value'])} | [{_fmt(c['interval'][0])}, "
              f"{_fmt(c['interval'][1])}] | {c['expected']} | {'yes' if c['passed'] else 'NO'} |"
              for c in result["checks"]]
    return "\n".join(lines)


def write_figures(m: Mapping[str, Any], out_dir: Path, user_map: UserMap, test_feats, test_labels,
                  gen_feats=None, gen_labels=None) -> list[str]:
    """Per-user accuracy bars, confusion matrices, PCA embedding, augmentation curve, near-copies."""
    written = []

    def save(fig, name):
        viz.save_figure(fig, out_dir / name)
        written.append(name)

    real = m["classifier"]["real_test"]
    uids = real["user_ids"]
    save(viz.plot_confusion(real["confusion_matrix"], uids, title="real-test confusion"), "confusion_real_test.png")
    rec = m.get("recognisability")
    if rec:
        save(viz.plot_per_user_bars({int(u): v for u, v in rec["per_user"].items()}, "accuracy on generated",
                                    baseline=real["accuracy"], baseline_label="real-test accuracy",
                                    title="recognisability per user"), "recognisability_per_user.png")
        save(viz.plot_confusion(rec["confusion_matrix"], uids, title="generated-image confusion"),
             "confusion_generated.png")
        save(plot_embedding(test_feats, test_labels, gen_feats, gen_labels, user_map), "embedding_pca.png")
    if "c2st" in m and (out_dir / "c2st_most_sure.png").is_file():
        written.append("c2st_most_sure.png")  # drawn by the evaluation, which holds the 256 px images
    if "near_copies" in m.get("memorisation", {}):
        save(plot_near_copies(m["memorisation"]["near_copies"]), "near_copies.png")
    if any(isinstance(v, dict) and "real_plus_synthetic" in v for v in m.get("augmentation", {}).values()):
        save(plot_augmentation(m["augmentation"]), "augmentation_gain.png")
    return written
