"""Does the meta-learned Down span the directions Stage-2 needs? A diagnostic of the prior.

For one identity's Stage-2 training images, ``weight_gradients`` returns, per adapted layer, the
gradient G (out x in) of the Stage-2 loss with respect to that layer's weight at the base model,
averaged over seeded noise draws. A frozen Down D (r1 x in) only lets Stage-2 move the layer's
weight inside the row space of D, so the share of G's energy inside that row space,
||G Q||^2 / ||G||^2 (Q: an orthonormal basis of D's rows), is how much of the first step's
descent a Meta-LoRA adapter can follow. ``capture`` compares the prior's share with a random Down
of the same rank (about r1 / in), with the best rank-r1 and rank-1 subspaces of G itself, and
with the subspace of the gradient of other identities (what every identity shares).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..lora.adapter import AdapterSet, LoRAAdapter
from ..lora.layers import resolve_targets
from ..train.stage2 import Stage2Config, flow_step_loss


def weight_gradients(host, cond, images: Sequence[Image.Image], preset: str, *, draws: int = 64,
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """Per layer of ``preset``: d(loss)/dW at the base model, mean over ``draws`` noise draws
    (cycling through the images), float64 (out, in).

    The gradient is read off an adapter whose Down is the identity matrix and whose Up is zero:
    the adapter adds nothing to the output and d(loss)/d(Up) equals d(loss)/dW.
    """
    shapes = resolve_targets(preset, host.dims)
    adapters = AdapterSet({n: LoRAAdapter(fin, fout, rank=fin, mid=False) for n, (fin, fout) in shapes.items()},
                          mode="lora", preset=preset)
    for _, a in adapters.items():
        with torch.no_grad():
            a.down.copy_(torch.eye(a.in_features))
        a.down.requires_grad_(False)
    latents = host.encode_images(list(images))
    gen = torch.Generator().manual_seed(seed)
    sigma_mode = Stage2Config().sigma_mode
    handle = host.attach(adapters)
    try:
        with host.training(), torch.enable_grad():
            for i in range(draws):
                loss = flow_step_loss(host, [latents[i % len(latents)]], cond, gen, sigma_mode=sigma_mode,
                                      use_shift=False)
                (loss / draws).backward()
    finally:
        handle.remove()
    return {n: a.up.grad.detach().double().clone() for n, a in adapters.items()}


def _share(g: torch.Tensor, rows: torch.Tensor) -> float:
    """||G Q||^2 with Q an orthonormal basis of the row space of ``rows`` (k, in)."""
    q, _ = torch.linalg.qr(rows.double().T)
    return float(((g @ q) ** 2).sum())


def capture(grads: Mapping[str, torch.Tensor], downs: Mapping[str, torch.Tensor], *,
            shared: Mapping[str, torch.Tensor] | None = None, random_draws: int = 4, seed: int = 0) -> dict[str, float]:
    """Energy shares of ``grads`` summed over layers (each in [0, 1]):

    - ``prior``: inside the rows of ``downs`` (the prior's Down, r1 rows per layer);
    - ``random``: inside a random Gaussian Down of the same shape (mean of ``random_draws``);
    - ``best_r1`` / ``best_1``: inside the top r1 / top 1 right singular vectors of G itself
      (the most any r1-row / one-row Down could capture);
    - ``shared``: inside the top r1 right singular vectors of ``shared`` (another gradient,
      e.g. that of other identities), when given.
    """
    g = torch.Generator().manual_seed(seed)
    tot = {"prior": 0.0, "random": 0.0, "best_r1": 0.0, "best_1": 0.0, "shared": 0.0}
    energy = 0.0
    for name, grad in grads.items():
        d = downs[name]
        r1 = d.shape[0]
        energy += float((grad ** 2).sum())
        tot["prior"] += _share(grad, d)
        tot["random"] += float(np.mean([_share(grad, torch.randn(d.shape, generator=g, dtype=torch.float64))
                                        for _ in range(random_draws)]))
        s = torch.linalg.svdvals(grad)
        tot["best_r1"] += float((s[:r1] ** 2).sum())
        tot["best_1"] += float(s[0] ** 2)
        if shared is not None:
            _, _, vh = torch.linalg.svd(shared[name], full_matrices=False)
            tot["shared"] += _share(grad, vh[:r1])
    out = {k: v / energy for k, v in tot.items()}
    if shared is None:
        del out["shared"]
    return out


def summarise_shares(rows: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    keys = rows[0].keys()
    return {k: {"mean": float(np.mean([r[k] for r in rows])),
                "std": float(np.std([r[k] for r in rows], ddof=1)) if len(rows) > 1 else 0.0, "n": len(rows)}
            for k in keys}


def run_subspace(arts, out, *, identities: int = 4, others: int = 8, draws: int = 64, seed: int = 0,
                 label: str = "full") -> dict[str, Any]:
    """The diagnostic on the comparison's held-out identities (their crop grids), on Stage-1
    training identities (fresh photos of them) and, as the shared part, on ``others`` calibration
    identities. Writes subspace.json and table.md to ``out``."""
    import json
    import time
    from pathlib import Path

    from ..formats.files import atomic_write_bytes
    from .experiment import ReproConfig, held_out, training_images
    from .render import CALIBRATION_OFFSET, TRAIN_OFFSET, make_identity, random_view, render

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    preset = arts.prior.preset or "all"
    cond = arts.cond(None)

    def grads(images, s):
        return weight_gradients(arts.host, cond, images, preset, draws=draws, seed=s)

    pool = held_out(ReproConfig(seed=seed, identities=others), offset=CALIBRATION_OFFSET)
    per_other = [grads(training_images(it, "meta_lora", seed), seed * 1000 + 500 + k) for k, it in enumerate(pool)]
    shared = {n: torch.stack([g[n] for g in per_other]).mean(0) for n in per_other[0]}
    g = np.random.default_rng(np.random.SeedSequence([seed, 11]))
    groups = {
        "held_out": [training_images(it, "meta_lora", seed) for it in held_out(ReproConfig(seed=seed, identities=identities))],
        "stage1_training": [[render(make_identity(TRAIN_OFFSET + seed * 100_000 + k), random_view(g, scale=(0.6, 1.25)),
                                    (32, 32)) for _ in range(8)] for k in range(identities)],
    }
    rows: dict[str, list] = {}
    for group, image_sets in groups.items():
        for k, images in enumerate(image_sets):
            grad = grads(images, seed * 1000 + k)
            specific = {n: grad[n] - shared[n] for n in grad}
            rows.setdefault(group, []).append(capture(grad, arts.prior.downs, shared=shared, seed=k))
            rows.setdefault(group + "_specific", []).append(capture(specific, arts.prior.downs, seed=k))
    results = {"label": label, "draws": draws, "identities": identities, "others": others, "r1": arts.prior.r1,
               "layers": len(arts.prior.downs), "prior_sha256": arts.prior.sha256,
               "groups": {k: summarise_shares(v) for k, v in rows.items()}, "rows": rows,
               "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_bytes(out / "subspace.json", json.dumps(results, indent=2, sort_keys=True).encode())
    cols = ("prior", "random", "best_r1", "best_1", "shared")
    lines = [f"# Share of the Stage-2 gradient inside the prior's Down ({label})", "",
             f"Per identity: the gradient of the Stage-2 loss w.r.t. every adapted weight at the base model "
             f"({draws} noise draws, {len(arts.prior.downs)} layers, r1 = {arts.prior.r1}); cells: share of its "
             "energy inside a subspace, mean ± std (n) over identities. prior: the meta-learned Down; random: a "
             "random Down of the same rank; best r1 / best 1: the gradient's own top r1 / top 1 input directions; "
             f"shared: the top r1 directions of the mean gradient of {others} other identities. *_specific: the "
             "identity's gradient minus that mean.", "",
             "| identities | " + " | ".join(cols) + " |", "|---" * (1 + len(cols)) + "|"]
    for group, summ in results["groups"].items():
        cells = [f"{summ[c]['mean']:.3f} ± {summ[c]['std']:.3f} ({summ[c]['n']})" if c in summ else "-" for c in cols]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    atomic_write_bytes(out / "table.md", ("\n".join(lines) + "\n").encode())
    return results
