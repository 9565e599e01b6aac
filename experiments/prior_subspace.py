"""How much of what Stage-2 needs lies inside the meta-learned Down? (metalora_core/synthfaces/subspace.py)

    python experiments/prior_subspace.py --out experiments/results/subspace [--smoke]

Per identity, the gradient of the Stage-2 loss w.r.t. every adapted weight at the base model, and
the share of its energy inside the prior's Down rows, a random Down's rows, the gradient's own top
directions and those shared with other identities. ``--smoke`` builds throw-away artefacts (seconds).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiment_cli import run_script  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from metalora_core.synthfaces.subspace import run_subspace

    return run_script(__doc__, argv, full=lambda arts, out: run_subspace(arts, out),
                      smoke=lambda arts, out: run_subspace(arts, out, identities=2, others=2, draws=2, label="smoke"),
                      smoke_help="seconds: tiny artefacts, two identities, two draws")


if __name__ == "__main__":
    raise SystemExit(main())
