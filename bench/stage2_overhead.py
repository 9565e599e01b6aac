"""Stage-2 step time with Meta-LoRA attached vs the bare frozen model's forward+backward.

Real FLUX.1-dev widths (hidden 3072 = 24 heads x 128, T5 width 4096, pooled 768), one
double and one single block, 1024 image + 512 text tokens, float32. The baseline's
backward computes activation gradients only (input requires grad, weights frozen): that
is the work any adapter training needs at least. Prints medians and their ratio
(target: <= 1.10).

    .venv/bin/python bench/stage2_overhead.py [--repeats 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from metalora_core.hosts.diffusers_flux import DiffusersFluxHost, FluxTextCond
from metalora_core.lora.flow import add_noise, flow_loss, velocity_target
from metalora_core.lora.layers import FluxDims
from metalora_core.formats.prior import make_prior
from metalora_core.train.recipe import build_adapters


def build(device: str, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    return model.to(device, dtype).eval().requires_grad_(False)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--image-tokens", type=int, default=1024)
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--r1", type=int, default=16)
    ap.add_argument("--r2", type=int, default=1)
    ap.add_argument("--preset", default="attn_mlp")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    model = build(args.device, dtype)
    host = DiffusersFluxHost(model)
    side = int(round((args.image_tokens) ** 0.5)) * 2  # latent side: tokens are 2x2 patches
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 16, side, side, generator=g).to(args.device)
    noise = torch.randn(1, 16, side, side, generator=g).to(args.device)
    sigma = torch.tensor([0.5], device=args.device)
    cond = FluxTextCond(torch.randn(1, args.text_tokens, 4096, generator=g), torch.randn(1, 768, generator=g),
                        torch.zeros(args.text_tokens, 3))

    def bare_step() -> float:
        xt = add_noise(x0, noise, sigma).requires_grad_(True)
        sync(args.device)
        t = time.perf_counter()
        loss = flow_loss(host.predict(xt, sigma, cond), velocity_target(x0, noise))
        loss.backward()
        sync(args.device)
        return time.perf_counter() - t

    prior = make_prior(FluxDims.from_diffusers_config(model.config), r1=args.r1, preset=args.preset,
                       generator=torch.Generator().manual_seed(0))
    adapters = build_adapters(host.dims, prior, rank=args.r2).to(args.device)
    opt = torch.optim.AdamW(adapters.trainable_parameters(), lr=4e-4)

    def meta_step() -> float:
        xt = add_noise(x0, noise, sigma)
        sync(args.device)
        t = time.perf_counter()
        with host.attach(adapters):
            loss = flow_loss(host.predict(xt, sigma, cond), velocity_target(x0, noise))
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        sync(args.device)
        return time.perf_counter() - t

    with host.training(), torch.enable_grad():
        times: dict[str, list[float]] = {"bare": [], "metalora": []}
        for i in range(args.warmup + args.repeats):  # interleaved, so drift hits both alike
            for name, fn in (("bare", bare_step), ("metalora", meta_step)):
                dt = fn()
                if i >= args.warmup:
                    times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "device": args.device, "dtype": args.dtype, "image_tokens": (side // 2) ** 2, "text_tokens": args.text_tokens,
        "r1": args.r1, "r2": args.r2, "preset": args.preset, "layers": len(adapters.names),
        "repeats": args.repeats, "median_bare_s": round(med["bare"], 4), "median_metalora_s": round(med["metalora"], 4),
        "ratio": round(med["metalora"] / med["bare"], 4), "target": 1.10,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
