"""Rebuilds the small domain's artefacts (autoencoder, base model, identity embedder, Stage-1
prior) from scratch: ``python experiments/build_artefacts.py --out experiments/artefacts``."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import torch

    from metalora_core.synthfaces.artefacts import SMOKE_BUILD, BuildConfig, build_artefacts

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "artefacts"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few steps of each (seconds): tests the build path")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # tiny matrices: threads only add spin-wait on a shared machine
    base = SMOKE_BUILD if args.smoke else BuildConfig()
    import dataclasses

    arts = build_artefacts(args.out, dataclasses.replace(base, seed=args.seed))
    print(f"artefacts written to {args.out}: {arts.manifest['seconds']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
