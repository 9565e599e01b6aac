"""Chooses the small domain's one learning rate with plain LoRA alone, on calibration identities
that the comparison never scores.

    python experiments/calibrate.py --out experiments/results/calibration [--smoke]

For each rate (the paper's 4e-4, 4e-3 and 1.9e-2 = 4e-4 x 3072/64), plain LoRA trains on ONE
photo of each calibration identity; the samples are scored against that photo (does LoRA learn
it?), against the identity's other images and against the prompt. The rate with the highest
mean photo similarity at the last checkpoint is the domain's (``synthfaces.artefacts.DOMAIN_LR``,
used by Stage-1, Stage-2 and the demo). ``--smoke`` builds throw-away artefacts (seconds).
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
    from metalora_core.synthfaces.experiment import SMOKE_CALIBRATION, run_calibration

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--smoke", action="store_true", help="seconds: tiny artefacts, one identity, two rates")
    p.add_argument("--artefacts", default=str(HERE / "artefacts"), help="artefact folder (the base model is what counts)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    out = Path(args.out)
    if args.smoke:
        arts = build_artefacts(out / "artefacts", SMOKE_BUILD)
        results = run_calibration(arts, out, SMOKE_CALIBRATION["lrs"], SMOKE_CALIBRATION["config"], label="smoke")
    else:
        results = run_calibration(load_artefacts(args.artefacts), out)
    print((out / "table.md").read_text())
    print(f"chosen lr {results['chosen_lr']:g} ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
