"""How much of what Stage-2 needs lies inside the meta-learned Down? (metalora_core/synthfaces/subspace.py)

    python experiments/prior_subspace.py --out experiments/results/subspace [--smoke]

Per identity, the gradient of the Stage-2 loss w.r.t. every adapted weight at the base model, and
the share of its energy inside the prior's Down rows, a random Down's rows, the gradient's own top
directions and those shared with other identities. ``--smoke`` builds throw-away artefacts (seconds).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main(argv: list[str] | None = None) -> int:
    import torch

    from metalora_core.synthfaces.artefacts import SMOKE_BUILD, build_artefacts, load_artefacts
    from metalora_core.synthfaces.subspace import run_subspace

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--smoke", action="store_true", help="seconds: tiny artefacts, one identity, two draws")
    p.add_argument("--artefacts", default=str(HERE / "artefacts"), help="artefact folder of the full run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    out = Path(args.out)
    if args.smoke:
        arts = build_artefacts(out / "artefacts", SMOKE_BUILD)
        results = run_subspace(arts, out, identities=2, others=2, draws=2, label="smoke")
    else:
        results = run_subspace(load_artefacts(args.artefacts), out)
    print((out / "table.md").read_text())
    print(f"({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
