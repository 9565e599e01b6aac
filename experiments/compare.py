"""The powered comparison on the gated assay (experiments/build_assay.py must have passed every gate):

    python experiments/compare.py --assay experiments/assay --out experiments/results_gated [--smoke]

Meta-LoRA, LoRA + augmentation and plain LoRA (and the two Down ablations) on 2 disjoint held-out
sets x 8 identities x 2 Stage-2 seeds = 32 pairs, at the learning rate the positive control chose,
scored at the assay's checkpoints. Resumable: finished runs are kept in OUT/runs.jsonl. Writes
results.json, table.md, figure.png and contrasts.png. ``--smoke`` builds a throw-away assay (gates
recorded, not enforced) and runs one pair (seconds): plumbing only. On 2 cores, two processes share
the work (make compare):

    python experiments/compare.py ... --shard 0/2 &  python experiments/compare.py ... --shard 1/2; wait
    python experiments/compare.py ...   # finds every run done and writes the results
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main(argv: list[str] | None = None) -> int:
    import argparse
    import logging

    import torch

    from metalora_core.synthfaces.assay import SMOKE_ASSAY, build_assay, config_from_dict, load_assay
    from metalora_core.synthfaces.compare import SMOKE_COMPARE, CompareConfig, check_shard, run_comparison
    from metalora_core.synthfaces.gates import GateFailed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assay", default=str(HERE / "assay"), help="the gated assay's build folder")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--smoke", action="store_true", help="seconds: throw-away assay, one pair")
    p.add_argument("--no-ablations", action="store_true", help="only the three main methods")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="run only the I-th of every N pairs (N processes share OUT/runs.jsonl; e.g. 0/2 and 1/2 "
                        "on 2 cores), write no results; a run without --shard then writes them")
    args = p.parse_args(argv)
    try:
        i_shard, n_shard = (int(v) for v in args.shard.split("/"))
        shard = check_shard(i_shard, n_shard)
    except ValueError:
        p.error(f"--shard {args.shard!r}: expected I/N with 0 <= I < N, e.g. 0/2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.smoke:
        folder = out / "assay"
        build_assay(folder, SMOKE_ASSAY, enforce=False)
        config = SMOKE_COMPARE
    else:
        folder = Path(args.assay)
        config = CompareConfig()
    try:
        arts = load_assay(folder, require_gates=not args.smoke)
    except GateFailed as e:
        print(f"{e}; no comparison is run on this assay (rebuild it: python experiments/build_assay.py --out {folder})")
        return 3
    if args.no_ablations:
        import dataclasses

        config = dataclasses.replace(config, ablations=False)
    assay_config = config_from_dict(json.loads((folder / "assay_config.json").read_text()))
    lr = float(json.loads((folder / "positive_control.json").read_text())["chosen_lr"])
    results = run_comparison(arts, out, config, assay_config, lr, label="smoke" if args.smoke else "full",
                             shard=shard)
    if results is None:
        print(f"shard {args.shard} done; once every shard is, run without --shard to write the results")
        return 0
    print((out / "table.md").read_text())
    print(f"({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
