"""The small domain's models: an autoencoder in FLUX's latent layout, fixed text embeddings and
a tiny ``FluxTransformer2DModel`` trained from scratch, plus an Euler sampler.

The autoencoder is a diffusers ``AutoencoderKL`` (16 latent channels, 4x downsampling, so a
32x32 image is an 8x8x16 latent, packed 2x2 into 16 FLUX tokens). The text conditioning is one
fixed random vector per word (seeded by the word itself), so a prompt's conditioning never
depends on training; the base model learns what the words mean. Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..hosts.diffusers_flux import FluxTextCond, DiffusersFluxHost, pil_to_tensor
from ..lora.flow import add_noise, flow_loss, sample_sigmas, velocity_target

log = logging.getLogger(__name__)

TEXT_LEN = 10  # tokens per prompt (padded)


@dataclass(frozen=True)
class SmallFluxConfig:
    """Sizes of the small domain's models."""

    heads: int = 4  # attention heads
    head_dim: int = 16  # = sum(axes_dims_rope)
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    num_double: int = 2  # double-stream blocks
    num_single: int = 2  # single-stream blocks
    text_dim: int = 32  # word-vector width (joint attention and pooled dims)
    ae_channels: tuple[int, ...] = (16, 32, 32)  # 3 levels: 4x downsampling

    def __post_init__(self) -> None:
        if sum(self.axes_dims_rope) != self.head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to head_dim {self.head_dim}")
        if len(self.ae_channels) < 2:
            raise ValueError(f"ae_channels needs >= 2 levels, got {self.ae_channels}")

    def to_dict(self) -> dict:
        return {"heads": self.heads, "head_dim": self.head_dim, "axes_dims_rope": list(self.axes_dims_rope),
                "num_double": self.num_double, "num_single": self.num_single, "text_dim": self.text_dim,
                "ae_channels": list(self.ae_channels)}

    @classmethod
    def from_dict(cls, d: dict) -> "SmallFluxConfig":
        return cls(heads=int(d["heads"]), head_dim=int(d["head_dim"]), axes_dims_rope=tuple(d["axes_dims_rope"]),
                   num_double=int(d["num_double"]), num_single=int(d["num_single"]), text_dim=int(d["text_dim"]),
                   ae_channels=tuple(d["ae_channels"]))


def build_autoencoder(config: SmallFluxConfig, generator_seed: int = 0):
    """A diffusers ``AutoencoderKL`` with 16 latent channels (FLUX's layout), random weights."""
    from diffusers import AutoencoderKL

    n = len(config.ae_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        return AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=config.ae_channels,
            layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=32,
            scaling_factor=1.0, shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False,
            mid_block_add_attention=False,
        )


def build_transformer(config: SmallFluxConfig, generator_seed: int = 0):
    """A ``FluxTransformer2DModel`` of the small domain (no guidance embedding), random weights."""
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        return FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=config.num_double, num_single_layers=config.num_single,
            attention_head_dim=config.head_dim, num_attention_heads=config.heads,
            joint_attention_dim=config.text_dim, pooled_projection_dim=config.text_dim,
            guidance_embeds=False, axes_dims_rope=config.axes_dims_rope,
        )


def word_vector(word: str, dim: int) -> torch.Tensor:
    """A fixed unit-variance vector per word, seeded by the word's hash (no training, no vocabulary)."""
    seed = int(hashlib.sha256(word.encode()).hexdigest()[:15], 16)
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


def encode_text(prompt: str, dim: int, length: int = TEXT_LEN) -> FluxTextCond:
    """A prompt as the diffusers host's conditioning: one word vector per token, zero padding.

    Raises:
        ValueError: more words than ``length``.
    """
    words = prompt.lower().split()
    if not words or len(words) > length:
        raise ValueError(f"prompt {prompt!r} has {len(words)} words; give 1..{length}")
    emb = torch.zeros(1, length, dim)
    for i, w in enumerate(words):
        emb[0, i] = word_vector(w, dim)
    pooled = emb[0, : len(words)].mean(0, keepdim=True)
    return FluxTextCond(prompt_embeds=emb, pooled=pooled, text_ids=torch.zeros(length, 3))


def latent_stats(vae, images) -> tuple[float, float]:
    """Mean and std of the raw latents of ``images`` (FLUX's shift and scaling factor)."""
    with torch.no_grad():
        x = torch.stack([pil_to_tensor(im) for im in images])
        z = vae.encode(x).latent_dist.mean
    return float(z.mean()), float(z.std())


