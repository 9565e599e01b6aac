"""Scores for the small domain: an identity embedder (the R-FaceSim idea) and a context score
(the CLIP-T idea).

The embedder is a small CNN trained to tell the *training* identities apart (a cosine-softmax
classifier over them); its normalised penultimate features are the identity embedding. It never
sees a held-out identity. Identity similarity of a generated image is its mean cosine
similarity to the identity's *other* images, never the one Stage-2 trained on.

The context score is defined, not learned: the probability of the named background colour under
a softmax over the negative squared distances of the image's border colour to each context's.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..hosts.diffusers_flux import pil_to_tensor
from .render import CONTEXTS, border_colour

log = logging.getLogger(__name__)

EMBED_DIM = 64
CONTEXT_TEMPERATURE = 40.0**2  # squared RGB distance scale of the context softmax


class IdentityEmbedder(nn.Module):
    """(B, 3, 32, 32) images in [-1, 1] -> (B, EMBED_DIM) unit vectors."""

    def __init__(self, width: int = 32, dim: int = EMBED_DIM) -> None:
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(), nn.Conv2d(w, w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(), nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * w, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        x = torch.stack([pil_to_tensor(im.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)) for im in images])
        return self(x)


def train_embedder(model: IdentityEmbedder, n_classes: int,
                   batches: Callable[[np.random.Generator], tuple[torch.Tensor, torch.Tensor]], *, steps: int,
                   lr: float = 2e-3, seed: int = 0, scale: float = 16.0, log_every: int = 100) -> list[float]:
    """Cosine-softmax training over the training identities (labels 0..n_classes-1)."""
    torch.manual_seed(seed)
    g = np.random.default_rng(seed)
    centres = nn.Parameter(F.normalize(torch.randn(n_classes, model.net[-1].out_features), dim=-1))
    opt = torch.optim.AdamW([*model.parameters(), centres], lr=lr, weight_decay=1e-4)
    model.train()
    losses = []
    for step in range(steps):
        x, y = batches(g)
        logits = scale * model(x) @ F.normalize(centres, dim=-1).T
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            log.info("embedder %d/%d loss %.4f", step + 1, steps, sum(losses[-log_every:]) / log_every)
    model.eval().requires_grad_(False)
    return losses


def identity_similarity(embedder: IdentityEmbedder, generated: Sequence[Image.Image],
                        references: Sequence[Image.Image]) -> list[float]:
    """Per generated image: mean cosine similarity to the reference images (R-FaceSim's rule:
    the references are the identity's other images, not the Stage-2 training image)."""
    if not references:
        raise ValueError("identity_similarity needs at least one reference image of the identity")
    g, r = embedder.embed(generated), embedder.embed(references)
    return (g @ r.T).mean(1).tolist()


def context_probabilities(image: Image.Image) -> dict[str, float]:
    """Softmax over contexts of -|border colour - context colour|^2 / T."""
    c = border_colour(image)
    names = list(CONTEXTS)
    d = np.array([np.sum((c - np.asarray(CONTEXTS[n], dtype=np.float64) * 0.9) ** 2) for n in names])
    p = np.exp(-(d - d.min()) / CONTEXT_TEMPERATURE)
    p /= p.sum()
    return dict(zip(names, p.tolist()))


def context_score(image: Image.Image, context: str) -> float:
    """Probability that ``image`` shows the named context (1: it clearly does)."""
    if context not in CONTEXTS:
        raise ValueError(f"unknown context {context!r}; choose one of {list(CONTEXTS)}")
    return context_probabilities(image)[context]
