"""What the experiment scripts of this folder share: ``--out``, ``--smoke``, ``--artefacts``,
logging, one thread, and printing the table the run wrote."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def parse_common(doc: str, argv: list[str] | None, *, smoke_help: str,
                 extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """Parses ``--out``, ``--smoke``, ``--artefacts`` (and what ``extra`` adds after ``--out``),
    sets up logging and one thread."""
    import torch

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results folder")
    if extra is not None:
        extra(p)
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    p.add_argument("--artefacts", default=str(HERE / "artefacts"), help="artefact folder of the full run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # tiny matrices: threads only add spin-wait on a shared machine
    return args


def run_script(doc: str, argv: list[str] | None, *, full: Callable[[Any, Path], dict],
               smoke: Callable[[Any, Path], dict], smoke_help: str) -> int:
    """Parses the common options, then ``full(artefacts, out)`` (the committed artefacts) or
    ``smoke(artefacts, out)`` (throw-away artefacts built in ``out/artefacts`` in seconds);
    prints ``out/table.md`` and the run's seconds."""
    from metalora_core.synthfaces.artefacts import SMOKE_BUILD, build_artefacts, load_artefacts

    args = parse_common(doc, argv, smoke_help=smoke_help)
    out = Path(args.out)
    if args.smoke:
        results = smoke(build_artefacts(out / "artefacts", SMOKE_BUILD), out)
    else:
        results = full(load_artefacts(args.artefacts), out)
    print((out / "table.md").read_text())
    print(f"({results['seconds']} s)")
    return 0
