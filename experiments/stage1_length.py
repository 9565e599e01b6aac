"""Does a longer Stage-1 make a better prior? (metalora_core/synthfaces/stage1_length.py)

    python experiments/stage1_length.py --out experiments/results/stage1_length [--smoke]

One Stage-1 run of 9,600 steps (3x the committed prior's) on fresh photos of the training
identities, Down saved at 0, 800, 1,600, 3,200, 6,400 and 9,600 steps: the share of the held-out
identities' Stage-2 gradient inside each, then Meta-LoRA with the 3,200- and 9,600-step Down against
plain LoRA on the comparison's held-out identities, seeds and checkpoints. About 40 CPU minutes.
``--smoke`` builds throw-away artefacts (seconds).
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
    from metalora_core.synthfaces.stage1_length import SMOKE_LENGTH, run_stage1_length

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--smoke", action="store_true", help="seconds: tiny artefacts, a few steps")
    p.add_argument("--artefacts", default=str(HERE / "artefacts"), help="artefact folder of the full run")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    out = Path(args.out)
    if args.smoke:
        results = run_stage1_length(build_artefacts(out / "artefacts", SMOKE_BUILD), out, SMOKE_LENGTH, label="smoke")
    else:
        results = run_stage1_length(load_artefacts(args.artefacts), out)
    print((out / "table.md").read_text())
    print(f"({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
