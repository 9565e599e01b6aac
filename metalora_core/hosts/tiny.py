"""A tiny FLUX-architecture pipeline built locally (no download): the demo's and tests' model.

Real diffusers classes (``FluxPipeline``, ``FluxTransformer2DModel``, ``AutoencoderKL``)
and real transformers text encoders (CLIP, T5) with tiny configs and random weights,
plus byte-level tokenizers built in code. It proves the pipeline end to end; with
random weights it says nothing about image quality.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

TINY_CLIP_LEN = 77
TINY_T5_LEN = 64


@dataclass(frozen=True)
class TinyFluxConfig:
    """Sizes of the tiny FLUX; the defaults train a step in tens of milliseconds on a CPU."""

    heads: int = 4  # attention heads
    head_dim: int = 16  # must equal sum(axes_dims_rope)
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    num_double: int = 2  # double-stream blocks
    num_single: int = 2  # single-stream blocks
    text_dim: int = 32  # CLIP hidden size = pooled dim; T5 d_model = joint_attention_dim
    vae_channels: tuple[int, ...] = (16, 16, 32, 32)  # 4 levels -> 8x downsampling like FLUX's VAE

    def __post_init__(self) -> None:
        if sum(self.axes_dims_rope) != self.head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to head_dim {self.head_dim}")
        if len(self.vae_channels) != 4:
            raise ValueError(f"vae_channels needs 4 levels (8x downsampling), got {self.vae_channels}")


def byte_tokenizer(bos: str | None, eos: str, pad: str, max_len: int):
    """A byte-level BPE tokenizer with no merges: every string tokenizes, nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = list(dict.fromkeys(t for t in (pad, bos, eos) if t is not None))  # pad may equal eos
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, vocab[eos])])
    kw = {"bos_token": bos} if bos is not None else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_len, pad_token=pad, eos_token=eos, **kw)


def build_tiny_flux_pipeline(seed: int = 0, config: TinyFluxConfig = TinyFluxConfig()):
    """Builds a ``FluxPipeline`` with tiny random-weight components, deterministic in ``seed``."""
    from .quiet import no_torchvision_notice

    with no_torchvision_notice():
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tok = byte_tokenizer("<|startoftext|>", "<|endoftext|>", "<|endoftext|>", TINY_CLIP_LEN)
    tok2 = byte_tokenizer(None, "</s>", "<pad>", TINY_T5_LEN)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=config.text_dim, intermediate_size=2 * config.text_dim,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TINY_CLIP_LEN,
            projection_dim=config.text_dim, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ))
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(tok2), d_model=config.text_dim, d_kv=8, d_ff=2 * config.text_dim, num_layers=2,
            num_heads=4, pad_token_id=tok2.pad_token_id, eos_token_id=tok2.eos_token_id,
            decoder_start_token_id=tok2.pad_token_id,
        ))
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=config.num_double, num_single_layers=config.num_single,
            attention_head_dim=config.head_dim, num_attention_heads=config.heads,
            joint_attention_dim=config.text_dim, pooled_projection_dim=config.text_dim,
            guidance_embeds=True, axes_dims_rope=config.axes_dims_rope,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=config.vae_channels,
            layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=256,
            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok,
                        text_encoder_2=t5, tokenizer_2=tok2, transformer=transformer)
    for m in (clip, t5, transformer, vae):
        m.eval().requires_grad_(False)
    return pipe
