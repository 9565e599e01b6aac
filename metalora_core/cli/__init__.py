"""The ``metalora`` command line (also ``python -m metalora_core``)."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
from collections.abc import Sequence

# Modules that add subcommands: each has ``register(subparsers)``; a subcommand sets ``func``.
COMMAND_MODULES = (
    "metalora_core.cli.commands",
    "metalora_core.cli.crops",
    "metalora_core.cli.download",
    "metalora_core.cli.eval",
    "metalora_core.cli.meta_train",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metalora", description="Meta-LoRA for FLUX.1-dev, FLUX.2 and Z-Image: "
                                     "priors, personalization, export.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="print the traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for p in sub.choices.values():  # --debug also after the subcommand
        if "--debug" not in p._option_string_actions:
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="print the traceback of any error")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .errors import run_command

    code, result = run_command(args)
    if code:
        return code
    if isinstance(result, (dict, list)):
        print(json.dumps(result, indent=2, sort_keys=True))
    elif result is not None:
        print(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
