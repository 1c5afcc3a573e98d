"""Settings: one source of truth. Flags and MDGEN_* overrides come from the dataclass fields."""

import re
import shlex
from pathlib import Path

import pytest

from mdgen_helpers import cli, settings
from mdgen_helpers.profiles import PROFILES, get_profile
from mdgen_helpers.settings import EvalConfig, SamplingSettings, SettingsError, TrainConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[list[str]]:
    """Every `python -m mdgen_helpers ...` command of the README's shell blocks, continuation
    lines joined and comments dropped, as argv lists."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0]
            if "python -m mdgen_helpers" in line:
                argv = shlex.split(line.split("python -m mdgen_helpers", 1)[1].replace("$W", "runs/mine"))
                commands.append(argv)
    return commands


def test_readme_commands_parse_with_the_derived_flags():
    commands = readme_commands()
    assert {c[0] for c in commands} >= {"split", "extract", "train", "generate", "evaluate", "pipeline", "demo"}
    for argv in commands:
        cli.build_parser(argv).parse_args(argv)  # SystemExit (exit code 2) on an unknown flag


def test_readme_demo_overrides_are_valid_profile_settings(monkeypatch, tmp_path):
    """`demo --set FIELD=VALUE` in the README: known fields with accepted values, read as the
    notebooks read them (a misspelt simulator style would otherwise only fail inside notebook 01)."""
    from mdgen_helpers.demo import notebook_env
    from mdgen_helpers.simulate import get_style

    demos = [c for c in readme_commands() if c[0] == "demo" and "--set" in c]
    assert any("sim_style=mmwave" in c for c in demos)
    for argv in demos:
        args = cli.build_parser(argv).parse_args(argv)
        overrides = dict(item.split("=", 1) for item in args.set)
        with monkeypatch.context() as m:
            for key, value in notebook_env(args.profile, tmp_path, overrides=overrides).items():
                m.setenv(key, value)
            p = get_profile()
        assert p.name == args.profile and all(str(getattr(p, k)) == v for k, v in overrides.items() if "." not in k)
        get_style(p.sim_style)  # a known style (checked only once notebook 01 simulates)


def test_train_flags_map_to_config_fields():
    from mdgen_helpers.launch import config_from_args

    argv = ["train", "--latent_dir", "L", "--output_dir", "R", "--lr", "1e-3", "--betas", "0.8", "0.9",
            "--no_ema_warmup", "--no_progress", "--model_overrides", '{"depth": 2}', "--resume"]
    cfg = config_from_args(cli.build_parser(argv).parse_args(argv))
    assert (cfg.lr, cfg.betas, cfg.ema_warmup, cfg.progress, cfg.model_overrides, cfg.resume) == (
        1e-3, (0.8, 0.9), False, False, {"depth": 2}, True)
    assert cfg.max_epochs == TrainConfig().max_epochs  # not given: the one default


def test_an_optional_setting_can_be_cleared_from_the_command_line(capsys):
    """`--max_epochs none` lifts the epoch limit (argparse's None means "not given", so it needs
    its own word); a non-number is still a one-line usage error."""
    from mdgen_helpers.launch import config_from_args

    argv = ["train", "--latent_dir", "L", "--output_dir", "R", "--max_epochs", "none", "--max_steps", "50"]
    cfg = config_from_args(cli.build_parser(argv).parse_args(argv))
    assert cfg.max_epochs is None and cfg.max_steps == 50 and TrainConfig().max_epochs is not None
    argv = ["pipeline", "--output_dir", "o", "--train.max_steps", "None"]
    assert settings.given(cli.build_parser(argv).parse_args(argv), get_profile().__class__, nested=True)[
        "train.max_steps"] is None
    argv = ["train", "--latent_dir", "L", "--output_dir", "R", "--max_epochs", "lots"]
    with pytest.raises(SystemExit) as e:
        cli.build_parser(argv).parse_args(argv)
    assert e.value.code == 2 and "invalid int or none value: 'lots'" in capsys.readouterr().err


def test_pipeline_flags_reach_the_nested_profile(monkeypatch):
    from mdgen_helpers import pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "run_pipeline", lambda profile, *a, **k: seen.setdefault("p", profile) and
                        {"num_images": 0, "generated": ""})
    argv = ["pipeline", "--profile", "cpu-smoke", "--output_dir", "o", "--simulate", "--lr", "0.5", "--train.warmup_steps", "7",
            "--num_steps", "3", "--sampling.solver", "heun", "--eval.epochs", "4", "--sim_users", "5"]
    assert cli.main(argv) == 0
    p = seen["p"]
    assert (p.train.lr, p.train.warmup_steps, p.sampling.num_steps, p.sampling.solver, p.eval.epochs, p.sim_users) == (
        0.5, 7, 3, "heun", 4, 5)
    assert p.train.max_steps == PROFILES["cpu-smoke"].train.max_steps


def test_env_overrides_are_nested_and_unknown_names_refused(monkeypatch):
    monkeypatch.setenv("MDGEN_TRAIN__MAX_STEPS", "7")
    monkeypatch.setenv("MDGEN_SAMPLING__GUIDANCE_INTERVAL", "0.1, 0.9")
    monkeypatch.setenv("MDGEN_SIM_USERS", "3")
    monkeypatch.setenv("MDGEN_WORK_DIR", "/tmp/x")  # a notebook parameter, not a profile field
    p = get_profile("cpu-demo")
    assert (p.train.max_steps, p.sampling.guidance_interval, p.sim_users) == (7, (0.1, 0.9), 3)
    assert PROFILES["cpu-demo"].train.max_steps == 1200  # the table itself is untouched
    monkeypatch.setenv("MDGEN_MAX_STEPS", "7")  # the flat name of earlier versions
    with pytest.raises(SettingsError, match="MDGEN_TRAIN__MAX_STEPS"):
        get_profile("cpu-demo")


def test_unknown_override_names_are_errors():
    with pytest.raises(SettingsError, match="unknown setting"):
        get_profile("cpu-smoke", gen_batch_size=3)
    with pytest.raises(SettingsError, match="unknown setting"):
        settings.apply(TrainConfig(), {"time_budget_h": 1.0})
    assert get_profile("cpu-smoke", **{"train.time_budget": 1.5}).train.time_budget == 1.5


def test_sampling_settings_round_trip_through_the_manifest_json():
    s = SamplingSettings(guidance_scale=2.5, num_steps=7, solver="adaptive", guidance_interval=(0.2, 1.0), seed=3)
    back = SamplingSettings.from_json(s.to_json())
    assert back.to_json() == s.to_json() and back.solver == "dopri5"


def test_one_sampling_default_everywhere():
    """The generate CLI, the widgets, the sweep and the profiles' base share SamplingSettings()."""
    import inspect

    from mdgen_helpers import evaluate, widgets

    argv = ["generate", "--dit_checkpoint", "r", "--vavae_path", "t", "--output_dir", "o"]
    args = cli.build_parser(argv).parse_args(argv)
    assert settings.apply(SamplingSettings(), settings.given(args, SamplingSettings)) == SamplingSettings()
    for fn in (widgets.render_guidance_grid, widgets.guidance_sweep_figure, widgets.guidance_explorer,
               evaluate.guidance_tradeoff):
        params = inspect.signature(fn).parameters
        assert not {"num_steps", "solver", "guidance_scale"} & set(params), fn.__name__
    assert EvalConfig().few_shot_seed == 0
