"""Command-line entry: `python -m mdgen_helpers <subcommand> ...`.

Each subcommand lives in the module of its concern, which exposes two functions:
`add_cli_arguments(parser)` and `cli_main(args) -> int`. Modules are imported only when their
subcommand runs (or for its --help), so `python -m mdgen_helpers --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mdgen_helpers.errors import MdgenError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("mdgen_helpers.simulate", "write a simulated micro-Doppler data set (ID_k/*.jpg + users.json)"),
    "split": ("mdgen_helpers.data", "validate a data set and write its persisted train/val/test split.json"),
    "fit-tokenizer": ("mdgen_helpers.tokenizers", "fit the weight-free stand-in tokenizer on the train split"),
    "convert-vavae": ("mdgen_helpers.vavae", "write a slim safetensors copy of a VA-VAE checkpoint"),
    "extract": ("mdgen_helpers.latents", "encode every image of the split into latents (safetensors)"),
    "train": ("mdgen_helpers.launch", "train the user-conditioned LightningDiT on latents (Accelerate)"),
    "generate": ("mdgen_helpers.generate", "sample per-user spectrograms with classifier-free guidance"),
    "evaluate": ("mdgen_helpers.evaluate", "recognisability, realism, diversity, memorisation, augmentation gain"),
    "pipeline": ("mdgen_helpers.pipeline", "split, extract, train, generate in one resumable run"),
    "demo": ("mdgen_helpers.demo", "run notebooks 01-04 headless on simulated data and write the HTML report"),
    "kaggle": ("mdgen_helpers.kaggle", "Kaggle helpers: environment summary, dataset bundle"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mdgen_helpers",
        description="mdgen: generate radar micro-Doppler spectrograms of a chosen user.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<subcommand>")
    # Only the chosen subcommand's module is imported; the others get a lightweight stub parser.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).add_cli_arguments(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    try:
        return int(module.cli_main(args) or 0)
    except MdgenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