def encode_batch(vae, images) -> torch.Tensor:
    """Same-size images -> (B, C, h, w) latents, shifted and scaled like ``encode_images``."""
    cfg = vae.config
    with torch.no_grad():
        x = torch.stack([pil_to_tensor(im) for im in images])
        z = vae.encode(x).latent_dist.mean
    return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


def decode_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) scaled latents -> (B, 3, H, W) images in [-1, 1]."""
    cfg = vae.config
    with torch.no_grad():
        x = vae.decode(z / cfg.scaling_factor + (cfg.shift_factor or 0.0)).sample
    return x.clamp(-1, 1)


def train_autoencoder(vae, batches: Callable[[torch.Generator], torch.Tensor], *, steps: int, lr: float = 1e-3,
                      kl_weight: float = 1e-4, seed: int = 0, log_every: int = 100) -> list[float]:
    """Trains the autoencoder on (B, 3, H, W) image batches: L2 reconstruction + a small KL term."""
    gen = torch.Generator().manual_seed(seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        x = batches(gen)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = 0.5 * torch.mean(post.mean**2 + post.var - 1.0 - post.logvar)
        loss = torch.mean((rec - x) ** 2) + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            log.info("autoencoder %d/%d loss %.4f", step + 1, steps, sum(losses[-log_every:]) / log_every)
    vae.eval().requires_grad_(False)
    return losses


def stack_conds(conds: Sequence[FluxTextCond]) -> FluxTextCond:
    return FluxTextCond(prompt_embeds=torch.cat([c.prompt_embeds for c in conds]),
                        pooled=torch.cat([c.pooled for c in conds]), text_ids=conds[0].text_ids)


def predict_batch(transformer, x_t: torch.Tensor, sigma: torch.Tensor, cond: FluxTextCond) -> torch.Tensor:
    """The host's velocity prediction for a batch whose rows have their own prompts."""
    from ..hosts.diffusers_flux import image_ids, pack_latents, unpack_latents

    b, _, h, w = x_t.shape
    out = transformer(hidden_states=pack_latents(x_t), timestep=sigma, guidance=None,
                      pooled_projections=cond.pooled, encoder_hidden_states=cond.prompt_embeds,
                      txt_ids=cond.text_ids, img_ids=image_ids(h, w), return_dict=False)[0]
    return unpack_latents(out, h, w)


