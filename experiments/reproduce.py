"""The small-scale reproduction of Meta-LoRA's claim, end to end on a CPU.

    python experiments/reproduce.py --out DIR [--seed S] [--smoke]

Full run: loads the committed artefacts (``experiments/artefacts``: autoencoder, base model,
identity embedder, Stage-1 prior; rebuilt by ``experiments/build_artefacts.py``), then for each
held-out identity (picked by ``--seed``) trains Meta-LoRA, plain LoRA and LoRA + augmentation
from ONE photo and scores them at several step counts. ``--smoke`` builds throw-away artefacts
with a few steps each and runs a two-checkpoint comparison on one identity (seconds): it checks
the plumbing, not the result. Writes results.json, table.md and figure.png into DIR.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from experiment_cli import parse_common  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from metalora_core.synthfaces.artefacts import SMOKE_BUILD, build_artefacts, load_artefacts
    from metalora_core.synthfaces.experiment import SMOKE_REPRO, ReproConfig, run_reproduction

    args = parse_common(__doc__, argv, smoke_help="seconds: tiny artefacts, one identity, two checkpoints",
                        extra=lambda p: p.add_argument("--seed", type=int, default=0,
                                                       help="changes the held-out identities and every Stage-2 run"))
    out = Path(args.out)
    if args.smoke:
        arts = build_artefacts(out / "artefacts", dataclasses.replace(SMOKE_BUILD, seed=args.seed))
        config = dataclasses.replace(SMOKE_REPRO, seed=args.seed)
    else:
        arts = load_artefacts(args.artefacts)
        config = ReproConfig(seed=args.seed)
    results = run_reproduction(arts, out, config, label="smoke" if args.smoke else "full")
    print((out / "table.md").read_text())
    print(f"results: {out / 'results.json'}  figure: {out / 'figure.png'}  ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
