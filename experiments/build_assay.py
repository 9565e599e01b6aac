"""Builds the gated assay stage by stage (latent, judge, base model, plain-LoRA positive control,
Stage-1 prior), evaluating each gate right after the stage it judges:

    python experiments/build_assay.py --out experiments/assay [--smoke] [--stop-after STAGE]

A rerun with the same --out continues with the first stage not yet written. A failed gate stops the
build with one line (exit status 3); no comparison is run on an assay that fails a gate.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import torch

    from metalora_core.synthfaces.assay import SMOKE_ASSAY, STAGES, AssayConfig, build_assay
    from metalora_core.synthfaces.gates import GateFailed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "assay"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="a few steps of each stage (seconds): tests the build path; gates recorded, not enforced")
    p.add_argument("--stop-after", choices=STAGES, default=None, help="stop after this stage (and its gate)")
    p.add_argument("--rebuild-from", choices=STAGES, default=None,
                   help="settings of this stage or later ones changed: rebuild from the first changed stage")
    p.add_argument("--base-steps", type=int, default=None, help="override AssayConfig.base_steps")
    p.add_argument("--heads", type=int, default=None, help="override AssayConfig.heads (base width = 16 x heads)")
    p.add_argument("--rank", type=int, default=None,
                   help="override AssayConfig.rank (Stage-2 rank r2 of every method, and Stage-1's)")
    p.add_argument("--checkpoints", default=None, metavar="S1,S2,...",
                   help="override AssayConfig.checkpoints (Stage-2 steps scored; the last is every method's length)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the matrices are small; 2 roughly halves a base step on an idle "
                        "2-core machine)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    import dataclasses

    config = dataclasses.replace(SMOKE_ASSAY if args.smoke else AssayConfig(), seed=args.seed)
    checkpoints = None
    if args.checkpoints is not None:
        try:
            checkpoints = tuple(int(v) for v in args.checkpoints.split(","))
        except ValueError:
            p.error(f"--checkpoints {args.checkpoints!r}: expected increasing step counts, e.g. 100,200,300,500,1000")
    over = {k: v for k, v in (("base_steps", args.base_steps), ("heads", args.heads), ("rank", args.rank),
                              ("checkpoints", checkpoints)) if v is not None}
    try:
        config = dataclasses.replace(config, **over)
    except ValueError as e:
        p.error(str(e))
    try:
        gates = build_assay(args.out, config, stop_after=args.stop_after, enforce=not args.smoke,
                            allow_changes=args.rebuild_from)
    except GateFailed as e:
        print(f"{e}; the build stops here (outputs so far in {args.out})")
        return 3
    for name, g in gates.items():
        print(f"{name}: {'passed' if g['passed'] else 'FAILED'} {g['value']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