def train_base(transformer, batches: Callable[[torch.Generator], tuple[torch.Tensor, FluxTextCond]], *, steps: int,
               lr: float = 1e-3, seed: int = 0, warmup: int = 100, log_every: int = 200,
               checkpoint_path=None, checkpoint_every: int = 0) -> list[float]:
    """Trains the transformer from scratch with the rectified-flow loss (logit-normal sigmas),
    AdamW with a linear warm-up and cosine decay.

    ``batches`` must draw only from the generator it is given. With ``checkpoint_path``, the
    weights, AdamW moments, generator and losses are written there (safetensors, atomically)
    every ``checkpoint_every`` steps, and a run that finds the file continues from it: the result
    equals an uninterrupted run.
    """
    import json
    from pathlib import Path

    from ..formats.files import atomic_save_safetensors, read_safetensors

    gen = torch.Generator().manual_seed(seed)
    transformer.train().requires_grad_(True)
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01)
    fn = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
    losses: list[float] = []
    start = 0
    names = [n for n, _ in transformer.named_parameters()]
    if checkpoint_path is not None and Path(checkpoint_path).is_file():
        tensors, meta = read_safetensors(checkpoint_path)
        info = json.loads(meta["state"])
        if info["steps"] != steps or info["seed"] != seed:
            raise ValueError(f"{checkpoint_path} is a checkpoint of {info['steps']} steps, seed {info['seed']}; "
                             f"this run has {steps}, seed {seed}: delete it or use the same settings")
        transformer.load_state_dict({k[len("w."):]: v for k, v in tensors.items() if k.startswith("w.")})
        opt.load_state_dict({"state": {i: {"step": tensors[f"adam.{n}.step"], "exp_avg": tensors[f"adam.{n}.exp_avg"],
                                           "exp_avg_sq": tensors[f"adam.{n}.exp_avg_sq"]}
                                       for i, n in enumerate(names) if f"adam.{n}.step" in tensors},
                             "param_groups": opt.state_dict()["param_groups"]})
        gen.set_state(tensors["rng"])
        start, losses = int(info["step"]), list(info["losses"])
        sched.last_epoch = start  # where the schedule stood after ``start`` steps
        for group in opt.param_groups:
            group["lr"] = lr * fn(start)
        log.info("base: resuming at step %d of %d from %s", start, steps, checkpoint_path)

    def save(step: int) -> None:
        st = opt.state_dict()["state"]
        tensors = {f"w.{k}": v.detach().contiguous() for k, v in transformer.state_dict().items()}
        for i, n in enumerate(names):
            if i in st:
                for part in ("step", "exp_avg", "exp_avg_sq"):
                    tensors[f"adam.{n}.{part}"] = st[i][part].detach().reshape(st[i][part].shape).contiguous()
        tensors["rng"] = gen.get_state()
        atomic_save_safetensors(tensors, checkpoint_path,
                                {"state": json.dumps({"step": step, "steps": steps, "seed": seed, "losses": losses})})

    for step in range(start, steps):
        x0, cond = batches(gen)
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(x0.shape[0], generator=gen)
        loss = flow_loss(predict_batch(transformer, add_noise(x0, noise, sigma), sigma, cond),
                         velocity_target(x0, noise))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            log.info("base %d/%d loss %.4f", step + 1, steps, sum(losses[-log_every:]) / log_every)
        if checkpoint_path is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            save(step + 1)
    transformer.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def sample(host: DiffusersFluxHost, cond: FluxTextCond, *, n: int, generator: torch.Generator,
           latent_hw: tuple[int, int] = (8, 8), steps: int = 20, channels: int = 16) -> torch.Tensor:
    """Euler integration of the flow from noise (sigma 1) to data (sigma 0); returns latents.

    ``host`` may carry attached adapters: that is how a LoRA's samples are drawn.
    """
    x = torch.randn((n, channels, *latent_hw), generator=generator)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        v = host.predict(x, s.expand(n), cond)
        x = x + (s_next - s) * v
    return x





class _LatentDist:
    def __init__(self, mean: torch.Tensor) -> None:
        self.mean = mean


class _Out:
    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)


class _LatentConfig:
    def __init__(self, factor: int) -> None:
        self.factor = factor
        self.shift_factor = 0.0
        self.scaling_factor = 1.0
        self.latent_channels = 3 * factor * factor

    def __iter__(self):
        return iter(self.__dict__.items())

    def keys(self):
        return self.__dict__.keys()

    def __getitem__(self, k):
        return self.__dict__[k]


class SpaceToDepthLatent(torch.nn.Module):
    """A lossless latent: each ``factor`` x ``factor`` pixel block becomes ``3 factor^2`` channels
    (``PixelUnshuffle``), scaled per channel to unit variance. It has the autoencoder interface the
    host uses (``encode(x).latent_dist.mean``, ``decode(z).sample``, ``config.shift_factor`` and
    ``scaling_factor``), so ``encode_images`` and the samplers run on it unchanged; decoding an
    encoding gives the image back to float rounding."""

    def __init__(self, factor: int = 4) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"space-to-depth factor must be >= 1, got {factor}")
        self.config = _LatentConfig(factor)
        c = self.config.latent_channels
        # per-channel centre and spread of the domain's latents (set by ``fit``)
        self.centre = torch.nn.Parameter(torch.zeros(1, c, 1, 1), requires_grad=False)
        self.spread = torch.nn.Parameter(torch.ones(1, c, 1, 1), requires_grad=False)

    def fit(self, x: torch.Tensor) -> None:
        """Sets the per-channel centre and spread from (B, 3, H, W) images."""
        z = torch.nn.functional.pixel_unshuffle(x, self.config.factor)
        self.centre.data = z.mean((0, 2, 3), keepdim=True)
        self.spread.data = z.std((0, 2, 3), keepdim=True).clamp_min(1e-3)

    def encode(self, x: torch.Tensor) -> _Out:
        z = torch.nn.functional.pixel_unshuffle(x, self.config.factor)
        return _Out(latent_dist=_LatentDist((z - self.centre) / self.spread))

    def decode(self, z: torch.Tensor) -> _Out:
        return _Out(sample=torch.nn.functional.pixel_shuffle(z * self.spread + self.centre, self.config.factor))
