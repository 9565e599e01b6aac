"""``metalora meta-train``: Stage-1 on a folder of identities -> a Meta-Down prior file.

``--tiny`` runs the whole thing on CPU in about a minute on the demo's tiny FLUX; ``make meta-train-tiny``
gives it a small multi-identity folder of real sample photos (obama x3, biden, astronaut).

Under ``torchrun`` (``torchrun --nproc_per_node 8 -m metalora_core meta-train ...``) every process
runs this command data-parallel (see ``train.stage1``): each trains on ``cuda:LOCAL_RANK`` (or the
CPU), rank 0 alone checks the ``--out`` folder, fills the latent cache first, prints the progress
and log lines and writes the checkpoint, prior, plot and summary.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from ..train.stage1.config import MetaTrainConfig  # torch-free: --help reads its defaults
from .interrupt import raise_if_interrupted

# --tiny defaults (a CPU-minute run); every one can still be overridden on the command line.
TINY = {"steps": 600, "bucket_steps": 100, "warmup_steps": 40, "identities_per_bucket": 2, "r1": 8,
        "resolution": 64, "checkpoint_every": 100}
CHECKPOINT_EVERY = 500  # steps between checkpoints without --tiny
# Flags whose default without --tiny is MetaTrainConfig's and with --tiny TINY's.
_TINY_FIELDS = ("steps", "bucket_steps", "warmup_steps", "identities_per_bucket", "r1")


def _config_defaults() -> dict[str, Any]:
    """``MetaTrainConfig``'s field defaults: the flags' defaults and help text."""
    return {f.name: f.default for f in dataclasses.fields(MetaTrainConfig)}


def register(sub: argparse._SubParsersAction) -> None:
    from ..lora.layers import PRESETS

    d = _config_defaults()
    p = sub.add_parser("meta-train", help="Stage-1: learn a Meta-Down prior from many identities (Algorithm 1)")
    p.add_argument("--data", help="folder with one subfolder of photos per identity (optional <stem>.txt captions)")
    p.add_argument("--out", required=True, help="output folder: prior.safetensors, loss.png, summary.json, checkpoint")
    p.add_argument("--model", help="local diffusers folder (holds model_index.json): FLUX.1-dev, FLUX.2 or Z-Image")
    p.add_argument("--tiny", action="store_true",
                   help="tiny FLUX on CPU with --data (about a minute; make meta-train-tiny fetches sample photos)")
    p.add_argument("--domain", default="person", help="domain label of the prior, e.g. woman, man (default person)")
    p.add_argument("--caption", help="class caption for photos without a .txt (default: 'a photo of a <domain>')")
    p.add_argument("--r1", type=int, help=f"Meta-Down rank (default {d['r1']}; --tiny {TINY['r1']})")
    p.add_argument("--r2", type=int, default=d["r2"], help="Mid rank during meta-training (default %(default)s)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help=f"target layers (default {d['preset']}; all: every Linear of the transformer blocks, as "
                        "ai-toolkit trains)")
    p.add_argument("--steps", type=int, help=f"q_total (default {d['steps']}; --tiny {TINY['steps']})")
    p.add_argument("--bucket-steps", type=int,
                   help=f"q_bucket (default {d['bucket_steps']}; --tiny {TINY['bucket_steps']})")
    p.add_argument("--warmup-steps", type=int,
                   help=f"q_warm-up (default {d['warmup_steps']}; --tiny {TINY['warmup_steps']})")
    auto = (f"auto: each photo of a bucket is used ~{d['uses_per_example']}x per bucket visit, paper Sec. 3"
            if d["identities_per_bucket"] == 0 else d["identities_per_bucket"])
    p.add_argument("--identities-per-bucket", type=int,
                   help=f"N (default {auto}; --tiny {TINY['identities_per_bucket']})")
    p.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help="items per step (default %(default)s, the paper's); under torchrun the global batch, split "
                        "across the processes (at least one item each)")
    p.add_argument("--lr", type=float, default=d["lr"], help="AdamW learning rate (default %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"], help="seed of init, buckets, data order and noise "
                   "(default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.safetensors")
    p.add_argument("--overwrite", action="store_true", help="start a new run in an --out folder that holds one")
    p.add_argument("--checkpoint-every", type=int,
                   help=f"steps between checkpoints (default {CHECKPOINT_EVERY}; --tiny {TINY['checkpoint_every']})")
    p.add_argument("--resolution", type=int,
                   help="training images have about resolution^2 pixels (default: the side of the dataset's "
                        f"bucket area, DatasetConfig.bucket_area; --tiny {TINY['resolution']})")
    p.add_argument("--crop-grid", action="store_true",
                   help="train on Stage-2's crop grid around each photo's face instead of the photo itself")
    p.add_argument("--no-augment", action="store_true",
                   help="each photo once as it is, centre-cropped to the closest aspect bucket (the default)")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flip per step")
    p.add_argument("--detector", default="auto", help="face detector backend (default auto)")
    p.add_argument("--cache", help="latent cache folder (default <out>/latent_cache)")
    p.add_argument("--device", default=None, help="training device (default cuda if available, else cpu)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="base model dtype for --model (adapters train in float32)")
    p.add_argument("--guidance", type=float, default=1.0, help="distilled guidance input while training")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--max-sequence-length", type=int, default=512,
                   help="text tokens (FLUX.1: T5, FLUX.2 and Z-Image: Qwen3; --tiny uses 32)")
    p.set_defaults(func=run_meta_train)


class Progress:
    """One status line on stderr: steps, loss, bucket, phase, speed, ETA (carriage return on a tty)."""

    def __init__(self, stream: Any = None, every_s: float = 2.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = 0.2 if self.tty else every_s
        self.first_step: int | None = None
        self.last = 0.0
        self.recent: list[float] = []

    def __call__(self, info: Any) -> None:
        raise_if_interrupted()  # a Ctrl-C that Python dropped (see cli.interrupt) stops the run here
        if self.first_step is None:
            self.first_step = info.step - 1
        self.recent = (self.recent + [info.loss])[-50:]
        now = time.monotonic()
        if info.step not in (self.first_step + 1, info.total) and now - self.last < self.every_s:
            return
        self.last = now
        done = info.step - self.first_step
        rate = done / info.seconds if info.seconds > 0 else float("nan")
        eta = (info.total - info.step) / rate if rate and math.isfinite(rate) else float("nan")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        line = (f"meta-train {info.step:>6}/{info.total}  loss {info.loss:.4f} (avg{len(self.recent)} "
                f"{sum(self.recent) / len(self.recent):.4f})  bucket {info.bucket + 1}/{info.n_buckets}  "
                f"{info.phase:<7}  {rate:.2f} it/s  ETA {eta_s}")
        if self.tty:
            end = "\n" if info.step == info.total else ""
            print("\r" + line, end=end, file=self.stream, flush=True)
        else:
            print(line, file=self.stream, flush=True)


def _pick(value: Any, tiny: bool, key: str, default: Any) -> Any:
    if value is not None:
        return value
    return TINY[key] if tiny else default


def meta_train_config(args: argparse.Namespace) -> MetaTrainConfig:
    """The ``MetaTrainConfig`` of the parsed flags: the flags given, else ``TINY`` under --tiny,
    else the config's own defaults.

    Raises:
        ValueError: a flag value the config refuses (names it).
    """
    picked = {k: _pick(getattr(args, k), bool(args.tiny), k, None) for k in _TINY_FIELDS}
    return MetaTrainConfig(**{k: v for k, v in picked.items() if v is not None},
                           **({"preset": args.preset} if args.preset else {}),
                           batch_size=args.batch_size, lr=args.lr, r2=args.r2, seed=args.seed)


def run_meta_train(args: argparse.Namespace) -> str | None:
    """The ``meta-train`` subcommand: data -> latents -> Stage-1 -> prior, loss plot, summary.

    Under torchrun: joins the process group (NCCL on CUDA, gloo on the CPU) and trains
    data-parallel; rank 0 returns the report, the other ranks None.
    """
    import logging

    from ..train.distributed import from_env, init_process_group, launch_device
    from ..train.stage1 import check_world_size

    launch = from_env()
    if launch is None:
        return _run(args, None)
    check_world_size(args.batch_size, launch.world_size)  # before waiting for the other processes
    if not launch.is_root:  # log lines and progress come from rank 0 only; errors from every rank
        logging.getLogger().setLevel(logging.ERROR)
    device = "cpu" if args.tiny else launch_device(launch, args.device)
    group = init_process_group(launch, device)
    try:
        return _run(args, group)
    finally:
        group.close()


def _run(args: argparse.Namespace, group: Any) -> str | None:
    import torch

    from ..hosts.diffusers_family import diffusers_host, encode_caption, encode_pipeline_images, load_pipeline
    from ..lora.families import family_of_diffusers_config
    from ..formats.files import atomic_save_png, atomic_write_bytes, file_content_sha256
    from ..data.identities import DatasetConfig, prepare_dataset, vae_fingerprint
    from ..train.stage1 import meta_train, to_prior
    from ..draw.charts import line_plot
    from ..formats.prior import save_prior
    from ..train.recipe import class_caption
    from .checks import check_meta_train

    root = group is None or group.is_root
    if group is None:
        check_meta_train(args)  # --out usable and not silently a previous run's; before any work
    else:  # rank 0's --out is the run's; its refusal stops every rank
        group.root_only(lambda: check_meta_train(args))
    tiny = bool(args.tiny)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if tiny:
        from ..hosts.tiny import TINY_T5_LEN, build_tiny_flux_pipeline

        # Tiny matrices gain nothing from threads, and on a busy machine OpenMP spin-waits make
        # 2 threads ~40x slower than 1 (measured: 1.85 s vs 0.05 s per step under load).
        torch.set_num_threads(1)
        pipe = build_tiny_flux_pipeline(args.seed)
        if not args.data:
            raise ValueError("meta-train --tiny needs --data DIR (one subfolder of photos per identity); "
                             "'make meta-train-tiny' lays out one from sample photos and runs this")
        data_dir = Path(args.data)
        max_len, base_model = TINY_T5_LEN, "tiny-flux (random weights, demo only)"
    else:
        if not args.data or not args.model:
            raise ValueError("meta-train needs --data DIR and --model DIR (a local diffusers model folder), or --tiny")
        pipe = load_pipeline(args.model, dtype=args.dtype, device=str(group.device) if group is not None else args.device)
        data_dir, max_len = Path(args.data), args.max_sequence_length
        base_model = family_of_diffusers_config(pipe.transformer.config).name

    resolution = _pick(args.resolution, tiny, "resolution", None)
    caption = args.caption or class_caption(args.domain)
    if args.crop_grid and args.no_augment:
        raise ValueError("--crop-grid and --no-augment contradict each other; pass one (default: --no-augment)")
    from ..faces.crops import bucket_config

    dcfg = DatasetConfig(augment=args.crop_grid, detector=args.detector, seed=args.seed, class_caption=caption,
                         flip=not args.no_flip,
                         **({"bucket_area": bucket_config(resolution).bucket_area} if resolution else {}))
    config = meta_train_config(args)
    every = _pick(args.checkpoint_every, tiny, "checkpoint_every", CHECKPOINT_EVERY)

    def prepare() -> Any:
        return prepare_dataset(
            data_dir,
            encode=lambda ims: encode_pipeline_images(pipe, ims),
            encoder_id=vae_fingerprint(pipe.vae),
            encode_caption=lambda c: encode_caption(pipe, c, max_sequence_length=max_len, guidance=args.guidance),
            config=dcfg,
            cache_dir=Path(args.cache) if args.cache else out / "latent_cache",
        )

    # Data-parallel: rank 0 encodes and fills the cache, then the other ranks read it (a cache on
    # another node's disk is filled there the same way; the trainer checks all ranks hold the same data).
    data = prepare() if group is None else group.root_first(prepare)
    # Latents and captions are cached: the VAE and text encoders are not needed while training.
    for name in ("vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    host = diffusers_host(pipe.transformer, checkpoint_every=int(args.gradient_checkpointing))
    result = meta_train(host, data, config, callback=Progress() if root else None,
                        checkpoint_path=out / "checkpoint.safetensors", checkpoint_every=every, resume=args.resume,
                        group=group)
    if not root:
        return None

    data_summary = {k: v for k, v in data.summary.items() if not k.startswith("cache_")}
    prior = to_prior(result, domain=args.domain, base_model=base_model, data_summary=data_summary)
    prior_path = save_prior(prior, out / "prior.safetensors")
    atomic_save_png(line_plot(result.losses, title=f"Stage-1 loss ({result.steps} steps)"), out / "loss.png")
    tail = result.losses[-50:]
    summary = {
        "prior": str(prior_path),
        "prior_sha256": file_content_sha256(prior_path),
        "loss_plot": str(out / "loss.png"),
        "checkpoint": str(out / "checkpoint.safetensors"),
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "train_seconds": round(result.seconds, 2),
        "total_seconds": round(time.perf_counter() - t_start, 2),
        "first_loss": result.losses[0],
        "last_loss_mean50": sum(tail) / len(tail),
        "buckets": [[result.identities[i] for i in b] for b in result.buckets],
        "plan": result.plan.to_dict() if result.plan else None,
        "bank_mib": round(result.bank_bytes / 2**20, 3),
        "config": config.to_dict(),
        "data": data.summary,
        "domain": args.domain,
        "caption": caption,
        "base_model": base_model,
        "tiny": tiny,
    }
    if group is not None:
        summary["data_parallel"] = {"world_size": group.world_size, "backend": group.backend}
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True).encode())
    plan = result.plan
    return (f"meta-train finished: {result.steps} steps in {summary['total_seconds']} s, loss "
            f"{summary['first_loss']:.4f} -> {summary['last_loss_mean50']:.4f} (mean of last {len(tail)})\n"
            f"  trained  {plan.identities_visited} of {plan.identities} identities ({plan.buckets} buckets of "
            f"<= {plan.identities_per_bucket})\n"
            f"  prior    {prior_path}\n  plot     {out / 'loss.png'}\n  summary  {out / 'summary.json'}"
            + (f"\n  ranks    {group.world_size} processes ({group.backend})" if group is not None else ""))
