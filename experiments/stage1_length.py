"""Does a longer Stage-1 make a better prior? (metalora_core/synthfaces/stage1_length.py)

    python experiments/stage1_length.py --out experiments/results/stage1_length [--smoke]

One Stage-1 run of 9,600 steps (3x the committed prior's) on fresh photos of the training
identities, Down saved at 0, 800, 1,600, 3,200, 6,400 and 9,600 steps: the share of the held-out
identities' Stage-2 gradient inside each, then Meta-LoRA with the 3,200- and 9,600-step Down against
plain LoRA on the comparison's held-out identities, seeds and checkpoints. About 40 CPU minutes.
``--smoke`` builds throw-away artefacts (seconds).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiment_cli import run_script  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from metalora_core.synthfaces.stage1_length import SMOKE_LENGTH, run_stage1_length

    return run_script(__doc__, argv, full=lambda arts, out: run_stage1_length(arts, out),
                      smoke=lambda arts, out: run_stage1_length(arts, out, SMOKE_LENGTH, label="smoke"),
                      smoke_help="seconds: tiny artefacts, a few steps")


if __name__ == "__main__":
    raise SystemExit(main())
