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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiment_cli import run_script  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from metalora_core.synthfaces.experiment import SMOKE_CALIBRATION, run_calibration

    return run_script(__doc__, argv, full=lambda arts, out: run_calibration(arts, out),
                      smoke=lambda arts, out: run_calibration(arts, out, SMOKE_CALIBRATION["lrs"],
                                                              SMOKE_CALIBRATION["config"], label="smoke"),
                      smoke_help="seconds: tiny artefacts, one identity, two rates")


if __name__ == "__main__":
    raise SystemExit(main())
