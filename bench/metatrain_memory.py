"""Peak host memory of one Stage-1 (meta-train) step at real FLUX widths, fp32, on the CPU.

Model: diffusers ``FluxTransformer2DModel`` with FLUX.1-dev widths (hidden 3072 = 24 heads x 128,
MLP 12288, T5 dim 4096, pooled 768) but only one double and one single block, random weights.
Batch: 4 latents of 64x64 (1024 image tokens) + 512 text tokens, 4 different identities (the
mixed-identity path), through ``meta_train`` itself: step 1 is a warm-up step (Mid/Up only),
step 2 a joint step (Down too).

Measure: Linux peak RSS. Before each step the kernel's high-water mark is reset
(``echo 5 > /proc/self/clear_refs``) and after it ``VmHWM`` is read; the figure per step is
``VmHWM - RSS before the step`` (activations, gradients, optimizer state, allocator slack).
tracemalloc would miss torch's CPU tensors (they are not allocated through Python's allocator).

    .venv/bin/python bench/metatrain_memory.py [--batch 4] [--r1 16] [--preset attn_mlp]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metalora_core.hosts.diffusers_flux import DiffusersFluxHost, FluxTextCond  # noqa: E402
from metalora_core.lora.layers import FluxDims, resolve_targets  # noqa: E402
from metalora_core.train.stage1 import MetaTrainConfig, MetaTrainData, meta_train  # noqa: E402

MIB = 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}; this benchmark needs Linux")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--r1", type=int, default=16)
    ap.add_argument("--r2", type=int, default=1)
    ap.add_argument("--preset", default="attn_mlp")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import FluxTransformer2DModel

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ).eval().requires_grad_(False)
    host = DiffusersFluxHost(model)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    cond = FluxTextCond(prompt_embeds=torch.randn(1, 512, 4096, generator=g), pooled=torch.randn(1, 768, generator=g),
                        text_ids=torch.zeros(512, 3))
    n_ids = args.batch
    data = MetaTrainData(identities=[f"id{i}" for i in range(n_ids)],
                         latents=[torch.randn(16, 64, 64, generator=g) for _ in range(n_ids)],  # 32x32 = 1024 tokens
                         item_identity=list(range(n_ids)), item_caption=["c"] * n_ids, conds={"c": cond})
    config = MetaTrainConfig(steps=2, bucket_steps=2, warmup_steps=1, identities_per_bucket=n_ids,
                             batch_size=args.batch, r1=args.r1, r2=args.r2, preset=args.preset)
    build_s = time.perf_counter() - t0

    rows = []
    mark = {"rss": 0, "t": 0.0}

    def before_step() -> None:
        mark["rss"] = _status_kib("VmRSS")
        mark["t"] = time.perf_counter()
        _reset_peak()

    def after_step(info) -> None:
        peak = _status_kib("VmHWM")
        rows.append({"step": info.step, "phase": info.phase, "identities_in_batch": len(set(info.identities)),
                     "rss_before_mib": round(mark["rss"] / 1024, 1), "peak_mib": round(peak / 1024, 1),
                     "step_peak_delta_mib": round((peak - mark["rss"]) / 1024, 1),
                     "seconds": round(time.perf_counter() - mark["t"], 1)})
        before_step()

    before_step()
    meta_train(host, data, config, callback=after_step)

    full = resolve_targets(args.preset, FluxDims())  # FLUX.1-dev: 19 double + 38 single blocks
    per_identity = sum(fout * args.r2 + args.r2 * args.r1 for _, fout in full.values()) * 4
    down_bytes = sum(args.r1 * fin for fin, _ in full.values()) * 4
    report = {
        "measure": "Linux peak RSS (VmHWM reset via /proc/self/clear_refs before each step), CPU, fp32",
        "model": "FluxTransformer2DModel, hidden 3072 (24x128), 1 double + 1 single block",
        "model_params_m": round(n_params / 1e6, 1),
        "model_weights_mib": round(n_params * 4 / MIB, 1),
        "tokens": {"image": 1024, "text": 512},
        "batch": args.batch, "r1": args.r1, "r2": args.r2, "preset": args.preset,
        "torch_threads": torch.get_num_threads(), "build_seconds": round(build_s, 1),
        "steps": rows,
        "full_flux_down_mib": round(down_bytes / MIB, 2),
        "full_flux_identity_mid_up_mib": round(per_identity / MIB, 2),
        "full_flux_identity_with_adamw_mib": round(3 * per_identity / MIB, 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
